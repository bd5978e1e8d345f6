"""The process pool of ``experiments/table.py``: cells as ``vaeflow train`` subprocesses, placed
on devices, stopped cleanly at a deadline or on a signal.

Placement. A :class:`Placement` lists the devices (``cuda:0``, ``cuda:1``, ... or ``cpu``; a
name may repeat, ``cpu,cpu`` is two slots groups on the CPU), how many cells one device runs at
once (``per_device``) and how many run at once in all (``parallel``). A cell is started on the
device that runs the fewest cells and still has room (ties: the first listed), so the cells
spread over the GPUs before they share one. The subprocess sees only its device:
``CUDA_VISIBLE_DEVICES`` names that one GPU (or none, for ``cpu``) and the cell's config keeps
its device-neutral ``auto``. A cell therefore resumes on whichever device is free when the grid
goes on, and ``vaeflow train --resume`` needs no device option.

The rule for the three options (:meth:`Placement.of`): with neither ``parallel`` nor
``per_device``, one cell per device; ``parallel`` P alone shares P cells out over the devices
(at most ceil(P / devices) on one; on one GPU this is the historical meaning of ``--parallel``);
``per_device`` K alone runs K on every device; both: at most P in all and K on one device.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from vaeflow.checks import InputError, check_positive_int

__all__ = [
    "INTERRUPTED",
    "Job",
    "JobResult",
    "Placement",
    "child_env",
    "device_env",
    "parse_devices",
    "read_json",
    "run_jobs",
    "utc_now",
]

# exit statuses of a cell that was stopped by a signal and kept its checkpoint
INTERRUPTED = (130, -signal.SIGTERM, -signal.SIGINT)


def utc_now() -> str:
    """The time now, as the grid's records and reports write it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------------
# Devices and placement
# --------------------------------------------------------------------------------------------


def parse_devices(text: str, cuda_count: int | None = None) -> tuple[str, ...]:
    """``"auto"`` -> every visible CUDA device, else ``("cpu",)``; ``"cuda"`` -> every visible
    CUDA device; otherwise a comma-separated list of ``cpu`` and ``cuda:N``.

    ``cuda_count`` is the number of visible CUDA devices (``torch.cuda.device_count()`` when
    None; tests pass a number to plan for GPUs on a CPU machine).
    """
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise InputError("--devices needs at least one device (auto, cpu, cuda, cuda:N)")
    out: list[str] = []
    for name in names:
        if name == "auto":
            out += [f"cuda:{i}" for i in range(count)] or ["cpu"]
        elif name == "cpu":
            out.append("cpu")
        elif name == "cuda" or name.startswith("cuda:"):
            index = name.partition(":")[2]
            if index and not index.isdigit():
                raise InputError(f"bad device {name!r}: expected cuda:N with N a number")
            if not count:
                raise InputError(f"device {name!r} asked for, but no CUDA device is visible")
            if index and int(index) >= count:
                raise InputError(
                    f"device {name!r} asked for, but only {count} CUDA device(s) are visible "
                    f"(cuda:0 to cuda:{count - 1})"
                )
            out += [name] if index else [f"cuda:{i}" for i in range(count)]
        else:
            raise InputError(f"unknown device {name!r}; valid devices are auto, cpu, cuda, cuda:N")
    return tuple(out)


@dataclass(frozen=True)
class Placement:
    """Where cells run: ``devices`` (``None`` for "as the environment says"), at most
    ``per_device`` cells at once on one of them and ``parallel`` in all."""

    devices: tuple[str | None, ...]
    per_device: int
    parallel: int

    @classmethod
    def of(
        cls, devices: Sequence[str], parallel: int | None = None, per_device: int | None = None
    ) -> Placement:
        """The placement of the module docstring's rule."""
        if not devices:
            raise InputError("the grid needs at least one device")
        n = len(devices)
        if parallel is not None:
            check_positive_int("--parallel", parallel)
        if per_device is not None:
            check_positive_int("--per-device", per_device)
        if per_device is None:
            per_device = 1 if parallel is None else math.ceil(parallel / n)
        elif parallel is not None and parallel > per_device * n:
            raise InputError(
                f"--parallel {parallel} cells cannot run at once on {n} device(s) with "
                f"--per-device {per_device}; raise --per-device or drop one of the two"
            )
        return cls(tuple(devices), per_device, per_device * n if parallel is None else parallel)

    @classmethod
    def anywhere(cls, parallel: int) -> Placement:
        """``parallel`` cells at once, in the environment they are given."""
        return cls((None,), parallel, parallel)

    def pick(self, running: Sequence[int]) -> int | None:
        """The index of the device for the next cell, given the cells running on each device
        (``running[i]``); None when no cell may start now."""
        if sum(running) >= self.parallel:
            return None
        free = [i for i, k in enumerate(running) if k < self.per_device]
        return min(free, key=lambda i: running[i]) if free else None

    def describe(self) -> str:
        """E.g. ``"cuda:0, cuda:1 (2 per device)"``."""
        names = ", ".join(d or "the default device" for d in self.devices)
        return f"{names} ({self.per_device} per device)"


def device_env(env: Mapping[str, str], device: str | None) -> dict[str, str]:
    """``env`` for a subprocess that must see only ``device``: ``CUDA_VISIBLE_DEVICES`` names
    its GPU (as numbered in ``env``'s own ``CUDA_VISIBLE_DEVICES``, when that is set) or none."""
    out = dict(env)
    if device is None:
        return out
    if device == "cpu":
        out["CUDA_VISIBLE_DEVICES"] = ""  # the cell's "auto" device is then the CPU
        return out
    index = int(device.partition(":")[2] or 0)
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and index < len(visible):
        out["CUDA_VISIBLE_DEVICES"] = visible[index]
    else:
        out["CUDA_VISIBLE_DEVICES"] = str(index)
    return out


def child_env(parallel: int) -> dict[str, str]:
    """The environment of the cells: this ``vaeflow`` on the path, and the CPU threads shared
    out between the cells that run at once."""
    import vaeflow

    env = dict(os.environ)
    root = str(Path(vaeflow.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One subprocess: its command, its log file and a name to report. ``device`` is set by
    :func:`run_jobs` when the job starts."""

    name: str
    command: list[str]
    log: Path
    mode: str = "start"  # "start", "resume", "extend" (resume, larger budget) or "restart"
    run_dir: Path | None = None
    device: str | None = None
    # an "extend" job's new budget (config key -> value): its cell's figures count only once
    # its config holds it (before, they are those of the old budget)
    budget: Mapping[str, Any] | None = None


@dataclass
class JobResult:
    job: Job
    returncode: int
    seconds: float
    started: str
    error: str = ""  # the last line of the log when it failed

    @property
    def ok(self) -> bool:
        """It exited cleanly, or (a signal that came during the final evaluation) it still
        wrote its figures (a ``results.json`` that marks a failure does not count); for an
        ``extend`` job, figures under the run's new budget."""
        from vaeflow.runs import CONFIG, Run

        if self.returncode == 0:
            return True
        if self.job.run_dir is None or not Run(self.job.run_dir).finished:
            return False
        if self.job.budget:
            # a resume refused (a time budget still below what the run trained) or stopped
            # before it wrote the new budget leaves the old figures: not this job's
            config = read_json(self.job.run_dir / CONFIG)
            budget = self.job.budget.items()
            return isinstance(config, dict) and all(config.get(k) == v for k, v in budget)
        return True


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or damaged (the grid's own records:
    a damaged one must not stop a grid or a report)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def last_line(path: Path, limit: int = 8192) -> str:
    """The last non-empty line of a log that is not one of the pool's own ``===`` headers."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("===")]
    return lines[-1] if lines else ""


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen[bytes] | None
    t0: float
    started: str
    log: TextIO
    slot: int


def run_jobs(
    jobs: Sequence[Job],
    placement: Placement | int,
    env: Mapping[str, str] | None = None,
    on_start: Callable[[Job], None] | None = None,
    on_finish: Callable[[JobResult], None] | None = None,
    poll_seconds: float = 0.1,
    grace_seconds: float = 120.0,
    deadline: float | None = None,
) -> list[JobResult]:
    """Run ``jobs`` as subprocesses, in order, placed by ``placement`` (an int P: P at a time,
    in ``env`` as it is).

    Each job's stdout and stderr are appended to its log. A job that fails does not stop the
    others. At ``deadline`` (a ``time.monotonic()`` value) no job is started any more and the
    running ones get SIGTERM (``vaeflow train`` then writes a checkpoint and exits); they are
    waited for ``grace_seconds``, then killed. On ``KeyboardInterrupt`` the same happens and
    the interrupt is raised again. Every job that ran is reported through ``on_finish`` and in
    the returned list; jobs never started are in neither.
    """
    if isinstance(placement, int):
        placement = Placement.anywhere(placement)
    base = dict(os.environ if env is None else env)
    pending = list(jobs)
    running: list[_Running] = []
    load = [0] * len(placement.devices)
    results: list[JobResult] = []

    def finish(item: _Running, rc: int) -> None:
        item.log.close()
        load[item.slot] -= 1
        result = JobResult(item.job, rc, time.perf_counter() - item.t0, item.started)
        if rc != 0:
            result.error = last_line(item.job.log)
        results.append(result)
        if on_finish is not None:
            on_finish(result)

    def start(job: Job, slot: int) -> None:
        job.device = placement.devices[slot]
        job.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log, "a")  # noqa: SIM115 - closed in finish()
        started = utc_now()
        where = f" (on {job.device})" if job.device else ""
        log.write(f"=== {started}{where}: {shlex.join(job.command)}\n")
        log.flush()
        load[slot] += 1
        item = _Running(job, None, time.perf_counter(), started, log, slot)
        try:
            item.proc = subprocess.Popen(
                job.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=device_env(base, job.device),
            )
        except OSError as err:
            log.write(f"cannot start: {err}\n")
            finish(item, 127)
            return
        running.append(item)
        if on_start is not None:
            on_start(job)

    def reap() -> None:
        for item in list(running):
            assert item.proc is not None
            rc = item.proc.poll()
            if rc is not None:
                running.remove(item)
                finish(item, rc)

    def stop_all() -> None:
        pending.clear()
        for item in running:
            with contextlib.suppress(OSError):
                item.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        kill_at = time.monotonic() + grace_seconds
        while running:
            time.sleep(poll_seconds)
            if time.monotonic() > kill_at:
                for item in running:
                    with contextlib.suppress(OSError):
                        item.proc.kill()  # type: ignore[union-attr]
            reap()

    try:
        while pending or running:
            if deadline is not None and time.monotonic() >= deadline:
                stop_all()
                break
            while pending and (slot := placement.pick(load)) is not None:
                start(pending.pop(0), slot)
            time.sleep(poll_seconds)
            reap()
    except KeyboardInterrupt:
        stop_all()
        raise
    return results
