"""Timing training steps: :func:`bench_variant` (one variant, after warm-up, CUDA events on a
GPU), the whole step captured in a CUDA graph, an operator and host-read counter, and
:func:`run_parallel` (several training processes sharing one device, against one alone).

Each step is ``vaeflow.train.train_step`` (zero_grad, loss, backward, Adamax step) on a batch
of random binary images of MNIST's shape from a pool resident on the device (the reference
emulation copies each batch from the host instead): the cost of a step does not depend on the
pixel values, so no data set is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_report import Result
from bench_variants import INPUT_SHAPE, Variant, build_model, get_variant, variant_config
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from vaeflow.checks import check_int, check_positive_int
from vaeflow.graphs import GraphedStep, graph_unavailable
from vaeflow.rng import rng_state, set_rng_state
from vaeflow.train import make_optimizer, train_step
from vaeflow.vae import VAE

__all__ = ["bench_variant", "check_parallel", "check_runnable", "repo_env", "run_parallel"]

REPO = Path(__file__).resolve().parents[1]
BENCH_SCRIPT = Path(__file__).resolve().with_name("bench.py")
# A graphed variant's first replays are checked against this many eager steps of a twin model.
GRAPH_CHECK_STEPS = 3


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout first on ``PYTHONPATH``, so that a child
    process imports this ``vaeflow`` with no install (the GPU machine has none)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model: VAE, variant: Variant, size: str) -> torch.optim.Optimizer:
    """The training loop's optimizer (Adamax at the config's lr and eps); capturable inside a
    CUDA graph."""
    return make_optimizer(variant_config(variant, size), model, capturable=variant.cuda_graph)


def _random_pool(batches: int, batch_size: int, seed: int) -> Tensor:
    """``[batches, batch_size, 1, 28, 28]`` random binary images (a fixed seed)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(batches, batch_size, *INPUT_SHAPE, generator=gen) < 0.5).float()


def check_runnable(variant: Variant, device: torch.device) -> str | None:
    """Why ``variant`` cannot run on ``device`` (None: it can)."""
    if (variant.cuda_graph or variant.cuda_only) and device.type != "cuda":
        return "needs CUDA (CUDA graphs)"
    if variant.cuda_graph:
        # The solver is the same at every size: the small model's flow tells.
        with torch.device("meta"):
            flow = build_model(variant, "small").flow
        reason = graph_unavailable(flow, device)
        if reason is not None:
            return reason
    return None


def _eager_losses(
    variant: Variant, size: str, seed: int, device: torch.device, batches: Tensor
) -> Tensor:
    """``[n]``: the losses of eager training steps on ``batches [n, B, 1, 28, 28]`` of a twin of
    the benchmark's model (same seed, same optimizer), from the current random state: what
    the CUDA graph's first ``n`` replays must give. The twin has the variant's
    ``twin_overrides`` where it names them (the default step it claims to be); a compiled
    field's twin runs the same fused field uncompiled (compiling twice would double the cost;
    the losses then agree to rounding, not bit for bit)."""
    if variant.twin_overrides is not None:
        variant = dataclasses.replace(variant, overrides=variant.twin_overrides)
    elif variant.overrides.get("compile"):
        variant = dataclasses.replace(
            variant, overrides={**variant.overrides, "compile": False, "fused": True})
    twin = build_model(variant, size, seed).to(device).train()
    optimizer = _optimizer(twin, variant, size)
    return torch.stack([train_step(twin, optimizer, x, 1.0)["loss"].detach() for x in batches])


def _nfe(model: VAE) -> dict[str, int]:
    return model.flow.statistics()


def bench_variant(
    variant: Variant | str,
    size: str = "small",
    device: str | torch.device = "cpu",
    iters: int = 20,
    warmup: int = 3,
    batch_size: int | None = None,
    seed: int = 0,
    pool_batches: int = 8,
    max_seconds: float | None = None,
) -> Result:
    """Time ``iters`` training steps of ``variant`` after ``warmup`` untimed ones (fewer, but
    at least 3, when the timed steps pass ``max_seconds`` of wall-clock time).

    Each step runs on a batch ``[batch_size, 1, 28, 28]`` (default: the config's, 100) of the
    pool; the reference emulation copies each batch from the host and reads the loss on the
    host every step, as the paper's code does. On CUDA each step is timed by CUDA events with no
    synchronisation between steps; elsewhere by ``time.perf_counter``.

    Returns:
        A :class:`Result`; ``note`` says why a variant could not run, if so.

    Raises:
        ValueError: for an unknown variant or size, or non-positive counts.
    """
    variant = get_variant(variant)
    device = torch.device(device)
    config = variant_config(variant, size)
    batch_size = config.batch_size if batch_size is None else batch_size
    for name, value in (("iters", iters), ("batch_size", batch_size), ("pool", pool_batches)):
        check_positive_int(name, value)
    check_int("warmup", warmup, minimum=0)
    result = Result(variant.name, variant.flow, size, str(device), batch_size, iters, warmup)
    reason = check_runnable(variant, device)
    if reason is not None:
        result.note = f"skipped: {reason}"
        return result

    model = build_model(variant, size, seed).to(device).train()
    result.params = sum(p.numel() for p in model.parameters())
    optimizer = _optimizer(model, variant, size)
    pool = _random_pool(pool_batches, batch_size, seed)
    if not variant.reference_emulation:
        pool = pool.to(device)

    def plain(i: int) -> dict[str, Tensor]:
        return train_step(model, optimizer, pool[i % pool_batches], 1.0)

    def reference(i: int) -> dict[str, Tensor]:
        out = train_step(model, optimizer, pool[i % pool_batches].to(device), 1.0)
        out["loss"].item()  # the paper code logs the loss every step: a host synchronisation
        return out

    step: Callable[[int], dict[str, Tensor]] = reference if variant.reference_emulation else plain
    notes: list[str] = []
    if variant.cuda_graph:
        start = rng_state(device)
        twin = None
        try:
            twin = _eager_losses(variant, size, seed, device, pool[:GRAPH_CHECK_STEPS])
        except Exception as err:  # the check must not cost the timing
            notes.append(f"graph check failed: {type(err).__name__}: {err}"[:200])
        set_rng_state(start, device)
        graphed = GraphedStep(
            lambda xs, beta: train_step(model, optimizer, xs, beta), model, optimizer,
            pool[0].to(device),
        )
        if twin is not None:  # the first replays: the same weights, batches and random state
            losses = torch.stack([graphed(x)["loss"] for x in pool[:GRAPH_CHECK_STEPS]])
            result.graph_loss_gap = float((losses - twin).abs().max())

        def step(i: int) -> dict[str, Tensor]:
            return graphed(pool[i % pool_batches], copy=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    synchronize(device)

    times: list[float] = []
    nfe: list[dict[str, int]] = []
    out: dict[str, Tensor] = {}
    deadline = math.inf if max_seconds is None else time.perf_counter() + max_seconds
    events = []
    for i in range(iters):
        if device.type == "cuda":  # no synchronisation between steps: CUDA events time them
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(warmup + i)
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            out = step(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
        nfe.append(_nfe(model))
        if i >= 2 and time.perf_counter() > deadline:  # a host clock: no synchronisation
            break
    synchronize(device)
    if device.type == "cuda":
        times = [start.elapsed_time(end) for start, end in events]
        result.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
    result.samples["ms"] = times
    if nfe and nfe[0]:
        for key in ("nfe_forward", "nfe_backward"):
            result.samples[key] = [float(n[key]) for n in nfe]
    result.summarize()
    result.final_loss = float(out["loss"])
    if not math.isfinite(result.final_loss):
        notes.append("non-finite loss")
    for m in model.modules():
        compiled = getattr(m, "_compiled", None)
        if compiled is not None and compiled.fallback_reason:
            notes.append(f"compile fell back to eager ({compiled.fallback_reason})"[:200])
    result.note = "; ".join(notes)
    if not (variant.cuda_graph or variant.overrides.get("compile")):
        # One more step, untimed, to count what it does (compiled code hides its kernels).
        with _OpCounter(device) as counter:
            step(warmup + len(times))
        synchronize(device)
        result.ops_per_step, result.host_reads_per_step = counter.ops, counter.reads
    return result


# Operators that only make views or allocate: they launch no kernel.
_NO_KERNEL_OPS = frozenset(
    """view _unsafe_view as_strided expand reshape permute transpose unsqueeze squeeze slice
    select t detach alias split split_with_sizes unbind lift_fresh _reshape_alias unfold diagonal
    narrow chunk empty empty_strided empty_like new_empty new_empty_strided""".split()
)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators that do work (on a GPU, about one kernel launch each) and
    the reads of tensor values by the host (``_local_scalar_dense``: ``.item()``, ``bool()``):
    on CUDA only reads of device tensors, each a synchronisation; on a CPU every read,
    including host-side counters that would cost nothing on a GPU."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            if self.device.type == "cpu" or args[0].device.type != "cpu":
                self.reads += 1
        elif name not in _NO_KERNEL_OPS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# Several runs at once
# --------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """One process of :func:`run_parallel` (``bench.py --worker VARIANT``): warm up, say
    "ready", wait for "go" on stdin, time ``iters`` steps, print one JSON line with wall-clock
    start and end."""
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = get_variant(args.worker)
    device = torch.device(args.device)
    model = build_model(variant, args.size, args.seed).to(device).train()
    optimizer = _optimizer(model, variant, args.size)
    batch = args.batch_size or variant_config(variant, args.size).batch_size
    pool = _random_pool(8, batch, args.seed).to(device)
    for i in range(args.warmup):
        train_step(model, optimizer, pool[i % 8], 1.0)
    synchronize(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    start = time.time()
    for i in range(args.iters):
        train_step(model, optimizer, pool[i % 8], 1.0)
    synchronize(device)
    end = time.time()
    print(json.dumps({"start": start, "end": end, "iters": args.iters}), flush=True)
    return 0


def _launch(
    processes: int, variant: str, size: str, device: str, iters: int, warmup: int,
    threads: int, batch_size: int | None, seed: int,
) -> list[dict[str, float]]:  # fmt: skip
    cmd = [
        sys.executable, str(BENCH_SCRIPT), "--worker", variant, "--size", size,
        "--device", device, "--iters", str(iters), "--warmup", str(warmup),
        "--threads", str(threads), "--seed", str(seed),
    ]  # fmt: skip
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    procs = [
        subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=repo_env()
        )
        for _ in range(processes)
    ]
    try:
        for p in procs:  # every process warmed up before any is timed
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"benchmark worker failed to start (said {line!r})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"benchmark worker exited with status {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return reports


def check_parallel(variant: Variant) -> None:
    """Refuse a variant that is not a plain training step (``--parallel`` times those)."""
    if variant.reference_emulation or variant.cuda_graph or variant.cuda_only:
        raise ValueError(
            f"--parallel times plain training steps; variant {variant.name!r} is not one"
        )


def run_parallel(
    variant: str,
    processes: int,
    size: str = "small",
    device: str = "cpu",
    iters: int = 20,
    warmup: int = 3,
    batch_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Aggregate training throughput of ``processes`` runs of ``variant`` at once on one
    device, against one run alone (each a separate process, all warmed up, then started
    together). On a CPU, ``threads`` (default: the core count) are split evenly between the
    processes; one run alone gets them all.

    Returns:
        ``{"variant", "processes", "threads", "per_process", "aggregate", "single",
        "speedup"}``: steps/s per process (mean), in all (total steps over the span from the
        first start to the last end), of one run alone, and aggregate / single.
    """
    check_parallel(get_variant(variant))
    check_positive_int("parallel", processes)
    total = threads or os.cpu_count() or 1
    on_cpu = torch.device(device).type == "cpu"
    threads_one = total if on_cpu else 0
    threads_many = max(1, total // processes) if on_cpu else 0
    args = (size, device, iters, warmup)
    (alone,) = _launch(1, variant, *args, threads_one, batch_size, seed)
    single = alone["iters"] / (alone["end"] - alone["start"])
    reports = _launch(processes, variant, *args, threads_many, batch_size, seed)
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    aggregate = sum(r["iters"] for r in reports) / span
    per = statistics.mean(r["iters"] / (r["end"] - r["start"]) for r in reports)
    return {
        "variant": variant,
        "processes": processes,
        "threads": threads_many or "-",
        "per_process": per,
        "aggregate": aggregate,
        "single": single,
        "speedup": aggregate / single,
    }
