"""Config checks found by a review of the command line and ``resolve``: each bad setting is
refused when the config is built, before a run reads (or downloads) any data."""

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


def test_a_typo_in_a_resume_change_is_named_as_an_unknown_key() -> None:
    from vaeflow.runs import check_resume_changes

    typo = r"^unknown config key\(s\) 'max_minuts'; a resumed run may change device, "
    with pytest.raises(InputError, match=typo):
        check_resume_changes({"max_minuts": 10})
    with pytest.raises(InputError, match="^cannot change lr when resuming"):
        check_resume_changes({"lr": 0.1, "max_minutes": 10})
    check_resume_changes({"max_minutes": 10, "device": "cpu"})  # may change


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
        ("mlp", {"hidden_sizes": [True, 4]}, "hidden_sizes must be a non-empty sequence"),
    ],
)
def test_a_bad_network_size_is_refused_by_name(arch: str, net_kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=f"^net_kwargs: {re.escape(message)}"):
        resolve("freyfaces", "none", {"arch": arch, "net_kwargs": net_kwargs})


def test_the_papers_frey_faces_head_and_bounds_are_still_taken() -> None:
    config = resolve("freyfaces", "none", {"net_kwargs": {"head_channels": 64,
                                                            "variance_bounds": [0.05, 5]}})
    assert config.net_kwargs == {"head_channels": 64, "variance_bounds": [0.05, 5]}


def test_eval_help_names_the_counts_that_a_smoke_run_is_evaluated_with() -> None:
    """``vaeflow eval`` of a run trained with --max-steps evaluates as that run did (500 test
    points, 10 samples on 50), not on all the test points as the help said."""
    import argparse

    from vaeflow.cli import build_parser
    from vaeflow.configs import TrainConfig
    from vaeflow.evaluate import smoke_eval_counts

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: " ".join(a.help.split()) for a in commands.choices["eval"]._actions}
    counts = smoke_eval_counts(TrainConfig(flow="none", max_steps=3))
    assert set(counts) == {"eval_points", "is_samples", "is_points"}
    for key, n in counts.items():
        assert f"{n} for a smoke run" in helps[key], (key, helps[key])


def test_load_model_reads_a_device_as_the_command_line_does(tmp_path: Path) -> None:
    """``cpu:0`` loads on the CPU, and a device this machine has not is named as such: both
    were "best.pt is damaged or not a vaeflow checkpoint" (torch.load refused every storage)."""
    import torch

    from vaeflow.evaluate import save_run
    from vaeflow.model import build_model
    from vaeflow.runs import load_model

    config = resolve("static_mnist", "none", {"arch": "mlp", "latent_dim": 2, "context_dim": 2,
                                              "net_kwargs": {"hidden_sizes": [4]}})
    save_run(tmp_path / "run", build_model(config), config, evaluate=False)
    model, _ = load_model(tmp_path / "run", device="cpu:0")
    assert next(model.parameters()).device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="^device 'cuda' asked for, but CUDA is not avail"):
            load_model(tmp_path / "run", device="cuda")
