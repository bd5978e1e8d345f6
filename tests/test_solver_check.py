"""experiments/solver_check.py: the integrated log-determinant against that of the map."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import solver_check
import torch
from test_train import tiny_config

from vaeflow.flows import FFJORD
from vaeflow.train import train


@pytest.mark.slow
def test_a_fine_solve_integrates_the_log_determinant_of_its_map() -> None:
    torch.manual_seed(0)
    flow = FFJORD(3, 2, hidden_dims=(16,), rank=2, atol=1e-8, rtol=1e-8).double().eval()
    with torch.no_grad():  # a field far from zero, so that coarse steps are visibly off
        for layer in flow.blocks[0].layers:
            layer.weight.mul_(4.0)
    z0, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    coarse, fine, dopri5 = solver_check.check(flow, z0, h, [
        {"method": "rk4", "solver_options": {"step_size": 1.0}},
        {"method": "rk4", "solver_options": {"step_size": 1 / 64}},
        {"method": "dopri5"},
    ])
    assert fine["max_gap"] < 1e-5 and fine["zK_error"] < 1e-5
    assert dopri5["max_gap"] < 1e-5 and dopri5["zK_error"] == 0.0
    assert coarse["max_gap"] > 1e-3  # one rk4 step integrates another log-det than its map's
    assert fine["map"] == pytest.approx(dopri5["map"], abs=1e-5)


def test_the_command_on_a_run(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rk4 = {"hidden_dims": [16], "rank": 2, "method": "rk4", "solver_options": {"step_size": 0.5}}
    run = tmp_path / "run"
    train(tiny_config(tiny_data_dir, "ffjord", flow_kwargs=rk4, is_samples=0,
                      max_epochs=1), run, progress=False)
    argv = [str(run), "--points", "3", "--step-sizes", "0.5", "0.1"]
    assert solver_check.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| rk4")]
    # The run's own solve (rk4 at 0.5) once, then 0.1; the dopri5 row closes the table.
    assert [row.split(" |")[0] for row in rows] == ["| rk4 step 0.5", "| rk4 step 0.1"]
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", rows[1])]
    assert len(numbers) == 5 and numbers[3] < 1e-2  # 10 steps: trace and map agree

    planar = tmp_path / "planar"
    train(tiny_config(tiny_data_dir, "planar", is_samples=0, max_epochs=1),
          planar, progress=False)
    assert solver_check.main([str(planar)]) == 2
    assert "solves no ODE" in capsys.readouterr().err


def test_a_run_whose_data_file_is_missing_is_one_line(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the data file gone (and no network): the message that `vaeflow eval` gives, not a traceback
    from vaeflow.data import download

    def offline(url: str, dest: Path) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(download, "_fetch", offline)
    run = tmp_path / "run"
    rk4 = {"hidden_dims": [16], "rank": 2, "method": "rk4", "solver_options": {"step_size": 0.5}}
    train(tiny_config(tiny_data_dir, "ffjord", flow_kwargs=rk4, is_samples=0, max_steps=2),
          run, progress=False)
    empty = tmp_path / "elsewhere"
    assert solver_check.main([str(run), "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("solver_check: error: ") and str(empty) in err
