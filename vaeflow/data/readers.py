"""Reading the canonical ``.npz`` files: open one safely, check it, and cut it into splits.

:func:`open_npz` opens a data file with ``allow_pickle=False`` and turns every sign of damage
(a truncated, emptied or overwritten file, a member that fails to decompress or its CRC check)
into :class:`~vaeflow.data.base.DataFileError`. Then one reader per data set, named after it,
``read(arrays, filename, sizes)``, checks keys, dtypes and shapes (an
:class:`~vaeflow.checks.InputError` names what is wrong) and returns the three splits as
float32 arrays ``[N, 1, H, W]`` in [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from zipfile import ZipFile

import numpy as np

from vaeflow.checks import InputError
from vaeflow.data.base import SPLITS, Arrays, DataFileError, SplitSizeError, SplitSizes

__all__ = [
    "FREY_SPLIT_SEED",
    "OMNIGLOT_SPLIT_SEED",
    "caltech",
    "freyfaces",
    "mnist",
    "omniglot",
    "open_npz",
    "static_mnist",
]

FREY_SPLIT_SEED = 123  # the Sylvester-flow code's default --freyseed (np.random.seed + shuffle)
OMNIGLOT_SPLIT_SEED = 1345  # any fixed value: the reference code shuffled with an unseeded RNG

# --------------------------------------------------------------------------------------------
# Opening a file
# --------------------------------------------------------------------------------------------


def _damaged(path: Path, reason: str, downloadable: bool) -> DataFileError:
    how = (
        "delete it and let vaeflow download it (run again with network access), or copy it "
        "again from where it came from"
        if downloadable
        else "delete it and copy it again from where it came from (it has no public download)"
    )
    return DataFileError(
        f"{path} is damaged: {reason}. It was probably cut short or overwritten; to get it "
        f"again, {how}."
    )


def _failure(exc: BaseException) -> str:
    kind = type(exc).__qualname__
    if type(exc).__module__ != "builtins":
        kind = f"{type(exc).__module__}.{kind}"  # zlib.error says more than error
    return f"reading it failed ({kind}: {exc})"


# the prefixes by which np.load tells an .npz (a zip, maybe empty) or an .npy from a pickle
_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")


def _member_intact(archive: ZipFile, key: str) -> bool:
    """Whether the member of ``key`` decompresses and passes its CRC check."""
    name = f"{key}.npy" if f"{key}.npy" in archive.namelist() else key
    try:
        with archive.open(name) as f:
            while f.read(1 << 20):
                pass
    except Exception:  # damaged bytes make zipfile and zlib raise many kinds of error
        return False
    return True


class _CheckedNpz(Mapping[str, np.ndarray]):
    """An open ``NpzFile`` whose reads turn signs of damage into :class:`DataFileError`."""

    def __init__(self, npz: np.lib.npyio.NpzFile, path: Path, downloadable: bool) -> None:
        self._npz, self._path, self._downloadable = npz, path, downloadable

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._npz:
            raise KeyError(key)
        try:
            return self._npz[key]
        except ValueError as exc:
            # an intact member raises ValueError too (an object array refused because pickling
            # is off): that is a wrong file, not a damaged one, and the caller reports it
            if _member_intact(self._npz.zip, key):
                raise
            raise _damaged(self._path, _failure(exc), self._downloadable) from exc
        except Exception as exc:  # zipfile, zlib, numpy's header parser: all say "damaged"
            # ... unless the member's bytes are intact: then the failure is not the file's (a
            # MemoryError, a bug) and "delete it" would be wrong advice; keep its traceback
            if _member_intact(self._npz.zip, key):
                raise
            raise _damaged(self._path, _failure(exc), self._downloadable) from exc

    def __contains__(self, key: object) -> bool:
        return key in self._npz

    def __iter__(self) -> Iterator[str]:
        return iter(self._npz)

    def __len__(self) -> int:
        return len(self._npz)


@contextlib.contextmanager
def open_npz(path: Path, downloadable: bool) -> Iterator[Arrays]:
    """The arrays of the ``.npz`` at ``path``, read lazily with ``allow_pickle=False``.

    A damaged file (truncated, emptied, overwritten, a member that fails to decompress or its
    CRC check) raises :class:`DataFileError` naming ``path`` and how to get it again
    (``downloadable``: whether vaeflow can download it). A file that cannot be opened
    (permissions) or holds a single ``.npy`` array raises a plain ``InputError``.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    with f:
        head = f.read(len(_MAGIC[-1]))
        if not head.startswith(_MAGIC):
            # np.load would read it as a pickle, and refuse it: say what it really is
            what = "it is empty" if not head else "it is neither a zip archive nor an .npy array"
            raise _damaged(path, what, downloadable)
        f.seek(0)
        try:
            npz = np.load(f, allow_pickle=False)
        except Exception as exc:
            raise _damaged(path, _failure(exc), downloadable) from exc
        if not isinstance(npz, Mapping):
            raise InputError(f"{path}: expected an .npz archive, found a single .npy array")
        with npz:
            yield _CheckedNpz(npz, path, downloadable)


# --------------------------------------------------------------------------------------------
# Checking keys, dtypes and shapes
# --------------------------------------------------------------------------------------------


def _require(
    arrays: Arrays,
    filename: str,
    key: str,
    dtypes: Sequence[str],
    shape: tuple[int, ...],
    what: str = "",
) -> np.ndarray:
    """``arrays[key]`` after checking dtype and shape; an ``InputError`` names what is wrong.

    A :class:`DataFileError` from reading a damaged member passes through unchanged.
    """
    described = f" ({what})" if what else ""
    if key not in arrays:
        raise InputError(
            f"{filename}: missing key {key!r}{described}, expected shape {shape}; "
            f"the file has keys {sorted(arrays.keys())}"
        )
    try:
        a = np.asarray(arrays[key])
    except DataFileError:
        raise
    except ValueError as exc:  # e.g. an object array refused because pickling is off
        raise InputError(f"{filename}: key {key!r} cannot be read: {exc}") from exc
    if a.dtype.name not in dtypes:
        raise InputError(
            f"{filename}: key {key!r} has dtype {a.dtype.name}, expected {' or '.join(dtypes)}"
        )
    if a.shape != shape:
        # only the number of rows follows the split sizes: an image of the wrong size is wrong
        # whatever the sizes were
        kind = SplitSizeError if a.shape[1:] == shape[1:] and a.ndim > 0 else InputError
        raise kind(
            f"{filename}: key {key!r} has shape {a.shape}, expected shape {shape}{described}"
        )
    return a


def _to_unit_float(a: np.ndarray, filename: str, key: str) -> np.ndarray:
    """uint8 grey levels -> k/255 float32; float input is checked to lie in [0, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    a = a.astype(np.float32)
    if not np.all((a >= 0) & (a <= 1)):  # NaN fails both comparisons
        raise InputError(f"{filename}: key {key!r} has values outside [0, 1]")
    return a


def _channel(a: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` -> ``[N, 1, H, W]``."""
    return a[:, None]


_INT_DTYPES = ("int64", "int32", "int16", "uint64", "uint32", "uint16")

# --------------------------------------------------------------------------------------------
# One reader per file format
# --------------------------------------------------------------------------------------------


def _read_packed(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """Bit-packed ``x_{split}`` [N, 98] -> 0/1 uint8 images [N, 28, 28], per split."""
    out = []
    for split, n in zip(SPLITS, sizes, strict=True):
        packed = _require(
            arrays, filename, f"x_{split}", ("uint8",), (n, 98), "784 pixels bit-packed per row"
        )
        stated = _require(arrays, filename, f"shape_{split}", _INT_DTYPES, (2,))
        if tuple(int(v) for v in stated) != (n, 784):
            raise (SplitSizeError if int(stated[1]) == 784 else InputError)(
                f"{filename}: key 'shape_{split}' holds {stated.tolist()}, expected [{n}, 784] "
                f"(rows of 784 = 28x28 pixels)"
            )
        out.append(np.unpackbits(packed, axis=1, count=784).reshape(n, 28, 28))
    return out


def static_mnist(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """binarized_mnist.npz: the stored bits, as they are."""
    return [_channel(b.astype(np.float32)) for b in _read_packed(arrays, filename, sizes)]


def caltech(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """caltech101_silhouettes.npz: the stored bits inverted, so that the object is 1."""
    # stored with 1 = background; VAE code models the silhouette (object = 1)
    return [_channel(1.0 - b.astype(np.float32)) for b in _read_packed(arrays, filename, sizes)]


def mnist(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """mnist.npz: grey levels k/255; valid is the end of ``x_train``."""
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


def omniglot(dtypes: tuple[str, ...]) -> Callable[[Arrays, str, SplitSizes], list[np.ndarray]]:
    """The Omniglot reader for files whose images have one of ``dtypes``."""

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


def freyfaces(arrays: Arrays, filename: str, sizes: SplitSizes) -> list[np.ndarray]:
    """freyfaces.npz: grey levels k/255, split after the reference code's seeded shuffle."""
    x = _require(arrays, filename, "x", ("uint8",), (sum(sizes), 28, 20))
    return [
        _channel(s)
        for s in _shuffled_split(_to_unit_float(x, filename, "x"), FREY_SPLIT_SEED, sizes)
    ]
