"""Progress bars: live in a terminal, sparse in a log file."""

from __future__ import annotations

import io
from typing import Any

import pytest

import vaeflow.progress as progress
from vaeflow.configs import TrainConfig
from vaeflow.progress import LOG_REFRESH_S, TrainingBar, eval_batches


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """tqdm's clock moves 50 ms each time it is read: a run of ``n`` steps lasts minutes."""
    now = [0.0]

    def tick() -> float:
        now[0] += 0.05
        return now[0]

    monkeypatch.setattr("tqdm.std.time", tick)


def _training_bar(steps: int) -> TrainingBar:
    bar = TrainingBar(True, TrainConfig(max_epochs=1), step=0, seconds=0.0, per_epoch=steps)
    for step in range(1, steps + 1):
        bar.step(step)
    bar.close()
    return bar


def test_a_log_file_gets_a_redraw_every_few_seconds_not_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = _training_bar(5000)
    assert bar.bar.mininterval == LOG_REFRESH_S
    redraws = log.getvalue().count("\r")
    assert 2 <= redraws <= 30, redraws  # a few minutes of steps: a redraw per 30 s
    assert "5000/5000" in log.getvalue()


def test_a_terminal_keeps_a_live_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert _training_bar(5000).bar.mininterval < 1.0
    assert terminal.getvalue().count("\r") > 300


def test_tqdm_mininterval_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_MININTERVAL", "2")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert _training_bar(3).bar.mininterval != LOG_REFRESH_S


def test_evaluation_bars_follow_the_same_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    made: list[Any] = []
    make = progress._bar
    monkeypatch.setattr(progress, "_bar", lambda **kw: made.append(make(**kw)) or made[-1])
    assert list(eval_batches(1000, 100, True, "test NELBO")) == list(range(0, 1000, 100))
    assert [bar.mininterval for bar in made] == [LOG_REFRESH_S]
    assert list(eval_batches(250, 100, False, "x")) == [0, 100, 200]
