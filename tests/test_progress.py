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


class _StepClock:
    """The clock of the training steps (``time.perf_counter`` in progress.py), moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 100.0
        monkeypatch.setattr(progress.time, "perf_counter", lambda: self.now)


def _budget_bar(monkeypatch: pytest.MonkeyPatch, minutes: float = 4.3) -> TrainingBar:
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    return TrainingBar(True, TrainConfig(max_minutes=minutes), step=0, seconds=0.0, per_epoch=41)


def test_the_budget_bar_says_what_is_left_of_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the bar's clock and tqdm's part (here tqdm's runs faster), tqdm's estimate, the rest
    divided by the bar's rate, said 19:35 were left of a 258 s budget 10 s into it."""
    steps = _StepClock(monkeypatch)
    bar = _budget_bar(monkeypatch)
    for step in range(1, 1281):
        steps.now += 1 / 128
        bar.step(step)
    assert bar.bar.n == 10
    assert "10/258 s of budget [04:08 left, step=1280]" in str(bar.bar)


def test_sync_sets_the_budget_bar_to_the_budgets_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _StepClock(monkeypatch)
    bar = _budget_bar(monkeypatch)
    for step in range(1, 11):
        steps.now += 1.0
        bar.step(step)
    bar.set_postfix({"epoch": 1})
    bar.sync(6.0)  # 4 of the 10 s were pictures, which the budget does not count
    assert bar.bar.n == 6.0 and "6/258 s of budget [04:12 left, step=10, epoch=1]" in str(bar.bar)
    steps.now += 1.0
    bar.step(11)  # counted from the sync on
    assert bar.bar.n == 7.0
    bar.sync(300.0)
    assert bar.bar.n == 258 and "[00:00 left" in str(bar.bar)
    # a bar of steps measures steps: the budget's clock does not move it
    steps_bar = TrainingBar(True, TrainConfig(max_epochs=1), step=0, seconds=0.0, per_epoch=5)
    steps_bar.step(1)
    steps_bar.sync(100.0)
    assert steps_bar.bar.n == 1


def test_in_a_log_an_evaluation_bar_ends_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar that vanishes in a terminal (leave=False) left no newline in a log, so the next
    line (vaeflow eval's header) ran into it; in a log it stays, on a line of its own."""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(eval_batches(300, 100, True, "test NELBO")) == [0, 100, 200]
    assert log.getvalue().endswith("\n") and "3/3" in log.getvalue().splitlines()[-1]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    list(eval_batches(300, 100, True, "test NELBO"))
    assert not terminal.getvalue().endswith("\n")  # erased in place
