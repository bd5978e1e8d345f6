"""One prepared command that turns a short GPU window into the speed and table results.

    PYTHONPATH=. python experiments/gpu_run.py OUT_DIR --minutes 8   # on the GPU machine
    python experiments/gpu_run.py OUT_DIR --minutes 2 --smoke        # the CPU rehearsal

Within the wall-clock budget (a deadline, shared out between the stages in proportion to
``STAGE_SHARES`` of the time left, so that time a stage does not use goes to the next), it:

1. records the environment (GPU, driver, torch, CUDA, TF32 flags, commit);
2. times a training step of every flow at the paper's size and of every FFJORD variant
   (``gpu_bench.py``: a worker process, each variant under its own time limit);
3. times the paper's own code on the same device, flow by flow (``gpu_reference.py``, from a
   copy in the ignored work folder);
4. trains one row of the table, every posterior at once under a per-cell budget
   (``gpu_table.py`` through ``experiments/table.py``);
5. trains the same small fixed-step FFJORD with ``vaeflow train`` eagerly and with the whole
   step in a CUDA graph (``--set cuda_graph=true``): both runs' losses and seconds;
6. writes at most 6 files to OUT_DIR: ``summary.json``, ``bench.md``, ``table.md``,
   ``nelbo_vs_time.png`` and ``logs.tar.gz`` (the small logs; no checkpoints).

Every stage is guarded: one that fails or hangs is recorded with its error and the run goes on.
``--smoke`` runs the same stages at tiny sizes on the CPU (see results/gpu/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_bench import DEFAULT_VARIANTS, FAULTS, SMOKE_SKIPPED, run_bench
from gpu_guard import Deadline, exit_on_sigterm, guarded, stream_lines
from gpu_reference import REFERENCE_FLOWS, missing_dependencies, prepare_reference, run_reference
from gpu_report import render_bench, render_table, speedups, targets
from gpu_table import (
    OVERHEAD_S,
    SMOKE_FLOW_OPTS,
    SMOKE_SETS,
    cell_records,
    run_table,
    write_tiny_mnist,
)

from vaeflow.checks import InputError, check_choice, check_number
from vaeflow.provenance import git_commit
from vaeflow.runs import Run, atomic_write_json

__all__ = ["STAGES", "main"]

REPO = Path(__file__).resolve().parents[1]
# In the order of what the targets rest on: the speed ratios (bench and reference),
# then a whole table row; the graph check of `vaeflow train` last, on what is left (a second,
# short call can run it alone: --stages graph --minutes 3).
STAGES = ("bench", "reference", "table", "graph")
# Relative shares of the time left (normalised over the stages still to run). The bench has
# 19 variants, the speed targets rest on it; the table's row needs minutes per cell.
STAGE_SHARES = {"bench": 0.28, "reference": 0.17, "table": 0.43, "graph": 0.12}
# The graph check: `vaeflow train` of a fixed-step FFJORD, eager then with the whole step in a
# CUDA graph (--set cuda_graph=true), same seed and steps; their losses and speeds side by side.
# Validation and test run eagerly with dopri5 in both (the evaluation solve of a fixed-step run):
# few points, so that they dilute the training seconds compared as little as possible.
GRAPH_ARGS = ("--dataset", "static_mnist", "--flow", "ffjord", "--arch", "mlp",
              "--set", "latent_dim=32", "--set", "context_dim=64",
              "--set", "net_kwargs={hidden_sizes=[512,256]}", "--flow-opt", "hidden_dims=[64,64]",
              "--flow-opt", "rank=4", "--flow-opt", "method=rk4",
              "--flow-opt", "solver_options={step_size=0.25}", "--set", "is_samples=0",
              "--set", "eval_points=1000", "--set", "valid_points=1000", "--set", "pictures=false",
              "--quiet")  # fmt: skip
GRAPH_STEPS = 200
GRAPH_MIN_S = 60.0  # per run, off in a smoke run
FLOWS = ("none", "planar", "iaf", "orthogonal", "householder", "triangular", "ffjord")
# Per-cell settings of the GPU row (before --table-set): the KL warm-up of the protocol (100
# epochs) cannot happen in minutes, so beta is 1 from the start; the test NELBO on a fixed
# subset of 2000 test points and FFJORD's exact trace in wide batches keep the evaluation to
# seconds; no importance sampling (not in the paper's table).
TABLE_SETS = ("warmup_epochs=0", "is_samples=0", "eval_points=2000", "valid_points=2000",
              "eval_batch_rows=12800", "pictures=false")  # fmt: skip
REPORT_RESERVE_S = 20.0  # kept for the reports and the archive
LOG_SUFFIXES = (".log", ".json", ".md", ".csv", ".txt")
LOG_LIMIT = 12 * 2**20  # logs.tar.gz stays well under the device tool's 16 MiB per file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/gpu_run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where the (at most 6) result files go")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget (default 8)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the rehearsal)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--work", type=Path, help="scratch folder (default .gpu/work/<time>)")
    p.add_argument("--data-dir", type=Path, default=REPO / ".gpu" / "data",
                   help="holds binarized_mnist.npz (default .gpu/data)")
    p.add_argument("--reference", type=Path, default=REPO / ".gpu" / "reference",
                   help="copy of ../shared/reference (default .gpu/reference)")
    p.add_argument("--variants", nargs="+", help="bench variants (default: all that matter)")
    p.add_argument("--reference-flows", nargs="+", choices=list(REFERENCE_FLOWS))
    p.add_argument("--reference-iters", type=int, help="batches per flow (default 40; smoke 3)")
    p.add_argument("--dataset", default="static_mnist", help="the table's row")
    p.add_argument("--table-flows", nargs="+", choices=FLOWS)
    p.add_argument("--table-set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a cell setting after the defaults ({' '.join(TABLE_SETS)})")
    p.add_argument("--fault", action="append", default=[], metavar="VARIANT=raise|hang",
                   help="testing the guards: make a bench variant raise or hang")
    p.add_argument("--variant-timeout", type=float, help="seconds per bench variant (default: "
                   "its share of the stage)")
    return p


def _environment(device: str) -> dict[str, Any]:
    """What the run ran on; imports torch in this process (cheap, and no stage needs it)."""
    import torch
    from bench_report import environment

    env: dict[str, Any] = dict(environment(device))
    env.update(cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
               else None,
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
               tf32_cudnn=torch.backends.cudnn.allow_tf32,
               float32_matmul_precision=torch.get_float32_matmul_precision(),
               cpu_count=os.cpu_count())  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")  # fmt: skip
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError) as err:
            env["driver"] = f"unknown ({type(err).__name__})"
    return env


def _strict(value: Any) -> Any:
    """``value`` with each non-finite float as its name in a string ("NaN", "Infinity",
    "-Infinity"): ``summary.json`` is strict JSON (``atomic_write_json`` refuses NaN), and on a
    GPU a variant whose loss diverged reports it as NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _resolve_device(requested: str, smoke: bool) -> str:
    """``--device``, with ``auto`` made ``cuda`` when there is one (``cpu`` in a smoke run)."""
    if requested != "auto":
        return requested
    if smoke:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _items(items: Sequence[str], name: str, valid: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--{name} takes NAME=VALUE, got {item!r}")
        out[key] = check_choice(f"--{name} value", value, valid)
    return out


class GpuRun:
    """The stages of one run and what they found (``self.summary``)."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        from bench_timing import repo_env

        self.args = args
        self.smoke = args.smoke
        self.deadline = Deadline(args.minutes * 60)
        self.out: Path = args.out_dir
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.work: Path = args.work or REPO / ".gpu" / "work" / stamp
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.child_env = repo_env(PYTHONUNBUFFERED="1")
        self.faults = _items(args.fault, "fault", FAULTS)
        self.stages: dict[str, Any] = {}
        self.summary: dict[str, Any] = {
            "command": "python experiments/gpu_run.py " + shlex.join(argv),
            "smoke": self.smoke, "minutes": args.minutes, "commit": git_commit(REPO),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stages": self.stages,
        }  # fmt: skip

    # ---- the stages ---------------------------------------------------------------------

    def stage_deadline(self, name: str) -> Deadline:
        """``name``'s share of the time left, among the stages still to run."""
        todo = [s for s in STAGES if s in self.args.stages and s not in self.stages]
        share = STAGE_SHARES[name] / sum(STAGE_SHARES[s] for s in todo)
        return self.deadline.sub(max(self.deadline.left() - REPORT_RESERVE_S, 0.0) * share)

    def environment(self) -> None:
        env = _environment(self.device)
        self.summary["environment"] = env
        self.summary["device"] = env.get("gpu") or env.get("device_name")

    def bench(self) -> None:
        variants = self.args.variants or [
            v for v in DEFAULT_VARIANTS if not (self.smoke and v in SMOKE_SKIPPED)]
        size = "small" if self.smoke else "paper"
        request = {"size": size, "device": self.device, "iters": 3 if self.smoke else 30,
                   "warmup": 1 if self.smoke else 5, "batch_size": 10 if self.smoke else None,
                   "threads": 1 if self.smoke else None}
        records = run_bench(variants, self.stage_deadline("bench"), self.logs / "bench.log",
                            self.child_env, request, self.faults, self.args.variant_timeout)
        self.summary["bench"] = {"size": size, **request, "variants": records}

    def reference(self) -> None:
        missing = missing_dependencies()
        if missing:
            self.summary["reference"] = {"skipped": f"missing modules: {', '.join(missing)}"}
            return
        stage = self.stage_deadline("reference")
        iters = self.args.reference_iters or (3 if self.smoke else 40)
        batch = 10 if self.smoke else 100
        run_dir = prepare_reference(self.args.reference, self.work, self.npz, batch * (iters + 2))
        flows = self.args.reference_flows or list(REFERENCE_FLOWS)
        records = run_reference(flows, run_dir, stage, self.logs, self.child_env, iters,
                                cuda=self.device.startswith("cuda"), smoke=self.smoke)
        self.summary["reference"] = {
            "iters": iters, "flows": records,
            "note": "the reference's own per-batch Time (wall-clock between batch ends, its "
                    "host syncs included), median after the first batches; it read the first "
                    f"{batch * (iters + 2)} training images only (enough for the batches timed)",
        }  # fmt: skip

    def graph(self) -> None:
        """Eager and CUDA-graphed training of the same run: final losses and seconds."""
        stage = self.stage_deadline("graph")
        floor = 0.0 if self.smoke else GRAPH_MIN_S
        usable = self.deadline.left() - REPORT_RESERVE_S
        if usable < 2 * floor:
            # two runs killed before their first steps would measure nothing: say so, and how
            raise RuntimeError(
                f"{usable:.0f} s left, the graph check's two runs need {2 * floor:.0f} s; run "
                "it alone: experiments/gpu_run.py OUT --stages graph --minutes 3")
        steps = 3 if self.smoke else GRAPH_STEPS
        sets = ["--set", "split_sizes=[200,50,50]", "--set", "eval_points=20"] if self.smoke else []
        out: dict[str, Any] = {"steps": steps}
        for mode in ("eager", "graph"):
            run = self.work / "graph" / mode
            cmd = [sys.executable, "-m", "vaeflow.cli", "train", *GRAPH_ARGS, *sets,
                   "--data-dir", str(self.npz.parent), "--device", self.device,
                   "--max-steps", str(steps), "--set", f"cuda_graph={str(mode == 'graph').lower()}",
                   "--out", str(run)]  # fmt: skip
            # Each run starts Python, torch and CUDA before its first step: below a floor of
            # time the check would measure nothing, so it may take more than its share.
            share = max(stage.left() / (2 if mode == "eager" else 1), floor)
            share = min(share, max(self.deadline.left() - REPORT_RESERVE_S, 1.0))
            done = stream_lines(cmd, share, self.logs / f"graph-{mode}.log", env=self.child_env)
            record = Run(run)
            results, timing = record.results, record.timing or {}
            history = record.history if record.is_run else []
            out[mode] = {
                "returncode": done.returncode, "seconds": round(done.seconds, 1),
                "train_seconds": timing.get("train_seconds"),
                "train_loss": history[-1].get("train_loss") if history else None,
                "test_nelbo": results and results["test_nelbo"],
                "fallback": any("training without a CUDA graph" in line for line in done.lines),
            }  # fmt: skip
        eager, graph = out["eager"], out["graph"]
        if eager["train_seconds"] and graph["train_seconds"]:
            out["speedup"] = round(eager["train_seconds"] / graph["train_seconds"], 2)
        if eager["test_nelbo"] is not None and graph["test_nelbo"] is not None:
            out["nelbo_difference"] = round(graph["test_nelbo"] - eager["test_nelbo"], 4)
        self.summary["graph"] = out
        if eager["returncode"] != 0 or graph["returncode"] != 0:  # None: killed at its limit
            raise RuntimeError(f"a graph-check run failed or ran out of time: see "
                               f"{self.logs}/graph-*.log")

    def table(self) -> None:
        stage = self.stage_deadline("table")
        flows = self.args.table_flows or list(FLOWS)
        cell_minutes = None if self.smoke else max(0.5, (stage.left() - OVERHEAD_S) / 60)
        sets = [*((SMOKE_SETS + ("is_samples=0",)) if self.smoke else TABLE_SETS),
                *self.args.table_set]
        cuda = self.device.startswith("cuda")
        runs = self.work / "table" / "runs"
        command = dict(
            dataset=self.args.dataset, flows=flows, runs_dir=runs,
            report_dir=self.logs / "table-report", device=self.device,
            data_dir=self.npz.parent, cell_minutes=cell_minutes,
            parallel=len(flows) if cuda else min(2, len(flows)), sets=sets,
            flow_opts=SMOKE_FLOW_OPTS if self.smoke else (),
        )  # fmt: skip
        ran = run_table(command, stage, self.logs / "table.log", self.child_env)
        self.summary["table"] = {
            "dataset": self.args.dataset, "cell_minutes": cell_minutes, "sets": sets,
            "cells": cell_records(runs, flows), **ran,
        }  # fmt: skip
        if "error" in ran:
            raise RuntimeError(ran["error"])

    # ---- driving it ---------------------------------------------------------------------

    def data(self) -> None:
        """The data file the reference and the table read (a tiny one in a smoke run)."""
        source = self.args.data_dir / "binarized_mnist.npz"
        if self.smoke:
            self.npz = write_tiny_mnist(self.work / "data", source, (200, 50, 50))
        elif source.is_file():
            self.npz = source
        else:
            raise FileNotFoundError(f"{source} is missing (see results/gpu/README.md)")

    def run(self) -> int:
        # Resolved before the environment is recorded: that stage asks torch about the device,
        # and torch knows no device "auto" (it failed, and the run went on on the CPU).
        self.device = _resolve_device(self.args.device, self.smoke)
        guarded(self.stages, "environment", self.environment)
        has_data = guarded(self.stages, "data", self.data) is not None or hasattr(self, "npz")
        for name in STAGES:
            if name not in self.args.stages:
                continue
            if name != "bench" and not has_data:
                self.stages[name] = {"status": "skipped", "error": "no data (see stage data)"}
                continue
            print(f"== {name}: {self.deadline.left():.0f} s left", flush=True)
            guarded(self.stages, name, getattr(self, name))
        if "reference" in self.summary and "skipped" in self.summary["reference"]:
            self.stages["reference"] = {"status": "skipped",
                                        "error": self.summary["reference"]["skipped"]}
        # guarded like the stages: a bug in the analysis must not cost the report
        self.summary["ratios"] = guarded(self.stages, "ratios", lambda: speedups(self.summary))
        self.summary["targets"] = guarded(self.stages, "targets", lambda: targets(self.summary))
        self.summary["wall_s"] = round(self.deadline.elapsed(), 1)
        guarded(self.stages, "report", self.write)
        print(f"wrote {self.out} in {self.deadline.elapsed():.0f} s", flush=True)
        return 0

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench.md").write_text(render_bench(self.summary))
        (self.out / "table.md").write_text(render_table(self.summary))
        guarded(self.stages, "plot", self.plot)
        guarded(self.stages, "archive", self.archive)
        self.summary["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(_strict(self.summary), self.out / "summary.json")

    def plot(self) -> None:
        from vaeflow.plots import plot_learning_curves

        cells = self.summary.get("table", {}).get("cells", [])
        runs = [c["run_dir"] for c in cells if c.get("run_dir")]
        if runs:
            plot_learning_curves(runs, self.out / "nelbo_vs_time.png")

    def archive(self) -> None:
        """``logs.tar.gz``: the small text files of the work folder (no checkpoints)."""
        json.dumps(self.summary)  # fails here, not in the archive, if not serialisable
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "logs.tar.gz"
            with tarfile.open(path, "w:gz") as tar:
                for f in sorted(self.work.rglob("*")):
                    small = f.is_file() and f.stat().st_size < 2**20
                    if small and f.suffix in LOG_SUFFIXES and "reference/ffjord" not in str(f):
                        tar.add(f, arcname=str(f.relative_to(self.work)))
            if path.stat().st_size > LOG_LIMIT:
                raise RuntimeError(f"logs.tar.gz is {path.stat().st_size} bytes: left out")
            (self.out / "logs.tar.gz").write_bytes(path.read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_number("--minutes", args.minutes, positive=True)
        _items(args.fault, "fault", FAULTS)
        if args.out_dir.is_dir() and any(args.out_dir.iterdir()):
            raise InputError(f"{args.out_dir} is not empty: give a new folder")
    except InputError as err:
        parser.error(str(err))
    return GpuRun(args, argv).run()


if __name__ == "__main__":
    exit_on_sigterm()  # the stages' children are killed on the way out
    sys.exit(main())
