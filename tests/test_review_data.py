"""Review tests of the data, plots, HParams and progress modules: small cases, CPU, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_train import tiny_config

from vaeflow.hparams import log_settings


class _Writer:
    """A ``SummaryWriter`` stand-in that keeps the summaries it is given."""

    def __init__(self) -> None:
        self.summaries: list[Any] = []
        self.file_writer = self

    def add_summary(self, summary: Any) -> None:
        self.summaries.append(summary)


def test_hparams_booleans_stay_booleans(tmp_path: Path) -> None:
    """A boolean setting (ffjord.adjoint, valid_exact_trace) was logged as the number 0 or 1:
    torch's hparams() takes a bool for an int. Numbers, strings and None stay as they were."""
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import metadata

    config = tiny_config(tmp_path, "ffjord", valid_exact_trace=True)
    writer = _Writer()
    log_settings(writer, config)
    (summary,) = writer.summaries
    (value,) = summary.value
    assert value.tag == metadata.SESSION_START_INFO_TAG
    hp = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content).hparams
    for key, expected in (("valid_exact_trace", True), ("ffjord.adjoint", False),
                          ("ffjord.exact_in_eval", True), ("cuda_graph", False)):
        assert hp[key].WhichOneof("kind") == "bool_value", key
        assert hp[key].bool_value is expected, key
    assert hp["seed"].WhichOneof("kind") == "number_value" and hp["seed"].number_value == 0
    assert hp["lr"].number_value == pytest.approx(3e-3)
    assert hp["flow"].string_value == "ffjord"
    assert hp["max_steps"].string_value == "null"


def _drawn_lines(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The lines of every figure saved from now on (collected as it is saved)."""
    from matplotlib.figure import Figure

    lines: list[Any] = []
    real = Figure.savefig

    def savefig(fig: Figure, *args: Any, **kwargs: Any) -> None:
        lines.extend(line for ax in fig.axes for line in ax.get_lines())
        real(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return lines


def _visible(line: Any) -> bool:
    """Whether a line shows anything: a segment (two points, a line style) or a marker."""
    segment = len(line.get_xdata()) >= 2 and line.get_linestyle() not in ("None", "", " ")
    return segment or line.get_marker() not in ("None", "", " ", None)


def test_a_run_of_one_epoch_shows_its_training_figure(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training NELBO was a dashed line without markers: with one epoch, one point, it
    drew nothing (in learning_curve.png and in compare's figure), though the legend named it."""
    pytest.importorskip("matplotlib")
    from test_report import _fake_run

    from vaeflow import plots

    history = [{"epoch": 1, "step": 10, "seconds": 6.0, "valid_nelbo": 100.0,
                "train_nelbo": 101.0}]
    run = _fake_run(tmp_path / "one", tiny_data_dir, "static_mnist", {"test_nelbo": 99.0},
                    history=history)
    lines = _drawn_lines(monkeypatch)
    assert plots.write_run_pictures(run.path) == [run.path / plots.LEARNING_CURVE]
    plots.plot_learning_curves([run.path], tmp_path / "cmp.png")
    train = [line for line in lines if list(line.get_ydata()) == [101.0]]
    assert len(train) == 3  # two panels of the run's figure, one in compare's
    assert all(_visible(line) for line in lines)


def test_split_sizes_are_blamed_only_for_a_number_of_rows(tmp_path: Path) -> None:
    """With split_sizes given, every ValueError of the file got "split_sizes=... was asked for:
    it does not take a subset" appended, a wrong dtype or values outside [0, 1] too, as if the
    sizes were the trouble; now only a number of rows that the sizes do not fit."""
    import numpy as np

    from vaeflow.data import load_dataset

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
    import numpy as np

    from vaeflow.data import load_dataset

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
    import numpy as np
    from test_cli import tiny_args

    import vaeflow.data.dataset as dataset
    from vaeflow.checks import InputError
    from vaeflow.cli import main
    from vaeflow.data import ChecksumError, get_spec, load_dataset

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
