"""experiments/plot_run.py: learning curves of finished and unfinished runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from test_train import tiny_config

from vaeflow.train import train

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "experiments/plot_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_two_runs(tiny_data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    script = load_script()
    for flow in ("none", "planar"):
        config = tiny_config(tiny_data_dir, flow, is_samples=0, image_every=0)
        train(config, tmp_path / flow, progress=False)
    history, results, label = script.read_history(tmp_path / "planar")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(b["seconds"] > a["seconds"] for a, b in zip(history[:-1], history[1:], strict=True))
    assert results is not None and "planar" in label
    out = tmp_path / "curves" / "c.png"
    assert script.main([str(tmp_path / "none"), str(tmp_path / "planar"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
