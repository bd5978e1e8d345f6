"""Settings checked when a config is built (``resolve``): the network options each
architecture takes and the sizes it needs, and the device. Each bad setting is refused before a
run reads (or downloads) any data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vaeflow.checks import InputError
from vaeflow.cli import main
from vaeflow.configs import resolve


@pytest.mark.parametrize(
    ("arch", "net_kwargs", "message"),
    [
        ("gatedconv", {"foo": 1}, "net_kwargs: make_networks('gatedconv') got unexpected"),
        ("mlp", {"head_channels": 8}, "net_kwargs: make_networks('mlp') got unexpected"),
        ("mlp", {"activation": "gelu"}, "net_kwargs: unknown activation 'gelu'"),
        ("gatedconv", {"min_sigma": -1.0}, "net_kwargs: min_sigma must be >= 0"),
    ],
)
def test_net_kwargs_that_the_architecture_refuses_are_refused_by_the_config(
    arch: str, net_kwargs: dict, message: str
) -> None:
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        resolve("static_mnist", "planar", {"arch": arch, "net_kwargs": net_kwargs})


def test_bad_net_kwargs_are_refused_before_the_data_is_looked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty data directory: the run would first fail (or, online, download) for want of
    # the data file, and only then name the setting that could never have worked.
    empty = tmp_path / "data"
    empty.mkdir()
    args = ["train", "--dataset", "static_mnist", "--flow", "planar", "--data-dir", str(empty),
            "--set", "net_kwargs={foo=1}", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "net_kwargs: make_networks('gatedconv') got unexpected keyword(s) ['foo']" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("arch", "net_kwargs", "message"),
    [
        # 0 built a decoder whose output ignores z; -1 was a RuntimeError (a traceback)
        ("gatedconv", {"head_channels": 0}, "head_channels must be a positive integer, got 0"),
        ("gatedconv", {"head_channels": -1}, "head_channels must be a positive integer, got -1"),
        ("gatedconv", {"head_channels": 2.5}, "head_channels must be a positive integer"),
        ("gatedconv", {"head_channels": True}, "head_channels must be a positive integer"),
        # a boolean read as the number 1
        ("gatedconv", {"variance_bounds": [0.1, True]}, "variance_bounds must be a number"),
        ("gatedconv", {"variance_bounds": [1, 2, 3]}, "variance_bounds must be two numbers"),
        ("gatedconv", {"variance_bounds": 5}, "variance_bounds must be two numbers"),
        ("mlp", {"hidden_sizes": [True, 4]}, "hidden_sizes[0] must be a positive integer, got "
                                             "True"),
    ],
)
def test_a_bad_network_size_is_refused_by_name(arch: str, net_kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=f"^net_kwargs: {re.escape(message)}"):
        resolve("freyfaces", "none", {"arch": arch, "net_kwargs": net_kwargs})


def test_the_papers_frey_faces_head_and_bounds_are_still_taken() -> None:
    config = resolve("freyfaces", "none", {"net_kwargs": {"head_channels": 64,
                                                            "variance_bounds": [0.05, 5]}})
    assert config.net_kwargs == {"head_channels": 64, "variance_bounds": [0.05, 5]}


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "hpu", "privateuseone"])
def test_a_device_type_this_machine_has_not_is_refused_in_one_line(
    name: str, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from test_cli import tiny_args

    from vaeflow.checks import resolve_device

    if name != "meta" and torch.accelerator.is_available() and (
        torch.accelerator.current_accelerator().type == name
    ):
        pytest.skip(f"this machine has a {name} device")
    with pytest.raises(InputError, match=f"^device '{name}' asked for, but there is no {name} "):
        resolve_device(name)
    # a run stops there, before its data reach the device (a traceback there before)
    run = tmp_path / "run"
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "none", "--device", name,
            "--max-steps", "1", "--out", str(run)]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after "run directory: ..."
    assert last.startswith(f"vaeflow: error: device '{name}' asked for"), last
    assert not run.exists()
