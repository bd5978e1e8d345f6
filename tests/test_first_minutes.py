"""A newcomer's first minutes: the quick preset, a progress bar that moves every step, PNGs in
the run directory, the closing summary, and ``vaeflow compare``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SPLITS
from PIL import Image
from test_train import tiny_config

from vaeflow import report
from vaeflow.cli import main
from vaeflow.configs import presets, resolve
from vaeflow.plots import LEARNING_CURVE, RECONSTRUCTIONS, SAMPLES
from vaeflow.runs import Run
from vaeflow.train import train

PNGS = (SAMPLES, RECONSTRUCTIONS, LEARNING_CURVE)


def test_quick_preset_is_a_small_real_ffjord() -> None:
    assert "quick" in presets()
    config = resolve("static_mnist", "ffjord", preset="quick")
    paper = resolve("static_mnist", "ffjord")
    assert config.arch == "mlp" and config.max_minutes is not None
    assert config.flow_kwargs["hidden_dims"] != paper.flow_kwargs["hidden_dims"]
    # still the amortized low-rank CNF with the Hutchinson estimator and the exact test trace
    assert config.flow_kwargs["dynamics"] == "lowrank"
    assert config.flow_kwargs.get("trace", "hutchinson") == "hutchinson"
    assert config.flow_kwargs.get("exact_in_eval", True) is True
    # trained with fixed rk4 steps, tested with the continuous flow's solve (the automatic test
    # solver of a fixed-step run), so the test NELBO is FFJORD's and not the steps' error
    assert config.flow_kwargs["method"] == "rk4" and config.test_solver is None
    # the paper-size model stays the data set's default
    assert paper.flow_kwargs["hidden_dims"] == [1024, 1024]


def test_quick_preset_trains_and_leaves_pictures(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "quick"
    args = [
        "train", "--preset", "quick", "--dataset", "static_mnist", "--flow", "ffjord",
        "--data-dir", str(tiny_data_dir), "--set", f"split_sizes={list(TINY_SPLITS)}",
        "--set", "eval_points=20", "--set", "is_points=4", "--set", "valid_points=20",
        "--batch-size", "50", "--max-epochs", "2", "--device", "cpu", "--quiet",
        "--out", str(run),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in PNGS:
        with Image.open(run / name) as image:
            assert image.size[0] > 50 and image.size[1] > 50
        assert name in out  # the summary names the files
    assert "test NELBO" in out and "parameters" in out and "NFE" in out
    assert f"vaeflow train --resume {run}" in out and f"tensorboard --logdir {run}" in out
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 2 and results["train_nfe_forward_mean"] > 0
    assert results["solver"][0]["method"] == "dopri5" and "ODE solves: dopri5" in out


def test_eval_writes_the_pictures_of_an_existing_run(tiny_data_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(tiny_config(tiny_data_dir, "planar", is_samples=0, max_epochs=1), run, progress=False)
    assert not any((run / name).exists() for name in PNGS)  # trained with pictures=False
    assert main(["eval", str(run)]) == 0
    assert all((run / name).is_file() for name in PNGS)
    assert "test NELBO" in capsys.readouterr().out


class _Recorder:
    """Stands in for tqdm: records what the training bar is told."""

    instances: list[_Recorder] = []

    def __init__(self, iterable: Any = None, total: float | None = None, initial: float = 0,
                 **kw: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            total = len(iterable)
        self.total, self.n, self.kw, self.updates = total, initial, kw, []
        _Recorder.instances.append(self)

    def __iter__(self) -> Any:
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float) -> None:
        self.updates.append(n)
        self.n += n

    def set_postfix(self, *args: Any, **kw: Any) -> None:
        pass

    def set_description_str(self, *args: Any, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    import tqdm.auto

    _Recorder.instances = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _Recorder)
    return _Recorder


def test_the_bar_advances_every_step(tiny_data_dir: Path, tmp_path: Path, recorder) -> None:
    # log_every 5: the loss is read back every 5 steps, but the bar moves at each one
    config = tiny_config(tiny_data_dir, "planar", is_samples=0, max_steps=7, log_every=5)
    train(config, tmp_path / "run", progress=True)
    bar = next(b for b in recorder.instances if b.total == 7)
    assert bar.updates == [1] * 7 and bar.n == 7


def test_under_a_time_budget_the_bar_measures_the_budget(
    tiny_data_dir: Path, tmp_path: Path, recorder
) -> None:
    config = tiny_config(tiny_data_dir, "planar", is_samples=0, max_minutes=0.5, max_epochs=2)
    train(config, tmp_path / "run", progress=True)
    bar = next(b for b in recorder.instances if b.kw.get("unit") == "s")
    assert bar.total == 30  # seconds of budget, not max_epochs x steps
    # one update per step, and where the run reads its clock, the bar set to the budget's
    assert len(bar.updates) >= 2 * TINY_SPLITS[0] // 20
    assert 0 < bar.n <= 30


def test_evaluation_shows_its_own_progress(tiny_data_dir: Path, tmp_path: Path,
                                           recorder) -> None:
    config = tiny_config(tiny_data_dir, "planar", max_epochs=1, eval_points=None, is_points=10)
    train(config, tmp_path / "run", progress=True)
    descs = {b.kw.get("desc") for b in recorder.instances}
    assert {"test NELBO", "importance sampling"} <= descs


def test_compare_two_runs(tiny_data_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    for flow in ("none", "planar"):
        train(tiny_config(tiny_data_dir, flow, is_samples=0), tmp_path / "runs" / flow,
              progress=False)
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "runs"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "test NELBO" in lines[0] and "NFE" in lines[0] and "wall-clock" in lines[0]
    assert any(" none " in f" {line} " for line in lines[2:])
    assert any(" planar " in f" {line} " for line in lines[2:])
    with Image.open(plot) as image:
        assert image.size[0] > 100
    rows = report.compare_rows([Run(tmp_path / "runs" / f) for f in ("none", "planar")])
    assert [r["flow"] for r in rows] == ["none", "planar"]
    assert all(r["test NELBO"] > 0 and r["epochs"] == 3 for r in rows)
    # the same settings but the flow (a column already): no "settings" column
    assert all(r["settings"] == "" for r in rows) and "settings" not in lines[0]


def test_compare_names_the_settings_in_which_runs_differ(tiny_data_dir: Path,
                                                         tmp_path: Path) -> None:
    """An ablation's table says what was ablated: training keys that differ, and a flow's
    hyperparameters among runs of that flow, defaults filled in; never logging keys."""
    tiny = {"hidden_dims": [16], "rank": 2, "atol": 1e-4, "rtol": 1e-4}
    rk4 = {"method": "rk4", "solver_options": {"step_size": 0.5}}
    variants = {
        "a": ("ffjord", {}),
        "b": ("ffjord", {"flow_kwargs": {**tiny, **rk4}, "seed": 3}),
        # a class default set explicitly is the same setting as the default left out
        "c": ("ffjord", {"flow_kwargs": {**tiny, "method": "dopri5"}}),
        "d": ("planar", {"log_every": 1, "pictures": True}),
    }
    runs = []
    for name, (flow, overrides) in variants.items():
        config = tiny_config(tiny_data_dir, flow, **overrides)
        (tmp_path / name).mkdir()
        Run(tmp_path / name).write_config(config)
        runs.append(Run(tmp_path / name))
    assert report.differing_settings(runs) == [
        "ffjord.method=dopri5 ffjord.solver_options=null seed=0",
        'ffjord.method=rk4 ffjord.solver_options={"step_size": 0.5} seed=3',
        "ffjord.method=dopri5 ffjord.solver_options=null seed=0",
        "seed=0",  # planar's own options are the same in its only run; log_every is not listed
    ]
    table = report.compare_table(runs).splitlines()
    assert table[0].split()[-1] == "settings" and table[3].endswith("seed=3")
    # the same flow, the same settings: nothing to name
    assert report.differing_settings(runs[:1] + runs[2:3]) == ["", ""]


def test_compare_refuses_a_folder_without_runs(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds none" in capsys.readouterr().err


def test_cuda_graph_without_cuda_says_why_and_trains(tiny_data_dir: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config(tiny_data_dir, "planar", is_samples=0, max_steps=3, cuda_graph=True)
    with caplog.at_level("WARNING"):
        results = train(config, tmp_path / "run", progress=False)
    assert results["steps"] == 3
    assert "CUDA graphs need a CUDA device" in caplog.text
    assert "training without a CUDA graph" in caplog.text


def test_graph_unavailable_names_the_solver() -> None:
    import torch

    from vaeflow.flows import FFJORD
    from vaeflow.graphs import graph_unavailable

    cuda = torch.device("cuda")
    adaptive = FFJORD(3, 2, hidden_dims=(4,), rank=1)
    fixed = FFJORD(3, 2, hidden_dims=(4,), rank=1, method="rk4",
                   solver_options={"step_size": 0.25})
    assert "fixed-step solver" in (graph_unavailable(adaptive, cuda) or "")
    assert graph_unavailable(fixed, cuda) is None
    assert "data-parallel" in (graph_unavailable(fixed, cuda, world_size=2) or "")


def test_a_graphed_run_checks_what_its_replays_recorded(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a graphed run reads its losses it also asks the flow what the replays recorded:
    here an orthogonal flow whose capped orthogonalization did not converge, which a graph
    cannot say by itself. On the CPU the graph is an eager stand-in that runs the step as
    inside a capture (no host read in the flow)."""
    import warnings

    from vaeflow import train as train_module
    from vaeflow.flows import OrthogonalSylvester, sylvester

    checks: list[float] = []
    real_check = OrthogonalSylvester.check_replays

    def recording_check(self: OrthogonalSylvester) -> None:
        checks.append(float(self.replay_residual))
        real_check(self)

    def stand_in_capture(step: Any, model: Any, optimizer: Any, x: Any) -> tuple[Any, None]:
        def replay(xs: Any, beta: Any) -> Any:
            monkeypatch.setattr(sylvester, "_capturing", lambda t: True)
            try:
                return step(xs, beta)
            finally:
                monkeypatch.setattr(sylvester, "_capturing", lambda t: False)
        return replay, None

    monkeypatch.setattr(train_module, "graph_unavailable", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "capture", stand_in_capture)
    real_optimizer = train_module.make_optimizer  # a capturable Adamax needs a CUDA device
    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda config, model, capturable=False: real_optimizer(config, model))
    monkeypatch.setattr(OrthogonalSylvester, "check_replays", recording_check)
    flow_kwargs = {"num_steps": 2, "num_ortho_vecs": 2, "ortho_check": "device",
                   "max_ortho_iters": 3, "ortho_tol": 1e-30}
    config = dataclasses.replace(
        tiny_config(tiny_data_dir, "planar", is_samples=0, max_steps=3, log_every=3,
                    cuda_graph=True),
        flow="orthogonal", flow_kwargs=flow_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, tmp_path / "run", progress=False)
    assert len(checks) == 1 and checks[0] > 1e-6  # the three steps' window, unconverged
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("stopped after 3 iterations" in m for m in messages)


def test_compare_help_states_where_the_plot_goes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: compare.png in the current folder" in text and "'none': no plot" in text
    assert "numbers as numbers" in text and "unit" in text  # --json
