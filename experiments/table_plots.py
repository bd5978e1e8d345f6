"""The plots of the grid's report, from the run directories through :mod:`vaeflow.runs`:

- ``nelbo_vs_time_<dataset>.png``: validation NELBO against training wall-clock per flow, one
  line per seed, from each run's history (matplotlib, optional: skipped with a message when
  it is not installed);
- ``samples_<dataset>_<flow>.png``: 64 samples of the best model of the lowest finished seed
  (:func:`vaeflow.runs.load_model`; torchvision writes the grid).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from table_options import TableOptions
from table_records import DATASET_LABELS, FLOW_LABELS, CellRecord, paper_value, unit_of

from vaeflow.runs import BEST, RunError, load_model

__all__ = ["PLOT_MISSING", "plot_curves", "sample_grids"]

PLOT_MISSING = (
    "matplotlib is not installed, so the NELBO-against-wall-clock plots were skipped "
    "(pip install 'vaeflow[plot]' or pip install matplotlib, then rerun with --report-only)."
)


def _figure_class() -> Any:
    # matplotlib.figure.Figure needs no pyplot and no GUI backend; None when not installed
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
        # the early epochs sit far above the rest: cut them off at the curves' medians
        medians = [statistics.median(v for _, v in r.history) for r in curves]
        low, high = min(ys + papers), max(medians + papers)
        pad = max(0.02 * abs(high), 0.1 * (high - low), 1e-3)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("training wall-clock (minutes)")
        ax.set_ylabel(f"validation NELBO ({unit_of(d)})")
        ax.set_title(f"{DATASET_LABELS.get(d, d)} (dotted: paper, test)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        name = f"nelbo_vs_time_{d}.png"
        fig.savefig(out / name)
        written[d] = name
    return written


def sample_grids(records: Sequence[CellRecord], options: TableOptions,
                 out: Path, n: int = 64) -> dict[tuple[str, str], str]:
    """``samples_<dataset>_<flow>.png``: ``n`` samples of the best model of the lowest finished
    seed of each data set x flow (decoder means at z ~ N(0, I), a fixed generator)."""
    from torchvision.utils import save_image

    written = {}
    for d in options.datasets:
        for f in options.flows:
            done = sorted((r for r in records if r.cell.dataset == d and r.cell.flow == f
                           and r.status == "done"), key=lambda r: r.cell.seed)
            best = [r for r in done if (r.cell.run_dir(options.runs_dir) / BEST).is_file()]
            if not best:
                continue
            record = best[0]
            try:
                model, _ = load_model(record.cell.run_dir(options.runs_dir), "best", "cpu")
                model.eval()
                with torch.no_grad():
                    samples = model.sample(n, generator=torch.Generator().manual_seed(0))
            except (RunError, RuntimeError) as err:  # one bad cell must not stop the report
                print(f"table: warning: no samples for {record.cell.name}: {err}",
                      file=sys.stderr)
                continue
            name = f"samples_{d}_{f}.png"
            save_image(samples.float().clamp(0, 1), out / name, nrow=8, padding=2, pad_value=1.0)
            written[(d, f)] = name
    return written
