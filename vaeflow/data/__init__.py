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

A damaged file (cut short by an interrupted copy, emptied, overwritten) raises
:class:`DataFileError`, a ``ValueError`` that names the file and how to get it again. Every
error about what the user gave (a name, split sizes, a file's contents) is an
:class:`~vaeflow.checks.InputError`, which the CLI prints as one line; any other exception from
here is a bug and keeps its traceback.

The package, one concept per module (each imports only those above it)::

    base.py      split names, type aliases, the errors
    paths.py     the data directory: --data-dir, $VAEFLOW_DATA, the per-user cache
    sources.py   Source (mirror URLs, checksum) and the table of every public source
    convert.py   raw source formats -> the canonical .npz arrays
    readers.py   opening an .npz safely, checking it, cutting it into splits
    registry.py  DatasetSpec, DATASETS, get_spec, figure_text
    download.py  fetching, checking and converting a missing file, written atomically
    loader.py    DeviceLoader: device-resident batches with a resumable state
    dataset.py   Dataset, load_dataset, and ensure_dataset (the file, not read)
"""

from __future__ import annotations

from vaeflow.data.base import ChecksumError, DataFileError, DataNotFoundError
from vaeflow.data.dataset import Dataset, ensure_dataset, load_dataset
from vaeflow.data.download import _download as _download
from vaeflow.data.loader import DeviceLoader
from vaeflow.data.paths import resolve_data_dir
from vaeflow.data.readers import FREY_SPLIT_SEED as FREY_SPLIT_SEED
from vaeflow.data.registry import DATASETS, DatasetSpec, figure_text, get_spec
from vaeflow.data.sources import Source
from vaeflow.data.sources import _digest as _digest

# The public names. Also reachable here, for the tests: FREY_SPLIT_SEED, _digest, _download
# (re-exported "as" themselves above); the download hooks (_fetch, DOWNLOAD_TIMEOUT) are
# replaced where they are used, on vaeflow.data.download.
__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataFileError",
    "DataNotFoundError",
    "Dataset",
    "DatasetSpec",
    "DeviceLoader",
    "Source",
    "ensure_dataset",
    "figure_text",
    "get_spec",
    "load_dataset",
    "resolve_data_dir",
]
