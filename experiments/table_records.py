"""What the grid's run directories say, read through :mod:`vaeflow.runs` only, and the paper's
numbers they are set beside.

One :class:`CellRecord` per cell (its status, test NELBO, budget, wall-clock, NFE, history),
grouped into one :class:`Summary` per data set x flow. The NFE of FFJORD comes from the run's
``results.json`` (``train_nfe_forward_mean``, ``train_nfe_backward_mean``); for a cell not yet
finished, from its per-epoch history.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from table_grid import ATTEMPTS_FILE, Cell, cell_file, cell_state, read_json
from table_options import PROTOCOL_MAX_EPOCHS, TableOptions
from table_pool import INTERRUPTED

from vaeflow.data import get_spec
from vaeflow.runs import Run, RunError, epochs_in

__all__ = [
    "DATASET_LABELS",
    "FLOW_LABELS",
    "NOT_COMPARABLE",
    "PAPER",
    "PAPER_ROW",
    "PAPER_SOURCE",
    "CellRecord",
    "Summary",
    "budget_label",
    "collect",
    "paper_value",
    "read_cell",
    "summarize",
    "unit_of",
]

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


def paper_value(dataset: str, flow: str) -> float | None:
    """The paper's test NELBO of ``flow`` on ``dataset`` (nats; Frey Faces bits/dim)."""
    return PAPER.get(PAPER_ROW.get(flow, ""), {}).get(dataset)


def unit_of(dataset: str) -> str:
    """The data set's unit: bits/dim for Frey Faces, else nats."""
    return get_spec(dataset).unit


def to_unit(nats: float, dataset: str) -> float:
    """A NELBO in nats in the data set's unit (bits per dimension for Frey Faces)."""
    return get_spec(dataset).in_unit(nats)


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


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


def seeds_found(runs_dir: Path, dataset: str, flow: str) -> list[int]:
    """The seeds that have a folder in ``runs_dir`` (a cell that failed before writing its
    config is one too)."""
    folder = Path(runs_dir) / dataset / flow
    if not folder.is_dir():
        return []
    seeds = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"seed(\d+)", p.name))]
    return sorted(seeds)


_T = TypeVar("_T")


def _read(run: Run, read: Callable[[Run], _T], default: _T) -> _T:
    """``read(run)``; a damaged file is a warning, not the end of the report."""
    try:
        return read(run)
    except RunError as err:
        print(f"table: warning: {err}", file=sys.stderr)
        return default


def read_cell(cell: Cell, runs_dir: Path) -> CellRecord:
    """The :class:`CellRecord` of ``cell`` from its run directory."""
    run = Run(cell.run_dir(runs_dir))
    record = CellRecord(cell, "pending", unit_of(cell.dataset))
    attempts = read_json(cell_file(run.path, ATTEMPTS_FILE)) or []
    if attempts:
        record.cell_seconds = sum(float(a.get("seconds", 0.0)) for a in attempts)
    is_run = run.is_run
    config = _read(run, lambda r: r.config.to_dict(), None) if is_run else None
    if config is not None:
        record.config = config
        record.budget = budget_label(config)
    history = _read(run, lambda r: r.history, []) if is_run else []
    record.history = [
        (float(h["seconds"]), to_unit(float(h["valid_nelbo"]), cell.dataset))
        for h in history
        if "seconds" in h and "valid_nelbo" in h
    ]
    if history:
        record.train_seconds = float(history[-1].get("seconds", 0.0))
        record.steps = int(history[-1].get("step", 0))
        # a time stop's partial epoch is recorded again when it ends: its own means count once
        whole = [h for h in history if not h.get("partial")]
        record.epochs = epochs_in(history)
        # until results.json holds the run's means: the mean of the epochs' means
        record.nfe_forward = mean([h.get("train_nfe_forward") for h in whole])
        record.nfe_backward = mean([h.get("train_nfe_backward") for h in whole])
    timing = _read(run, lambda r: r.timing, None) if is_run else None
    if isinstance(timing, dict):
        record.device_name = str(timing.get("device_name", ""))
        record.commit = str(timing.get("commit", ""))
        record.train_seconds = float(timing.get("train_seconds", record.train_seconds or 0.0))
    results = _read(run, lambda r: r.results, None) if is_run else None
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
        record.nfe_forward = results.get("train_nfe_forward_mean")
        record.nfe_backward = results.get("train_nfe_backward_mean")
        return record
    last = attempts[-1] if attempts else None
    if last is not None and last.get("returncode") not in (0, *INTERRUPTED):
        record.status = "failed"
        record.error = str(last.get("error", ""))
    elif history or cell_state(run.path) == "partial":
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
                seeds = seeds_found(options.runs_dir, dataset, flow)
            for seed in seeds:
                record = read_cell(Cell(dataset, flow, seed), options.runs_dir)
                if record.status == "pending" and dataset in missing:
                    record.status = "no data"
                records.append(record)
    return records


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
        """The mean of attribute ``name`` over ``records`` (default: the done ones)."""
        return mean([getattr(r, name) for r in (self.done if records is None else records)])

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
