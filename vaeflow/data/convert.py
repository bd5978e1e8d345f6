"""Raw source formats -> the canonical ``.npz`` arrays of ``shared/data/README.md``.

One function per data set that has a public source, named after it: ``convert(raw)`` takes
``raw``, each downloaded file name mapped to its path, and returns the dict of arrays that the
``.npz`` holds (no pickled objects). :mod:`vaeflow.data.download` validates and writes it.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vaeflow.checks import InputError
from vaeflow.data.base import SPLITS, DataNotFoundError

__all__ = ["caltech", "freyfaces", "mnist", "omniglot", "static_mnist"]


def _loadmat(path: Path) -> dict[str, Any]:
    """Read a MATLAB v5 file with SciPy, imported lazily since only downloads need it."""
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - depends on the environment
        # the file cannot be made here: as for no network, say how else to get it
        raise DataNotFoundError(
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


def static_mnist(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Larochelle's ``binarized_mnist_{train,valid,test}.amat`` text -> binarized_mnist.npz."""
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        name = f"binarized_mnist_{split}.amat"
        payload = raw[name].read_bytes()
        text = np.frombuffer(payload, dtype=np.uint8)
        digits = (text == ord("0")) | (text == ord("1"))
        blank = (text == ord(" ")) | (text == ord("\n")) | (text == ord("\r"))
        if not np.all(digits | blank):
            raise InputError(f"{name}: expected only 0/1 separated by spaces and newlines")
        bits = text[digits] - ord("0")
        n_rows = sum(1 for line in payload.split(b"\n") if line.strip())
        if n_rows == 0 or bits.size != n_rows * 784:
            raise InputError(f"{name}: {bits.size} digits on {n_rows} lines, not 784 per line")
        packed = _pack_rows(bits.reshape(-1, 28, 28))
        out[f"x_{split}"], out[f"shape_{split}"] = packed["x"], packed["shape"]
    return out


def caltech(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
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


def omniglot(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """IWAE ``chardata.mat`` (``data`` [784, 24345], ``testdata`` [784, 8070]) -> omniglot.npz.

    Our format: ``x_train`` float32 [24345, 28, 28] and ``x_test`` float32 [8070, 28, 28], grey
    levels in [0, 1], upright (the same pixel order as the Sylvester/VampPrior loaders).
    """
    mat = _loadmat(raw["chardata.mat"])
    return {
        "x_train": _mat_images_to_rowmajor(np.asarray(mat["data"]).T).astype(np.float32),
        "x_test": _mat_images_to_rowmajor(np.asarray(mat["testdata"]).T).astype(np.float32),
    }


def freyfaces(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Roweis's ``frey_rawface.mat`` (``ff`` [560, 1965]) -> freyfaces.npz ``x`` [1965, 28, 20]."""
    ff = np.asarray(_loadmat(raw["frey_rawface.mat"])["ff"])
    if ff.dtype != np.uint8:
        if not (np.all(ff == np.round(ff)) and ff.min() >= 0 and ff.max() <= 255):
            raise InputError("frey_rawface.mat: 'ff' does not hold 8-bit grey levels")
        ff = ff.astype(np.uint8)
    return {"x": np.ascontiguousarray(ff.T.reshape(-1, 28, 20))}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped big-endian IDX file (the MNIST format) -> uint8 array."""
    data = gzip.decompress(path.read_bytes())
    if int.from_bytes(data[:4], "big") != magic:
        raise InputError(f"{path.name}: not an IDX file with magic number {magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def mnist(raw: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """The four MNIST IDX files -> mnist.npz (uint8, original order)."""
    return {
        "x_train": _read_idx(raw["train-images-idx3-ubyte.gz"], 2051),
        "y_train": _read_idx(raw["train-labels-idx1-ubyte.gz"], 2049),
        "x_test": _read_idx(raw["t10k-images-idx3-ubyte.gz"], 2051),
        "y_test": _read_idx(raw["t10k-labels-idx1-ubyte.gz"], 2049),
    }
