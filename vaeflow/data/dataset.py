"""Loading a data set: :func:`load_dataset` finds (or downloads) its file, reads its splits and
puts them on the training device once, as a :class:`Dataset`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaeflow.checks import InputError
from vaeflow.data.base import SPLITS, DataNotFoundError, SplitSizeError, SplitSizes
from vaeflow.data.download import _download_dataset, _missing_message
from vaeflow.data.loader import DeviceLoader
from vaeflow.data.paths import _resolve_with_origin
from vaeflow.data.readers import open_npz
from vaeflow.data.registry import DatasetSpec, get_spec

__all__ = ["EVAL_BINARIZATION_SEED", "Dataset", "ensure_dataset", "load_dataset"]

EVAL_BINARIZATION_SEED = 777  # the seed the VampPrior/Sylvester code binarizes valid/test with


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
            raise InputError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
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


def _read_npz(spec: DatasetSpec, path: Path, sizes: SplitSizes) -> list[np.ndarray]:
    """The splits of ``spec``'s file at ``path``; a damaged file raises ``DataFileError``, a
    wrong one an ``InputError`` that names it by its path (it may be in a folder the user did
    not choose: ``$VAEFLOW_DATA``, the per-user cache)."""
    with open_npz(path, downloadable=bool(spec.sources) and spec.convert is not None) as arrays:
        return spec.read(arrays, str(path), sizes)


def _spec_and_sizes(name: str, split_sizes: SplitSizes | None) -> tuple[DatasetSpec, SplitSizes]:
    """The spec of data set ``name`` and the split sizes asked for (its protocol's if None)."""
    spec = get_spec(name)
    sizes = spec.split_sizes if split_sizes is None else tuple(int(n) for n in split_sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise InputError(f"split_sizes must be three positive integers, got {split_sizes!r}")
    return spec, sizes


def _data_file(
    spec: DatasetSpec,
    sizes: SplitSizes,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
) -> Path:
    """The path of ``spec``'s file in the data directory, downloaded first if it is missing
    (see :func:`ensure_dataset`)."""
    directory, origin = _resolve_with_origin(data_dir)
    if directory.exists() and not directory.is_dir():
        # else the message would say the file is missing from "the directory" /some/file.npz
        raise DataNotFoundError(
            f"the data directory {directory} is a file, not a folder: give the folder that "
            f"holds {spec.filename}. That path was chosen by {origin}."
        )
    path = directory / spec.filename
    if path.is_dir():
        # else a download would be tried (and fail to write over the folder) where the cause
        # is a folder of the file's name: one made by hand, or an archive unpacked in place
        raise DataNotFoundError(f"{path} is a folder, not the data file {spec.filename}: move "
                                f"it away and put the file there. That folder was chosen by "
                                f"{origin}.")
    if not path.is_file():
        if not download:
            raise DataNotFoundError(
                _missing_message(
                    spec, directory, origin, "Downloading is switched off (download=False)."
                )
            )
        _download_dataset(spec, directory, origin, sizes)
    return path


def ensure_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split_sizes: SplitSizes | None = None,
) -> Path:
    """Make sure data set ``name``'s file is in the data directory, downloading it if it is
    missing exactly as :func:`load_dataset` does, without reading it; return its path.

    Under torchrun one process per machine calls this before every process loads the set, so
    that a machine downloads the file once, not once per rank. ``split_sizes`` matter only to
    a download (the converted arrays are checked against them before the file is written).
    """
    spec, sizes = _spec_and_sizes(name, split_sizes)
    return _data_file(spec, sizes, data_dir, download=True)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    *,
    split_sizes: SplitSizes | None = None,
) -> Dataset:
    """Load data set ``name`` with every split on ``device``.

    ``data_dir``: see :func:`~vaeflow.data.resolve_data_dir`. A missing file is downloaded when
    ``download`` is true, else (or when offline) a :class:`DataNotFoundError` says where to get
    it. ``split_sizes``: ``(n_train, n_valid, n_test)``; ``None`` means the protocol sizes of
    ``DATASETS[name]``. The file must hold exactly these (a stored split) or their totals (a
    split cut here), else an :class:`~vaeflow.checks.InputError` names the key and both
    shapes. A damaged file (cut short, emptied, overwritten) raises :class:`DataFileError`,
    which says how to get it again.
    """
    spec, sizes = _spec_and_sizes(name, split_sizes)
    path = _data_file(spec, sizes, data_dir, download)
    if spec.warning:
        warnings.warn(spec.warning, UserWarning, stacklevel=2)
    try:
        arrays = _read_npz(spec, path, sizes)
    except SplitSizeError as err:
        if sizes == spec.split_sizes:
            raise
        # a wrong number of rows would otherwise read as a bad file, when the sizes asked for
        # are wrong; a wrong dtype, key or value is the file's, whatever the sizes
        raise InputError(
            f"{err}; split_sizes={sizes} was asked for: it gives the sizes of the splits that "
            f"the file holds (a smaller file built the same way), it does not take a subset; "
            f"the protocol's file holds {spec.split_sizes}"
        ) from err
    splits = [torch.from_numpy(a) for a in arrays]
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
