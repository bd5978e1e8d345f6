"""What ``experiments/table.py`` is asked to do: :class:`TableOptions`, their checks, and the
command line that asks for them again (``table_command``, printed by reports for the cells
still to run).

The grid's names and defaults live here too, so that every table module agrees on them.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from table_pool import Placement, parse_devices

from vaeflow.checks import InputError
from vaeflow.cli import parse_pairs
from vaeflow.data import DATASETS
from vaeflow.flows import FLOWS

__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_RUNS_DIR",
    "SMOKE_RUNS_DIR",
    "SMOKE_STEPS",
    "TABLE_DATASETS",
    "TABLE_FLOWS",
    "TableError",
    "TableOptions",
    "default_out",
    "default_runs_dir",
    "flow_opts_by_flow",
    "parse_items",
    "parse_seeds",
    "seeds_argument",
    "table_command",
]

TABLE_DATASETS = ("static_mnist", "omniglot", "freyfaces", "caltech")
TABLE_FLOWS = ("none", "planar", "iaf", "orthogonal", "householder", "triangular", "ffjord")
DEFAULT_SEEDS = 3
DEFAULT_RUNS_DIR = Path("runs/table")
DEFAULT_OUT = Path("results/table")
SMOKE_RUNS_DIR = Path("runs/table-smoke")
SMOKE_STEPS = 5
REPORT_BUDGET_MINUTES = 60.0  # in commands printed by a report of a grid that never ran
PROTOCOL_MAX_EPOCHS = 2000  # the papers' cap; early stopping ends the runs well before
SCRIPT = "python experiments/table.py"


class TableError(InputError):
    """Bad input to the table command (exit status 2); nothing was run."""


@dataclass
class TableOptions:
    """What ``experiments/table.py`` was asked to do (see its ``--help``).

    ``seeds`` None means the default (``DEFAULT_SEEDS`` seeds) when running and every seed found
    in the run directories for ``report_only``. ``flow_opts`` items are ``[FLOW:]KEY=VALUE``:
    without ``FLOW:`` they go to every flow of the grid. ``on_mismatch`` says what to do with a
    cell whose saved settings differ from the requested ones: ``"error"`` (stop before running
    anything), ``"keep"`` (keep its own settings: report it, or resume it when unfinished) or
    ``"restart"`` (train it afresh). ``devices``, ``parallel`` and ``per_device`` place the
    cells (the rule: :meth:`table_pool.Placement.of`); None means "not given".
    """

    datasets: list[str] = field(default_factory=lambda: list(TABLE_DATASETS))
    flows: list[str] = field(default_factory=lambda: list(TABLE_FLOWS))
    seeds: list[int] | None = None
    budget_minutes: float | None = None
    max_epochs: int | None = None
    devices: str = "auto"
    parallel: int | None = None
    per_device: int | None = None
    stop_after_minutes: float | None = None
    runs_dir: Path = DEFAULT_RUNS_DIR
    out: Path = DEFAULT_OUT
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
        if "device" in parse_items(self.sets, "--set"):
            raise TableError("the cells' device is chosen by --devices, not --set device=...")
        flow_opts_by_flow(self.flow_opts, self.flows)
        if not self.report_only:
            self.placement()

    def placement(self, cuda_count: int | None = None) -> Placement:
        """Where the cells run (``cuda_count``: see :func:`table_pool.parse_devices`)."""
        try:
            devices = parse_devices(self.devices, cuda_count)
            return Placement.of(devices, self.parallel, self.per_device)
        except InputError as err:
            raise TableError(str(err)) from err

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
            # --seeds 0 most likely means seed 0 alone, which a list writes as "0,"
            raise TableError(f"a seed count must be positive, got {values[0]}; for seed "
                             f"{values[0]} alone, write --seeds {values[0]},")
        return list(range(values[0]))
    return values


def seeds_argument(seeds: Sequence[int]) -> str:
    """The ``--seeds`` value that :func:`parse_seeds` reads back as ``seeds``: a count for
    ``0 .. n-1``, else a list; one seed ``k`` is ``k,`` (a bare ``k`` is a count, seeds 0 to
    k-1)."""
    seeds = list(seeds)
    if seeds == list(range(len(seeds))):
        return str(len(seeds))
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def parse_items(items: Sequence[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` items -> ``{KEY: VALUE}``, read exactly as ``vaeflow train`` reads them
    (:func:`vaeflow.cli.parse_pairs`), so that the table resolves a cell's config as the
    cell's own subprocess will."""
    try:
        return parse_pairs(items, option)
    except InputError as err:
        raise TableError(str(err)) from err


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


def default_runs_dir(options: TableOptions) -> Path:
    """``runs/table``, or ``runs/table-smoke`` for a smoke run."""
    return SMOKE_RUNS_DIR if options.smoke else DEFAULT_RUNS_DIR


def default_out(options: TableOptions) -> Path:
    """``results/table``; a smoke run's report stays out of ``results/``."""
    return SMOKE_RUNS_DIR / "report" if options.smoke else DEFAULT_OUT


def table_command(
    options: TableOptions,
    datasets: Sequence[str],
    download: bool,
    invocation: Mapping[str, Any] | None = None,
) -> str:
    """The ``experiments/table.py`` command that runs ``datasets`` with ``options``' grid.

    Without a budget in ``options`` (``--report-only``), the budget, placement, settings and
    ``--on-mismatch`` of the last ``invocation`` that ran cells are used, else
    ``REPORT_BUDGET_MINUTES``.
    """
    inv = invocation or {}
    minutes, epochs, smoke = options.budget_minutes, options.max_epochs, options.smoke
    devices, parallel, per_device = options.devices, options.parallel, options.per_device
    stop_after = options.stop_after_minutes
    sets, flow_opts = list(options.sets), list(options.flow_opts)
    on_mismatch = options.on_mismatch
    if minutes is None and epochs is None and not smoke:
        minutes, epochs, smoke = inv.get("budget_minutes"), inv.get("max_epochs"), inv.get("smoke")
        devices = inv.get("devices", devices)
        parallel, per_device = inv.get("parallel", parallel), inv.get("per_device", per_device)
        stop_after = inv.get("stop_after_minutes", stop_after)
        sets = sets or list(inv.get("sets", []))
        flow_opts = flow_opts or list(inv.get("flow_opts", []))
        on_mismatch = inv.get("on_mismatch", on_mismatch)
        if minutes is None and epochs is None and not smoke:
            minutes = REPORT_BUDGET_MINUTES
    parts = shlex.split(SCRIPT) + ["--datasets", *datasets]
    if list(options.flows) != list(TABLE_FLOWS):
        parts += ["--flows", *options.flows]
    seeds = options.seed_list if options.seeds is not None else inv.get("seeds", options.seed_list)
    parts += ["--seeds", seeds_argument(seeds)]
    if minutes is not None:
        parts += ["--budget-minutes", f"{minutes:g}"]
    if epochs is not None:
        parts += ["--max-epochs", str(epochs)]
    if smoke:
        parts += ["--smoke"]
    if devices not in (None, "auto"):
        parts += ["--devices", str(devices)]
    if parallel is not None:
        parts += ["--parallel", str(parallel)]
    if per_device is not None:
        parts += ["--per-device", str(per_device)]
    if stop_after is not None:
        parts += ["--stop-after", f"{stop_after:g}"]
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
    if on_mismatch != "error":
        # without it, the cells kept (or trained afresh) with other settings stop the command
        parts += ["--on-mismatch", on_mismatch]
    if download:
        parts += ["--download"]
    return shlex.join(parts)
