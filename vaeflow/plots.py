"""Pictures of runs as PNG files, so that a run can be looked at without TensorBoard:

- ``samples.png``: 64 images decoded from the prior;
- ``reconstructions.png``: test images (odd columns) beside their reconstructions (even);
- ``learning_curve.png``: training and validation NELBO against steps and against wall-clock;

and :func:`plot_learning_curves`, the curves of several runs on one figure (``vaeflow
compare``). Image grids need only torchvision; the curves need matplotlib (drawn off-screen).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import InputError
from vaeflow.data import figure_text, get_spec
from vaeflow.rng import fork_rng
from vaeflow.runs import Run
from vaeflow.vae import VAE, eval_mode

__all__ = [
    "SAMPLES",
    "RECONSTRUCTIONS",
    "LEARNING_CURVE",
    "image_grids",
    "write_run_pictures",
    "plot_learning_curves",
    "check_figure_path",
]

SAMPLES = "samples.png"
RECONSTRUCTIONS = "reconstructions.png"
LEARNING_CURVE = "learning_curve.png"


def image_grids(model: VAE, x: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(samples [3, H', W'], pairs [3, H'', W''])`` grids: 64 prior samples, and each image of
    ``x [B, C, H, W]`` beside its reconstruction; under a fixed seed, in eval mode (exact trace)."""
    from torchvision.utils import make_grid

    with fork_rng(x.device, seed), eval_mode(model), torch.no_grad():
        samples = model.sample(64)
        recon = model.reconstruct(x)
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    return (
        make_grid(samples.float().cpu(), nrow=8, pad_value=0.5),
        make_grid(pairs.float().cpu(), nrow=8, pad_value=0.5),
    )


def write_run_pictures(
    run_dir: str | os.PathLike[str], grids: tuple[Tensor, Tensor] | None = None
) -> list[Path]:
    """Write the run's PNGs: ``grids`` (the ``(samples, pairs)`` of :func:`image_grids`) when
    given, and the learning curve when an epoch has finished and matplotlib is installed.
    Returns the paths written."""
    from torchvision.utils import save_image

    run = Run(Path(run_dir))
    written: list[Path] = []
    if grids is not None:
        for grid, name in zip(grids, (SAMPLES, RECONSTRUCTIONS), strict=True):
            save_image(grid, run.path / name)
            written.append(run.path / name)
    if run.history and _has_matplotlib():
        path = run.path / LEARNING_CURVE
        _learning_curve(run, path)
        written.append(path)
    return written


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    return plt


def _label(run: Run) -> str:
    config = run.config
    return f"{config.dataset} / {config.flow} ({run.name})"


def _unit(run: Run) -> tuple[str, float]:
    """The unit of the run's data set (:attr:`DatasetSpec.unit`) and the factor from nats."""
    spec = get_spec(run.config.dataset)
    return spec.unit, spec.in_unit(1.0)


def _curves(run: Run) -> tuple[list[float], list[float], list[float], list[float], float | None]:
    """Steps, minutes, validation and training NELBO per finished epoch, and the test NELBO
    (None before the run finished), in the run's unit (:func:`_unit`)."""
    _, scale = _unit(run)
    history, results = run.history, run.results
    steps = [float(h["step"]) for h in history]
    minutes = [h["seconds"] / 60 for h in history]
    valid = [h["valid_nelbo"] * scale for h in history]
    train = [h.get("train_nelbo", math.nan) * scale for h in history]
    test = None if results is None else results["test_nelbo"] * scale
    return steps, minutes, valid, train, test


def tested_record(history: Sequence[Mapping[str, Any]], results: Mapping[str, Any]) -> int | None:
    """The index in ``history`` of the validation of the model that ``results`` measure: the
    best one (``best_epoch``; a time stop's partial epoch, resumed, is recorded twice, so also
    its figure ``best_valid_nelbo``), the last one for ``vaeflow eval --checkpoint last``; None
    when no record is of that model (no epoch validated, or a last model trained past the last
    validation by a --max-steps stop)."""
    if results.get("checkpoint") == "last":
        last = len(history) - 1
        return last if history and history[-1]["step"] >= (results.get("steps") or 0) else None
    of_best = [i for i, h in enumerate(history) if h["epoch"] == results.get("best_epoch")]
    best = results.get("best_valid_nelbo")
    return next((i for i in of_best if history[i]["valid_nelbo"] == best),
                of_best[-1] if of_best else None)


def _test_star(ax: Any, run: Run, xs: Sequence[float], test: float, unit: str,
               **style: Any) -> None:
    """The test NELBO as a star at ``xs`` (one per history record) of the model it measures:
    with early stopping, epochs before the end."""
    at = tested_record(run.history, run.results or {})
    of = "" if at is None else f", the model of epoch {run.history[at]['epoch']}"
    ax.scatter([xs[-1 if at is None else at]], [test], marker="*", zorder=3,
               label=f"test {figure_text(test, unit)}{of}", **style)


def _learning_curve(run: Run, path: Path) -> None:
    plt = _pyplot()
    steps, minutes, valid, train, test = _curves(run)
    unit, _ = _unit(run)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, xs, xlabel in ((axes[0], steps, "optimizer steps"),
                           (axes[1], minutes, "wall-clock minutes (training and validation)")):
        # a mark per epoch, as the validation's: a dashed line of one point draws nothing
        ax.plot(xs, train, "--x", markersize=3, label="train (epoch mean)", alpha=0.7)
        ax.plot(xs, valid, "-o", markersize=3, label="validation")
        # a time stop's validation of the epoch it cut short: not an epoch's end like the rest
        partial = [i for i, h in enumerate(run.history) if h.get("partial")]
        if partial:
            ax.scatter([xs[i] for i in partial], [valid[i] for i in partial], marker="o", s=40,
                       facecolors="none", edgecolors="r", zorder=3,
                       label="validation inside an epoch (time budget)")
        if test is not None:
            _test_star(ax, run, xs, test, unit, s=90, color="k")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"negative ELBO ({unit})")
    axes[0].legend(fontsize=8)
    _zoom(axes[0], valid + train, [] if test is None else [test])
    fig.suptitle(_label(run))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _zoom(ax: Any, values: Sequence[float], shown: Sequence[float] = ()) -> None:
    """Leave out the first epochs' very high losses of ``values``, so that the part that
    matters is legible; the figures ``shown`` (the test stars) stay inside the axes."""
    finite = sorted(v for v in values if math.isfinite(v))
    if len(finite) >= 4:
        low, high = finite[0], finite[int(0.9 * (len(finite) - 1))]
        low, high = min([low, *shown]), max([high, *shown])
        margin = 0.1 * max(high - low, 1.0)
        ax.set_ylim(low - margin, high + margin)


def check_figure_path(out: str | os.PathLike[str]) -> Path:
    """``out`` as a figure's path: its suffix must name a format matplotlib writes (``.png``,
    ``.pdf``, ``.svg``, ...; none: PNG). Checked before any work, so that a typo is named at
    once rather than as matplotlib's traceback after the curves are drawn.

    Raises:
        InputError: the suffix names no such format.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(out)
    suffix = path.suffix.lower().lstrip(".")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if suffix and suffix not in formats:
        raise InputError(f"cannot write a figure as {path.name!r}: its suffix .{suffix} is not "
                         f"a format matplotlib writes ({', '.join(formats)})")
    return path


def plot_learning_curves(
    run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> tuple[Path, list[Run]]:
    """Validation (solid, a dot per epoch) and training (dashed) NELBO of each run against
    wall-clock minutes on one figure, the test NELBO of a finished run as a star, in the unit of
    the runs' data sets (bits/dim for Frey Faces, else nats). Returns the PNG's path and the runs
    left out because no epoch of theirs has finished. Needs matplotlib.

    Raises:
        InputError: when no run has a finished epoch, the runs' data sets are reported in
            different units (nats and bits/dim cannot share an axis), or ``out`` names a format
            that matplotlib does not write (:func:`check_figure_path`).
    """
    out = check_figure_path(out)
    runs = [Run(Path(d)) for d in run_dirs]
    units = {run.path: _unit(run)[0] for run in runs}
    if len(set(units.values())) > 1:
        listed = "; ".join(f"{path} ({unit})" for path, unit in units.items())
        raise InputError(f"these runs' figures are in different units and cannot share an axis: "
                         f"{listed}; plot the runs of each unit apart")
    curves = [(run, _curves(run)) for run in runs]
    skipped = [run for run, c in curves if not c[0]]
    curves = [(run, c) for run, c in curves if c[0]]  # runs with a finished epoch
    if not curves:
        raise InputError("no epoch has finished in any of these runs yet: nothing to plot")
    unit = units[curves[0][0].path]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values: list[float] = []
    stars: list[float] = []
    for run, (_, minutes, valid, train, test) in curves:
        values += valid
        stars += [] if test is None else [test]
        # a dot per epoch, so that a run of one epoch shows too
        (line,) = ax.plot(minutes, valid, "-o", markersize=2.5, label=f"{_label(run)} valid")
        ax.plot(minutes, train, linestyle="--", marker="x", markersize=2.5,
                color=line.get_color(), alpha=0.6)
        if test is not None:
            _test_star(ax, run, minutes, test, unit, s=80, color=line.get_color())
    ax.set_xlabel("wall-clock minutes (training and validation)")
    ax.set_ylabel(f"negative ELBO ({unit})")
    ax.set_title("validation (solid), training (dashed), test (star)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _zoom(ax, values, stars)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out, skipped
