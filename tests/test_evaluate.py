"""A model as a run directory, and how it is evaluated: :func:`vaeflow.evaluate.save_run` of a
model with a continuous flow, of a run in use and of a model with non-finite figures;
:func:`vaeflow.runs.load_model` on a device named as the command line names it; the counts
that ``vaeflow eval`` evaluates a smoke run with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import assert_same_params, tiny_config

from vaeflow.checks import InputError
from vaeflow.claim import RunLock
from vaeflow.configs import resolve
from vaeflow.evaluate import save_run
from vaeflow.model import build_model
from vaeflow.runs import BEST, CONFIG, RunError, load_model, solver_state


def test_save_run_takes_a_model_with_a_continuous_flow(tiny_data_dir: Path,
                                                       tmp_path: Path) -> None:
    """FFJORD's state_dict holds its solver settings (a dict, not a tensor) beside the
    parameters: save_run stores them as they are, and the saved run loads to the same model."""
    config = tiny_config(tiny_data_dir, "ffjord")
    model = build_model(config)
    model.flow.tighten_solver(10.0)  # as a NaN retry does: the saved run keeps it
    assert save_run(tmp_path / "mine", model, config, evaluate=False) is None
    loaded, _ = load_model(tmp_path / "mine")
    assert_same_params(loaded.state_dict(), model.state_dict())
    assert solver_state(loaded) == solver_state(model)
    assert solver_state(loaded)[0]["atol"] == pytest.approx(1e-5)


def test_save_run_does_not_overwrite_a_run_in_use(tiny_data_dir: Path, tmp_path: Path) -> None:
    """``overwrite`` replaces a run's files, but not those of a run that a live process is
    training (it holds the folder's lock): that is refused, as ``vaeflow train --overwrite``
    refuses it, and its files are left alone."""
    config = tiny_config(tiny_data_dir, "planar")
    model = build_model(config)
    directory = tmp_path / "busy"
    save_run(directory, model, config, evaluate=False)
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name in (BEST, CONFIG)}
    with RunLock(directory), pytest.raises(RunError, match="in use by another vaeflow process"):
        save_run(directory, model, config, evaluate=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.name in before} == before
    save_run(directory, model, config, evaluate=False, overwrite=True)  # free again: replaced


def test_save_run_of_a_model_with_non_finite_figures_marks_the_run_failed(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A model whose test NELBO is NaN is saved, but its run is marked failed (as `vaeflow
    train` marks one), with the reason, and save_run says so: not a finished run of NaNs."""
    from vaeflow.report import compare_rows
    from vaeflow.runs import Run

    config = tiny_config(tiny_data_dir, "planar")
    model = build_model(config)
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(float("nan"))
    with pytest.raises(RunError, match="non-finite figures .*test_nelbo.*vaeflow eval"):
        save_run(tmp_path / "nan", model, config)
    run = Run(tmp_path / "nan")
    assert run.results is None and "test_nelbo" in (run.failure or "")
    assert (tmp_path / "nan" / BEST).is_file()
    row = compare_rows([run])[0]
    assert row["status"] == "failed" and row["test NELBO"] is None


def test_eval_help_names_the_counts_that_a_smoke_run_is_evaluated_with() -> None:
    """``vaeflow eval`` of a run trained with --max-steps evaluates as that run did (500 test
    points, 10 samples on 50), not on all the test points as the help said."""
    import argparse

    from vaeflow.cli import build_parser
    from vaeflow.configs import TrainConfig
    from vaeflow.evaluate import smoke_eval_counts

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: " ".join(a.help.split()) for a in commands.choices["eval"]._actions}
    counts = smoke_eval_counts(TrainConfig(flow="none", max_steps=3))
    assert set(counts) == {"eval_points", "is_samples", "is_points"}
    for key, n in counts.items():
        assert f"{n} for a smoke run" in helps[key], (key, helps[key])


def test_load_model_reads_a_device_as_the_command_line_does(tmp_path: Path) -> None:
    """``cpu:0`` loads on the CPU, and a device this machine has not is named as such: both
    were "best.pt is damaged or not a vaeflow checkpoint" (torch.load refused every storage)."""
    config = resolve("static_mnist", "none", {"arch": "mlp", "latent_dim": 2, "context_dim": 2,
                                              "net_kwargs": {"hidden_sizes": [4]}})
    save_run(tmp_path / "run", build_model(config), config, evaluate=False)
    model, _ = load_model(tmp_path / "run", device="cpu:0")
    assert next(model.parameters()).device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="^device 'cuda' asked for, but CUDA is not avail"):
            load_model(tmp_path / "run", device="cuda")
