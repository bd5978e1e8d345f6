"""A run's settings as TensorBoard HParams (:func:`vaeflow.hparams.log_settings`): each
setting is logged as a value of its own kind."""

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
