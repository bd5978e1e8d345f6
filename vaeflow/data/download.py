"""Getting a missing data file: fetch its sources (mirrors in order, short timeout), check their
checksums, convert them and write the ``.npz`` atomically, or say where to get it by hand.

Tests replace :func:`_fetch` to simulate downloads without a network (``monkeypatch.setattr`` on
this module, or on :mod:`vaeflow.data`, which forwards it here); it is looked up at call time.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vaeflow.atomic import atomic_write
from vaeflow.checks import InputError
from vaeflow.data.base import Arrays, ChecksumError, DataNotFoundError, SplitSizeError, SplitSizes
from vaeflow.data.paths import ENV_VAR, _default_cache_dir
from vaeflow.data.registry import DatasetSpec
from vaeflow.data.sources import Source, _digest

__all__ = ["DOWNLOAD_TIMEOUT"]

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 20.0  # seconds per socket operation: fail fast when offline


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (urllib only, short timeout)."""
    request = urllib.request.Request(url, headers={"User-Agent": "vaeflow"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
        with open(dest, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)


def _download(source: Source, dest: Path) -> list[str]:
    """Fetch ``source`` to ``dest`` and verify it; return the errors of mirrors that failed.

    Raises ``ChecksumError`` (after deleting ``dest``) on a digest mismatch, and returns normally
    only when a mirror delivered a file that passed the check. When every mirror failed, ``dest``
    does not exist and the returned list says why.
    """
    errors: list[str] = []
    for url in source.urls:
        logger.info("downloading %s", url)
        try:
            _fetch(url, dest)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # URLError, timeouts and HTTP errors are all OSError subclasses
            errors.append(f"{url}: {exc}")
            dest.unlink(missing_ok=True)
            continue
        seen_sha256 = _digest(dest, "sha256")
        if source.checksum is None:
            logger.warning(
                "%s has no published checksum; the downloaded file has sha256 %s (%d bytes)",
                source.filename,
                seen_sha256,
                dest.stat().st_size,
            )
            return []
        kind, expected = source.checksum
        actual = seen_sha256 if kind == "sha256" else _digest(dest, kind)
        if actual != expected.lower():
            dest.unlink(missing_ok=True)
            raise ChecksumError(
                f"checksum mismatch for {source.filename} downloaded from {url}: expected {kind} "
                f"{expected}, got {actual}. The file was deleted; nothing was kept."
            )
        return []
    return errors or ["no URL to download from"]


def _missing_message(
    spec: DatasetSpec, data_dir: Path, origin: str, problem: str, errors: Sequence[str] = ()
) -> str:
    """Why ``spec``'s file is missing from ``data_dir`` (chosen by ``origin``) and how to get it."""
    lines = [
        f"data set {spec.name!r} needs {spec.filename}, which is not in the data directory "
        f"{data_dir}.",
        f"That directory was chosen by {origin}. The data directory is --data-dir if given, "
        f"else ${ENV_VAR}, else the per-user cache {_default_cache_dir()}.",
        problem,
    ]
    lines += [f"  {e}" for e in errors]
    if spec.sources:
        lines.append(f"Fetch the source file(s) from: {', '.join(s.urls[0] for s in spec.sources)}")
        lines.append(
            f"and rerun with network access (vaeflow converts them to {spec.filename}), or copy a "
            f"prepared {spec.filename} into {data_dir}."
        )
    else:
        lines.append(
            f"{spec.filename} has no public download: copy it from the shared data folder "
            f"(built by shared tools/build_data.py) into {data_dir}, or point --data-dir / "
            f"${ENV_VAR} at a directory that holds it."
        )
    return "\n".join(lines)


def _validate(spec: DatasetSpec, arrays: Arrays, sizes: SplitSizes) -> None:
    """Check the converted ``arrays`` against ``sizes``, else against the protocol's sizes.

    The sources are the protocol's files: when ``sizes`` (a smaller file's, asked for by
    ``split_sizes``) do not fit them but the protocol's do, the file is good and is kept, and
    the read that follows names the sizes asked for; else a download would be thrown away
    (and made again on the next try) with an error that did not say the sizes were the cause.
    """
    try:
        spec.read(arrays, spec.filename, sizes)
    except SplitSizeError as err:
        if tuple(sizes) == spec.split_sizes:
            raise
        try:
            spec.read(arrays, spec.filename, spec.split_sizes)
        except InputError:
            raise err from None  # not the protocol's file either: the first error says why


def _download_dataset(spec: DatasetSpec, data_dir: Path, origin: str, sizes: SplitSizes) -> None:
    """Download, verify and convert ``spec``'s sources into ``data_dir / spec.filename``.

    The converted arrays are validated (see :func:`_validate`) before the ``.npz`` is written.
    Everything is fetched into a temporary folder inside ``data_dir``, removed on exit whatever
    happens, so a failure keeps nothing.
    """
    if not spec.sources or spec.convert is None:
        raise DataNotFoundError(
            _missing_message(spec, data_dir, origin, "There is no public source to download it.")
        )
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.TemporaryDirectory(prefix=f".{spec.filename}.download.", dir=data_dir)
    except OSError as exc:
        raise DataNotFoundError(
            _missing_message(
                spec,
                data_dir,
                origin,
                f"Cannot download into it, the directory is not writable: {exc}",
            )
        ) from exc
    try:
        with workdir as tmp:
            raw: dict[str, Path] = {}
            for source in spec.sources:
                dest = Path(tmp) / source.filename
                errors = _download(source, dest)
                if errors:
                    raise DataNotFoundError(
                        _missing_message(
                            spec,
                            data_dir,
                            origin,
                            f"Downloading {source.filename} failed (no network?):",
                            errors,
                        )
                    )
                raw[source.filename] = dest
            arrays = spec.convert(raw)
            _validate(spec, arrays, sizes)  # before anything lands under the final name
            atomic_write(data_dir / spec.filename, lambda f: np.savez_compressed(f, **arrays))
    except BaseException:
        if created:  # keep nothing: drop the folder this call made, if it is still empty
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise
    logger.info("wrote %s", data_dir / spec.filename)
