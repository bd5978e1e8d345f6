"""Where each data set's raw files come from: :class:`Source` (mirror URLs and checksum), the
table of every public source (:data:`SOURCES`), and the digests that check a downloaded file.

Downloading itself is :mod:`vaeflow.data.download`; turning the raw files into the canonical
``.npz`` arrays is :mod:`vaeflow.data.convert`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vaeflow.data.base import SPLITS

__all__ = ["SOURCES", "Source"]


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

SOURCES: dict[str, tuple[Source, ...]] = {
    "static_mnist": tuple(
        Source(
            f"binarized_mnist_{s}.amat",
            (f"{_LAROCHELLE}binarized_mnist_{s}.amat",),
            ("git-blob", _AMAT_BLOBS[s]),
        )
        for s in SPLITS
    ),
    "mnist": tuple(
        Source(f, tuple(m + f for m in _MNIST_MIRRORS), ("md5", md5))
        for f, md5 in _MNIST_MD5.items()
    ),
    "omniglot": (
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
    # built from the 105x105 originals by shared tools/build_data.py: no download
    "omniglot_rederived": (),
    "freyfaces": (
        # No checksum of frey_rawface.mat is published anywhere we know of (the sha256 in
        # shared/data/README.md is of a different file, freyfaces.pkl), so none is checked:
        # the download logs the sha256 it saw instead.
        Source("frey_rawface.mat", ("https://cs.nyu.edu/~roweis/data/frey_rawface.mat",), None),
    ),
    "caltech": (
        Source(
            "caltech101_silhouettes_28_split1.mat",
            ("https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",),
            ("sha256", "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"),
        ),
    ),
}
