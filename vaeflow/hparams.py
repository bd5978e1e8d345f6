"""A run's settings in TensorBoard's HParams tab, beside the figures it logs as scalars.

``tensorboard --logdir runs`` then lists every run with its settings (data set, flow, the flow's
hyperparameters, learning rate, seed, ...) and its validation and test NELBO in one table, with
parallel coordinates across runs. The settings are those of ``vaeflow compare``
(:func:`vaeflow.report.run_settings`); the metrics are the run's own scalar series (the last
value of each), so nothing is logged twice. Written into the run's own event file, not into a
sub-folder as ``SummaryWriter.add_hparams`` would.
"""

from __future__ import annotations

import json
from typing import Any

from vaeflow.configs import TrainConfig
from vaeflow.report import run_settings

__all__ = ["log_settings", "log_finished"]


def _value(value: Any) -> Any:
    """A setting as the HParams tab takes it: numbers, strings and booleans as they are,
    anything else (lists, tables, None) as its JSON text."""
    return value if isinstance(value, bool | int | float | str) else json.dumps(value)


def log_settings(writer: Any, config: TrainConfig) -> None:
    """Write the run's settings to ``writer`` (a ``SummaryWriter``), once, at a run's start."""
    from torch.utils.tensorboard.summary import hparams

    settings = {k: _value(v) for k, v in run_settings(config).items()}
    # The session's settings only, no experiment summary: with none, TensorBoard builds the
    # table's columns from every run's settings, where one run's summary would hide the
    # hyperparameters of the other flows.
    _, start, _ = hparams(settings, {})
    _keep_booleans(start, settings)
    writer.file_writer.add_summary(start)


def _keep_booleans(start: Any, settings: dict[str, Any]) -> None:
    """Store the boolean settings of the session-start summary ``start`` as booleans.

    torch's ``hparams`` tests ``isinstance(v, (int, float))`` before ``bool``, so a boolean
    became the number 0 or 1 (``ffjord.adjoint = 0``), a numeric column with a range filter.
    """
    from tensorboard.plugins.hparams import plugin_data_pb2

    flags = {k: v for k, v in settings.items() if isinstance(v, bool)}
    if not flags:
        return
    (value,) = start.value
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for key, flag in flags.items():
        data.session_start_info.hparams[key].bool_value = flag
    value.metadata.plugin_data.content = data.SerializeToString()


def log_finished(writer: Any) -> None:
    """Mark the run finished in the HParams tab (a killed run shows no status)."""
    from torch.utils.tensorboard.summary import hparams

    _, _, end = hparams({}, {})
    writer.file_writer.add_summary(end)
