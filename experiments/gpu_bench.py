"""The GPU run's benchmark stage: every variant timed in a worker process, each under its own
time limit, so that a variant that raises, crashes the process or hangs is recorded with its
error and the next one runs (in a fresh worker where the old one is gone).

The worker is this file run as a script (``python experiments/gpu_bench.py``): it answers one
JSON request per variant (``bench_timing.bench_variant``'s arguments) with that variant's
:class:`bench_report.Result`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench_variants import BASELINES
from gpu_guard import Deadline, LineWorker, StageTimeout, WorkerDied, error_text, send

__all__ = ["DEFAULT_VARIANTS", "SMOKE_SKIPPED", "run_bench"]

# The variants the GPU run times, most important first: the flows' defaults (the paper
# comparison), then each baseline's step in one CUDA graph (the same step: small models are
# launch-bound on a GPU, and `vaeflow train --set cuda_graph=true` trains so), then FFJORD's
# variants; the compiled ones, slowest to start, come last and get the time that is left.
DEFAULT_VARIANTS = (
    "ffjord", "none", "planar", "iaf", "orthogonal", "householder", "triangular",
    *(f"{name}-cudagraph" for name in BASELINES),
    "ffjord-fused", "ffjord-rk4", "ffjord-rk4-cudagraph", "ffjord-adjoint",
    "ffjord-compiled", "ffjord-rk4-compiled-cudagraph",
)  # fmt: skip
# torch.compile takes a minute or more on a CPU: not in a smoke run.
SMOKE_SKIPPED = ("ffjord-compiled", "ffjord-rk4-compiled-cudagraph")
FAULTS = ("raise", "hang")
WORKER = Path(__file__).resolve()
MIN_S = 20.0  # the least time a variant gets while the stage has it


def run_bench(
    variants: Sequence[str],
    stage: Deadline,
    log: Path,
    env: Mapping[str, str],
    request: Mapping[str, Any],
    faults: Mapping[str, str] | None = None,
    variant_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Time ``variants`` in turn before ``stage`` ends; ``request`` holds the common arguments
    of :func:`bench_timing.bench_variant` (size, device, iters, warmup, batch_size).

    Each variant gets at most ``variant_timeout`` seconds, by default its share of the time
    left (the first of n variants 2/(n+1) of it, the last all that is left; at least ``MIN_S``)
    and times steps for at most a third of that; a worker's start is not counted. Returns one
    record per variant: ``{"variant", "status": "ok" | "failed" | "timeout" | "skipped",
    "result": Result fields | None, "error", "seconds"}``.
    """
    records: list[dict[str, Any]] = []
    worker: LineWorker | None = None
    try:
        for i, name in enumerate(variants):
            left, n_left = stage.left(), len(variants) - i
            record: dict[str, Any] = {"variant": name, "result": None, "error": ""}
            records.append(record)
            if left < 2:
                record.update(status="skipped", error="no time left in the stage")
                continue
            t0 = time.monotonic()
            message = {**request, "variant": name}
            if faults and name in faults:
                message["fault"] = faults[name]
            try:
                if worker is None:  # its start (importing torch) is not the variant's time
                    worker = LineWorker([sys.executable, str(WORKER)], log, env)
                    worker.answer(min(stage.left(), 120.0))
                    t0, left = time.monotonic(), stage.left()
                limit = variant_timeout or max(left * 2 / (n_left + 1), min(MIN_S, left))
                message["max_seconds"] = max(1.0, limit / 3)
                reply = worker.request(message, limit)
            except StageTimeout as err:
                record.update(status="timeout", error=str(err))
                worker = None
            except WorkerDied as err:
                record.update(status="failed", error=f"{err} (see the log)")
                worker = None
            else:
                record.update(status=reply["status"], result=reply.get("result"))
                record["error"] = reply.get("error", "")
                if reply.get("restart") and worker is not None:
                    worker.close()  # a CUDA error poisons the process: start afresh
                    worker = None
            record["seconds"] = round(time.monotonic() - t0, 2)
            print(f"bench {name:30s} {record['status']} {record['error']}", flush=True)
    finally:
        if worker is not None:
            worker.close()
    return records


def _device_unfit(torch: Any) -> bool:
    """After a variant raised: whether this worker's CUDA state is unfit for the next one (the
    parent then starts a new worker). Only a GPU shows these: a broken context fails to
    synchronise or to draw; and a failed CUDA-graph capture (``GraphedStep`` in the benchmark
    has no eager fallback) leaves the capture stream current, since ``torch.cuda.graph``'s
    ``__exit__`` skips leaving it when ``capture_end`` raises, with its allocations still routed
    to the failed graph's pool: every later variant would run there."""
    if not torch.cuda.is_available():
        return False
    try:
        if torch.cuda.current_stream() != torch.cuda.default_stream():
            return True
        torch.randn(1, device="cuda")
        torch.cuda.synchronize()
    except Exception:  # the context is broken
        return True
    return False


def _serve() -> int:
    """The worker: answer each request line with the variant's result."""
    import torch
    from bench_timing import bench_variant

    send({"ready": True})
    for line in sys.stdin:
        message = json.loads(line)
        fault = message.pop("fault", None)
        name = message.pop("variant")
        threads = message.pop("threads", None)
        if threads:  # one thread: tiny steps on a busy CPU otherwise thrash
            torch.set_num_threads(threads)
        try:
            if fault == "raise":
                raise RuntimeError(f"injected fault in {name} (a test of the guard)")
            if fault == "hang":
                time.sleep(10**6)
            result = bench_variant(name, **message)
        except Exception as err:  # recorded by the parent; the next variant still runs
            restart = _device_unfit(torch)
            send({"status": "failed", "error": error_text(err), "restart": restart,
                  "traceback": traceback.format_exc()[-2000:]})  # fmt: skip
            continue
        fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "samples"}
        status = "skipped" if result.note.startswith("skipped") else "ok"
        send({"status": status, "result": fields, "error": result.note if status != "ok" else ""})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    if sys.argv[1:]:  # the parent starts the worker without arguments; a person, with --help
        print(f"{__doc__.strip()}\n\nRun the GPU benchmark with experiments/gpu_run.py "
              "(--stages bench); this file takes no arguments.", file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    sys.exit(_serve())
