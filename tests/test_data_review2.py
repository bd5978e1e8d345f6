"""Review tests of :mod:`vaeflow.data`: failures that are not the data file's must not be
reported as a damaged file, and a download is not thrown away for split sizes it does not hold.
Small cases, CPU, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data import SIZES, write_tiny

from vaeflow.data import DataFileError, load_dataset


def test_a_memory_error_is_not_a_damaged_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every exception of reading an intact member was turned into "the file is damaged ...
    delete it": a MemoryError too, so a good file was to be deleted and the real cause was a
    one-line error without its traceback. A member whose bytes pass their CRC check is not
    damaged: the exception now passes through unchanged."""
    write_tiny("caltech", tmp_path)

    def out_of_memory(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError("Unable to allocate 47.0 MiB")

    monkeypatch.setattr(np.lib.format, "read_array", out_of_memory)
    with pytest.raises(MemoryError, match="Unable to allocate") as info:
        load_dataset("caltech", tmp_path, split_sizes=SIZES["caltech"])
    assert not isinstance(info.value, DataFileError)


def test_a_download_is_kept_when_the_split_sizes_asked_for_do_not_fit_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing file was downloaded, converted, checked against the split_sizes asked for
    and, when they did not fit it (split_sizes taken for a subset), thrown away with a bare
    "has shape ..., expected shape ...": the next try downloaded it again. The protocol's file
    is now kept, and the error names the sizes asked for, as for a file already there."""
    import dataclasses
    import gzip

    import vaeflow.data.download as download_mod
    from vaeflow.data import DATASETS

    def idx(array: np.ndarray, magic: int) -> bytes:
        dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
        return gzip.compress(magic.to_bytes(4, "big") + dims + array.tobytes())

    protocol = (6, 2, 3)  # a small stand-in for the protocol's 50000/10000/10000
    x = np.random.default_rng(0).integers(0, 256, (11, 28, 28), dtype=np.uint8)
    y = np.zeros(11, np.uint8)
    files = {"train-images-idx3-ubyte.gz": idx(x[:8], 2051),
             "train-labels-idx1-ubyte.gz": idx(y[:8], 2049),
             "t10k-images-idx3-ubyte.gz": idx(x[8:], 2051),
             "t10k-labels-idx1-ubyte.gz": idx(y[8:], 2049)}
    spec = DATASETS["mnist"]
    sources = tuple(dataclasses.replace(s, checksum=None) for s in spec.sources)
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(spec, split_sizes=protocol,
                                                               sources=sources))
    fetched: list[str] = []

    def fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        Path(dest).write_bytes(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download_mod, "_fetch", fetch)
    with pytest.raises(ValueError, match=r"has shape \(8, 28, 28\), expected shape \(6, 28, "
                                         r"28\); split_sizes=\(4, 2, 3\) was asked for"):
        load_dataset("mnist", tmp_path, split_sizes=(4, 2, 3))
    assert len(fetched) == 4 and (tmp_path / spec.filename).is_file()
    ds = load_dataset("mnist", tmp_path, split_sizes=protocol)  # no second download
    assert len(fetched) == 4 and ds.split_sizes == protocol
    assert np.array_equal(ds.train.squeeze(1).mul(255).round().numpy(), x[:6])
