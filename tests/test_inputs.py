"""Input handling of the ``vaeflow`` command found by a user walkthrough: each bad input is one
clear line, and what a user may write (``cpu:0``, ``none``) means what it says."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pytest
import torch
from test_cli import tiny_args

from vaeflow.checks import InputError, check_annotated, resolve_device
from vaeflow.cli import main
from vaeflow.configs import resolve
from vaeflow.runs import load_checkpoint

QUICK = ["train", "--dataset", "caltech", "--preset", "quick", "--print-config"]


def printed(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """The config that ``vaeflow train ... --print-config`` prints."""
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a refused command (status 2, no traceback)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeflow: error: ") and err.count("\n") == 1, err
    return err


# ---- 1. a CPU device with an index


def test_a_cpu_device_with_an_index_is_plain_cpu(tmp_path: Path) -> None:
    device = resolve_device("cpu:0")
    assert device == torch.device("cpu") and device.index is None
    # What a run on "cpu:0" saves, it loads back on the same device (torch.load refuses a
    # map_location of torch.device("cpu:0") for every storage).
    torch.save({"w": torch.ones(2, device=device)}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt", device)["w"], torch.ones(2))


def test_a_run_on_cpu_0_trains_and_evaluates(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "planar", "--device", "cpu:0"]
    assert main([*args, "--max-steps", "2", "--batch-size", "50", "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 0, capsys.readouterr().err


# ---- 2. none means None where an option may be None


def test_none_drops_the_quick_presets_budget_and_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert printed([*QUICK, "--flow", "planar"], capsys)["max_minutes"] == 4.3
    words = ["--set", "max_minutes=none", "--set", "max_steps=None", "--set", "is_points=null",
             "--set", "max_grad_norm=None", "--set", "split_sizes=NONE"]
    config = printed([*QUICK, "--flow", "planar", "--max-steps", "3", *words], capsys)
    assert config["max_minutes"] is None and config["max_steps"] is None
    assert config["is_points"] is None and config["max_grad_norm"] is None
    assert config["split_sizes"] is None


def test_none_in_flow_options_and_solver_settings(capsys: pytest.CaptureFixture[str]) -> None:
    opts = ["--flow-opt", "fused=None", "--flow-opt", "method=dopri5",
            "--flow-opt", "solver_options=none", "--set", "test_solver=none"]
    config = printed([*QUICK, "--flow", "ffjord", *opts], capsys)
    assert config["flow_kwargs"]["fused"] is None
    assert config["flow_kwargs"]["solver_options"] is None
    assert config["test_solver"] is None
    solver = ["--set", 'test_solver={method="dopri5", solver_options="none"}']
    assert printed([*QUICK, "--flow", "ffjord", *solver], capsys)["test_solver"] == {
        "method": "dopri5", "solver_options": None}


def test_none_in_a_config_file(tmp_path: Path) -> None:
    """TOML has no null: a file writes the string "none"."""
    path = tmp_path / "c.toml"
    path.write_text('[train]\nmax_minutes = "none"\n[flows.ffjord]\nfused = "null"\n')
    config = resolve("caltech", "ffjord", preset="quick", config_file=path)
    assert config.max_minutes is None and config.flow_kwargs["fused"] is None


def test_none_is_kept_where_a_string_is_meant_or_none_is_not_allowed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the flow named none, and a string option, keep the word
    config = printed([*QUICK, "--flow", "none", "--set", "data_dir=none"], capsys)
    assert config["flow"] == "none" and config["data_dir"] == "none"
    assert "lr must be a float, got 'none'" in error([*QUICK, "--flow", "none",
                                                      "--set", "lr=none"], capsys)
    assert "masks" in error([*QUICK, "--flow", "iaf", "--flow-opt", "masks=none"], capsys)


def test_check_annotated_reads_real_types_too() -> None:
    """A flow of one's own may annotate without ``from __future__ import annotations``."""
    assert check_annotated("x", "none", bool | None) is None
    assert check_annotated("x", "None", Optional[int]) is None  # noqa: UP045 (the old spelling)
    assert check_annotated("x", "None", "Optional[dict[str, int | None]]") is None
    assert check_annotated("x", "none", str | None) == "none"
    assert check_annotated("x", "none", "bool | str") == "none"
    assert check_annotated("x", "none", float) == "none"  # left to the option's own check
    with pytest.raises(InputError, match="x must be a list of integers or None, not the string"):
        check_annotated("x", "big", list[int] | None)


# ---- 3. net_kwargs


def test_net_kwargs_are_refused_cleanly_by_print_config(capsys: pytest.CaptureFixture) -> None:
    err = error([*QUICK, "--flow", "planar", "--set", "net_kwargs={foo=1}"], capsys)
    assert "net_kwargs: make_networks('mlp') got unexpected keyword(s) ['foo']" in err
    err = error([*QUICK, "--flow", "planar", "--set", 'net_kwargs={hidden_sizes="big"}'], capsys)
    assert "net_kwargs: hidden_sizes must be a list of integers, not the string 'big'" in err
    # and where None turns a paper default off, the word does
    config = printed([*QUICK, "--flow", "planar", "--set", "net_kwargs={variance_bounds='none'}"],
                     capsys)
    assert config["net_kwargs"] == {"variance_bounds": None}


# ---- 4. --config files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[flows.plnar]\nnum_steps = 2\n",
         r"\[flows.plnar\]: unknown flow 'plnar'; valid flows are none, planar"),
        ("[flows.planar]\nnmu_steps = 2\n",
         r"\[flows.planar\]: unknown hyperparameter\(s\) 'nmu_steps'.*valid ones are num_steps"),
        ("[train]\nnope = 1\n", r"\[train\]: unknown config key\(s\) 'nope'; valid keys are"),
        ("lr = 1\n", r"key\(s\) 'lr' outside any table: config keys go in a \[train\] table"),
        ("[train]\nflow = 'ffjord'\n", r"\[train\]: flow cannot be set in a file"),
        ("[model]\nx = 1\n", r"unknown table\(s\) \['model'\]; valid tables are \[train\], "
         r"\[flows.<flow>\], \[datasets.<dataset>\]"),
        ("[datasets.mnsit.train]\nlr = 1\n", r"unknown data set 'mnsit'; valid data sets are"),
        ("[datasets.caltech.train]\nnope = 1\n",
         r"\[datasets.caltech\]: \[train\]: unknown config key\(s\) 'nope'"),
        ("[datasets.caltech.model]\nx = 1\n",
         r"\[datasets.caltech\]: unknown table\(s\) \['model'\]; valid tables are \[train\], "
         r"\[flows.<flow>\]$"),
        # bad values, checked only once every layer is laid, still name the file
        ("[train]\nlr = 'fast'\n", r"lr must be a float, got 'fast'$"),
        ("[flows.planar]\nnum_steps = 0\n", r"num_steps"),
        ("[datasets.caltech.train]\nbatch_size = -1\n", r"batch_size must be"),
    ],
)
def test_a_config_file_hides_nothing_and_is_named(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    err = error([*QUICK, "--flow", "planar", "--config", str(path)], capsys)
    assert err.startswith(f"vaeflow: error: {path}: ") and re.search(message, err), err


def test_a_config_file_s_data_set_section_applies_to_that_data_set_only(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 0.002\n[flows.planar]\nnum_steps = 3\n"
                    "[datasets.caltech.train]\nlr = 0.0005\n"
                    "[datasets.caltech.flows.planar]\nnum_steps = 6\n")
    caltech = resolve("caltech", "planar", config_file=path)
    mnist = resolve("static_mnist", "planar", config_file=path)
    assert (caltech.lr, caltech.flow_kwargs["num_steps"]) == (0.0005, 6)
    assert (mnist.lr, mnist.flow_kwargs["num_steps"]) == (0.002, 3)
    # the command line still comes last
    assert resolve("caltech", "planar", {"lr": 0.1}, config_file=path).lr == 0.1


def test_a_bad_value_is_blamed_on_the_config_file_only_when_it_is_the_file_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 'fast'\n")
    # the command line's value overrides the file's bad one: nothing to refuse
    args = [*QUICK, "--flow", "planar", "--config", str(path), "--set", "lr=0.001"]
    assert printed(args, capsys)["lr"] == 0.001
    path.write_text("[train]\nlr = 0.001\n")
    # a bad value of the command line's own is not the file's
    with pytest.raises(InputError, match=r"^max_epochs must be") as caught:
        resolve("caltech", "planar", {"max_epochs": 0}, preset="quick", config_file=path)
    assert str(path) not in str(caught.value)
    # the file's value and the command line's are each fine, together not: both are named,
    # the file as the settings the command line's clash with, not as the bad value's home
    path.write_text("[train]\narch = 'mlp'\n")
    with pytest.raises(InputError) as caught:
        resolve("static_mnist", "planar", {"net_kwargs": {"head_channels": 8}}, config_file=path)
    assert str(caught.value).startswith("net_kwargs: ") and str(caught.value).endswith(
        f"(with the settings of {path})"), caught.value
    # both hold a bad value: the one reported is named by where it comes from (before, the
    # file's bad lr was reported bare because the command line's max_epochs was bad too)
    path.write_text("[train]\nlr = 'fast'\n")
    with pytest.raises(InputError) as caught:
        resolve("caltech", "planar", {"max_epochs": 0}, preset="quick", config_file=path)
    assert str(caught.value) == f"{path}: lr must be a float, got 'fast'", caught.value
    # both set the same key badly: the command line's value is the one used, not the file's
    with pytest.raises(InputError) as caught:
        resolve("caltech", "planar", {"lr": "slow"}, preset="quick", config_file=path)
    assert str(caught.value) == "lr must be a float, got 'slow'", caught.value


def test_the_quick_preset_keeps_frey_faces_small() -> None:
    from vaeflow.model import count_parameters

    frey = resolve("freyfaces", "ffjord", preset="quick")
    assert frey.net_kwargs == {"hidden_sizes": [64, 256]}
    assert count_parameters(frey) < 10_000_000  # 74 M with the binary data sets' decoder
    assert resolve("static_mnist", "ffjord", preset="quick").net_kwargs == {
        "hidden_sizes": [512, 256]}


def test_a_set_flow_that_is_not_the_runs_flow_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = error([*QUICK, "--flow", "planar", "--set", "flow=ffjord"], capsys)
    assert "flow 'ffjord' set as a config key, but this run's flow is 'planar'" in err


# ---- 5, 6. messages that name what the user has and types


def test_resume_of_a_missing_directory(tmp_path: Path, capsys) -> None:
    err = error(["train", "--resume", str(tmp_path / "nope")], capsys)
    assert f"run directory {tmp_path / 'nope'} does not exist" in err
    err = error(["train", "--resume", str(tmp_path)], capsys)  # exists, holds no run
    assert "is not a vaeflow run directory: no config.json in it" in err


def test_a_fixed_step_solver_without_a_step_names_solver_options(capsys) -> None:
    args = ["train", "--dataset", "caltech", "--flow", "ffjord", "--print-config"]
    err = error([*args, "--flow-opt", "method=rk4"], capsys)
    assert "fixed-step solver 'rk4' needs a step size: solver_options={step_size=H}" in err
    assert "options={'step_size'" not in err


# ---- 7. a training stop says so once


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("training stopped at step ~20 (epoch 1): the loss became nan.",
         "vaeflow: training stopped at step ~20 (epoch 1): the loss became nan.\n"),
        ("the final evaluation gave non-finite figures (test_nelbo: nan).",
         "vaeflow: training stopped: the final evaluation gave non-finite figures"),
    ],
)
def test_a_training_stop_is_said_once(
    tmp_path: Path, message: str, shown: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaeflow.train

    def stops(*args: object, **kwargs: object) -> None:
        raise vaeflow.train.TrainingError(message)

    monkeypatch.setattr(vaeflow.train, "train", stops)
    args = ["train", "--dataset", "caltech", "--flow", "planar", "--out", str(tmp_path / "r")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert shown in err and err.count("training stopped") == 1, err


# ---- 8. the help


def test_train_help_is_plain_text_with_a_cpu_sized_smoke_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and not re.search(r":[a-z]+:`", out), out
    smoke = [line for line in out.splitlines() if "--max-steps 50" in line]
    assert smoke and all("--preset quick" in line for line in smoke)
    assert "--set max_minutes=none" in out and "--flow none" in out
