"""Learning curves (experiments/plot_run.py and :mod:`vaeflow.plots`): of finished and
unfinished runs, and of a run of one epoch, whose one training point is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import plot_run
import pytest
from test_report import _fake_run
from test_train import tiny_config

from vaeflow import plots
from vaeflow.checks import InputError
from vaeflow.plots import plot_learning_curves
from vaeflow.runs import Run
from vaeflow.train import train


def test_plot_two_runs(tiny_data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for flow in ("none", "planar"):
        config = tiny_config(tiny_data_dir, flow, is_samples=0)
        train(config, tmp_path / flow, progress=False)
    run = Run(tmp_path / "planar")
    history = run.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(b["seconds"] > a["seconds"] for a, b in zip(history[:-1], history[1:], strict=True))
    assert run.results is not None and run.config.flow == "planar"
    out = tmp_path / "curves" / "c.png"
    assert plot_run.main([str(tmp_path / "none"), str(tmp_path / "planar"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_run.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not a vaeflow run directory" in capsys.readouterr().err
    assert plot_run.main([str(tmp_path / "absent"), "--out", str(tmp_path / "x.png")]) == 2
    assert f"run directory {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    from vaeflow.runs import RunError

    with pytest.raises(RunError, match="absent does not exist"):
        Run(tmp_path / "absent").history  # noqa: B018 - the property raises


def _written_run(path: Path, data_dir: Path, dataset: str, nelbos: list[float],
                 test: float | None) -> Run:
    """A run as training leaves it, written by hand: figures chosen so that the plot's values
    can be checked."""
    history = [{"epoch": i + 1, "step": 10 * (i + 1), "seconds": 6.0 * (i + 1),
                "valid_nelbo": v, "train_nelbo": v + 1.0} for i, v in enumerate(nelbos)]
    return _fake_run(path, data_dir, dataset, None if test is None else {"test_nelbo": test},
                     history=history)


def test_curves_are_in_the_data_sets_unit(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Frey Faces is reported in bits/dim (28 x 20 pixels): its curves and its test star are
    too, as in results.json and vaeflow compare; MNIST stays in nats."""
    frey = _written_run(tmp_path / "frey", tiny_data_dir, "freyfaces", [2000.0, 1900.0],
                        test=1800.0)
    mnist = _written_run(tmp_path / "mnist", tiny_data_dir, "static_mnist", [90.0], test=None)
    per_nat = 1 / (28 * 20 * math.log(2))
    steps, minutes, valid, train, test = plots._curves(frey)
    assert steps == [10.0, 20.0] and minutes == [0.1, 0.2]
    assert valid == pytest.approx([2000 * per_nat, 1900 * per_nat])
    assert train == pytest.approx([2001 * per_nat, 1901 * per_nat])
    assert test == pytest.approx(1800 * per_nat)
    assert plots._unit(frey) == ("bits/dim", pytest.approx(per_nat))
    assert plots._curves(mnist)[2:] == ([90.0], [91.0], None)  # nats as they are
    with pytest.raises(InputError, match=r"different units.*frey \(bits/dim\).*mnist \(nats\)"):
        plot_learning_curves([frey.path, mnist.path], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_runs_left_out_are_named(tiny_data_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A run with one finished epoch is drawn (a dot), one with none is left out and named."""
    pytest.importorskip("matplotlib")
    one = _written_run(tmp_path / "one", tiny_data_dir, "static_mnist", [90.0], test=None)
    empty = _written_run(tmp_path / "empty", tiny_data_dir, "static_mnist", [], test=None)
    out = tmp_path / "c.png"
    path, skipped = plot_learning_curves([one.path, empty.path], out)
    assert path == out and out.read_bytes()[:4] == b"\x89PNG" and skipped == [empty]
    assert plot_run.main([str(one.path), str(empty.path), "--out", str(out)]) == 0
    assert f"left out {empty.path}: no epoch of it has finished" in capsys.readouterr().out
    with pytest.raises(InputError, match="no epoch has finished"):
        plot_learning_curves([empty.path], out)


def test_a_figure_format_matplotlib_cannot_write_is_named_before_any_work(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vaeflow.cli import main

    run = _written_run(tmp_path / "run", tiny_data_dir, "static_mnist", [100.0, 99.0], 98.0)
    # compare: exit status 2 and one line, before the table (it was matplotlib's traceback
    # after the curves were drawn)
    assert main(["compare", str(run.path), "--plot", str(tmp_path / "curves.txt")]) == 2
    captured = capsys.readouterr()
    assert "cannot write a figure as 'curves.txt'" in captured.err and "png" in captured.err
    assert captured.out == "" and not (tmp_path / "curves.txt").exists()
    assert plot_run.main([str(run.path), "--out", str(tmp_path / "x.jpgg")]) == 2
    assert "its suffix .jpgg is not a format matplotlib writes" in capsys.readouterr().err
    # any format matplotlib writes is taken, whatever the case of its suffix
    path, _ = plot_learning_curves([run.path], tmp_path / "curves.SVG")
    assert path.read_text().lstrip().startswith("<?xml")


def test_the_test_star_stands_at_the_model_it_measures(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # early stopping: the figures are of epoch 1's model, two epochs before the end
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    run = _written_run(tmp_path / "run", tiny_data_dir, "static_mnist", [90.0, 95.0, 97.0],
                       test=91.0)
    run.write_results({**(run.results or {}), "best_epoch": 1, "best_valid_nelbo": 90.0})
    stars: list[tuple[list[float], str]] = []
    real = Axes.scatter

    def scatter(self: Axes, x: list[float], y: list[float], **kwargs: object) -> object:
        stars.append((list(x), str(kwargs.get("label"))))
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(Axes, "scatter", scatter)
    plots.write_run_pictures(run.path)  # learning_curve.png: steps and minutes
    plot_learning_curves([run.path], tmp_path / "c.png")  # the comparison: minutes
    assert [x for x, _ in stars] == [[10.0], [0.1], [0.1]]  # step 10, 6 s of training
    assert all(label.endswith(", the model of epoch 1") for _, label in stars)
    # a partial epoch recorded twice: the record of the best figure
    history = [{"epoch": 1, "step": 3, "seconds": 1.0, "valid_nelbo": 99.0, "partial": True},
               {"epoch": 1, "step": 10, "seconds": 3.0, "valid_nelbo": 95.0}]
    assert plots.tested_record(history, {"best_epoch": 1, "best_valid_nelbo": 95.0}) == 1
    assert plots.tested_record(history, {"best_epoch": 0}) is None
    two = [history[1], {"epoch": 2, "step": 20, "seconds": 6.0, "valid_nelbo": 96.0}]
    last = {"checkpoint": "last", "best_epoch": 1, "best_valid_nelbo": 95.0}
    assert plots.tested_record(two, last) == 1  # the last model, not the best
    assert plots.tested_record(two, {**last, "steps": 25}) is None  # trained past it


def test_a_partial_epochs_validation_is_marked(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a time stop validates the epoch it cuts short: its point is drawn apart from the epochs'
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    run = _written_run(tmp_path / "run", tiny_data_dir, "static_mnist", [90.0, 95.0], test=None)
    history = run.history
    history[-1]["partial"] = True
    run.write_history(history)
    marked: list[list[float]] = []
    real = Axes.scatter

    def scatter(self: Axes, x: list[float], y: list[float], **kwargs: object) -> object:
        if "time budget" in str(kwargs.get("label")):
            marked.append(list(x))
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(Axes, "scatter", scatter)
    plots.write_run_pictures(run.path)
    assert marked == [[20.0], [0.2]]  # epoch 2's step, and its 12 s of training


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


def test_the_test_star_is_inside_the_axes(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zoom that leaves out the first epochs' high losses set its limits from the
    validation and training figures alone: a test NELBO below them (or above their 90th
    percentile) stood outside the axes, in learning_curve.png and in compare's figure."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    limits: list[tuple[float, float]] = []
    real = Figure.savefig

    def savefig(fig: Figure, *args: Any, **kwargs: Any) -> None:
        limits.append(fig.axes[0].get_ylim())  # (learning_curve.png's panels share it)
        real(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    nelbos = [140.0, 120.0, 110.0, 105.0, 100.0]
    for test in (80.0, 150.0):
        run = _written_run(tmp_path / f"run{test:.0f}", tiny_data_dir, "static_mnist", nelbos,
                           test=test)
        limits.clear()
        assert plots.write_run_pictures(run.path) == [run.path / plots.LEARNING_CURVE]
        plot_learning_curves([run.path], tmp_path / "cmp.png")
        assert len(limits) == 2
        for low, high in limits:
            assert low < test < high, (test, low, high)
            assert high < 170.0  # still a zoom: not the whole range of the figures and more
