"""Learning curves of one or more runs against wall-clock time, as a PNG.

    python experiments/plot_run.py runs/ffjord-20min --out results/ffjord-20min.png
    python experiments/plot_run.py runs/mnist-planar runs/mnist-ffjord --out compare.png

The same figure as ``vaeflow compare RUN... --plot PNG``
(:func:`vaeflow.plots.plot_learning_curves`, reading each run's history through
:mod:`vaeflow.runs`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vaeflow.checks import InputError
from vaeflow.plots import plot_learning_curves


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("learning_curve.png"))
    args = parser.parse_args(argv)
    try:
        path, skipped = plot_learning_curves(args.run_dirs, args.out)
    except InputError as err:
        print(f"plot_run: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    for run in skipped:
        print(f"left out {run.path}: no epoch of it has finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
