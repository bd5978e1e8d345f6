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
    when stderr is not a terminal, unless ``TQDM_MININTERVAL`` says otherwise."""
    from tqdm.auto import tqdm

    logging = tqdm.__module__ != "tqdm.notebook" and not sys.stderr.isatty()
    if logging and "TQDM_MININTERVAL" not in os.environ:
        kwargs["mininterval"] = LOG_REFRESH_S
    return tqdm(dynamic_ncols=True, **kwargs)


class TrainingBar:
    """The training progress bar: it advances every step (a host-side count, no device read),
    and measures what ends the run: ``max_steps`` steps, else the ``max_minutes`` budget (in
    seconds of training, so its ETA is the budget's), else ``max_epochs`` epochs of steps."""

    def __init__(
        self, enabled: bool, config: TrainConfig, step: int, seconds: float, per_epoch: int
    ) -> None:
        self.last_step = step
        self.by_time = config.max_steps is None and config.max_minutes is not None
        self.bar: Any = None
        if not enabled:
            return
        if self.by_time:
            assert config.max_minutes is not None
            total: float = round(60 * config.max_minutes)
            initial: float = min(seconds, total)
            fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget [{remaining} left{postfix}]"
            self.bar = _bar(total=total, initial=initial, unit="s", bar_format=fmt)
        else:
            total = config.max_epochs * per_epoch
            if config.max_steps is not None:
                total = min(total, config.max_steps)
            self.bar = _bar(total=total, initial=step, unit="it")
        self._tick = time.perf_counter()
        self._postfix: dict[str, Any] = {}

    def step(self, step: int) -> None:
        """One more optimizer step done (``step`` in all)."""
        self.last_step = step
        if self.bar is None:
            return
        if self.by_time:
            now = time.perf_counter()
            self.bar.update(min(now - self._tick, self.bar.total - self.bar.n))
            self._tick = now
            self.bar.set_postfix({"step": self.last_step, **self._postfix}, refresh=False)
        else:
            self.bar.update(1)

    def set_postfix(self, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self._postfix = postfix
            self.bar.set_postfix(
                {"step": self.last_step, **postfix} if self.by_time else postfix, refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_batches(n: int, size: int, progress: bool, desc: str) -> Iterator[int]:
    """The start of each batch of ``size`` rows out of ``n``, with a progress bar (that
    disappears when done) when ``progress``."""
    starts = range(0, n, size)
    if not progress:
        return iter(starts)
    return iter(_bar(iterable=starts, desc=desc, unit="batch", leave=False))
