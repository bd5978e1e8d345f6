"""The settings of a run: :class:`TrainConfig`, a dataclass checked on construction.

It is saved as ``config.json`` in the run directory and inside every checkpoint; its defaults
are the Sylvester/FFJORD papers' training protocol, and :func:`vaeflow.configs.resolve` layers
the papers' per-data-set settings over them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vaeflow.checks import (
    InputError,
    annotation_alternatives,
    check_annotated,
    check_bool,
    check_choice,
    check_device_name,
    check_int,
    check_number,
    check_options,
    input_errors,
)
from vaeflow.data import DATASETS, get_spec
from vaeflow.flows import FLOWS, check_hyperparameters, make_flow, use_solver
from vaeflow.nets import (
    ARCHITECTURES,
    GatedConvDecoder,
    GatedConvEncoder,
    MLPDecoder,
    MLPEncoder,
    make_networks,
)

__all__ = ["TrainConfig", "OPTIMIZERS"]

OPTIMIZERS = ("adamax", "adam")
# The largest seed a run takes (see TrainConfig.validate).
MAX_SEED = 2**63 - 1

# The classes that take ``net_kwargs`` (through make_networks): their annotations say how a
# value from a command line or a file is read (the word none, a list).
_NETWORKS = (MLPEncoder, MLPDecoder, GatedConvEncoder, GatedConvDecoder)


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
    ``eval_batch_rows`` rows per flow call (a memory setting; it regroups the draws, so the IS
    figure moves within its Monte Carlo error); ``eval_points`` limits the test points of the NELBO
    (None: all). Such subsets are drawn with a fixed seed, not taken as a prefix.
    ``valid_exact_trace``: the per-epoch validation NELBO of FFJORD with the exact trace
    (costly: D vector-Jacobian products per evaluation) instead of the unbiased Hutchinson
    estimate; the test NELBO always uses the exact trace. ``valid_points`` limits the
    validation points (None: all). ``test_solver``: FFJORD's ODE solver settings for the test
    figures (``method``, ``atol``, ``rtol``, ``solver_options``, as
    :meth:`vaeflow.flows.Flow.replace_solver`); None: the training solve when it is adaptive,
    and dopri5 at the flow's own tolerances after training with a fixed-step solver, as the
    RNODE paper's protocol does. A few fixed steps are not the continuous flow, and a model
    trained with them can learn their error (a model trained with two rk4 steps per solve
    measured 104 nats with them and 150 with dopri5: README, "The test figures of FFJORD").
    The per-epoch validation uses the same solve. ``{}``: exactly the training solve.

    Logging and safety: ``log_every`` steps between host reads of the loss (TensorBoard and the
    progress bar), ``image_every`` epochs between sample/reconstruction grids (0: only the
    closing ones), ``pictures`` False draws none at all, neither those grids nor the closing
    PNGs (sweeps, benchmarks and tests, where each run's pictures cost seconds: ``vaeflow eval
    RUN`` draws them later),
    ``checkpoint_every`` steps between mid-epoch checkpoints (0: epoch ends only),
    ``nan_retries`` restarts from the last checkpoint with 10x tighter FFJORD tolerances (a
    failed validation or final evaluation solve too, unless ``test_solver`` sets both of its
    tolerances, which the retry does not change).

    RNODE regularization of FFJORD's dynamics (Finlay et al. 2020): ``kinetic_weight`` times the
    integrated ``||f||^2`` plus ``jacobian_weight`` times the integrated (estimated)
    ``||df/dz||_F^2``, batch-averaged, are added to the training loss (not to the NELBO that is
    reported); either weight > 0 switches the flow's ``regularize`` on.

    Speed: ``cuda_graph`` captures the whole training step (forward, backward, optimizer step)
    in one CUDA graph and replays it (:mod:`vaeflow.graphs`); it needs a CUDA device, one
    process, a flow whose step does not synchronise (FFJORD with a fixed-step solver and no
    adjoint, or any baseline but orthogonal Sylvester), and otherwise trains without a graph
    after saying why; a capture that fails for another reason does the same. The short last
    batch of an epoch runs eagerly.
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
    test_solver: dict[str, Any] | None = None
    valid_points: int | None = None
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    split_sizes: list[int] | None = None
    log_every: int = 20
    image_every: int = 10
    pictures: bool = True
    checkpoint_every: int = 0
    nan_retries: int = 0
    kinetic_weight: float = 0.0
    jacobian_weight: float = 0.0
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @staticmethod
    def check_names(dataset: str, flow: str) -> None:
        """Raise a ``ValueError`` listing the valid names for an unknown data set or flow."""
        check_choice("data set", dataset, DATASETS, "data sets")
        check_choice("flow", flow, FLOWS, "flows")

    @classmethod
    def check_keys(cls, keys: Iterable[str]) -> None:
        """Raise a ``ValueError`` for keys that are no config key, listing the valid ones."""
        unknown = sorted(set(keys) - set(cls.keys()))
        if unknown:
            raise InputError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys are "
                f"{', '.join(cls.keys())}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key raises a ``ValueError`` listing the valid ones."""
        cls.check_keys(values)
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def regularization(self) -> dict[str, float]:
        """The RNODE weights in use, keyed like ``FFJORD.last_regularization``."""
        weights = {"kinetic": self.kinetic_weight, "jacobian_frobenius": self.jacobian_weight}
        return {k: float(w) for k, w in weights.items() if w > 0}

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the bad value (and the valid ones); a value of the
        wrong type is refused with its key, never coerced (``"False"`` is not a boolean)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), str(f.type)))
        self.check_names(self.dataset, self.flow)
        self.flow_kwargs = check_options(self.flow_kwargs, [FLOWS[self.flow]])
        self.net_kwargs = check_options(self.net_kwargs, _NETWORKS, "net_kwargs: ")
        check_choice("arch", self.arch, ARCHITECTURES, "values")
        check_choice("optimizer", self.optimizer, OPTIMIZERS, "values")
        check_device_name(self.device)  # its spelling; whether it is here, when a run starts
        positive = ("latent_dim", "context_dim", "batch_size", "max_epochs", "eval_samples")
        positive += ("eval_batch_rows", "log_every")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        zero_or_more = ("warmup_epochs", "early_stopping_epochs", "is_samples", "image_every")
        zero_or_more += ("checkpoint_every", "nan_retries")
        for name in zero_or_more:
            check_int(name, getattr(self, name), minimum=0)
        # The run draws its streams from seed + small offsets (seed + 3 + epoch for a
        # validation), and torch takes seeds below 2**64: half that range leaves them room.
        check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in ("max_steps", "eval_points", "is_points", "valid_points"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_number("lr", self.lr, positive=True)
        check_number("adam_eps", self.adam_eps, positive=True)
        for name in ("max_minutes", "max_grad_norm"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), positive=True)
        for name in ("kinetic_weight", "jacobian_weight"):
            check_number(name, getattr(self, name), nonnegative=True)
        if self.regularization() and self.flow != "ffjord":
            raise InputError(
                "kinetic_weight / jacobian_weight regularize FFJORD's dynamics; "
                f"flow {self.flow!r} has none"
            )
        if self.split_sizes is not None and (
            len(self.split_sizes) != 3 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in self.split_sizes
            )
        ):
            raise InputError(
                f"split_sizes must be three positive integers [train, valid, test], got "
                f"{self.split_sizes!r}"
            )
        # Building the flow checks every hyperparameter's value (solver, options, sizes) before
        # any data is loaded; FFJORD is built on the meta device to skip allocating its heads.
        # The CPU generator is forked: the throw-away weights' initialisation must not shift the
        # caller's random stream, or merely reading a config (a picture's title, a script after
        # its seed) would change what a run trains.
        device = "meta" if self.flow == "ffjord" else "cpu"
        with torch.device(device), torch.random.fork_rng(devices=[]):
            with input_errors():  # its message names the flow already
                check_hyperparameters(self.flow, self.flow_kwargs)
            # "num_steps must be a positive integer" alone would not say whose num_steps
            with input_errors(f"flow {self.flow!r}: "):
                flow = make_flow(self.flow, self.latent_dim, self.context_dim, **self.flow_kwargs)
            # The encoder and decoder too (from the data set's shape and likelihood, no data
            # read), on the meta device: net_kwargs that the architecture refuses would
            # otherwise surface only once a run has loaded, or downloaded, its data.
            spec = get_spec(self.dataset)
            with torch.device("meta"), input_errors("net_kwargs: "):
                make_networks(self.arch, spec.input_shape, latent_dim=self.latent_dim,
                              context_dim=self.context_dim, likelihood=spec.likelihood,
                              **self.net_kwargs)
        # The test solver is checked now, not after hours of training. Its settings are the
        # flow's hyperparameters of the same names, read as those are (solver_options=none).
        if self.test_solver:
            self.test_solver = check_options(self.test_solver, [FLOWS[self.flow]], "test_solver: ")
            with input_errors("test_solver: "):
                use_solver(flow, self.flow, self.test_solver)


# The types that config values may have, by annotation: a TOML or JSON value of another type is
# refused with its key. An int is accepted where a float is expected (TOML writes 1 for 1.0).
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "dict[str, Any]": (dict,),
    "list[int]": (list, tuple),
}


def _check_type(name: str, value: Any, annotation: str) -> Any:
    alternatives = annotation_alternatives(annotation)
    optional = "None" in alternatives
    (base,) = [a for a in alternatives if a != "None"]  # TrainConfig's fields: one type each
    value = check_annotated(name, value, annotation)  # --set max_steps=none: None
    if value is None:
        if optional:
            return None
        raise InputError(f"{name} must be set (it cannot be None)")
    if base == "bool":
        return check_bool(name, value)
    kinds = _TYPES[base]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        article = "an" if base[0] in "aeiou" else "a"
        shown = {"dict[str, Any]": "table", "list[int]": "list of integers"}.get(base, base)
        raise InputError(
            f"{name} must be {article} {shown}{' or None' if optional else ''}, got {value!r}"
        )
    if base == "float":
        return float(value)
    if base == "list[int]":
        return list(value)
    return value
