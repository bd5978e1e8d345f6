"""The FFJORD paper's Table 3 in one command: every flow on every data set, several seeds.

    # the GPU run: 3 seeds, 60 minutes of training per cell, 7 cells at once; each command
    # stops after 9 minutes (exit status 3) and the same command again goes on from there
    python experiments/table.py --data-dir ../shared/data --budget-minutes 60 --seeds 3 \\
        --parallel 7 --stop-after 9
    # four GPUs, two cells on each
    python experiments/table.py --budget-minutes 60 --devices cuda:0,cuda:1,cuda:2,cuda:3 \\
        --per-device 2
    python experiments/table.py --report-only --data-dir ../shared/data   # rebuild the report
    python experiments/table.py --smoke --datasets caltech --flows none planar   # pipeline check

Each cell (data set x flow x seed) is ``vaeflow train`` with the papers' settings
(``vaeflow/configs``) in ``RUNS_DIR/<dataset>/<flow>/seed<k>``; a finished cell is skipped, an
unfinished one resumed; asked for a larger budget than it ran under (``--max-epochs 3`` after a
grid at 2), a cell trains on from its last checkpoint. The report (``table.md``, ``table.csv``,
PNG plots) goes to ``--out``.

Placing the cells: ``--devices`` (default: every visible CUDA device, else the CPU) lists the
devices; ``--per-device K`` runs up to K cells on each; ``--parallel P`` caps the cells that
run at once in all. Given alone, ``--parallel P`` shares P cells out over the devices (on one
GPU: P cells share it); neither: one cell per device. See ``results/table/README.md``.

The modules: ``table_options`` (what was asked), ``table_grid`` (cells, configs, run
directories, the plan), ``table_pool`` (subprocesses placed on devices), ``table_records``
(reading the runs; the paper's numbers), ``table_report`` and ``table_plots`` (the report).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from table_grid import (
    Plan,
    check_cells,
    download_missing,
    forget_old_runs,
    missing_data,
    plan_grid,
    record_attempt,
    record_invocation,
)
from table_options import (
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
)
from table_pool import INTERRUPTED, Job, JobResult, child_env, run_jobs
from table_records import collect
from table_report import write_report

from vaeflow.runs import Run, RunError

# how the progress lines name a job's mode, where its name is too short to say it
MODE_TEXT = {"extend": "resume with a larger budget"}


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
    place = parser.add_argument_group("placing the cells")
    place.add_argument("--devices", "--device", dest="devices", default="auto", metavar="LIST",
                       help="devices, comma-separated: cuda:0,cuda:1 or cpu (a name may repeat); "
                            "auto (default): every visible CUDA device, else cpu; cuda: every "
                            "visible CUDA device")
    place.add_argument("--per-device", type=int, metavar="K",
                       help="cells that run at once on one device (default: one, or "
                            "--parallel shared out over the devices)")
    place.add_argument("--parallel", type=int, metavar="P",
                       help="cells that run at once in all (default: --per-device times the "
                            "number of devices)")
    run = parser.add_argument_group("running")
    run.add_argument("--stop-after", type=float, metavar="MIN",
                     help="stop this command after MIN minutes: no new cell starts and the "
                          "running ones checkpoint and stop (exit status 3); the same command "
                          "goes on later")
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
                          "with its own settings (resumed if unfinished), or train it afresh; "
                          "a larger budget alone is no mismatch: the cell trains on")
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
        devices=args.devices,
        parallel=args.parallel,
        per_device=args.per_device,
        stop_after_minutes=args.stop_after,
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


def _done_message(result: JobResult) -> str:
    """``NAME: done in S s: test NELBO V UNIT``, the figure read from the run's results."""
    figure = ""
    try:
        results = Run(result.job.run_dir).results if result.job.run_dir is not None else None
    except RunError:
        results = None
    if isinstance(results, dict) and "test_nelbo" in results:
        unit = results.get("unit", "nats")
        value = results["test_nelbo_bpd" if unit == "bits/dim" else "test_nelbo"]
        figure = f": test NELBO {value:.4g} {unit}"
    return f"{result.job.name}: done in {result.seconds:.0f} s{figure}"


def _run_plan(plan: Plan, options: TableOptions, echo: TextIO) -> int:
    """Run the plan's jobs; the exit status of :func:`run_table`."""
    placement = options.placement()
    total = len(plan.jobs)
    if total:
        record_invocation(options, plan, placement)
    forget_old_runs(plan)
    started = [0]

    def on_start(job: Job) -> None:
        started[0] += 1
        where = f" on {job.device}" if job.device else ""
        mode = MODE_TEXT.get(job.mode, job.mode)
        print(f"[{started[0]}/{total}] {job.name}: {mode}{where}", file=echo, flush=True)

    def on_finish(result: JobResult) -> None:
        record_attempt(result)
        if result.ok:
            print(_done_message(result), file=echo, flush=True)
        elif result.returncode in INTERRUPTED:
            print(f"{result.job.name}: interrupted after {result.seconds:.0f} s (checkpoint "
                  "kept)", file=echo)
        else:
            print(f"{result.job.name}: FAILED (exit {result.returncode}) after "
                  f"{result.seconds:.0f} s: {result.error}\n  log: {result.job.log}",
                  file=echo, flush=True)

    deadline = None
    if options.stop_after_minutes is not None:
        deadline = time.monotonic() + 60 * options.stop_after_minutes
    try:
        results = run_jobs(plan.jobs, placement, child_env(placement.parallel), on_start,
                           on_finish, deadline=deadline)
    except KeyboardInterrupt:
        print("table: interrupted; every cell keeps its checkpoint; run the same command "
              "again to go on", file=echo)
        return 130
    failed = [r for r in results if not r.ok and r.returncode not in INTERRUPTED]
    left = total - sum(r.ok for r in results) - len(failed)
    if failed:
        return 1
    if left:
        print(f"table: stopped after --stop-after {options.stop_after_minutes:g} minutes "
              f"with {left} cell(s) left (checkpoints kept); run the same command again "
              "to go on", file=echo)
        return 3
    return 0


def run_table(options: TableOptions, echo: TextIO = sys.stderr) -> int:
    """Run what is missing of the grid (unless ``report_only``), then write the report.

    Returns the exit status: 0 when every runnable cell is done, 1 when a cell failed, 3 when
    ``stop_after_minutes`` stopped the grid with cells left, 130 after an interrupt (SIGINT, or
    SIGTERM in :func:`main`). The report is written in every case.
    """
    options.check()
    if options.report_only and not Path(options.runs_dir).is_dir():
        # a mistyped folder would otherwise write an empty table over the real one
        raise TableError(f"--report-only: no runs folder {options.runs_dir} (a typo in "
                         "--runs-dir?); nothing to report")
    missing = missing_data(options.datasets, options.data_dir)
    status = 0
    if not options.report_only:
        configs = check_cells(options)  # before a download, and when no data set is there
        if missing and options.download and not options.dry_run:
            missing = download_missing(missing, options.data_dir)
        plan = plan_grid(options, missing, configs)
        for warning in plan.warnings:
            print(f"table: warning: {warning}", file=echo)
        for name, reason in plan.not_run.items():
            print(f"table: {name} not run: {reason}", file=echo)
        placement = options.placement()
        extended = sum(j.mode == "extend" for j in plan.jobs)
        resumed = extended + sum(j.mode == "resume" for j in plan.jobs)
        larger = f", {extended} of them with a larger budget" if extended else ""
        print(
            f"table: {len(plan.jobs)} cell(s) to run ({resumed} resumed{larger}), "
            f"{len(plan.skipped)} done, {placement.parallel} at once on {placement.describe()}",
            file=echo,
        )
        if options.dry_run:
            for job in plan.jobs:
                print(f"{job.mode:8s} {job.name}: {shlex.join(job.command)}", file=echo)
            for cell in plan.skipped:
                print(f"{'done':8s} {cell.name}", file=echo)
            return 0
        status = _run_plan(plan, options, echo)
        missing = plan.not_run
    for path in write_report(collect(options, missing), options, missing, echo=echo):
        print(f"table: wrote {path}", file=echo)
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (see :func:`run_table`).

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
