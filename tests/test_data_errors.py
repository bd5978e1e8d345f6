"""How :mod:`vaeflow.data` reports what went wrong: a wrong file is named by its path, and
split_sizes are blamed only for a number of rows; only what the user gave is a one-line error
(a bug in a reader keeps its traceback); a MemoryError is no damaged file; a download is kept
when the split sizes asked for do not fit it. Small cases, CPU, no network. (Each kind of wrong
file that is refused is in test_data.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_data import SIZES, write_tiny

from vaeflow.data import DataFileError, load_dataset


def test_split_sizes_are_blamed_only_for_a_number_of_rows(tmp_path: Path) -> None:
    """With split_sizes given, every ValueError of the file got "split_sizes=... was asked for:
    it does not take a subset" appended, a wrong dtype or values outside [0, 1] too, as if the
    sizes were the trouble; now only a number of rows that the sizes do not fit."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    grey = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    np.savez(path, x_train=grey.astype(np.float32), x_test=grey[:4])
    with pytest.raises(ValueError, match="has dtype float32, expected uint8") as info:
        load_dataset("mnist", tmp_path, split_sizes=(5, 3, 4))
    assert "asked for" not in str(info.value)
    np.savez(path, x_train=grey[:, :, :20], x_test=grey[:4])  # 28x20 images: wrong at any size
    with pytest.raises(ValueError, match=r"has shape \(8, 28, 20\)") as info:
        load_dataset("mnist", tmp_path, split_sizes=(5, 3, 4))
    assert "asked for" not in str(info.value)
    np.savez(tmp_path / "omniglot.npz", x_train=grey.astype(np.float32), x_test=grey[:4] / 255)
    with pytest.raises(ValueError, match=r"'x_train' has values outside \[0, 1\]") as info:
        load_dataset("omniglot", tmp_path, split_sizes=(5, 3, 4))
    assert "asked for" not in str(info.value)
    np.savez(path, x_train=grey, x_test=grey[:4])  # 8 rows, 9 asked for: the sizes are named
    with pytest.raises(ValueError, match=r"has shape \(8, 28, 28\), expected shape \(9, 28, "
                                         r"28\); split_sizes=\(6, 3, 4\) was asked for"):
        load_dataset("mnist", tmp_path, split_sizes=(6, 3, 4))


def test_a_wrong_file_is_named_by_its_path(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of the wrong dtype, key or shape was named by its bare file name ("mnist.npz:
    key 'x_train' has dtype ..."), with no word of the folder, which $VAEFLOW_DATA or the
    per-user cache may have chosen; a damaged file was already named by its path."""
    folder = tmp_path / "from-the-environment"
    folder.mkdir()
    monkeypatch.setenv("VAEFLOW_DATA", str(folder))
    grey = np.zeros((8, 28, 28), np.uint8)
    np.savez(folder / "mnist.npz", x_train=grey.astype(np.int16), x_test=grey[:4])
    with pytest.raises(ValueError, match="has dtype int16") as info:
        load_dataset("mnist", split_sizes=(5, 3, 4), download=False)
    assert str(info.value).startswith(f"{folder / 'mnist.npz'}: key 'x_train'")
    np.savez(folder / "mnist.npz", x_test=grey[:4])
    with pytest.raises(ValueError, match="missing key 'x_train'") as info:
        load_dataset("mnist", split_sizes=(5, 3, 4), download=False)
    assert str(folder / "mnist.npz") in str(info.value)


def test_only_what_the_user_gave_is_a_one_line_data_error(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``run_dataset`` turned every ``ValueError`` raised inside ``load_dataset`` into bad input,
    so a bug in a reader was printed as "vaeflow: error: ..." without its traceback; and a
    download's checksum mismatch (a ``RuntimeError``) was a traceback. Now the data package
    raises ``InputError`` for a wrong file itself, and the CLI prints a ``ChecksumError`` as
    one line."""
    from test_cli import tiny_args

    import vaeflow.data.dataset as dataset
    from vaeflow.checks import InputError
    from vaeflow.cli import main
    from vaeflow.data import ChecksumError, get_spec

    def train(data_dir: Path) -> list[str]:
        return ["train", *tiny_args(data_dir), "--flow", "planar", "--max-steps", "1",
                "--out", str(tmp_path / f"run-{data_dir.name}")]

    def one_line() -> str:  # after the line that names the run directory
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and lines[1].startswith("vaeflow: error: "), lines
        return lines[1]

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.savez(wrong / get_spec("static_mnist").filename, images=np.zeros(3, np.uint8))
    with pytest.raises(InputError, match="missing key"):
        load_dataset("static_mnist", wrong, split_sizes=(5, 3, 4), download=False)
    assert main(train(wrong)) == 2
    assert "missing key" in one_line()

    def a_bug(*args: Any, **kwargs: Any) -> None:
        raise ValueError("a bug in a reader")

    monkeypatch.setattr(dataset, "_read_npz", a_bug)
    with pytest.raises(ValueError, match="a bug in a reader") as info:
        main(train(tiny_data_dir))
    assert not isinstance(info.value, InputError)
    capsys.readouterr()

    def mismatch(*args: Any, **kwargs: Any) -> None:
        raise ChecksumError("checksum mismatch for a.gz: expected sha256 0, got 1")

    monkeypatch.setattr(dataset, "_download_dataset", mismatch)
    assert main(train(tmp_path / "empty")) == 2
    assert "checksum mismatch" in one_line()


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
