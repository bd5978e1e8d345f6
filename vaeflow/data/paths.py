"""Where the data files live: ``--data-dir``, else ``$VAEFLOW_DATA``, else a per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "resolve_data_dir"]

ENV_VAR = "VAEFLOW_DATA"


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vaeflow"


def _resolve_with_origin(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data directory and the words that say what chose it (for error messages)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "--data-dir (the data_dir argument)"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    return _default_cache_dir(), f"the per-user cache (neither --data-dir nor ${ENV_VAR} is set)"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$VAEFLOW_DATA``, else the user cache.

    The cache is ``$XDG_CACHE_HOME/vaeflow``, or ``~/.cache/vaeflow`` when that is unset. Empty
    strings count as unset. The directory is not created here (downloads create it).
    """
    return _resolve_with_origin(data_dir)[0]
