"""Training and evaluating a flow VAE: the papers' protocol, run directories, exact resume.

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

Inside an epoch the loop never synchronises with the GPU: the loss terms are accumulated on the
device and read back (one transfer) every ``log_every`` steps, which is also when a NaN loss is
noticed. A NaN loss or a solver failure stops the run, keeps the last good checkpoint, and says
what happened; with ``nan_retries > 0`` the run instead restarts from the last good checkpoint
with the FFJORD solver tolerances divided by 10.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vaeflow.data import Dataset, DatasetSpec, DeviceLoader, get_spec, load_dataset
from vaeflow.flows import FLOWS, check_hyperparameters, make_flow
from vaeflow.flows.ffjord import FFJORD
from vaeflow.nets import ARCHITECTURES, make_networks
from vaeflow.ode import SolverConfig, SolverError
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

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
RESULTS = "results.json"
TIMING = "timing.json"
OPTIMIZERS = ("adamax", "adam")
NAN_CHECKS = ("stop", "retry")


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, solver failure); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the Sylvester/FFJORD papers' protocol.

    Model: ``arch`` ("gatedconv" or "mlp") encoder/decoder with ``latent_dim`` and
    ``context_dim``; ``flow`` (a name in ``FLOWS``) with ``flow_kwargs``; ``net_kwargs`` go to
    :func:`vaeflow.nets.make_networks`.

    Optimisation: ``optimizer`` ("adamax" or "adam"), ``lr``, ``adam_eps``, ``batch_size``,
    ``warmup_epochs`` (0: beta = 1 from the start), ``max_epochs``, ``early_stopping_epochs``,
    ``max_steps`` (stop after this many optimizer steps in all: smoke runs), ``max_minutes``
    (a wall-clock budget for training and validation, summed over resumes; when it runs out
    inside an epoch the current model is validated and kept if best), ``max_grad_norm``
    (None: no clipping).

    Evaluation: ``eval_samples`` posterior samples per test point for the NELBO; ``is_samples``
    importance samples (0: skip) on ``is_points`` test points (None: all), with at most
    ``eval_batch_rows`` rows per flow call; ``eval_points`` limits the test points of the NELBO
    (None: all). Such subsets are drawn with a fixed seed, not taken as a prefix.
    ``valid_exact_trace``: the per-epoch validation NELBO of FFJORD with the exact trace
    (costly: D vector-Jacobian products per evaluation) instead of the unbiased Hutchinson
    estimate; the test NELBO always uses the exact trace. ``valid_points`` limits the
    validation points (None: all).

    Logging and safety: ``log_every`` steps between host reads of the loss (TensorBoard and the
    progress bar), ``image_every`` epochs between sample/reconstruction grids (0: never),
    ``checkpoint_every`` steps between mid-epoch checkpoints (0: epoch ends only),
    ``nan_retries`` restarts from the last checkpoint with 10x tighter FFJORD tolerances.

    RNODE regularization of FFJORD's dynamics (Finlay et al. 2020): ``kinetic_weight`` times the
    integrated ``||f||^2`` plus ``jacobian_weight`` times the integrated (estimated)
    ``||df/dz||_F^2``, batch-averaged, are added to the training loss (not to the NELBO that is
    reported); either weight > 0 switches the flow's ``regularize`` on.
    """

    dataset: str = "static_mnist"
    flow: str = "ffjord"
    flow_kwargs: dict[str, Any] = field(default_factory=dict)
    arch: str = "gatedconv"
    latent_dim: int = 64
    context_dim: int = 256
    net_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adamax"
    lr: float = 5e-4
    adam_eps: float = 1e-7
    batch_size: int = 100
    warmup_epochs: int = 100
    max_epochs: int = 2000
    early_stopping_epochs: int = 100
    max_steps: int | None = None
    max_minutes: float | None = None
    max_grad_norm: float | None = None
    eval_samples: int = 1
    eval_points: int | None = None
    is_samples: int = 100
    is_points: int | None = 1000
    eval_batch_rows: int = 1000
    valid_exact_trace: bool = False
    valid_points: int | None = None
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    split_sizes: list[int] | None = None
    log_every: int = 20
    image_every: int = 10
    checkpoint_every: int = 0
    nan_retries: int = 0
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key raises a ``ValueError`` listing the valid ones."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys are "
                f"{', '.join(cls.keys())}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def regularization(self) -> dict[str, float]:
        """The RNODE weights in use, keyed like ``FFJORD.last_regularization``."""
        weights = {"kinetic": self.kinetic_weight, "jacobian_frobenius": self.jacobian_weight}
        return {k: float(w) for k, w in weights.items() if w > 0}

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the bad value and the valid ones."""
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r}; valid flows are {', '.join(FLOWS)}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown arch {self.arch!r}; valid values are {', '.join(ARCHITECTURES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; valid values are {', '.join(OPTIMIZERS)}"
            )
        positive = ("latent_dim", "context_dim", "batch_size", "max_epochs", "eval_samples")
        positive += ("eval_batch_rows", "log_every")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_epochs", "early_stopping_epochs", "is_samples", "image_every"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("checkpoint_every", "nan_retries"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("max_steps", "eval_points", "is_points", "valid_points"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes!r}")
        for name in ("kinetic_weight", "jacobian_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.regularization() and self.flow != "ffjord":
            raise ValueError(
                "kinetic_weight / jacobian_weight regularize FFJORD's dynamics; "
                f"flow {self.flow!r} has none"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.split_sizes is not None and len(self.split_sizes) != 3:
            raise ValueError(f"split_sizes must be [train, valid, test], got {self.split_sizes!r}")
        if not isinstance(self.flow_kwargs, dict) or not isinstance(self.net_kwargs, dict):
            raise ValueError("flow_kwargs and net_kwargs must be tables (dicts)")
        check_hyperparameters(self.flow, self.flow_kwargs)
        # Building the flow checks every hyperparameter's value (solver, options, sizes) before
        # any data is loaded; FFJORD is built on the meta device to skip allocating its heads.
        device = "meta" if self.flow == "ffjord" else "cpu"
        with torch.device(device):
            make_flow(self.flow, self.latent_dim, self.context_dim, **self.flow_kwargs)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "an integer >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must be a valid device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"invalid device {name!r} (try 'auto', 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def build_model(config: TrainConfig, data: Dataset | DatasetSpec) -> VAE:
    """The VAE of ``config`` for ``data``'s image shape and likelihood (on the CPU, or on the
    current default device)."""
    try:
        encoder, decoder = make_networks(
            config.arch,
            data.input_shape,
            latent_dim=config.latent_dim,
            context_dim=config.context_dim,
            likelihood=data.likelihood,
            **config.net_kwargs,
        )
    except TypeError as err:  # an option the architecture does not take: bad input
        raise ValueError(f"net_kwargs: {err}") from err
    flow_kwargs = dict(config.flow_kwargs)
    if config.regularization():
        flow_kwargs["regularize"] = True
    flow = make_flow(config.flow, config.latent_dim, config.context_dim, **flow_kwargs)
    return VAE(encoder, decoder, data.likelihood, flow)


def count_parameters(config: TrainConfig) -> int:
    """Trainable parameters of the model that ``config`` trains, built on the meta device from
    the data set's description (no data is read or downloaded, no memory allocated)."""
    with torch.device("meta"):
        model = build_model(config, get_spec(config.dataset))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(config: TrainConfig, model: VAE) -> torch.optim.Optimizer:
    cls = torch.optim.Adamax if config.optimizer == "adamax" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, eps=config.adam_eps)


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
) -> dict[str, Tensor]:
    """One optimisation step on the batch ``x [B, C, H, W]``; no host synchronisation.

    Returns the batch-mean terms of :meth:`VAE.loss` (``loss``, ``recon``, ``kl``, ``logdet``,
    ``nelbo``, ...) and ``grad_norm`` (before clipping), as detached scalar tensors on the
    device. With ``max_grad_norm`` the gradients are clipped to that global norm.
    ``regularization`` maps names of ``model.flow.last_regularization`` (FFJORD with
    ``regularize=True``) to weights: their batch means, weighted, join the loss, and each is
    returned as ``reg_<name>``.
    """
    optimizer.zero_grad(set_to_none=True)
    terms = model.loss(x, beta)
    for name, weight in (regularization or {}).items():
        value = model.flow.last_regularization[name].mean()
        terms[f"reg_{name}"] = value
        terms["loss"] = terms["loss"] + weight * value
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
# Evaluation
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: VAE, exact: bool = True) -> Iterator[None]:
    """Eval mode (FFJORD: exact trace unless ``exact`` is False); the previous mode after."""
    was_training = model.training
    saved = [(m, m.exact_in_eval) for m in model.modules() if isinstance(m, FFJORD)]
    model.eval()
    for m, _ in saved:
        m.exact_in_eval = exact
    try:
        yield
    finally:
        for m, value in saved:
            m.exact_in_eval = value
        model.train(was_training)


def _subset(x: Tensor, points: int | None, seed: int = 0) -> Tensor:
    """``points`` rows of ``x [N, ...]`` drawn without replacement with a fixed seed (in their
    stored order), or all of ``x``. Not a prefix: stored splits need not be in random order
    (static MNIST's test split starts with darker digits)."""
    if points is None or points >= len(x):
        return x
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=g)[:points].sort().values
    return x[index.to(x.device)]


def dataset_nelbo(
    model: VAE,
    x: Tensor,
    batch_size: int,
    n_samples: int = 1,
    exact: bool = True,
) -> Tensor:
    """Mean NELBO (nats per datum) over ``x [N, C, H, W]`` in eval mode; a 0-dim tensor.

    Runs under ``no_grad``: FFJORD switches autograd on inside its field for the trace and
    returns detached values, so no graph is kept.
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with _eval_mode(model, exact), torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            nelbo = model.nelbo(xb, n_samples, batch_size=batch_size * n_samples).detach()
            total = total + nelbo.double().sum()
    return total / len(x)


def dataset_log_likelihood(
    model: VAE, x: Tensor, n_samples: int, batch_rows: int
) -> Tensor:
    """Mean importance-sampled ``log p(x)`` (nats) over ``x [N, C, H, W]``, exact trace."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    per_batch = max(1, batch_rows // n_samples)
    with _eval_mode(model, exact=True), torch.no_grad():
        for start in range(0, len(x), per_batch):
            xb = x[start : start + per_batch]
            ll = model.importance_log_likelihood(xb, n_samples, batch_size=batch_rows)
            total = total + ll.double().sum()
    return total / len(x)


def evaluate(
    model: VAE,
    data: Dataset,
    config: TrainConfig,
    *,
    eval_points: int | None = None,
    is_samples: int | None = None,
    is_points: int | None = None,
) -> dict[str, Any]:
    """Test-set figures of ``model``: NELBO (exact trace) and the IS log-likelihood.

    The arguments override the config's ``eval_points``, ``is_samples`` and ``is_points``. For
    data sets reported in bits per dimension (Frey Faces) the ``*_bpd`` entries are the
    headline numbers.
    """
    eval_points = config.eval_points if eval_points is None else eval_points
    is_samples = config.is_samples if is_samples is None else is_samples
    is_points = config.is_points if is_points is None else is_points
    test = _subset(data.test, eval_points)
    num_dims = math.prod(data.input_shape)
    # A fixed seed makes the evaluation a deterministic function of the parameters.
    with _fork_rng(data.test.device, config.seed + 1):
        nelbo = float(dataset_nelbo(model, test, config.batch_size, config.eval_samples))
        out: dict[str, Any] = {
            "test_nelbo": nelbo,
            "test_nelbo_bpd": nelbo / (num_dims * math.log(2.0)),
            "test_points": len(test),
            "eval_samples": config.eval_samples,
            "trace": "exact",
        }
        if is_samples > 0:
            xs = _subset(data.test, is_points)
            ll = float(dataset_log_likelihood(model, xs, is_samples, config.eval_batch_rows))
            out.update(
                test_nll_is=-ll,
                test_nll_is_bpd=-ll / (num_dims * math.log(2.0)),
                is_samples=is_samples,
                is_points=len(xs),
            )
    out["unit"] = "bits/dim" if data.bits_per_dim else "nats"
    return out


@contextlib.contextmanager
def _fork_rng(device: torch.device, seed: int) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_write_json(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_run(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The config of the run in ``run_dir`` (from its ``config.json``)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vaeflow run directory: no {CONFIG} in it")
    with open(path) as f:
        return TrainConfig.from_dict(json.load(f))


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    """Turns SIGINT/SIGTERM into a flag that the loop checks between steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, progress_bar: bool) -> None:
        self.config = config
        self.run_dir = run_dir
        self.progress_bar = progress_bar
        self.device = resolve_device(config.device)
        split_sizes = tuple(config.split_sizes) if config.split_sizes is not None else None
        self.data = load_dataset(
            config.dataset, config.data_dir, self.device, split_sizes=split_sizes
        )
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        self.loader: DeviceLoader = self.data.loader("train", config.batch_size, seed=config.seed)
        self.state = _Progress()
        self.writer: Any = None

    # ---- checkpoints

    def checkpoint(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": _rng_state(self.device),
            "progress": asdict(self.state),
            "solver": self._solver_state(),
        }

    def _ffjords(self) -> list[FFJORD]:
        return [m for m in self.model.modules() if isinstance(m, FFJORD)]

    def _solver_state(self) -> list[dict[str, Any]]:
        return [
            {"atol": m.solver.atol, "rtol": m.solver.rtol, "method": m.solver.method}
            for m in self._ffjords()
        ]

    def save(self) -> None:
        _atomic_save(self.checkpoint(), self.run_dir / CHECKPOINT)

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        _set_rng_state(ckpt["rng"], self.device)
        self.state = _Progress(**ckpt["progress"])
        for m, s in zip(self._ffjords(), ckpt.get("solver", []), strict=False):
            m.solver = dataclasses.replace(m.solver, atol=s["atol"], rtol=s["rtol"])

    def load_checkpoint(self) -> dict[str, Any]:
        return torch.load(self.run_dir / CHECKPOINT, map_location=self.device, weights_only=True)

    # ---- logging

    def open_writer(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint
        self.writer = SummaryWriter(str(self.run_dir), purge_step=self.state.step or None)

    def log_scalars(self, values: Mapping[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def log_images(self, epoch: int) -> None:
        from torchvision.utils import make_grid

        if self.writer is None:
            return
        with _fork_rng(self.device, self.config.seed + 2), _eval_mode(self.model):
            samples = self.model.sample(64)
            x = self.data.valid[:32]
            recon = self.model.reconstruct(x)
        grid = make_grid(samples.float().cpu(), nrow=8)
        self.writer.add_image("samples", grid, epoch)
        pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
        self.writer.add_image("reconstructions", make_grid(pairs.float().cpu(), nrow=8), epoch)

    # ---- the loop

    def run(self, signals: _Signals) -> None:
        cfg, st = self.config, self.state
        bar = _progress_bar(self.progress_bar, cfg, st.step, len(self.loader))
        try:
            while not st.done:
                self.run_epoch(signals, bar)
                if signals.received is not None:
                    return
        finally:
            bar.close()

    def _stop(self, reason: str) -> None:
        self.state.done = True
        self.state.stop_reason = reason

    def run_epoch(self, signals: _Signals, bar: Any) -> None:
        cfg, st = self.config, self.state
        beta = beta_at(st.epoch, cfg.warmup_epochs)
        sums: dict[str, Tensor] = {}
        window: list[dict[str, Tensor]] = []
        nfe: list[tuple[int, int]] = []
        ffjords = self._ffjords()
        tick = time.perf_counter()
        self.model.train()
        if st.epoch_steps > 0 and not self.loader.in_epoch:
            # killed between the epoch's last step (checkpointed) and its validation
            self.end_of_epoch()
            return
        for x in self.loader:
            out = train_step(
                self.model, self.optimizer, x, beta, cfg.max_grad_norm, cfg.regularization()
            )
            st.step += 1
            st.epoch_steps += 1
            window.append(out)
            if ffjords:
                nfe.append(
                    (sum(m.nfe_forward for m in ffjords), sum(m.nfe_backward for m in ffjords))
                )
            hit_max = cfg.max_steps is not None and st.step >= cfg.max_steps
            interrupted = signals.received is not None
            flush = len(window) >= cfg.log_every or hit_max or interrupted
            ckpt_due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
            if flush or ckpt_due or not self.loader.in_epoch:
                now = time.perf_counter()
                self._flush(window, nfe, sums, beta, (now - tick) / max(len(window), 1), bar)
                st.seconds += now - tick
                tick = now
                window, nfe = [], []
            out_of_time = cfg.max_minutes is not None and st.seconds >= 60 * cfg.max_minutes
            if interrupted or ckpt_due:
                self._fold(sums)
                self.save()
                sums = {}
            if interrupted:
                return
            if hit_max:
                self._fold(sums)
                self._stop(f"max_steps={cfg.max_steps} reached")
                self.end_of_training()
                return
            if out_of_time and self.loader.in_epoch:
                self._fold(sums)
                self._stop(f"time budget of {cfg.max_minutes} minutes used")
                self.end_of_epoch()  # validates the model of this partial epoch
                return
        self._fold(sums)
        self.end_of_epoch()

    def _flush(
        self,
        window: list[dict[str, Tensor]],
        nfe: list[tuple[int, int]],
        sums: dict[str, Tensor],
        beta: float,
        sec_per_iter: float,
        bar: Any,
    ) -> None:
        """Read back the window's loss terms in one transfer; log; stop on a NaN."""
        if not window:
            return
        names = sorted(window[0])
        stacked = torch.stack([torch.stack([w[n].float() for n in names]) for w in window])
        values = stacked.cpu()  # the one host synchronisation per window
        if not torch.isfinite(values[:, names.index("loss")]).all():
            raise _NonFinite(f"the loss became {values[:, names.index('loss')].tolist()}")
        for i, n in enumerate(names):
            col = values[:, i].double()
            sums[n] = sums.get(n, torch.zeros((), dtype=torch.float64)) + col.sum()
        for j, n in enumerate(("nfe_forward", "nfe_backward")):
            if nfe:
                total = torch.tensor(float(sum(pair[j] for pair in nfe)), dtype=torch.float64)
                sums[n] = sums.get(n, torch.zeros((), dtype=torch.float64)) + total
        step = self.state.step
        mean = {n: float(values[:, i].mean()) for i, n in enumerate(names)}
        extra = {
            "beta": beta,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sec_per_iter": sec_per_iter,
        }
        if nfe:
            extra["nfe_forward"] = sum(f for f, _ in nfe) / len(nfe)
            extra["nfe_backward"] = sum(b for _, b in nfe) / len(nfe)
        self.log_scalars({**mean, **extra}, step, "train")
        bar.update(len(window))
        postfix = {"epoch": self.state.epoch, "loss": f"{mean['loss']:.2f}"}
        if nfe:
            postfix["nfe"] = f"{extra['nfe_forward']:.0f}"
        bar.set_postfix(postfix, refresh=False)

    def _fold(self, sums: Mapping[str, Tensor]) -> None:
        for n, v in sums.items():
            self.state.epoch_sums[n] = self.state.epoch_sums.get(n, 0.0) + float(v)
            self.state.total_sums[n] = self.state.total_sums.get(n, 0.0) + float(v)

    def validate(self) -> float:
        cfg = self.config
        valid = _subset(self.data.valid, cfg.valid_points)
        with _fork_rng(self.device, cfg.seed + 3 + self.state.epoch):
            return float(dataset_nelbo(self.model, valid, cfg.batch_size, 1, cfg.valid_exact_trace))

    def end_of_epoch(self) -> None:
        cfg, st = self.config, self.state
        tick = time.perf_counter()
        valid = self.validate()
        st.seconds += time.perf_counter() - tick
        if not math.isfinite(valid):
            raise _NonFinite(f"the validation NELBO became {valid}")
        train_means = {n: v / max(st.epoch_steps, 1) for n, v in st.epoch_sums.items()}
        record = {"epoch": st.epoch, "step": st.step, "seconds": st.seconds, "valid_nelbo": valid}
        record.update({f"train_{n}": v for n, v in train_means.items()})
        st.history.append(record)
        self.log_scalars({"nelbo": valid}, st.step, "valid")
        self.log_scalars({"epoch": st.epoch}, st.step, "train")
        if valid < st.best_valid:
            st.best_valid, st.best_epoch, st.bad_epochs = valid, st.epoch, 0
            _atomic_save(self.model.state_dict(), self.run_dir / BEST)
        elif st.epoch > cfg.warmup_epochs:
            st.bad_epochs += 1
        if cfg.image_every and st.epoch % cfg.image_every == 0:
            self.log_images(st.epoch)
        out_of_time = cfg.max_minutes is not None and st.seconds >= 60 * cfg.max_minutes
        if st.done:  # the time budget ran out inside this epoch
            pass
        elif st.bad_epochs >= cfg.early_stopping_epochs > 0:
            self._stop(f"early stopping: no validation improvement for {st.bad_epochs} epochs")
        elif st.epoch >= cfg.max_epochs:
            self._stop(f"max_epochs={cfg.max_epochs} reached")
        elif out_of_time:
            self._stop(f"time budget of {cfg.max_minutes} minutes used")
        st.epoch += 1
        st.epoch_sums, st.epoch_steps = {}, 0
        if st.done:
            self.end_of_training()
        else:
            self.save()

    def end_of_training(self) -> None:
        """Keep the best model (or the last one when no epoch ended), evaluate it, write files."""
        best = self.run_dir / BEST
        if not best.is_file():  # a smoke run that stopped inside its first epoch
            _atomic_save(self.model.state_dict(), best)
        self.save()  # the final state, with done=True, so a resume only re-evaluates
        self.finish()

    def finish(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        final_state = self.model.state_dict()
        self.model.load_state_dict(
            torch.load(self.run_dir / BEST, map_location=self.device, weights_only=True)
        )
        results = evaluate(self.model, self.data, cfg, **_smoke_eval(cfg))
        results.update(
            dataset=cfg.dataset,
            flow=cfg.flow,
            epochs=st.epoch - 1,
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
            solver=self._solver_state(),
        )
        self.model.load_state_dict(final_state)
        _atomic_write_json(results, self.run_dir / RESULTS)
        if self.writer is not None:
            self.log_scalars({"nelbo": results["test_nelbo"]}, st.step, "test")
            if cfg.image_every:
                self.log_images(st.epoch)
        return results


class _NonFinite(RuntimeError):
    pass


def _smoke_eval(config: TrainConfig) -> dict[str, int]:
    """A run limited by ``max_steps`` is a smoke run: unless the config says how much to
    evaluate, evaluate on 500 test points and 50 IS points with 10 samples."""
    if config.max_steps is None:
        return {}
    out: dict[str, int] = {}
    defaults = TrainConfig.__dataclass_fields__
    if config.eval_points == defaults["eval_points"].default:
        out["eval_points"] = 500
    if config.is_points == defaults["is_points"].default:
        out["is_points"] = 50
    if config.is_samples == defaults["is_samples"].default:
        out["is_samples"] = 10
    return out


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, config: TrainConfig, initial: int, per_epoch: int) -> Any:
    """A tqdm bar over all steps the run may take (``max_epochs`` or ``max_steps``), or nothing."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    total = config.max_epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)


def train(
    config: TrainConfig | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run and return its ``results.json`` content.

    Args:
        config: the run's settings; not given when resuming.
        run_dir: where to write; must not hold a checkpoint unless ``overwrite``.
        resume: a run directory to continue from its ``checkpoint.pt`` (config from the run).
        progress: show a progress bar.
        overwrite: allow starting afresh in a run directory that holds a checkpoint.

    Raises:
        TrainingError: a NaN loss or a failed solve stopped the run (the last good checkpoint
            is kept in the run directory).
        KeyboardInterrupt: SIGINT/SIGTERM arrived; a checkpoint was written first.
    """
    if resume is not None:
        directory = Path(resume)
        config = load_run(directory)
        if not (directory / CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot resume {directory}: it holds no {CHECKPOINT}")
    else:
        if config is None or run_dir is None:
            raise ValueError("train() needs config and run_dir, or resume=RUN_DIR")
        directory = Path(run_dir)
        if (directory / CHECKPOINT).is_file() and not overwrite:
            raise FileExistsError(
                f"{directory} already holds a run ({CHECKPOINT}); continue it with "
                f"`vaeflow train --resume {directory}` or choose another --out"
            )
        directory.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, BEST, RESULTS, TIMING):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        _atomic_write_json(config.to_dict(), directory / CONFIG)

    start = time.time()
    trainer = _Trainer(config, directory, progress)
    if resume is not None:
        trainer.restore(trainer.load_checkpoint())
        logger.info("resumed %s at epoch %d, step %d", directory, trainer.state.epoch,
                    trainer.state.step)
    else:
        trainer.save()  # step 0: a kill before the first epoch ends resumes from here
    trainer.open_writer()
    try:
        with _Signals() as signals:
            while True:
                try:
                    trainer.run(signals)
                    # a run that stopped in (or was killed during) its final evaluation, and
                    # was resumed or restarted from its done checkpoint: evaluate again
                    if trainer.state.done and not (directory / RESULTS).is_file():
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
    finally:
        trainer.writer.close()
    from vaeflow.bench import git_commit  # bench imports this module: import at call time

    results = json.loads((directory / RESULTS).read_text())
    timing = {
        "wall_seconds_this_session": time.time() - start,
        "train_seconds": trainer.state.seconds,
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(trainer.device)
        if trainer.device.type == "cuda"
        else "cpu",
        "torch": torch.__version__,
        "commit": git_commit(),
        "resumed": resume is not None,
    }
    _atomic_write_json(timing, directory / TIMING)
    return results


def _recover(trainer: _Trainer, err: Exception) -> None:
    """After a NaN or solver failure: retry from the last checkpoint with tighter tolerances
    (when allowed and FFJORD is in the model), else stop with a clear message."""
    cfg = trainer.config
    ckpt = trainer.load_checkpoint()
    retries = int(ckpt["progress"]["retries"])
    ffjords = trainer._ffjords()
    where = f"at step ~{trainer.state.step} (epoch {trainer.state.epoch})"
    if retries < cfg.nan_retries and ffjords:
        trainer.restore(ckpt)
        trainer.state.retries = retries + 1
        for m in ffjords:
            m.solver = SolverConfig(
                method=m.solver.method,
                atol=m.solver.atol / 10,
                rtol=m.solver.rtol / 10,
                options=m.solver.options,
                adjoint=m.solver.adjoint,
            )
        logger.warning(
            "%s %s; retrying from step %d with FFJORD tolerances atol=%g rtol=%g",
            err, where, trainer.state.step, ffjords[0].solver.atol, ffjords[0].solver.rtol,
        )
        trainer.save()
        return
    hint = (
        "Lower the learning rate (--lr), clip gradients (--set max_grad_norm=...), "
        "or for FFJORD tighten the solver tolerances or retry automatically "
        "(--set nan_retries=1)."
    )
    raise TrainingError(
        f"training stopped {where}: {err}. The last good checkpoint (step "
        f"{ckpt['progress']['step']}) is kept in {trainer.run_dir / CHECKPOINT}. {hint}"
    ) from err


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    eval_points: int | None = None,
    is_samples: int | None = None,
    is_points: int | None = None,
    data_dir: str | None = None,
    checkpoint: str = "best",
) -> dict[str, Any]:
    """Evaluate the best (or last) model of a run on the test set; see :func:`evaluate`."""
    directory = Path(run_dir)
    config = load_run(directory)
    if device is not None:
        config.device = device
    if data_dir is not None:
        config.data_dir = data_dir
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    dev = resolve_device(config.device)
    split_sizes = tuple(config.split_sizes) if config.split_sizes is not None else None
    data = load_dataset(config.dataset, config.data_dir, dev, split_sizes=split_sizes)
    model = build_model(config, data).to(dev)
    path = directory / (BEST if checkpoint == "best" else CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {path.name} to evaluate")
    state = torch.load(path, map_location=dev, weights_only=True)
    if checkpoint == "last":
        state = state["model"]
    model.load_state_dict(state)
    smoke = _smoke_eval(config)
    kw = {
        "eval_points": eval_points if eval_points is not None else smoke.get("eval_points"),
        "is_samples": is_samples if is_samples is not None else smoke.get("is_samples"),
        "is_points": is_points if is_points is not None else smoke.get("is_points"),
    }
    results = evaluate(model, data, config, **kw)
    results.update(dataset=config.dataset, flow=config.flow, checkpoint=checkpoint)
    return results
