"""The FFJORD paper's Table 3 as one resumable grid: flows x data sets x seeds.

Each cell of the grid is one ``vaeflow train`` run in its own subprocess, with its own run
directory ``RUNS_DIR/<dataset>/<flow>/seed<k>``, the papers' settings of
``experiments/configs/<dataset>.toml`` and a stated budget (wall-clock minutes or epochs per
cell). Several cells run at once (``parallel``), sharing one GPU. A cell holding
``results.json`` is done and skipped; a cell holding only ``checkpoint.pt`` is resumed
(``vaeflow train --resume``), so a grid can be finished over several commands; a cell that fails
is reported and the others go on. The report is rebuilt from the run directories alone:

- ``table.md``: rows flows, columns data sets, cells "ours mean ± std (seeds) / paper", with the
  machine, budget, commit and date, the cells not run (with the command that runs them) and an
  honest note when the budget is far below the papers' protocol;
- ``table.csv``: one row per data set x flow (mean, std, n, the paper's number, unit, budget,
  wall-clock, mean FFJORD NFE, commit);
- ``nelbo_vs_time_<dataset>.png``: validation NELBO against training wall-clock per flow
  (matplotlib, optional: skipped with a message when it is not installed);
- ``samples_<dataset>_<flow>.png``: 64 samples of the best model of the lowest finished seed.

The command line is ``experiments/table.py``; this module holds the logic so that tests can
call it. The library ``vaeflow`` never imports this module.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

import vaeflow
from vaeflow.cli import CLIError, build_parser, resolve_config
from vaeflow.data import (
    DATASETS,
    DataNotFoundError,
    Dataset,
    get_spec,
    load_dataset,
    resolve_data_dir,
)
from vaeflow.flows import FLOWS

__all__ = [
    "PAPER",
    "TABLE_DATASETS",
    "TABLE_FLOWS",
    "Cell",
    "CellRecord",
    "Job",
    "JobResult",
    "TableError",
    "TableOptions",
    "collect",
    "paper_value",
    "run_jobs",
    "run_table",
    "write_report",
]

TABLE_DATASETS = ("static_mnist", "omniglot", "freyfaces", "caltech")
TABLE_FLOWS = ("none", "planar", "iaf", "orthogonal", "householder", "triangular", "ffjord")
DEFAULT_SEEDS = 3
DEFAULT_RUNS_DIR = Path("runs/table")
DEFAULT_OUT = Path("results/table")
SMOKE_RUNS_DIR = Path("runs/table-smoke")
SMOKE_STEPS = 5
REPORT_BUDGET_MINUTES = 60.0  # in commands printed by a report of a grid that never ran
# exit statuses of a cell that was stopped by a signal and kept its checkpoint
INTERRUPTED = (130, -signal.SIGTERM, -signal.SIGINT)
PROTOCOL_MAX_EPOCHS = 2000  # the papers' cap; early stopping ends the runs well before
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SCRIPT = "python experiments/table.py"

GRID_FILE = "grid.json"  # in RUNS_DIR: one record per invocation that ran cells
ATTEMPTS_FILE = "table_attempts.json"  # in a cell's run directory
LOG_FILE = "table.log"  # in a cell's run directory: the subprocesses' output

# Grathwohl et al. (2019), "FFJORD", Table 3: test negative ELBO of the VAE (nats; Frey Faces in
# bits/dim), mean over 3 runs. The Sylvester row is the best Sylvester variant per data set as
# that paper reports it (from van den Berg et al., 2018); it is set beside each of our three
# Sylvester variants.
PAPER_SOURCE = "FFJORD paper (Grathwohl et al., 2019), Table 3, mean of 3 runs"
PAPER: dict[str, dict[str, float]] = {
    "none": {"static_mnist": 86.55, "omniglot": 104.28, "freyfaces": 4.53, "caltech": 110.80},
    "planar": {"static_mnist": 86.06, "omniglot": 102.65, "freyfaces": 4.40, "caltech": 109.66},
    "iaf": {"static_mnist": 84.20, "omniglot": 102.41, "freyfaces": 4.47, "caltech": 111.58},
    "sylvester": {"static_mnist": 83.32, "omniglot": 99.00, "freyfaces": 4.45, "caltech": 104.62},
    "ffjord": {"static_mnist": 82.82, "omniglot": 98.33, "freyfaces": 4.39, "caltech": 104.03},
}
PAPER_ROW = {
    "none": "none",
    "planar": "planar",
    "iaf": "iaf",
    "orthogonal": "sylvester",
    "householder": "sylvester",
    "triangular": "sylvester",
    "ffjord": "ffjord",
}
FLOW_LABELS = {
    "none": "no flow",
    "planar": "planar",
    "iaf": "IAF",
    "orthogonal": "Sylvester (orthogonal)",
    "householder": "Sylvester (Householder)",
    "triangular": "Sylvester (triangular)",
    "ffjord": "FFJORD",
}
DATASET_LABELS = {
    "static_mnist": "MNIST (static)",
    "mnist": "MNIST (dynamic)",
    "omniglot": "Omniglot",
    "omniglot_rederived": "Omniglot re-derived",
    "freyfaces": "Frey Faces (bits/dim)",
    "caltech": "Caltech 101 Silhouettes",
}
NOT_COMPARABLE = {
    "omniglot_rederived": "re-derived from the 105x105 images with its own resizing and split: "
    "NOT comparable with published Omniglot numbers",
    "mnist": "dynamically binarized MNIST is not in the paper's table",
}

# config keys that change neither what a run learns nor its test NELBO (the importance-sampled
# likelihood is not in the paper's table)
_NEUTRAL_KEYS = {
    "device", "data_dir", "log_every", "image_every", "checkpoint_every", "is_samples",
    "is_points", "eval_batch_rows",
}  # fmt: skip
# ... and those that are the budget, reported on their own
_BUDGET_KEYS = {"max_epochs", "max_minutes", "max_steps"}


class TableError(ValueError):
    """Bad input to the table command (exit status 2); nothing was run."""


# --------------------------------------------------------------------------------------------
# Options and cells
# --------------------------------------------------------------------------------------------


@dataclass
class TableOptions:
    """What ``experiments/table.py`` was asked to do (see its ``--help``).

    ``seeds`` None means the default (``DEFAULT_SEEDS`` seeds) when running and every seed found
    in the run directories for ``report_only``. ``flow_opts`` items are ``[FLOW:]KEY=VALUE``:
    without ``FLOW:`` they go to every flow of the grid. ``on_mismatch`` says what to do with a
    cell whose saved settings differ from the requested ones: ``"error"`` (stop before running
    anything), ``"keep"`` (keep its own settings: report it, or resume it when unfinished) or
    ``"restart"`` (train it afresh).
    """

    datasets: list[str] = field(default_factory=lambda: list(TABLE_DATASETS))
    flows: list[str] = field(default_factory=lambda: list(TABLE_FLOWS))
    seeds: list[int] | None = None
    budget_minutes: float | None = None
    max_epochs: int | None = None
    parallel: int = 1
    stop_after_minutes: float | None = None
    runs_dir: Path = DEFAULT_RUNS_DIR
    out: Path = DEFAULT_OUT
    device: str = "auto"
    data_dir: str | None = None
    smoke: bool = False
    report_only: bool = False
    dry_run: bool = False
    download: bool = False
    on_mismatch: str = "error"
    sets: list[str] = field(default_factory=list)
    flow_opts: list[str] = field(default_factory=list)
    python: str = sys.executable
    argv: list[str] | None = None  # the command line, recorded in grid.json

    def check(self) -> None:
        """Raise a :class:`TableError` naming any bad value and the valid ones."""
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise TableError(
                f"unknown data set(s) {', '.join(unknown)}; valid names are "
                f"{', '.join(DATASETS)} (the paper's table: {', '.join(TABLE_DATASETS)})"
            )
        unknown = [f for f in self.flows if f not in FLOWS]
        if unknown:
            raise TableError(
                f"unknown flow(s) {', '.join(unknown)}; valid flows are {', '.join(FLOWS)}"
            )
        for name, values in (("data set", self.datasets), ("flow", self.flows)):
            if len(set(values)) != len(values):
                raise TableError(f"a {name} is named twice: {' '.join(values)}")
        if not self.datasets or not self.flows:
            raise TableError("the grid needs at least one data set and one flow")
        if self.seeds is not None and (not self.seeds or min(self.seeds) < 0):
            raise TableError(f"seeds must be non-negative integers, got {self.seeds}")
        if self.budget_minutes is not None and self.max_epochs is not None:
            raise TableError("give one budget: --budget-minutes or --max-epochs, not both")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise TableError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise TableError(f"--max-epochs must be a positive integer, got {self.max_epochs}")
        if self.stop_after_minutes is not None and not self.stop_after_minutes > 0:
            raise TableError(f"--stop-after must be positive, got {self.stop_after_minutes}")
        if self.parallel < 1:
            raise TableError(f"--parallel must be at least 1, got {self.parallel}")
        if self.on_mismatch not in ("error", "keep", "restart"):
            raise TableError(f"on_mismatch must be error, keep or restart: {self.on_mismatch!r}")
        running = not (self.report_only or self.dry_run)
        no_budget = self.budget_minutes is None and self.max_epochs is None
        if running and no_budget and not self.smoke:
            raise TableError(
                "state the budget per cell: --budget-minutes M (wall-clock minutes of training, "
                "summed over resumes) or --max-epochs N (--max-epochs 2000 is the papers' "
                "protocol with early stopping); or --smoke for a tiny test run"
            )
        for item in self.sets:
            if "=" not in item:
                raise TableError(f"--set takes KEY=VALUE, got {item!r}")
        flow_opts_by_flow(self.flow_opts, self.flows)

    @property
    def seed_list(self) -> list[int]:
        """The seeds to run (the default when none were given)."""
        return list(range(DEFAULT_SEEDS)) if self.seeds is None else list(self.seeds)


def parse_seeds(tokens: Sequence[str]) -> list[int]:
    """``["3"]`` -> seeds 0, 1, 2 (a count); ``["0", "4"]``, ``["0,4"]`` or ``["4,"]`` -> a list."""
    text = " ".join(tokens).replace(",", " ")
    try:
        values = [int(t) for t in text.split()]
    except ValueError as err:
        raise TableError(f"--seeds takes a count (3) or a list (0,1,4), got {text!r}") from err
    if not values:
        raise TableError("--seeds needs a value")
    if len(tokens) == 1 and "," not in tokens[0]:
        if values[0] < 1:
            raise TableError(f"a seed count must be positive, got {values[0]}")
        return list(range(values[0]))
    return values


def flow_opts_by_flow(items: Sequence[str], flows: Sequence[str]) -> dict[str, list[str]]:
    """``[FLOW:]KEY=VALUE`` items -> the ``KEY=VALUE`` items of each flow of ``flows``."""
    out: dict[str, list[str]] = {f: [] for f in flows}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TableError(f"--flow-opt takes [FLOW:]KEY=VALUE, got {item!r}")
        scope, colon, name = key.partition(":")
        if not colon:
            for f in flows:
                out[f].append(item)
            continue
        if scope not in FLOWS:
            raise TableError(
                f"--flow-opt {item!r}: unknown flow {scope!r}; valid flows are {', '.join(FLOWS)}"
            )
        if scope in out:
            out[scope].append(f"{name}={value}")
    return out


@dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid."""

    dataset: str
    flow: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.flow}/seed{self.seed}"

    def run_dir(self, runs_dir: Path) -> Path:
        return Path(runs_dir) / self.dataset / self.flow / f"seed{self.seed}"


def cell_train_args(cell: Cell, options: TableOptions) -> list[str]:
    """The ``vaeflow train`` arguments (after ``train``) that start ``cell`` afresh."""
    args = [
        "--dataset", cell.dataset,
        "--flow", cell.flow,
        "--seed", str(cell.seed),
        "--out", str(cell.run_dir(options.runs_dir)),
        "--device", options.device,
        "--quiet",
    ]  # fmt: skip
    if options.data_dir is not None:
        args += ["--data-dir", str(options.data_dir)]
    if options.max_epochs is not None:
        args += ["--max-epochs", str(options.max_epochs)]
    if options.budget_minutes is not None:
        args += ["--set", f"max_minutes={options.budget_minutes:g}"]
    if options.smoke:
        # a tiny budget and a small evaluation: checks that every cell runs, nothing more
        args += ["--max-steps", str(SMOKE_STEPS)]
        for item in ("eval_points=100", "valid_points=100", "is_samples=0", "image_every=0"):
            args += ["--set", item]
    for item in options.sets:  # after the smoke settings, so that they win
        args += ["--set", item]
    for item in flow_opts_by_flow(options.flow_opts, [cell.flow])[cell.flow]:
        args += ["--flow-opt", item]
    return args


@contextlib.contextmanager
def _config_env() -> Iterator[None]:
    """Resolve configs from the ``experiments/configs`` next to this file, as the cells do."""
    old = os.environ.get("VAEFLOW_CONFIGS")
    if old is None:
        os.environ["VAEFLOW_CONFIGS"] = str(CONFIG_DIR)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VAEFLOW_CONFIGS", None)


def resolve_train_args(args: Sequence[str]) -> dict[str, Any]:
    """The resolved ``TrainConfig`` (as a dict) of ``vaeflow train ARGS``, exactly as the cell's
    subprocess will resolve it; bad input raises a :class:`TableError`."""
    stderr = io.StringIO()
    try:
        with _config_env(), contextlib.redirect_stderr(stderr):
            namespace = build_parser().parse_args(["train", *args])
        with _config_env():
            return resolve_config(namespace).to_dict()
    except SystemExit as err:  # argparse already wrote why
        raise TableError(stderr.getvalue().strip().splitlines()[-1]) from err
    except (CLIError, ValueError) as err:
        raise TableError(str(err)) from err


def paper_value(dataset: str, flow: str) -> float | None:
    """The paper's test NELBO of ``flow`` on ``dataset`` (nats; Frey Faces bits/dim)."""
    return PAPER.get(PAPER_ROW.get(flow, ""), {}).get(dataset)


def unit_of(dataset: str) -> str:
    return "bits/dim" if get_spec(dataset).bits_per_dim else "nats"


def _to_unit(nats: float, dataset: str) -> float:
    spec = get_spec(dataset)
    return nats / (math.prod(spec.input_shape) * math.log(2.0)) if spec.bits_per_dim else nats


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def cell_state(run_dir: Path) -> str:
    """``"done"`` (results.json), ``"partial"`` (a checkpoint to resume) or ``"new"``."""
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "checkpoint.pt").is_file():
        return "partial"
    return "new"


# --------------------------------------------------------------------------------------------
# Data availability
# --------------------------------------------------------------------------------------------


def missing_data(datasets: Sequence[str], data_dir: str | None) -> dict[str, str]:
    """The data sets of ``datasets`` whose file is not in the data directory, with the reason."""
    directory = resolve_data_dir(data_dir)
    out = {}
    for name in datasets:
        spec = get_spec(name)
        if not (directory / spec.filename).is_file():
            out[name] = f"{spec.filename} is not in {directory}"
    return out


def download_missing(missing: Mapping[str, str], data_dir: str | None) -> dict[str, str]:
    """Try to download each missing data set once, here, before the cells start (so that
    parallel cells do not race to download it); return those still missing, with why."""
    still = {}
    for name, reason in missing.items():
        print(f"table: {reason}; downloading it", file=sys.stderr)
        try:
            load_dataset(name, data_dir, "cpu", download=True)
        except (DataNotFoundError, OSError, ValueError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            still[name] = f"{reason}, and downloading it failed ({first})"
    return still


def how_to_get(dataset: str, data_dir: str | None) -> str:
    """Where the file of ``dataset`` comes from, in a sentence."""
    spec = get_spec(dataset)
    directory = resolve_data_dir(data_dir)
    if spec.sources:
        urls = ", ".join(s.urls[0] for s in spec.sources)
        return (
            f"on a machine with network access vaeflow downloads it ({urls}), checks it and "
            f"converts it to {spec.filename}; or copy a prepared {spec.filename} into {directory}"
        )
    return f"it has no public download: copy {spec.filename} into {directory}"


def table_command(
    options: TableOptions,
    datasets: Sequence[str],
    download: bool,
    invocation: Mapping[str, Any] | None = None,
) -> str:
    """The ``experiments/table.py`` command that runs ``datasets`` with ``options``' grid.

    Without a budget in ``options`` (``--report-only``), the budget and parallelism of the
    last ``invocation`` that ran cells are used, else ``REPORT_BUDGET_MINUTES``.
    """
    inv = invocation or {}
    minutes, epochs, smoke = options.budget_minutes, options.max_epochs, options.smoke
    parallel, stop_after = options.parallel, options.stop_after_minutes
    sets, flow_opts = list(options.sets), list(options.flow_opts)
    if minutes is None and epochs is None and not smoke:
        minutes, epochs, smoke = inv.get("budget_minutes"), inv.get("max_epochs"), inv.get("smoke")
        parallel = int(inv.get("parallel", parallel))
        stop_after = inv.get("stop_after_minutes", stop_after)
        sets = sets or list(inv.get("sets", []))
        flow_opts = flow_opts or list(inv.get("flow_opts", []))
        if minutes is None and epochs is None and not smoke:
            minutes = REPORT_BUDGET_MINUTES
    parts = shlex.split(SCRIPT) + ["--datasets", *datasets]
    if list(options.flows) != list(TABLE_FLOWS):
        parts += ["--flows", *options.flows]
    seeds = options.seed_list if options.seeds is not None else inv.get("seeds", options.seed_list)
    parts += ["--seeds", str(len(seeds)) if seeds == list(range(len(seeds))) else
              ",".join(map(str, seeds))]
    if minutes is not None:
        parts += ["--budget-minutes", f"{minutes:g}"]
    if epochs is not None:
        parts += ["--max-epochs", str(epochs)]
    if smoke:
        parts += ["--smoke"]
    if parallel != 1:
        parts += ["--parallel", str(parallel)]
    if stop_after is not None:
        parts += ["--stop-after", f"{stop_after:g}"]
    if options.device != "auto":
        parts += ["--device", options.device]
    if options.data_dir is not None:
        parts += ["--data-dir", str(options.data_dir)]
    if Path(options.runs_dir) != (SMOKE_RUNS_DIR if smoke else DEFAULT_RUNS_DIR):
        parts += ["--runs-dir", str(options.runs_dir)]
    if Path(options.out) != (SMOKE_RUNS_DIR / "report" if smoke else DEFAULT_OUT):
        parts += ["--out", str(options.out)]
    for item in sets:
        parts += ["--set", item]
    for item in flow_opts:
        parts += ["--flow-opt", item]
    if download:
        parts += ["--download"]
    return shlex.join(parts)


def default_runs_dir(options: TableOptions) -> Path:
    """``runs/table``, or ``runs/table-smoke`` for a smoke run."""
    return SMOKE_RUNS_DIR if options.smoke else DEFAULT_RUNS_DIR


def default_out(options: TableOptions) -> Path:
    """``results/table``; a smoke run's report stays out of ``results/``."""
    return SMOKE_RUNS_DIR / "report" if options.smoke else DEFAULT_OUT


# --------------------------------------------------------------------------------------------
# Running cells: a small process pool
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One subprocess: its command, its log file and a name to report."""

    name: str
    command: list[str]
    log: Path
    mode: str = "start"  # "start", "resume" or "restart"
    run_dir: Path | None = None


@dataclass
class JobResult:
    job: Job
    returncode: int
    seconds: float
    started: str
    error: str = ""  # the last line of the log when it failed

    @property
    def ok(self) -> bool:
        """It exited cleanly, or (a signal that came during the final evaluation) it still
        wrote its ``results.json``."""
        done = self.job.run_dir is not None and (self.job.run_dir / "results.json").is_file()
        return self.returncode == 0 or done


def _last_line(path: Path, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("===")]
    return lines[-1] if lines else ""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


_Running = tuple[Job, "subprocess.Popen[bytes]", float, str, TextIO]


def run_jobs(
    jobs: Sequence[Job],
    parallel: int,
    env: Mapping[str, str] | None = None,
    on_start: Callable[[Job], None] | None = None,
    on_finish: Callable[[JobResult], None] | None = None,
    poll_seconds: float = 0.1,
    grace_seconds: float = 120.0,
    deadline: float | None = None,
) -> list[JobResult]:
    """Run ``jobs`` as subprocesses, at most ``parallel`` at a time, in order.

    Each job's stdout and stderr are appended to its log. A job that fails does not stop the
    others. At ``deadline`` (a ``time.monotonic()`` value) no job is started any more and the
    running ones get SIGTERM (``vaeflow train`` then writes a checkpoint and exits); they are
    waited for ``grace_seconds``, then killed. On ``KeyboardInterrupt`` the same happens and
    the interrupt is raised again. Every job that ran is reported through ``on_finish`` and in
    the returned list; jobs never started are in neither.
    """
    pending = list(jobs)
    running: list[_Running] = []
    results: list[JobResult] = []

    def finish(item: _Running, rc: int) -> None:
        job, _, t0, started, log = item
        log.close()
        result = JobResult(job, rc, time.perf_counter() - t0, started)
        if rc != 0:
            result.error = _last_line(job.log)
        results.append(result)
        if on_finish is not None:
            on_finish(result)

    def start(job: Job) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log, "a")  # noqa: SIM115 - closed in finish()
        started = _now()
        log.write(f"=== {started}: {shlex.join(job.command)}\n")
        log.flush()
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                job.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
            )
        except OSError as err:
            log.write(f"cannot start: {err}\n")
            finish((job, None, t0, started, log), 127)  # type: ignore[arg-type]
            return
        running.append((job, proc, t0, started, log))
        if on_start is not None:
            on_start(job)

    def reap() -> None:
        for item in list(running):
            rc = item[1].poll()
            if rc is not None:
                running.remove(item)
                finish(item, rc)

    def stop_all() -> None:
        pending.clear()
        for _, proc, *_ in running:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        kill_at = time.monotonic() + grace_seconds
        while running:
            time.sleep(poll_seconds)
            if time.monotonic() > kill_at:
                for _, proc, *_ in running:
                    with contextlib.suppress(OSError):
                        proc.kill()
            reap()

    try:
        while pending or running:
            if deadline is not None and time.monotonic() >= deadline:
                stop_all()
                break
            while pending and len(running) < parallel:
                start(pending.pop(0))
            time.sleep(poll_seconds)
            reap()
    except KeyboardInterrupt:
        stop_all()
        raise
    return results


def child_env(parallel: int) -> dict[str, str]:
    """The environment of the cells: the configs next to this file, this ``vaeflow`` on the
    path, and the CPU threads shared out between the cells that run at once."""
    env = dict(os.environ)
    env.setdefault("VAEFLOW_CONFIGS", str(CONFIG_DIR))
    root = str(Path(vaeflow.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------------------------
# Planning and running the grid
# --------------------------------------------------------------------------------------------


def _config_diff(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for each setting that changes what a run computes."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in _NEUTRAL_KEYS or key == "seed":
            continue
        if saved.get(key) != wanted.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}")
    return out


@dataclass
class Plan:
    """What a call will do: the jobs to run, the cells left as they are, the data sets that
    cannot run here (with why), and warnings."""

    jobs: list[Job] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_grid(options: TableOptions, missing: Mapping[str, str]) -> Plan:
    """The jobs of the grid; every fresh cell's config is resolved (and so checked) first."""
    plan = Plan(not_run=dict(missing))
    cells = [
        Cell(d, f, s)
        for s in options.seed_list
        for d in options.datasets
        if d not in missing
        # FFJORD first: the slowest cells start first, so the grid ends sooner
        for f in sorted(options.flows, key=lambda f: f != "ffjord")
    ]
    mismatched = []
    for cell in cells:
        run_dir = cell.run_dir(options.runs_dir)
        args = cell_train_args(cell, options)
        try:
            wanted = resolve_train_args(args)
        except TableError as err:
            raise TableError(f"cell {cell.name}: {err}") from err
        state = cell_state(run_dir)
        saved = _read_json(run_dir / "config.json") if state != "new" else None
        diff = _config_diff(saved, wanted) if isinstance(saved, dict) else []
        if diff:
            message = f"{cell.name} ({state}) was run with other settings: {'; '.join(diff)}"
            if options.on_mismatch == "error":
                mismatched.append(message)
                continue
            if options.on_mismatch == "keep":  # a partial cell goes on with its own settings
                plan.warnings.append(f"{message}; kept with its own settings (--on-mismatch keep)")
            else:
                plan.warnings.append(f"{message}; trained afresh (--on-mismatch restart)")
                state = "restart"
        train = [options.python, "-m", "vaeflow.cli", "train"]
        log = run_dir / LOG_FILE
        if state == "done":
            plan.skipped.append(cell)
        elif state == "partial":
            command = [*train, "--resume", str(run_dir), "--quiet"]
            plan.jobs.append(Job(cell.name, command, log, "resume", run_dir))
        elif state == "restart":
            command = [*train, *args, "--overwrite"]
            plan.jobs.append(Job(cell.name, command, log, "restart", run_dir))
        else:
            plan.jobs.append(Job(cell.name, [*train, *args], log, "start", run_dir))
    if mismatched:
        raise TableError(
            "cells in " + str(options.runs_dir) + " were run with other settings than asked:\n  "
            + "\n  ".join(mismatched)
            + "\nUse another --runs-dir, delete those cells, or pass --on-mismatch keep (keep "
            "their own settings) or --on-mismatch restart (train them afresh)."
        )
    return plan


def _record_attempt(result: JobResult) -> None:
    if result.job.run_dir is None:
        return
    path = result.job.run_dir / ATTEMPTS_FILE
    attempts = _read_json(path) or []
    attempts.append(
        {
            "started": result.started,
            "mode": result.job.mode,
            "command": shlex.join(result.job.command),
            "returncode": result.returncode,
            "seconds": round(result.seconds, 3),
            "error": result.error,
        }
    )
    _write_json_atomic(attempts, path)


def _record_invocation(options: TableOptions, plan: Plan) -> None:
    path = Path(options.runs_dir) / GRID_FILE
    grid = _read_json(path) or {"invocations": []}
    grid["invocations"].append(
        {
            "date": _now(),
            "command": shlex.join([*shlex.split(SCRIPT), *(options.argv or [])]),
            "parallel": options.parallel,
            "device": options.device,
            "budget_minutes": options.budget_minutes,
            "max_epochs": options.max_epochs,
            "smoke": options.smoke,
            "stop_after_minutes": options.stop_after_minutes,
            "seeds": options.seed_list,
            "sets": options.sets,
            "flow_opts": options.flow_opts,
            "jobs": [job.name for job in plan.jobs],
        }
    )
    _write_json_atomic(grid, path)


def run_table(options: TableOptions, echo: TextIO = sys.stderr) -> int:
    """Run what is missing of the grid (unless ``report_only``), then write the report.

    Returns the exit status: 0 when every runnable cell is done, 1 when a cell failed, 3 when
    ``stop_after_minutes`` stopped the grid with cells left, 130 after an interrupt (SIGINT, or
    SIGTERM in ``experiments/table.py``). The report is written in every case.
    """
    options.check()
    missing = missing_data(options.datasets, options.data_dir)
    if options.report_only:
        return _report(options, missing, echo)
    if missing and options.download and not options.dry_run:
        missing = download_missing(missing, options.data_dir)
    plan = plan_grid(options, missing)
    for warning in plan.warnings:
        print(f"table: warning: {warning}", file=echo)
    for name, reason in plan.not_run.items():
        print(f"table: {name} not run: {reason}", file=echo)
    total = len(plan.jobs)
    print(
        f"table: {total} cell(s) to run ({sum(j.mode == 'resume' for j in plan.jobs)} resumed), "
        f"{len(plan.skipped)} done, {options.parallel} at once",
        file=echo,
    )
    if options.dry_run:
        for job in plan.jobs:
            print(f"{job.mode:8s} {job.name}: {shlex.join(job.command)}", file=echo)
        for cell in plan.skipped:
            print(f"{'done':8s} {cell.name}", file=echo)
        return 0
    if total:
        _record_invocation(options, plan)
    for job in plan.jobs:
        if job.mode == "restart" and job.run_dir is not None:
            # the old run's events and attempts would mix into the new run's NFE and wall-clock
            for path in [*job.run_dir.glob("events.out.tfevents*"), job.run_dir / ATTEMPTS_FILE]:
                path.unlink(missing_ok=True)
    counter = {"started": 0}

    def on_start(job: Job) -> None:
        counter["started"] += 1
        print(f"[{counter['started']}/{total}] {job.name}: {job.mode}", file=echo, flush=True)

    def on_finish(result: JobResult) -> None:
        _record_attempt(result)
        name, secs = result.job.name, result.seconds
        if result.ok:
            run_dir = result.job.run_dir
            results = _read_json(run_dir / "results.json") if run_dir is not None else None
            figure = ""
            if isinstance(results, dict) and "test_nelbo" in results:
                unit = results.get("unit", "nats")
                value = results["test_nelbo_bpd" if unit == "bits/dim" else "test_nelbo"]
                figure = f": test NELBO {value:.4g} {unit}"
            print(f"{name}: done in {secs:.0f} s{figure}", file=echo, flush=True)
        elif result.returncode in INTERRUPTED:
            print(f"{name}: interrupted after {secs:.0f} s (checkpoint kept)", file=echo)
        else:
            print(
                f"{name}: FAILED (exit {result.returncode}) after {secs:.0f} s: {result.error}\n"
                f"  log: {result.job.log}",
                file=echo,
                flush=True,
            )

    deadline = None
    if options.stop_after_minutes is not None:
        deadline = time.monotonic() + 60 * options.stop_after_minutes
    status = 0
    try:
        results = run_jobs(plan.jobs, options.parallel, child_env(options.parallel),
                           on_start, on_finish, deadline=deadline)
    except KeyboardInterrupt:
        print("table: interrupted; every cell keeps its checkpoint; run the same command "
              "again to go on", file=echo)
        status = 130
    else:
        failed = [r for r in results if not r.ok and r.returncode not in INTERRUPTED]
        left = total - sum(r.ok for r in results) - len(failed)
        if failed:
            status = 1
        elif left:
            print(f"table: stopped after --stop-after {options.stop_after_minutes:g} minutes "
                  f"with {left} cell(s) left (checkpoints kept); run the same command again "
                  "to go on", file=echo)
            status = 3
    _report(options, plan.not_run, echo)
    return status


def _report(options: TableOptions, missing: Mapping[str, str], echo: TextIO) -> int:
    records = collect(options, missing)
    paths = write_report(records, options, missing, echo=echo)
    for path in paths:
        print(f"table: wrote {path}", file=echo)
    return 0


# --------------------------------------------------------------------------------------------
# Reading the run directories
# --------------------------------------------------------------------------------------------


@dataclass
class CellRecord:
    """What the run directory of one cell says. ``status``: ``"done"``, ``"partial"`` (a
    checkpoint, not finished), ``"failed"`` (its last attempt failed), ``"pending"`` (nothing
    yet) or ``"no data"``. Values are in ``unit`` (Frey Faces: bits/dim)."""

    cell: Cell
    status: str
    unit: str
    value: float | None = None
    nll_is: float | None = None
    epochs: int | None = None
    steps: int | None = None
    stop_reason: str = ""
    train_seconds: float | None = None
    cell_seconds: float | None = None
    test_points: int | None = None
    budget: str = ""
    device_name: str = ""
    commit: str = ""
    nfe_forward: float | None = None
    nfe_backward: float | None = None
    history: list[tuple[float, float]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    error: str = ""


def budget_label(config: Mapping[str, Any]) -> str:
    """The budget of a run config, e.g. ``"60 min"``, ``"50 epochs"``, ``"5 steps (smoke)"``."""
    parts = []
    if config.get("max_steps") is not None:
        parts.append(f"{config['max_steps']} steps (smoke)")
    if config.get("max_minutes") is not None:
        parts.append(f"{config['max_minutes']:g} min")
    epochs = config.get("max_epochs")
    if epochs is not None and (epochs != PROTOCOL_MAX_EPOCHS or not parts):
        parts.append(f"≤{epochs} epochs" + (" (protocol)" if epochs == PROTOCOL_MAX_EPOCHS else ""))
    return ", ".join(parts) or "protocol"


def _seeds_found(runs_dir: Path, dataset: str, flow: str) -> list[int]:
    folder = Path(runs_dir) / dataset / flow
    if not folder.is_dir():
        return []
    seeds = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"seed(\d+)", p.name))]
    return sorted(seeds)


def _history(run_dir: Path, dataset: str) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """(seconds, validation NELBO in the data set's unit) per epoch, and the progress record."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return [], {}
    try:
        # mmap: the model and optimizer tensors are not read, only the progress record
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint must not stop the report
        print(f"table: warning: cannot read {path}: {err}", file=sys.stderr)
        return [], {}
    progress = ckpt.get("progress", {})
    points = [
        (float(h["seconds"]), _to_unit(float(h["valid_nelbo"]), dataset))
        for h in progress.get("history", [])
        if "seconds" in h and "valid_nelbo" in h
    ]
    return points, progress


def _mean_nfe(run_dir: Path) -> tuple[float | None, float | None]:
    """Mean function evaluations per training iteration (forward, backward) from the run's
    TensorBoard events (``train/nfe_forward``, ``train/nfe_backward``)."""
    if not any(run_dir.glob("events.out.tfevents*")):
        return None, None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "audio": 1,
                "compressedHistograms": 1}
    # a resumed run's events overlap its earlier ones; TensorBoard purges them, with a warning
    quiet = logging.getLogger("tensorboard")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        events = EventAccumulator(str(run_dir), size_guidance=guidance)
        events.Reload()
        tags = set(events.Tags().get("scalars", []))
    except Exception as err:  # noqa: BLE001 - damaged event files must not stop the report
        print(f"table: warning: cannot read the events of {run_dir}: {err}", file=sys.stderr)
        return None, None
    finally:
        quiet.setLevel(level)
    out = []
    for tag in ("train/nfe_forward", "train/nfe_backward"):
        values = [e.value for e in events.Scalars(tag)] if tag in tags else []
        out.append(statistics.fmean(values) if values else None)
    return out[0], out[1]


def read_cell(cell: Cell, runs_dir: Path) -> CellRecord:
    """The :class:`CellRecord` of ``cell`` from its run directory."""
    run_dir = cell.run_dir(runs_dir)
    record = CellRecord(cell, "pending", unit_of(cell.dataset))
    config = _read_json(run_dir / "config.json")
    if isinstance(config, dict):
        record.config = config
        record.budget = budget_label(config)
    attempts = _read_json(run_dir / ATTEMPTS_FILE) or []
    if attempts:
        record.cell_seconds = sum(float(a.get("seconds", 0.0)) for a in attempts)
    history, progress = _history(run_dir, cell.dataset)
    record.history = history
    if progress:
        record.train_seconds = float(progress.get("seconds", 0.0))
        record.steps = int(progress.get("step", 0))
        record.epochs = len(progress.get("history", []))
    timing = _read_json(run_dir / "timing.json")
    if isinstance(timing, dict):
        record.device_name = str(timing.get("device_name", ""))
        record.commit = str(timing.get("commit", ""))
        record.train_seconds = float(timing.get("train_seconds", record.train_seconds or 0.0))
    if cell.flow == "ffjord":
        record.nfe_forward, record.nfe_backward = _mean_nfe(run_dir)
    results = _read_json(run_dir / "results.json")
    if isinstance(results, dict) and "test_nelbo" in results:
        record.status = "done"
        bpd = results.get("unit") == "bits/dim"
        record.unit = results.get("unit", record.unit)
        record.value = float(results["test_nelbo_bpd" if bpd else "test_nelbo"])
        nll = results.get("test_nll_is_bpd" if bpd else "test_nll_is")
        record.nll_is = None if nll is None else float(nll)
        record.epochs = results.get("epochs", record.epochs)
        record.steps = results.get("steps", record.steps)
        record.stop_reason = str(results.get("stop_reason", ""))
        record.test_points = results.get("test_points")
        return record
    last = attempts[-1] if attempts else None
    if last is not None and last.get("returncode") not in (0, *INTERRUPTED):
        record.status = "failed"
        record.error = str(last.get("error", ""))
    elif progress:
        record.status = "partial"
    return record


def collect(options: TableOptions, missing: Mapping[str, str] = ()) -> list[CellRecord]:
    """The records of every cell of the grid (the seeds found on disk when none were given)."""
    records = []
    for dataset in options.datasets:
        for flow in options.flows:
            if options.seeds is not None:
                seeds = options.seeds
            else:
                seeds = _seeds_found(options.runs_dir, dataset, flow)
            for seed in seeds:
                record = read_cell(Cell(dataset, flow, seed), options.runs_dir)
                if record.status == "pending" and dataset in missing:
                    record.status = "no data"
                records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """The done seeds of one data set x flow."""

    dataset: str
    flow: str
    unit: str
    values: list[float]
    records: list[CellRecord]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None below 2 seeds)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def done(self) -> list[CellRecord]:
        return [r for r in self.records if r.status == "done"]

    def mean_of(self, name: str, records: Sequence[CellRecord] | None = None) -> float | None:
        values = [getattr(r, name) for r in (self.done if records is None else records)]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def summarize(
    records: Sequence[CellRecord], options: TableOptions
) -> dict[tuple[str, str], Summary]:
    """The :class:`Summary` of every data set x flow of the grid, records grouped."""
    out = {
        (d, f): Summary(d, f, unit_of(d), [], []) for d in options.datasets for f in options.flows
    }
    for r in records:
        s = out[(r.cell.dataset, r.cell.flow)]
        s.records.append(r)
        if r.status == "done" and r.value is not None:
            s.values.append(r.value)
    return out


def _digits(unit: str) -> int:
    return 3 if unit == "bits/dim" else 2


def _fmt(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:.{_digits(unit)}f}"


def _cell_text(s: Summary, missing: Mapping[str, str]) -> str:
    paper = paper_value(s.dataset, s.flow)
    paper_text = f"{paper:.2f}" if paper is not None else "—"
    counts = s.counts()
    others = [f"{n} {k}" for k, n in sorted(counts.items()) if k not in ("done",)]
    if s.n:
        ours = f"{_fmt(s.mean, s.unit)}"
        if s.std is not None:
            ours += f" ± {_fmt(s.std, s.unit)}"
        ours += f" ({s.n}{'; ' + ', '.join(others) if others else ''})"
    elif (s.dataset in missing and not s.records) or counts.get("no data"):
        ours = "not run (no data)"
    elif others:
        ours = f"— ({', '.join(others)})"
    else:
        ours = "—"
    return f"{ours} / {paper_text}"


def _deviations(records: Sequence[CellRecord]) -> list[str]:
    """Settings of the runs that differ from ``experiments/configs/`` (budget aside)."""
    found: dict[str, set[str]] = {}
    bases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.config is None:
            continue
        key = (r.cell.dataset, r.cell.flow)
        if key not in bases:
            try:
                bases[key] = resolve_train_args(["--dataset", key[0], "--flow", key[1]])
            except TableError:
                continue
        base = bases[key]
        for name in sorted(set(r.config) | set(base)):
            if name in _NEUTRAL_KEYS or name in _BUDGET_KEYS or name == "seed":
                continue
            mine, theirs = r.config.get(name), base.get(name)
            if name == "flow_kwargs" and isinstance(mine, dict) and isinstance(theirs, dict):
                for k in sorted(set(mine) | set(theirs)):
                    if mine.get(k) != theirs.get(k):
                        found.setdefault(f"{r.cell.flow} {k}", set()).add(json.dumps(mine.get(k)))
            elif mine != theirs:
                found.setdefault(name, set()).add(json.dumps(mine))
    return [f"{k}={'/'.join(sorted(v))}" for k, v in sorted(found.items())]


def _protocol_notes(records: Sequence[CellRecord], options: TableOptions) -> list[str]:
    """Honest notes on how far the runs are from the papers' protocol."""
    notes = []
    done = [r for r in records if r.status == "done"]
    if not done:
        return notes
    smoke = [r for r in done if r.config and r.config.get("max_steps") is not None]
    if smoke:
        notes.append(
            f"**Smoke run**: {len(smoke)} of {len(done)} finished cells were stopped after a few "
            "optimizer steps (`max_steps`). Their numbers only show that the pipeline runs; they "
            "are NOT comparable with the paper."
        )
    early = [r for r in done if r.stop_reason.startswith("early stopping")]
    if len(early) < len(done):
        epochs = [r.epochs for r in done if r.epochs is not None]
        warmups = {int(r.config.get("warmup_epochs", 0)) for r in done if r.config}
        patience = {int(r.config.get("early_stopping_epochs", 0)) for r in done if r.config}
        span = f"{min(epochs)}–{max(epochs)}" if epochs else "?"
        note = (
            f"**The budget is below the papers' protocol**: {len(done) - len(early)} of "
            f"{len(done)} finished cells stopped on the budget, not by early stopping (epochs "
            f"trained: {span}). The papers train each model until the validation ELBO has not "
            f"improved for {'/'.join(map(str, sorted(patience)))} epochs (at most 2000 epochs), "
            f"after a KL warm-up of {'/'.join(map(str, sorted(warmups)))} epochs. "
        )
        if epochs and warmups and min(epochs) < max(warmups):
            note += (
                "Some cells stopped before the KL warm-up ended, so they were trained on a "
                "down-weighted KL term for their whole run. "
            )
        note += (
            "Read these numbers as what each flow reaches under the same budget on this "
            "machine, not as a reproduction of the paper's numbers."
        )
        notes.append(note)
    subsets = sorted(
        {(r.cell.dataset, r.test_points) for r in done if r.test_points is not None
         and r.test_points < get_spec(r.cell.dataset).split_sizes[2]}
    )
    if subsets:
        parts = ", ".join(f"{d}: {n} points" for d, n in subsets)
        notes.append(f"Test NELBO on part of the test set only ({parts}).")
    deviations = _deviations(done)
    if deviations:
        notes.append(
            "Settings that differ from the papers' (`experiments/configs/`): "
            + ", ".join(f"`{d}`" for d in deviations)
            + "."
        )
    for d in options.datasets:
        if d in NOT_COMPARABLE:
            notes.append(f"{DATASET_LABELS.get(d, d)}: {NOT_COMPARABLE[d]}.")
    return notes


def _last_invocation(runs_dir: Path) -> dict[str, Any]:
    grid = _read_json(Path(runs_dir) / GRID_FILE)
    if isinstance(grid, dict) and grid.get("invocations"):
        return grid["invocations"][-1]
    return {}


def _joined(values: Sequence[str], empty: str = "unknown") -> str:
    unique = sorted({v for v in values if v})
    return ", ".join(unique) if unique else empty


def render_markdown(
    records: Sequence[CellRecord],
    options: TableOptions,
    missing: Mapping[str, str],
    images: Mapping[tuple[str, str], str],
    curves: Mapping[str, str],
    plot_note: str,
) -> str:
    """The text of ``table.md``."""
    summaries = summarize(records, options)
    started = [r for r in records if r.status in ("done", "partial", "failed")]
    done = [r for r in records if r.status == "done"]
    invocation = _last_invocation(options.runs_dir)
    seeds = sorted({r.cell.seed for r in records})
    lines = ["# Test negative ELBO of VAEs with flow posteriors (FFJORD paper, Table 3)", ""]
    machine = _joined([r.device_name for r in started])
    parallel = invocation.get("parallel")
    lines += [
        f"- Built: {_now()} from the run directories in `{options.runs_dir}`.",
        f"- Machine: {machine}"
        + (f"; up to {parallel} cells ran at once on it, so a cell's wall-clock includes "
           "sharing the device" if parallel and parallel > 1 else ""),
        f"- Budget per cell: {_joined([r.budget for r in started], 'none yet')}"
        + (" (minutes: wall-clock of training and validation, summed over resumes; the final "
           "evaluation comes on top)." if any(" min" in r.budget for r in started) else "."),
        f"- Commit(s) that trained the cells: {_joined([r.commit for r in done])}.",
        f"- Seeds: {', '.join(map(str, seeds)) if seeds else 'none'}; {len(done)} of "
        f"{len(records)} cells finished.",
    ]
    if invocation.get("command"):
        lines.append(f"- Last command: `{invocation['command']}`")
    lines += [
        "",
        f"Cells: ours, test NELBO mean ± sample std over seeds (number of seeds) / the paper "
        f"({PAPER_SOURCE}). Nats, except Frey Faces in bits/dim; lower is better. The test "
        "NELBO uses the exact trace for FFJORD and one posterior sample per test point.",
        "",
    ]
    header = ["flow", *[DATASET_LABELS.get(d, d) for d in options.datasets]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for f in options.flows:
        row = [FLOW_LABELS.get(f, f)]
        row += [_cell_text(summaries[(d, f)], missing) for d in options.datasets]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if any(PAPER_ROW.get(f) == "sylvester" for f in options.flows):
        lines += [
            "The paper has one Sylvester row: for each data set, the best of the Sylvester "
            "paper's orthogonal, Householder and triangular variants (van den Berg et al., "
            "2018). That one number is set beside each of our three variants.",
            "",
        ]
    notes = _protocol_notes(records, options)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]

    if records:
        lines += _per_cell_lines(summaries)
    unfinished = [r for r in records if r.status in ("partial", "failed")]
    if unfinished:
        lines += ["## Unfinished cells", ""]
        for r in unfinished:
            run_dir = r.cell.run_dir(options.runs_dir)
            detail = f": {r.error}" if r.error else ""
            lines.append(f"- {r.cell.name}: {r.status}{detail} (log: `{run_dir / LOG_FILE}`)")
        lines += [
            "",
            "The grid's command resumes them (a failed cell goes on from its last good "
            f"checkpoint): `{table_command(options, options.datasets, False, invocation)}`",
            "",
        ]

    not_run = [
        d for d in options.datasets
        if d in missing and all(r.status == "no data" for r in records if r.cell.dataset == d)
    ]
    if not_run:
        lines += ["## Not run", ""]
        for d in not_run:
            lines.append(f"- {DATASET_LABELS.get(d, d)} (`{d}`): {missing[d]}; "
                         f"{how_to_get(d, options.data_dir)}. Then run:")
            command = table_command(options, [d], True, invocation)
            lines += ["", "  ```bash", f"  {command}", "  ```", ""]

    if curves or images or plot_note:
        lines += ["## Plots", ""]
        if plot_note:
            lines += [plot_note, ""]
        for d in options.datasets:
            if d in curves:
                lines += [f"Validation NELBO against wall-clock, {DATASET_LABELS.get(d, d)}:", "",
                          f"![{d}]({curves[d]})", ""]
            elif not plot_note and any(r.cell.dataset == d and r.status == "done"
                                       for r in records):
                lines += [f"No validation curve for {DATASET_LABELS.get(d, d)}: no cell "
                          "finished an epoch.", ""]
        for d in options.datasets:
            row = [(f, images[(d, f)]) for f in options.flows if (d, f) in images]
            if not row:
                continue
            lines += [f"Samples (best model of the lowest finished seed), "
                      f"{DATASET_LABELS.get(d, d)}:", ""]
            lines.append("| " + " | ".join(FLOW_LABELS.get(f, f) for f, _ in row) + " |")
            lines.append("|" + "---|" * len(row))
            lines.append("| " + " | ".join(f"![{d} {f}]({p})" for f, p in row) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _per_cell_lines(summaries: Mapping[tuple[str, str], Summary]) -> list[str]:
    """The "Per cell" section of ``table.md``: means over the cells of each data set x flow."""
    lines = ["## Per cell", ""]
    lines.append(
        "| data set | flow | seeds done | epochs | train+valid wall-clock (min) | cell wall-clock "
        "(min) | stop | FFJORD NFE per iteration (forward / adjoint) | test NLL (IS) |"
    )
    lines.append("|" + "---|" * 9)
    for (d, f), s in summaries.items():
        if not s.records:
            continue
        epochs = s.mean_of("epochs")
        train_min = s.mean_of("train_seconds")
        cell_min = s.mean_of("cell_seconds")
        fwd, bwd = s.mean_of("nfe_forward", s.records), s.mean_of("nfe_backward", s.records)
        nfe = f"{fwd:.0f} / {bwd:.0f}" if fwd is not None and bwd is not None else ""
        stops = _joined([r.stop_reason for r in s.done], "")
        row = [
            d,
            f,
            f"{s.n}/{len(s.records)}",
            "" if epochs is None else f"{epochs:.0f}",
            "" if train_min is None else f"{train_min / 60:.1f}",
            "" if cell_min is None else f"{cell_min / 60:.1f}",
            stops,
            nfe,
            _fmt(s.mean_of("nll_is"), s.unit),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [
        "Wall-clock: training and validation as the runs count it (summed over resumes), and "
        "the whole cell with startup and the final evaluation, as the table command timed its "
        "subprocesses. NFE: function evaluations per training iteration of FFJORD's solves, "
        "summed over blocks (TensorBoard `train/nfe_forward`, `train/nfe_backward`; the "
        "backward count is 0 without the adjoint method).",
        "",
    ]
    return lines


CSV_FIELDS = [
    "dataset", "flow", "unit", "mean", "std", "n", "seeds", "paper", "paper_row", "status",
    "budget", "epochs_mean", "train_seconds_mean", "cell_seconds_mean", "nfe_forward_mean",
    "nfe_backward_mean", "nll_is_mean", "device", "commit",
]  # fmt: skip


def csv_rows(records: Sequence[CellRecord], options: TableOptions,
             missing: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per data set x flow (the fields of ``CSV_FIELDS``)."""
    rows = []
    for (d, f), s in summarize(records, options).items():
        counts = s.counts()
        if d in missing and not any(k != "no data" for k in counts):
            status = "not run (no data)"
        else:
            status = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "not started"
        nfe_f, nfe_b = s.mean_of("nfe_forward", s.records), s.mean_of("nfe_backward", s.records)

        def num(value: float | None, digits: int = 4) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        rows.append({
            "dataset": d,
            "flow": f,
            "unit": s.unit,
            "mean": num(s.mean),
            "std": num(s.std),
            "n": s.n,
            "seeds": " ".join(str(r.cell.seed) for r in s.done),
            "paper": "" if paper_value(d, f) is None else f"{paper_value(d, f):.2f}",
            "paper_row": PAPER_ROW.get(f, "") if paper_value(d, f) is not None else "",
            "status": status,
            "budget": _joined([r.budget for r in s.records], ""),
            "epochs_mean": num(s.mean_of("epochs"), 1),
            "train_seconds_mean": num(s.mean_of("train_seconds"), 1),
            "cell_seconds_mean": num(s.mean_of("cell_seconds"), 1),
            "nfe_forward_mean": num(nfe_f, 1),
            "nfe_backward_mean": num(nfe_b, 1),
            "nll_is_mean": num(s.mean_of("nll_is")),
            "device": _joined([r.device_name for r in s.records], ""),
            "commit": _joined([r.commit for r in s.done], ""),
        })
    return rows


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

PLOT_MISSING = (
    "matplotlib is not installed, so the NELBO-against-wall-clock plots were skipped "
    "(pip install 'vaeflow[plot]' or pip install matplotlib, then rerun with --report-only)."
)


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def plot_curves(records: Sequence[CellRecord], options: TableOptions,
                out: Path) -> dict[str, str] | None:
    """``nelbo_vs_time_<dataset>.png`` per data set with curves; None without matplotlib."""
    Figure = _figure_class()
    if Figure is None:
        return None
    written = {}
    for d in options.datasets:
        curves = [r for r in records if r.cell.dataset == d and len(r.history) > 0]
        if not curves:
            continue
        fig = Figure(figsize=(5.5, 3.6), dpi=100)
        ax = fig.add_subplot()
        ys: list[float] = []
        papers: list[float] = []
        for i, f in enumerate(options.flows):
            color = f"C{i % 10}"
            label: str | None = FLOW_LABELS.get(f, f)
            for r in (r for r in curves if r.cell.flow == f):
                x = [t / 60 for t, _ in r.history]
                y = [v for _, v in r.history]
                ys += y
                ax.plot(x, y, color=color, lw=1.2, marker="." if len(x) < 20 else None,
                        label=label)
                label = None
            paper = paper_value(d, f)
            if paper is not None and label is None:
                ax.axhline(paper, color=color, lw=0.8, ls=":")
                papers.append(paper)
        if ys:
            # the early epochs sit far above the rest: cut them off at the curves' medians
            medians = [statistics.median(v for _, v in r.history) for r in curves]
            low, high = min(ys + papers), max(medians + papers)
            pad = max(0.02 * abs(high), 0.1 * (high - low), 1e-3)
            ax.set_ylim(low - pad, high + pad)
        unit = unit_of(d)
        ax.set_xlabel("training wall-clock (minutes)")
        ax.set_ylabel(f"validation NELBO ({unit})")
        ax.set_title(f"{DATASET_LABELS.get(d, d)} (dotted: paper, test)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        name = f"nelbo_vs_time_{d}.png"
        fig.savefig(out / name)
        written[d] = name
    return written


def _model_stub(dataset: str) -> Dataset:
    """A :class:`Dataset` with the shape and likelihood of ``dataset`` and no data: enough to
    build a model (``vaeflow.train.build_model``) without loading the data set."""
    spec = get_spec(dataset)
    empty = torch.empty(0, *spec.input_shape)
    return Dataset(spec.name, empty, empty, empty, spec.input_shape, spec.likelihood,
                   spec.dynamic_binarization, spec.bits_per_dim)


def sample_grids(records: Sequence[CellRecord], options: TableOptions,
                 out: Path, n: int = 64) -> dict[tuple[str, str], str]:
    """``samples_<dataset>_<flow>.png``: ``n`` samples of the best model of the lowest finished
    seed of each data set x flow (decoder means at z ~ N(0, I), a fixed generator)."""
    from torchvision.utils import save_image

    from vaeflow.train import TrainConfig, build_model

    written = {}
    for d in options.datasets:
        for f in options.flows:
            done = sorted((r for r in records if r.cell.dataset == d and r.cell.flow == f
                           and r.status == "done" and r.config), key=lambda r: r.cell.seed)
            best = [r for r in done if (r.cell.run_dir(options.runs_dir) / "best.pt").is_file()]
            if not best:
                continue
            record = best[0]
            try:
                config = TrainConfig.from_dict(record.config or {})
                model = build_model(config, _model_stub(d))
                state = torch.load(record.cell.run_dir(options.runs_dir) / "best.pt",
                                   map_location="cpu", weights_only=True)
                model.load_state_dict(state)
                model.eval()
                samples = model.sample(n, generator=torch.Generator().manual_seed(0))
            except Exception as err:  # noqa: BLE001 - one bad cell must not stop the report
                print(f"table: warning: no samples for {record.cell.name}: {err}",
                      file=sys.stderr)
                continue
            name = f"samples_{d}_{f}.png"
            save_image(samples.float().clamp(0, 1), out / name, nrow=8, padding=2, pad_value=1.0)
            written[(d, f)] = name
    return written


def write_report(
    records: Sequence[CellRecord],
    options: TableOptions,
    missing: Mapping[str, str],
    echo: TextIO = sys.stderr,
) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the PNG plots into ``options.out``."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(records, options, out)
    plot_note = ""
    if curves is None:
        print(f"table: {PLOT_MISSING}", file=echo)
        plot_note = PLOT_MISSING
        curves = {}
    images = sample_grids(records, options, out)
    md = out / "table.md"
    md.write_text(render_markdown(records, options, missing, images, curves, plot_note))
    path = out / "table.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(records, options, missing))
    return [md, path, *(out / p for p in curves.values()), *(out / p for p in images.values())]
