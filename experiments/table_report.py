"""The report of the grid: ``table.md`` and ``table.csv`` with the paper's numbers beside ours,
and the plots (:mod:`table_plots`), all rebuilt from the run directories alone.

- ``table.md``: rows flows, columns data sets, cells "ours mean ± std (seeds) / paper", with the
  machine, budget, commit and date, the cells not run (with the command that runs them) and an
  honest note when the budget is far below the papers' protocol;
- ``table.csv``: one row per data set x flow (``CSV_FIELDS``).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from table_grid import (
    BUDGET_KEYS,
    GRID_FILE,
    LOG_FILE,
    NEUTRAL_KEYS,
    cell_file,
    how_to_get,
    paper_config,
    read_json,
)
from table_options import TableOptions, table_command
from table_plots import PLOT_MISSING, plot_curves, sample_grids
from table_pool import utc_now
from table_records import (
    DATASET_LABELS,
    FLOW_LABELS,
    NOT_COMPARABLE,
    PAPER_ROW,
    PAPER_SOURCE,
    CellRecord,
    Summary,
    paper_value,
    summarize,
)

from vaeflow.data import get_spec

__all__ = ["CSV_FIELDS", "csv_rows", "render_markdown", "write_report"]

CSV_FIELDS = [
    "dataset", "flow", "unit", "mean", "std", "n", "seeds", "paper", "paper_row", "status",
    "budget", "epochs_mean", "train_seconds_mean", "cell_seconds_mean", "nfe_forward_mean",
    "nfe_backward_mean", "nll_is_mean", "device", "commit",
]  # fmt: skip


def _fmt(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:.{3 if unit == 'bits/dim' else 2}f}"


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _joined(values: Sequence[str], empty: str = "unknown") -> str:
    unique = sorted({v for v in values if v})
    return ", ".join(unique) if unique else empty


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell_text(s: Summary, missing: Mapping[str, str]) -> str:
    paper = paper_value(s.dataset, s.flow)
    paper_text = f"{paper:.2f}" if paper is not None else "—"
    counts = s.counts()
    others = [f"{n} {k}" for k, n in sorted(counts.items()) if k != "done"]
    if s.n:
        ours = _fmt(s.mean, s.unit)
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
    """Settings of the runs that differ from the papers' (vaeflow/configs), budget aside."""
    found: dict[str, set[str]] = {}
    bases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.config is None:
            continue
        key = (r.cell.dataset, r.cell.flow)
        if key not in bases:
            bases[key] = paper_config(*key)
        base = bases[key]
        for name in sorted(set(r.config) | set(base)):
            if name in NEUTRAL_KEYS or name in BUDGET_KEYS or name == "seed":
                continue
            mine, theirs = r.config.get(name), base.get(name)
            if name == "flow_kwargs" and isinstance(mine, dict) and isinstance(theirs, dict):
                for k in sorted(set(mine) | set(theirs)):
                    if mine.get(k) != theirs.get(k):
                        found.setdefault(f"{r.cell.flow} {k}", set()).add(json.dumps(mine.get(k)))
            elif mine != theirs:
                found.setdefault(name, set()).add(json.dumps(mine))
    return [f"{k}={'/'.join(sorted(v))}" for k, v in sorted(found.items())]


def _budget_note(done: Sequence[CellRecord]) -> str | None:
    """How far the cells that stopped on their budget are from the papers' protocol."""
    early = [r for r in done if r.stop_reason.startswith("early stopping")]
    if len(early) == len(done):
        return None
    epochs = [r.epochs for r in done if r.epochs is not None]
    warmups = {int(r.config.get("warmup_epochs", 0)) for r in done if r.config}
    patience = {int(r.config.get("early_stopping_epochs", 0)) for r in done if r.config}
    if not epochs:
        span = "?"
    elif max(epochs) == 0:  # a --max-steps budget inside the first epoch
        span = "none whole: every cell stopped inside its first epoch"
    else:
        span = str(epochs[0]) if min(epochs) == max(epochs) else f"{min(epochs)}–{max(epochs)}"
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
    return note + (
        "Read these numbers as what each flow reaches under the same budget on this "
        "machine, not as a reproduction of the paper's numbers."
    )


def _protocol_notes(records: Sequence[CellRecord], options: TableOptions) -> list[str]:
    """Honest notes on how far the runs are from the papers' protocol."""
    done = [r for r in records if r.status == "done"]
    if not done:
        return []
    notes = []
    smoke = [r for r in done if r.config and r.config.get("max_steps") is not None]
    if smoke:
        notes.append(
            f"**Smoke run**: {len(smoke)} of {len(done)} finished cells were stopped after a few "
            "optimizer steps (`max_steps`). Their numbers only show that the pipeline runs; they "
            "are NOT comparable with the paper."
        )
    budget = _budget_note(done)
    if budget:
        notes.append(budget)
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
            "Settings that differ from the papers' (`vaeflow/configs/`): "
            + ", ".join(f"`{d}`" for d in deviations)
            + "."
        )
    for d in options.datasets:
        if d in NOT_COMPARABLE:
            notes.append(f"{DATASET_LABELS.get(d, d)}: {NOT_COMPARABLE[d]}.")
    return notes


def last_invocation(runs_dir: Path) -> dict[str, Any]:
    """The record of the last call that ran cells of the grid in ``runs_dir`` (or ``{}``)."""
    grid = read_json(Path(runs_dir) / GRID_FILE)
    if isinstance(grid, dict) and grid.get("invocations"):
        return grid["invocations"][-1]
    return {}


def _header_lines(records: Sequence[CellRecord], options: TableOptions,
                  invocation: Mapping[str, Any]) -> list[str]:
    """The title and the provenance of ``table.md``."""
    started = [r for r in records if r.status in ("done", "partial", "failed")]
    done = [r for r in records if r.status == "done"]
    seeds = sorted({r.cell.seed for r in records})
    # "at_once" since the grid placed cells on devices; older records only hold "parallel"
    at_once = invocation.get("at_once", invocation.get("parallel"))
    placed = set(invocation.get("placed_on") or [])  # "cpu,cpu" is one device shared
    sharing = ""
    if at_once and at_once > max(len(placed), 1):
        where = f"{len(placed)} device(s)" if len(placed) > 1 else "it"
        sharing = (f"; up to {at_once} cells ran at once on {where}, so a cell's wall-clock "
                   "includes sharing a device")
    lines = ["# Test negative ELBO of VAEs with flow posteriors (FFJORD paper, Table 3)", ""]
    lines += [
        f"- Built: {utc_now()} from the run directories in `{options.runs_dir}`.",
        f"- Machine: {_joined([r.device_name for r in started])}{sharing}",
        f"- Budget per cell: {_joined([r.budget for r in started], 'none yet')}"
        + (" (minutes: wall-clock of training and validation, summed over resumes; the final "
           "evaluation comes on top)." if any(" min" in r.budget for r in started) else "."),
        f"- Commit(s) that trained the cells: {_joined([r.commit for r in done])}.",
        f"- Seeds: {', '.join(map(str, seeds)) if seeds else 'none'}; {len(done)} of "
        f"{len(records)} cells finished.",
    ]
    if invocation.get("command"):
        # (a --report-only call, which trains nothing, is not recorded: this is the training one)
        lines.append(f"- Last command that trained cells: `{invocation['command']}`")
    return lines + [
        "",
        f"Cells: ours, test NELBO mean ± sample std over seeds (number of seeds) / the paper "
        f"({PAPER_SOURCE}). Nats, except Frey Faces in bits/dim; lower is better. The test "
        "NELBO uses the exact trace for FFJORD and one posterior sample per test point.",
        "",
    ]


def _plot_lines(records: Sequence[CellRecord], options: TableOptions,
                images: Mapping[tuple[str, str], str], curves: Mapping[str, str],
                plot_note: str) -> list[str]:
    """The "Plots" section of ``table.md``."""
    if not (curves or images or plot_note):
        return []
    lines = ["## Plots", ""] + ([plot_note, ""] if plot_note else [])
    for d in options.datasets:
        label = DATASET_LABELS.get(d, d)
        if d in curves:
            lines += [f"Validation NELBO against wall-clock, {label}:", "",
                      f"![{d}]({curves[d]})", ""]
        elif not plot_note and any(r.cell.dataset == d and r.status == "done" for r in records):
            lines += [f"No validation curve for {label}: no cell finished an epoch.", ""]
    for d in options.datasets:
        row = [(f, images[(d, f)]) for f in options.flows if (d, f) in images]
        if row:
            lines += [f"Samples (best model of the lowest finished seed), "
                      f"{DATASET_LABELS.get(d, d)}:", ""]
            lines += _md_table([FLOW_LABELS.get(f, f) for f, _ in row],
                               [[f"![{d} {f}]({p})" for f, p in row]])
            lines.append("")
    return lines


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
    invocation = last_invocation(options.runs_dir)
    lines = _header_lines(records, options, invocation)
    header = ["flow", *[DATASET_LABELS.get(d, d) for d in options.datasets]]
    rows = [[FLOW_LABELS.get(f, f), *[_cell_text(summaries[(d, f)], missing)
                                      for d in options.datasets]] for f in options.flows]
    lines += _md_table(header, rows) + [""]
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
            log = cell_file(r.cell.run_dir(options.runs_dir), LOG_FILE)
            detail = f": {r.error}" if r.error else ""
            lines.append(f"- {r.cell.name}: {r.status}{detail} (log: `{log}`)")
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
    lines += _plot_lines(records, options, images, curves, plot_note)
    return "\n".join(lines).rstrip() + "\n"


def _per_cell_lines(summaries: Mapping[tuple[str, str], Summary]) -> list[str]:
    """The "Per cell" section of ``table.md``: means over the cells of each data set x flow."""
    header = [
        "data set", "flow", "seeds done", "epochs", "train+valid wall-clock (min)",
        "cell wall-clock (min)", "stop", "FFJORD NFE per iteration (forward / adjoint)",
        "test NLL (IS)",
    ]  # fmt: skip
    rows = []
    for (d, f), s in summaries.items():
        if not s.records:
            continue
        epochs = s.mean_of("epochs")
        train_s, cell_s = s.mean_of("train_seconds"), s.mean_of("cell_seconds")
        fwd, bwd = s.mean_of("nfe_forward", s.records), s.mean_of("nfe_backward", s.records)
        rows.append([
            d,
            f,
            f"{s.n}/{len(s.records)}",
            "" if epochs is None else f"{epochs:.0f}",
            "" if train_s is None else f"{train_s / 60:.1f}",
            "" if cell_s is None else f"{cell_s / 60:.1f}",
            _joined([r.stop_reason for r in s.done], ""),
            f"{fwd:.0f} / {bwd:.0f}" if fwd is not None and bwd is not None else "",
            _fmt(s.mean_of("nll_is"), s.unit),
        ])
    return ["## Per cell", "", *_md_table(header, rows), "",
            "Wall-clock: training and validation as the runs count it (summed over resumes), "
            "and the whole cell with startup and the final evaluation, as the table command "
            "timed its subprocesses. NFE: function evaluations per training iteration of "
            "FFJORD's solves, summed over blocks (the runs' `results.json`: "
            "`train_nfe_forward_mean`, `train_nfe_backward_mean`; the backward count is 0 "
            "without the adjoint method).", ""]


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
        paper = paper_value(d, f)
        rows.append({
            "dataset": d,
            "flow": f,
            "unit": s.unit,
            "mean": _num(s.mean),
            "std": _num(s.std),
            "n": s.n,
            "seeds": " ".join(str(r.cell.seed) for r in s.done),
            "paper": "" if paper is None else f"{paper:.2f}",
            "paper_row": PAPER_ROW.get(f, "") if paper is not None else "",
            "status": status,
            "budget": _joined([r.budget for r in s.records], ""),
            "epochs_mean": _num(s.mean_of("epochs"), 1),
            "train_seconds_mean": _num(s.mean_of("train_seconds"), 1),
            "cell_seconds_mean": _num(s.mean_of("cell_seconds"), 1),
            "nfe_forward_mean": _num(s.mean_of("nfe_forward", s.records), 1),
            "nfe_backward_mean": _num(s.mean_of("nfe_backward", s.records), 1),
            "nll_is_mean": _num(s.mean_of("nll_is")),
            "device": _joined([r.device_name for r in s.records], ""),
            "commit": _joined([r.commit for r in s.done], ""),
        })
    return rows


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
