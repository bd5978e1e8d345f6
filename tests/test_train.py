"""The training loop: learning, exact resume after a crash or a signal, NaN handling, configs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_SPLITS

import vaeflow.train as train_mod
from vaeflow.configs import resolve
from vaeflow.data import load_dataset
from vaeflow.flows import FLOWS
from vaeflow.ode import SolverError
from vaeflow.runs import Run, RunError
from vaeflow.train import (
    TrainConfig,
    TrainingError,
    beta_at,
    evaluate_run,
    train,
    train_step,
)


def tiny_config(data_dir: Path, flow: str = "planar", **overrides: Any) -> TrainConfig:
    """A seconds-long run on the structured tiny set: MLP nets, D = 4, H = 8, batch 20."""
    flow_kwargs: dict[str, Any] = {
        "planar": {"num_steps": 2},
        "ffjord": {"hidden_dims": [16], "rank": 2, "atol": 1e-4, "rtol": 1e-4},
        "none": {},
    }[flow]
    values: dict[str, Any] = dict(
        dataset="static_mnist",
        flow=flow,
        flow_kwargs=flow_kwargs,
        arch="mlp",
        latent_dim=4,
        context_dim=8,
        net_kwargs={"hidden_sizes": [32]},
        lr=3e-3,
        batch_size=20,
        warmup_epochs=2,
        max_epochs=3,
        early_stopping_epochs=50,
        data_dir=str(data_dir),
        split_sizes=list(TINY_SPLITS),
        device="cpu",
        eval_points=20,
        is_samples=4,
        is_points=5,
        log_every=3,
        image_every=2,
        pictures=False,  # a few seconds a run; the tests of pictures ask for them
    )
    values.update(overrides)
    return TrainConfig(**values)


def params(run_dir: Path, name: str = "checkpoint.pt") -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / name, weights_only=True)
    return state["model"] if "model" in state else state


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # a flow's extra state (the solver tolerances)
            assert a[key] == b[key], key


@pytest.mark.parametrize("flow", ["none", "planar", pytest.param("ffjord", marks=pytest.mark.slow)])
def test_training_lowers_the_loss(tiny_data_dir: Path, tmp_path: Path, flow: str) -> None:
    epochs = 20 if flow == "ffjord" else 30
    config = tiny_config(
        tiny_data_dir, flow, max_epochs=epochs, warmup_epochs=0, is_samples=0, image_every=0,
        log_every=10,
    )
    if flow == "ffjord":
        config.flow_kwargs.update(atol=1e-3, rtol=1e-3)
    results = train(config, tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    history = ckpt["progress"]["history"]
    assert len(history) == epochs and results["steps"] == 10 * epochs
    first, last = history[0]["train_nelbo"], history[-1]["train_nelbo"]
    assert last < 0.8 * first, (first, last)
    assert history[-1]["valid_nelbo"] < 0.8 * history[0]["valid_nelbo"]
    assert math.isfinite(results["test_nelbo"]) and results["test_nelbo"] < 0.8 * first
    if flow != "none":
        assert abs(history[-1]["train_logdet"]) > 1e-3  # the flow is in use
    assert not list((tmp_path / "run").glob("*.png"))  # pictures=False: none, not even at the end


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_reading_a_config_leaves_the_random_stream_alone(flow: str) -> None:
    # Checking a config builds its flow once; the throw-away initialisation must not draw from
    # the caller's stream (the per-epoch learning curve reads the config for its title, and a
    # planar run's second epoch used to differ with and without it).
    config = resolve("caltech", flow, preset="quick")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    TrainConfig.from_dict(config.to_dict())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_pictures_change_nothing_that_the_run_computes(tiny_data_dir: Path, tmp_path: Path) -> None:
    # They draw under their own seed: a run with them every epoch trains and evaluates exactly
    # as one without, which is why a resumed run may switch them. Planar: a flow whose
    # construction draws random weights (FFJORD's check builds on the meta device, draws none).
    results = {}
    for pictures in (True, False):
        config = tiny_config(tiny_data_dir, "planar", max_epochs=2, image_every=1,
                             pictures=pictures)
        results[pictures] = train(config, tmp_path / str(pictures), progress=False)
    assert_same_params(params(tmp_path / "True"), params(tmp_path / "False"))
    for key in ("test_nelbo", "test_nll_is", "best_valid_nelbo"):
        assert results[True][key] == results[False][key], key
    assert (tmp_path / "True" / "samples.png").is_file()
    assert not list((tmp_path / "False").glob("*.png"))
    # a resume may switch them (this run is finished: nothing more runs), and records it
    train(resume=tmp_path / "False", changes={"pictures": True}, progress=False)
    assert json.loads((tmp_path / "False" / "config.json").read_text())["pictures"] is True


def test_a_bits_per_dim_data_set_logs_its_unit_too(tmp_path: Path) -> None:
    import numpy as np

    from vaeflow.data import DATASETS

    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (60, 28, 20), dtype=np.uint8)
    np.savez_compressed(tmp_path / DATASETS["freyfaces"].filename, x=faces)
    config = tiny_config(tmp_path, "none", dataset="freyfaces", split_sizes=[40, 10, 10],
                         max_epochs=1, eval_points=None, is_samples=0, is_points=None)
    run = tmp_path / "run"
    train(config, run, progress=False)
    per_nat = 1 / (28 * 20 * math.log(2))
    (record,) = json.loads((run / "history.json").read_text())
    assert record["valid_nelbo_bpd"] == pytest.approx(record["valid_nelbo"] * per_nat)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    for tag in ("train/nelbo", "valid/nelbo", "test/nelbo"):
        (nats,), (bpd,) = events.Scalars(tag), events.Scalars(f"{tag}_bpd")
        assert bpd.value == pytest.approx(nats.value * per_nat, rel=1e-6), tag
    assert "train/loss_bpd" not in events.Tags()["scalars"]  # beta-weighted: not a figure


@pytest.mark.slow
def test_run_directory_contents(tiny_data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = train(tiny_config(tiny_data_dir, "ffjord", pictures=True), run, progress=False)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "checkpoint.pt", "best.pt", "results.json", "timing.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert json.loads((run / "results.json").read_text()) == results
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())).flow == "ffjord"
    for key in ("test_nelbo", "test_nll_is", "best_epoch", "stop_reason", "solver"):
        assert key in results
    assert results["test_nll_is"] <= results["test_nelbo"] + 5.0  # IS is the tighter bound
    assert results["train_nfe_forward_mean"] >= 8  # dopri5: initial step choice + one step
    assert results["train_nfe_backward_mean"] == 0  # direct backpropagation, no adjoint
    history = torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["history"]
    assert all(h["train_nfe_forward"] >= 8 for h in history)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/recon", "train/kl", "train/logdet", "train/beta",
                "train/grad_norm", "train/lr", "train/sec_per_iter", "train/nfe_forward",
                "valid/nelbo", "test/nelbo", "test/nll_is"):
        assert tag in tags, tag
    # TensorBoard's HParams tab: the settings (the flow's with its class defaults filled in)
    # and the finished status; no experiment summary, so that TensorBoard makes the columns
    # from the settings of all runs, and their metrics from the runs' scalars
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    hp = start.hparams
    assert hp["flow"].string_value == "ffjord" and hp["seed"].number_value == 0
    assert hp["ffjord.hidden_dims"].string_value == "[16]"
    assert hp["ffjord.trace"].string_value == "hutchinson"  # a default, filled in
    assert "log_every" not in hp and "flow_kwargs" not in hp
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])
    assert {"samples.png", "reconstructions.png", "learning_curve.png"} <= names
    # the warm-up: beta of epoch 1 is 1/2, then 1
    betas = [e.value for e in events.Scalars("train/beta")]
    assert betas[0] == 0.5 and betas[-1] == 1.0

    again = evaluate_run(run)
    assert again["test_nelbo"] == pytest.approx(results["test_nelbo"], rel=1e-6)


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no handler saves anything."""


def killed_in_validation(
    monkeypatch: pytest.MonkeyPatch, config: TrainConfig, run_dir: Path
) -> None:
    """Train ``config`` in ``run_dir`` until its first validation, which is killed (Crash)."""
    def killed(self: Any) -> float:
        raise Crash

    monkeypatch.setattr(train_mod._Trainer, "validate", killed)
    with pytest.raises(Crash):
        train(config, run_dir, progress=False)
    monkeypatch.undo()


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real = train_mod.train_step
    count = {"n": 0}

    def step_or_crash(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        count["n"] += 1
        if count["n"] == step:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_or_crash)


@pytest.mark.parametrize(
    ("flow", "crash_step", "every"),
    [pytest.param("ffjord", 14, 4, marks=pytest.mark.slow), ("planar", 23, 0)],
)
def test_resume_after_a_crash_is_bit_identical(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flow: str,
    crash_step: int, every: int,
) -> None:
    config = tiny_config(tiny_data_dir, flow, checkpoint_every=every)
    reference = train(config, tmp_path / "a", progress=False)

    crash_at(monkeypatch, crash_step)  # mid-epoch (10 steps per epoch)
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert saved == (12 if every else 20)  # the last mid-epoch or epoch-end checkpoint
    resumed = train(resume=tmp_path / "b", progress=False)

    assert resumed == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    assert_same_params(params(tmp_path / "a", "best.pt"), params(tmp_path / "b", "best.pt"))


def test_a_resume_removes_the_temporaries_of_a_killed_write(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 inside an atomic write leaves its temporary file (a checkpoint's size); the
    next session, holding the run's lock, removes those of run files, and no other file."""
    config = tiny_config(tiny_data_dir)
    crash_at(monkeypatch, 13)
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    run = tmp_path / "b"
    stale = [run / ".checkpoint.pt.k3j9x_2a.tmp", run / ".best.pt.0qz81mhw.tmp",
             run / ".samples.png.a1b2c3d4.tmp"]
    mine = [run / ".notes.txt.tmp", run / "draft.tmp"]  # not vaeflow's: kept
    for path in stale + mine:
        path.write_bytes(b"partial")
    train(resume=run, progress=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in mine)


def test_resume_refuses_a_spent_budget_and_takes_restated_values(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tiny_data_dir)
    reference = train(config, tmp_path / "a", progress=False)
    crash_at(monkeypatch, 23)  # the last checkpoint: step 20, epoch 3 under way
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    before = (tmp_path / "b" / "config.json").read_text()
    for spent, words in [({"max_steps": 20}, "max_steps=20 (it is at step 20)"),
                         ({"max_epochs": 2}, "max_epochs=2 (it is in epoch 3)"),
                         ({"max_minutes": 1e-6}, "max_minutes=1e-06 (it has trained ")]:
        with pytest.raises(RunError, match=re.escape(words) + ".*passed that budget"):
            train(resume=tmp_path / "b", changes=spent, progress=False)
        assert (tmp_path / "b" / "config.json").read_text() == before  # nothing written
    # the run's own values, named again, are no change: the run goes on as the reference
    same = {"lr": config.lr, "seed": config.seed, "batch_size": config.batch_size,
            "max_epochs": config.max_epochs}
    assert train(resume=tmp_path / "b", changes=same, progress=False) == reference
    # finished, it is refused a budget below what it trained: its config.json would say
    # max_steps=10 of a run of 30 steps (the budget reached or not, nothing else would change)
    done = (tmp_path / "b" / "config.json").read_text()
    steps, epochs = reference["steps"], reference["epochs"]
    for smaller, words in [({"max_steps": 10}, f"max_steps=10 (it trained {steps} steps)"),
                           ({"max_epochs": 1}, f"max_epochs=1 (it trained {epochs} epochs)"),
                           ({"max_minutes": 1e-6}, "max_minutes=1e-06 (it trained ")]:
        with pytest.raises(RunError, match=re.escape(words) + ".*has finished.*vaeflow eval"):
            train(resume=tmp_path / "b", changes=smaller, progress=False)
        assert (tmp_path / "b" / "config.json").read_text() == done
    # the budget it stopped at is no change worth refusing
    assert train(resume=tmp_path / "b", changes={"max_steps": steps}, progress=False)["steps"] \
        == steps


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, sig: signal.Signals) -> None:
    """Deliver ``sig`` to the loop's handler during step ``step`` (the step completes)."""
    real = train_mod.train_step
    count = {"n": 0}

    def step_then_signal(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        count["n"] += 1
        if count["n"] == step:
            signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)


def test_sigterm_writes_a_checkpoint_and_resume_matches(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(tiny_data_dir, "planar")
    reference = train(config, tmp_path / "a", progress=False)

    signal_at(monkeypatch, 17, signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM received.*step 17.*--resume"):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 17 and ckpt["loader"]["next_batch"] == 7
    assert train(resume=tmp_path / "b", progress=False) == reference


@pytest.mark.parametrize("how", ["sigint-at-max-steps", "kill-in-timed-out-validation"])
def test_a_run_saved_where_its_budget_ran_out_resumes_to_the_same_end(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The checkpoint is written at the step where the budget runs out, before the run stops:
    # a resume must stop there too (not refuse the run's own budget, nor train past it).
    if how == "sigint-at-max-steps":
        config = tiny_config(tiny_data_dir, max_steps=13)  # inside epoch 2
        reference = train(config, tmp_path / "a", progress=False)
        signal_at(monkeypatch, 13, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="SIGINT received.*step 13"):
            train(config, tmp_path / "b", progress=False)
    else:
        config = tiny_config(tiny_data_dir, max_minutes=1e-6, max_epochs=50, checkpoint_every=1)
        reference = train(config, tmp_path / "a", progress=False)
        assert reference["stop_reason"].startswith("time budget") and reference["steps"] == 1
        killed_in_validation(monkeypatch, config, tmp_path / "b")
    monkeypatch.undo()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["progress"]
    assert saved["step"] == reference["steps"] and not saved["done"]
    assert train(resume=tmp_path / "b", progress=False) == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    assert_same_params(params(tmp_path / "a", "best.pt"), params(tmp_path / "b", "best.pt"))


def test_a_run_stopped_by_its_time_budget_resumes_to_evaluate_again(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # A time stop ends a little past max_minutes; its own budget is no smaller budget to
    # refuse when, say, a Ctrl-C in the final evaluation left no results.json.
    config = tiny_config(tiny_data_dir, max_minutes=1e-6, max_epochs=50)
    reference = train(config, tmp_path / "run", progress=False)
    (tmp_path / "run" / "results.json").unlink()
    assert train(resume=tmp_path / "run", progress=False) == reference
    same = {"max_minutes": config.max_minutes}  # named again: no change
    assert train(resume=tmp_path / "run", changes=same, progress=False) == reference


def test_a_time_stop_inside_an_epoch_resumed_with_more_time_trains_that_epoch_on(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # The time stop validates its partial epoch (so that the final model is chosen among what
    # the run trained), but that epoch is not over: resumed with more time, the run trains the
    # rest of it under the same number and KL weight, as the longer run did (not as a short
    # epoch of its own, one epoch ahead in the warm-up and in max_epochs).
    reference = train(tiny_config(tiny_data_dir, max_epochs=2), tmp_path / "a", progress=False)
    timed = tiny_config(tiny_data_dir, max_epochs=2, max_minutes=1e-6)
    short = train(timed, tmp_path / "b", progress=False)
    assert short["steps"] == 3 and short["epochs"] == 1 and short["best_epoch"] == 1
    resumed = train(resume=tmp_path / "b", changes={"max_minutes": None}, progress=False)
    assert resumed["steps"] == reference["steps"] == 20
    assert resumed["epochs"] == reference["epochs"] == 2
    assert resumed["stop_reason"] == reference["stop_reason"] == "max_epochs=2 reached"
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [(r["epoch"], r["step"], r.get("partial", False)) for r in history] == [
        (1, 3, True), (1, 10, False), (2, 20, False)
    ]
    ref_history = json.loads((tmp_path / "a" / "history.json").read_text())
    # the whole epoch's mean (its sums were folded at the stop: equal up to rounding)
    assert history[1]["train_loss"] == pytest.approx(ref_history[0]["train_loss"], rel=1e-12)


def test_early_stopping_after_a_resumed_time_stop_compares_whole_epochs(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The partial epoch's validation (95) may be the best model, but early stopping compares
    # whole epochs, as the longer run did: 100, 90, 80 improve every time, so no early stop.
    def scripted(self: Any) -> float:
        return 95.0 if self.loader.in_epoch else {1: 100.0, 2: 90.0, 3: 80.0}[self.state.epoch]

    monkeypatch.setattr(train_mod._Trainer, "validate", scripted)
    config = tiny_config(tiny_data_dir, max_epochs=3, warmup_epochs=0, early_stopping_epochs=1)
    reference = train(config, tmp_path / "a", progress=False)
    assert reference["stop_reason"] == "max_epochs=3 reached" and reference["steps"] == 30
    short = train(dataclasses.replace(config, max_minutes=1e-6), tmp_path / "b", progress=False)
    assert short["steps"] == 3 and short["best_valid_nelbo"] == 95.0
    resumed = train(resume=tmp_path / "b", changes={"max_minutes": None}, progress=False)
    assert resumed["stop_reason"] == "max_epochs=3 reached" and resumed["steps"] == 30
    assert resumed["best_epoch"] == 3 and resumed["best_valid_nelbo"] == 80.0


@pytest.mark.parametrize(("key", "first", "then"),
                         [("max_epochs", 2, 3), ("max_steps", 13, 25), ("max_steps", 5, 8)])
def test_a_finished_run_resumed_with_a_larger_budget_trains_on(
    tiny_data_dir: Path, tmp_path: Path, key: str, first: int, then: int
) -> None:
    # The final checkpoint is the state an uninterrupted run has at that step, and the final
    # evaluation draws under its own seed: training on from it is the longer run, bit for bit.
    # (5 -> 8: both ends inside the first epoch, so the figures are of the last model, not of
    # the best.pt that the shorter end left.)
    reference = train(tiny_config(tiny_data_dir, **{key: then}), tmp_path / "a", progress=False)
    short = train(tiny_config(tiny_data_dir, **{key: first}), tmp_path / "b", progress=False)
    assert short["stop_reason"] == f"{key}={first} reached"
    assert train(resume=tmp_path / "b", changes={key: then}, progress=False) == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == reference
    # its budget spent, a finished run resumed again is left as it is (its figures returned)
    assert train(resume=tmp_path / "b", progress=False) == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))


def poison_at(monkeypatch: pytest.MonkeyPatch, step: int, error: type | None = None) -> None:
    """Make step ``step`` (once) return a NaN loss, or raise ``error``."""
    real = train_mod.train_step
    count = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        count["n"] += 1
        out = real(*args, **kwargs)
        if count["n"] == step:
            if error is not None:
                raise error("step size underflow (simulated)")
            out["loss"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(train_mod, "train_step", poisoned)


@pytest.mark.parametrize("error", [None, SolverError])
def test_nan_or_solver_failure_stops_and_keeps_the_last_checkpoint(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type | None
) -> None:
    poison_at(monkeypatch, 15, error)
    run = tmp_path / "run"
    what = "became nan at step 15, after [0-9.]+ at step 14" if error is None else "underflow"
    with pytest.raises(TrainingError, match=f"(?s){what}.*last good checkpoint \\(step 10\\)"):
        train(tiny_config(tiny_data_dir, "planar"), run, progress=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # marked failed (for `vaeflow compare`), with no figures
    assert Run(run).results is None and Run(run).failure
    # and the run can go on from there, no longer failed while it does
    results = train(resume=run, progress=False)
    assert math.isfinite(results["test_nelbo"])
    assert Run(run).failure is None and Run(run).results == results


def test_nan_retries_leave_a_fixed_step_solve_alone(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rk4 has no tolerances: a retry would replay the same NaN, so it stops and says what helps
    poison_at(monkeypatch, 15)
    flow_kwargs = {"hidden_dims": [16], "rank": 2, "method": "rk4",
                   "solver_options": {"step_size": 0.5}}
    config = tiny_config(tiny_data_dir, "ffjord", nan_retries=1, flow_kwargs=flow_kwargs)
    with pytest.raises(TrainingError, match="smaller solver steps.*no tolerances") as info:
        train(config, tmp_path / "run", progress=False)
    assert "retrying" not in str(info.value) and "atol" not in str(info.value)


def test_nan_retry_tightens_ffjord_tolerances(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_at(monkeypatch, 15)
    config = tiny_config(tiny_data_dir, "ffjord", nan_retries=1, max_epochs=2)
    results = train(config, tmp_path / "run", progress=False)
    assert results["solver"] == [{"atol": 1e-5, "rtol": 1e-5, "method": "dopri5", "options": {}}]
    assert results["steps"] == 20
    # the retry trains steps 11-20 again: TensorBoard shows the retry's figures, not also
    # those of the steps before the NaN (step 13's)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6, 9, 10, 13, 16, 19, 20]


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str) -> dict[str, int]:
    """Make ``vaeflow.train.<name>`` raise a simulated underflow on its first call only;
    the returned ``{"n": calls}`` counts the calls."""
    real = getattr(train_mod, name)
    calls = {"n": 0}

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SolverError("step size underflow (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, name, fails_once)
    return calls


# rk4 training, evaluated with dopri5 at the flow's tolerances: a retry tightens those
RK4 = {"hidden_dims": [16], "rank": 2, "method": "rk4", "solver_options": {"step_size": 0.5},
       "atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize(("retries", "fixed_step"), [(0, False), (1, False), (1, True)])
def test_solver_failure_in_the_final_evaluation(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retries: int,
    fixed_step: bool,
) -> None:
    calls = fail_once(monkeypatch, "evaluate")
    run = tmp_path / "run"
    config = tiny_config(tiny_data_dir, "ffjord", max_epochs=1, nan_retries=retries,
                         **({"flow_kwargs": RK4, "is_samples": 0} if fixed_step else {}))
    if retries:
        results = train(config, run, progress=False)
        # evaluated again at 10x tighter tolerance (after rk4 training: dopri5's)
        assert results["solver"][0]["atol"] == 1e-5
        assert results["solver"][0]["method"] == "dopri5"
    else:
        with pytest.raises(TrainingError, match="underflow"):
            train(config, run, progress=False)
        assert Run(run).failure and Run(run).results is None  # compare: failed
        results = train(resume=run, progress=False)  # only evaluates again
        assert results["solver"][0]["atol"] == 1e-4
    assert results["steps"] == 10 and calls["n"] == 2
    assert json.loads((run / "results.json").read_text()) == results


@pytest.mark.parametrize("retries", [0, 1])
def test_a_failed_validation_solve_after_fixed_step_training(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retries: int
) -> None:
    """After rk4 training the validation solves with dopri5 at the flow's tolerances: its
    failure is that solve's (no step-size advice), a retry tightens those tolerances, though
    the training solve has none, and the epoch's steps are kept, not trained again."""
    calls = fail_once(monkeypatch, "dataset_nelbo")  # the validation's (evaluate has its own)
    steps = {"n": 0}
    real_step = train_mod.train_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        steps["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", counted)
    config = tiny_config(tiny_data_dir, "ffjord", flow_kwargs=RK4, max_epochs=1, is_samples=0,
                         nan_retries=retries)
    run = tmp_path / "run"
    if retries:
        results = train(config, run, progress=False)
        assert results["solver"][0]["method"] == "dopri5" and results["solver"][0]["atol"] == 1e-5
    else:
        with pytest.raises(TrainingError) as info:
            train(config, run, progress=False)
        message = str(info.value)
        assert "the validation's step size underflow" in message
        assert "last good checkpoint (step 10)" in message  # the epoch's steps
        assert "the flow's tolerances, which the adaptive solve of the validation" in message
        assert "nan_retries=1" in message
        assert "step_size" not in message and "test_solver" not in message
        results = train(resume=run, progress=False)  # validates (this time it succeeds)
    assert results["steps"] == 10 and results["epochs"] == 1 and calls["n"] == 2
    assert steps["n"] == 10  # the epoch was trained once


def test_max_steps_makes_a_smoke_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data_dir, "ffjord", max_steps=5, eval_points=None)
    results = train(config, tmp_path / "run", progress=False)
    assert results["steps"] == 5 and "max_steps" in results["stop_reason"]
    assert results["test_points"] == 50  # the whole (tiny) test set: smoke eval caps at 500


def test_a_relative_data_dir_is_saved_as_the_folder_it_named(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained with ``--data-dir NAME`` from the data's parent folder, the run is evaluated and
    resumed from another folder: it reads the same data, and starts no download into a NAME
    folder there."""
    monkeypatch.chdir(tiny_data_dir.parent)
    config = tiny_config(Path(tiny_data_dir.name), max_steps=3, is_samples=0)
    run = tmp_path / "run"
    first = train(config, run, progress=False)
    assert config.data_dir == tiny_data_dir.name  # the caller's config is left as it was
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(tiny_data_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = evaluate_run(run, pictures=False, is_samples=0)
    assert again["test_nelbo"] == pytest.approx(first["test_nelbo"], rel=1e-6)
    resumed = train(resume=run, changes={"max_steps": 5}, progress=False)
    assert resumed["steps"] == 5
    assert not list(elsewhere.iterdir())


def test_max_steps_at_an_epochs_end_validates_that_epoch(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # 200 points in batches of 20: step 10 ends epoch 1, which is whole and must count
    results = train(tiny_config(tiny_data_dir, max_steps=10), tmp_path / "run", progress=False)
    assert results["steps"] == 10 and results["stop_reason"] == "max_steps=10 reached"
    assert results["epochs"] == 1 and results["best_epoch"] == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 10)]


def test_time_budget_stops_and_keeps_the_partial_epoch(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data_dir, "planar", max_minutes=1e-6, max_epochs=50)
    results = train(config, tmp_path / "run", progress=False)
    assert results["stop_reason"].startswith("time budget")
    assert results["steps"] == 3  # the first read-back (log_every = 3) notices the budget
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["progress"]
    assert history["history"][0]["step"] == 3 and history["best_epoch"] == 1
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["train_seconds"] > 0


def test_early_stopping(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_data_dir, "none", lr=1e-9, warmup_epochs=0, early_stopping_epochs=2, max_epochs=50
    )
    results = train(config, tmp_path / "run", progress=False)
    assert results["stop_reason"].startswith("early stopping")
    assert results["epochs"] < 50


def test_existing_run_is_not_overwritten(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data_dir, "none", max_steps=2)
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="--resume"):
        train(config, tmp_path / "run", progress=False)


def test_an_epochs_training_means_are_over_its_data_points(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200 points in batches of 30: six of 30 and a last one of 20, which weighs 20/200 in the
    # epoch's mean NELBO, not 1/7 (Frey Faces: 1,565 points, a last batch of 65)
    real, seen = train_mod.train_step, []

    def recording(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = real(*args, **kwargs)
        seen.append((float(out["nelbo"]), len(args[2]), float(out["grad_norm"])))
        return out

    monkeypatch.setattr(train_mod, "train_step", recording)
    train(tiny_config(tiny_data_dir, batch_size=30, max_epochs=1), tmp_path / "run",
          progress=False)
    assert [n for _, n, _ in seen] == [30] * 6 + [20]
    (record,) = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "train_rows" not in record
    by_point = sum(v * n for v, n, _ in seen) / 200
    assert record["train_nelbo"] == pytest.approx(by_point, rel=1e-6)
    # the gradient norm is a step's figure: its mean is per step
    assert record["train_grad_norm"] == pytest.approx(sum(g for *_, g in seen) / 7, rel=1e-6)


def test_an_epoch_saved_with_sums_of_batch_means_resumes_by_data_points(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a checkpoint inside an epoch from a vaeflow that summed batch means (no "rows"): its
    # batches so far were whole, so the resumed epoch's mean is still over its data points
    config = tiny_config(tiny_data_dir, max_epochs=1, checkpoint_every=4)
    reference = train(config, tmp_path / "a", progress=False)
    crash_at(monkeypatch, 7)
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    sums = ckpt["progress"]["epoch_sums"]
    assert sums["rows"] == 4 * 20
    ckpt["progress"]["epoch_sums"] = {n: v if n in ("grad_norm", "nfe_forward") else v / 20
                                      for n, v in sums.items() if n != "rows"}
    del ckpt["progress"]["whole_best"]  # checkpoint format 2, as that vaeflow wrote it
    ckpt["format"] = 2
    torch.save(ckpt, path)
    assert train(resume=tmp_path / "b", progress=False) == reference
    a, b = (json.loads((tmp_path / r / "history.json").read_text())[0] for r in "ab")
    assert b["train_nelbo"] == pytest.approx(a["train_nelbo"], rel=1e-9)


def test_the_reconstructions_show_a_fixed_draw_of_test_images(
    tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # static MNIST's test split is stored by digit: its first 32 images are all zeros
    from vaeflow import evaluate

    data = load_dataset("static_mnist", tiny_data_dir, split_sizes=TINY_SPLITS)
    config = tiny_config(tiny_data_dir)
    model = train_mod.build_model(config, data)
    shown = []
    monkeypatch.setattr(evaluate, "image_grids", lambda m, x, seed: shown.append(x))
    evaluate.run_pictures(model, data, config)
    evaluate.run_pictures(model, data, dataclasses.replace(config, seed=5))
    assert torch.equal(shown[0], evaluate.subset(data.test, 32))
    assert torch.equal(shown[0], shown[1]) and not torch.equal(shown[0], data.test[:32])


def test_an_old_checkpoint_saved_at_an_epochs_last_step_keeps_per_step_means(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batches of 30: the 7th (last) step holds 20 rows; saved there, before the validation, by
    # a vaeflow that summed batch means, the rows of that sum are lost: the mean stays per step
    config = tiny_config(tiny_data_dir, batch_size=30, max_epochs=1, checkpoint_every=7)
    killed_in_validation(monkeypatch, config, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["progress"]["epoch_steps"] == 7 and ckpt["loader"]["next_batch"] == 7
    per_step = 123.0 * 7  # a sum of seven batch means of 123
    ckpt["progress"]["epoch_sums"] = {"nelbo": per_step, "loss": per_step}
    del ckpt["progress"]["whole_best"]
    ckpt["format"] = 2
    torch.save(ckpt, path)
    train(resume=tmp_path / "run", progress=False)
    (record,) = json.loads((tmp_path / "run" / "history.json").read_text())
    assert record["train_nelbo"] == pytest.approx(123.0)


def test_the_test_solve_integrates_no_rnode_terms(tiny_data_dir: Path) -> None:
    # The RNODE terms are a training loss: in the solve of the test figures they would only
    # enter the adaptive solver's error control (and cost work), so that a regularized model
    # was measured with other steps than the same weights without them.
    from vaeflow.evaluate import dataset_nelbo, evaluation_solve

    config = tiny_config(tiny_data_dir, "ffjord", kinetic_weight=0.5, jacobian_weight=0.25)
    plain_config = dataclasses.replace(config, kinetic_weight=0.0, jacobian_weight=0.0)
    data = load_dataset("static_mnist", tiny_data_dir, split_sizes=TINY_SPLITS)
    torch.manual_seed(0)
    model = train_mod.build_model(config, data)
    plain = train_mod.build_model(plain_config, data)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # a field far from zero, whose solve takes many steps
        for p in model.flow.parameters():
            p.mul_(3.0)
        for p in plain.flow.parameters():
            p.mul_(3.0)
    figures = []
    for m, c in ((model, config), (plain, plain_config)):
        torch.manual_seed(1)
        with evaluation_solve(m, c):
            figures.append((float(dataset_nelbo(m, data.test[:20], 20)), m.flow.nfe_forward))
    assert figures[0] == figures[1]
    assert model.flow.regularize  # as it was, for the training that follows


def test_rnode_regularization_joins_the_loss(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data_dir, "ffjord", kinetic_weight=0.5, jacobian_weight=0.25)
    data = load_dataset("static_mnist", tiny_data_dir, split_sizes=TINY_SPLITS)
    model = train_mod.build_model(config, data)
    assert model.flow.regularize
    optimizer = train_mod.make_optimizer(config, model)
    torch.manual_seed(0)
    out = train_step(model, optimizer, data.train[:20], 1.0, None, config.regularization())
    assert out["reg_kinetic"] > 0 and out["reg_jacobian_frobenius"] > 0
    expected = out["recon"] + out["kl"] + 0.5 * out["reg_kinetic"]
    expected = expected + 0.25 * out["reg_jacobian_frobenius"]
    torch.testing.assert_close(out["loss"], expected)
    results = train(config, tmp_path / "run", progress=False)
    assert math.isfinite(results["test_nelbo"])
    with pytest.raises(ValueError, match="regularize FFJORD's dynamics"):
        TrainConfig(flow="planar", kinetic_weight=1.0)


def test_config_errors_name_the_valid_values() -> None:
    with pytest.raises(ValueError, match="unknown config key.*'bogus'.*valid keys are.*lr"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="valid flows are none, planar"):
        TrainConfig(flow="realnvp")
    with pytest.raises(ValueError, match="unknown hyperparameter.*'width'.*hidden_dims"):
        TrainConfig(flow="ffjord", flow_kwargs={"width": 3})
    with pytest.raises(ValueError, match="valid values are adamax, adam"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="invalid device"):
        train_mod.resolve_device("gpu7")


def test_train_refuses_what_is_not_a_run_before_touching_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TypeError, match="train\\(\\) takes a TrainConfig, got dict.*resolve"):
        train({"flow": "none"}, run)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs config and run_dir, or resume"):
        train(TrainConfig(flow="none"))
    assert not run.exists()


def test_beta_warmup() -> None:
    assert [beta_at(e, 4) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert beta_at(1, 0) == 1.0


def test_the_evaluation_solve_is_dopri5_after_fixed_steps_and_is_undone(
    tiny_data_dir: Path,
) -> None:
    from vaeflow.evaluate import evaluation_solve
    from vaeflow.model import build_model

    rk4 = {"hidden_dims": [16], "rank": 2, "method": "rk4", "solver_options": {"step_size": 0.5}}
    config = tiny_config(tiny_data_dir, "ffjord", flow_kwargs=rk4)
    model = build_model(config)
    trained = model.flow.solver
    with evaluation_solve(model, config):
        assert (model.flow.solver.method, model.flow.solver.atol) == ("dopri5", 1e-5)
    assert model.flow.solver is trained
    tighter = {"atol": 1e-7}
    with pytest.raises(RuntimeError, match="inside"), evaluation_solve(model, config, tighter):
        assert model.flow.solver.atol == 1e-7
        raise RuntimeError("inside")
    assert model.flow.solver is trained
    adaptive = tiny_config(tiny_data_dir, "ffjord")
    model = build_model(adaptive)
    trained = model.flow.solver
    with evaluation_solve(model, adaptive):
        assert model.flow.solver is trained  # an adaptive solve is tested as trained


def test_validation_and_pictures_after_fixed_steps_use_the_evaluation_solve(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vaeflow.evaluate as evaluate_mod

    seen: list[str] = []
    pictured: list[str] = []
    real_nelbo, real_grids = train_mod.dataset_nelbo, evaluate_mod.image_grids

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(model.flow.solver.method)
        return real_nelbo(model, *args, **kwargs)

    def spy_grids(model: Any, *args: Any, **kwargs: Any) -> Any:
        pictured.append(model.flow.solver.method)
        return real_grids(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "dataset_nelbo", spy)
    monkeypatch.setattr(evaluate_mod, "image_grids", spy_grids)
    rk4 = {"hidden_dims": [16], "rank": 2, "method": "rk4", "solver_options": {"step_size": 0.5}}
    config = tiny_config(tiny_data_dir, "ffjord", flow_kwargs=rk4, max_epochs=2, is_samples=0,
                         image_every=1, pictures=True)
    train(config, tmp_path / "run", progress=False)
    assert seen == ["dopri5", "dopri5"]  # one validation per epoch
    # the reconstructions show the model the test figures measure: each epoch's, the final
    assert pictured == ["dopri5"] * 3
    evaluate_run(tmp_path / "run", eval_points=20, is_samples=0,
                 solver={"method": "rk4", "solver_options": {"step_size": 0.25}})
    assert pictured == ["dopri5"] * 3  # vaeflow eval --solver leaves the run's pictures alone
    evaluate_run(tmp_path / "run", eval_points=20, is_samples=0)
    assert pictured == ["dopri5"] * 4  # and vaeflow eval draws them through the run's own solve


def test_the_training_bar_closes_before_the_final_evaluation(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an open bar would count the evaluation's minutes as training time and rate
    events: list[str] = []
    real_close, real_evaluate = train_mod.TrainingBar.close, train_mod.evaluate

    def close(bar: Any) -> None:
        events.append("close")
        real_close(bar)

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        events.append("evaluate")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod.TrainingBar, "close", close)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    train(tiny_config(tiny_data_dir, max_epochs=1), tmp_path / "run", progress=True)
    assert events[:2] == ["close", "evaluate"]


def test_the_budget_bar_follows_the_budgets_clock(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the bar of a max_minutes run is set to the run's own count of training seconds at every
    # read-back and epoch end (its wall-clock would also count the pictures and checkpoints)
    seen: list[float] = []
    monkeypatch.setattr(train_mod.TrainingBar, "sync", lambda bar, s: seen.append(s))
    train(tiny_config(tiny_data_dir, max_epochs=2, max_minutes=60.0), tmp_path / "run",
          progress=True)
    seconds = json.loads((tmp_path / "run" / "timing.json").read_text())["train_seconds"]
    assert len(seen) >= 2 * 10 // 3 and seen == sorted(seen) and 0 < seen[-1] <= seconds


def test_exact_in_eval_false_keeps_the_hutchinson_estimate_for_the_test_figures(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The README's departure ``--flow-opt exact_in_eval=false`` (the paper's code evaluates
    with the training estimator) reaches the test NELBO and the IS NLL, and results say so."""
    config = tiny_config(tiny_data_dir, "ffjord", max_epochs=1, is_samples=2, is_points=5,
                         eval_points=40)
    exact = train(config, tmp_path / "exact", progress=False)
    estimated = train(dataclasses.replace(
        config, flow_kwargs={**config.flow_kwargs, "exact_in_eval": False}),
        tmp_path / "hutchinson", progress=False)
    assert exact["trace"] == "exact" and estimated["trace"] == "Hutchinson"
    # the same parameters (one seed, training never uses the flag): only the trace differs
    assert estimated["best_valid_nelbo"] == exact["best_valid_nelbo"]
    assert estimated["test_nelbo"] != exact["test_nelbo"]
    assert estimated["test_nll_is"] != exact["test_nll_is"]
    assert evaluate_run(tmp_path / "hutchinson", pictures=False)["trace"] == "Hutchinson"


def test_readme_python_section_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "## Python" blocks, but the paper-size training (a GPU job): a flow called
    directly, then a loop of one's own saved as a run that vaeflow reads back."""
    from conftest import run_readme

    from vaeflow.runs import load_model

    monkeypatch.chdir(tmp_path)  # the block writes runs/mine where it runs
    namespace = run_readme("Python", min_blocks=3, skip=('train(config, "runs/x")',))
    zK, logdet = namespace["zK"], namespace["logdet"]
    assert zK.shape == (100, 64) and logdet.shape == (100,)
    terms, model = namespace["terms"], namespace["model"]
    assert math.isfinite(terms["loss"].item())
    assert {"nelbo", "kl", "recon", "logdet"} <= terms.keys()
    loaded, config = load_model(tmp_path / "runs" / "mine")
    assert config.flow == "planar" and config.arch == "mlp"
    assert config.flow_kwargs["num_steps"] == 16  # the comment in the block says so
    assert_same_params(loaded.state_dict(), model.state_dict())


def test_a_model_trained_elsewhere_becomes_a_run(tiny_data_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vaeflow.cli import main
    from vaeflow.evaluate import save_run
    from vaeflow.model import build_model
    from vaeflow.runs import load_model

    config = tiny_config(tiny_data_dir)
    model = build_model(config)
    with torch.no_grad():  # stands in for a loop of one's own
        next(model.parameters()).add_(0.5)
    results = save_run(tmp_path / "mine", model, config)
    assert results is not None and Run(tmp_path / "mine").results == results
    assert results["status"] == "finished" and math.isfinite(results["test_nelbo"])
    loaded, _ = load_model(tmp_path / "mine")
    assert_same_params(loaded.state_dict(), model.state_dict())
    # the CLI sees it as any run: evaluated again to the same figure, and compared
    assert main(["eval", str(tmp_path / "mine"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_nelbo"] == pytest.approx(results["test_nelbo"], rel=1e-6)
    assert main(["compare", str(tmp_path / "mine"), "--plot", "none"]) == 0
    assert "planar" in capsys.readouterr().out
    # a folder that holds a run, and a model that is not the config's, are refused by name
    with pytest.raises(RunError, match="already holds files"):
        save_run(tmp_path / "mine", model, config)
    other = build_model(dataclasses.replace(config, latent_dim=6))
    with pytest.raises(RunError, match="not the one its config describes: shapes differ for"):
        save_run(tmp_path / "other", other, config)
    assert not (tmp_path / "other").exists()
    # saved without its figures, it is a run that is not evaluated (not one still training)
    assert save_run(tmp_path / "bare", model, config, evaluate=False) is None
    assert main(["compare", str(tmp_path / "bare"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "not evaluated"
    # the closing pictures follow the config, as a trained run's do
    pngs = {"samples.png", "reconstructions.png"}
    save_run(tmp_path / "quiet", model, dataclasses.replace(config, pictures=False))
    assert not pngs & {p.name for p in (tmp_path / "quiet").iterdir()}
    save_run(tmp_path / "drawn", model, dataclasses.replace(config, pictures=True))
    assert pngs <= {p.name for p in (tmp_path / "drawn").iterdir()}


def test_the_is_figure_does_not_move_with_the_nelbos_test_points(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Each test estimate draws from its own seeded stream: ``vaeflow eval RUN --eval-points N``
    gives the run's own IS NLL (same ``is_points``, ``is_samples``) whatever N."""
    config = tiny_config(tiny_data_dir, "ffjord", max_epochs=1, is_samples=3, is_points=5,
                         eval_points=40)
    results = train(config, tmp_path / "run", progress=False)
    fewer = evaluate_run(tmp_path / "run", eval_points=7, pictures=False)
    assert fewer["test_points"] == 7 and fewer["test_nelbo"] != results["test_nelbo"]
    assert fewer["test_nll_is"] == results["test_nll_is"]


def test_a_flow_trained_with_the_exact_trace_reports_it(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # trace="exact" is exact everywhere, whatever exact_in_eval says of the eval mode
    config = tiny_config(tiny_data_dir, "ffjord", max_epochs=1, is_samples=0, eval_points=10)
    config = dataclasses.replace(
        config, flow_kwargs={**config.flow_kwargs, "trace": "exact", "exact_in_eval": False})
    assert train(config, tmp_path / "run", progress=False)["trace"] == "exact"
