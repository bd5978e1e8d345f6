"""experiments/table.py: the resumable grid of flows x data sets x seeds, and its report.

One grid runs once for the module (2 flows x 1 data set x 2 seeds, 2 cells at once, as real
``vaeflow train`` subprocesses on the tiny structured MNIST), with one cell left half-trained
beforehand and a second data set whose file is missing; the tests then read what it left. The
placement of cells on devices is tested with stand-in subprocesses and a made-up number of
visible GPUs, so that no GPU is needed. The command that a report prints (to run a missing data
set or resume unfinished cells) is read back by the table's own parser.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import table
import table_grid
import table_options
import table_pool
import table_records
import table_report
from conftest import TINY_SPLITS
from table_grid import Cell
from table_pool import Job, Placement

import vaeflow.train as train_mod
from vaeflow import cli

TINY = [
    "--device", "cpu",
    "--set", f"split_sizes={list(TINY_SPLITS)}",
    "--set", "arch=mlp",
    "--set", "latent_dim=4",
    "--set", "context_dim=8",
    "--set", "net_kwargs={hidden_sizes=[16]}",
    "--set", "batch_size=50",
    "--set", "is_samples=3",
    "--set", "is_points=4",
    "--set", "log_every=2",
    "--set", "pictures=false",
    "--flow-opt", "ffjord:hidden_dims=[8]",
    "--flow-opt", "ffjord:rank=2",
    "--flow-opt", "ffjord:num_blocks=1",
    "--flow-opt", "ffjord:atol=1e-4",
    "--flow-opt", "ffjord:rtol=1e-4",
]  # fmt: skip
GRID_CELLS = [Cell("static_mnist", f, s) for f in ("none", "ffjord") for s in (0, 1)]
PARTIAL = Cell("static_mnist", "none", 1)


def grid_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--datasets", "static_mnist", "omniglot",
        "--flows", "none", "ffjord",
        "--seeds", "2",
        "--max-epochs", "2",
        "--parallel", "2",
        "--data-dir", str(data_dir),
        "--runs-dir", str(root / "runs"),
        "--out", str(root / "out"),
        *TINY,
        *extra,
    ]  # fmt: skip


def run(argv: list[str]) -> tuple[int, str]:
    """``experiments/table.py ARGV`` in this process: (exit status, what it reported)."""
    echo = io.StringIO()
    try:
        code = table.run_table(table.options_from_args(argv), echo=echo)
    except table_options.TableError as err:
        return 2, str(err)
    return code, echo.getvalue()


def leave_half_trained(argv: list[str], cell: Cell) -> Path:
    """Train ``cell`` exactly as the grid would start it, and SIGTERM it after 3 steps: the run
    directory then holds a checkpoint and no results."""
    options = table.options_from_args(argv)
    args = table_grid.cell_train_args(cell, options)
    real = train_mod.train_step
    steps = {"n": 0}

    def step_then_stop(*a: object, **k: object) -> object:
        out = real(*a, **k)
        steps["n"] += 1
        if steps["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer checkpoints and stops
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "train_step", step_then_stop)
        assert cli.main(["train", *args]) == 130
    run_dir = cell.run_dir(options.runs_dir)
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "results.json").exists()
    return run_dir


@pytest.fixture(scope="module")
def grid(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("table")
    argv = grid_args(tiny_data_dir, root)
    leave_half_trained(argv, PARTIAL)
    code, log = run(argv)
    runs = root / "runs"
    return SimpleNamespace(
        argv=argv,
        root=root,
        runs=runs,
        out=root / "out",
        code=code,
        log=log,
        data_dir=tiny_data_dir,
    )


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(row["dataset"], row["flow"]): row for row in csv.DictReader(f)}


def results(runs: Path, cell: Cell) -> dict:
    return json.loads((cell.run_dir(runs) / "results.json").read_text())


def attempts(runs: Path, cell: Cell) -> list[dict]:
    path = table_grid.cell_file(cell.run_dir(runs), table_grid.ATTEMPTS_FILE)
    return json.loads(path.read_text()) if path.is_file() else []


def test_grid_runs_every_cell_and_writes_the_table(grid: SimpleNamespace) -> None:
    assert grid.code == 0, grid.log
    assert "4 cell(s) to run (1 resumed), 0 done, 2 at once" in grid.log
    for cell in GRID_CELLS:
        assert results(grid.runs, cell)["epochs"] == 2, cell
    md = (grid.out / "table.md").read_text()
    assert "| flow | MNIST (static) | Omniglot |" in md
    assert "Machine: cpu" in md and "≤2 epochs" in md
    rows = read_csv(grid.out / "table.csv")
    for flow, paper in (("none", "86.55"), ("ffjord", "82.82")):
        values = [results(grid.runs, Cell("static_mnist", flow, s))["test_nelbo"] for s in (0, 1)]
        row = rows[("static_mnist", flow)]
        assert row["n"] == "2" and row["seeds"] == "0 1" and row["unit"] == "nats"
        assert row["paper"] == paper and row["budget"] == "≤2 epochs"
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        text = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (2) / {paper}"
        assert text in md
        assert row["commit"] and row["device"] == "cpu"
    assert float(rows[("static_mnist", "ffjord")]["nfe_forward_mean"]) > 0
    assert rows[("static_mnist", "none")]["nfe_forward_mean"] == ""
    # a budget this small is flagged, and so are the settings that differ from the papers'
    assert "The budget is below the papers' protocol" in md
    assert '`arch="mlp"`' in md and "`ffjord rank=2`" in md
    assert (grid.out / "samples_static_mnist_ffjord.png").is_file()


def test_cells_ran_two_at_once(grid: SimpleNamespace) -> None:
    first_done = grid.log.index("done in")
    assert grid.log.index("[1/4]") < grid.log.index("[2/4]") < first_done
    assert grid.log.index("[3/4]") > first_done


def test_a_half_trained_cell_is_resumed(grid: SimpleNamespace) -> None:
    tries = attempts(grid.runs, PARTIAL)
    assert [a["mode"] for a in tries] == ["resume"] and tries[0]["returncode"] == 0
    assert "--resume" in tries[0]["command"] and tries[0]["device"] == "cpu"
    done = results(grid.runs, PARTIAL)
    assert done["steps"] == 8 and done["epochs"] == 2  # 200 points, batch 50, 2 epochs
    fresh = attempts(grid.runs, Cell("static_mnist", "none", 0))
    assert [a["mode"] for a in fresh] == ["start"]


def test_missing_data_set_is_shown_as_not_run_with_its_command(grid: SimpleNamespace) -> None:
    assert "omniglot not run: omniglot.npz is not in" in grid.log
    assert not (grid.runs / "omniglot").exists()
    md = (grid.out / "table.md").read_text()
    assert "not run (no data) / 104.28" in md and "not run (no data) / 98.33" in md
    section = md.split("## Not run", 1)[1]
    assert "omniglot.npz" in section and "chardata.mat" in section
    command = next(line for line in section.splitlines() if "experiments/table.py" in line)
    assert "--datasets omniglot --flows none ffjord --seeds 2 --max-epochs 2" in command
    assert command.rstrip().endswith("--download")
    rows = read_csv(grid.out / "table.csv")
    assert rows[("omniglot", "ffjord")]["status"] == "not run (no data)"
    assert rows[("omniglot", "ffjord")]["paper"] == "98.33"


def test_a_second_call_skips_the_done_cells(grid: SimpleNamespace, tmp_path: Path) -> None:
    before = {c: (c.run_dir(grid.runs) / "results.json").stat().st_mtime_ns for c in GRID_CELLS}
    code, log = run([*grid.argv, "--out", str(tmp_path / "again")])
    assert code == 0, log
    assert "0 cell(s) to run (0 resumed), 4 done" in log
    after = {c: (c.run_dir(grid.runs) / "results.json").stat().st_mtime_ns for c in GRID_CELLS}
    assert after == before
    assert all(len(attempts(grid.runs, c)) == 1 for c in GRID_CELLS)
    assert (tmp_path / "again" / "table.md").is_file()


def test_other_settings_for_done_cells_stop_before_anything_runs(grid: SimpleNamespace) -> None:
    code, message = run([*grid.argv, "--set", "lr=0.0123", "--out", str(grid.root / "x")])
    assert code == 2
    assert "lr: 0.0005 -> 0.0123" in message and "--on-mismatch keep" in message
    assert "smaller budget" not in message
    assert all(len(attempts(grid.runs, c)) == 1 for c in GRID_CELLS)
    assert not (grid.root / "x").exists()
    # a larger budget does not make other settings a resume: the cells stay mismatched
    code, message = run([*grid.argv, "--set", "lr=0.0123", "--max-epochs", "3"])
    assert code == 2 and "lr: 0.0005 -> 0.0123; max_epochs: 2 -> 3" in message
    code, log = run([*grid.argv, "--set", "lr=0.0123", "--on-mismatch", "keep", "--out",
                     str(grid.root / "kept")])
    assert code == 0 and "kept with its own settings" in log
    assert "0 cell(s) to run (0 resumed), 4 done" in log
    assert all(len(attempts(grid.runs, c)) == 1 for c in GRID_CELLS)


def fake_cell(runs: Path, cell: Cell, argv: list[str], done: bool) -> Path:
    """A run directory of ``cell`` as the grid ``argv`` would have left it (its config, a
    checkpoint, and the figures when ``done``), without training it."""
    run_dir = cell.run_dir(runs)
    run_dir.mkdir(parents=True)
    config = table_grid.cell_config(cell, table.options_from_args(argv)).to_dict()
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "checkpoint.pt").write_bytes(b"")
    if done:
        (run_dir / "results.json").write_text(json.dumps({"status": "finished",
                                                          "test_nelbo": 90.0}))
    return run_dir


@pytest.mark.parametrize(
    ("before", "after", "options"),
    [
        (["--max-epochs", "2"], ["--max-epochs", "5"], ["--max-epochs", "5"]),
        (["--budget-minutes", "20"], ["--budget-minutes", "60"], ["--set", "max_minutes=60"]),
        # --max-epochs 2000 has no time limit: None, the largest budget
        (["--budget-minutes", "20"], ["--max-epochs", "2000"], ["--set", "max_minutes=none"]),
        (["--budget-minutes", "20"], ["--max-epochs", "2000", "--set", "max_minutes=20.123456789"],
         ["--set", "max_minutes=20.123456789"]),  # exact: the saved config must match it
        (["--smoke"], ["--smoke", "--set", "max_steps=7"], ["--max-steps", "7"]),
        (["--smoke"], ["--smoke", "--set", "max_steps=none"], ["--set", "max_steps=none"]),
        (["--smoke", "--max-epochs", "2"], ["--smoke", "--max-epochs", "4", "--set", "max_steps=6"],
         ["--max-epochs", "4", "--max-steps", "6"]),
    ],
)
def test_a_larger_budget_resumes_done_and_partial_cells_with_it(
    tiny_data_dir: Path, tmp_path: Path, before: list[str], after: list[str], options: list[str]
) -> None:
    base = ["--datasets", "static_mnist", "--flows", "none", "--seeds", "2", "--data-dir",
            str(tiny_data_dir), "--runs-dir", str(tmp_path / "runs")]
    done, partial = Cell("static_mnist", "none", 0), Cell("static_mnist", "none", 1)
    for cell in (done, partial):
        fake_cell(tmp_path / "runs", cell, [*base, *before], done=cell is done)
    wanted = table.options_from_args([*base, *after])
    plan = table_grid.plan_grid(wanted, {}, table_grid.check_cells(wanted))
    assert [(job.name, job.mode) for job in plan.jobs] == [(c.name, "extend") for c in (done,
                                                                                        partial)]
    for job, cell in zip(plan.jobs, (done, partial), strict=True):
        run_dir = str(cell.run_dir(tmp_path / "runs"))
        assert job.command[3:] == ["train", "--resume", run_dir, *options, "--quiet"]
    assert plan.warnings == [] and plan.skipped == []
    # what the resume will write is what the grid asks: a third call finds the cells done
    for cell in (done, partial):
        saved = json.loads((cell.run_dir(tmp_path / "runs") / "config.json").read_text())
        resumed = vaeflow_config({**saved, **cli.parse_pairs(_as_sets(options), "--set")})
        assert table_grid.config_diff(resumed, table_grid.check_cells(wanted)[cell]) == []


def _as_sets(options: list[str]) -> list[str]:
    """``["--max-epochs", "5", "--set", "a=1"]`` -> ``["max_epochs=5", "a=1"]``."""
    pairs = list(zip(options[::2], options[1::2], strict=True))
    return [value if option == "--set" else f"{option[2:].replace('-', '_')}={value}"
            for option, value in pairs]


def vaeflow_config(values: dict) -> dict:
    """``values`` read as ``vaeflow train --resume`` reads a run's config with its changes
    (``vaeflow.train._claim``), as the config.json that it writes holds them."""
    from vaeflow.configs import TrainConfig

    return TrainConfig.from_dict(values).to_dict()


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (["--max-epochs", "3"], ["--max-epochs", "1"], "max_epochs: 3 -> 1 (a smaller budget)"),
        (["--budget-minutes", "60"], ["--budget-minutes", "20"],
         "max_minutes: 60.0 -> 20.0 (a smaller budget)"),
        # no time limit is the largest budget: a time limit is a smaller one, even with more
        # epochs allowed
        (["--max-epochs", "2"], ["--budget-minutes", "60"],
         "max_epochs: 2 -> 2000; max_minutes: None -> 60.0 (a smaller budget)"),
        (["--smoke"], ["--smoke", "--set", "max_steps=2"], "max_steps: 5 -> 2 (a smaller budget)"),
    ],
)
def test_a_smaller_budget_is_a_mismatch(
    tiny_data_dir: Path, tmp_path: Path, before: list[str], after: list[str], message: str
) -> None:
    base = ["--datasets", "static_mnist", "--flows", "none", "--seeds", "1", "--data-dir",
            str(tiny_data_dir), "--runs-dir", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out")]
    fake_cell(tmp_path / "runs", Cell("static_mnist", "none", 0), [*base, *before], done=True)
    code, text = run([*base, *after])
    assert code == 2, text
    assert f"static_mnist/none/seed0 (done) was run with other settings: {message}" in text
    assert "cannot resume with a smaller budget" in text
    code, log = run([*base, *after, "--on-mismatch", "restart", "--dry-run"])
    assert code == 0 and "trained afresh (--on-mismatch restart)" in log
    assert "restart  static_mnist/none/seed0" in log


@pytest.mark.slow
def test_a_second_call_with_more_epochs_trains_the_cells_on(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A grid at 2 epochs called again at 3: its done cells and a partial one train on, a new
    one starts, all end at epoch 3, the one compared with a grid run at 3 from the start
    equal to it; a third call finds them done, one at 1 epoch is refused."""
    runs = tmp_path / "runs"
    two = grid_args(tiny_data_dir, tmp_path, "--datasets", "static_mnist", "--flows", "none",
                    "planar")
    assert run([*two, "--seeds", "1"])[0] == 0
    leave_half_trained(two, PARTIAL)
    cells = [Cell("static_mnist", f, s) for f in ("none", "planar") for s in (0, 1)]
    three = [*two, "--max-epochs", "3"]
    code, log = run(three)
    assert code == 0, log
    assert "4 cell(s) to run (3 resumed, 3 of them with a larger budget), 0 done" in log
    assert "static_mnist/none/seed0: resume with a larger budget on cpu" in log
    for cell in cells:
        assert results(runs, cell)["epochs"] == 3, cell
        history = json.loads((cell.run_dir(runs) / "history.json").read_text())
        assert len(history) == 3, cell
    modes = {c.seed if c.flow == "none" else -1 - c.seed: [a["mode"] for a in attempts(runs, c)]
             for c in cells}
    assert modes == {0: ["start", "extend"], 1: ["extend"], -1: ["start", "extend"],
                     -2: ["start"]}
    extend = attempts(runs, cells[0])[-1]["command"]
    assert "--resume" in extend and "--max-epochs 3" in extend
    invocation = json.loads((runs / "grid.json").read_text())["invocations"][-1]
    assert "--max-epochs 3" in invocation["command"] and invocation["max_epochs"] == 3
    assert "≤3 epochs" in (tmp_path / "out" / "table.md").read_text()
    # trained on from epoch 2 as a grid run at 3 from the start: the same figures and weights
    fresh = tmp_path / "fresh"
    assert run([*three, "--flows", "none", "--seeds", "1", "--runs-dir", str(fresh), "--out",
                str(tmp_path / "fresh-out")])[0] == 0
    for key in ("test_nelbo", "test_nll_is", "steps", "epochs"):
        assert results(runs, cells[0])[key] == results(fresh, cells[0])[key], key
    import torch

    ours, theirs = (torch.load(c / "checkpoint.pt", weights_only=True)["model"]
                    for c in (cells[0].run_dir(runs), cells[0].run_dir(fresh)))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    code, log = run(three)
    assert code == 0 and "0 cell(s) to run (0 resumed), 4 done" in log
    code, text = run([*two, "--max-epochs", "1"])
    assert code == 2 and "max_epochs: 3 -> 1 (a smaller budget)" in text
    assert all(len(attempts(runs, c)) == n for c, n in zip(cells, (2, 1, 2, 1), strict=True))


@pytest.mark.slow
def test_a_time_budget_below_what_a_cell_trained_fails_it_and_keeps_its_figures(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A run stopped by its time budget trains a little past it; a budget larger than its own
    but below that is refused by ``vaeflow train --resume``: the cell is FAILED, not done with
    the old budget's figures."""
    base = grid_args(tiny_data_dir, tmp_path, "--datasets", "static_mnist", "--flows", "none",
                     "--seeds", "1")
    base = base[:base.index("--max-epochs")] + base[base.index("--max-epochs") + 2:]
    assert run([*base, "--budget-minutes", "0.0001"])[0] == 0
    run_dir = Cell("static_mnist", "none", 0).run_dir(tmp_path / "runs")
    trained = json.loads((run_dir / "timing.json").read_text())["train_seconds"] / 60
    between = f"{(0.0001 + trained) / 2:.6g}"
    if not 0.0001 < float(between) < trained:
        pytest.skip(f"the run trained {trained} minutes: no budget between")
    before = (run_dir / "results.json").read_text()
    code, log = run([*base, "--budget-minutes", between])
    assert code == 1, log
    assert "1 cell(s) to run (1 resumed, 1 of them with a larger budget)" in log
    assert "static_mnist/none/seed0: FAILED (exit 2)" in log and "cannot resume" in log
    assert (run_dir / "results.json").read_text() == before
    assert json.loads((run_dir / "config.json").read_text())["max_minutes"] == 0.0001


def report_args(grid: SimpleNamespace, out: Path, *flows: str) -> list[str]:
    return [
        "--report-only",
        "--datasets", "static_mnist", "omniglot",
        "--flows", *(flows or ("none", "ffjord")),
        "--data-dir", str(grid.data_dir),
        "--runs-dir", str(grid.runs),
        "--out", str(out),
    ]  # fmt: skip


def test_report_only_rebuilds_the_table_from_the_run_directories(
    grid: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    code, log = run(report_args(grid, out))  # no --seeds: every seed found
    assert code == 0, log
    assert "cell(s) to run" not in log
    rebuilt, original = read_csv(out / "table.csv"), read_csv(grid.out / "table.csv")
    for key in (("static_mnist", "none"), ("static_mnist", "ffjord"), ("omniglot", "none")):
        for name in ("mean", "std", "n", "paper", "status"):
            assert rebuilt[key][name] == original[key][name], (key, name)
    assert (out / "samples_static_mnist_none.png").is_file()
    # the command for the missing data set takes the grid's budget and settings from its record
    md = (out / "table.md").read_text()
    command = next(line for line in md.split("## Not run")[1].splitlines() if "table.py" in line)
    assert "--datasets omniglot --flows none ffjord --seeds 2 --max-epochs 2" in command
    assert "--parallel 2" in command
    assert "--flow-opt ffjord:rank=2" in command and "--set batch_size=50" in command
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in (out / "table.md").read_text()
    else:
        assert (out / "nelbo_vs_time_static_mnist.png").is_file()
        assert "nelbo_vs_time_static_mnist.png" in (out / "table.md").read_text()


def test_plots_without_matplotlib_are_skipped_with_a_message(
    grid: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "report"
    code, log = run(report_args(grid, out))
    assert code == 0
    assert "matplotlib is not installed" in log
    assert "pip install matplotlib" in (out / "table.md").read_text()
    assert not list(out.glob("nelbo_vs_time_*.png"))
    assert (out / "samples_static_mnist_ffjord.png").is_file()  # torchvision, not matplotlib


def test_failed_and_unfinished_cells_are_reported(grid: SimpleNamespace, tmp_path: Path) -> None:
    failed = Cell("static_mnist", "planar", 0).run_dir(tmp_path / "runs")
    failed.mkdir(parents=True)
    attempt = {
        "mode": "start",
        "returncode": 1,
        "seconds": 3.0,
        "error": "boom: NaN loss",
        "command": "python -m vaeflow.cli train",
        "started": "now",
    }
    table_grid.cell_file(failed, table_grid.ATTEMPTS_FILE).write_text(json.dumps([attempt]))
    out = tmp_path / "out"
    argv = [*report_args(grid, out, "planar"), "--runs-dir", str(tmp_path / "runs")]
    assert run(argv)[0] == 0
    md = (out / "table.md").read_text()
    assert "— (1 failed) / 86.06" in md
    assert "static_mnist/planar/seed0: failed: boom: NaN loss" in md
    assert read_csv(out / "table.csv")[("static_mnist", "planar")]["status"] == "1 failed"


def test_run_jobs_goes_on_after_a_failure(tmp_path: Path) -> None:
    def job(name: str, code: str) -> Job:
        return Job(name, [sys.executable, "-c", code], tmp_path / name / "log")

    jobs = [
        job("a", "import time; time.sleep(0.5)"),
        job("b", "import sys; print('boom'); sys.exit(3)"),
        job("c", "open('c.out', 'w').write('ok')"),
    ]
    live, peak = [0], [0]

    def started(job: Job) -> None:
        live[0] += 1
        peak[0] = max(peak[0], live[0])

    def finished(result: table_pool.JobResult) -> None:
        live[0] -= 1

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        done = table_pool.run_jobs(jobs, 2, on_start=started, on_finish=finished, poll_seconds=0.02)
    finally:
        os.chdir(cwd)
    codes = {r.job.name: r.returncode for r in done}
    assert codes == {"a": 0, "b": 3, "c": 0}
    assert peak[0] == 2
    assert next(r for r in done if r.job.name == "b").error == "boom"
    assert (tmp_path / "c.out").read_text() == "ok"


def test_run_jobs_stops_running_jobs_on_an_interrupt(tmp_path: Path) -> None:
    sleeper = Job("s", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    finished: list[table_pool.JobResult] = []

    def interrupt(job: Job) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        table_pool.run_jobs([sleeper], 1, on_start=interrupt, on_finish=finished.append)
    assert [r.returncode for r in finished] == [-signal.SIGTERM]
    assert finished[0].seconds < 30


def test_run_jobs_stops_at_the_deadline(tmp_path: Path) -> None:
    def job(name: str) -> Job:
        return Job(name, [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / name)

    t0 = time.monotonic()
    done = table_pool.run_jobs([job("a"), job("b"), job("c")], 2, deadline=t0 + 1.0,
                              poll_seconds=0.02)
    assert sorted(r.job.name for r in done) == ["a", "b"]  # c never started
    assert all(r.returncode == -signal.SIGTERM for r in done)
    assert time.monotonic() - t0 < 30


def test_devices_are_parsed_against_the_visible_gpus() -> None:
    four = tuple(f"cuda:{i}" for i in range(4))
    assert table_pool.parse_devices("auto", cuda_count=4) == four
    assert table_pool.parse_devices("cuda", cuda_count=4) == four
    assert table_pool.parse_devices("auto", cuda_count=0) == ("cpu",)
    assert table_pool.parse_devices("cuda:1, cuda:3", cuda_count=4) == ("cuda:1", "cuda:3")
    assert table_pool.parse_devices("cpu,cpu", cuda_count=0) == ("cpu", "cpu")
    for text, message in (
        ("cuda:4", "only 4 CUDA device(s) are visible"),
        ("cuda:x", "expected cuda:N"),
        ("tpu", "unknown device 'tpu'"),
        (",", "at least one device"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            table_pool.parse_devices(text, cuda_count=4)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        table_pool.parse_devices("cuda:0", cuda_count=0)


def test_the_placement_rule() -> None:
    two = ("cuda:0", "cuda:1")
    assert Placement.of(two) == Placement(two, per_device=1, parallel=2)  # one per device
    assert Placement.of(("cuda:0",), parallel=7) == Placement(("cuda:0",), 7, 7)  # share one GPU
    assert Placement.of(two, parallel=3) == Placement(two, 2, 3)  # P spread over the devices
    assert Placement.of(two, per_device=3) == Placement(two, 3, 6)
    assert Placement.of(two, parallel=4, per_device=3) == Placement(two, 3, 4)
    with pytest.raises(ValueError, match=re.escape("cannot run at once on 2 device(s)")):
        Placement.of(two, parallel=5, per_device=2)
    with pytest.raises(ValueError, match="--per-device must be a positive integer"):
        Placement.of(two, per_device=0)
    # the least loaded device with room, the first on ties; none once the grid is full
    placement = Placement.of(two, parallel=3)
    assert [placement.pick(load) for load in ([0, 0], [1, 0], [1, 1], [2, 0])] == [0, 1, 0, 1]
    assert placement.pick([2, 1]) is None and placement.pick([2, 2]) is None
    options = table.options_from_args(["--smoke", "--devices", "cuda:0,cuda:1", "--per-device",
                                       "2"])
    assert options.placement(cuda_count=2) == Placement(two, 2, 4)


def test_a_cell_sees_only_its_device() -> None:
    assert table_pool.device_env({}, "cuda:2")["CUDA_VISIBLE_DEVICES"] == "2"
    # numbered as the parent sees them: cuda:1 of a parent that sees GPUs 5 and 7 is GPU 7
    assert table_pool.device_env({"CUDA_VISIBLE_DEVICES": "5,7"}, "cuda:1") == {
        "CUDA_VISIBLE_DEVICES": "7"
    }
    assert table_pool.device_env({"CUDA_VISIBLE_DEVICES": "5"}, "cpu") == {
        "CUDA_VISIBLE_DEVICES": ""
    }
    assert table_pool.device_env({"A": "1"}, None) == {"A": "1"}


@pytest.mark.parametrize(
    ("devices", "per_device", "parallel", "peak"),
    [(("cuda:0", "cuda:1"), 2, 3, {"0": 2, "1": 1}), (("cpu", "cpu"), 1, 2, {"": 2})],
)
def test_run_jobs_places_the_jobs_on_the_devices(
    tmp_path: Path, devices: tuple[str, ...], per_device: int, parallel: int, peak: dict
) -> None:
    """Stand-in jobs print the GPUs they may see; the placement caps each device and the
    total, and every job ran on a device of the list (no GPU needed: nothing touches CUDA)."""
    code = ("import os, time; print('sees', repr(os.environ['CUDA_VISIBLE_DEVICES'])); "
            "time.sleep(0.4)")
    jobs = [Job(f"j{i}", [sys.executable, "-c", code], tmp_path / f"j{i}.log") for i in range(6)]
    live: dict[str, int] = {}
    most: dict[str, int] = {}
    total = [0, 0]

    def started(job: Job) -> None:
        assert job.device in devices
        key = table_pool.device_env({}, job.device)["CUDA_VISIBLE_DEVICES"]
        live[key] = live.get(key, 0) + 1
        most[key] = max(most.get(key, 0), live[key])
        total[0] += 1
        total[1] = max(total[1], total[0])

    def finished(result: table_pool.JobResult) -> None:
        key = table_pool.device_env({}, result.job.device)["CUDA_VISIBLE_DEVICES"]
        live[key] -= 1
        total[0] -= 1

    placement = Placement.of(devices, parallel, per_device)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = table_pool.run_jobs(jobs, placement, env, started, finished, poll_seconds=0.02)
    assert sorted(r.returncode for r in done) == [0] * 6
    assert most == peak and total[1] == parallel
    for r in done:
        seen = table_pool.device_env({}, r.job.device)["CUDA_VISIBLE_DEVICES"]
        assert f"sees {seen!r}" in r.job.log.read_text()
        assert f"(on {r.job.device})" in r.job.log.read_text()


def test_smoke_dry_run_prints_the_cells_and_runs_nothing(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    code, log = run(
        [
            "--smoke",
            "--dry-run",
            "--datasets",
            "static_mnist",
            "--flows",
            "planar",
            "ffjord",
            "--seeds",
            "0,3",
            "--data-dir",
            str(tiny_data_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, log
    assert "4 cell(s) to run" in log
    assert "--max-steps 5" in log and "--seed 3" in log
    assert "runs/table-smoke/static_mnist/ffjord/seed3" in log
    assert "--device" not in log  # placed by the pool, so that a cell resumes on any device
    assert not (tmp_path / "out").exists()
    code, log = run(["--smoke", "--dry-run", "--datasets", "static_mnist", "--flows", "none",
                     "--devices", "cpu,cpu", "--per-device", "1", "--data-dir",
                     str(tiny_data_dir), "--out", str(tmp_path / "out")])
    assert code == 0, log
    assert "2 at once on cpu, cpu (1 per device)" in log


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--datasets", "cifar10"], "unknown data set(s) cifar10; valid names are static_mnist"),
        (["--flows", "realnvp"], "unknown flow(s) realnvp; valid flows are none, planar"),
        (["--max-epochs", "2", "--budget-minutes", "5"], "give one budget"),
        ([], "state the budget per cell"),
        (["--max-epochs", "2", "--flow-opt", "glow:depth=3"], "unknown flow 'glow'"),
        (
            ["--max-epochs", "2", "--flow-opt", "ffjord:width=3"],
            "cell static_mnist/ffjord/seed0: unknown hyperparameter(s) 'width'",
        ),
        (["--max-epochs", "2", "--set", "nope=1"], "unknown config key(s) 'nope'"),
        (["--max-epochs", "2", "--seeds", "x"], "--seeds takes a count"),
        (["--max-epochs", "2", "--set", "device=cuda"], "chosen by --devices"),
        (["--max-epochs", "2", "--devices", "tpu"], "unknown device 'tpu'"),
        (
            ["--max-epochs", "2", "--devices", "cpu,cpu", "--per-device", "1", "--parallel", "3"],
            "--parallel 3 cells cannot run at once on 2 device(s)",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    tiny_data_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    argv = [
        "--datasets",
        "static_mnist",
        "--flows",
        "ffjord",
        "--data-dir",
        str(tiny_data_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    code, text = run(argv)
    assert code == 2
    assert message in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_bad_settings_are_refused_where_the_data_is_missing_and_before_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no data file, no cell can run, yet the settings are checked: a bad ``--set`` was a
    silent 0-cell table; with ``--download`` it is named before anything is fetched."""
    fetched: list[object] = []
    monkeypatch.setattr(table, "download_missing", lambda *a, **k: fetched.append(a) or {})
    empty = tmp_path / "no-data"
    empty.mkdir()
    for extra in ([], ["--download"]):
        code, text = run([
            "--datasets", "caltech", "--flows", "planar", "--max-epochs", "2",
            "--data-dir", str(empty), "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--set", "nope=1", *extra,
        ])
        assert code == 2, text
        assert "cell caltech/planar/seed0: unknown config key(s) 'nope'" in text
    assert fetched == [] and not (tmp_path / "out").exists()


def test_main_reports_bad_input_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert table.main(["--flows", "realnvp", "--report-only"]) == 2
    assert "table: error: unknown flow(s) realnvp" in capsys.readouterr().err


def test_report_only_of_a_folder_that_is_not_there_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--report-only", "--runs-dir", str(tmp_path / "typo"), "--out", str(out)]
    assert table.main(argv) == 2
    assert "no runs folder" in capsys.readouterr().err and not out.exists()


def test_seeds_and_flow_options() -> None:
    assert table_options.parse_seeds(["3"]) == [0, 1, 2]
    assert table_options.parse_seeds(["0", "4"]) == [0, 4]
    assert table_options.parse_seeds(["0,4"]) == [0, 4]
    assert table_options.parse_seeds(["5,"]) == [5]
    # a count of 0 is most likely seed 0 alone: the refusal says how to write that
    with pytest.raises(table_options.TableError, match=r"for seed 0 alone, write --seeds 0,$"):
        table_options.parse_seeds(["0"])
    opts = table_options.flow_opts_by_flow(["ffjord:rank=2", "num_steps=4"], ["planar", "ffjord"])
    assert opts == {"planar": ["num_steps=4"], "ffjord": ["rank=2", "num_steps=4"]}


def test_smoke_runs_stay_out_of_results() -> None:
    smoke = table.options_from_args(["--smoke"])
    assert smoke.runs_dir == Path("runs/table-smoke")
    assert smoke.out == Path("runs/table-smoke/report")
    real = table.options_from_args(["--budget-minutes", "60"])
    assert real.runs_dir == Path("runs/table") and real.out == Path("results/table")
    assert real.seed_list == [0, 1, 2] and real.budget_minutes == 60


def test_paper_numbers() -> None:
    assert table_records.paper_value("static_mnist", "ffjord") == 82.82
    assert table_records.paper_value("freyfaces", "none") == 4.53
    for variant in ("orthogonal", "householder", "triangular"):  # the paper's one Sylvester row
        assert table_records.paper_value("caltech", variant) == 104.62
    assert table_records.paper_value("omniglot_rederived", "ffjord") is None
    assert set(table_options.TABLE_FLOWS) == set(table_records.PAPER_ROW)


def test_a_cell_marked_failed_is_neither_done_nor_ok(tmp_path: Path) -> None:
    # vaeflow marks a run stopped by a NaN (or a failed final evaluation) in results.json; the
    # grid must still count it failed, and a rerun resume it rather than skip it
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"")
    results = run_dir / "results.json"
    job = Job("cell", ["true"], tmp_path / "log", run_dir=run_dir)
    results.write_text(json.dumps({"status": "failed", "error": "the loss became nan"}))
    assert table_grid.cell_state(run_dir) == "partial"
    assert not table_pool.JobResult(job, 1, 1.0, "now").ok
    results.write_text(json.dumps({"status": "finished", "test_nelbo": 90.0}))
    assert table_grid.cell_state(run_dir) == "done"
    assert table_pool.JobResult(job, 1, 1.0, "now").ok  # killed after writing its figures


def test_the_budget_note_says_how_many_epochs_the_cells_trained() -> None:
    def cells(*epochs: int) -> list[table_records.CellRecord]:
        return [table_records.CellRecord(Cell("static_mnist", "planar", i), "done", "nats",
                                         epochs=e, stop_reason="budget",
                                         config={"warmup_epochs": 100,
                                                 "early_stopping_epochs": 100})
                for i, e in enumerate(epochs)]

    assert "(epochs trained: 3–7)" in table_report._budget_note(cells(3, 7))
    assert "(epochs trained: 4)" in table_report._budget_note(cells(4, 4))
    assert "(epochs trained: none whole: every cell stopped inside its first epoch)" in \
        table_report._budget_note(cells(0, 0))
    early = [dataclasses.replace(r, stop_reason="early stopping at epoch 9") for r in cells(9)]
    assert table_report._budget_note(early) is None


def test_an_unfinished_cells_epochs_count_a_partial_epoch_once(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # a time stop's partial epoch, resumed by a larger budget and killed again: recorded twice
    from vaeflow.configs import TrainConfig
    from vaeflow.runs import Run

    cell = table_grid.Cell("static_mnist", "ffjord", 0)
    run = Run(cell.run_dir(tmp_path))
    run.path.mkdir(parents=True)
    config = TrainConfig(dataset="static_mnist", flow="ffjord", data_dir=str(tiny_data_dir))
    run.write_config(config)
    run.write_history([
        {"epoch": 1, "step": 3, "seconds": 1.0, "valid_nelbo": 99.0, "partial": True,
         "train_nfe_forward": 50.0},
        {"epoch": 1, "step": 10, "seconds": 3.0, "valid_nelbo": 95.0, "train_nfe_forward": 20.0},
    ])
    record = table_records.read_cell(cell, tmp_path)
    assert record.epochs == 1 and record.steps == 10
    assert record.nfe_forward == 20.0  # the whole epoch's mean, which covers the partial one


# --------------------------------------------------------------------------------------------
# The command a report prints, read back by the table's own parser


def options_of_command(command: str) -> table_options.TableOptions:
    """What a printed ``experiments/table.py`` command asks for, read by the table's own
    parser."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "experiments/table.py"], command
    return table.options_from_args(argv[2:])


def seeds_of_command(command: str) -> list[int]:
    """The seeds that a printed ``experiments/table.py`` command runs."""
    return options_of_command(command).seed_list


@pytest.mark.parametrize("seeds", [[0], [4], [0, 1, 2], [1, 2], [2, 0], [7, 3, 5]])
def test_a_printed_table_command_runs_the_seeds_of_the_grid(seeds: list[int]) -> None:
    # A report prints the command that runs a missing data set or resumes unfinished cells; a
    # grid of the one seed 4 was printed as `--seeds 4`, which is a count: seeds 0 1 2 3.
    options = table_options.TableOptions(seeds=seeds, budget_minutes=5.0)
    command = table_options.table_command(options, ["caltech"], download=False)
    assert seeds_of_command(command) == seeds, command
    # the same through the last invocation's record, as --report-only takes it
    report_only = table_options.TableOptions(report_only=True)
    invocation = {"seeds": seeds, "budget_minutes": 5.0}
    command = table_options.table_command(report_only, ["caltech"], False, invocation)
    assert seeds_of_command(command) == seeds, command


# --------------------------------------------------------------------------------------------
# experiments/pyro_vae.py


def test_a_printed_table_command_keeps_the_grids_on_mismatch(tmp_path: Path) -> None:
    # A grid run with --on-mismatch keep reports its unfinished cells with "the grid's command
    # resumes them": that command had no --on-mismatch, so it stopped on the kept cells.
    options = table.options_from_args(
        ["--budget-minutes", "5", "--on-mismatch", "keep", "--runs-dir", str(tmp_path)]
    )
    command = table_options.table_command(options, ["caltech"], download=False)
    assert options_of_command(command).on_mismatch == "keep", command
    # --report-only takes it from the record of the call that ran cells
    table_grid.record_invocation(options, table_grid.Plan(), options.placement())
    report_only = table.options_from_args(["--report-only", "--runs-dir", str(tmp_path)])
    invocation = table_report.last_invocation(tmp_path)
    command = table_options.table_command(report_only, ["caltech"], False, invocation)
    assert options_of_command(command).on_mismatch == "keep", command
    default = table.options_from_args(["--budget-minutes", "5"])
    assert "--on-mismatch" not in table_options.table_command(default, ["caltech"], False)
