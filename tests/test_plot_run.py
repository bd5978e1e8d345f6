"""experiments/plot_run.py: learning curves of finished and unfinished runs."""

from __future__ import annotations

from pathlib import Path

import plot_run
import pytest
from test_train import tiny_config

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
