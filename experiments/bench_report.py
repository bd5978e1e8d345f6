"""The benchmark's results and reports: :class:`Result` (one variant's measurements), the
environment they were measured in, and the markdown table and CSV written under
``results/bench/``."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from bench_variants import VARIANTS

from vaeflow.provenance import git_commit

__all__ = ["REPORTED", "Result", "environment", "merge_rounds", "write_report"]


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
    # CUDA-graph variants: the largest |graphed - eager| loss of the first steps of twin models
    # (same seed, batches and random state): 0, or float rounding, if the graph is the step.
    graph_loss_gap: float | None = None
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


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


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


def _note(r: Result) -> str:
    """The note column: the graph check's gap first, where there is one."""
    if r.graph_loss_gap is None:
        return r.note
    gap = f"graphed - eager loss, first steps: at most {r.graph_loss_gap:.3g}"
    return "; ".join(n for n in (gap, r.note) if n)


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
            f"| {_fmt(r.final_loss)} | {_note(r).replace('|', '/')} |"
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
