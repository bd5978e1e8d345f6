"""The FFJORD paper's Table 3 in one command: every flow on every data set, several seeds.

    # the GPU run: 3 seeds, 60 minutes of training per cell, 7 cells at once; each command
    # stops after 9 minutes (exit status 3) and the same command again goes on from there
    python experiments/table.py --data-dir ../shared/data --budget-minutes 60 --seeds 3 \
        --parallel 7 --stop-after 9
    python experiments/table.py --report-only --data-dir ../shared/data   # rebuild the report
    python experiments/table.py --smoke --datasets caltech --flows none planar   # pipeline check

Each cell (data set x flow x seed) is ``vaeflow train`` with the papers' settings of
``experiments/configs/<dataset>.toml`` in ``RUNS_DIR/<dataset>/<flow>/seed<k>``. The report
(``table.md``, ``table.csv``, PNG plots) goes to ``--out``. See ``results/table/README.md``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from table_lib import (
    DEFAULT_OUT,
    SMOKE_RUNS_DIR,
    SMOKE_STEPS,
    TABLE_DATASETS,
    TABLE_FLOWS,
    TableError,
    TableOptions,
    default_out,
    default_runs_dir,
    parse_seeds,
    run_table,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="experiments/table.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--datasets", nargs="+", default=list(TABLE_DATASETS), metavar="NAME",
                      help=f"data sets (default: {' '.join(TABLE_DATASETS)})")
    grid.add_argument("--flows", nargs="+", default=list(TABLE_FLOWS), metavar="NAME",
                      help=f"flows (default: {' '.join(TABLE_FLOWS)})")
    grid.add_argument("--seeds", nargs="+", metavar="N",
                      help="a count (3: seeds 0 1 2, the default) or a list (0,1,4 or 0 1 4; "
                           "one seed k: k,); for --report-only the default is every seed found")
    budget = parser.add_argument_group("the budget per cell (one of them)")
    budget.add_argument("--budget-minutes", type=float, metavar="M",
                        help="wall-clock minutes of training and validation per cell, summed "
                             "over resumes (then the best model is evaluated)")
    budget.add_argument("--max-epochs", type=int, metavar="N",
                        help="epochs per cell (2000 with early stopping is the papers' protocol)")
    budget.add_argument("--smoke", action="store_true",
                        help=f"a pipeline check: {SMOKE_STEPS} steps per cell, small evaluation, "
                             f"runs in {SMOKE_RUNS_DIR} unless --runs-dir; NOT comparable")
    run = parser.add_argument_group("running")
    run.add_argument("--parallel", type=int, default=1, metavar="N",
                     help="cells that run at once (subprocesses sharing the device; default 1)")
    run.add_argument("--stop-after", type=float, metavar="MIN",
                     help="stop this command after MIN minutes: no new cell starts and the "
                          "running ones checkpoint and stop (exit status 3); the same command "
                          "goes on later")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--data-dir", help="data directory (default $VAEFLOW_DATA or a user cache)")
    run.add_argument("--download", action="store_true",
                     help="download missing data sets first (default: show them as not run)")
    run.add_argument("--runs-dir", type=Path,
                     help="where the cells' run directories go (default runs/table)")
    run.add_argument("--out", type=Path,
                     help=f"where the report goes (default {DEFAULT_OUT}; with --smoke "
                          f"{SMOKE_RUNS_DIR / 'report'})")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a TrainConfig setting for every cell (repeatable)")
    run.add_argument("--flow-opt", action="append", default=[], metavar="[FLOW:]KEY=VALUE",
                     help="a flow hyperparameter, for one flow with FLOW: (repeatable), "
                          "e.g. --flow-opt ffjord:adjoint=true")
    run.add_argument("--on-mismatch", choices=("error", "keep", "restart"), default="error",
                     help="a cell already run with other settings: stop (default), keep it "
                          "with its own settings (resumed if unfinished), or train it afresh")
    run.add_argument("--report-only", action="store_true",
                     help="run nothing: rebuild the report from the run directories")
    run.add_argument("--dry-run", action="store_true", help="print the cells' commands and exit")
    return parser


def options_from_args(argv: Sequence[str]) -> TableOptions:
    """The :class:`TableOptions` of a command line (argparse errors exit with status 2)."""
    args = build_parser().parse_args(list(argv))
    options = TableOptions(
        datasets=args.datasets,
        flows=args.flows,
        seeds=None if args.seeds is None else parse_seeds(args.seeds),
        budget_minutes=args.budget_minutes,
        max_epochs=args.max_epochs,
        parallel=args.parallel,
        stop_after_minutes=args.stop_after,
        device=args.device,
        data_dir=args.data_dir,
        smoke=args.smoke,
        report_only=args.report_only,
        dry_run=args.dry_run,
        download=args.download,
        on_mismatch=args.on_mismatch,
        sets=args.set,
        flow_opts=args.flow_opt,
        argv=list(argv),
    )
    options.runs_dir = args.runs_dir if args.runs_dir is not None else default_runs_dir(options)
    options.out = args.out if args.out is not None else default_out(options)
    return options


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (see ``run_table``).

    SIGTERM is handled as Ctrl-C: the running cells checkpoint and stop, the report is written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_table(options_from_args(argv))
    except TableError as err:
        print(f"table: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
