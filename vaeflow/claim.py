"""A process's claim on a run directory: the lock of the one process that writes it, what
counts as a folder a new run may take, and the files a fresh start clears or a killed session
left half-written. :mod:`vaeflow.runs` names the files and reads them; this module decides who
may write them and when."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vaeflow.runs import BEST, CHECKPOINT, CONFIG, EVENTS, HISTORY, RESULTS, TIMING, RunError

__all__ = [
    "LOCK",
    "RUN_FILES",
    "RunLock",
    "check_new_run_dir",
    "clear_run_files",
    "remove_partial_writes",
    "stopped_before_training",
]

LOCK = ".lock"
# Files a fresh start (--overwrite) replaces; anything else in the folder is left alone.
RUN_FILES = (CHECKPOINT, BEST, CONFIG, RESULTS, TIMING, HISTORY)
RUN_PATTERNS = (EVENTS, "*.png")


class RunLock:
    """The run directory's owner: an exclusive ``flock`` on ``RUN/.lock`` held while a process
    trains in it. The kernel releases it when the process dies in any way (even ``kill -9``),
    so a killed run can always be resumed, while a second live process is refused."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(
                f"{self.path.parent} is in use by another vaeflow process (pid {owner}); wait "
                "for it to finish or stop it, or choose another --out"
            ) from err
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


def check_new_run_dir(run_dir: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse to start a run in a folder that already holds something, unless ``overwrite``:
    only an absent or empty folder is a new run (a finished run whose checkpoint was deleted
    still holds its results), or one where a start was killed before its first checkpoint
    (nothing was trained there; the same command, run again, goes on)."""
    directory = Path(run_dir)
    if directory.exists() and not directory.is_dir():
        raise RunError(f"--out {directory} is a file, not a folder")
    contents = sorted(p.name for p in directory.iterdir() if p.name != LOCK) if (
        directory.is_dir()) else []
    if not contents or overwrite or stopped_before_training(directory):
        return
    if (directory / LOCK).is_file():
        # A run that is training now: say so (its --resume would be refused as in use too).
        with RunLock(directory):  # taken and given back at once when free
            pass
    if (directory / CHECKPOINT).is_file():
        hint = f"continue it with `vaeflow train --resume {directory}`"
    else:
        hint = "it is not a run that can be resumed"
    shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
    raise RunError(
        f"{directory} already holds files ({shown}); {hint}, replace it with --overwrite, or "
        "choose another --out"
    )


def clear_run_files(run_dir: str | os.PathLike[str]) -> None:
    """Delete what a run writes (checkpoints, results, history, events, pictures), before an
    overwritten run starts afresh; other files in the folder are kept."""
    directory = Path(run_dir)
    doomed = [directory / name for name in RUN_FILES]
    for pattern in RUN_PATTERNS:
        doomed += directory.glob(pattern)
    for path in doomed:
        path.unlink(missing_ok=True)


def _partial_write(name: str) -> bool:
    """Whether ``name`` is the temporary file of an atomic write of a run file."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target = name[1:].rsplit(".", 2)[0]  # ".best.pt.k3j9.tmp" -> "best.pt"
    return target in RUN_FILES or target.endswith(".png")


def stopped_before_training(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` is a start stopped before its step-0 checkpoint (``kill -9``, a
    grid's Ctrl-C as its cells start): it holds the empty ``history.json`` that a start writes
    first, perhaps its ``config.json``, temporary files and the lock, nothing else."""
    directory = Path(run_dir)
    if not directory.is_dir():
        return False
    contents = [p.name for p in directory.iterdir()]
    if HISTORY not in contents or not all(
        name in (HISTORY, CONFIG, LOCK) or _partial_write(name) for name in contents
    ):
        return False
    try:
        return json.loads((directory / HISTORY).read_text()) == []
    except (OSError, ValueError):
        return False


def remove_partial_writes(run_dir: str | os.PathLike[str]) -> None:
    """Delete the temporary files of writes that a killed process left (``kill -9`` inside an
    atomic write: ``.checkpoint.pt.XXXX.tmp``, a checkpoint's size each); call it holding the
    run's lock, so that no live writer owns them. Only the temporaries of run files go."""
    for path in Path(run_dir).glob(".*.tmp"):
        if _partial_write(path.name):
            path.unlink(missing_ok=True)
