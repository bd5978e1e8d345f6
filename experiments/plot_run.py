"""Learning curves of one or more runs against wall-clock time, as a PNG.

    python experiments/plot_run.py runs/ffjord-20min --out results/ffjord-20min.png
    python experiments/plot_run.py runs/mnist-planar runs/mnist-ffjord --out compare.png

Each run directory's ``checkpoint.pt`` holds the per-epoch history (cumulative training and
validation seconds, validation NELBO, training NELBO); its ``results.json``, when present, adds
the final test NELBO as a marker. Needs matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def read_history(run_dir: Path) -> tuple[list[dict[str, float]], dict[str, Any] | None, str]:
    """``(history, results or None, label)`` of a run directory."""
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no checkpoint.pt (is it a vaeflow run?)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    config = ckpt["config"]
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    label = f"{config['dataset']} / {config['flow']} ({run_dir.name})"
    return list(ckpt["progress"]["history"]), results, label


def plot_runs(run_dirs: Sequence[Path], out: Path) -> Path:
    """Plot validation (solid) and training (dashed) NELBO of each run against wall-clock
    minutes; the test NELBO of a finished run is a marker at its last time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir in run_dirs:
        history, results, label = read_history(Path(run_dir))
        if not history:
            print(f"{run_dir}: no epoch finished yet, nothing to plot", file=sys.stderr)
            continue
        minutes = [h["seconds"] / 60 for h in history]
        (line,) = ax.plot(minutes, [h["valid_nelbo"] for h in history], label=f"{label} valid")
        train = [h.get("train_nelbo", math.nan) for h in history]
        ax.plot(minutes, train, linestyle="--", color=line.get_color(), alpha=0.6)
        if results is not None:
            ax.scatter([minutes[-1]], [results["test_nelbo"]], color=line.get_color(),
                       marker="*", s=80, zorder=3, label=f"test {results['test_nelbo']:.2f}")
    ax.set_xlabel("wall-clock minutes (training and validation)")
    ax.set_ylabel("negative ELBO (nats)")
    ax.set_title("validation (solid), training (dashed), test (star)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("learning_curve.png"))
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.run_dirs, args.out)
    except FileNotFoundError as err:
        print(f"plot_run: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"plot_run: error: {err}; install matplotlib: pip install -e '.[plot]'",
              file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
