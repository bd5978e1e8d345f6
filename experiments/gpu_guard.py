"""Guards for a GPU window that must not be wasted: a wall-clock deadline shared out between
stages, stages that record their error instead of ending the run, and child processes that are
given a time limit (a hung stage is killed, recorded and the run goes on).

Nothing here imports torch: the guards work whatever state the device is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Deadline",
    "LineWorker",
    "StageTimeout",
    "WorkerDied",
    "error_text",
    "exit_on_sigterm",
    "guarded",
    "send",
    "stream_lines",
]


def error_text(err: BaseException, limit: int = 500) -> str:
    """``"Type: first line of the message"``, at most ``limit`` characters."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:limit]


class Deadline:
    """A wall-clock deadline ``seconds`` from now (``time.monotonic`` based)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        """Seconds until the deadline (0 once past it)."""
        return max(0.0, self.end - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sub(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, never past this one."""
        return Deadline(min(seconds, self.left()))


def guarded(record: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn()``; record ``{"status", "seconds"[, "error", "traceback"]}`` as
    ``record[name]`` and return its value, or ``None`` when it raised (the run goes on)."""
    t0 = time.monotonic()
    try:
        value = fn()
    except Exception as err:  # a failed stage must not lose the others
        record[name] = {
            "status": "failed",
            "seconds": round(time.monotonic() - t0, 2),
            "error": error_text(err),
            "traceback": traceback.format_exc()[-2000:],
        }
        return None
    record[name] = {"status": "ok", "seconds": round(time.monotonic() - t0, 2)}
    return value


class StageTimeout(RuntimeError):
    """A child process did not answer within its time limit (it was killed)."""


class WorkerDied(RuntimeError):
    """A child process exited before it answered."""


def _pump(stream: IO[str], lines: queue.Queue[str | None], tee: IO[str] | None) -> None:
    """Copy ``stream``'s lines into ``lines`` (and ``tee``), then ``None`` at its end."""
    try:
        for line in stream:
            if tee is not None:
                tee.write(line)
                tee.flush()
            lines.put(line)
    finally:  # the end is always told, or the waiting side would wait for its time limit
        lines.put(None)


def _spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """``Popen`` of ``cmd`` as the leader of a process group of its own (a new session), so
    that :func:`_kill` reaches what it started too: ``experiments/table.py``'s training cells,
    which would otherwise outlive its SIGKILL and go on training on the GPU through the next
    stage. Text is decoded leniently: one byte that is not UTF-8 must not end the reading."""
    return subprocess.Popen(list(cmd), text=True, errors="replace", start_new_session=True,
                            **kwargs)  # fmt: skip


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process with ``SystemExit``, so that the ``finally`` blocks that
    kill the children's process groups run: each child leads a session of its own
    (:func:`_spawn`), and a SIGTERM to this process's group (a time limit of whatever runs it)
    no longer reaches them; by default it ended this process at once, leaving them running."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` and whatever is left of its process group (also after ``proc`` exited:
    a crashed ``table.py`` leaves its cells running), then reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group's id is the leader's pid
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


@dataclass
class StreamResult:
    """What :func:`stream_lines` saw: every output line, the exit status (``None`` when the
    process was killed) and whether it was killed for its time limit."""

    lines: list[str]
    returncode: int | None
    timed_out: bool
    seconds: float


def stream_lines(
    cmd: Sequence[str],
    timeout: float,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stop: Callable[[list[str]], bool] | None = None,
) -> StreamResult:
    """Run ``cmd`` with stdout and stderr merged, copied line by line to ``log`` and kept; kill
    it after ``timeout`` seconds, or as soon as ``stop(lines so far)`` is true. Lines printed
    before a kill are kept, so a stage cut short still reports what it measured."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as tee:
        tee.write(f"=== {' '.join(cmd)}\n")
        tee.flush()
        proc = _spawn(
            cmd, cwd=cwd, env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, tee), daemon=True)
        reader.start()
        seen: list[str] = []
        timed_out = False
        try:
            while True:
                left = t0 + timeout - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                try:
                    line = lines.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    # Its output has ended, but a process can take a while to exit after that
                    # (interpreter and CUDA teardown): wait for its status within the time left.
                    try:
                        proc.wait(timeout=max(t0 + timeout - time.monotonic(), 0.0))
                    except subprocess.TimeoutExpired:
                        timed_out = True
                    break
                seen.append(line.rstrip("\n"))
                if stop is not None and stop(seen):
                    break
            killed = proc.poll() is None
        finally:  # also on Ctrl-C: its own session does not get the terminal's SIGINT
            _kill(proc)
            reader.join(timeout=5)
        if timed_out:
            tee.write(f"=== killed after its time limit of {timeout:.0f} s\n")
    return StreamResult(seen, None if killed else proc.returncode, timed_out,
                        time.monotonic() - t0)  # fmt: skip


class LineWorker:
    """A child process spoken to in JSON lines: each request is one line on its stdin, each
    answer one line on its stdout that starts with ``prefix``; other output goes to ``log``.
    An answer that does not come within its time limit kills the process
    (:class:`StageTimeout`); a process that exits first raises :class:`WorkerDied`."""

    prefix = "@@ "

    def __init__(self, cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "a")  # noqa: SIM115 - closed in close()
        self.log.write(f"=== {' '.join(cmd)}\n")
        self.log.flush()
        self.proc = _spawn(
            cmd, env=None if env is None else dict(env),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(
            target=_pump, args=(self.proc.stdout, self.lines, self.log), daemon=True
        )
        self.reader.start()

    def answer(self, timeout: float) -> dict[str, Any]:
        """The next answer line, parsed."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                self.close()
                raise StageTimeout(f"no answer within its time limit of {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:  # its stdout closed: the process has ended
                rc = self.proc.wait()
                self.close()
                raise WorkerDied(f"the worker process exited with status {rc} before answering")
            if line.startswith(self.prefix):
                return json.loads(line[len(self.prefix) :])

    def request(self, message: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``message`` and wait at most ``timeout`` seconds for its answer."""
        try:
            self.proc.stdin.write(json.dumps(dict(message)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            self.close()
            raise WorkerDied(f"the worker process is gone ({error_text(err)})") from err
        return self.answer(timeout)

    def close(self) -> None:
        """End the process (killed if still running) and close its log."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        _kill(self.proc)
        self.reader.join(timeout=5)
        if not self.log.closed:
            self.log.close()


def send(message: Mapping[str, Any]) -> None:
    """In a worker: write one answer line for :class:`LineWorker`."""
    print(LineWorker.prefix + json.dumps(dict(message)), flush=True)
