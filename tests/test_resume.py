"""Resuming a run: on a CPU from a checkpoint of a captured (CUDA-graph) step, after a signal
in the last validation, from the step-0 checkpoint, and after a start stopped before its first
checkpoint; which settings a resume may change, and which checkpoint formats it takes. (A
resume after a crash or a signal, bit for bit, and a resume with a larger budget are in
test_train.py.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import Crash, assert_same_params, crash_at, params, tiny_config

import vaeflow.train as train_mod
from vaeflow.checks import InputError
from vaeflow.runs import RunError
from vaeflow.train import train


def test_a_checkpoint_of_a_captured_step_resumes_on_a_cpu(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cuda_graph run on a GPU makes its optimizer capturable, and its checkpoint says so in
    # the param groups; resumed with --device cpu (as the README allows), the optimizer must
    # step as this session's (not capturable: a capturable Adamax refuses CPU tensors).
    config = tiny_config(tiny_data_dir, max_steps=15)
    reference = train(config, tmp_path / "a", progress=False)
    crash_at(monkeypatch, 13)  # the last checkpoint: step 10, the end of epoch 1
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    path = tmp_path / "b" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt["optimizer"]["param_groups"]:
        group["capturable"] = True  # as the GPU's captured run wrote it
    torch.save(ckpt, path)
    assert train(resume=tmp_path / "b", progress=False) == reference
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    saved = torch.load(path, weights_only=True)["optimizer"]["param_groups"]
    assert not any(group["capturable"] for group in saved)


def signal_in_validation(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """SIGINT arrives during the ``call``-th validation (the last one of a 3-epoch run: 3)."""
    validate = train_mod._Trainer.validate
    calls = {"n": 0}

    def validate_with_signal(self: Any) -> float:
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signal.SIGINT)
        return validate(self)

    monkeypatch.setattr(train_mod._Trainer, "validate", validate_with_signal)


def test_a_signal_in_the_last_validation_stops_before_the_final_evaluation(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C during the validation of the last epoch: the training is saved, done, and the
    # run stops there, as in the evaluation itself; it must not go through the whole final
    # evaluation (minutes for FFJORD) and exit as if no signal had come.
    config = tiny_config(tiny_data_dir)  # 3 epochs
    reference = train(config, tmp_path / "a", progress=False)
    evaluate = train_mod.evaluate
    calls = {"evaluate": 0}

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls["evaluate"] += 1
        return evaluate(*args, **kwargs)

    signal_in_validation(monkeypatch, 3)
    monkeypatch.setattr(train_mod, "evaluate", counted)
    with pytest.raises(KeyboardInterrupt, match="SIGINT received before the final evaluation"):
        train(config, tmp_path / "b", progress=False)
    assert calls["evaluate"] == 0
    assert not (tmp_path / "b" / "results.json").exists()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["progress"]["done"]
    monkeypatch.undo()
    assert train(resume=tmp_path / "b", progress=False) == reference  # only evaluates
    assert_same_params(params(tmp_path / "a", "best.pt"), params(tmp_path / "b", "best.pt"))


def test_a_resume_from_the_start_checkpoint_drops_the_killed_session_s_events(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed inside the first epoch with no mid-epoch checkpoint (checkpoint_every=0, the
    # default), a run resumes from step 0: the events its first session logged must go, as
    # they do for a resume from any later step, not stay beside the resumed session's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    config = tiny_config(tiny_data_dir, max_steps=15)
    train(config, tmp_path / "a", progress=False)
    crash_at(monkeypatch, 8)  # after the flushes at steps 3 and 6
    with pytest.raises(Crash):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["progress"]["step"] == 0
    train(resume=tmp_path / "b", progress=False)

    def steps(run: Path) -> list[int]:
        events = EventAccumulator(str(run))
        events.Reload()
        assert metadata.SESSION_START_INFO_TAG in events.PluginTagToContent(metadata.PLUGIN_NAME)
        return [e.step for e in events.Scalars("train/loss")]

    assert steps(tmp_path / "b") == steps(tmp_path / "a") == [3, 6, 9, 10, 13, 15]


def test_a_run_killed_before_its_first_event_logs_its_settings_on_resume(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The events file opens at the first event: a run killed before it (at step 2, before the
    # first flush at step 3) has none, and its resume writes the settings that it never did.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        train(tiny_config(tiny_data_dir, max_steps=5), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert not list((tmp_path / "run").glob("events.out.tfevents*"))
    train(resume=tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    assert metadata.SESSION_START_INFO_TAG in events.PluginTagToContent(metadata.PLUGIN_NAME)


def test_a_start_stopped_before_its_first_checkpoint_can_be_started_again(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start stopped between writing config.json and its step-0 checkpoint (a grid's Ctrl-C
    # as its cells start, a kill -9) left config.json and history.json: the same command was
    # then refused ("already holds files; it is not a run that can be resumed"), and so was
    # --resume, for a folder in which nothing had been trained.
    config = tiny_config(tiny_data_dir, max_steps=2)

    def stopped(self: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod._Trainer, "save", stopped)
    created = tmp_path / "created"
    with pytest.raises(KeyboardInterrupt):
        train(config, created, progress=False)
    assert not created.exists()  # the folder it made goes with it, as for any failed start
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(KeyboardInterrupt):
        train(config, given, progress=False)
    # a kill -9 mid-write leaves the temporary file of the checkpoint, too
    (given / ".checkpoint.pt.k3j9.tmp").write_bytes(b"half")
    assert sorted(p.name for p in given.iterdir()) == [
        ".checkpoint.pt.k3j9.tmp", ".lock", "config.json", "history.json"]
    monkeypatch.undo()
    with pytest.raises(RunError, match="stopped before the first checkpoint.pt, so nothing was "
                                       "trained; run the command that started it again"):
        train(resume=given, progress=False)
    assert train(config, given, progress=False)["steps"] == 2
    assert not (given / ".checkpoint.pt.k3j9.tmp").exists()

    # a folder of one's own with a config.json in it is not such a start: still refused
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text("{}")
    with pytest.raises(RunError, match="already holds files"):
        train(config, own, progress=False)


def test_a_typo_in_a_resume_change_is_named_as_an_unknown_key() -> None:
    from vaeflow.runs import check_resume_changes

    typo = r"^unknown config key\(s\) 'max_minuts'; a resumed run may change device, "
    with pytest.raises(InputError, match=typo):
        check_resume_changes({"max_minuts": 10})
    with pytest.raises(InputError, match="^cannot change lr when resuming"):
        check_resume_changes({"lr": 0.1, "max_minutes": 10})
    check_resume_changes({"max_minutes": 10, "device": "cpu"})  # may change


def test_a_checkpoint_of_a_newer_vaeflow_is_not_to_be_overwritten(tmp_path: Path) -> None:
    """A run written by a newer vaeflow is not an older one's: the advice is to use that
    version, not --overwrite (which would delete the run)."""
    from vaeflow.runs import CHECKPOINT_FORMAT, check_checkpoint_format

    source = tmp_path / "checkpoint.pt"
    with pytest.raises(RunError, match="newer vaeflow") as err:
        check_checkpoint_format({"format": CHECKPOINT_FORMAT + 1}, source)
    assert "--overwrite" not in str(err.value)
    with pytest.raises(RunError, match="older vaeflow.*--overwrite"):
        check_checkpoint_format({}, source)  # format 1: older, afresh is the way
    check_checkpoint_format({"format": CHECKPOINT_FORMAT}, source)


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run``'s events as TensorBoard reads them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_a_resume_that_trains_nothing_keeps_the_run_s_events(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resuming a finished run trains and evaluates nothing: its TensorBoard figures must stay
    # as they were (before, the resume's purge marker at the final step made TensorBoard drop
    # the test figures and the last validation, and each such resume left an empty events
    # file). A resume that only evaluates (stopped before its final evaluation) ends with the
    # events of the run that was never stopped.
    config = tiny_config(tiny_data_dir)  # 3 epochs
    run = tmp_path / "a"
    train(config, run, progress=False)
    before = _scalars(run)
    assert {"test/nelbo", "test/nll_is", "valid/nelbo"} <= set(before)
    files = sorted(run.glob("events.out.tfevents*"))
    train(resume=run, progress=False)
    assert _scalars(run) == before
    assert sorted(run.glob("events.out.tfevents*")) == files

    signal_in_validation(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b", progress=False)
    monkeypatch.undo()
    train(resume=tmp_path / "b", progress=False)  # only evaluates
    assert _scalars(tmp_path / "b").keys() == before.keys()
    for tag, points in _scalars(tmp_path / "b").items():
        if tag != "train/sec_per_iter":
            assert [s for s, _ in points] == [s for s, _ in before[tag]], tag
            assert [v for _, v in points] == pytest.approx([v for _, v in before[tag]]), tag
