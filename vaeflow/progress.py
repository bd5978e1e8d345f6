"""Progress bars: the training bar, which moves every step without reading the device, and the
bars of long evaluations."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from vaeflow.configs import TrainConfig

__all__ = ["LOG_REFRESH_S", "TrainingBar", "eval_batches"]

# Seconds between redraws where stderr is not a terminal (a log file, a batch job's output): at
# tqdm's 0.1 s a 4-minute run wrote 200 KB of redraws, a day-long run would write tens of MB.
LOG_REFRESH_S = 30.0


def _bar(**kwargs: Any) -> Any:
    """A tqdm bar (a widget in a notebook) that redraws every ``LOG_REFRESH_S`` seconds at most
    when stderr is not a terminal, unless ``TQDM_MININTERVAL`` says otherwise. There a bar is
    always left in place when it closes: a log cannot erase it, and a bar that would vanish
    ends without a newline, so that the next line written ran into it."""
    from tqdm.auto import tqdm

    logging = tqdm.__module__ != "tqdm.notebook" and not sys.stderr.isatty()
    if logging:
        kwargs["leave"] = True
        if "TQDM_MININTERVAL" not in os.environ:
            kwargs["mininterval"] = LOG_REFRESH_S
    return tqdm(dynamic_ncols=True, **kwargs)


class TrainingBar:
    """The training progress bar: it advances every step (a host-side count, no device read),
    and measures what ends the run: ``max_steps`` steps, else the ``max_minutes`` budget, else
    ``max_epochs`` epochs of steps.

    The budget's bar counts seconds of the budget, and the time it says is left is the rest of
    the budget, ``total - n``, not tqdm's estimate: that divides the rest by the bar's rate
    against tqdm's clock, which is not 1 wherever the two clocks part (the budget counts no
    pictures or checkpoints), and then says more time than the budget has. Between steps the
    bar counts the wall clock; :meth:`sync` sets it to the budget's own clock where the loop
    reads that."""

    def __init__(
        self, enabled: bool, config: TrainConfig, step: int, seconds: float, per_epoch: int
    ) -> None:
        self.last_step = step
        self.by_time = config.max_steps is None and config.max_minutes is not None
        self.bar: Any = None
        self._postfix: dict[str, Any] = {}
        if not enabled:
            return
        if self.by_time:
            assert config.max_minutes is not None
            total: float = round(60 * config.max_minutes)
            initial: float = min(seconds, total)
            # The budget's text is the bar's description (tqdm's {postfix} would start ", ").
            fmt = "{percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of budget [{desc}]"
            self.bar = _bar(total=total, initial=initial, unit="s", bar_format=fmt,
                            desc=self._budget_text(total - initial))
        else:
            total = config.max_epochs * per_epoch
            if config.max_steps is not None:
                total = min(total, config.max_steps)
            self.bar = _bar(total=total, initial=step, unit="it")
        self._tick = time.perf_counter()

    def step(self, step: int) -> None:
        """One more optimizer step done (``step`` in all)."""
        self.last_step = step
        if self.bar is None:
            return
        if self.by_time:
            now = time.perf_counter()
            self._advance(min(now - self._tick, self.bar.total - self.bar.n))
            self._tick = now
        else:
            self.bar.update(1)

    def sync(self, seconds: float) -> None:
        """The budget's clock reads ``seconds`` of training now: the budget's bar shows that,
        and counts the steps' time on from here (the steps' bar ignores it)."""
        if self.bar is not None and self.by_time:
            self._advance(min(seconds, self.bar.total) - self.bar.n)  # back, past pictures
            self._tick = time.perf_counter()

    def _advance(self, seconds: float) -> None:
        # the text first: a redraw that the update triggers shows this step's budget
        self.bar.set_description_str(
            self._budget_text(self.bar.total - self.bar.n - seconds), refresh=False
        )
        self.bar.update(seconds)

    def _budget_text(self, left: float) -> str:
        from tqdm import tqdm

        words = ", ".join(f"{k}={v}" for k, v in {"step": self.last_step, **self._postfix}.items())
        return f"{tqdm.format_interval(max(left, 0.0))} left, {words}"

    def set_postfix(self, postfix: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self._postfix = postfix
        if self.by_time:
            self.bar.set_description_str(self._budget_text(self.bar.total - self.bar.n),
                                         refresh=False)
        else:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_batches(n: int, size: int, progress: bool, desc: str) -> Iterator[int]:
    """The start of each batch of ``size`` rows out of ``n``, with a progress bar (that
    disappears when done, in a terminal) when ``progress``."""
    starts = range(0, n, size)
    if not progress:
        return iter(starts)
    return iter(_bar(iterable=starts, desc=desc, unit="batch", leave=False))
