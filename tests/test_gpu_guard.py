"""The guards of the GPU run's stages: what a time limit or the end of a stage leaves behind.
A stage's child that started processes of its own (``experiments/table.py`` runs its cells
as ``vaeflow train`` subprocesses) must not leave them running on the GPU into the next
stage, whether the child was killed at its limit or ended by itself."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from gpu_guard import LineWorker, StageTimeout, stream_lines

# A child that starts a grandchild (which keeps no pipe of the parent's open, as a table
# cell writes to its own log), says its pid, then sleeps or exits.
_PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
    "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,\n"
    "                     stderr=subprocess.DEVNULL)\n"
    "print('@@ {\"pid\": %d}' % g.pid, flush=True)\n"
)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that no one reaped does not: it holds no GPU)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _gone(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _said_pid(log: Path) -> bool:
    """Whether the child's own line ``@@ {"pid": N}`` is in ``log`` (the command echoed above
    it holds ``@@ `` too, not at a line's start)."""
    return log.exists() and any(line.startswith("@@ ") for line in log.read_text().splitlines())


def _grandchild(lines: list[str]) -> int:
    return int(next(line for line in lines if line.startswith("@@ ")).split()[-1].rstrip("}"))


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def test_a_killed_stage_takes_what_it_started_with_it(tmp_path: Path) -> None:
    done = stream_lines([sys.executable, "-c", _PARENT + "time.sleep(120)"], 3, tmp_path / "a")
    assert done.timed_out and done.returncode is None
    assert _gone(_grandchild(done.lines)), "the grandchild outlived its stage's time limit"


def test_a_stage_that_ended_leaves_nothing_running(tmp_path: Path) -> None:
    # as experiments/table.py that raised while its cells trained
    done = stream_lines([sys.executable, "-c", _PARENT + "sys.exit(1)"], 30, tmp_path / "b")
    assert not done.timed_out and done.returncode == 1
    assert _gone(_grandchild(done.lines)), "the grandchild outlived its stage"


def test_a_worker_killed_at_its_limit_takes_what_it_started_with_it(tmp_path: Path) -> None:
    worker = LineWorker([sys.executable, "-c", _PARENT + "time.sleep(120)"], tmp_path / "c")
    pid = worker.answer(timeout=30)["pid"]
    with pytest.raises(StageTimeout):
        worker.request({"x": 1}, timeout=1)
    assert _gone(pid), "the worker's child outlived the worker's time limit"


def test_output_that_is_not_utf8_does_not_stop_the_reading(tmp_path: Path) -> None:
    # The reader thread died on the byte it could not decode, and the stage then waited for
    # its whole time limit for an end of output that nobody would tell, and called it a hang.
    code = ("import sys; sys.stdout.buffer.write(b'| Time 0.5 | \\xff\\n'); "
            "print('done', flush=True)")  # fmt: skip
    done = stream_lines([sys.executable, "-c", code], 20, tmp_path / "log")
    assert (done.timed_out, done.returncode) == (False, 0) and done.seconds < 15
    assert done.lines == ["| Time 0.5 | \ufffd", "done"]


def test_a_sigterm_to_the_run_takes_the_stages_children_with_it(tmp_path: Path) -> None:
    # Each child leads a session of its own, so a SIGTERM to the run's process group (the
    # time limit of whatever runs experiments/gpu_run.py) reaches the run alone: it must end
    # through the finally blocks that kill the children, not at once.
    import signal
    import subprocess

    log = tmp_path / "log"
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'experiments')!r})\n"
        "from pathlib import Path\n"
        "from gpu_guard import exit_on_sigterm, stream_lines\n"
        "exit_on_sigterm()\n"
        f"stream_lines([sys.executable, '-c', {_PARENT + 'time.sleep(120)'!r}], 60, "
        f"Path({str(log)!r}))\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script])
    try:
        end = time.monotonic() + 30
        while not _said_pid(log) and time.monotonic() < end:
            time.sleep(0.1)
        pid = _grandchild(log.read_text().splitlines())
        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=30)
        assert _gone(pid), "the stage's grandchild outlived the run"
        assert status == 128 + signal.SIGTERM
    finally:
        run.kill()
