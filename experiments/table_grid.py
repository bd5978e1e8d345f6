"""The grid of ``experiments/table.py``: its cells, their configs, their run directories, and
the plan of a call (which cells start, resume, train on with a larger budget, restart, or are
done).

A cell (data set x flow x seed) is one ``vaeflow train`` run in ``RUNS_DIR/<dataset>/<flow>/
seed<k>``. Its config is resolved here with :func:`vaeflow.configs.resolve` from exactly the
settings that its subprocess gets on its command line, so that a bad setting is refused before
anything runs and a cell already run with other settings is found (the "mismatch").

Bookkeeping files of the grid, beside the run directories' own files (``vaeflow.runs``):
``RUNS_DIR/grid.json`` (one record per call that ran cells), and beside each cell's run
directory ``seed<k>.table.log`` (its subprocesses' output) and ``seed<k>.attempts.json`` (one
record per subprocess): outside the run directory, which only the run itself may fill (a
folder holding anything is not a new run).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from table_options import (
    SCRIPT,
    SMOKE_STEPS,
    TableError,
    TableOptions,
    flow_opts_by_flow,
    parse_items,
)
from table_pool import Job, JobResult, Placement, read_json, utc_now

from vaeflow.checks import is_number
from vaeflow.configs import TrainConfig, resolve
from vaeflow.data import DataNotFoundError, get_spec, load_dataset, resolve_data_dir
from vaeflow.report import LOG_ONLY_KEYS, budget_options
from vaeflow.runs import CHECKPOINT, CONFIG, Run, atomic_write_json

__all__ = [
    "ATTEMPTS_FILE",
    "cell_file",
    "GRID_FILE",
    "LOG_FILE",
    "Cell",
    "Plan",
    "cell_config",
    "cell_state",
    "cell_train_args",
    "config_diff",
    "download_missing",
    "how_to_get",
    "larger_budget",
    "missing_data",
    "plan_grid",
    "read_json",
    "smaller_budget",
]

GRID_FILE = "grid.json"
ATTEMPTS_FILE = "attempts.json"
LOG_FILE = "table.log"


def cell_file(run_dir: Path, name: str) -> Path:
    """The grid's bookkeeping file ``name`` of the cell in ``run_dir``, kept beside it."""
    return run_dir.parent / f"{run_dir.name}.{name}"

# config keys that change neither what a run learns nor its test NELBO: those that change no
# figure at all, and where it runs and the importance-sampled likelihood (not in the paper's
# table)
NEUTRAL_KEYS = LOG_ONLY_KEYS | {"device", "is_samples", "is_points"}
# ... and those that are the budget, reported on their own
BUDGET_KEYS = {"max_epochs", "max_minutes", "max_steps"}
# a smoke cell: a tiny budget and a small evaluation, to check that every cell runs
SMOKE_SETS = ("eval_points=100", "valid_points=100", "is_samples=0", "pictures=false")


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


@dataclass
class CellSettings:
    """What the table sets for one cell: config keys given by ``vaeflow train``'s named options
    (``named``: key -> (option, value)), ``--set`` items and ``--flow-opt`` items."""

    named: dict[str, tuple[str, Any]]
    sets: list[str]
    flow_opts: list[str]


def cell_settings(cell: Cell, options: TableOptions) -> CellSettings:
    """The settings of ``cell``; the user's ``--set`` items come last, so that they win."""
    named: dict[str, tuple[str, Any]] = {"seed": ("--seed", cell.seed)}
    if options.data_dir is not None:
        named["data_dir"] = ("--data-dir", str(options.data_dir))
    if options.max_epochs is not None:
        named["max_epochs"] = ("--max-epochs", options.max_epochs)
    sets = []
    if options.budget_minutes is not None:
        sets.append(f"max_minutes={options.budget_minutes:g}")
    if options.smoke:
        named["max_steps"] = ("--max-steps", SMOKE_STEPS)
        sets += SMOKE_SETS
    sets += options.sets
    flow_opts = flow_opts_by_flow(options.flow_opts, [cell.flow])[cell.flow]
    return CellSettings(named, sets, flow_opts)


def cell_train_args(cell: Cell, options: TableOptions) -> list[str]:
    """The ``vaeflow train`` arguments (after ``train``) that start ``cell`` afresh. No
    ``--device``: the pool places the cell (``CUDA_VISIBLE_DEVICES``) and its config keeps
    the device-neutral ``auto``, so that it may resume on any device."""
    s = cell_settings(cell, options)
    args = ["--dataset", cell.dataset, "--flow", cell.flow]
    for option, value in s.named.values():
        args += [option, str(value)]
    args += ["--out", str(cell.run_dir(options.runs_dir)), "--quiet"]
    for item in s.sets:
        args += ["--set", item]
    for item in s.flow_opts:
        args += ["--flow-opt", item]
    return args


def cell_config(cell: Cell, options: TableOptions) -> TrainConfig:
    """The config that ``cell``'s subprocess will resolve from :func:`cell_train_args` (the
    same layers, the same values read the same way); bad input raises a :class:`TableError`."""
    s = cell_settings(cell, options)
    overrides = {key: value for key, (_, value) in s.named.items()}
    try:
        overrides.update(parse_items(s.sets, "--set"))
        flow_options = parse_items(s.flow_opts, "--flow-opt")
        return resolve(cell.dataset, cell.flow, overrides, flow_options=flow_options)
    except ValueError as err:
        raise TableError(f"cell {cell.name}: {err}") from err


def paper_config(dataset: str, flow: str) -> dict[str, Any]:
    """The papers' settings of a cell, as a dict (what the report compares runs against)."""
    return resolve(dataset, flow).to_dict()


def cell_state(run_dir: Path) -> str:
    """``"done"`` (its figures in results.json), ``"partial"`` (a checkpoint to resume: also a
    run marked failed, which the resume trains on or evaluates again) or ``"new"``."""
    if Run(run_dir).finished:
        return "done"
    if (run_dir / CHECKPOINT).is_file():
        return "partial"
    return "new"


# --------------------------------------------------------------------------------------------
# Data availability
# --------------------------------------------------------------------------------------------


def missing_data(datasets: list[str], data_dir: str | None) -> dict[str, str]:
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


# --------------------------------------------------------------------------------------------
# The plan of a call, and its records
# --------------------------------------------------------------------------------------------


def _changed_keys(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The config keys whose values differ and change what a run computes."""
    return [
        key for key in sorted(set(saved) | set(wanted))
        if key not in NEUTRAL_KEYS and key != "seed" and saved.get(key) != wanted.get(key)
    ]


def smaller_budget(old: Any, new: Any) -> bool:
    """Whether budget value ``new`` is below ``old`` (None: no limit, the largest): a run that
    trained under ``old`` may already have passed ``new``, which no resume can take back. A
    value that is no number (a damaged config) counts as smaller: it is no budget to train on."""
    if new is None:
        return False
    return old is None or not (is_number(old) and is_number(new) and new >= old)


def config_diff(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for each setting that changes what a run computes; a budget
    below the saved one says so (it is why a resume cannot give it)."""
    out = []
    for key in _changed_keys(saved, wanted):
        old, new = saved.get(key), wanted.get(key)
        smaller = key in BUDGET_KEYS and smaller_budget(old, new)
        out.append(f"{key}: {old!r} -> {new!r}" + (" (a smaller budget)" if smaller else ""))
    return out


def larger_budget(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The budget keys that ``wanted`` raises (key -> new value) when a larger budget is all
    that differs from ``saved``, else None. Such a cell is no mismatch: ``vaeflow train
    --resume`` trains it on from its last checkpoint as the longer run would have."""
    changed = _changed_keys(saved, wanted)
    if not changed or not set(changed) <= BUDGET_KEYS:
        return None
    if any(smaller_budget(saved.get(key), wanted.get(key)) for key in changed):
        return None
    return {key: wanted.get(key) for key in changed}


@dataclass
class Plan:
    """What a call will do: the jobs to run, the cells left as they are, the data sets that
    cannot run here (with why), and warnings."""

    jobs: list[Job] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def grid_cells(options: TableOptions) -> list[Cell]:
    """Every cell asked for, data or not; FFJORD's first in each data set and seed (the
    slowest cells start first, so the grid ends sooner)."""
    flows = sorted(options.flows, key=lambda f: f != "ffjord")
    return [Cell(d, f, s) for s in options.seed_list for d in options.datasets for f in flows]


def check_cells(options: TableOptions) -> dict[Cell, dict[str, Any]]:
    """Every cell's config, resolved (and so checked: a :class:`TableError` names the first bad
    one) without the data: a bad ``--set`` is named before anything is downloaded, and also
    when no data set is there to run."""
    return {cell: cell_config(cell, options).to_dict() for cell in grid_cells(options)}


def plan_grid(
    options: TableOptions, missing: Mapping[str, str], configs: Mapping[Cell, dict[str, Any]]
) -> Plan:
    """The jobs of the grid, from every cell's config (:func:`check_cells`); the cells of
    ``missing`` data sets are listed in ``Plan.not_run``.

    A cell run before (done or partial) whose saved config differs from the wanted one only
    in a larger budget (:func:`larger_budget`) is resumed with it (mode ``"extend"``); any
    other difference, a smaller budget among them, is a mismatch (``options.on_mismatch``).
    """
    plan = Plan(not_run=dict(missing))
    mismatched = []
    for cell, wanted in configs.items():
        if cell.dataset in missing:
            continue
        run_dir = cell.run_dir(options.runs_dir)
        state = cell_state(run_dir)
        saved = read_json(run_dir / CONFIG) if state != "new" else None
        diff = config_diff(saved, wanted) if isinstance(saved, dict) else []
        budget = larger_budget(saved, wanted) if diff and isinstance(saved, dict) else None
        if budget is not None:  # a larger budget alone: no mismatch, the cell trains on
            diff, state = [], "extend"
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
        log = cell_file(run_dir, LOG_FILE)
        if state == "done":
            plan.skipped.append(cell)
        elif state == "partial":
            command = [*train, "--resume", str(run_dir), "--quiet"]
            plan.jobs.append(Job(cell.name, command, log, "resume", run_dir))
        elif state == "extend":  # done or partial: resumed with the new budget
            assert budget is not None
            command = [*train, "--resume", str(run_dir), *budget_options(budget), "--quiet"]
            plan.jobs.append(Job(cell.name, command, log, "extend", run_dir, budget=budget))
        else:
            args = cell_train_args(cell, options)
            mode, extra = ("restart", ["--overwrite"]) if state == "restart" else ("start", [])
            plan.jobs.append(Job(cell.name, [*train, *args, *extra], log, mode, run_dir))
    if mismatched:
        smaller = any("(a smaller budget)" in m for m in mismatched)
        raise TableError(
            "cells in " + str(options.runs_dir) + " were run with other settings than asked:\n  "
            + "\n  ".join(mismatched)
            + ("\nA cell cannot resume with a smaller budget than it was run with (it may have "
               "trained past it); a larger budget alone trains the cells on." if smaller else "")
            + "\nUse another --runs-dir, delete those cells, or pass --on-mismatch keep (keep "
            "their own settings) or --on-mismatch restart (train them afresh)."
        )
    return plan


def forget_old_runs(plan: Plan) -> None:
    """Before a cell restarts: its old attempts would mix into the new run's wall-clock (its
    old TensorBoard events go with ``--overwrite``, which clears the run's own files)."""
    for job in plan.jobs:
        if job.mode == "restart" and job.run_dir is not None:
            # `vaeflow train --overwrite` clears the run's own files; the grid's are beside it
            cell_file(job.run_dir, ATTEMPTS_FILE).unlink(missing_ok=True)


def record_attempt(result: JobResult) -> None:
    """Append one subprocess's record to its cell's ``seed<k>.attempts.json``."""
    if result.job.run_dir is None:
        return
    path = cell_file(result.job.run_dir, ATTEMPTS_FILE)
    attempts = read_json(path) or []
    attempts.append(
        {
            "started": result.started,
            "mode": result.job.mode,
            "device": result.job.device,
            "command": shlex.join(result.job.command),
            "returncode": result.returncode,
            "seconds": round(result.seconds, 3),
            "error": result.error,
        }
    )
    atomic_write_json(attempts, path)


def record_invocation(options: TableOptions, plan: Plan, placement: Placement) -> None:
    """Append this call to ``RUNS_DIR/grid.json`` (a report of the grid quotes it)."""
    path = Path(options.runs_dir) / GRID_FILE
    grid = read_json(path) or {"invocations": []}
    grid["invocations"].append(
        {
            "date": utc_now(),
            "command": shlex.join([*shlex.split(SCRIPT), *(options.argv or [])]),
            "devices": options.devices,
            "parallel": options.parallel,
            "per_device": options.per_device,
            "placed_on": list(placement.devices),
            "at_once": placement.parallel,
            "budget_minutes": options.budget_minutes,
            "max_epochs": options.max_epochs,
            "smoke": options.smoke,
            "stop_after_minutes": options.stop_after_minutes,
            "seeds": options.seed_list,
            "sets": options.sets,
            "flow_opts": options.flow_opts,
            "on_mismatch": options.on_mismatch,
            "jobs": [job.name for job in plan.jobs],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(grid, path)
