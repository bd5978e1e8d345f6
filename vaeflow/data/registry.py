"""The data-set registry: :class:`DatasetSpec`, :data:`DATASETS` and :func:`get_spec`.

A spec ties together a data set's file, its protocol split sizes, how the model sees it
(likelihood, binarization, bits/dim), its reader (:mod:`vaeflow.data.readers`), and where the
file comes from when it is missing (:mod:`vaeflow.data.sources`, :mod:`vaeflow.data.convert`).
The table of the data sets is in the :mod:`vaeflow.data` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeflow.checks import InputError
from vaeflow.data import convert, readers
from vaeflow.data.base import Arrays, SplitSizes
from vaeflow.data.sources import SOURCES, Source

__all__ = ["DATASETS", "DatasetSpec", "figure_text", "get_spec"]


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

    @property
    def unit(self) -> str:
        """The unit its results are reported in: ``"bits/dim"`` (Frey Faces) or ``"nats"``."""
        return "bits/dim" if self.bits_per_dim else "nats"

    def in_unit(self, nats: float) -> float:
        """A per-datum figure in nats (a NELBO, an NLL) in :attr:`unit`."""
        from vaeflow.vae import bits_per_dim  # imported here: the registry loads without torch

        return float(bits_per_dim(nats, math.prod(self.input_shape))) if self.bits_per_dim else nats


def figure_text(value: float, unit: str) -> str:
    """A NELBO or NLL as printed: 4 decimals in bits/dim (they differ in the third), else 2."""
    return f"{value:.{4 if unit == 'bits/dim' else 2}f}"


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
            read=readers.static_mnist,
            sources=SOURCES["static_mnist"],
            convert=convert.static_mnist,
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
            read=readers.mnist,
            sources=SOURCES["mnist"],
            convert=convert.mnist,
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
            read=readers.omniglot(("float32", "float64", "uint8")),
            sources=SOURCES["omniglot"],
            convert=convert.omniglot,
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
            read=readers.omniglot(("uint8",)),
            sources=SOURCES["omniglot_rederived"],  # none: no public download
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
            read=readers.freyfaces,
            sources=SOURCES["freyfaces"],
            convert=convert.freyfaces,
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
            read=readers.caltech,
            sources=SOURCES["caltech"],
            convert=convert.caltech,
            note="CalTech 101 Silhouettes 28x28, split 1; object = 1.",
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of data set ``name``; an unknown name raises an ``InputError`` (a
    ``ValueError``) listing them."""
    if name not in DATASETS:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise InputError(f"unknown data set {name!r}; valid names are {valid}")
    return DATASETS[name]
