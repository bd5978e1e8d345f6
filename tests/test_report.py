"""What vaeflow prints about runs: the closing summary, ``vaeflow compare`` (its table and its
JSON), and runs of a flow of one's own, which the shell's ``vaeflow`` has not registered."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import AffineFlow
from test_train import tiny_config

from vaeflow import report
from vaeflow.cli import main
from vaeflow.configs import TrainConfig
from vaeflow.flows import FLOWS
from vaeflow.runs import Run, RunError, read_config
from vaeflow.train import train

FREY_DIMS = 28 * 20


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``affine`` (the shared affine flow) registered, as a script does with ``register_flow``,
    for this test only."""
    monkeypatch.setitem(FLOWS, "affine", AffineFlow)
    return monkeypatch


@pytest.fixture
def affine_run(tiny_data_dir: Path, tmp_path: Path, registered: pytest.MonkeyPatch) -> Path:
    """A finished run of ``affine``, trained where it was registered, with a hyperparameter of
    the flow's own (``bound``, which the config must record); the flow is then unregistered,
    as in a new shell."""
    config = dataclasses.replace(tiny_config(tiny_data_dir, "none", is_samples=0, max_epochs=1),
                                 flow="affine", flow_kwargs={"bound": 0.5})
    train(config, tmp_path / "affine", progress=False)
    registered.delitem(FLOWS, "affine")
    return tmp_path / "affine"


def test_compare_shows_runs_of_a_flow_this_process_has_not_registered(
    affine_run: Path, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((affine_run / "config.json").read_text())
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(affine_run), str(unfinished), "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "affine" in captured.out and "unfinished" in captured.out, captured.err
    assert plot.is_file()
    rows = report.compare_rows([Run(affine_run), Run(unfinished)])
    assert [r["flow"] for r in rows] == ["affine", "affine"]
    assert rows[0]["parameters"] > 0 and rows[0]["test NELBO"] > 0
    assert rows[1]["parameters"] is None  # its model cannot be built here: not guessed
    # the config is read as it was written, its flow hyperparameters included
    assert Run(affine_run).config.flow_kwargs == {"bound": 0.5}


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
    registered.setitem(FLOWS, "affine", AffineFlow)
    assert main(["eval", str(affine_run), "--is-samples", "0"]) == 0


def test_reading_a_run_of_an_unknown_flow_still_checks_the_rest(tmp_path: Path) -> None:
    values = {**TrainConfig(flow="none").to_dict(), "flow": "affine", "lr": -1.0}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(RunError, match="lr"):
        read_config(tmp_path, any_flow=True)  # what Run.config reads
    # and a config of an unregistered flow is never valid for training
    with pytest.raises(ValueError, match="unknown flow 'affine'"):
        TrainConfig(flow="affine")


def test_the_summary_of_a_run_of_ones_own_flow_suggests_the_script_way(
    affine_run: Path,
) -> None:
    results = json.loads((affine_run / "results.json").read_text())
    text = report.summary(affine_run, results)
    assert f"vaeflow.cli.main(['eval', '{affine_run}'])" in text
    # (it stopped at max_epochs: the resume trains on with a larger one)
    assert f"vaeflow.cli.main(['train', '--resume', '{affine_run}', '--max-epochs', " in text
    assert "register_flow" in text and f"vaeflow compare {affine_run}" in text
    assert f"vaeflow eval {affine_run}" not in text
    assert f"vaeflow train --resume {affine_run}" not in text


def _fake_run(path: Path, tiny_data_dir: Path, dataset: str = "static_mnist",
              results: dict[str, Any] | None = None, **files: Any) -> Run:
    """A run directory written by hand: its config, and the files given."""
    path.mkdir()
    run = Run(path)
    run.write_config(dataclasses.replace(tiny_config(tiny_data_dir, "planar"), dataset=dataset))
    if results is not None:
        run.write_results({"status": "finished", "num_parameters": 1210480, "epochs": 1,
                           "steps": 1, **results})
    for name, value in files.items():
        (path / f"{name}.json").write_text(json.dumps(value))
    return run


def test_the_summary_names_every_file_and_counts_in_the_singular(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    results = {"test_nelbo": 100.0, "test_nll_is": 99.0, "is_samples": 1, "is_points": 1,
               "unit": "nats"}
    run = _fake_run(tmp_path / "run", tiny_data_dir, results=results, history=[],
                    timing={"train_seconds": 1.0})
    text = report.summary(run.path, {**results, "num_parameters": 1, "epochs": 1, "steps": 1})
    assert "1 parameter," in text and "1 epoch, 1 step," in text and "1 sample, 1 point" in text
    files = next(line for line in text.splitlines() if "files in" in line)
    assert all(name in files for name in ("config.json", "history.json", "timing.json",
                                          "results.json"))
    text = report.summary(run.path, {**results, "epochs": 2, "steps": 1000, "is_samples": 20})
    assert "2 epochs, 1,000 steps," in text and "20 samples, 1 point" in text


def test_the_summary_of_a_torchrun_run_resumes_it_under_torchrun(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    results = {"test_nelbo": 100.0, "unit": "nats", "world_size": 4}
    run = _fake_run(tmp_path / "run", tiny_data_dir, results=results)
    (run.path / "checkpoint.pt").write_bytes(b"")  # a run that trained has one
    text = report.summary(run.path, results)
    assert (f"torchrun --standalone --nproc_per_node=4 --no-python vaeflow train --resume "
            f"{run.path}") in text
    assert f"     vaeflow train --resume {run.path}" not in text  # refused at world size 1
    # vaeflow eval's results carry no world size: timing.json says it
    run.write_timing({"train_seconds": 1.0, "world_size": 2})
    assert "--nproc_per_node=2" in report.summary(run.path, {"test_nelbo": 100.0})


def test_compare_gives_numbers_in_json_and_the_unit_in_both(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bpd = 1 / (FREY_DIMS * math.log(2.0))
    mnist = _fake_run(tmp_path / "mnist", tiny_data_dir,
                      results={"test_nelbo": 212.8234, "test_nll_is": 210.5,
                               "train_nfe_forward_mean": 12.0},
                      timing={"train_seconds": 1.4})
    frey = _fake_run(tmp_path / "frey", tiny_data_dir, "freyfaces",
                     results={"test_nelbo": 2000.0, "test_nelbo_bpd": 2000.0 * bpd})
    unfinished = _fake_run(tmp_path / "unfinished", tiny_data_dir, "freyfaces",
                           history=[{"epoch": 1, "step": 10, "seconds": 1.0,
                                     "valid_nelbo": 2100.0}])
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(tmp_path), "--json"]) == 0
    assert not (tmp_path / "compare.png").exists()  # a script reading JSON gets no PNG beside
    rows = {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mnist"]["test NELBO"] == 212.8234 and rows["mnist"]["IS NLL"] == 210.5
    assert rows["mnist"]["parameters"] == 1210480 and rows["mnist"]["epochs"] == 1
    assert rows["mnist"]["wall-clock seconds"] == 1.4 and rows["mnist"]["train NFE"] == 12.0
    assert rows["mnist"]["unit"] == "nats" and rows["mnist"]["status"] == "finished"
    assert rows["frey"]["unit"] == "bits/dim" and rows["frey"]["test NELBO"] == 2000.0 * bpd
    assert rows["frey"]["IS NLL"] is None and rows["frey"]["wall-clock seconds"] is None
    assert rows["unfinished"]["status"] == "unfinished"
    assert rows["unfinished"]["test NELBO"] is None and rows["unfinished"]["epochs"] == 1
    assert rows["unfinished"]["valid NELBO"] == 2100.0 * bpd  # in its unit, as the table
    assert isinstance(rows["unfinished"]["parameters"], int)
    table = report.compare_table([mnist, frey, unfinished]).splitlines()
    header = [c.strip() for c in table[0].split("  ")]
    # the NFE of the training solves (the test solve's is in results.json): the header says so
    assert "unit" in header and "train NFE" in header and "NFE" not in header
    assert " 12.0" in table[2]
    assert "212.82" in table[2] and " nats " in table[2] and "1,210,480" in table[2]
    assert f"{2000.0 * bpd:.4f}" in table[3] and " bits/dim " in table[3]
    assert f"unfinished (valid {2100.0 * bpd:.4f})" in table[4] and " bits/dim " in table[4]


def test_compare_says_when_the_is_nll_covers_fewer_test_points(tiny_data_dir: Path,
                                                               tmp_path: Path) -> None:
    subset = {"test_nelbo": 90.0, "test_nll_is": 88.0, "test_points": 10000, "is_points": 1000}
    runs = [_fake_run(tmp_path / "a", tiny_data_dir, results=subset),
            _fake_run(tmp_path / "b", tiny_data_dir, results={**subset, "is_points": 10000}),
            _fake_run(tmp_path / "c", tiny_data_dir, results={"test_nelbo": 90.0,
                                                               "test_points": 10000})]
    rows = report.compare_rows(runs)
    assert [(r["test points"], r["IS points"]) for r in rows] == [
        (10000, 1000), (10000, 10000), (10000, None)]
    table = report.compare_table(runs).splitlines()
    assert table[-1] == f"IS NLL on 1,000 (a seeded draw) of the 10,000 test points of the NELBO " \
                        f"({tmp_path / 'a'})"
    assert table[-2] == "" and len(table) == 2 + 3 + 2
    everyone = report.compare_table(runs[:1]).splitlines()[-1]
    assert everyone.endswith("of the NELBO")  # every run of the table: no list of runs
    assert "IS NLL on" not in report.compare_table(runs[1:])


def _epoch(epoch: int, seconds: float) -> dict[str, Any]:
    """A ``history.json`` record of an epoch ended at ``seconds`` of training (summed)."""
    return {"epoch": epoch, "step": 10 * epoch, "seconds": seconds, "valid_nelbo": 100.0}


def test_compare_shows_the_wall_clock_an_unfinished_run_has_trained_so_far(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # killed in its first session: no timing.json, its epochs' records hold the clock
    killed = _fake_run(tmp_path / "killed", tiny_data_dir,
                       history=[_epoch(1, 30.0), _epoch(2, 90.0)])
    # resumed, then killed: timing.json is the first session's, older than the last epoch
    resumed = _fake_run(tmp_path / "resumed", tiny_data_dir, history=[_epoch(1, 12.0)],
                        timing={"train_seconds": 5.0})
    started = _fake_run(tmp_path / "started", tiny_data_dir)  # no epoch, no checkpoint yet
    # killed after a checkpoint inside its second epoch (a signal, checkpoint_every), or
    # inside its first: the checkpoint's clock is later than the last epoch's record
    inside = _fake_run(tmp_path / "inside", tiny_data_dir, history=[_epoch(1, 12.0)])
    first = _fake_run(tmp_path / "first", tiny_data_dir, history=[])
    for run, seconds in ((inside, 17.49), (first, 4.2)):
        torch.save({"progress": {"step": 789, "seconds": seconds, "history": run.history}},
                   run.path / "checkpoint.pt")
    # a checkpoint without the clock, or damaged: the table falls back on the history
    clockless = _fake_run(tmp_path / "clockless", tiny_data_dir, history=[_epoch(1, 7.0)])
    torch.save({"progress": {"history": []}}, clockless.path / "checkpoint.pt")
    damaged = _fake_run(tmp_path / "damaged", tiny_data_dir, history=[])
    (damaged.path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="holds no training seconds"):
        clockless.progress_seconds  # noqa: B018 - the property raises
    rows = report.compare_rows([clockless, damaged])
    assert [r["wall-clock seconds"] for r in rows] == [7.0, None]
    runs = [killed, resumed, started, inside, first]
    rows = report.compare_rows(runs)
    assert [r["wall-clock seconds"] for r in rows] == [90.0, 12.0, None, 17.49, 4.2]
    table = report.compare_table(runs).splitlines()
    assert "1.5 min" in table[2] and "12 s" in table[3] and "17 s" in table[5]
    assert "4.2 s" in table[6]
    assert all("unfinished" in line for line in table[2:7])  # the row says it is so far


def test_compare_lists_a_run_named_twice_once(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = {"test_nelbo": 90.0}
    (tmp_path / "runs").mkdir()
    a = _fake_run(tmp_path / "runs" / "a", tiny_data_dir, results=results).path
    b = _fake_run(tmp_path / "runs" / "b", tiny_data_dir, results=results).path
    monkeypatch.chdir(tmp_path)
    # b itself, then again through its folder, relatively and with a trailing slash
    argv = [str(b), "runs", "./runs/b/", str(a), str(tmp_path / "runs")]
    assert [run.path for run in report.expand_runs(argv)] == [b, Path("runs/a")]
    assert main(["compare", *argv, "--json"]) == 0
    assert [Path(r["run"]).name for r in json.loads(capsys.readouterr().out)] == ["b", "a"]


def test_compare_says_a_path_that_does_not_exist_does_not_exist(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run(tmp_path / "run", tiny_data_dir, results={"test_nelbo": 90.0}).path
    missing = tmp_path / "rnu"
    assert main(["compare", str(run), str(missing), "--json"]) == 2
    assert capsys.readouterr().err == f"vaeflow: error: {missing} does not exist\n"
    (tmp_path / "empty").mkdir()  # a folder there but without runs is another matter
    with pytest.raises(RunError, match="is not a vaeflow run directory and holds none"):
        report.expand_runs([tmp_path / "empty"])


def test_the_summary_counts_one_step_after_the_last_validation_in_the_singular(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    results = {"test_nelbo": 90.0, "unit": "nats", "epochs": 1, "steps": 11, "best_epoch": 1}
    run = _fake_run(tmp_path / "run", tiny_data_dir, results=results, history=[_epoch(1, 1.0)])
    text = report.summary(run.path, results)
    assert "the 1 step after the last validation is not in it" in text


def test_the_summary_says_which_model_a_max_steps_run_tested(tiny_data_dir: Path,
                                                              tmp_path: Path) -> None:
    # a --max-steps stop validates no partial epoch: the steps after the last validation are
    # not in the tested (best) model, and a run stopped inside its first epoch tests its last
    for steps, expected in ((14, "of epoch 1 (step 10); the 4 steps after"),
                            (6, "the last model (no epoch was validated")):
        run = tmp_path / str(steps)
        results = train(tiny_config(tiny_data_dir, max_steps=steps, is_samples=0), run,
                        progress=False)
        assert expected in report.summary(run, results)
    finished = tmp_path / "epochs"
    results = train(tiny_config(tiny_data_dir, max_epochs=1, is_samples=0), finished,
                    progress=False)
    assert "tested:" not in report.summary(finished, results)
    assert "trace" not in results  # planar solves no ODE: no trace to name


def test_compare_counts_no_epochs_for_a_model_trained_elsewhere(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A run made by save_run has figures but no training of vaeflow's: its epochs are
    unknown ("-", None in JSON), not 0, which reads as a model that was never trained."""
    from vaeflow.evaluate import save_run
    from vaeflow.model import build_model

    config = tiny_config(tiny_data_dir, "planar", eval_points=5, is_samples=0)
    save_run(tmp_path / "mine", build_model(config), config)
    row = report.compare_rows([Run(tmp_path / "mine")])[0]
    assert row["status"] == "finished" and row["epochs"] is None
    table = report.compare_table([Run(tmp_path / "mine")]).splitlines()
    epochs = table[0].index("epochs")
    assert table[2][epochs:].split()[0] == "-"
    # a run that is training and has validated no epoch yet has trained 0 of them
    started = _fake_run(tmp_path / "started", tiny_data_dir, history=[])
    assert report.compare_rows([started])[0]["epochs"] == 0


def test_the_summary_offers_only_what_a_run_has(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A model saved by save_run has no checkpoint and no TensorBoard events: the summary of
    its `vaeflow eval` listed "TensorBoard events" among its files and offered `tensorboard`
    and `vaeflow train --resume`, which refuses it ("it holds no checkpoint.pt")."""
    from vaeflow.evaluate import save_run
    from vaeflow.model import build_model

    config = tiny_config(tiny_data_dir, "planar")
    save_run(tmp_path / "mine", build_model(config), config, evaluate=False)
    text = report.summary(tmp_path / "mine", {"test_nelbo": 100.0, "unit": "nats"})
    files = next(line for line in text.splitlines() if "files in" in line)
    assert "config.json" in files and "best.pt" in files and "TensorBoard" not in files
    assert "--resume" not in text and "tensorboard --logdir" not in text
    assert f"vaeflow eval {tmp_path / 'mine'}" in text and "vaeflow compare" in text
    # a run that trained keeps them all
    trained = _fake_run(tmp_path / "trained", tiny_data_dir, results={"test_nelbo": 100.0})
    (trained.path / "checkpoint.pt").write_bytes(b"")
    (trained.path / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    text = report.summary(trained.path, {"test_nelbo": 100.0, "unit": "nats"})
    assert "TensorBoard events" in text and f"tensorboard --logdir {trained.path}" in text
    assert f"vaeflow train --resume {trained.path}" in text


def test_compare_counts_the_parameters_a_results_json_does_not_name(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """A results.json written by hand (or by another tool) without ``num_parameters`` made
    ``vaeflow compare`` end in a KeyError traceback; the count is the model's, as for a run
    that has not finished."""
    from vaeflow.model import count_parameters

    run = _fake_run(tmp_path / "run", tiny_data_dir, history=[])
    (run.path / "results.json").write_text(json.dumps({"status": "finished", "test_nelbo": 99.0}))
    row = report.compare_rows([run])[0]
    assert row["status"] == "finished" and row["test NELBO"] == 99.0
    assert row["parameters"] == count_parameters(run.config)
    assert "99.00" in report.compare_table([run])


def test_a_partial_epoch_record_counts_once_and_may_be_the_tested_model(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # A time stop validated epoch 1 at step 3 (partial); resumed with more time, the run
    # validated epoch 1 again, whole, at step 10: the best model is the better of the two.
    partial = {"epoch": 1, "step": 3, "seconds": 1.0, "valid_nelbo": 95.0, "partial": True}
    whole = {"epoch": 1, "step": 10, "seconds": 3.0, "valid_nelbo": 97.0}
    for best, step in ((95.0, 3), (97.0, 10)):
        results = {"test_nelbo": 95.5, "unit": "nats", "epochs": 1, "steps": 14,
                   "best_epoch": 1, "best_valid_nelbo": best}
        run = _fake_run(tmp_path / f"run{step}", tiny_data_dir, results=results,
                        history=[{**partial, "valid_nelbo": 95.0 if step == 3 else 99.0}, whole])
        expected = f"of epoch 1 (step {step}); the {14 - 10} steps after"
        assert expected in report.summary(run.path, results)
    # unfinished (no results.json): its epochs are counted from the history, epoch 1 once
    training = _fake_run(tmp_path / "training", tiny_data_dir, history=[partial, whole])
    (row,) = report.compare_rows([training])
    assert row["epochs"] == 1


def test_the_summary_of_a_run_stopped_by_its_budget_offers_a_larger_one(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a plain resume of a finished run trains nothing: the summary gives the options
    # that train on, for the budget that stopped it
    for name, overrides, words in (
        ("epochs", {"max_epochs": 1}, "--max-epochs 2"),
        ("steps", {"max_steps": 3}, "--max-steps 6"),
        ("minutes", {"max_minutes": 1e-6}, "--set max_minutes=0.1"),  # a tenth, rounded up
    ):
        run = tmp_path / name
        results = train(tiny_config(tiny_data_dir, is_samples=0, **overrides), run,
                        progress=False)
        text = report.summary(run, results)
        assert f"vaeflow train --resume {run} {words}    # train on with a larger budget" in text
        # on the resume only: the other commands stay as they are
        assert f"     vaeflow eval {run}\n" in text and f"vaeflow compare {run} OTHER" in text
        # and so does vaeflow eval's summary of it (its figures do not say how the run stopped)
        main(["eval", str(run), "--is-samples", "0"])
        text = capsys.readouterr().out
        assert f"vaeflow train --resume {run} {words}    # train on with a larger budget" in text
    failed = {"test_nelbo": 100.0, "unit": "nats", "status": "failed",
              "stop_reason": "max_epochs=1 reached"}
    assert report.larger_budget(tiny_config(tiny_data_dir), failed) == []


def test_the_summary_doubles_every_budget_a_run_has_spent(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # epochs and time both spent at the epoch's end: the stop names max_epochs (checked first),
    # but a resume with more epochs alone would stop at once on the time budget
    import vaeflow.train as train_mod

    real = train_mod._Trainer.validate

    def slow(self: Any) -> float:
        self.state.seconds += 1000.0  # a validation of 1000 s
        return real(self)

    monkeypatch.setattr(train_mod._Trainer, "validate", slow)
    run = tmp_path / "run"
    results = train(tiny_config(tiny_data_dir, is_samples=0, max_epochs=1, max_minutes=5.0),
                    run, progress=False)
    assert results["stop_reason"] == "max_epochs=1 reached"
    text = report.summary(run, results)
    # 16.7 minutes trained: the budget again on top, 21.7 (doubled, 10 would be refused)
    assert (f"vaeflow train --resume {run} --max-epochs 2 --set max_minutes=21.7    # train on"
            in text)
    monkeypatch.undo()
    again = train(resume=run, changes={"max_epochs": 2, "max_minutes": 21.7}, progress=False)
    assert again["steps"] == 20 and again["epochs"] == 2


def test_eval_names_the_model_it_read(tiny_data_dir: Path, tmp_path: Path) -> None:
    # best.pt of a run stopped before its first validation is its last model: not "best"
    validated = _fake_run(tmp_path / "validated", tiny_data_dir, history=[_epoch(1, 3.0)])
    none = _fake_run(tmp_path / "none", tiny_data_dir, history=[])
    torch.save({"progress": {"step": 4, "history": []}}, none.path / "checkpoint.pt")
    saved = _fake_run(tmp_path / "saved", tiny_data_dir)  # save_run's: no checkpoint
    assert report.evaluated_model(saved.path, "best") == "the best model"
    assert report.evaluated_model(validated.path, "best") == "the best model"
    assert report.evaluated_model(validated.path, "last") == "the last model"
    assert report.evaluated_model(none.path, "last") == "the last model"
    assert report.evaluated_model(none.path, "best") == (
        "the last model: no epoch was validated, so none was chosen")
