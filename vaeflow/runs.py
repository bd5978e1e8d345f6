"""The run directory as one API: its file names, how each file is written and read, and the
model a run trained. The training loop writes runs through it; ``vaeflow eval``, ``vaeflow
compare``, the comparison table and the plots read them through it, and nobody else parses
checkpoints or event files. Who may write a run directory (its lock, what a new run may take
over, what a fresh start clears) is :mod:`vaeflow.claim`'s.

A run directory holds:

- ``config.json``: the resolved :class:`~vaeflow.configs.TrainConfig`;
- ``checkpoint.pt``: everything needed to resume (model, optimizer, loader position, RNG states,
  progress), written atomically after every epoch and on a signal;
- ``best.pt``: the parameters with the best validation NELBO;
- ``history.json``: one record per epoch (step, seconds, train terms, validation NELBO);
- ``results.json``: the final test figures; ``timing.json``: wall-clock and provenance, per
  session;
- TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaeflow.atomic import atomic_save, atomic_write_json
from vaeflow.checks import InputError, resolve_device
from vaeflow.configs import TrainConfig
from vaeflow.flows import FLOWS
from vaeflow.model import build_model
from vaeflow.ode import ADAPTIVE_SOLVERS
from vaeflow.vae import VAE

__all__ = [
    "CHECKPOINT",
    "BEST",
    "CONFIG",
    "RESULTS",
    "TIMING",
    "EVENTS",
    "HISTORY",
    "CHECKPOINT_FORMAT",
    "RunError",
    "Run",
    "atomic_save",
    "atomic_write_json",
    "epochs_in",
    "find_runs",
    "load_checkpoint",
    "load_model",
    "load_state",
    "model_from_state",
    "model_state",
    "read_config",
    "solver_settings",
    "solver_state",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
RESULTS = "results.json"
TIMING = "timing.json"
HISTORY = "history.json"
EVENTS = "events.out.tfevents.*"  # TensorBoard's files (a glob pattern)
# Bumped when a checkpoint of an older vaeflow can no longer be resumed as it is.
CHECKPOINT_FORMAT = 3
# 3 (train.py's progress): a time stop's partial epoch, early stopping's own reference, epoch
# sums by rows; a format-2 checkpoint resumes as it was written
READABLE_FORMATS = (2, 3)
# What a resumed run may change: where and how long it runs, and whether it draws pictures
# (they draw under their own seed), not what it computes.
RESUMABLE = ("device", "data_dir", "max_steps", "max_epochs", "max_minutes", "pictures")


class RunError(InputError):
    """A run directory, or a file in it, that cannot be used (the message says which and why)."""


def _not_a_run(run_dir: str | os.PathLike[str]) -> RunError:
    """Why ``run_dir`` (no ``config.json`` in it) cannot be read as a run."""
    if not Path(run_dir).exists():
        return RunError(f"run directory {run_dir} does not exist")
    return RunError(f"{run_dir} is not a vaeflow run directory: no {CONFIG} in it")


def read_config(run_dir: str | os.PathLike[str], *, any_flow: bool = False) -> TrainConfig:
    """The config of the run in ``run_dir`` (its ``config.json``).

    A run of a flow of one's own needs that flow registered (:func:`vaeflow.flows.register_flow`)
    in this process: its model is built from the class. ``any_flow=True`` reads it anyway, for
    what needs no model (the comparison table, the summary, the plots): every other setting is
    checked, the flow's hyperparameters are kept unchecked, and building its model still fails.
    """
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise _not_a_run(run_dir)
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is damaged (not valid JSON: {err})") from err
    if not isinstance(values, dict):
        raise RunError(f"{path} is damaged (not a JSON object)")
    flow = values.get("flow")
    unregistered = isinstance(flow, str) and flow not in FLOWS
    if unregistered and not any_flow:
        where = str(run_dir)
        raise RunError(
            f"{path}: the run's flow {flow!r} is not registered in this process (registered "
            f"flows: {', '.join(FLOWS)}); a flow of one's own is used from a Python script that "
            "registers it with vaeflow.flows.register_flow and then calls the Python API or "
            f"vaeflow.cli.main, e.g. vaeflow.cli.main({['eval', where]!r}) or "
            f"vaeflow.cli.main({['train', '--resume', where]!r})"
        )
    if not unregistered:
        return _config_from(values, path)
    # TrainConfig checks a flow by building it, which needs its class: check the rest with the
    # identity flow standing in, then put the run's own flow settings back.
    flow_kwargs, test_solver = values.get("flow_kwargs", {}), values.get("test_solver")
    if not isinstance(flow_kwargs, dict) or not isinstance(test_solver, dict | None):
        raise RunError(f"{path} does not hold a valid config: flow_kwargs and test_solver must "
                       "be tables")
    config = _config_from({**values, "flow": "none", "flow_kwargs": {}, "test_solver": None},
                          path)
    config.flow, config.flow_kwargs, config.test_solver = flow, flow_kwargs, test_solver
    return config


def _config_from(values: Mapping[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(values)
    except ValueError as err:
        raise RunError(f"{path} does not hold a valid config: {err}") from err


def _read_json(path: Path, expect: type = dict) -> Any:
    """The JSON value in ``path`` (an ``expect``: a dict or a list), ``None`` where there is no
    such file; a sentence naming the file where it is damaged."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is damaged (not valid JSON: {err})") from err
    if not isinstance(value, expect):
        what = "a JSON object" if expect is dict else "a JSON list"
        raise RunError(f"{path} is damaged (not {what})")
    return value


def _is_whole_archive(path: Path) -> bool:
    """Whether ``path`` reads as a whole zip archive (torch's file format), every member's
    checksum right; the file system's own failure to read it propagates."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, EOFError):
        return False


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", *, mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` with a sentence, not a traceback, for a file that
    is missing, truncated or not a checkpoint; ``mmap`` maps the file rather than reading it
    (for a glance at a small part of a large checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - random bytes raise anything from the unpickler
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            raise  # the machine's failure: the file may be whole
        # torch's zip reader fails on a cut file with an OSError too (EINVAL: it seeks before
        # the start of a file cut below 64 KiB), so the file itself says whose failure it is
        if isinstance(err, OSError) and _is_whole_archive(path):
            raise  # the file system's failure (permissions, I/O), not the file's content
        others = [p.name for p in (path.parent / BEST, path.parent / CHECKPOINT)
                  if p.is_file() and p != path]
        also = f"; the run also holds {', '.join(others)}" if others else ""
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        if "Weights only load failed" in detail:
            # torch's text goes on to advise weights_only=False: wrong for a damaged file, and
            # unsafe for a foreign one; vaeflow writes only tensors and plain values
            detail = "it does not read as the tensors and plain values that vaeflow writes"
        raise RunError(
            f"{path} is damaged or not a vaeflow checkpoint ({type(err).__name__}: "
            f"{detail}){also}"
        ) from err


def load_state(model: torch.nn.Module, state: Mapping[str, Any], source: str | Path) -> None:
    """``model.load_state_dict(state)`` with a message that names the file and the parameters
    that do not match (an older vaeflow, or another model's file)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()
        detail = " ".join(line.strip() for line in first[1:3])
        raise RunError(
            f"{source} does not fit the model of its run's config.json (written by another "
            f"vaeflow version, or for another model): {detail}"
        ) from err


def check_checkpoint_format(ckpt: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a checkpoint written by a vaeflow whose checkpoints this one cannot resume."""
    found = ckpt.get("format", 1) if isinstance(ckpt, Mapping) else None
    if isinstance(found, int) and found > CHECKPOINT_FORMAT:
        # Not "start afresh with --overwrite": that would delete a run that the newer vaeflow
        # which wrote it resumes and evaluates.
        raise RunError(
            f"{source} was written by a newer vaeflow (checkpoint format {found}, this version "
            f"reads up to {CHECKPOINT_FORMAT}); resume or evaluate it with that version "
            "(update vaeflow)"
        )
    if found not in READABLE_FORMATS:
        raise RunError(
            f"{source} was written by an older vaeflow (checkpoint format {found}, this version "
            f"reads {' and '.join(map(str, READABLE_FORMATS))}: the IAF, FFJORD end-time and "
            "256-way decoder models changed to match the papers' code). Start the run afresh "
            "with --overwrite."
        )


def load_model(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    device: torch.device | str = "cpu",
    config: TrainConfig | None = None,
) -> tuple[VAE, TrainConfig]:
    """The model of a run with the parameters of ``best.pt`` (``"best"``) or of the last
    ``checkpoint.pt`` (``"last"``), on ``device``, and the run's config (``config``, when the
    caller has read it already). The model is in eval mode, as a loaded model is mostly used to
    measure and draw: FFJORD then uses the exact trace, as the test figures do (call
    ``model.train()`` to train it on, with the Hutchinson estimate). ``device`` is read as
    ``--device`` is (``"auto"``, ``"cpu"``, ``"cuda:1"``): one this machine has not is refused
    by name."""
    _check_checkpoint_name(checkpoint)
    # Before torch.load: given "cuda" without CUDA, or "cpu:0", it fails on every storage, and
    # the file would be called damaged.
    device = resolve_device(str(device))
    if config is None:
        config = read_config(run_dir)
    path, state = model_state(run_dir, checkpoint, device)
    return model_from_state(config, state, path, device), config


def model_state(
    run_dir: str | os.PathLike[str], checkpoint: str, device: torch.device | str = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """The file of a run's best (``"best"``) or last (``"last"``) model parameters and its
    ``state_dict``, loaded onto ``device``: :func:`load_model`'s reading, apart from its
    building, so that under torchrun rank 0 reads and the other ranks build."""
    _check_checkpoint_name(checkpoint)
    directory = Path(run_dir)
    path = directory / (BEST if checkpoint == "best" else CHECKPOINT)
    if not path.is_file():
        raise RunError(f"{directory} holds no {path.name} to evaluate")
    state = load_checkpoint(path, device)
    if checkpoint == "last":
        check_checkpoint_format(state, path)
        state = state["model"]
    return path, state


def _check_checkpoint_name(checkpoint: str) -> None:
    if checkpoint not in ("best", "last"):
        raise InputError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")


def model_from_state(
    config: TrainConfig, state: Mapping[str, Any], source: str | Path,
    device: torch.device | str,
) -> VAE:
    """``config``'s model on ``device`` with the parameters ``state`` (read from ``source``,
    which a mismatch names), in eval mode."""
    with torch.device(device):
        model = build_model(config)
    load_state(model, state, source)
    return model.eval()


def check_resume_changes(changes: Mapping[str, Any]) -> None:
    """Refuse a change that would make a resumed run another run; a key that is no config
    key at all (a typo) is named as unknown, not as a change that would make another run."""
    unknown = sorted(set(changes) - set(TrainConfig.keys()))
    if unknown:
        raise RunError(
            f"unknown config key(s) {', '.join(map(repr, unknown))}; a resumed run may change "
            f"{', '.join(RESUMABLE)}"
        )
    refused = sorted(set(changes) - set(RESUMABLE))
    if refused:
        raise RunError(
            f"cannot change {', '.join(refused)} when resuming: that would make it another run "
            f"(a resumed run may change only {', '.join(RESUMABLE)}); start a new run with "
            "--out instead"
        )


def check_same_run(config: TrainConfig, ckpt: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a checkpoint whose run is not the one its folder's ``config.json`` describes."""
    saved = ckpt.get("config")
    if not isinstance(saved, Mapping):
        return
    mine = config.to_dict()
    differ = sorted(k for k in mine if k not in RESUMABLE and saved.get(k, mine[k]) != mine[k])
    if differ:
        raise RunError(
            f"{source} and {Path(source).parent / CONFIG} do not belong together: they differ in "
            f"{', '.join(differ)}"
        )


@dataclass(frozen=True)
class Run:
    """A run directory, read lazily: ``Run(path).config``, ``.results``, ``.history``."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> TrainConfig:
        """The run's config, also for a flow this process has not registered (``read_config``'s
        ``any_flow``): a :class:`Run` is read, its model is built by :func:`load_model`."""
        return read_config(self.path, any_flow=True)

    @property
    def results(self) -> dict[str, Any] | None:
        """``results.json`` (the final test figures), or ``None`` while unfinished or when the
        final evaluation failed (see :attr:`failure`)."""
        results = _read_json(self.path / RESULTS)
        if results is None or results.get("status") == "failed":
            return None
        return results

    @property
    def failure(self) -> str | None:
        """Why the final evaluation failed (a non-finite figure), from ``results.json``."""
        results = _read_json(self.path / RESULTS)
        return results.get("error") if results and results.get("status") == "failed" else None

    @property
    def is_run(self) -> bool:
        """Whether the folder is a run directory (it holds ``config.json``): a run that failed
        before writing it has nothing else to read."""
        return (self.path / CONFIG).is_file()

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    @property
    def timing(self) -> dict[str, Any] | None:
        return _read_json(self.path / TIMING)

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished epoch (``epoch``, ``step``, ``seconds``, ``valid_nelbo``,
        ``train_<term>``...), from ``history.json``; runs of an older vaeflow keep theirs
        inside ``checkpoint.pt``, which is read then."""
        if not self.is_run:
            raise _not_a_run(self.path)
        history = _read_json(self.path / HISTORY, list)
        if history is not None:
            return history
        return list(self._progress("history") or [])

    @property
    def progress_seconds(self) -> float | None:
        """The wall-clock seconds of training and validation in ``checkpoint.pt`` (summed over
        the sessions; later than the last epoch's record where a signal or
        ``checkpoint_every`` saved inside an epoch); None where the run has no checkpoint.

        Raises:
            RunError: ``checkpoint.pt`` is damaged, or holds no such figure (not vaeflow's).
        """
        seconds = self._progress("seconds")
        return None if seconds is None else float(seconds)

    def _progress(self, key: str) -> Any:
        """``key`` of the training progress in ``checkpoint.pt``, from a memory map of it (a
        glance, not a read of the tensors); None where the run has no checkpoint."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        try:
            return load_checkpoint(path, mmap=True)["progress"][key]
        except (KeyError, TypeError) as err:
            raise RunError(f"{path} is damaged or not a vaeflow checkpoint (it holds no "
                           f"training {key}: {type(err).__name__}: {err})") from err

    def write_history(self, history: list[dict[str, Any]]) -> None:
        atomic_write_json(history, self.path / HISTORY)

    def write_results(self, results: Mapping[str, Any]) -> None:
        atomic_write_json(dict(results), self.path / RESULTS)

    def write_timing(self, timing: Mapping[str, Any]) -> None:
        atomic_write_json(dict(timing), self.path / TIMING)

    def write_config(self, config: TrainConfig) -> None:
        """Write ``config.json``. A relative ``data_dir`` is saved as the absolute path it names
        from the working folder of this process: a later command run from another folder
        (``vaeflow eval``, ``--resume``, the table's pictures) reads the same data, where the
        relative path would name another folder (and start a download into it)."""
        saved = config.to_dict()
        if saved.get("data_dir") and not Path(saved["data_dir"]).expanduser().is_absolute():
            saved["data_dir"] = os.path.abspath(saved["data_dir"])
        atomic_write_json(saved, self.path / CONFIG)


def epochs_in(history: Sequence[Mapping[str, Any]]) -> int:
    """The epochs that a run's ``history`` records: one record each, but a time stop's partial
    epoch, resumed with more time, is recorded twice (inside it, and at its end)."""
    return len({h.get("epoch") for h in history})


def find_runs(root: str | os.PathLike[str]) -> list[Run]:
    """Every run directory (one holding ``config.json``) at or below ``root``, sorted."""
    root = Path(root)
    return [Run(p.parent) for p in sorted(root.rglob(CONFIG))]


def solver_state(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The solver settings saved with the model (one entry per continuous flow)."""
    return [
        dict(v) for k, v in model.state_dict().items()
        if k.endswith("_extra_state") and isinstance(v, dict) and "atol" in v
    ]


def solver_settings(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The solver settings that the model's solves use, as a run's figures record them: those
    of :func:`solver_state` less ``atol`` and ``rtol`` for a fixed-step method, which keeps
    them for a later adaptive solve but does not use them (a record of "rk4, atol 1e-05"
    would say that a tolerance shaped the figure)."""
    return [
        s if s["method"] in ADAPTIVE_SOLVERS
        else {k: v for k, v in s.items() if k not in ("atol", "rtol")}
        for s in solver_state(model)
    ]
