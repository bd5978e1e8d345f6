"""Input handling of the ``vaeflow`` command found by a user walkthrough: each bad input is one
clear line, and what a user may write (``cpu:0``, ``none``) means what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import tiny_args

from vaeflow.checks import resolve_device
from vaeflow.cli import main
from vaeflow.runs import load_checkpoint

QUICK = ["train", "--dataset", "caltech", "--preset", "quick", "--print-config"]


def printed(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    """The config that ``vaeflow train ... --print-config`` prints."""
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a refused command (status 2, no traceback)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaeflow: error: ") and err.count("\n") == 1, err
    return err


# ---- 1. a CPU device with an index


def test_a_cpu_device_with_an_index_is_plain_cpu(tmp_path: Path) -> None:
    device = resolve_device("cpu:0")
    assert device == torch.device("cpu") and device.index is None
    # What a run on "cpu:0" saves, it loads back on the same device (torch.load refuses a
    # map_location of torch.device("cpu:0") for every storage).
    torch.save({"w": torch.ones(2, device=device)}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt", device)["w"], torch.ones(2))


def test_a_run_on_cpu_0_trains_and_evaluates(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", *tiny_args(tiny_data_dir), "--flow", "planar", "--device", "cpu:0"]
    assert main([*args, "--max-steps", "2", "--batch-size", "50", "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 0, capsys.readouterr().err

