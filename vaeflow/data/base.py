"""What every module of :mod:`vaeflow.data` shares: split names, type aliases and the errors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vaeflow.checks import InputError

__all__ = [
    "LIKELIHOODS",
    "SPLITS",
    "Arrays",
    "ChecksumError",
    "DataFileError",
    "DataNotFoundError",
    "SplitSizeError",
    "SplitSizes",
]

SPLITS = ("train", "valid", "test")
LIKELIHOODS = ("bernoulli", "categorical256")

SplitSizes = tuple[int, int, int]
Arrays = Mapping[str, np.ndarray]


class DataNotFoundError(FileNotFoundError):
    """A data file is missing and could not be downloaded (no network, or no public source)."""


class ChecksumError(RuntimeError):
    """A downloaded file does not have the published checksum; nothing was kept."""


class DataFileError(InputError):
    """A data file is damaged (truncated, emptied, overwritten): it cannot be read as an ``.npz``.

    The message names the file and how to get it again. A file that reads fine but holds the
    wrong keys, shapes or values raises a plain :class:`~vaeflow.checks.InputError` instead.
    """


class SplitSizeError(InputError):
    """A data file's array does not have the shape that the split sizes asked for call for (a
    file of other split sizes, or split sizes that it does not hold); other wrong contents
    (a dtype, a missing key, values out of range) raise a plain ``InputError``."""
