"""Tests of vaeflow.data on tiny files written in the shared/data formats (CPU, no network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vaeflow import data
from vaeflow.data import (
    DATASETS,
    ChecksumError,
    DataFileError,
    DataNotFoundError,
    DeviceLoader,
    Source,
    load_dataset,
    resolve_data_dir,
)
from vaeflow.data import download as download_mod  # where _fetch is called: patch it there

# small split sizes for the tiny files: (train, valid, test)
SIZES = {
    "static_mnist": (6, 3, 4),
    "mnist": (5, 3, 4),
    "omniglot": (6, 3, 4),
    "omniglot_rederived": (7, 2, 5),
    "freyfaces": (6, 3, 3),
    "caltech": (5, 3, 2),
}
SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------------------
# Writers of tiny files in exactly the shared/data formats
# ------------------------------------------------------------------------------------------


def _bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.random((n, 784)) < 0.3).astype(np.uint8)


def _write_packed(path: Path, bits: dict[str, np.ndarray], **extra: np.ndarray) -> None:
    arrays = {}
    for split, b in bits.items():
        arrays[f"x_{split}"] = np.packbits(b, axis=1)
        arrays[f"shape_{split}"] = np.array(b.shape, dtype=np.int64)
    np.savez_compressed(path, **arrays, **extra)


def write_tiny(name: str, directory: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny file of data set ``name``; return the raw arrays written."""
    rng = np.random.default_rng(seed)
    n_train, n_valid, n_test = SIZES[name]
    path = directory / DATASETS[name].filename
    if name in ("static_mnist", "caltech"):
        bits = {s: _bits(rng, n) for s, n in zip(SPLITS, SIZES[name], strict=True)}
        extra = {}
        if name == "caltech":
            extra = {f"y_{s}": np.zeros(len(b), np.uint8) for s, b in bits.items()}
            extra["classnames"] = np.array(["a"] * 101)
        _write_packed(path, bits, **extra)
        return bits
    if name == "mnist":
        raw = {
            "x_train": rng.integers(0, 256, (n_train + n_valid, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n_train + n_valid, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
        }
    elif name == "omniglot":
        raw = {
            "x_train": rng.random((n_train + n_valid, 28, 28), dtype=np.float32),
            "x_test": rng.random((n_test, 28, 28), dtype=np.float32),
        }
    elif name == "omniglot_rederived":
        raw = {
            "x_train": rng.integers(0, 256, (n_train + n_valid, 28, 28), dtype=np.uint8),
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        }
    elif name == "freyfaces":
        # a distinct first pixel per row so that rows can be told apart after the shuffle
        x = rng.integers(0, 256, (sum(SIZES[name]), 28, 20), dtype=np.uint8)
        x[:, 0, 0] = np.arange(len(x))
        raw = {"x": x}
    else:
        raise AssertionError(name)
    np.savez_compressed(path, **raw)
    return raw


def load_tiny(name: str, directory: Path, **kwargs) -> data.Dataset:
    if name == "omniglot_rederived":
        with pytest.warns(UserWarning, match="NOT comparable"):
            return load_dataset(name, directory, split_sizes=SIZES[name], **kwargs)
    return load_dataset(name, directory, split_sizes=SIZES[name], **kwargs)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download fail as it does offline; return the URLs that were tried."""
    tried: list[str] = []

    def fetch(url: str, dest: Path) -> None:
        tried.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(download_mod, "_fetch", fetch)
    return tried


# ------------------------------------------------------------------------------------------
# Data directory and registry
# ------------------------------------------------------------------------------------------


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("VAEFLOW_DATA")
    assert resolve_data_dir(None) == tmp_path / "xdg" / "vaeflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "vaeflow"


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'cifar'") as info:
        load_dataset("cifar", tmp_path)
    for name in DATASETS:
        assert repr(name) in str(info.value)


def test_registry_protocol() -> None:
    assert DATASETS["static_mnist"].split_sizes == (50000, 10000, 10000)
    assert DATASETS["mnist"].split_sizes == (50000, 10000, 10000)
    assert DATASETS["omniglot"].split_sizes == (23000, 1345, 8070)
    assert DATASETS["omniglot_rederived"].split_sizes == (23000, 1345, 8115)
    assert DATASETS["freyfaces"].split_sizes == (1565, 200, 200)
    assert DATASETS["caltech"].split_sizes == (4100, 2264, 2307)
    assert "NOT comparable" in DATASETS["omniglot_rederived"].note


# ------------------------------------------------------------------------------------------
# Loading: shapes, values, splits
# ------------------------------------------------------------------------------------------

EXPECTED = {  # likelihood, dynamic binarization, bits/dim, H, W
    "static_mnist": ("bernoulli", False, False, 28, 28),
    "mnist": ("bernoulli", True, False, 28, 28),
    "omniglot": ("bernoulli", True, False, 28, 28),
    "omniglot_rederived": ("bernoulli", True, False, 28, 28),
    "freyfaces": ("categorical256", False, True, 28, 20),
    "caltech": ("bernoulli", False, False, 28, 28),
}


@pytest.mark.parametrize("name", list(DATASETS))
def test_load_shapes_dtypes_ranges(name: str, tmp_path: Path) -> None:
    write_tiny(name, tmp_path)
    ds = load_tiny(name, tmp_path)
    likelihood, dynamic, bpd, h, w = EXPECTED[name]
    assert (ds.name, ds.likelihood, ds.dynamic_binarization, ds.bits_per_dim) == (
        name, likelihood, dynamic, bpd
    )
    assert ds.input_shape == (1, h, w)
    assert ds.split_sizes == SIZES[name]
    for split, n in zip(SPLITS, SIZES[name], strict=True):
        x = getattr(ds, split)
        assert x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.shape == (n, 1, h, w)
        assert x.min() >= 0 and x.max() <= 1
        if likelihood == "bernoulli" and (split != "train" or not dynamic):
            assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_static_mnist_keeps_bits_and_order(tmp_path: Path) -> None:
    bits = write_tiny("static_mnist", tmp_path)
    ds = load_tiny("static_mnist", tmp_path)
    for split in SPLITS:
        expected = torch.from_numpy(bits[split].reshape(-1, 1, 28, 28)).float()
        assert torch.equal(getattr(ds, split), expected)


def test_caltech_is_inverted(tmp_path: Path) -> None:
    bits = write_tiny("caltech", tmp_path)
    ds = load_tiny("caltech", tmp_path)
    for split in SPLITS:
        stored = torch.from_numpy(bits[split].reshape(-1, 1, 28, 28)).float()
        assert torch.equal(getattr(ds, split), 1 - stored)


def test_mnist_split_and_fixed_eval_binarization(tmp_path: Path) -> None:
    raw = write_tiny("mnist", tmp_path)
    n_train = SIZES["mnist"][0]
    ds = load_tiny("mnist", tmp_path)
    grey = torch.from_numpy(raw["x_train"]).float().div(255).unsqueeze(1)
    assert torch.equal(ds.train, grey[:n_train])  # train keeps grey levels
    # valid = the last images of x_train, binarized: 0 where the grey level is 0, 1 where 255
    zero, full = grey[n_train:] == 0, grey[n_train:] == 1
    assert (ds.valid[zero] == 0).all() and (ds.valid[full] == 1).all()
    again = load_tiny("mnist", tmp_path)
    assert torch.equal(ds.valid, again.valid) and torch.equal(ds.test, again.test)


def test_frey_seeded_split(tmp_path: Path) -> None:
    raw = write_tiny("freyfaces", tmp_path)["x"]
    a, b = load_tiny("freyfaces", tmp_path), load_tiny("freyfaces", tmp_path)
    for split in SPLITS:
        assert torch.equal(getattr(a, split), getattr(b, split))
    # the reference protocol: np.random.seed(123); np.random.shuffle(x); then cut
    shuffled = raw.copy()
    np.random.RandomState(data.FREY_SPLIT_SEED).shuffle(shuffled)
    got = torch.cat([a.train, a.valid, a.test]).mul(255).round().to(torch.uint8)
    assert torch.equal(got.squeeze(1), torch.from_numpy(shuffled))
    assert not np.array_equal(shuffled, raw)  # a real shuffle happened


@pytest.mark.parametrize("name", ["omniglot", "omniglot_rederived"])
def test_omniglot_split_is_a_seeded_partition(name: str, tmp_path: Path) -> None:
    raw = write_tiny(name, tmp_path)
    ds, again = load_tiny(name, tmp_path), load_tiny(name, tmp_path)
    assert torch.equal(ds.train, again.train) and torch.equal(ds.valid, again.valid)
    x = torch.from_numpy(raw["x_train"]).float()
    if x.max() > 1:
        x = x / 255
    n_train, n_valid, _ = SIZES[name]
    rows = [tuple(r) for r in x.flatten(1).tolist()]
    train = [tuple(r) for r in ds.train.flatten(1).tolist()]
    # train: distinct rows of the file, not simply its first rows; valid: the others, binarized
    assert len(set(train)) == n_train and set(train) <= set(rows)
    assert not torch.equal(ds.train.squeeze(1), x[:n_train])
    assert len(set(rows) - set(train)) == n_valid
    assert set(ds.valid.unique().tolist()) <= {0.0, 1.0}


def test_dataset_loader_helper(tmp_path: Path) -> None:
    write_tiny("mnist", tmp_path)
    ds = load_tiny("mnist", tmp_path)
    train = ds.loader("train", batch_size=2, seed=1)
    assert train.shuffle and train.dynamic_binarization and len(train) == 3
    valid = ds.loader("valid", batch_size=2)
    assert not valid.shuffle and not valid.dynamic_binarization
    assert torch.equal(torch.cat(list(valid)), ds.valid)
    with pytest.raises(ValueError, match="unknown split"):
        ds.loader("dev", batch_size=2)


# ------------------------------------------------------------------------------------------
# DeviceLoader
# ------------------------------------------------------------------------------------------


def _grey(n: int = 10) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def test_loader_batches_and_len() -> None:
    x = torch.arange(10.0).view(10, 1, 1, 1)
    loader = DeviceLoader(x, batch_size=4)
    assert len(loader) == 3
    assert [b.shape[0] for b in loader] == [4, 4, 2]
    assert torch.equal(torch.cat(list(loader)), x)  # no shuffle: in order
    assert len(DeviceLoader(x, batch_size=4, drop_last=True)) == 2
    shuffled = DeviceLoader(x, batch_size=3, shuffle=True, seed=0)
    epochs = [torch.cat(list(shuffled)).flatten() for _ in range(2)]
    for e in epochs:  # each epoch is a permutation of the data
        assert torch.equal(e.sort().values, x.flatten())
    assert not torch.equal(epochs[0], epochs[1])
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(x, batch_size=0)


def test_dynamic_binarization_fresh_and_reproducible() -> None:
    x = _grey()

    def two_epochs(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(x, batch_size=10, dynamic_binarization=True, seed=seed)
        return [next(iter(loader)) for _ in range(2)]

    e1, e2 = two_epochs(seed=3)
    assert set(e1.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(e1, e2)  # binarized afresh every epoch
    r1, r2 = two_epochs(seed=3)
    assert torch.equal(e1, r1) and torch.equal(e2, r2)  # reproducible from the seed
    assert not torch.equal(e1, two_epochs(seed=4)[0])


@pytest.mark.parametrize("shuffle,binarize", [(True, True), (True, False), (False, True)])
def test_loader_resume_mid_epoch_is_bit_identical(shuffle: bool, binarize: bool) -> None:
    x = _grey(11)
    kw = dict(batch_size=3, shuffle=shuffle, dynamic_binarization=binarize, seed=5)
    reference = DeviceLoader(x, **kw)
    expected = [list(reference) for _ in range(3)]  # three uninterrupted epochs

    killed = DeviceLoader(x, **kw)
    assert all(torch.equal(a, b) for a, b in zip(list(killed), expected[0], strict=True))
    seen = []
    for batch in killed:  # second epoch, "killed" after two batches
        seen.append(batch)
        if len(seen) == 2:
            buffer = io.BytesIO()
            torch.save(killed.state_dict(), buffer)
            break
    assert all(torch.equal(a, b) for a, b in zip(seen, expected[1], strict=False))

    buffer.seek(0)
    resumed = DeviceLoader(x, **kw)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.in_epoch and resumed.batches_left == len(resumed) - 2
    rest = list(resumed)
    assert len(rest) == len(expected[1]) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[1][2:], strict=True))
    third = list(resumed)  # and the following epoch continues the same stream
    assert all(torch.equal(a, b) for a, b in zip(third, expected[2], strict=True))


def test_loader_state_after_last_batch_starts_new_epoch() -> None:
    x = _grey(6)
    loader = DeviceLoader(x, batch_size=3, shuffle=True, seed=0)
    reference = DeviceLoader(x, batch_size=3, shuffle=True, seed=0)
    expected = [list(reference) for _ in range(2)]
    for i, _ in enumerate(loader):
        if i == 1:  # the consumer stops right after the last batch
            break
    assert not loader.in_epoch
    assert all(torch.equal(a, b) for a, b in zip(list(loader), expected[1], strict=True))


def test_loader_state_from_another_kind_of_device_goes_on(caplog) -> None:
    # A CUDA generator's state (16 bytes) cannot set a CPU generator: a run resumed with
    # another --device failed there. The epoch goes on in its saved order; later draws come
    # from a generator seeded from the saved state, the same on every such resume.
    x = _grey(12)

    def make() -> DeviceLoader:
        return DeviceLoader(x, batch_size=4, shuffle=True, seed=1)

    loader = make()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["generator_device"] == "cpu"
    rest = list(it)
    cuda_like = {**state, "generator_device": "cuda",
                 "generator": torch.arange(16, dtype=torch.uint8)}
    later = []
    for _ in range(2):
        other = make()
        with caplog.at_level("WARNING", logger="vaeflow.data.loader"):
            other.load_state_dict(cuda_like)
        assert "saved on cuda" in caplog.text
        resumed = list(other)
        assert len(resumed) == 2 and all(map(torch.equal, resumed, rest))  # the saved order
        later.append(torch.cat(list(other)))
    assert torch.equal(later[0], later[1])  # deterministic
    assert torch.equal(later[0].flatten().sort().values, x.flatten().sort().values)
    old = {k: v for k, v in cuda_like.items() if k != "generator_device"}  # older checkpoint
    make().load_state_dict(old)


def test_loader_refuses_foreign_state() -> None:
    state = DeviceLoader(_grey(10), batch_size=3, shuffle=True).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(_grey(10), batch_size=4, shuffle=True).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        DeviceLoader(_grey(9), batch_size=3, shuffle=True).load_state_dict(state)


# ------------------------------------------------------------------------------------------
# Missing files, downloads, checksums
# ------------------------------------------------------------------------------------------


def test_missing_file_without_network_explains(
    tmp_path: Path, no_network: list[str]
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("caltech", tmp_path / "data")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "caltech101_silhouettes.npz" in msg
    assert str(tmp_path / "data") in msg
    assert "--data-dir" in msg and "$VAEFLOW_DATA" in msg and "cache" in msg
    url = "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat"
    assert url in msg and no_network == [url]
    assert "Name or service not known" in msg
    assert not (tmp_path / "data").exists()  # nothing kept, not even the folder


def test_missing_file_names_the_env_var_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"chosen by \$VAEFLOW_DATA"):
        load_dataset("static_mnist")
    assert len(no_network) == 1  # the first file failed; the others were not tried
    assert os.listdir(tmp_path) == []


def test_a_data_directory_that_is_a_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    """Not "binarized_mnist.npz is not in the data directory /x/binarized_mnist.npz", the
    message of a file that names the file itself, and no download into it."""
    path = tmp_path / "binarized_mnist.npz"
    path.write_bytes(b"not a folder")
    monkeypatch.setenv("VAEFLOW_DATA", str(path))
    with pytest.raises(DataNotFoundError, match=r"is a file, not a folder.*chosen by \$VAEFLOW"):
        load_dataset("static_mnist")
    assert no_network == [] and path.read_bytes() == b"not a folder"


def test_a_folder_in_the_data_file_s_place_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    """A folder named binarized_mnist.npz (an archive unpacked in place) is named as such, not
    taken for a missing file to download over it."""
    (tmp_path / "binarized_mnist.npz").mkdir()
    monkeypatch.setenv("VAEFLOW_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"binarized_mnist.npz is a folder, not the data "
                                                r"file.*chosen by \$VAEFLOW"):
        load_dataset("static_mnist")
    assert no_network == []


def test_download_false_does_not_fetch(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataNotFoundError, match="download=False") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert "mnist.npz" in str(info.value) and "ossci-datasets" in str(info.value)
    assert no_network == []


def test_rederived_omniglot_has_no_download(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataNotFoundError, match="no public download"):
        load_dataset("omniglot_rederived", tmp_path)
    assert no_network == []


def test_wrong_checksum_is_refused_and_nothing_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_mod, "_fetch", lambda url, dest: Path(dest).write_bytes(b"<html>"))
    with pytest.raises(ChecksumError) as info:
        load_dataset("caltech", tmp_path)
    msg = str(info.value)
    assert "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a" in msg
    assert hashlib.sha256(b"<html>").hexdigest() in msg
    assert list(tmp_path.iterdir()) == []


def test_git_blob_digest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    # `printf 'hello\n' | git hash-object --stdin`
    assert data._digest(path, "git-blob") == "ce013625030ba8dba906f756967f9e9ca394464a"


def _git_blob(payload: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(payload) + payload).hexdigest()


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.tobytes())


def _fake_sources(name: str, rng: np.random.Generator, tmp: Path) -> tuple[dict, dict]:
    """Tiny source files of data set ``name``: {file name: bytes}, and the expected splits."""
    n_train, n_valid, n_test = SIZES[name]
    if name == "static_mnist":
        bits = {s: _bits(rng, n) for s, n in zip(SPLITS, SIZES[name], strict=True)}
        files = {
            f"binarized_mnist_{s}.amat": "".join(
                " ".join(map(str, row)) + "\n" for row in b
            ).encode()
            for s, b in bits.items()
        }
        return files, {s: b.reshape(-1, 28, 28) for s, b in bits.items()}
    if name == "mnist":
        x = rng.integers(0, 256, (n_train + n_valid + n_test, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, len(x), dtype=np.uint8)
        files = {
            "train-images-idx3-ubyte.gz": _idx(x[: n_train + n_valid], 2051),
            "train-labels-idx1-ubyte.gz": _idx(y[: n_train + n_valid], 2049),
            "t10k-images-idx3-ubyte.gz": _idx(x[n_train + n_valid :], 2051),
            "t10k-labels-idx1-ubyte.gz": _idx(y[n_train + n_valid :], 2049),
        }
        return files, {"train": x[:n_train] / 255, "test": None}
    scipy_io = pytest.importorskip("scipy.io")
    mat = tmp / "fake.mat"
    images = rng.integers(0, 2, (n_train + n_valid + n_test, 28, 28)).astype(np.uint8)
    # MATLAB stores images column-major: a row of the .mat is the image read column by column
    columns = images.transpose(0, 2, 1).reshape(len(images), 784)
    if name == "caltech":
        a, b = n_train, n_train + n_valid
        scipy_io.savemat(mat, {
            "train_data": columns[:a], "val_data": columns[a:b], "test_data": columns[b:],
            "train_labels": np.ones((a, 1), np.uint8), "val_labels": np.ones((b - a, 1), np.uint8),
            "test_labels": np.ones((n_test, 1), np.uint8),
            "classnames": np.array([["x"] * 101], dtype=object),
        })
        filename = "caltech101_silhouettes_28_split1.mat"
        expected = {"train": 1 - images[:a], "valid": 1 - images[a:b], "test": 1 - images[b:]}
    elif name == "omniglot":
        n = n_train + n_valid
        scipy_io.savemat(mat, {"data": columns[:n].T.astype(float) * 0.5,
                               "testdata": columns[n:].T.astype(float) * 0.5})
        filename = "chardata.mat"
        expected = {"test": images[n:] * 0.5}
    elif name == "freyfaces":
        faces = rng.integers(0, 256, (n_train + n_valid + n_test, 28, 20), dtype=np.uint8)
        scipy_io.savemat(mat, {"ff": faces.reshape(len(faces), 560).T})
        filename = "frey_rawface.mat"
        expected = {"all": faces}
    else:
        raise AssertionError(name)
    return {filename: mat.read_bytes()}, expected


@pytest.mark.parametrize("name", ["static_mnist", "mnist", "caltech", "omniglot", "freyfaces"])
def test_download_converts_and_writes_npz(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, expected = _fake_sources(name, np.random.default_rng(1), tmp_path)
    spec = DATASETS[name]
    # the real digests are those of the full-size files: checksum our tiny ones instead,
    # using each source's own kind of digest
    sources = []
    for s in spec.sources:
        payload = files[s.filename]
        kind = s.checksum[0] if s.checksum else None
        digest = {"git-blob": _git_blob(payload), "md5": hashlib.md5(payload).hexdigest(),
                  "sha256": hashlib.sha256(payload).hexdigest(), None: None}[kind]
        sources.append(dataclasses.replace(s, checksum=(kind, digest) if kind else None))
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, sources=tuple(sources)))
    by_url = {u: files[s.filename] for s in sources for u in s.urls[:1]}
    monkeypatch.setattr(
        download_mod, "_fetch", lambda url, dest: Path(dest).write_bytes(by_url[url])
    )

    out = tmp_path / "out"
    ds = load_tiny(name, out)
    assert sorted(p.name for p in out.iterdir()) == [spec.filename]  # no temp files left
    with np.load(out / spec.filename, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    if name == "freyfaces":
        shuffled = expected["all"].copy()
        np.random.RandomState(data.FREY_SPLIT_SEED).shuffle(shuffled)
        got = torch.cat([ds.train, ds.valid, ds.test]).mul(255).round().squeeze(1)
        assert torch.equal(got, torch.from_numpy(shuffled).float())
        return
    for split, want in expected.items():
        if want is None:
            continue
        got = getattr(ds, split).squeeze(1).double()
        if split != "train" and ds.dynamic_binarization:
            assert ((got == 0) | (got == 1)).all() and (got[torch.from_numpy(want) == 0] == 0).all()
        else:
            assert torch.allclose(got, torch.from_numpy(np.asarray(want, np.float64)), atol=1e-6)
    # a second load reads the file and does not download again
    monkeypatch.setattr(download_mod, "_fetch", lambda url, dest: pytest.fail("downloaded twice"))
    load_tiny(name, out)


def test_download_without_known_checksum_logs_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files, _ = _fake_sources("freyfaces", np.random.default_rng(2), tmp_path)
    payload = files["frey_rawface.mat"]
    assert DATASETS["freyfaces"].sources[0].checksum is None
    monkeypatch.setattr(download_mod, "_fetch", lambda url, dest: Path(dest).write_bytes(payload))
    with caplog.at_level("WARNING", logger="vaeflow.data"):
        load_tiny("freyfaces", tmp_path)
    assert hashlib.sha256(payload).hexdigest() in caplog.text


def test_source_mirrors_are_tried_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"abc"
    source = Source("f", ("http://a/f", "http://b/f"), ("md5", hashlib.md5(payload).hexdigest()))
    tried = []

    def fetch(url: str, dest: Path) -> None:
        tried.append(url)
        if "//a/" in url:
            raise urllib.error.URLError("down")
        Path(dest).write_bytes(payload)

    monkeypatch.setattr(download_mod, "_fetch", fetch)
    assert data._download(source, tmp_path / "f") == []
    assert tried == list(source.urls) and (tmp_path / "f").read_bytes() == payload


def test_wrong_row_length_is_refused(tmp_path: Path) -> None:
    n = SIZES["static_mnist"]
    np.savez_compressed(
        tmp_path / "binarized_mnist.npz",
        **{f"x_{s}": np.zeros((k, 97), np.uint8) for s, k in zip(SPLITS, n, strict=True)},
        **{f"shape_{s}": np.array([k, 776]) for s, k in zip(SPLITS, n, strict=True)},
    )
    with pytest.raises(ValueError) as info:
        load_tiny("static_mnist", tmp_path)
    msg = str(info.value)
    assert "binarized_mnist.npz" in msg and "'x_train'" in msg
    assert "(6, 97)" in msg and "(6, 98)" in msg


def test_wrong_image_shape_is_refused(tmp_path: Path) -> None:
    np.savez_compressed(
        tmp_path / "mnist.npz",
        x_train=np.zeros((8, 28, 28), np.uint8), x_test=np.zeros((4, 27, 28), np.uint8),
    )
    with pytest.raises(ValueError, match=r"mnist.npz: key 'x_test' has shape \(4, 27, 28\), "
                                         r"expected shape \(4, 28, 28\)"):
        load_tiny("mnist", tmp_path)


def test_wrong_split_size_is_refused(tmp_path: Path) -> None:
    write_tiny("freyfaces", tmp_path)
    with pytest.raises(ValueError, match=r"key 'x' has shape \(12, 28, 20\), expected shape "
                                         r"\(1965, 28, 20\)"):
        load_dataset("freyfaces", tmp_path)  # the protocol sizes, not the tiny ones


def test_missing_key_and_wrong_dtype_are_refused(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "freyfaces.npz", faces=np.zeros((12, 28, 20), np.uint8))
    with pytest.raises(ValueError, match=r"freyfaces.npz: missing key 'x'.*\['faces'\]"):
        load_tiny("freyfaces", tmp_path)
    np.savez_compressed(tmp_path / "freyfaces.npz", x=np.zeros((12, 28, 20), np.float32))
    with pytest.raises(ValueError, match="key 'x' has dtype float32, expected uint8"):
        load_tiny("freyfaces", tmp_path)


def test_stated_shape_must_match(tmp_path: Path) -> None:
    bits = {s: np.zeros((k, 784), np.uint8) for s, k in zip(SPLITS, SIZES["caltech"], strict=True)}
    _write_packed(tmp_path / "caltech101_silhouettes.npz", bits)
    with np.load(tmp_path / "caltech101_silhouettes.npz") as z:
        arrays = dict(z)
    arrays["shape_valid"] = np.array([3, 783])
    np.savez_compressed(tmp_path / "caltech101_silhouettes.npz", **arrays)
    with pytest.raises(ValueError, match=r"'shape_valid' holds \[3, 783\], expected \[3, 784\]"):
        load_tiny("caltech", tmp_path)


def test_grey_values_outside_unit_interval_are_refused(tmp_path: Path) -> None:
    n_train, n_valid, n_test = SIZES["omniglot"]
    np.savez_compressed(tmp_path / "omniglot.npz",
                        x_train=np.full((n_train + n_valid, 28, 28), 2.0, np.float32),
                        x_test=np.zeros((n_test, 28, 28), np.float32))
    with pytest.raises(ValueError, match="outside"):
        load_tiny("omniglot", tmp_path)


def test_pickled_or_corrupt_files_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "freyfaces.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="'x'"):
        load_tiny("freyfaces", tmp_path)
    (tmp_path / "freyfaces.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="freyfaces.npz"):
        load_tiny("freyfaces", tmp_path)


def _damage(path: Path, how: str) -> None:
    """Damage the data file at ``path`` as a failed copy or a stray write would."""
    payload = path.read_bytes()
    if how == "truncated":
        path.write_bytes(payload[: len(payload) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        noise = np.random.default_rng(0).bytes(len(payload))
        assert not noise.startswith(b"PK")
        path.write_bytes(noise)
    elif how == "corrupted member":  # the archive is whole, the images' deflate stream is not
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("x_train.npy")
        local = bytearray(payload)
        header = info.header_offset  # 30 fixed bytes, then the name and the extra field
        name_len = int.from_bytes(local[header + 26 : header + 28], "little")
        extra_len = int.from_bytes(local[header + 28 : header + 30], "little")
        middle = header + 30 + name_len + extra_len + info.compress_size // 2
        for i in range(middle, middle + 16):
            local[i] ^= 0xFF
        path.write_bytes(bytes(local))
    else:
        raise AssertionError(how)


def test_split_sizes_that_the_file_does_not_hold_are_named(tmp_path: Path) -> None:
    write_tiny("caltech", tmp_path)
    with pytest.raises(ValueError, match=r"has shape .*split_sizes=\(10, 5, 5\) was asked for.*"
                       r"not take a subset.*\(4100, 2264, 2307\)"):
        load_dataset("caltech", tmp_path, split_sizes=(10, 5, 5))


@pytest.mark.filterwarnings("ignore:omniglot_rederived is NOT")
@pytest.mark.parametrize("how", ["truncated", "empty", "random bytes", "corrupted member"])
@pytest.mark.parametrize("name", ["caltech", "omniglot_rederived"])
def test_damaged_file_says_so_and_how_to_get_it_again(
    name: str, how: str, tmp_path: Path, no_network: list[str]
) -> None:
    write_tiny(name, tmp_path)
    path = tmp_path / DATASETS[name].filename
    _damage(path, how)
    with pytest.raises(DataFileError) as info:
        load_dataset(name, tmp_path, split_sizes=SIZES[name])
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert str(path) in msg and "is damaged" in msg
    assert "delete it" in msg and "copy it again from where it came from" in msg
    if DATASETS[name].sources:
        assert "let vaeflow download it" in msg
    else:
        assert "no public download" in msg and "download it" not in msg
    assert no_network == [] and path.is_file()  # nothing fetched, the file left to the user


# ------------------------------------------------------------------------------------------
# The real files (skipped unless $VAEFLOW_DATA holds them)
# ------------------------------------------------------------------------------------------

REAL = {
    "static_mnist": (50000, 10000, 10000),
    "caltech": (4100, 2264, 2307),
    "freyfaces": (1565, 200, 200),
    "mnist": (50000, 10000, 10000),
    "omniglot_rederived": (23000, 1345, 8115),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_files_protocol_sizes(name: str) -> None:
    directory = os.environ.get("VAEFLOW_DATA")
    if not directory or not (Path(directory) / DATASETS[name].filename).is_file():
        pytest.skip(f"$VAEFLOW_DATA does not hold {DATASETS[name].filename}")
    if name == "omniglot_rederived":
        with pytest.warns(UserWarning, match="NOT comparable"):
            ds = load_dataset(name, download=False)
    else:
        ds = load_dataset(name, download=False)
    assert ds.split_sizes == REAL[name]
    h, w = EXPECTED[name][3:]
    for x in (ds.train, ds.valid, ds.test):
        assert x.shape[1:] == (1, h, w) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    if name == "caltech":  # object = 1 is the minority of the pixels
        assert 0.40 < ds.train.mean() < 0.50
