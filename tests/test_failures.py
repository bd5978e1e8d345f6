"""Bad input and faults, as a new user meets them: each probe checks the exit status, that no
traceback is printed, the message's key words, and that the files that must survive do.

Groups: run directory, resume, signals, values, files, API."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from conftest import TINY_SPLITS

import vaeflow.train as train_mod
from vaeflow.claim import RunLock
from vaeflow.cli import main
from vaeflow.flows import FFJORD, FLOWS
from vaeflow.runs import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny(data_dir: Path, out: Path, flow: str = "planar", *extra: str) -> list[str]:
    """`vaeflow train` arguments of a seconds-long run on the tiny structured MNIST."""
    small = {"planar": ["--flow-opt", "num_steps=2"],
             "ffjord": ["--flow-opt", "hidden_dims=[8]", "--flow-opt", "rank=1",
                        "--flow-opt", "num_blocks=1", "--flow-opt", "atol=1e-3",
                        "--flow-opt", "rtol=1e-3"]}[flow]
    return [
        "train", "--dataset", "static_mnist", "--flow", flow, *small,
        "--data-dir", str(data_dir), "--set", f"split_sizes={list(TINY_SPLITS)}",
        "--arch", "mlp", "--set", "net_kwargs={hidden_sizes=[16]}",
        "--set", "latent_dim=4", "--set", "context_dim=8", "--set", "is_samples=2",
        "--set", "is_points=4", "--set", "eval_points=20", "--set", "pictures=false",
        "--batch-size", "50",
        "--max-epochs", "2", "--device", "cpu", "--quiet", "--out", str(out), *extra,
    ]


def fails(capsys: pytest.CaptureFixture[str], args: list[str], code: int, *words: str) -> str:
    """Run ``vaeflow ARGS``; check the exit status, one-line error, no traceback, key words."""
    assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def finished(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    run = tmp_path / "done"
    assert main(tiny(tiny_data_dir, run)) == 0
    capsys.readouterr()
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


# ---- run directory ----------------------------------------------------------------------


def test_a_second_process_on_the_same_run_is_refused(tiny_data_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):  # another live process owns it
        fails(capsys, tiny(tiny_data_dir, run), 2, "in use by another vaeflow process",
              f"pid {os.getpid()}")
    assert [p.name for p in run.iterdir()] == [".lock"]
    assert main(tiny(tiny_data_dir, run)) == 0  # the lock went with its owner
    with RunLock(run):  # a run training now is named as in use, not as a run to resume
        err = fails(capsys, tiny(tiny_data_dir, run), 2, "in use by another vaeflow process")
        assert "--resume" not in err
    fails(capsys, tiny(tiny_data_dir, run), 2, "already holds files", "--resume")  # once free


def test_the_lock_dies_with_a_killed_process(tiny_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    code = (f"import os, time; from vaeflow.claim import RunLock\n"
            f"with RunLock({str(run)!r}): print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    with RunLock(run):  # free again: a killed run can be resumed
        pass


@pytest.mark.parametrize("removed", ["checkpoint.pt", None])
def test_a_folder_that_holds_a_run_needs_resume_or_overwrite(
    finished: Path, tiny_data_dir: Path, capsys, removed: str | None
) -> None:
    if removed:
        (finished / removed).unlink()
    before = snapshot(finished)
    words = ["already holds files", "--overwrite"]
    words += [] if removed else ["--resume"]
    fails(capsys, tiny(tiny_data_dir, finished), 2, *words)
    assert snapshot(finished) == before


def test_overwrite_checks_everything_before_deleting(finished: Path, tiny_data_dir: Path,
                                                     capsys) -> None:
    before = snapshot(finished)
    bad = [a if a != "cpu" else "cuda:7" for a in tiny(tiny_data_dir, finished)]
    fails(capsys, [*bad, "--overwrite"], 2, "cuda:7")
    assert snapshot(finished) == before
    fails(capsys, [*tiny(tiny_data_dir / "nowhere", finished), "--overwrite"], 2,
          "binarized_mnist.npz")
    assert snapshot(finished) == before
    assert main([*tiny(tiny_data_dir, finished), "--overwrite", "--seed", "3"]) == 0
    assert json.loads((finished / "config.json").read_text())["seed"] == 3
    assert len(list(finished.glob("events.out.tfevents*"))) == 1  # the old events went


def test_a_start_that_fails_leaves_nothing(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "new"
    fails(capsys, tiny(tiny_data_dir / "nowhere", run), 2, "binarized_mnist.npz")
    assert not run.exists()


def test_run_files_are_readable_like_the_events(finished: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in finished.iterdir()
             if p.suffix in (".json", ".pt")}
    assert modes and all(m & 0o044 == 0o044 for m in modes.values()), modes


# ---- resume -----------------------------------------------------------------------------


def test_resume_takes_budget_device_and_data_dir(tiny_data_dir: Path, tmp_path: Path,
                                                 capsys) -> None:
    run = tmp_path / "run"
    assert main([*tiny(tiny_data_dir, run), "--max-steps", "3"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 3
    moved = tmp_path / "moved"
    os.symlink(tiny_data_dir, moved)  # the data moved (the session's fixture stays in place)
    args = ["train", "--resume", str(run), "--max-steps", "6", "--device", "cpu",
            "--data-dir", str(moved), "--quiet"]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["max_steps"] == 6 and config["data_dir"] == str(moved)
    # where each session trained stays on record, the latest at the top
    timing = json.loads((run / "timing.json").read_text())
    assert [s["resumed"] for s in timing["sessions"]] == [False, True]
    assert timing["train_seconds"] == timing["sessions"][-1]["train_seconds"]


@pytest.mark.parametrize("change", [["--lr", "1e9"], ["--set", "lr=0.1"], ["--seed", "4"],
                                    ["--batch-size", "7"], ["--set", "latent_dim=8"]])
def test_resume_refuses_what_would_change_the_run(finished: Path, capsys,
                                                  change: list[str]) -> None:
    before = snapshot(finished)
    fails(capsys, ["train", "--resume", str(finished), *change], 2, "cannot change",
          "when resuming", "--out")
    assert snapshot(finished) == before


@pytest.mark.parametrize("option", [["--no-dataset-config"], ["--flow-opt", "num_steps=3"],
                                    ["--preset", "quick"]])
def test_resume_refuses_what_picks_a_new_config(finished: Path, capsys,
                                                option: list[str]) -> None:
    before = snapshot(finished)
    fails(capsys, ["train", "--resume", str(finished), *option], 2, "saved config", option[0],
          "--out")
    assert snapshot(finished) == before


def test_resume_takes_the_run_s_own_values_named_again(finished: Path, capsys) -> None:
    config = json.loads((finished / "config.json").read_text())
    before = snapshot(finished)
    args = ["train", "--resume", str(finished), "--dataset", config["dataset"], "--flow",
            config["flow"], "--lr", str(config["lr"]), "--seed", str(config["seed"]),
            "--batch-size", str(config["batch_size"]), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((finished / "config.json").read_text()) == config
    assert json.loads((finished / "results.json").read_text()) == json.loads(before["results.json"])


def test_resume_refuses_a_config_that_is_not_the_checkpoint_s(finished: Path, capsys) -> None:
    config = json.loads((finished / "config.json").read_text())
    (finished / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    fails(capsys, ["train", "--resume", str(finished), "--quiet"], 2, "do not belong together",
          "lr")


# ---- signals ----------------------------------------------------------------------------

def _slowed(name: str, marker: str, seconds: float) -> str:
    """A ``python -c`` program that runs ``vaeflow`` with ``vaeflow.train.<name>`` printing
    ``marker`` and sleeping ``seconds`` before each call (so a test can signal it there)."""
    return (
        "import sys, time\n"
        "import vaeflow.train as t\n"
        f"real = t.{name}\n"
        "def slow(*a, **k):\n"
        f"    print({marker!r}, flush=True)\n"
        f"    time.sleep({seconds})\n"
        "    return real(*a, **k)\n"
        f"t.{name} = slow\n"
        "from vaeflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


def _start(args: list[str], code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_signal_in_the_final_evaluation_stops_at_once_and_keeps_the_run(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = _start(tiny(tiny_data_dir, run, "planar", "--max-steps", "2"),
                  _slowed("evaluate", "EVALUATING", 60))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "EVALUATING"
    tick = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - tick < 20  # not the 60 s the evaluation would take
    assert proc.returncode == 130 and "Traceback" not in err
    assert "final evaluation" in err and f"vaeflow eval {run}" in err
    assert (run / "checkpoint.pt").is_file() and (run / "best.pt").is_file()
    assert not (run / "results.json").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # only evaluates
    assert json.loads((run / "results.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tiny_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(tiny(tiny_data_dir, run, "planar", "--max-epochs", "50"),
                  _slowed("train_step", "STEP", 0.5))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "STEP"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "second signal" in err or "checkpoint written" in err
    assert (run / "checkpoint.pt").is_file()


# ---- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["False", "false"])
def test_python_booleans_on_the_command_line(spelling: str, capsys) -> None:
    args = ["train", "--dataset", "static_mnist", "--flow", "ffjord", "--print-config",
            "--flow-opt", f"adjoint={spelling}", "--flow-opt", "exact_in_eval=True"]
    assert main(args) == 0
    flow_kwargs = json.loads(capsys.readouterr().out)["flow_kwargs"]
    assert flow_kwargs["adjoint"] is False and flow_kwargs["exact_in_eval"] is True


def test_flows_read_string_booleans_and_refuse_others() -> None:
    assert FFJORD(3, 2, hidden_dims=(4,), rank=1, adjoint="False").solver.adjoint is False
    assert FFJORD(3, 2, hidden_dims=(4,), rank=1, adjoint="true").solver.adjoint is True
    with pytest.raises(ValueError, match="adjoint must be true or false"):
        FFJORD(3, 2, hidden_dims=(4,), rank=1, adjoint="no")


@pytest.mark.parametrize(("option", "words"), [
    (["--flow-opt", "hidden_dims=5"], ["hidden_dims", "list of positive integers"]),
    (["--flow-opt", "atol=abc"], ["atol", "positive"]),
    (["--flow-opt", "rtol=inf"], ["rtol", "finite"]),
    (["--flow-opt", "end_time=inf"], ["end_time", "finite"]),
    (["--flow-opt", "solver_options=5"], ["solver_options", "table"]),
    (["--set", "max_minutes=abc"], ["max_minutes", "float"]),
    (["--set", "data_dir=5"], ["data_dir", "str"]),
    (["--set", "seed=abc"], ["seed", "int"]),
    (["--seed", "-1"], ["seed", "0 <= n <= "]),
    (["--seed", str(2**64)], ["seed", "0 <= n <= "]),  # torch would refuse it mid-run
    (["--set", "valid_exact_trace=maybe"], ["valid_exact_trace", "true or false"]),
])
def test_wrongly_typed_values_name_the_key(option: list[str], words: list[str], capsys) -> None:
    args = ["train", "--dataset", "static_mnist", "--flow", "ffjord", "--print-config", *option]
    fails(capsys, args, 2, *words)


@pytest.mark.parametrize(("option", "words"), [
    (["--eval-points", "0"], ["eval_points", "positive"]),
    (["--eval-points", "-5"], ["eval_points", "positive"]),
    (["--is-samples", "-3"], ["is_samples", ">= 0"]),
    (["--is-points", "0"], ["is_points", "positive"]),
])
def test_eval_checks_every_count(finished: Path, capsys, option: list[str],
                                 words: list[str]) -> None:
    fails(capsys, ["eval", str(finished), *option], 2, *words)


def test_a_non_finite_final_figure_is_a_failure(tiny_data_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real = train_mod.evaluate

    def nan(*args: object, **kwargs: object) -> dict[str, object]:
        return {**real(*args, **kwargs), "test_nelbo": math.nan}

    monkeypatch.setattr(train_mod, "evaluate", nan)
    run = tmp_path / "run"
    fails(capsys, tiny(tiny_data_dir, run), 1, "non-finite", "test_nelbo", "best.pt")
    results = json.loads((run / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert results["status"] == "failed" and results["test_nelbo"] is None
    assert (run / "checkpoint.pt").is_file() and (run / "best.pt").is_file()
    assert main(["compare", str(run), "--plot", "none"]) == 0  # says so, with its validation
    assert "failed (valid " in capsys.readouterr().out
    monkeypatch.setattr(train_mod, "evaluate", real)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # evaluates again
    assert json.loads((run / "results.json").read_text())["status"] == "finished"


def test_a_failed_test_solve_is_the_evaluation_s_failure_not_the_training_s(
    tiny_data_dir: Path, tmp_path: Path, capsys
) -> None:
    """A test solve that underflows (atol=rtol=1e-300) after training: no retry of the
    training and no learning-rate advice; the run is kept, marked failed, and ``vaeflow eval``
    says the same in one line, then measures it with other solver settings."""
    run = tmp_path / "run"
    bad = 'test_solver={method="dopri5", atol=1e-300, rtol=1e-300}'
    # 3 steps: inside the first epoch, so no validation solve comes first (its failure is the
    # next test's)
    err = fails(capsys, tiny(tiny_data_dir, run, "ffjord", "--set", bad, "--set",
                             "nan_retries=1", "--max-steps", "3"), 1,
                "the final evaluation's ODE solve failed", "underflow", "Training is done",
                f"vaeflow eval {run}")
    assert "--lr" not in err and "tighter" not in err and ".." not in err
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and "ODE solve" in results["error"]
    # no retry spent: it tightens the flow's tolerances, and test_solver fixes its own
    assert torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["retries"] == 0
    solver = ["--solver", "atol=1e-300", "--solver", "rtol=1e-300"]
    fails(capsys, ["eval", str(run), *solver], 1, f"the evaluation of {run} failed",
          "underflow", "Try other solver settings")
    assert main(["eval", str(run), "--solver", "atol=1e-3", "--solver", "rtol=1e-3"]) == 0


def test_a_failed_validation_solve_names_test_solver(tiny_data_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    """The first validation solves with a test_solver that underflows: the message says it was
    the validation's solve and points at test_solver, and no retry retrains the epoch to the
    same failure (nan_retries tightens the flow's tolerances, not test_solver's)."""
    run = tmp_path / "run"
    bad = 'test_solver={method="dopri5", atol=1e-300, rtol=1e-300}'
    err = fails(capsys, tiny(tiny_data_dir, run, "ffjord", "--set", bad, "--set",
                             "nan_retries=1"), 1,
                "training stopped at step ~4 (epoch 1): the validation's ODE solve", "underflow",
                "other test_solver settings", "test_solver={} solves them as the training does")
    assert "tighten the solver tolerances" not in err and "used up" not in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["retries"] == 0
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and "the validation's ODE solve" in results["error"]


# ---- files ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "text"])
@pytest.mark.parametrize("how", ["resume", "eval-last"])
def test_a_damaged_checkpoint_is_named(finished: Path, capsys, damage: str, how: str) -> None:
    ckpt = finished / "checkpoint.pt"
    data = ckpt.read_bytes()
    args = (["train", "--resume", str(finished), "--quiet"] if how == "resume"
            else ["eval", str(finished), "--checkpoint", "last"])
    # random bytes make the unpickler fail in many ways: try several, fixed, draws
    # (cut below 64 KiB, torch's zip reader seeks before the start for the central directory:
    # an OSError EINVAL, which is the file's damage, not the file system's)
    assert len(data) > 20_000
    variants = {"truncate": [data[: len(data) // 2], data[:10_000]], "empty": [b""],
                "random": [random.Random(k).randbytes(4096) for k in range(8)],
                "text": [b"not a checkpoint\n" * 10]}[damage]
    for content in variants:
        ckpt.write_bytes(content)
        err = fails(capsys, args, 2, "checkpoint.pt", "damaged", "best.pt")
        assert "weights_only" not in err  # torch's advice to load it unsafely is not passed on
    assert main(["eval", str(finished)]) == 0  # best.pt still serves


@pytest.mark.parametrize("raised", [
    torch.OutOfMemoryError("CUDA out of memory"), MemoryError(),
    OSError(errno.EINVAL, "Invalid argument"), OSError(errno.EIO, "Input/output error"),
], ids=["cuda-oom", "memory", "einval", "eio"])
def test_a_whole_checkpoint_that_fails_to_load_shows_the_machines_failure(
    tmp_path: Path, monkeypatch, raised: Exception
) -> None:
    """Memory running out while a whole checkpoint loads, or the file system's error on it, is
    the machine's failure: its traceback, not "damaged" (which sends the user to another file).
    Before, every OSError EINVAL and every out-of-memory error read as a damaged file."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.ones(3)}, path)

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(type(raised)) as caught:
        load_checkpoint(path)
    assert caught.value is raised


def test_a_look_at_the_last_model_leaves_the_runs_pictures_alone(finished: Path) -> None:
    # the run's PNGs show its best model through its own solve, as results.json reports it
    assert main(["eval", str(finished), "--checkpoint", "last", "--json"]) == 0
    assert not list(finished.glob("*.png"))
    assert main(["eval", str(finished), "--json"]) == 0
    assert {p.name for p in finished.glob("*.png")} >= {"samples.png", "reconstructions.png"}


def test_a_broken_config_json_is_named(finished: Path, capsys) -> None:
    (finished / "config.json").write_text("{not json")
    fails(capsys, ["eval", str(finished)], 2, "config.json", "damaged")


@pytest.mark.parametrize(("name", "content"), [
    ("results.json", "[1, 2]"), ("timing.json", "3"), ("history.json", '{"epoch": 1}'),
])
def test_a_run_file_of_the_wrong_json_shape_is_named(finished: Path, capsys, name: str,
                                                     content: str) -> None:
    """Valid JSON of the wrong kind (a list for an object, an object for a list) is a damaged
    file, named, as invalid JSON is; it was an AttributeError deep in ``compare``."""
    (finished / name).write_text(content)
    fails(capsys, ["compare", str(finished), "--plot", "none"], 2, name, "damaged")


def test_an_old_run_s_damaged_checkpoint_is_named_by_compare(finished: Path, capsys) -> None:
    """A run of an older vaeflow keeps its history inside checkpoint.pt: when that file is
    damaged, or holds no history, compare names it instead of a traceback."""
    (finished / "history.json").unlink()
    ckpt = finished / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    # its history is read from the checkpoint
    assert main(["compare", str(finished), "--plot", "none"]) == 0
    capsys.readouterr()
    del state["progress"]
    torch.save(state, ckpt)
    fails(capsys, ["compare", str(finished), "--plot", "none"], 2, "checkpoint.pt", "damaged",
          "no training history")
    ckpt.write_bytes(b"not a checkpoint\n" * 10)
    fails(capsys, ["compare", str(finished), "--plot", "none"], 2, "checkpoint.pt", "damaged")


def test_out_below_a_regular_file(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(capsys, tiny(tiny_data_dir, blocker / "run"), 1, str(blocker))


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import vaeflow.atomic as atomic

    before = (finished / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(atomic.os, "fdopen", full_disk(after=256))
    fails(capsys, ["train", "--resume", str(finished), "--max-epochs", "3", "--quiet"], 1,
          "No space left on device", str(finished))
    assert (finished / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in finished.iterdir() if p.name.endswith(".tmp")] == []


def full_disk(after: int) -> Callable[..., IO[bytes]]:
    """An ``os.fdopen`` whose files take ``after`` bytes and then fail as a full disk does:
    OSError ENOSPC from ``write``, with no file name (the OS knows only the descriptor)."""
    import errno

    class Full(io.RawIOBase):
        def __init__(self, fd: int) -> None:
            self.fd, self.taken = fd, 0

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            self.taken += len(data)
            if self.taken > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def fileno(self) -> int:
            return self.fd

        def close(self) -> None:
            os.close(self.fd)
            super().close()

    return lambda fd, mode="wb": io.BufferedWriter(Full(fd), buffer_size=64)


@pytest.mark.parametrize("what", ["checkpoint", "json"])
def test_a_full_disk_names_the_file_whoever_wrote_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """``torch.save`` turns the write's OSError into ``RuntimeError: ... unexpected pos``, and a
    file object's OSError has no file name: either was a traceback, not one line naming it."""
    import vaeflow.atomic as atomic

    monkeypatch.setattr(atomic.os, "fdopen", full_disk(after=100))
    path = tmp_path / f"x.{what}"
    with pytest.raises(OSError, match="No space left on device") as err:
        if what == "checkpoint":
            atomic.atomic_save({"weights": torch.zeros(1000)}, path)
        else:
            atomic.atomic_write_json({"values": list(range(1000))}, path)
    assert err.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no half-written one


# ---- API --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FLOWS))
def test_every_flow_returns_empty_outputs_for_an_empty_batch(name: str) -> None:
    small = {"ffjord": dict(hidden_dims=(4,), rank=1)}.get(name, {})
    flow = FLOWS[name](3, 2, **small)
    zK, logdet = flow(torch.zeros(0, 3), torch.zeros(0, 2))
    assert zK.shape == (0, 3) and logdet.shape == (0,)


@pytest.mark.parametrize("name", [n for n in FLOWS if n != "none"])
def test_every_flow_refuses_a_dtype_mismatch(name: str) -> None:
    small = {"ffjord": dict(hidden_dims=(4,), rank=1)}.get(name, {})
    flow = FLOWS[name](3, 2, **small)
    with pytest.raises(ValueError, match="float32 parameters but got z of dtype torch.float64"):
        flow(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 2))


def test_the_nan_hint_knows_the_retries_are_used(tiny_data_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys) -> None:
    real = train_mod.train_step

    def nan_step(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        out = real(*args, **kwargs)
        out["loss"] = torch.tensor(math.nan)
        return out

    monkeypatch.setattr(train_mod, "train_step", nan_step)
    args = [*tiny(tiny_data_dir, tmp_path / "run", "ffjord"), "--set", "nan_retries=1"]
    err = fails(capsys, args, 1, "the automatic retry is used up", "Start a new run (--out)")
    assert "--set nan_retries=1" not in err


def test_a_checkpoint_of_an_older_vaeflow_is_refused_by_name(finished: Path, capsys) -> None:
    ckpt = finished / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["format"]  # what the previous main wrote
    torch.save(state, ckpt)
    fails(capsys, ["train", "--resume", str(finished), "--max-epochs", "3", "--quiet"], 2,
          "older vaeflow", "checkpoint format 1", "--overwrite")
