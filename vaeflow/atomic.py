"""Files written whole or not at all: a temporary file in the same folder, then a rename.

The rename is atomic within one directory, so a process killed mid-write (or a full disk) never
leaves a half-written file under the final name: the previous version stays readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_save"]

# Run files are shared like the TensorBoard events beside them (mkstemp alone gives 0600).
_MODE = 0o644


def _os_error(err: BaseException) -> OSError | None:
    """The OSError at the root of ``err``: ``err`` itself, or one that it was raised while
    handling (``torch.save`` turns a full disk into ``RuntimeError: ... unexpected pos``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a binary temporary file next to ``path``; fsync; rename to ``path``.

    Raises:
        OSError: the file system failed (a full disk, a quota): with ``path`` as its filename,
            whoever wrote the bytes, so that the caller can name the file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:  # its close flushes, and can fail the same way
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as err:
            root = _os_error(err)
            if root is None or root.filename is not None:
                raise
            raise OSError(root.errno, root.strerror or str(root), str(path)) from err
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, _MODE & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """``obj`` as strict JSON (sorted keys; NaN and infinity refused), written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)``, written atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
