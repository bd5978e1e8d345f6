"""Runs of a flow of one's own, which the shell's ``vaeflow`` has not registered."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from vaeflow.cli import main
from vaeflow.configs import TrainConfig
from vaeflow.flows import FLOWS, ContextHead, Flow
from vaeflow.runs import RunError, read_config
from vaeflow.train import train


class Affine(Flow):
    """``zK = z0 exp(s) + t`` with ``s``, ``t`` from the context: a flow of one's own."""

    def __init__(self, dim: int, context_dim: int, scale: float = 1.0) -> None:
        super().__init__(dim, context_dim)
        self.scale = scale
        self.head = ContextHead(context_dim, {"s": (dim,), "t": (dim,)})

    def _forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.head(h)
        s = self.scale * torch.tanh(p["s"])
        return z0 * s.exp() + p["t"], s.sum(-1)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``affine`` registered, as a script does with ``register_flow``, for this test only."""
    monkeypatch.setitem(FLOWS, "affine", Affine)
    return monkeypatch


@pytest.fixture
def affine_run(tiny_data_dir: Path, tmp_path: Path, registered: pytest.MonkeyPatch) -> Path:
    """A finished run of ``affine``, trained where it was registered; the flow is then
    unregistered, as in a new shell."""
    config = dataclasses.replace(tiny_config(tiny_data_dir, "none", is_samples=0, max_epochs=1),
                                 flow="affine", flow_kwargs={"scale": 0.5})
    train(config, tmp_path / "affine", progress=False)
    registered.delitem(FLOWS, "affine")
    return tmp_path / "affine"


def test_eval_and_resume_of_such_a_run_say_how_to_use_it(
    affine_run: Path, registered: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["eval", str(affine_run)], ["train", "--resume", str(affine_run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "flow 'affine' is not registered in this process" in err
        assert "register_flow" in err and f"vaeflow.cli.main(['eval', '{affine_run}'])" in err
        assert "registered flows: none, planar" in err
    with pytest.raises(RunError, match="not registered"):  # the Python API says the same
        read_config(affine_run)
    # what the message says works: registered again, the run is evaluated
    registered.setitem(FLOWS, "affine", Affine)
    assert main(["eval", str(affine_run), "--is-samples", "0"]) == 0


def test_reading_a_run_of_an_unknown_flow_still_checks_the_rest(tmp_path: Path) -> None:
    values = {**TrainConfig(flow="none").to_dict(), "flow": "affine", "lr": -1.0}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(RunError, match="lr"):
        read_config(tmp_path, any_flow=True)  # what Run.config reads
    # and a config of an unregistered flow is never valid for training
    with pytest.raises(ValueError, match="unknown flow 'affine'"):
        TrainConfig(flow="affine")
