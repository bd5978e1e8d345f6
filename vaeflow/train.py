"""The training loop of a flow VAE: the papers' protocol, checkpoints, exact resume, and the
one place that decides why a run stops.

This module is over 500 lines because the loop's parts (the step, the epoch, validation, the
stop rules, checkpoint and resume, signals, NaN recovery, the rank-0 and agreement points of a
data-parallel run) share one progress state and are read
best together; what is not the loop lives elsewhere (configs, runs, evaluate, plots, progress).

A run is described by a :class:`TrainConfig` (a dataclass, saved as ``config.json`` in the run
directory and inside every checkpoint). :func:`train` fits the VAE:

- Adamax (lr 5e-4, eps 1e-7), batch 100, KL warm-up ``beta = min(epoch / warmup_epochs, 1)``
  with epochs counted from 1, as in the Sylvester code;
- a validation NELBO after every epoch, early stopping after ``early_stopping_epochs`` epochs
  without improvement (not counted during warm-up), the best model kept in ``best.pt``;
- the final evaluation of the best model (test NELBO with the exact trace, importance-sampled
  log-likelihood) written to ``results.json``, and wall-clock figures to ``timing.json``.

The run directory holds ``config.json``, ``checkpoint.pt`` (model, optimizer, loader position,
every RNG state, early-stopping state; written atomically at the end of every epoch, every
``checkpoint_every`` steps, and when SIGINT/SIGTERM arrives), ``best.pt``, TensorBoard events,
``results.json`` and ``timing.json``. ``train(resume=run_dir)`` continues a killed run and gives
bit-identical parameters and results to an uninterrupted run on the same device.

Under ``torchrun`` the same loop trains one model data-parallel (DDP); :mod:`vaeflow.distributed`
holds the rules (batch sharding, noise, agreed stop decisions, rank 0 owning the run directory)
and this module only calls them, so a single process runs exactly the code it always ran.

Inside an epoch the loop never synchronises with the GPU: the loss terms are accumulated on the
device and read back (one transfer) every ``log_every`` steps, which is also when a NaN loss is
noticed. A NaN loss or a solver failure stops the run, keeps the last good checkpoint, and says
what happened; with ``nan_retries > 0`` the run instead restarts from the last good checkpoint
with the flow's solver tolerances divided by 10 (the tolerances are saved with the model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from vaeflow import distributed
from vaeflow.checks import input_errors, resolve_device
from vaeflow.claim import (
    RunLock,
    check_new_run_dir,
    clear_run_files,
    remove_partial_writes,
    stopped_before_training,
)
from vaeflow.configs import TrainConfig
from vaeflow.data import DeviceLoader, get_spec
from vaeflow.distributed import SINGLE, World
from vaeflow.evaluate import (
    dataset_nelbo,
    ensure_machine_data,
    evaluate,
    evaluate_run,
    evaluation_solve,
    failed_figures,
    run_dataset,
    run_pictures,
    smoke_eval_counts,
    subset,
    test_solve_changes,
)
from vaeflow.graphs import GraphedStep, capture, graph_unavailable
from vaeflow.hparams import log_finished, log_settings
from vaeflow.model import build_model, count_parameters
from vaeflow.ode import STATIC_SOLVERS, SolverError
from vaeflow.plots import write_run_pictures
from vaeflow.progress import TrainingBar
from vaeflow.provenance import git_commit
from vaeflow.rng import fork_rng, rng_state, set_rng_state
from vaeflow.runs import (
    BEST,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    EVENTS,
    RESULTS,
    Run,
    RunError,
    atomic_save,
    check_checkpoint_format,
    check_resume_changes,
    check_same_run,
    load_checkpoint,
    load_state,
    read_config,
    solver_state,
)
from vaeflow.vae import VAE

__all__ = [
    "TrainConfig",
    "TrainingError",
    "build_model",
    "count_parameters",
    "train",
    "train_step",
    "evaluate",
    "evaluate_run",
    "load_run",
    "resolve_device",
]

# Kept importable from here for code written against earlier versions.
load_run = read_config

logger = logging.getLogger(__name__)

# Training figures of a step rather than of its data points: their means are per step.
_PER_STEP = frozenset({"grad_norm", "nfe_forward", "nfe_backward"})
_ROWS = "rows"  # the key of the data points summed in an epoch's (and the run's) sums


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, solver failure); the last good checkpoint is kept."""


def make_optimizer(
    config: TrainConfig, model: VAE, capturable: bool = False
) -> torch.optim.Optimizer:
    """Adamax or Adam at the config's learning rate and eps (``capturable`` inside a CUDA
    graph: its step counters live on the device)."""
    cls = torch.optim.Adamax if config.optimizer == "adamax" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, eps=config.adam_eps, capturable=capturable)


def beta_at(epoch: int, warmup_epochs: int) -> float:
    """KL weight of (1-based) ``epoch``: linear warm-up to 1 over ``warmup_epochs``."""
    return 1.0 if warmup_epochs == 0 else min(epoch / warmup_epochs, 1.0)


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    beta: float | Tensor,
    max_grad_norm: float | None = None,
    regularization: Mapping[str, float] | None = None,
    *,
    forward: Callable[[Tensor, float | Tensor], dict[str, Tensor]] | None = None,
    weight: float = 1.0,
) -> dict[str, Tensor]:
    """One optimisation step on the batch ``x [B, C, H, W]``; no host synchronisation.

    Returns the batch-mean terms of :meth:`VAE.loss` (``loss``, ``recon``, ``kl``, ``logdet``,
    ``nelbo``, ...) and ``grad_norm`` (before clipping), as detached scalar tensors on the
    device. With ``max_grad_norm`` the gradients are clipped to that global norm.
    ``regularization`` maps names of ``model.flow.last_regularization`` (FFJORD with
    ``regularize=True``) to weights: their batch means, weighted, join the loss, and each is
    returned as ``reg_<name>``. Under torchrun ``forward`` is the DDP module computing
    ``model.loss`` and ``weight`` this rank's share of the global batch: the loss and the
    returned terms are scaled by it (see :meth:`vaeflow.distributed.World.shard`).
    """
    optimizer.zero_grad(set_to_none=True)
    terms = (forward or model.loss)(x, beta)
    for name, factor in (regularization or {}).items():
        value = model.flow.last_regularization[name].mean()
        terms[f"reg_{name}"] = value
        terms["loss"] = terms["loss"] + factor * value
    if weight != 1.0:
        terms = {k: v * weight if v.dim() == 0 else v for k, v in terms.items()}
    terms["loss"].backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = _grad_norm(params)
    optimizer.step()
    out = {k: v.detach() for k, v in terms.items() if v.dim() == 0}
    out["grad_norm"] = norm.detach()
    return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Training state that is not in the model or optimizer; saved in every checkpoint."""

    epoch: int = 1  # the epoch under way (1-based)
    step: int = 0  # optimizer steps done in all
    best_valid: float = math.inf
    best_epoch: int = 0
    # early stopping's reference: the best validation of a whole epoch (best_valid also counts
    # a time stop's partial epoch, which a run resumed with more time must not compare with)
    whole_best: float = math.inf
    bad_epochs: int = 0
    retries: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # of the epoch under way
    total_sums: dict[str, float] = field(default_factory=dict)  # of the whole run
    epoch_steps: int = 0
    seconds: float = 0.0  # wall-clock spent training and validating, over all sessions
    done: bool = False
    stop_reason: str = ""


class _Signals:
    """SIGINT/SIGTERM while training: the first sets a flag that the loop checks between
    steps (it then writes a checkpoint and stops); a second one, or the first during the final
    evaluation (``immediate``), interrupts at once. Nothing is lost either way: the evaluation
    starts from a saved, done checkpoint, which a resume only evaluates again. Under torchrun
    (``deferred``) a signal is ``pending`` until the ranks pool theirs at the next read-back,
    and a second one within 2 s is the same one (a terminal's Ctrl-C reaches every worker, and
    torchrun forwards it again)."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self.pending: int | None = None
        self._first = 0.0  # when the first signal came (monotonic seconds)
        self.received: int | None = None
        self.immediate = False
        self.message = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.immediate:
            raise KeyboardInterrupt(f"{name} received during {self.message}")
        if self.pending is not None and time.monotonic() - self._first < 2.0:
            return
        if self.received is not None or self.pending is not None:
            raise KeyboardInterrupt(
                f"a second signal ({name}): stopped at once; the last checkpoint is kept"
            )
        if self.deferred:
            self.pending, self._first = signum, time.monotonic()
        else:
            self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Trainer:
    def __init__(
        self, config: TrainConfig, run_dir: Path, device: torch.device, progress_bar: bool,
        world: World = SINGLE,
    ) -> None:
        self.config = config
        self.spec = get_spec(config.dataset)  # for its unit: Frey Faces is read in bits/dim
        self.run_dir = run_dir
        self.world = world
        self.progress_bar = progress_bar and world.is_main
        self.device = device  # this rank's: World.device of config.device
        self.data = run_dataset(config, self.device)
        with input_errors():
            torch.manual_seed(config.seed)
            self.model = build_model(config, self.data).to(self.device)
        world.seed(config.seed)
        self.forward: Any = None  # the DDP module under torchrun (see replicate)
        self.use_graph = False
        if config.cuda_graph:
            reason = graph_unavailable(self.model, self.device, world.size)
            if reason is not None and world.is_main:
                logger.warning("cuda_graph: %s; training without a CUDA graph", reason)
            self.use_graph = reason is None
        self.graphed: GraphedStep | None = None  # captured at the first full batch
        self.optimizer = make_optimizer(config, self.model, capturable=self.use_graph)
        self.loader: DeviceLoader = self.data.loader("train", config.batch_size, seed=config.seed)
        self.state = _Progress()
        self.writer: Any = None  # opened at this session's first event (see open_writer)
        self._purge_step: int | None = None
        self.signals: _Signals | None = None
        # the training bar of the loop under way (`run` opens it; none shows before)
        self.bar = TrainingBar(False, config, 0, 0.0, 1)
        self.saved_step = 0  # of the last checkpoint, for a rank that loses the others

    def _graphed(self, x: Tensor, beta: float) -> dict[str, Tensor]:
        if self.graphed is None:
            cfg = self.config

            def step(xs: Tensor, b: float | Tensor) -> dict[str, Tensor]:
                return train_step(
                    self.model, self.optimizer, xs, b, cfg.max_grad_norm, cfg.regularization()
                )

            self.graphed, why = capture(step, self.model, self.optimizer, x)
            if self.graphed is None:  # one process: graphs are refused under torchrun
                logger.warning("cuda_graph: capturing the training step failed (%s); "
                               "training without a CUDA graph", why)
                self.use_graph = False
                return step(x, beta)  # the same step, eagerly
        return self.graphed(x, beta)

    def replicate(self) -> None:
        """Under torchrun: wrap the model in DDP (a collective: after every rank is set up)."""
        self.forward = self.world.replicate(self.model, self.data.train[:2])

    # ---- checkpoints

    def checkpoint(self, rng: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The run's state; ``rng`` holds every rank's RNG states (the loader, model and
        optimizer are the same on every rank)."""
        ckpt = {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng[0],
            "progress": asdict(self.state),
            "format": CHECKPOINT_FORMAT,
            "world_size": self.world.size,
        }
        if self.world.distributed:
            ckpt["rng_ranks"] = rng
        return ckpt

    def save(self) -> None:
        rng = self.world.gather(rng_state(self.device))  # a collective: every rank saves
        if rng is not None:
            atomic_save(self.checkpoint(rng), self.run_dir / CHECKPOINT)
        self.saved_step = self.state.step

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        path = self.run_dir / CHECKPOINT
        check_checkpoint_format(ckpt, path)
        check_same_run(self.config, ckpt, path)
        distributed.check_world_size(ckpt.get("world_size", 1), self.world, path)
        load_state(self.model, ckpt["model"], path)  # the solver tolerances come with it
        # The checkpoint gives the optimizer's state, not this session's policy: a run whose
        # step was captured (capturable=True, on a GPU) may resume on a CPU, where a capturable
        # Adamax refuses to step, or on a GPU that captures where the saved run could not.
        # Its loading casts the step counters for the policy of this optimizer, kept here.
        optimizer = dict(ckpt["optimizer"])
        capturable = [g["capturable"] for g in self.optimizer.param_groups]
        optimizer["param_groups"] = [
            {**g, "capturable": c} if "capturable" in g else g
            for g, c in zip(optimizer["param_groups"], capturable, strict=False)
        ]
        self.optimizer.load_state_dict(optimizer)  # new state tensors: capture again
        self.graphed = None
        self.loader.load_state_dict(ckpt["loader"])
        rng = ckpt["rng_ranks"][self.world.rank] if self.world.distributed else ckpt["rng"]
        set_rng_state(rng, self.device)
        progress = dict(ckpt["progress"])
        if ckpt.get("format", 1) < 3:  # checkpoint format 2: no partial epochs, no rows
            progress["whole_best"] = progress["best_valid"]
        self.state = _Progress(**progress)
        sums, steps = self.state.epoch_sums, self.state.epoch_steps
        if sums and _ROWS not in sums:
            # Saved inside an epoch by a vaeflow that summed batch means. Until the epoch's
            # short last batch every batch was whole, so the sums by rows are these times it;
            # saved at its last step, the short batch is in them and its weight is lost: that
            # epoch's means stay per step.
            size = self.config.batch_size if self.loader.in_epoch else 1
            self.state.epoch_sums = {n: v if n in _PER_STEP else v * size for n, v in sums.items()}
            self.state.epoch_sums[_ROWS] = float(steps * size)
        self.saved_step = self.state.step

    def load(self, name: str) -> Any:
        """A file of the run directory, read by rank 0 and sent to every rank."""
        path = self.run_dir / name
        return self.world.from_main(
            lambda: load_checkpoint(path, self.world.map_location(self.device))
        )

    def load_checkpoint(self) -> dict[str, Any]:
        return self.load(CHECKPOINT)

    # ---- logging

    def open_writer(self) -> None:
        """Log this session's events to TensorBoard (rank 0), from the state's step on. The
        events file opens at the first event, so that a resume that trains and evaluates
        nothing (a finished run) leaves the run's events as they were; a run that has no
        events file yet (new, or killed before its first event) logs its settings first."""
        if self.writer is not None:  # a retry restored an earlier checkpoint in this session
            self.writer.close()
            self.writer = None
        if self.world.is_main:
            # TensorBoard drops the earlier events from this step on: those a killed session
            # (or the steps before a retry) logged after the checkpoint. Not from the
            # checkpoint's own step, whose steps' means and validation are the checkpoint's
            # (a kill between a validation's log and its save logs it again at that step,
            # with the same figure: same model, same seed).
            self._purge_step = self.state.step + 1

    def _events(self) -> Any:
        """The session's ``SummaryWriter`` (None on other ranks), opened at its first use."""
        if self.writer is None and self._purge_step is not None:
            from torch.utils.tensorboard import SummaryWriter

            fresh = not any(self.run_dir.glob(EVENTS))  # (the writer makes one at once)
            self.writer = SummaryWriter(str(self.run_dir), purge_step=self._purge_step)
            if fresh:
                log_settings(self.writer, self.config)
        return self.writer

    # Per-datum figures that a bits/dim data set (Frey Faces) also gets in its unit.
    _IN_UNIT = ("nelbo", "nll_is")

    def log_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        """``prefix/name`` scalars at ``step``; on a bits/dim data set, the NELBO and NLL are
        also written as ``prefix/name_bpd``, the unit its results are read in."""
        writer = self._events()
        if writer is None:
            return
        values = dict(values)
        if self.spec.unit != "nats":
            values.update({f"{n}_bpd": self.spec.in_unit(values[n])
                           for n in self._IN_UNIT if n in values})
        for name, value in values.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)

    def log_images(self, epoch: int) -> None:
        """Sample and reconstruction grids to TensorBoard and, with the learning curve, as PNG
        files in the run directory (rank 0's work); none when the config's ``pictures`` is
        False."""
        if not self.world.is_main or not self.config.pictures:
            return
        grids = run_pictures(self.model, self.data, self.config)
        writer = self._events()
        if writer is not None:
            writer.add_image("samples", grids[0], epoch)
            writer.add_image("reconstructions", grids[1], epoch)
        write_run_pictures(self.run_dir, grids)

    # ---- the loop

    def run(self, signals: _Signals) -> None:
        cfg, st = self.config, self.state
        self.bar = TrainingBar(self.progress_bar, cfg, st.step, st.seconds, len(self.loader))
        try:
            while not st.done:
                self.run_epoch(signals)
                if signals.received is not None:
                    return
        finally:
            self.bar.close()

    def _stop(self, reason: str) -> None:
        self.state.done = True
        self.state.stop_reason = reason

    def _limit_reached(self, epochs_done: int) -> str | None:
        """Why the run stops after ``epochs_done`` whole epochs (None: it goes on)."""
        cfg, st = self.config, self.state
        if st.bad_epochs >= cfg.early_stopping_epochs > 0:
            return f"early stopping: no validation improvement for {st.bad_epochs} epochs"
        if epochs_done >= cfg.max_epochs:
            return f"max_epochs={cfg.max_epochs} reached"
        if cfg.max_minutes is not None and st.seconds >= 60 * cfg.max_minutes:
            return f"time budget of {cfg.max_minutes} minutes used"
        if cfg.max_steps is not None and st.step >= cfg.max_steps:
            return f"max_steps={cfg.max_steps} reached"
        return None

    def epochs_trained(self) -> tuple[int, bool]:
        """The epochs that a finished run trained (validated), and whether the last of them is
        the partial epoch of a time stop, still under way (a --max-steps stop validates none)."""
        st = self.state
        last = st.history[-1] if st.history else {}
        partial = bool(last.get("partial")) and last["epoch"] == st.epoch
        return st.epoch - 1 + partial, partial

    def check_budget(self, changed: Collection[str]) -> None:
        """Refuse to resume an unfinished run with a step, epoch or time budget (among the keys
        ``changed`` on this resume) that it has already passed: it would stop after one more
        step (or epoch) and say that budget was reached at a count it had long passed. A
        finished run is refused a budget below what it trained: nothing would change but its
        config.json, which would then no longer describe it. The run's own budgets are not
        checked: a finished run stopped by its time budget has trained a little past it, and an
        unfinished one at its own budget (saved at the step the budget ran out) stops at once,
        as it did when it ran (:meth:`_budget_stop`)."""
        cfg, st = self.config, self.state
        if st.done:
            below = []
            if "max_steps" in changed and cfg.max_steps is not None and cfg.max_steps < st.step:
                below.append(f"max_steps={cfg.max_steps} (it trained {st.step} steps)")
            epochs, partial = self.epochs_trained()
            if "max_epochs" in changed and cfg.max_epochs < epochs:
                last = ", the last in part" if partial else ""
                below.append(f"max_epochs={cfg.max_epochs} (it trained {epochs} epochs{last})")
            if "max_minutes" in changed and cfg.max_minutes is not None and (
                60 * cfg.max_minutes < st.seconds
            ):
                below.append(f"max_minutes={cfg.max_minutes} (it trained {_minutes(st.seconds)})")
            if below:
                raise RunError(
                    f"cannot resume {self.run_dir} with {' and '.join(below)}: the run has "
                    f"finished ({st.stop_reason}), and a smaller budget changes nothing but "
                    f"its config; `vaeflow eval {self.run_dir}` measures it again, a larger "
                    "budget trains it on"
                )
            return
        passed = []
        if "max_steps" in changed and cfg.max_steps is not None and cfg.max_steps <= st.step:
            passed.append(f"max_steps={cfg.max_steps} (it is at step {st.step})")
        if "max_epochs" in changed and cfg.max_epochs < st.epoch:
            passed.append(f"max_epochs={cfg.max_epochs} (it is in epoch {st.epoch})")
        if "max_minutes" in changed and cfg.max_minutes is not None and (
            60 * cfg.max_minutes <= st.seconds
        ):
            passed.append(f"max_minutes={cfg.max_minutes} (it has trained {_minutes(st.seconds)})")
        if passed:
            raise RunError(
                f"cannot resume {self.run_dir} with {' and '.join(passed)}: the run has passed "
                "that budget; give a larger one, or resume without it to keep the run's own"
            )

    def reopen(self) -> None:
        """A finished run resumed with a larger budget (``max_epochs``, ``max_steps``,
        ``max_minutes``) trains on from its final checkpoint; its test figures, now those of a
        model that will change, are removed and computed again at the end. A run that stopped
        early, or whose budget is still spent, stays finished (a resume that finds its
        results.json trains and evaluates nothing; one that finds none evaluates it)."""
        st = self.state
        if not st.done:  # stopped by a NaN or a failed solve: it trains on, no longer failed
            if self.world.is_main and Run(self.run_dir).failure is not None:
                (self.run_dir / RESULTS).unlink()
            return
        # A finish leaves as the epoch under way the one after the last whole epoch (a time
        # stop inside an epoch: that epoch, whose rest a larger budget trains).
        if self._limit_reached(st.epoch - 1) is not None:
            return
        logger.info("%s had stopped (%s); its new budget lets it train on, and its test "
                    "figures are computed again at the end", self.run_dir, st.stop_reason)
        st.done, st.stop_reason = False, ""
        if self.world.is_main:
            (self.run_dir / RESULTS).unlink(missing_ok=True)
        self.save()  # not done any more: a kill from now on resumes training, not evaluation

    def run_epoch(self, signals: _Signals) -> None:
        cfg, st = self.config, self.state
        beta = beta_at(st.epoch, cfg.warmup_epochs)
        sums: dict[str, Tensor] = {}
        window: list[dict[str, Tensor]] = []
        rows: list[int] = []  # each step's batch rows (all ranks'), to weight its means
        nfe: list[tuple[int, int]] = []
        tick = time.perf_counter()
        self.model.train()
        if st.epoch_steps > 0 and self._budget_stop({}):
            return  # saved at the step where the budget ran out (a signal, or a kill after it)
        if st.epoch_steps > 0 and not self.loader.in_epoch:
            # killed between the epoch's last step (checkpointed) and its validation
            self.end_of_epoch()
            return
        for batch in self.loader:
            x, weight = self.world.shard(batch)
            if self.use_graph and len(x) == cfg.batch_size:  # a short last batch runs eagerly
                out = self._graphed(x, beta)
            else:
                out = train_step(
                    self.model, self.optimizer, x, beta, cfg.max_grad_norm, cfg.regularization(),
                    forward=self.forward, weight=weight,
                )
            st.step += 1
            st.epoch_steps += 1
            self.bar.step(st.step)  # host-side counting only: no device read
            window.append(out)
            rows.append(len(batch))
            stats = self.model.flow.statistics()  # plain ints: no device read
            if "nfe_forward" in stats:
                nfe.append((stats["nfe_forward"], stats.get("nfe_backward", 0)))
            hit_max = cfg.max_steps is not None and st.step >= cfg.max_steps
            interrupted = signals.received is not None
            flush = len(window) >= cfg.log_every or hit_max or interrupted
            ckpt_due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
            if flush or ckpt_due or not self.loader.in_epoch:
                now = time.perf_counter()
                st.seconds += now - tick
                self._flush(window, rows, nfe, sums, beta, (now - tick) / max(len(window), 1))
                tick = now
                window, rows, nfe = [], [], []
                interrupted = signals.received is not None  # under torchrun: agreed just now
            if interrupted or ckpt_due:
                self._fold(sums)
                self.save()
                sums = {}
            if interrupted or self._budget_stop(sums):
                return
        self._fold(sums)
        self.end_of_epoch()

    def _budget_stop(self, sums: Mapping[str, Tensor]) -> bool:
        """Stop if the step or the time budget has run out at this step inside an epoch: the
        final evaluation follows max_steps (a smoke-run limit), a validation of the partial
        epoch the time budget. At an epoch's last step both leave the stop to
        :meth:`end_of_epoch`, so that a whole epoch is always validated and counted. True if it
        stopped.

        The loop asks after every step; a resume asks first, so that a run saved at that step
        (by a signal, or by ``checkpoint_every`` before a kill in the validation) stops there
        as it did when it ran, instead of training a step past its budget."""
        cfg, st = self.config, self.state
        if cfg.max_steps is not None and st.step >= cfg.max_steps and self.loader.in_epoch:
            self._fold(sums)
            self._stop(f"max_steps={cfg.max_steps} reached")
            self.end_of_training()
            return True
        out_of_time = cfg.max_minutes is not None and st.seconds >= 60 * cfg.max_minutes
        if out_of_time and self.loader.in_epoch:
            self._fold(sums)
            self._stop(f"time budget of {cfg.max_minutes} minutes used")
            self.end_of_epoch()  # validates the model of this partial epoch
            return True
        return False

    def _flush(
        self,
        window: list[dict[str, Tensor]],
        rows: list[int],
        nfe: list[tuple[int, int]],
        sums: dict[str, Tensor],
        beta: float,
        sec_per_iter: float,
    ) -> None:
        """Read back the window's loss terms in one transfer; log; stop on a NaN. Under torchrun
        the ranks agree here on the terms, the NFE, a pending signal and the clock."""
        if not window:
            return
        names = sorted(window[0])
        stacked = torch.stack([torch.stack([w[n].float() for n in names]) for w in window])
        signals = self.signals
        totals = [float(sum(pair[j] for pair in nfe)) for j in (0, 1)]
        synced = self.world.sync_window(  # the one host synchronisation per window
            stacked, totals, signals.pending if signals else None, self.state.seconds
        )
        values, self.state.seconds = synced.values, synced.seconds
        self.bar.sync(self.state.seconds)  # the budget's clock, not the bar's own
        if signals is not None and signals.deferred and synced.signal is not None:
            signals.received = synced.signal
        losses = values[:, names.index("loss")].tolist()
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            step = self.state.step - len(losses) + 1 + bad  # the window ends at this step
            before = f", after {losses[bad - 1]:.6g} at step {step - 1}" if bad else ""
            raise _NonFinite(f"the loss became {losses[bad]} at step {step}{before}")
        if self.graphed is not None:  # what the replays could only record (one more read)
            self.model.flow.check_replays()
        # Per-datum terms are weighted by their step's rows, so that an epoch's (and a
        # window's) mean is over its data points, a short last batch counting for its rows.
        weights = torch.tensor(rows, dtype=torch.float64)
        window_sums = {}
        for i, n in enumerate(names):
            col = values[:, i].double()
            window_sums[n] = col.sum() if n in _PER_STEP else (col * weights).sum()
        window_sums[_ROWS] = weights.sum()
        for n, total in window_sums.items():
            sums[n] = sums.get(n, torch.zeros((), dtype=torch.float64)) + total
        mean = {n: float(v) for n, v in _means(window_sums, len(rows)).items()}
        for j, n in enumerate(("nfe_forward", "nfe_backward")):
            if nfe:
                total = torch.tensor(synced.nfe[j], dtype=torch.float64)
                sums[n] = sums.get(n, torch.zeros((), dtype=torch.float64)) + total
        step = self.state.step
        extra = {
            "beta": beta,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sec_per_iter": sec_per_iter,
        }
        if nfe:
            extra["nfe_forward"] = synced.nfe[0] / len(nfe)
            extra["nfe_backward"] = synced.nfe[1] / len(nfe)
        self.log_scalars({**mean, **extra}, step, "train")
        postfix = {"epoch": self.state.epoch, "loss": f"{mean['loss']:.2f}", "beta": f"{beta:.2f}"}
        if self.spec.unit != "nats":
            postfix["nelbo bits/dim"] = f"{self.spec.in_unit(mean['nelbo']):.3f}"
        if nfe:
            postfix["nfe"] = f"{extra['nfe_forward']:.0f}"
        self.bar.set_postfix(postfix)

    def _fold(self, sums: Mapping[str, Tensor]) -> None:
        for n, v in sums.items():
            self.state.epoch_sums[n] = self.state.epoch_sums.get(n, 0.0) + float(v)
            self.state.total_sums[n] = self.state.total_sums.get(n, 0.0) + float(v)

    def validate(self) -> float:
        cfg = self.config
        valid = subset(self.data.valid, cfg.valid_points)
        # The solve of the test figures, so that model selection and the curves see the same
        # flow as the test (after fixed-step training: dopri5, see evaluation_solve).
        seed = cfg.seed + 3 + self.state.epoch
        with evaluation_solve(self.model, cfg), fork_rng(self.device, seed):
            try:
                return float(dataset_nelbo(
                    self.model, valid, cfg.batch_size, 1, cfg.valid_exact_trace, world=self.world
                ))
            except SolverError as err:  # the test solve's, not the training's: _recover says so
                raise _TestSolveError(f"the validation's {err}") from err

    def end_of_epoch(self) -> None:
        """Validate the epoch's model and record it; then the next epoch, or the end. A time
        stop inside an epoch validates its partial epoch too (the final model is chosen among
        what the run trained), recorded ``"partial": true``; that epoch stays under way (its
        number, KL weight and sums), so that a resume with more time trains the rest of it as
        the longer run would have, and it counts as no epoch without improvement."""
        cfg, st = self.config, self.state
        partial = self.loader.in_epoch
        tick = time.perf_counter()
        try:
            valid = self.validate()
        except _TestSolveError:
            # The epoch's steps are good, only their validation failed: keep them, so that a
            # retry or a resume validates again instead of training the epoch again. (Not
            # under torchrun, where the other ranks have left with a PeerError and would not
            # meet the save's collective; not after a time-out inside the epoch, whose state
            # is done.)
            if not (self.world.distributed or st.done or self.loader.in_epoch):
                self.save()
            raise
        st.seconds = self.world.main_value(st.seconds + time.perf_counter() - tick)
        if not math.isfinite(valid):
            raise _NonFinite(f"the validation NELBO became {valid}")
        train_means = _means(st.epoch_sums, st.epoch_steps)
        record = {"epoch": st.epoch, "step": st.step, "seconds": st.seconds, "valid_nelbo": valid}
        if partial:
            record["partial"] = True
        if self.spec.unit != "nats":  # the figure a Frey Faces reader compares, beside nats
            record["valid_nelbo_bpd"] = self.spec.in_unit(valid)
        record.update({f"train_{n}": v for n, v in train_means.items()})
        st.history.append(record)
        main = self.world.is_main
        if main:
            Run(self.run_dir).write_history(st.history)
        self.log_scalars({"nelbo": valid}, st.step, "valid")
        self.log_scalars({"epoch": st.epoch}, st.step, "train")
        if valid < st.best_valid:
            st.best_valid, st.best_epoch = valid, st.epoch
            if main:
                atomic_save(self.model.state_dict(), self.run_dir / BEST)
        if partial:  # done: the time ran out inside this epoch (the end draws the pictures)
            self.end_of_training()
            return
        if valid < st.whole_best:  # (without partial epochs, whole_best is best_valid)
            st.whole_best, st.bad_epochs = valid, 0
        elif st.epoch > cfg.warmup_epochs:
            st.bad_epochs += 1
        if cfg.image_every and st.epoch % cfg.image_every == 0:
            self.log_images(st.epoch)
        reason = self._limit_reached(st.epoch)
        if reason is not None and not st.done:
            self._stop(reason)
        st.epoch += 1
        st.epoch_sums, st.epoch_steps = {}, 0
        if st.done:
            self.end_of_training()
        else:
            self.save()
            self.bar.sync(st.seconds)  # validation counts, the pictures and the save do not

    def end_of_training(self) -> None:
        """Keep the best model (or the last one when no epoch ended), evaluate it, write files."""
        # Stopped inside its first epoch (no validation yet): the last model is the best. Not
        # "no best.pt yet": a finished smoke run (max_steps) resumed with a larger step budget
        # that still ends inside that epoch holds the best.pt of its earlier, shorter end.
        if self.world.is_main and self.state.best_epoch == 0:
            atomic_save(self.model.state_dict(), self.run_dir / BEST)
        self.save()  # the final state, with done=True, so a resume only re-evaluates
        self.bar.close()  # its time and rate are the training's, not the evaluation's
        self.finish()

    def finish(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        if self.signals is not None:
            self.signals.immediate = True
            self.signals.message = (
                "the final evaluation; training is done and saved: evaluate later with "
                f"`vaeflow train --resume {self.run_dir}` (it only evaluates) or "
                f"`vaeflow eval {self.run_dir}`"
            )
            if self.signals.received is not None:
                # It came in the last validation (or the save after it), which a signal does
                # not cut short: the training is saved, done, so stop before the evaluation
                # as a signal in it would, rather than ignore it for the evaluation's minutes.
                name = signal.Signals(self.signals.received).name
                raise KeyboardInterrupt(f"{name} received before {self.signals.message}")
        final_state = self.model.state_dict()
        best = self.run_dir / BEST
        best_state = self.load(BEST)
        # A NaN retry may have tightened the solver after best.pt was written: evaluate the best
        # parameters at the tolerances in use now, and save them so `vaeflow eval` agrees.
        solver = {k: v for k, v in final_state.items() if k.endswith("_extra_state")}
        if any(best_state.get(k) != v for k, v in solver.items()):
            best_state = {**best_state, **solver}
            if self.world.is_main:
                atomic_save(best_state, best)
        load_state(self.model, best_state, best)
        try:
            results = evaluate(
                self.model, self.data, cfg, **smoke_eval_counts(cfg), progress=self.progress_bar,
                world=self.world,
            )
        except SolverError as err:
            self.model.load_state_dict(final_state)
            if self.can_retry(self.state.retries, test=True):
                # _recover: from the done checkpoint, evaluated at 10x tighter tolerances
                raise _TestSolveError(f"the final evaluation's {err}") from err
            # training is done: no "lower the learning rate", but where to measure it again
            self._evaluation_failed(f"the final evaluation's ODE solve failed ({err})", {})
        results.update(
            dataset=cfg.dataset,
            flow=cfg.flow,
            epochs=self.epochs_trained()[0],
            steps=st.step,
            best_epoch=st.best_epoch,
            best_valid_nelbo=st.best_valid if math.isfinite(st.best_valid) else None,
            stop_reason=st.stop_reason,
            **{
                f"train_{n}_mean": st.total_sums[n] / max(st.step, 1)
                for n in ("nfe_forward", "nfe_backward")
                if n in st.total_sums
            },
            num_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            world_size=self.world.size,
        )
        failed = failed_figures(results)
        if failed is not None:
            self.model.load_state_dict(final_state)
            self._evaluation_failed(*failed)
        results["status"] = "finished"
        if self.world.is_main:
            Run(self.run_dir).write_results(results)
        test = {"nelbo": results["test_nelbo"]}
        if "test_nll_is" in results:
            test["nll_is"] = results["test_nll_is"]
        self.log_scalars(test, st.step, "test")
        writer = self._events()
        if writer is not None:
            log_finished(writer)
        self.log_images(st.epoch)  # the best model's pictures, and the whole learning curve
        self.model.load_state_dict(final_state)
        return results

    @property
    def adaptive_solve(self) -> bool:
        """Whether the model solves an ODE with an adaptive solver, whose tolerances a retry can
        tighten (a fixed-step solve has none: tightening would replay the same failure)."""
        return any(s["method"] not in STATIC_SOLVERS for s in solver_state(self.model))

    @property
    def test_solve_tightens(self) -> bool:
        """Whether 10x tighter flow tolerances change the solve of the validation and the test
        figures (:func:`test_solve_changes`): it is adaptive, and ``test_solver`` does not fix
        both tolerances (a retry would then replay the same failure)."""
        changes = test_solve_changes(self.model, self.config)
        methods = [changes.get("method", s["method"]) for s in solver_state(self.model)]
        adaptive = any(m not in STATIC_SOLVERS for m in methods)
        return adaptive and not {"atol", "rtol"} <= changes.keys()

    def tightens(self, test: bool) -> bool:
        """Whether 10x tighter tolerances change the failed solve: :attr:`test_solve_tightens`
        for that of the validation or the final evaluation (``test``), else
        :attr:`adaptive_solve`."""
        return self.test_solve_tightens if test else self.adaptive_solve

    def can_retry(self, retries: int, test: bool = False) -> bool:
        """Whether a NaN or a failed solve (``test``: of the validation or the final evaluation),
        after ``retries`` retries, may be retried with 10x tighter tolerances: ``nan_retries``
        allows one more, and :meth:`tightens`."""
        return retries < self.config.nan_retries and self.tightens(test)

    def _evaluation_failed(self, error: str, results: Mapping[str, Any]) -> NoReturn:
        """Mark the run failed (``results``: the figures that are finite) and stop: the
        training is kept, and ``vaeflow eval`` can measure it under other solver settings."""
        if self.world.is_main:
            Run(self.run_dir).write_results({**results, "status": "failed", "error": error})
        raise TrainingError(
            f"{error}. Training is done: best.pt and the last checkpoint are kept in "
            f"{self.run_dir}; evaluate again with `vaeflow eval {self.run_dir}`, with other "
            "solver settings (e.g. --solver atol=1e-6 --solver rtol=1e-6), or lower the "
            "learning rate and train again"
        )


def _means(sums: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """The means of the training terms of ``steps`` steps (a logging window's, an epoch's) from
    their ``sums``: per data point for the loss terms (weighted by rows, see ``_flush``), per
    step for the NFE and the gradient norm."""
    rows = sums.get(_ROWS, 0.0)
    return {n: v / (max(steps, 1) if n in _PER_STEP else max(rows, 1.0))
            for n, v in sums.items() if n != _ROWS}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f} minutes"


class _NonFinite(RuntimeError):
    pass


class _TestSolveError(SolverError):
    """A failed solve of the test figures (:func:`evaluation_solve`: ``test_solver``, or dopri5
    after fixed-step training) in a validation or the final evaluation: a retry must tighten
    that solve, and the advice must name it, not the training solve."""


def train(
    config: TrainConfig | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    changes: Mapping[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run and return its ``results.json`` content.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank calls this: they train
    one model data-parallel, rank 0 writing the run directory (see :mod:`vaeflow.distributed`);
    a checkpoint resumes only at the world size that wrote it.

    Args:
        config: the run's settings; not given when resuming.
        run_dir: where to write: an absent or empty folder, unless ``overwrite``.
        resume: a run directory to continue from its ``checkpoint.pt`` (config from the run).
        changes: when resuming, new values of the keys a run may change on the way
            (:data:`vaeflow.runs.RESUMABLE`: device, data directory, step/epoch/time budget,
            pictures);
            any other key is refused.
        progress: show progress bars.
        overwrite: start afresh in a folder that holds a run; its run files are deleted only
            once the new run's config, device and data have been checked.

    Raises:
        TrainingError: a NaN loss, a failed solve, a non-finite final figure or (torchrun) a
            lost rank stopped the run (the last good checkpoint is kept in the run directory).
        KeyboardInterrupt: SIGINT/SIGTERM arrived; a checkpoint was written first.
        InputError: bad input (config, data, run directory); nothing was lost.
    """
    start = time.time()
    with distributed.session() as world:  # joins a torchrun job; SINGLE for a plain process
        cfg, directory, created, changes = world.from_main(
            lambda: _claim(config, run_dir, resume, changes, overwrite)
        )
        created = created and world.is_main  # only rank 0 touches the run directory
        trainer: _Trainer | None = None
        try:
            with contextlib.ExitStack() as owned:
                try:
                    with world.together():  # a failure on any rank (lock, data...) stops all
                        if world.is_main:
                            owned.enter_context(RunLock(directory))
                            remove_partial_writes(directory)  # a killed session's
                        # this rank's device, refused before minutes of download
                        device = world.device(resolve_device(cfg.device))
                        ensure_machine_data(cfg, world)  # the machine's other ranks wait here
                    with world.together():
                        trainer = _Trainer(cfg, directory, device, progress, world)
                    assert trainer is not None
                    if resume is not None:
                        trainer.restore(trainer.load_checkpoint())
                        trainer.check_budget(changes)  # before it is written down
                    trainer.replicate()
                    if world.is_main and (resume is None or changes):
                        if resume is None:
                            clear_run_files(directory)  # --overwrite: only now, all checked
                            Run(directory).write_history([])
                        Run(directory).write_config(cfg)
                    if resume is None:
                        trainer.save()  # step 0: a kill before the first epoch ends resumes here
                except BaseException:
                    # A start that failed before its first checkpoint (a Ctrl-C too) leaves
                    # nothing behind; in a folder it did not create, what it wrote is what
                    # check_new_run_dir lets the same command take over.
                    if created:
                        shutil.rmtree(directory, ignore_errors=True)
                    raise
                if resume is not None:
                    trainer.reopen()
                    logger.info("resumed %s at epoch %d, step %d", directory, trainer.state.epoch,
                                trainer.state.step)
                trainer.open_writer()
                try:
                    _run(trainer)
                finally:
                    if trainer.writer is not None:
                        trainer.writer.close()
                results = world.from_main(lambda: Run(directory).results)
                if world.is_main:
                    session = {
                        "wall_seconds_this_session": time.time() - start,
                        "train_seconds": trainer.state.seconds,
                        "device": str(trainer.device),
                        "device_name": torch.cuda.get_device_name(trainer.device)
                        if trainer.device.type == "cuda"
                        else "cpu",
                        "torch": torch.__version__,
                        "commit": git_commit(),
                        "resumed": resume is not None,
                        "world_size": world.size,
                    }
                    # The latest session's figures at the top; every session that returned,
                    # in order, under "sessions", so a resume by another commit or on another
                    # device does not erase where the earlier training ran.
                    earlier = (Run(directory).timing or {}) if resume is not None else {}
                    # (a run from before "sessions" was kept: its one record is the first)
                    sessions = [*earlier.get("sessions", [earlier] if earlier else []), session]
                    Run(directory).write_timing({**session, "sessions": sessions})
                # Under torchrun its DDP module holds the process group: gone before the
                # session destroys the group (see distributed.session).
                trainer = None
        except RuntimeError as err:
            if isinstance(err, TrainingError) or not world.lost_contact(err):
                raise
            saved = trainer.saved_step if trainer is not None else None
            raise TrainingError(world.lost_contact_message(err, directory, saved)) from err
        finally:
            if created and directory.is_dir() and not any(
                p.name != ".lock" for p in directory.iterdir()
            ):
                shutil.rmtree(directory, ignore_errors=True)
    return results


def _claim(
    config: TrainConfig | None,
    run_dir: str | os.PathLike[str] | None,
    resume: str | os.PathLike[str] | None,
    changes: Mapping[str, Any] | None,
    overwrite: bool,
) -> tuple[TrainConfig, Path, bool, dict[str, Any]]:
    """The run's config (a resumed run's own) and directory, checked and created (rank 0's
    work); whether the directory was created; the changes that change the run."""
    if resume is not None:
        directory = Path(resume)
        config = read_config(directory)
        if not (directory / CHECKPOINT).is_file():
            if stopped_before_training(directory):
                raise RunError(
                    f"cannot resume {directory}: its start was stopped before the first "
                    f"{CHECKPOINT}, so nothing was trained; run the command that started it again"
                )
            raise RunError(f"cannot resume {directory}: it holds no {CHECKPOINT}")
        if changes:
            # Restating a run's own value (``--lr 0.001`` on a run of lr 0.001) changes nothing,
            # so it is no change to refuse.
            saved = config.to_dict()
            changes = {k: v for k, v in changes.items() if k not in saved or saved[k] != v}
            check_resume_changes(changes)
            config = TrainConfig.from_dict({**saved, **changes})
    else:
        if config is None or run_dir is None:
            raise ValueError("train() needs config and run_dir, or resume=RUN_DIR")
        if not isinstance(config, TrainConfig):
            # a dict of settings is the likely slip; its keys would fail one by one later
            raise TypeError(
                f"train() takes a TrainConfig, got {type(config).__name__}: build one with "
                "vaeflow.configs.resolve(dataset, flow, {...}) or TrainConfig.from_dict(...)"
            )
        directory = Path(run_dir)
        check_new_run_dir(directory, overwrite)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    return config, directory, created, dict(changes or {})


def _run(trainer: _Trainer) -> None:
    """The loop until the run is done, recovering from NaNs and solver failures as the config
    says, and stopping cleanly on a signal."""
    directory = trainer.run_dir
    with _Signals(deferred=trainer.world.distributed) as signals:
        trainer.signals = signals
        while True:
            try:
                trainer.run(signals)
                # a run that stopped in (or was killed during) its final evaluation, and was
                # resumed or restarted from its done checkpoint: evaluate again
                if trainer.state.done and not trainer.world.from_main(
                    lambda: Run(directory).finished
                ):
                    trainer.finish()
                break
            except (_NonFinite, SolverError) as err:
                _recover(trainer, err)
        if signals.received is not None and not trainer.state.done:
            name = signal.Signals(signals.received).name
            raise KeyboardInterrupt(
                f"{name} received: checkpoint written at step {trainer.state.step}; "
                f"continue with `vaeflow train --resume {directory}`"
            )


def _recover(trainer: _Trainer, err: Exception) -> None:
    """After a NaN or solver failure: retry from the last checkpoint with tighter tolerances
    (when allowed and FFJORD is in the model), else stop with a clear message."""
    cfg = trainer.config
    if trainer.world.distributed and isinstance(err, SolverError):
        # Only this rank's solve failed: no retry together, and no collective here. The
        # others stop when theirs times out (a training step's), or at once (a validation's
        # or the test's: each evaluation batch is a together block).
        raise TrainingError(
            f"training stopped on rank {trainer.world.rank} at step ~{trainer.state.step}: {err}"
            f". {trainer.world.resume_hint(trainer.run_dir, trainer.saved_step)}, or start again"
            " with tighter solver tolerances (--flow-opt atol=... --flow-opt rtol=...)"
        ) from err
    ckpt = trainer.load_checkpoint()
    retries = int(ckpt["progress"]["retries"])
    where = f"at step ~{trainer.state.step} (epoch {trainer.state.epoch})"
    solvers = solver_state(trainer.model)
    test = isinstance(err, _TestSolveError)  # the validation's or final evaluation's solve
    if trainer.can_retry(retries, test):
        trainer.restore(ckpt)
        trainer.open_writer()  # the steps after the checkpoint are logged again
        trainer.state.retries = retries + 1
        tolerances = trainer.model.flow.tighten_solver(10.0) or {}
        logger.warning(
            "%s %s; retrying from step %d with solver tolerances atol=%g rtol=%g",
            err, where, trainer.state.step, tolerances["atol"], tolerances["rtol"],
        )
        trainer.save()
        return
    # A resume keeps the run's settings (an exact continuation), so these are a new run's.
    hint = ("Start a new run (--out) with a lower learning rate (--lr) or clipped gradients "
            "(--set max_grad_norm=...)")
    if test and cfg.test_solver is not None:
        hint += (", or other test_solver settings, with which the validation and the test "
                 "figures solve (--set test_solver='{method=\"dopri5\", atol=1e-5, rtol=1e-5}'"
                 "; test_solver={} solves them as the training does; nan_retries tightens the "
                 "flow's tolerances, not those that test_solver sets)")
    if trainer.tightens(test):
        which = "the solver tolerances"
        if test and not trainer.adaptive_solve:
            which = ("the flow's tolerances, which the adaptive solve of the validation and the "
                     "test figures uses after fixed-step training")
        hint += f", or tighten {which} (--flow-opt atol=... --flow-opt rtol=...)"
        if cfg.nan_retries == 0:
            hint += " or retry automatically with them 10x tighter (--set nan_retries=1)"
        else:
            retries_word = "retry is" if cfg.nan_retries == 1 else f"{cfg.nan_retries} retries are"
            hint += f" (the automatic {retries_word} used up)"
    elif solvers and not test:
        hint += (", or take smaller solver steps (--flow-opt solver_options={step_size=...}; "
                 "a fixed-step solver has no tolerances for nan_retries to tighten)")
    hint += "."
    message = (
        f"training stopped {where}: {err}. The last good checkpoint (step "
        f"{ckpt['progress']['step']}) is kept in {trainer.run_dir / CHECKPOINT}. {hint}"
    )
    if trainer.world.is_main:  # `vaeflow compare` shows the run as failed, not unfinished
        Run(trainer.run_dir).write_results({"status": "failed",
                                             "error": f"training stopped {where}: {err}"})
    raise TrainingError(message) from err
