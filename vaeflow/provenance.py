"""Which code produced a figure: the commit that run directories, benchmark reports and
``vaeflow --version`` record."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["git_commit"]


def git_commit(repo: str | os.PathLike[str] | None = None) -> str:
    """``git rev-parse --short HEAD`` of ``repo`` (default: this package's checkout), with
    ``+dirty`` when tracked files have changed; ``"unknown"`` where git or the checkout is
    missing (an installed wheel). ``--no-optional-locks`` keeps the query from writing to the
    repository."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if status else (sha or "unknown")
