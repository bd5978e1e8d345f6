"""Training-iteration benchmark: ms per step (forward, backward, optimizer step) for every flow.

Each *variant* (``bench_variants.py``) is a flow with its paper settings on the paper's MNIST
VAE (static MNIST shapes, batch 100, Adamax lr 5e-4 eps 1e-7), timed after warm-up over many
iterations (``bench_timing.py``): CUDA events on a GPU, ``time.perf_counter`` around steps
elsewhere. The report (``bench_report.py``) gives the median and interquartile range of the
step time, the median forward and backward NFE (FFJORD), the peak GPU memory and the
environment (device, torch, commit), as markdown and CSV under ``results/bench/``.
``--size small`` shrinks the model so that the benchmark runs on a CPU in seconds (the CI smoke
test); ``--parallel N`` measures the aggregate throughput of N training processes sharing one
device against one alone.

    python experiments/bench.py --smoke                     # CPU, small model, a few iterations
    python experiments/bench.py --device cuda --size paper  # the GPU figures (results/bench)
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator, Sequence

import torch
from bench_report import Result, environment, merge_rounds, write_report
from bench_timing import bench_variant, check_parallel, check_runnable, run_parallel, worker
from bench_variants import SIZES, VARIANTS, Variant, get_variant

from vaeflow.flows import FLOWS
from vaeflow.train import resolve_device

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/bench.py",
        description="Time training steps (forward, backward, Adamax step; batch 100, MNIST "
        "shapes) of every flow at the papers' settings, and write a markdown table and CSV.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke mode: small size, 2 warm-up and 5 timed steps, tag cpu-smoke",
    )
    p.add_argument(
        "--size", choices=SIZES, help="paper (default on CUDA) or small (default elsewhere)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help=f"variants to time (default: all that can run). Known: {', '.join(VARIANTS)}",
    )
    p.add_argument(
        "--flows",
        nargs="+",
        metavar="FLOW",
        help="time every variant of these flows (e.g. --flows ffjord)",
    )
    p.add_argument("--iters", type=int, help="timed steps per variant (default 50; smoke 5)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; smoke 2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every variant this many times, in turn, and pool the steps: on a shared "
        "machine, load that comes and goes then touches every variant alike (default 1)",
    )
    p.add_argument("--batch-size", type=int, help="default 100, the papers' batch")
    p.add_argument(
        "--max-seconds",
        type=float,
        help="stop timing a variant after this much wall-clock time (at least 3 steps)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", help="report name: <out-dir>/<tag>.md and .csv")
    p.add_argument("--out-dir", default="results/bench")
    p.add_argument("--commit", help="the commit to report (default: asked of git)")
    p.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="also time N runs at once against one alone (variants in --variants, default ffjord)",
    )
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; smoke: 1, which keeps a busy 2-core "
        "machine from thrashing); --parallel splits them between the processes",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _select(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    if args.variants:
        chosen = [get_variant(name) for name in args.variants]
        for v in chosen:
            reason = check_runnable(v, device)
            if reason is not None:
                raise ValueError(f"variant {v.name!r} cannot run on {device}: {reason}")
        return chosen
    if args.flows:
        unknown = sorted(set(args.flows) - set(FLOWS))
        if unknown:
            raise ValueError(f"unknown flow(s) {unknown}; valid flows are {', '.join(FLOWS)}")
        return [v for v in VARIANTS.values() if v.flow in args.flows]
    return list(VARIANTS.values())


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """``python experiments/bench.py ...``: see ``--help``; returns the exit status (2: bad
    options)."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        return worker(args)
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:28s} {v.description}")
        return 0
    try:
        device = torch.device("cpu") if args.smoke and args.device == "auto" else None
        device = device or resolve_device(args.device)
        size = args.size or ("small" if args.smoke or device.type != "cuda" else "paper")
        iters = args.iters if args.iters is not None else (5 if args.smoke else 50)
        warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
        for name, value, low in (("iters", iters, 1), ("warmup", warmup, 0)):
            if value < low:
                raise ValueError(f"--{name} must be at least {low}, got {value}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        if args.parallel is not None and args.parallel < 1:
            raise ValueError(f"--parallel must be positive, got {args.parallel}")
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        if args.rounds < 1:
            raise ValueError(f"--rounds must be positive, got {args.rounds}")
        if args.max_seconds is not None and not args.max_seconds > 0:
            raise ValueError(f"--max-seconds must be positive, got {args.max_seconds}")
        variants = _select(args, device)
        parallel_names = (args.variants or ["ffjord"]) if args.parallel else []
        for name in parallel_names:
            check_parallel(get_variant(name))
    except ValueError as err:
        parser.error(str(err))
    tag = args.tag or ("cpu-smoke" if args.smoke else f"{device.type}-{size}")
    if threads is not None:
        torch.set_num_threads(threads)
    env = environment(device, args.commit)
    rounds: dict[str, list[Result]] = {v.name: [] for v in variants}
    with _quiet_warnings():
        for round_ in range(args.rounds):
            for v in variants:
                try:
                    r = bench_variant(
                        v, size, device, iters, warmup, args.batch_size, args.seed,
                        max_seconds=args.max_seconds,
                    )  # fmt: skip
                except Exception as err:  # one broken variant must not lose the others
                    first = str(err).splitlines()[0] if str(err) else ""
                    r = Result(v.name, v.flow, size, str(device), args.batch_size or 100, 0, 0)
                    r.note = f"failed: {type(err).__name__}: {first}"[:300]
                rounds[v.name].append(r)
                status = f"{r.ms_median:9.2f} ms/step" if r.ms_median is not None else r.note
                label = f" (round {round_ + 1})" if args.rounds > 1 else ""
                print(f"{v.name:28s} {status}{label}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    results = [merge_rounds(rs) for rs in rounds.values()]
    parallel = []
    for name in parallel_names:
        p = run_parallel(
            name,
            args.parallel,
            size,
            str(device),
            iters,
            warmup,
            args.batch_size,
            args.seed,
            threads or torch.get_num_threads(),
        )
        parallel.append(p)
        print(
            f"{name}: {p['processes']} at once {p['aggregate']:.2f} steps/s in all, "
            f"one alone {p['single']:.2f} steps/s ({p['speedup']:.2f}x)",
            flush=True,
        )
    command = "python experiments/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    md, csv_path = write_report(results, env, args.out_dir, tag, command.strip(), parallel)
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
