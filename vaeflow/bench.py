"""Training-iteration benchmark: ms per step (forward, backward, optimizer step) for every flow.

Each *variant* is a flow with its paper settings on the paper's MNIST VAE (static MNIST shapes,
batch 100, Adamax lr 5e-4 eps 1e-7), timed after warm-up over many iterations: CUDA events on a
GPU, ``time.perf_counter`` around synchronised steps elsewhere. The report gives the median and
interquartile range of the step time, the median forward and backward NFE (FFJORD), the peak
GPU memory and the environment (device, torch, commit), as markdown and CSV under
``results/bench/``. ``size="small"`` shrinks the model so that the benchmark runs on a CPU in
seconds (the CI smoke test); ``--parallel N`` measures the aggregate throughput of N training
processes sharing one device against one alone.

    vaeflow bench --smoke                     # CPU, small model, a few iterations
    vaeflow bench --device cuda --size paper  # the GPU figures (see results/bench/NOTES.md)

The data are random binary images of MNIST's shape, resident on the device (except in the
reference emulation), so that no data set is needed: the cost of a step does not depend on the
pixel values.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from vaeflow.flows import FFJORD, FLOWS, make_flow
from vaeflow.flows.ffjord import _divergence
from vaeflow.nets import make_networks
from vaeflow.ode import NFECounter, SolverConfig, solve, uses_static_solver
from vaeflow.train import resolve_device, train_step
from vaeflow.vae import VAE

__all__ = [
    "SIZES",
    "VARIANTS",
    "Variant",
    "Result",
    "paper_model",
    "build_model",
    "bench_variant",
    "merge_rounds",
    "environment",
    "git_commit",
    "write_report",
    "run_parallel",
    "main",
]

SIZES = ("paper", "small")
INPUT_SHAPE = (1, 28, 28)
LR, ADAMAX_EPS = 5e-4, 1e-7

# The flows' settings in the Sylvester and FFJORD papers' MNIST experiments.
_PAPER_FLOWS: dict[str, dict[str, Any]] = {
    "none": {},
    "planar": {"num_steps": 16},
    "iaf": {"num_steps": 4, "hidden_dim": 320},
    "orthogonal": {"num_steps": 16, "num_ortho_vecs": 32},
    "householder": {"num_steps": 16, "num_householder": 8},
    "triangular": {"num_steps": 16},
    "ffjord": {
        "dynamics": "lowrank",
        "hidden_dims": (1024, 1024),
        "rank": 64,
        "num_blocks": 2,
        "nonlinearity": "softplus",
        "method": "dopri5",
        "atol": 1e-5,
        "rtol": 1e-5,
    },
}
# The same structure, shrunk so that a CPU runs a step in milliseconds.
_SMALL_FLOWS: dict[str, dict[str, Any]] = {
    "none": {},
    "planar": {"num_steps": 4},
    "iaf": {"num_steps": 2, "hidden_dim": 32},
    "orthogonal": {"num_steps": 4, "num_ortho_vecs": 4},
    "householder": {"num_steps": 4, "num_householder": 2},
    "triangular": {"num_steps": 4},
    "ffjord": {**_PAPER_FLOWS["ffjord"], "hidden_dims": (64, 64), "rank": 8},
}
_NETS = {
    "paper": {"arch": "gatedconv", "latent_dim": 64, "context_dim": 256},
    "small": {"arch": "mlp", "latent_dim": 8, "context_dim": 32, "hidden_sizes": (64,)},
}


def paper_model(flow: str, size: str = "paper") -> dict[str, Any]:
    """The benchmark's model for ``flow``: ``{"nets": make_networks kwargs, "flow": flow
    hyperparameters, "batch_size": 100}``.

    ``size="paper"`` is the papers' MNIST model: gated-conv encoder and decoder, latent 64,
    context 256, Bernoulli likelihood, and per flow planar 16 steps; IAF 4 steps of width 320;
    orthogonal Sylvester 16 steps of 32 vectors; Householder 16 steps of 8 reflections;
    triangular 16 steps; FFJORD 2 blocks of low-rank (rank 64) softplus dynamics with hidden
    widths (1024, 1024), dopri5 at atol = rtol = 1e-5 (its amortization head is
    Linear(256, 272448) per block). ``size="small"`` keeps each structure at toy widths (an MLP
    VAE with latent 8) for CPU smoke tests.

    Raises:
        ValueError: for an unknown flow or size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes are {', '.join(SIZES)}")
    if flow not in _PAPER_FLOWS:
        raise ValueError(f"unknown flow {flow!r}; valid flows are {', '.join(_PAPER_FLOWS)}")
    nets = {**_NETS[size], "input_shape": INPUT_SHAPE, "likelihood": "bernoulli"}
    table = _PAPER_FLOWS if size == "paper" else _SMALL_FLOWS
    return {"nets": nets, "flow": dict(table[flow]), "batch_size": 100}


@dataclass(frozen=True)
class Variant:
    """A flow and the options of one timed configuration.

    ``overrides`` change the flow's hyperparameters; ``reference_emulation`` imitates what the
    FFJORD paper's code does that vaeflow does not (see :class:`_StateCarryingFFJORD`);
    ``cuda_graph`` captures the whole training step in a CUDA graph (fixed-step solvers only).
    """

    name: str
    flow: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    reference_emulation: bool = False
    cuda_graph: bool = False
    cuda_only: bool = False


_FFJORD_VARIANTS = [
    Variant(
        "ffjord",
        "ffjord",
        {},
        "vaeflow default: dopri5, direct backprop, Rademacher noise, divergence by autograd.grad",
    ),
    Variant(
        "ffjord-fused",
        "ffjord",
        {"fused": True},
        "divergence from the hand-written VJP, fused with the field (what compile compiles)",
    ),
    Variant("ffjord-adjoint", "ffjord", {"adjoint": True}, "adjoint method instead of direct"),
    Variant("ffjord-gaussian", "ffjord", {"noise": "gaussian"}, "Gaussian Hutchinson noise"),
    Variant("ffjord-compiled", "ffjord", {"compile": True}, "torch.compile of the fused field"),
    Variant(
        "ffjord-compiled-cudagraphs",
        "ffjord",
        {"compile": "reduce-overhead"},
        "torch.compile mode reduce-overhead: the fused field replayed from CUDA graphs",
        cuda_only=True,
    ),
    Variant(
        "ffjord-rk4",
        "ffjord",
        {"method": "rk4", "solver_options": {"step_size": 0.25}},
        "fixed-step rk4, 4 steps per block: a different solver, NOT the dopri5 accuracy",
    ),
    Variant(
        "ffjord-rk4-torchdiffeq",
        "ffjord",
        {"method": "rk4", "solver_options": {"step_size": 0.25, "perturb": False}},
        "ffjord-rk4 through torchdiffeq's fixed-grid loop (perturb=False, its default, routes "
        "it there), which reads the device on the host every step: the same function",
    ),
    Variant(
        "ffjord-rk4-cudagraph",
        "ffjord",
        {"method": "rk4", "solver_options": {"step_size": 0.25}},
        "ffjord-rk4 with the whole training step captured in one CUDA graph (CUDA only)",
        cuda_graph=True,
    ),
    Variant(
        "ffjord-rk4-compiled-cudagraph",
        "ffjord",
        {"method": "rk4", "solver_options": {"step_size": 0.25}, "compile": True},
        "ffjord-rk4-cudagraph with the compiled field inside the graph (CUDA only)",
        cuda_graph=True,
    ),
    Variant(
        "ffjord-reference-emulation",
        "ffjord",
        {"adjoint": True, "noise": "gaussian"},
        "EMULATION of the paper code's choices, not its code: amortized tensors carried as ODE "
        "state, adjoint, Gaussian noise, autograd divergence, host copy of each batch, "
        "loss.item() every step",
        reference_emulation=True,
    ),
]
VARIANTS: dict[str, Variant] = {
    **{
        name: Variant(name, name, {}, "vaeflow default")
        for name in ("none", "planar", "iaf", "orthogonal", "householder", "triangular")
    },
    **{v.name: v for v in _FFJORD_VARIANTS},
}


@dataclass
class Result:
    """One variant's measurements. Times in ms per training step; NFE per step (medians)."""

    variant: str
    flow: str
    size: str
    device: str
    batch_size: int
    iters: int
    warmup: int
    ms_median: float | None = None
    ms_q25: float | None = None
    ms_q75: float | None = None
    steps_per_s: float | None = None
    nfe_forward: float | None = None
    nfe_backward: float | None = None
    peak_mem_mib: float | None = None
    params: int | None = None
    ops_per_step: int | None = None
    host_reads_per_step: int | None = None
    final_loss: float | None = None
    note: str = ""
    # The raw samples (not reported): per-step times in ms and NFE, to merge rounds.
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def summarize(self) -> None:
        """Fill the medians and quartiles in from :attr:`samples`."""
        times = self.samples.get("ms", [])
        if not times:
            return
        self.iters = len(times)
        q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
        self.ms_median = statistics.median(times)
        self.ms_q25, self.ms_q75 = q[0], q[2]
        self.steps_per_s = 1e3 / self.ms_median
        if self.samples.get("nfe_forward"):
            self.nfe_forward = statistics.median(self.samples["nfe_forward"])
            self.nfe_backward = statistics.median(self.samples["nfe_backward"])


REPORTED = [f.name for f in fields(Result) if f.name != "samples"]


def merge_rounds(rounds: Sequence[Result]) -> Result:
    """One :class:`Result` from the same variant timed in several rounds: all the steps
    pooled, the counts and loss of the last round, every distinct note."""
    merged = Result(**{k: getattr(rounds[-1], k) for k in REPORTED})
    for key in ("ms", "nfe_forward", "nfe_backward"):
        merged.samples[key] = [x for r in rounds for x in r.samples.get(key, [])]
    merged.note = "; ".join(dict.fromkeys(r.note for r in rounds if r.note))
    merged.summarize()
    return merged


# --------------------------------------------------------------------------------------------
# The reference emulation
# --------------------------------------------------------------------------------------------


class _StateCarryingField:
    """The FFJORD paper code's way to condition a CNF: the amortized tensors ride in the ODE
    state (``state = (z [B, D], logdet [B], *amortized)``) with zero time derivative, so every
    solver stage, error estimate and adjoint step touches them (27 M floats per block at the
    paper's size); the divergence comes from ``autograd.grad``."""

    def __init__(self, dynamics: Any, end_time: Tensor, eps: Tensor, counter: NFECounter) -> None:
        self.dynamics = dynamics
        self.end_time = end_time
        self.eps = eps
        self.counter = counter

    def __call__(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.counter.tick()
        create_graph = torch.is_grad_enabled()
        z, amortized = state[0], state[2:]
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            f = self.dynamics(s * self.end_time, z, amortized)
            trace, _ = _divergence(f, z, self.eps, create_graph)
        out = (self.end_time * f, self.end_time * trace, *(0.0 * a for a in amortized))
        return out if create_graph else tuple(o.detach() for o in out)


class _StateCarryingFFJORD(FFJORD):
    """FFJORD whose training-mode forward carries the amortized tensors in the ODE state, as
    the paper's code does (:class:`_StateCarryingField`). Same function as :class:`FFJORD`;
    only its cost differs. Used by the ``ffjord-reference-emulation`` variant only."""

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.uses_exact_trace() or self.regularize:
            return super()._forward(z0, h)
        self._counter = counter = NFECounter()
        z, logdet = z0, z0.new_zeros(z0.shape[0])
        for b, dynamics in enumerate(self.blocks):
            amortized = dynamics.amortize(h)
            end_time = self.end_times[b]
            func = _StateCarryingField(dynamics, end_time, self._noise(z), counter)
            state = (z, z.new_zeros(z.shape[0]), *amortized)
            params = (*dynamics.field_parameters(), end_time)
            out = solve(func, state, (0.0, 1.0), self.solver, adjoint_params=params)
            z, logdet = out[0], logdet + out[1]
        return z, logdet


# --------------------------------------------------------------------------------------------
# Building and timing
# --------------------------------------------------------------------------------------------


def build_model(variant: Variant | str, size: str = "small", seed: int = 0) -> VAE:
    """The VAE of ``variant`` at ``size`` (on the CPU; the caller moves it), seeded so that
    every variant of a flow starts from the same weights."""
    variant = _get_variant(variant)
    spec = paper_model(variant.flow, size)
    torch.manual_seed(seed)
    nets = dict(spec["nets"])
    encoder, decoder = make_networks(nets.pop("arch"), **nets)
    kwargs = {**spec["flow"], **variant.overrides}
    if variant.reference_emulation:
        flow = _StateCarryingFFJORD(encoder.latent_dim, encoder.context_dim, **kwargs)
    else:
        flow = make_flow(variant.flow, encoder.latent_dim, encoder.context_dim, **kwargs)
    return VAE(encoder, decoder, spec["nets"]["likelihood"], flow)


def _get_variant(variant: Variant | str) -> Variant:
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants are {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nfe_flows(model: VAE) -> list[FFJORD]:
    return [m for m in model.modules() if isinstance(m, FFJORD)]


class _GraphedStep:
    """The whole training step (forward, backward, Adamax step) captured in one CUDA graph
    and replayed on a static input buffer, after PyTorch's whole-network capture recipe. Needs
    static shapes and no host synchronisation inside the step: a fixed-step solver (which
    :mod:`vaeflow.ode` integrates without synchronising) and a capturable optimizer."""

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
        self.x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up allocator and autograd state off the capture stream
                train_step(model, optimizer, self.x, 1.0)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = train_step(model, optimizer, self.x, 1.0)

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        self.x.copy_(x)
        self.graph.replay()
        return self.out


def _check_runnable(variant: Variant, device: torch.device) -> str | None:
    """Why ``variant`` cannot run on ``device`` (None: it can)."""
    if (variant.cuda_graph or variant.cuda_only) and device.type != "cuda":
        return "needs CUDA (CUDA graphs)"
    if variant.cuda_graph:
        o = {**_PAPER_FLOWS[variant.flow], **variant.overrides}
        solver = SolverConfig(
            o.get("method", "dopri5"),
            options=o.get("solver_options"),
            adjoint=o.get("adjoint", False),
        )
        if not uses_static_solver(solver):
            return "CUDA graphs need a fixed-step solver without the adjoint"
    return None


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

    Each step is ``vaeflow.train.train_step`` (zero_grad, loss, backward, Adamax step) on a
    batch ``[batch_size, 1, 28, 28]`` of random binary images from a pool resident on
    ``device`` (the reference emulation copies each batch from the host instead and reads the
    loss on the host every step). On CUDA each step is timed by CUDA events with no
    synchronisation between steps; elsewhere by ``time.perf_counter``.

    Returns:
        A :class:`Result`; ``note`` says why a variant could not run, if so.

    Raises:
        ValueError: for an unknown variant or size, or non-positive counts.
    """
    variant = _get_variant(variant)
    device = torch.device(device)
    spec = paper_model(variant.flow, size)
    batch_size = spec["batch_size"] if batch_size is None else batch_size
    for name, value in (("iters", iters), ("batch_size", batch_size), ("pool", pool_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    result = Result(variant.name, variant.flow, size, str(device), batch_size, iters, warmup)
    reason = _check_runnable(variant, device)
    if reason is not None:
        result.note = f"skipped: {reason}"
        return result

    model = build_model(variant, size, seed).to(device).train()
    result.params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adamax(
        model.parameters(), lr=LR, eps=ADAMAX_EPS, capturable=variant.cuda_graph
    )
    gen = torch.Generator().manual_seed(seed + 1)
    pool = (torch.rand(pool_batches, batch_size, *INPUT_SHAPE, generator=gen) < 0.5).float()
    if not variant.reference_emulation:
        pool = pool.to(device)
    flows = _nfe_flows(model)

    def plain(i: int) -> dict[str, Tensor]:
        return train_step(model, optimizer, pool[i % pool_batches], 1.0)

    def reference(i: int) -> dict[str, Tensor]:
        out = train_step(model, optimizer, pool[i % pool_batches].to(device), 1.0)
        out["loss"].item()  # the paper code logs the loss every step: a host synchronisation
        return out

    step: Callable[[int], dict[str, Tensor]] = reference if variant.reference_emulation else plain
    if variant.cuda_graph:
        graphed = _GraphedStep(model, optimizer, pool[0])

        def step(i: int) -> dict[str, Tensor]:
            return graphed(pool[i % pool_batches])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    _synchronize(device)

    times: list[float] = []
    nfe_f: list[int] = []
    nfe_b: list[int] = []
    out: dict[str, Tensor] = {}
    deadline = math.inf if max_seconds is None else time.perf_counter() + max_seconds
    if device.type == "cuda":
        events = []
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(warmup + i)
            end.record()
            events.append((start, end))
            nfe_f.append(sum(f.nfe_forward for f in flows))
            nfe_b.append(sum(f.nfe_backward for f in flows))
            if i >= 2 and time.perf_counter() > deadline:  # a host clock: no synchronisation
                break
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        result.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            out = step(warmup + i)
            _synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            nfe_f.append(sum(f.nfe_forward for f in flows))
            nfe_b.append(sum(f.nfe_backward for f in flows))
            if i >= 2 and time.perf_counter() > deadline:
                break
    result.samples["ms"] = times
    if flows:
        result.samples["nfe_forward"] = [float(n) for n in nfe_f]
        result.samples["nfe_backward"] = [float(n) for n in nfe_b]
    result.summarize()
    result.final_loss = float(out["loss"])
    notes = [] if math.isfinite(result.final_loss) else ["non-finite loss"]
    for f in flows:
        if f._compiled is not None and f._compiled.fallback_reason:
            notes.append(f"compile fell back to eager ({f._compiled.fallback_reason})"[:200])
    result.note = "; ".join(notes)
    if not (variant.cuda_graph or variant.overrides.get("compile")):
        # One more step, untimed, to count what it does (compiled code hides its kernels).
        with _OpCounter(device) as counter:
            step(warmup + len(times))
        _synchronize(device)
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
# Environment and report
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def git_commit(repo: str | os.PathLike[str] | None = None) -> str:
    """``git rev-parse --short HEAD`` of ``repo`` (default: this package's checkout), with
    ``+dirty`` when tracked files have changed; ``"unknown"`` where git or the checkout is
    missing. ``--no-optional-locks`` keeps the query from writing to the repository."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if status else (sha or "unknown")


def environment(device: str | torch.device, commit: str | None = None) -> dict[str, str]:
    """What the numbers were measured on: ``device_name`` (the GPU's name, or the CPU's and
    its core count), torch, torchdiffeq, Python, commit, date, and the host's load average (a
    busy host slows a CPU benchmark)."""
    import torchdiffeq

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"GPU: {torch.cuda.get_device_name(index)}"
        extra = f"CUDA {torch.version.cuda}"
    else:
        name = f"CPU: {_cpu_name()}, {os.cpu_count()} cores"
        extra = f"{torch.get_num_threads()} torch threads"
    env = {
        "device_name": name,
        "device_detail": extra,
        "torch": torch.__version__,
        "torchdiffeq": getattr(torchdiffeq, "__version__", "unknown"),
        "python": platform.python_version(),
        "commit": commit if commit is not None else git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):
        env["load_average"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return env


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(
    results: Sequence[Result],
    env: dict[str, str],
    out_dir: str | os.PathLike[str],
    tag: str,
    command: str = "",
    parallel: Sequence[dict[str, Any]] = (),
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<tag>.md`` (environment, table, variant descriptions) and
    ``<out_dir>/<tag>.csv`` (one row per variant, the environment in every row); return both
    paths. Blank cells mean not applicable (no NFE for discrete flows, no GPU memory on CPU)."""
    clash = set(REPORTED) & set(env)
    if clash:
        raise ValueError(f"environment keys {sorted(clash)} clash with result columns")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / f"{tag}.md", out / f"{tag}.csv"
    names = REPORTED
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*names, *env], lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({**{k: _fmt(getattr(r, k), 4) for k in names}, **env})
    csv_path.write_text(buffer.getvalue())

    lines = [f"# vaeflow benchmark: {tag}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [
        "",
        "Training step = forward + backward + Adamax step; times are medians over the timed "
        "iterations after warm-up, with the interquartile range; NFE per step (median); peak "
        "memory on CUDA only. ops/step: ATen operators that do work in one more (untimed) "
        "step, about one GPU kernel launch each (not counted for compiled or graphed steps, "
        "whose kernels are hidden). host reads/step: reads of tensor values by the host; on "
        "CUDA each is a synchronisation, on a CPU the count also includes host-side counters "
        "(Adamax keeps one step counter per parameter tensor on the host).",
        "",
        "| variant | flow | size | batch | ms/step | IQR ms | steps/s | NFE fwd | NFE bwd "
        "| ops/step | host reads/step | peak MiB | params | loss | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        iqr = f"{r.ms_q25:.2f}-{r.ms_q75:.2f}" if r.ms_q25 is not None else ""
        lines.append(
            f"| {r.variant} | {r.flow} | {r.size} | {r.batch_size} | {_fmt(r.ms_median)} "
            f"| {iqr} | {_fmt(r.steps_per_s)} | {_fmt(r.nfe_forward, 1)} "
            f"| {_fmt(r.nfe_backward, 1)} | {_fmt(r.ops_per_step)} "
            f"| {_fmt(r.host_reads_per_step)} | {_fmt(r.peak_mem_mib, 1)} | {_fmt(r.params)} "
            f"| {_fmt(r.final_loss)} | {r.note.replace('|', '/')} |"
        )
    speedups = _speedups(results)
    if speedups:
        lines += ["", "Speed-up of each FFJORD variant over `ffjord-reference-emulation`:", ""]
        lines += [f"- {name}: {ratio:.2f}x" for name, ratio in speedups.items()]
    if parallel:
        lines += [
            "",
            "## Several runs at once on one device",
            "",
            "| variant | processes | threads each | steps/s each (mean) | aggregate steps/s "
            "| vs one run |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in parallel:
            lines.append(
                f"| {p['variant']} | {p['processes']} | {p['threads']} "
                f"| {p['per_process']:.2f} | {p['aggregate']:.2f} | {p['speedup']:.2f}x |"
            )
    lines += ["", "Variants:", ""]
    for r in results:
        v = VARIANTS.get(r.variant)
        if v is not None:
            lines.append(f"- `{v.name}`: {v.description}")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _speedups(results: Sequence[Result]) -> dict[str, float]:
    ref = next(
        (r for r in results if r.variant == "ffjord-reference-emulation" and r.ms_median), None
    )
    if ref is None:
        return {}
    return {
        r.variant: ref.ms_median / r.ms_median
        for r in results
        if r.flow == "ffjord" and r.ms_median and r is not ref
    }


# --------------------------------------------------------------------------------------------
# Several runs at once
# --------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    """One process of :func:`run_parallel`: warm up, say "ready", wait for "go" on stdin, time
    ``iters`` steps, print one JSON line with wall-clock start and end."""
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = _get_variant(args.worker)
    device = torch.device(args.device)
    model = build_model(variant, args.size, args.seed).to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=LR, eps=ADAMAX_EPS)
    batch = args.batch_size or paper_model(variant.flow, args.size)["batch_size"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    pool = (torch.rand(8, batch, *INPUT_SHAPE, generator=gen) < 0.5).float().to(device)
    for i in range(args.warmup):
        train_step(model, optimizer, pool[i % 8], 1.0)
    _synchronize(device)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    start = time.time()
    for i in range(args.iters):
        train_step(model, optimizer, pool[i % 8], 1.0)
    _synchronize(device)
    end = time.time()
    print(json.dumps({"start": start, "end": end, "iters": args.iters}), flush=True)
    return 0


def _launch(
    processes: int,
    variant: str,
    size: str,
    device: str,
    iters: int,
    warmup: int,
    threads: int,
    batch_size: int | None,
    seed: int,
) -> list[dict[str, float]]:
    cmd = [
        sys.executable, "-m", "vaeflow.bench", "--worker", variant, "--size", size,
        "--device", device, "--iters", str(iters), "--warmup", str(warmup),
        "--threads", str(threads), "--seed", str(seed),
    ]  # fmt: skip
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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


def _check_parallel(variant: Variant) -> None:
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
    _check_parallel(_get_variant(variant))
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"parallel must be a positive integer, got {processes!r}")
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vaeflow bench",
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
        chosen = [_get_variant(name) for name in args.variants]
        for v in chosen:
            reason = _check_runnable(v, device)
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
    """``vaeflow bench ...``: see ``--help``. Returns the exit status (2 for bad options)."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        return _worker(args)
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
            _check_parallel(_get_variant(name))
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
    command = "vaeflow bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    md, csv_path = write_report(results, env, args.out_dir, tag, command.strip(), parallel)
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
