"""The ``vaeflow`` command end to end on tiny data sets (in-process, and one real SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPLITS
from test_data import SIZES, write_tiny

from vaeflow.cli import main, parse_value
from vaeflow.flows import FLOWS

SMALL = [
    "--set", "latent_dim=4",
    "--set", "context_dim=8",
    "--set", "is_samples=3",
    "--set", "is_points=4",
    "--set", "log_every=2",
    "--set", "pictures=false",
    "--quiet",
]
SMALL_FLOW = {
    "ffjord": ["--flow-opt", "hidden_dims=[8]", "--flow-opt", "rank=2", "--flow-opt",
               "num_blocks=1", "--flow-opt", "atol=1e-4", "--flow-opt", "rtol=1e-4"],
    "iaf": ["--flow-opt", "hidden_dim=16", "--flow-opt", "num_steps=2"],
    "orthogonal": ["--flow-opt", "num_steps=2", "--flow-opt", "num_ortho_vecs=3"],
}


def tiny_args(
    data_dir: Path, dataset: str = "static_mnist", sizes: tuple = TINY_SPLITS, arch: str = "mlp"
) -> list:
    nets = ["--set", "net_kwargs={hidden_sizes=[16]}"] if arch == "mlp" else []
    return [
        "--dataset", dataset,
        "--data-dir", str(data_dir),
        "--set", f"split_sizes={list(sizes)}",
        *SMALL,
        "--arch", arch,
        *nets,
    ]


@pytest.mark.parametrize("flow", list(FLOWS))
def test_train_and_eval_every_flow(
    tiny_data_dir: Path, tmp_path: Path, flow: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", *tiny_args(tiny_data_dir), "--flow", flow, *SMALL_FLOW.get(flow, [])]
    assert main([*args, "--max-steps", "4", "--batch-size", "20", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test NELBO:" in out and "importance sampling" in out
    results = json.loads((run / "results.json").read_text())
    assert results["flow"] == flow and results["steps"] == 4
    assert (run / "checkpoint.pt").is_file() and any(run.glob("events.out.tfevents*"))
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"static_mnist / {flow}" in out and f"{results['test_nelbo']:.2f} nats" in out
    # four steps validate no epoch: best.pt holds the last model, as train's summary said
    assert json.loads((run / "history.json").read_text()) == []
    assert "(the last model: no epoch was validated, so none was chosen; " in out
    assert "best model" not in out


def test_a_fixed_step_run_is_tested_with_dopri5_and_eval_can_change_the_solver(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    rk4 = ["--flow-opt", "method=rk4", "--flow-opt", "solver_options={step_size=0.5}"]
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "ffjord", *SMALL_FLOW["ffjord"], *rk4]
    assert main([*args, "--max-steps", "4", "--batch-size", "20", "--out", str(run)]) == 0
    # Trained with two rk4 steps, tested with dopri5 at the flow's tolerances (1e-4 here).
    assert "ODE solves: dopri5 (atol 0.0001, rtol 0.0001), exact trace" in capsys.readouterr().out
    trained = json.loads((run / "results.json").read_text())
    assert trained["solver"] == [{"method": "dopri5", "atol": 1e-4, "rtol": 1e-4, "options": {}}]
    assert json.loads((run / "config.json").read_text())["flow_kwargs"]["method"] == "rk4"

    as_trained = ["--solver", "method=rk4", "--solver", "solver_options={step_size=0.5}"]
    assert main(["eval", str(run), *as_trained]) == 0
    assert "ODE solves: rk4 (step_size 0.5), exact trace" in capsys.readouterr().out
    assert main(["eval", str(run), *as_trained, "--json"]) == 0
    coarse = json.loads(capsys.readouterr().out)
    # the tolerances that rk4 does not use are not recorded as if they shaped the figure
    assert coarse["solver"] == [{"method": "rk4", "options": {"step_size": 0.5}}]
    assert coarse["test_nfe_forward"] == 8 and trained["test_nfe_forward"] >= 8  # 2 rk4 steps
    assert coarse["test_nelbo"] != trained["test_nelbo"]
    assert abs(coarse["test_nelbo"] - trained["test_nelbo"]) < 1.0  # a small field, 4 steps
    # --solver changes the test solve further: dopri5 kept, tighter.
    assert main(["eval", str(run), "--solver", "atol=1e-6", "--json"]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert tight["solver"] == [{"method": "dopri5", "atol": 1e-6, "rtol": 1e-4, "options": {}}]
    # Nothing of the run changed: evaluated again as the run says, the same figure.
    assert main(["eval", str(run), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_nelbo"] == trained["test_nelbo"] and again["solver"] == trained["solver"]

    assert main(["eval", str(run), "--solver", "adjoint=true"]) == 2
    assert "unknown solver setting(s) 'adjoint'" in capsys.readouterr().err
    # Bad options are refused before the data is read: here there is none to read, and the
    # message is still the option's, not the missing data's.
    nowhere = ["--data-dir", str(tmp_path / "no-data")]
    for option, message in ((["--solver", "method=rk5"], "unknown ODE solver method 'rk5'"),
                            (["--is-samples", "-1"], "is_samples must be an integer >= 0"),
                            (["--eval-points", "0"], "eval_points must be a positive integer")):
        assert main(["eval", str(run), *nowhere, *option]) == 2
        assert message in capsys.readouterr().err, option
    planar = tmp_path / "planar"
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "planar", "--max-steps", "2"]
    assert main([*args, "--batch-size", "20", "--out", str(planar)]) == 0
    assert main(["eval", str(planar), "--solver", "method=dopri5"]) == 2
    assert "flow 'planar' solves no ODE" in capsys.readouterr().err


def test_test_solver_in_the_config(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rk4 = ["--flow-opt", "method=rk4", "--flow-opt", "solver_options={step_size=0.5}"]
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "ffjord", *SMALL_FLOW["ffjord"], *rk4]
    run = tmp_path / "run"
    same = [*args, "--set", "test_solver={}", "--max-steps", "2", "--batch-size", "20"]
    assert main([*same, "--out", str(run)]) == 0  # {}: exactly the training solve
    assert "ODE solves: rk4 (step_size 0.5)" in capsys.readouterr().out
    # A bad test solver is refused before any training.
    bad = [*args, "--set", "test_solver={method=\"dopri6\"}", "--out", str(tmp_path / "bad")]
    assert main(bad) == 2
    assert "test_solver: unknown ODE solver method 'dopri6'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("dataset", "arch"), [("mnist", "mlp"), ("freyfaces", "gatedconv"),
                                               ("caltech", "mlp")])
def test_other_data_sets(tmp_path: Path, dataset: str, arch: str) -> None:
    write_tiny(dataset, tmp_path)
    run = tmp_path / "run"
    args = ["train", *tiny_args(tmp_path, dataset, SIZES[dataset], arch)]
    args += ["--flow", "planar", "--batch-size", "3", "--max-epochs", "2", "--out", str(run)]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["unit"] == ("bits/dim" if dataset == "freyfaces" else "nats")
    assert results["epochs"] == 2


def test_dataset_config_and_overrides(tiny_data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--dataset", "static_mnist", "--flow", "ffjord", "--print-config"]
    assert main([*args, "--lr", "0.001", "--flow-opt", "adjoint=true"]) == 0
    config = json.loads(capsys.readouterr().out)
    # from experiments/configs/static_mnist.toml: the FFJORD paper's MNIST model
    assert config["flow_kwargs"]["hidden_dims"] == [1024, 1024]
    assert config["flow_kwargs"]["rank"] == 64 and config["flow_kwargs"]["num_blocks"] == 2
    assert config["flow_kwargs"]["adjoint"] is True
    assert config["lr"] == 0.001 and config["batch_size"] == 100
    assert config["warmup_epochs"] == 100 and config["early_stopping_epochs"] == 100
    assert main(["train", "--dataset", "caltech", "--flow", "ffjord", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["flow_kwargs"]["hidden_dims"] == [2048]
    assert config["flow_kwargs"]["nonlinearity"] == "tanh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--dataset", "static_mnist", "--flow", "ffjord", "--flow-opt", "width=3"],
         "unknown hyperparameter.*'width'.*valid ones are dynamics, hidden_dims"),
        (["train", "--dataset", "static_mnist", "--flow", "ffjord", "--set", "nope=1"],
         "unknown config key.*'nope'.*valid keys are"),
        (["train", "--dataset", "static_mnist", "--flow", "ffjord", "--flow-opt", "method=rk5"],
         "valid methods are"),
        (["train", "--dataset", "static_mnist", "--flow", "iaf", "--flow-opt", "num_steps=0"],
         "error: flow 'iaf': num_steps must be a positive integer, got 0"),
        (["train", "--flow", "ffjord"], "train needs --dataset"),
        (["train", "--dataset", "static_mnist", "--flow", "ffjord", "--set", "lr"],
         "--set takes KEY=VALUE"),
        (["eval", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
        (["train", "--dataset", "static_mnist", "--flow", "none", "--device", "tpu"],
         r"invalid device 'tpu' \(try 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--print-config"] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert "vaeflow: error:" in err
    import re

    assert re.search(message, err), err


def test_a_config_for_a_device_elsewhere_is_printed_here(capsys: pytest.CaptureFixture) -> None:
    """The device's spelling is checked with the config; whether it is here, at the start."""
    assert main(["train", "--dataset", "static_mnist", "--flow", "none", "--device", "cuda:3",
                 "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cuda:3"


def test_unknown_choice_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "static_mnist", "--flow", "realnvp"])
    assert exc.value.code == 2
    assert "choose from 'none', 'planar', 'iaf'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["train", "--dataset", "static_mnist", "--flow", "none", "--epochs", "3"],
         "--epochs: did you mean --max-epochs or --warmup-epochs?"),
        (["eval", "runs/x", "--points=3"], "--points: did you mean --is-points or --eval-points?"),
        (["compare", "runs/x", "--fast"], None),
        # a config key or a flow hyperparameter spelt as a named option
        (["train", "--dataset", "static_mnist", "--flow", "none", "--max-minutes", "0.5"],
         "--max-minutes: did you mean --set max_minutes=VALUE?"),
        (["train", "--dataset", "static_mnist", "--flow", "ffjord", "--rank=3"],
         "--rank: did you mean --flow-opt rank=VALUE?"),
    ],
)
def test_an_unknown_option_is_refused_by_its_command(
    args: list[str], hint: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An option the command does not know was refused by the top-level parser, whose usage
    (``vaeflow [-h] [--version] COMMAND ...``) names none of the command's options."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    command = args[0]
    assert f"usage: vaeflow {command} [-h]" in err, err  # the usage that names its options
    words = ("--epochs", "--points", "--fast", "--max-minutes", "--rank")
    unknown = next(word for word in args if word.startswith(words))
    assert f"vaeflow {command}: error: unrecognized arguments: {unknown}" in err, err
    assert f"`vaeflow {command} --help`" in err and "Traceback" not in err
    if hint is not None:
        assert hint in err, err


def test_an_unknown_option_before_the_command_is_the_top_level_s(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--fast", "flows"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vaeflow [-h] [--version] COMMAND" in err
    assert "vaeflow: error: unrecognized arguments: --fast" in err


def test_missing_data_offline_says_where(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "--dataset", "caltech", "--flow", "none", "--data-dir", str(tmp_path / "x")]
    from vaeflow.data import download

    def offline(url: str, dest: Path) -> None:
        raise OSError("network is unreachable (test)")

    mp = pytest.MonkeyPatch()
    mp.setattr(download, "_fetch", offline)
    try:
        assert main([*args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert "caltech101_silhouettes.npz" in err and str(tmp_path / "x") in err


def test_parse_value() -> None:
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4
    assert parse_value("true") is True and parse_value("[64, 64]") == [64, 64]
    assert parse_value("rk4") == "rk4" and parse_value('"x"') == "x"


@pytest.mark.parametrize("value", ["{method=rk4, atol=1e-3}", "[a, b]"])
def test_a_table_or_list_that_is_not_toml_says_strings_need_quotes(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unquoted strings made such a value a bare string, refused later as 'must be a table'
    with no word of why."""
    assert main(["train", "--dataset", "static_mnist", "--flow", "ffjord",
                 "--set", f"test_solver={value}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"--set test_solver={value} is not a TOML" in err and "strings need quotes" in err
    example = err.split("as in test_solver='")[1].split("'")[0]
    assert parse_value(example) != example  # the example given is TOML itself


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_results(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A real ``kill -9`` of ``vaeflow train`` while it is inside an epoch."""
    common = [*tiny_args(tiny_data_dir), "--flow", "planar", "--batch-size", "20",
              "--max-epochs", "4", "--set", "checkpoint_every=3", "--set", "image_every=0"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    reference = json.loads((tmp_path / "a" / "results.json").read_text())

    run = tmp_path / "b"
    # the child sleeps a little per step so that the kill lands mid-run
    code = (
        "import sys, time, vaeflow.train as t\n"
        "real = t.train_step\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.05)\n"
        "    return real(*a, **k)\n"
        "t.train_step = slow\n"
        "from vaeflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, "train", *common, "--out", str(run)], env=env
    )
    try:
        deadline = time.time() + 120
        step = 0
        while time.time() < deadline and child.poll() is None:
            time.sleep(0.05)
            try:
                ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
            except Exception:  # not written yet, or being replaced
                continue
            step = ckpt["progress"]["step"]
            if step >= 13:  # inside epoch 2
                break
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text()) == reference


def test_flows_lists_class_defaults_and_what_a_data_set_sets(capsys) -> None:
    assert main(["flows"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(FLOWS)
    assert "masks='cycled'" in lines[list(FLOWS).index("iaf")]

    assert main(["flows", "--dataset", "static_mnist"]) == 0
    out = capsys.readouterr().out
    # the paper's MNIST models: only what differs from the class defaults, and the sizes
    assert ("static_mnist (latent 64, context 256): lowrank_init='reference', "
            "hidden_dims=[1024, 1024], rank=64, num_blocks=2") in out  # fmt: skip
    assert "static_mnist (latent 64, context 256): masks='reference'" in out
    assert "static_mnist (latent 64, context 256): the class defaults" in out  # planar
    assert main(["flows", "--dataset", "static_mnist", "--preset", "quick"]) == 0
    assert "--preset quick (latent 32, context 64): method='rk4'" in capsys.readouterr().out

    assert main(["flows", "--preset", "quick"]) == 2
    assert "--preset needs --dataset" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_a_traceback() -> None:
    """``vaeflow flows | head -1``: the pipe closes before vaeflow writes; it exits quietly
    with the shell's status for SIGPIPE."""
    child = subprocess.Popen(
        [sys.executable, "-m", "vaeflow.cli", "flows", "--dataset", "static_mnist"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # before the child has printed anything: it imports torch first
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141, err
    assert err == ""


@pytest.mark.slow  # a child process: torch's import, a tiny run
def test_a_fatal_signal_in_the_console_script_shows_where_python_was(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A C++ abort (here ``os.abort()`` inside the training step, as a gloo thread's would be)
    prints the Python stack of every thread, not only the C++ runtime's one line."""
    code = (
        "import os, sys, vaeflow.train as t\n"
        "t.train_step = lambda *a, **k: os.abort()\n"
        "from vaeflow.cli import main\n"
        "sys.argv[0] = 'vaeflow'\n"
        "sys.exit(main())\n"  # no argv: the console script's path, which reads sys.argv
    )
    child = subprocess.run(
        [sys.executable, "-c", code, "train", *tiny_args(tiny_data_dir), "--flow", "none",
         "--max-steps", "2", "--out", str(tmp_path / "run")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": ""},
        capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -signal.SIGABRT, child.stderr[-2000:]
    assert "Fatal Python error: Aborted" in child.stderr, child.stderr[-2000:]
    assert "in run_epoch" in child.stderr and "vaeflow/train.py" in child.stderr


def test_version_names_the_code_for_a_bug_report(capsys: pytest.CaptureFixture[str]) -> None:
    import vaeflow
    from vaeflow.provenance import git_commit

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"vaeflow {vaeflow.__version__} (commit {git_commit()}), ")
    assert f"torch {torch.__version__}" in line and "Python 3." in line and "\n" not in line


def test_every_option_of_every_command_says_what_it_does() -> None:
    """``--help`` is the reference a user reads first: no option or argument without a text,
    and the training defaults it quotes are TrainConfig's own."""
    import argparse

    from vaeflow.cli import build_parser
    from vaeflow.configs import TrainConfig

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"train", "eval", "compare", "flows"}
    silent = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help
    ]
    assert not silent, f"options without a help text: {silent}"
    train_help = commands.choices["train"].format_help()
    assert "--set max_minutes=none" in train_help  # the module docstring's use...
    assert "lines because" not in train_help  # ...not its note to the code's readers
    for key in ("lr", "batch_size", "warmup_epochs", "max_epochs", "early_stopping_epochs"):
        assert f"(default {getattr(TrainConfig(), key)}, the papers'" in " ".join(
            train_help.split()
        ), key


def test_an_error_is_one_write_with_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torchrun the ranks print their errors to one stderr: print's two writes (the
    # message, then its newline) let another rank's message start on the same line.
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["eval", "/nonexistent/run"]) == 2
    (message,) = [w for w in writes if "vaeflow: error:" in w]
    assert message.startswith("vaeflow: error: ") and message.endswith("\n")
    assert "run directory /nonexistent/run does not exist" in message
