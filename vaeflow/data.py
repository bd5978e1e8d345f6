"""Benchmark data sets: files, checksums, downloads, splits and GPU-resident batching.

A data directory holds one ``.npz`` file per data set, in the formats of ``shared/data/README.md``
(written with ``np.savez_compressed``, read with ``allow_pickle=False``). The directory is
``--data-dir`` / the ``data_dir`` argument, else ``$VAEFLOW_DATA``, else a per-user cache folder
(``$XDG_CACHE_HOME/vaeflow`` or ``~/.cache/vaeflow``). A missing file is downloaded from the public
source that the IWAE / VampPrior / Sylvester / FFJORD code uses, its checksum is checked, and it is
converted to the same ``.npz`` form, written atomically.

Data sets (``DATASETS``, the names of ``--dataset``) and their protocol splits (train/valid/test):

=====================  ======================  ===================  ==============  ===========
name                   file                    split                likelihood      binarized
=====================  ======================  ===================  ==============  ===========
``static_mnist``       binarized_mnist.npz     50000/10000/10000    bernoulli       fixed
``mnist``              mnist.npz               50000/10000/10000    bernoulli       dynamic
``omniglot``           omniglot.npz (IWAE)     23000/1345/8070      bernoulli       dynamic
``omniglot_rederived`` omniglot28_rederived    23000/1345/8115      bernoulli       dynamic
``freyfaces``          freyfaces.npz           1565/200/200         categorical256  no
``caltech``            caltech101_silhouettes  4100/2264/2307       bernoulli       fixed
=====================  ======================  ===================  ==============  ===========

**``omniglot_rederived`` is NOT the IWAE Omniglot file**: it was re-derived from the 105x105
originals with its own resizing and split, so its likelihoods must never be compared with published
Omniglot numbers. Use it only to exercise the Omniglot code path.

Every split is a float32 tensor ``[N, 1, H, W]`` with values in ``[0, 1]`` (28x28; Frey 28x20),
moved to the requested device once. For dynamically binarized sets, ``train`` keeps the grey levels
and every training batch is binarized afresh by :class:`DeviceLoader`; ``valid`` and ``test`` are
binarized once with a fixed seed so that evaluation is deterministic.

Split sizes: each spec carries the protocol sizes, and files must match them exactly (a truncated
or wrong file fails loudly instead of silently changing the benchmark). ``load_dataset`` accepts
``split_sizes=(n_train, n_valid, n_test)`` to read smaller files built the same way, which is what
the tests do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaeflow.atomic import atomic_write

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataNotFoundError",
    "Dataset",
    "DatasetSpec",
    "DeviceLoader",
    "Source",
    "get_spec",
    "load_dataset",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

ENV_VAR = "VAEFLOW_DATA"
DOWNLOAD_TIMEOUT = 20.0  # seconds per socket operation: fail fast when offline
FREY_SPLIT_SEED = 123  # the Sylvester-flow code's default --freyseed (np.random.seed + shuffle)
OMNIGLOT_SPLIT_SEED = 1345  # any fixed value: the reference code shuffled with an unseeded RNG
EVAL_BINARIZATION_SEED = 777  # the seed the VampPrior/Sylvester code binarizes valid/test with

SPLITS = ("train", "valid", "test")
LIKELIHOODS = ("bernoulli", "categorical256")

SplitSizes = tuple[int, int, int]
Arrays = Mapping[str, np.ndarray]


class DataNotFoundError(FileNotFoundError):
    """A data file is missing and could not be downloaded (no network, or no public source)."""


class ChecksumError(RuntimeError):
    """A downloaded file does not have the published checksum; nothing was kept."""


# --------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vaeflow"


def _resolve_with_origin(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
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


# --------------------------------------------------------------------------------------------
# Checksums and downloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One file to download: its name, mirror URLs tried in order, and its known checksum.

    ``checksum`` is ``(kind, hexdigest)`` with kind ``"sha256"``, ``"md5"`` or ``"git-blob"``
    (the git blob id, sha1 of ``b"blob <size>\\0" + data``), or ``None`` when no published value
    exists; then the sha256 that was seen is logged so that it can be recorded.
    """

    filename: str
    urls: tuple[str, ...]
    checksum: tuple[str, str] | None


def _digest(path: Path, kind: str) -> str:
    """Hex digest of the file at ``path``, streamed so large files do not sit in memory."""
    if kind == "git-blob":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    elif kind in ("sha256", "md5"):
        h = hashlib.new(kind)
    else:
        raise ValueError(f"unknown checksum kind {kind!r}; valid kinds are sha256, md5, git-blob")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (urllib only, short timeout).

    Tests replace this module-level function (``monkeypatch.setattr(data, "_fetch", ...)``) to
    simulate downloads without a network; callers look it up at call time for that reason.
    """
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


def _loadmat(path: Path) -> dict[str, Any]:
    """Read a MATLAB v5 file with SciPy, imported lazily since only downloads need it."""
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"converting {path.name} needs SciPy (pip install scipy); alternatively copy a "
            f"prepared .npz into the data directory"
        ) from exc
    return scipy.io.loadmat(str(path))


def _mat_images_to_rowmajor(rows: np.ndarray) -> np.ndarray:
    """``[N, H*W]`` rows holding column-major (MATLAB) 28x28 images -> upright ``[N, 28, 28]``.

    This equals the reference loaders' ``reshape((-1, 28, 28)).reshape((-1, 784), order="F")``.
    """
    return np.ascontiguousarray(rows.reshape(-1, 28, 28).transpose(0, 2, 1))


def _pack_rows(images: np.ndarray) -> dict[str, np.ndarray]:
    """Upright 0/1 images ``[N, 28, 28]`` -> the bit-packed ``x`` [N, 98] and ``shape`` [2]."""
    bits = images.reshape(len(images), 784).astype(np.uint8)
    return {"x": np.packbits(bits, axis=1), "shape": np.array(bits.shape, dtype=np.int64)}


def _convert_static_mnist(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Larochelle's ``binarized_mnist_{train,valid,test}.amat`` text -> binarized_mnist.npz."""
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        name = f"binarized_mnist_{split}.amat"
        payload = raw[name].read_bytes()
        text = np.frombuffer(payload, dtype=np.uint8)
        digits = (text == ord("0")) | (text == ord("1"))
        blank = (text == ord(" ")) | (text == ord("\n")) | (text == ord("\r"))
        if not np.all(digits | blank):
            raise ValueError(f"{name}: expected only 0/1 separated by spaces and newlines")
        bits = text[digits] - ord("0")
        n_rows = sum(1 for line in payload.split(b"\n") if line.strip())
        if n_rows == 0 or bits.size != n_rows * 784:
            raise ValueError(f"{name}: {bits.size} digits on {n_rows} lines, not 784 per line")
        packed = _pack_rows(bits.reshape(-1, 28, 28))
        out[f"x_{split}"], out[f"shape_{split}"] = packed["x"], packed["shape"]
    return out


def _convert_caltech(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Marlin's ``caltech101_silhouettes_28_split1.mat`` -> caltech101_silhouettes.npz.

    Pixels are kept as stored (1 = background); the loader applies ``1 - x``.
    """
    mat = _loadmat(raw["caltech101_silhouettes_28_split1.mat"])
    out: dict[str, np.ndarray] = {}
    for split, key in zip(SPLITS, ("train", "val", "test"), strict=True):
        packed = _pack_rows(_mat_images_to_rowmajor(np.asarray(mat[f"{key}_data"])))
        out[f"x_{split}"], out[f"shape_{split}"] = packed["x"], packed["shape"]
        labels = mat.get(f"{key}_labels")
        if labels is not None:
            out[f"y_{split}"] = (np.asarray(labels).reshape(-1) - 1).astype(np.uint8)
    if "classnames" in mat:
        names = [str(np.asarray(c).squeeze()) for c in np.asarray(mat["classnames"]).ravel()]
        out["classnames"] = np.array(names, dtype=str)
    return out


def _convert_omniglot(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """IWAE ``chardata.mat`` (``data`` [784, 24345], ``testdata`` [784, 8070]) -> omniglot.npz.

    Our format: ``x_train`` float32 [24345, 28, 28] and ``x_test`` float32 [8070, 28, 28], grey
    levels in [0, 1], upright (the same pixel order as the Sylvester/VampPrior loaders).
    """
    mat = _loadmat(raw["chardata.mat"])
    return {
        "x_train": _mat_images_to_rowmajor(np.asarray(mat["data"]).T).astype(np.float32),
        "x_test": _mat_images_to_rowmajor(np.asarray(mat["testdata"]).T).astype(np.float32),
    }


def _convert_frey(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Roweis's ``frey_rawface.mat`` (``ff`` [560, 1965]) -> freyfaces.npz ``x`` [1965, 28, 20]."""
    ff = np.asarray(_loadmat(raw["frey_rawface.mat"])["ff"])
    if ff.dtype != np.uint8:
        if not (np.all(ff == np.round(ff)) and ff.min() >= 0 and ff.max() <= 255):
            raise ValueError("frey_rawface.mat: 'ff' does not hold 8-bit grey levels")
        ff = ff.astype(np.uint8)
    return {"x": np.ascontiguousarray(ff.T.reshape(-1, 28, 20))}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped big-endian IDX file (the MNIST format) -> uint8 array."""
    data = gzip.decompress(path.read_bytes())
    if int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path.name}: not an IDX file with magic number {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _convert_mnist(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """The four MNIST IDX files -> mnist.npz (uint8, original order)."""
    return {
        "x_train": _read_idx(raw["train-images-idx3-ubyte.gz"], 2051),
        "y_train": _read_idx(raw["train-labels-idx1-ubyte.gz"], 2049),
        "x_test": _read_idx(raw["t10k-images-idx3-ubyte.gz"], 2051),
        "y_test": _read_idx(raw["t10k-labels-idx1-ubyte.gz"], 2049),
    }


# --------------------------------------------------------------------------------------------
# Reading and validating the .npz files
# --------------------------------------------------------------------------------------------


def _require(
    arrays: Arrays,
    filename: str,
    key: str,
    dtypes: Sequence[str],
    shape: tuple[int, ...],
    what: str = "",
) -> np.ndarray:
    """``arrays[key]`` after checking dtype and shape; a ``ValueError`` names what is wrong."""
    described = f" ({what})" if what else ""
    if key not in arrays:
        raise ValueError(
            f"{filename}: missing key {key!r}{described}, expected shape {shape}; "
            f"the file has keys {sorted(arrays.keys())}"
        )
    try:
        a = np.asarray(arrays[key])
    except ValueError as exc:  # e.g. an object array refused because pickling is off
        raise ValueError(f"{filename}: key {key!r} cannot be read: {exc}") from exc
    if a.dtype.name not in dtypes:
        raise ValueError(
            f"{filename}: key {key!r} has dtype {a.dtype.name}, expected {' or '.join(dtypes)}"
        )
    if a.shape != shape:
        raise ValueError(
            f"{filename}: key {key!r} has shape {a.shape}, expected shape {shape}{described}"
        )
    return a


def _to_unit_float(a: np.ndarray, filename: str, key: str) -> np.ndarray:
    """uint8 grey levels -> k/255 float32; float input is checked to lie in [0, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    a = a.astype(np.float32)
    if not np.all((a >= 0) & (a <= 1)):  # NaN fails both comparisons
        raise ValueError(f"{filename}: key {key!r} has values outside [0, 1]")
    return a


def _channel(a: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, 1, H, W]``."""
    return a[:, None]


_INT_DTYPES = ("int64", "int32", "int16", "uint64", "uint32", "uint16")


def _read_packed(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """Bit-packed ``x_{split}`` [N, 98] -> 0/1 uint8 images [N, 28, 28], per split."""
    out = []
    for split, n in zip(SPLITS, sizes, strict=True):
        packed = _require(
            arrays, filename, f"x_{split}", ("uint8",), (n, 98), "784 pixels bit-packed per row"
        )
        stated = _require(arrays, filename, f"shape_{split}", _INT_DTYPES, (2,))
        if tuple(int(v) for v in stated) != (n, 784):
            raise ValueError(
                f"{filename}: key 'shape_{split}' holds {stated.tolist()}, expected [{n}, 784] "
                f"(rows of 784 = 28x28 pixels)"
            )
        out.append(np.unpackbits(packed, axis=1, count=784).reshape(n, 28, 28))
    return out


def _read_static_mnist(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    return [_channel(b.astype(np.float32)) for b in _read_packed(arrays, filename, sizes)]


def _read_caltech(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    # stored with 1 = background; VAE code models the silhouette (object = 1)
    return [_channel(1.0 - b.astype(np.float32)) for b in _read_packed(arrays, filename, sizes)]


def _read_mnist(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    n_train, n_valid, n_test = sizes
    x = _require(arrays, filename, "x_train", ("uint8",), (n_train + n_valid, 28, 28))
    x_test = _require(arrays, filename, "x_test", ("uint8",), (n_test, 28, 28))
    x = _to_unit_float(x, filename, "x_train")
    # the usual protocol: the last 10000 training images are the validation set
    return [
        _channel(x[:n_train]),
        _channel(x[n_train:]),
        _channel(_to_unit_float(x_test, filename, "x_test")),
    ]


def _shuffled_split(x: np.ndarray, seed: int, sizes: Sequence[int]) -> list[np.ndarray]:
    """Rows of ``x`` shuffled by ``np.random.RandomState(seed)`` then cut into ``sizes``.

    ``RandomState(seed).permutation`` gives the same order as the reference code's
    ``np.random.seed(seed); np.random.shuffle(x)``, so the Frey split matches Sylvester's.
    """
    perm = np.random.RandomState(seed).permutation(len(x))
    x = x[perm]
    bounds = np.cumsum([0, *sizes])
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _omniglot_reader(
    dtypes: tuple[str, ...],
) -> Callable[[Arrays, str, SplitSizes], list[np.ndarray]]:
    def read(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
        n_train, n_valid, n_test = sizes
        x = _require(arrays, filename, "x_train", dtypes, (n_train + n_valid, 28, 28))
        x_test = _require(arrays, filename, "x_test", dtypes, (n_test, 28, 28))
        train, valid = _shuffled_split(
            _to_unit_float(x, filename, "x_train"), OMNIGLOT_SPLIT_SEED, (n_train, n_valid)
        )
        return [
            _channel(train),
            _channel(valid),
            _channel(_to_unit_float(x_test, filename, "x_test")),
        ]

    return read


def _read_frey(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    x = _require(arrays, filename, "x", ("uint8",), (sum(sizes), 28, 20))
    return [
        _channel(s)
        for s in _shuffled_split(_to_unit_float(x, filename, "x"), FREY_SPLIT_SEED, sizes)
    ]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, download, validate and split one data set.

    ``read(arrays, filename, split_sizes)`` validates the ``.npz`` mapping and returns the three
    splits as float32 numpy arrays ``[N, 1, H, W]`` in [0, 1]. ``convert(raw_paths)`` turns the
    downloaded ``sources`` (by file name) into the arrays of that ``.npz``; ``sources`` is empty
    when there is no public source to download.
    """

    name: str
    filename: str
    split_sizes: SplitSizes
    input_shape: tuple[int, int, int]
    likelihood: str
    dynamic_binarization: bool
    bits_per_dim: bool
    read: Callable[[Arrays, str, SplitSizes], list[np.ndarray]]
    sources: tuple[Source, ...] = ()
    convert: Callable[[Mapping[str, Path]], dict[str, np.ndarray]] | None = None
    note: str = ""
    warning: str = ""  # issued as a UserWarning on every load


_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
# git blob ids of the .amat text files, as committed in riannevdberg/sylvester-flows and
# rtqichen/ffjord (see shared/data/README.md)
_AMAT_BLOBS = {
    "train": "7b7e6498eb04624248c425ea616a7e9a4a940056",
    "valid": "714907b623bbc03ca36c092009cb1b0e27f21459",
    "test": "bc52a26d6293157c0b07b26db250c23fe23d37ef",
}
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# md5 values as torchvision's MNIST class records them
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

_REDERIVED_NOTE = (
    "omniglot_rederived is NOT the IWAE Omniglot (chardata.mat): it was re-derived from the "
    "105x105 originals with its own resizing and split. Its likelihoods are NOT comparable with "
    "published Omniglot numbers; use it only to develop and test the Omniglot code path."
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="static_mnist",
            filename="binarized_mnist.npz",
            split_sizes=(50000, 10000, 10000),
            input_shape=(1, 28, 28),
            likelihood="bernoulli",
            dynamic_binarization=False,
            bits_per_dim=False,
            read=_read_static_mnist,
            sources=tuple(
                Source(
                    f"binarized_mnist_{s}.amat",
                    (f"{_LAROCHELLE}binarized_mnist_{s}.amat",),
                    ("git-blob", _AMAT_BLOBS[s]),
                )
                for s in SPLITS
            ),
            convert=_convert_static_mnist,
            note="Larochelle & Murray's fixed binarization of MNIST.",
        ),
        DatasetSpec(
            name="mnist",
            filename="mnist.npz",
            split_sizes=(50000, 10000, 10000),
            input_shape=(1, 28, 28),
            likelihood="bernoulli",
            dynamic_binarization=True,
            bits_per_dim=False,
            read=_read_mnist,
            sources=tuple(
                Source(f, tuple(m + f for m in _MNIST_MIRRORS), ("md5", md5))
                for f, md5 in _MNIST_MD5.items()
            ),
            convert=_convert_mnist,
            note="Grey-level MNIST, dynamically binarized.",
        ),
        DatasetSpec(
            name="omniglot",
            filename="omniglot.npz",
            split_sizes=(23000, 1345, 8070),
            input_shape=(1, 28, 28),
            likelihood="bernoulli",
            dynamic_binarization=True,
            bits_per_dim=False,
            read=_omniglot_reader(("float32", "float64", "uint8")),
            sources=(
                Source(
                    "chardata.mat",
                    (
                        "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/"
                        "chardata.mat",
                    ),
                    # git blob id of datasets/OMNIGLOT/chardata.mat in yburda/iwae
                    ("git-blob", "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"),
                ),
            ),
            convert=_convert_omniglot,
            note="The IWAE 28x28 Omniglot, dynamically binarized.",
        ),
        DatasetSpec(
            name="omniglot_rederived",
            filename="omniglot28_rederived.npz",
            split_sizes=(23000, 1345, 8115),
            input_shape=(1, 28, 28),
            likelihood="bernoulli",
            dynamic_binarization=True,
            bits_per_dim=False,
            read=_omniglot_reader(("uint8",)),
            # built from the 105x105 originals by shared tools/build_data.py: no download
            sources=(),
            note=_REDERIVED_NOTE,
            warning=_REDERIVED_NOTE,
        ),
        DatasetSpec(
            name="freyfaces",
            filename="freyfaces.npz",
            split_sizes=(1565, 200, 200),
            input_shape=(1, 28, 20),
            likelihood="categorical256",
            dynamic_binarization=False,
            bits_per_dim=True,
            read=_read_frey,
            sources=(
                # No checksum of frey_rawface.mat is published anywhere we know of (the sha256 in
                # shared/data/README.md is of a different file, freyfaces.pkl), so none is
                # checked: _download logs the sha256 it saw instead.
                Source(
                    "frey_rawface.mat", ("https://cs.nyu.edu/~roweis/data/frey_rawface.mat",), None
                ),
            ),
            convert=_convert_frey,
            note="Frey faces, 256-way categorical; results are reported in bits/dim.",
        ),
        DatasetSpec(
            name="caltech",
            filename="caltech101_silhouettes.npz",
            split_sizes=(4100, 2264, 2307),
            input_shape=(1, 28, 28),
            likelihood="bernoulli",
            dynamic_binarization=False,
            bits_per_dim=False,
            read=_read_caltech,
            sources=(
                Source(
                    "caltech101_silhouettes_28_split1.mat",
                    (
                        "https://people.cs.umass.edu/~marlin/data/"
                        "caltech101_silhouettes_28_split1.mat",
                    ),
                    ("sha256", "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"),
                ),
            ),
            convert=_convert_caltech,
            note="CalTech 101 Silhouettes 28x28, split 1; object = 1.",
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of data set ``name``; an unknown name raises a ``ValueError`` listing them."""
    if name not in DATASETS:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise ValueError(f"unknown data set {name!r}; valid names are {valid}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """One data set, all splits resident on one device.

    ``train``, ``valid``, ``test``: float32 ``[N, 1, H, W]`` in [0, 1]. With
    ``dynamic_binarization`` the train split holds grey levels (binarize each batch, e.g. with
    ``loader("train", ...)``) while valid/test are already binarized with a fixed seed.
    ``likelihood`` is ``"bernoulli"`` or ``"categorical256"`` (values k/255; recover k with
    ``round(x * 255)``); ``bits_per_dim`` says results are reported in bits/dim.
    """

    name: str
    train: Tensor = field(repr=False)
    valid: Tensor = field(repr=False)
    test: Tensor = field(repr=False)
    input_shape: tuple[int, int, int]
    likelihood: str
    dynamic_binarization: bool
    bits_per_dim: bool
    note: str = ""

    @property
    def split_sizes(self) -> SplitSizes:
        return len(self.train), len(self.valid), len(self.test)

    def split(self, split: str) -> Tensor:
        """The tensor of ``split`` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        return getattr(self, split)

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> DeviceLoader:
        """A :class:`DeviceLoader` over ``split``.

        Training batches are shuffled and (for dynamically binarized sets) binarized afresh;
        valid/test are read in order, as stored. ``shuffle`` overrides the default.
        """
        is_train = split == "train"
        return DeviceLoader(
            self.split(split),
            batch_size,
            shuffle=is_train if shuffle is None else shuffle,
            drop_last=drop_last,
            dynamic_binarization=self.dynamic_binarization and is_train,
            seed=seed,
        )


def _missing_message(
    spec: DatasetSpec, data_dir: Path, origin: str, problem: str, errors: Sequence[str] = ()
) -> str:
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


def _download_dataset(spec: DatasetSpec, data_dir: Path, origin: str, sizes: SplitSizes) -> None:
    """Download, verify and convert ``spec``'s sources into ``data_dir / spec.filename``.

    The converted arrays are validated against ``sizes`` before the ``.npz`` is written.
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
            # validate before anything lands under the final name
            spec.read(arrays, spec.filename, sizes)
            atomic_write(data_dir / spec.filename, lambda f: np.savez_compressed(f, **arrays))
    except BaseException:
        if created:  # keep nothing: drop the folder this call made, if it is still empty
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise
    logger.info("wrote %s", data_dir / spec.filename)


def _read_npz(spec: DatasetSpec, path: Path, sizes: SplitSizes) -> list[np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, Mapping):
        raise ValueError(f"{path}: expected an .npz archive, found a single .npy array")
    with npz:
        return spec.read(npz, spec.filename, sizes)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    *,
    split_sizes: SplitSizes | None = None,
) -> Dataset:
    """Load data set ``name`` with every split on ``device``.

    ``data_dir``: see :func:`resolve_data_dir`. A missing file is downloaded when ``download``
    is true, else (or when offline) a :class:`DataNotFoundError` says where to get it.
    ``split_sizes``: ``(n_train, n_valid, n_test)``; ``None`` means the protocol sizes of
    ``DATASETS[name]``. The file must hold exactly these (a stored split) or their totals (a
    split cut here), else a ``ValueError`` names the key and both shapes.
    """
    spec = get_spec(name)
    sizes = spec.split_sizes if split_sizes is None else tuple(int(n) for n in split_sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"split_sizes must be three positive integers, got {split_sizes!r}")
    directory, origin = _resolve_with_origin(data_dir)
    path = directory / spec.filename
    if not path.is_file():
        if not download:
            raise DataNotFoundError(
                _missing_message(
                    spec, directory, origin, "Downloading is switched off (download=False)."
                )
            )
        _download_dataset(spec, directory, origin, sizes)
    if spec.warning:
        warnings.warn(spec.warning, UserWarning, stacklevel=2)
    splits = [torch.from_numpy(a) for a in _read_npz(spec, path, sizes)]
    if spec.dynamic_binarization:
        # on the CPU with a fixed generator: the same evaluation sets on every device
        g = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
        splits[1] = torch.bernoulli(splits[1], generator=g)
        splits[2] = torch.bernoulli(splits[2], generator=g)
    train, valid, test = (s.to(device=device, dtype=torch.float32) for s in splits)
    return Dataset(
        name=spec.name,
        train=train,
        valid=valid,
        test=test,
        input_shape=spec.input_shape,
        likelihood=spec.likelihood,
        dynamic_binarization=spec.dynamic_binarization,
        bits_per_dim=spec.bits_per_dim,
        note=spec.note,
    )


# --------------------------------------------------------------------------------------------
# GPU-resident batching
# --------------------------------------------------------------------------------------------


class DeviceLoader:
    """Batches of a tensor that already lives on its device, without host round trips.

    ``data [N, 1, H, W]`` stays where it is; a ``torch.Generator`` on the same device draws the
    permutation (``shuffle``) and the Bernoulli samples (``dynamic_binarization``), so the batch
    stream is a function of ``seed`` alone. Iterating yields ``x [B, 1, H, W]`` (the last batch
    is smaller unless ``drop_last``); ``len()`` is the number of batches per epoch.

    Resuming: ``state_dict()`` holds the generator state and the position inside the current
    epoch (its permutation and the next batch index). After ``load_state_dict`` on a loader over
    the same data, ``iter()`` continues with the remaining batches of the interrupted epoch and
    then draws further epochs exactly as the uninterrupted loader would. Take the state after
    the step on a batch is done: the position already counts the batch last yielded.

    One iteration at a time: the position is shared by all iterators of one loader.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        dynamic_binarization: bool = False,
        seed: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if data.dim() < 1 or len(data) == 0:
            raise ValueError(f"data must be a non-empty tensor [N, ...], got {tuple(data.shape)}")
        if drop_last and len(data) < batch_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} > {len(data)} samples gives no batch"
            )
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.dynamic_binarization = dynamic_binarization
        self.seed = seed
        self.generator = torch.Generator(device=data.device)
        self.generator.manual_seed(seed)
        self._perm: Tensor | None = None  # on data.device; None when not shuffling
        self._next = 0  # index of the next batch of the current epoch
        self._active = False  # an epoch has started and not been closed

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def in_epoch(self) -> bool:
        """True when an epoch is under way: the next ``iter()`` continues it."""
        return self._active and self._next < len(self)

    @property
    def batches_left(self) -> int:
        """Batches the next ``iter()`` yields (a full epoch when none is under way)."""
        return len(self) - self._next if self.in_epoch else len(self)

    def _start_epoch(self) -> None:
        if self.shuffle:
            self._perm = torch.randperm(
                len(self.data), generator=self.generator, device=self.data.device
            )
        self._next = 0
        self._active = True

    def _batch(self, i: int) -> Tensor:
        start = i * self.batch_size
        stop = min(start + self.batch_size, len(self.data))
        if self._perm is None:
            x = self.data[start:stop]
        else:
            x = self.data.index_select(0, self._perm[start:stop])
        if self.dynamic_binarization:
            x = torch.bernoulli(x, generator=self.generator)
        return x

    def __iter__(self) -> Iterator[Tensor]:
        if not self.in_epoch:
            self._start_epoch()
        while self._next < len(self):
            i = self._next
            x = self._batch(i)
            # advance before yielding: a checkpoint written while the consumer works on this
            # batch must resume with the next one
            self._next = i + 1
            yield x
        self._active = False
        self._perm = None
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        """Generator state, position in the epoch and the settings they are only valid for.

        Plain tensors, ints and bools (CPU), so ``torch.load(..., weights_only=True)`` reads it.
        """
        return {
            "generator": self.generator.get_state(),
            "perm": None if self._perm is None else self._perm.detach().to("cpu", copy=True),
            "next_batch": self._next,
            "active": self._active,
            "num_samples": len(self.data),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "dynamic_binarization": self.dynamic_binarization,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state taken on a differently configured loader."""
        for key in ("num_samples", "batch_size", "shuffle", "drop_last", "dynamic_binarization"):
            mine = len(self.data) if key == "num_samples" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"DeviceLoader state has {key}={state[key]!r} but this loader has {mine!r}"
                )
        perm = state["perm"]
        if perm is not None:
            if perm.shape != (len(self.data),):
                raise ValueError(
                    f"DeviceLoader state has a permutation of shape {tuple(perm.shape)}, "
                    f"expected ({len(self.data)},)"
                )
            perm = perm.to(self.data.device)
        next_batch = int(state["next_batch"])
        if not 0 <= next_batch <= len(self):
            raise ValueError(
                f"DeviceLoader state has next_batch={next_batch}, not in [0, {len(self)}]"
            )
        self.generator.set_state(state["generator"])
        self._perm = perm
        self._next = next_batch
        self._active = bool(state["active"])
