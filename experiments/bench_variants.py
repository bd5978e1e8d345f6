"""The benchmark's variants and the model each one times.

The model of a flow at ``size="paper"`` is the papers' MNIST VAE exactly as ``vaeflow train``
builds it: :func:`vaeflow.configs.resolve` of ``static_mnist`` and the flow (the papers'
settings, written once in the package's config files) and :func:`vaeflow.model.build_model`.
``size="small"`` shrinks that resolved config with overrides (an MLP VAE with latent 8 and toy
flow widths) so that a CPU times a step in milliseconds; every structural setting it does not
override (FFJORD's two blocks, dopri5 at 1e-5, ...) stays the paper's.

A :class:`Variant` is a flow plus hyperparameter overrides and how the step is driven (a CUDA
graph, or the emulation of the paper code's choices, :class:`StateCarryingFFJORD`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import check_choice
from vaeflow.configs import TrainConfig, resolve
from vaeflow.flows import FFJORD
from vaeflow.flows.ffjord import _divergence
from vaeflow.model import build_model as build_vae
from vaeflow.ode import NFECounter, solve
from vaeflow.vae import VAE

__all__ = [
    "BASELINES",
    "DATASET",
    "SIZES",
    "INPUT_SHAPE",
    "VARIANTS",
    "Variant",
    "StateCarryingFFJORD",
    "build_model",
    "get_variant",
    "model_config",
]

DATASET = "static_mnist"  # the papers' MNIST model; the benchmark's data are random images
SIZES = ("paper", "small")
INPUT_SHAPE = (1, 28, 28)

# What "small" changes in the resolved paper config: the networks, and each flow's widths.
_SMALL_NETS: dict[str, Any] = {
    "arch": "mlp",
    "latent_dim": 8,
    "context_dim": 32,
    "net_kwargs": {"hidden_sizes": [64]},
}
_SMALL_FLOWS: dict[str, dict[str, Any]] = {
    "none": {},
    "planar": {"num_steps": 4},
    "iaf": {"num_steps": 2, "hidden_dim": 32},
    "orthogonal": {"num_steps": 4, "num_ortho_vecs": 4},
    "householder": {"num_steps": 4, "num_householder": 2},
    "triangular": {"num_steps": 4},
    "ffjord": {"hidden_dims": [64, 64], "rank": 8},
}


def model_config(
    flow: str, size: str = "paper", flow_options: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The :class:`TrainConfig` of the benchmark's model of ``flow`` at ``size`` (see the
    module docstring), with ``flow_options`` over the flow's hyperparameters.

    Raises:
        ValueError: for an unknown flow or size, or a bad option.
    """
    check_choice("size", size, SIZES)
    TrainConfig.check_names(DATASET, flow)
    small = size == "small"
    options = {**(_SMALL_FLOWS[flow] if small else {}), **(flow_options or {})}
    return resolve(DATASET, flow, _SMALL_NETS if small else None, flow_options=options)


@dataclass(frozen=True)
class Variant:
    """A flow and the options of one timed configuration.

    ``overrides`` change the flow's hyperparameters; ``reference_emulation`` imitates what the
    FFJORD paper's code does that vaeflow does not (see :class:`StateCarryingFFJORD`);
    ``cuda_graph`` captures the whole training step in a CUDA graph (fixed-step solvers only).
    ``same_step`` marks a variant that computes the flow's default training step (the same
    model, solver, estimator and gradient, to rounding) in another way: only such a variant
    may stand for the flow in a speed comparison with the paper's code. ``twin_overrides``:
    the eager step a graphed variant's first replays are checked against (None: its own
    overrides; a compiled field then runs uncompiled).
    """

    name: str
    flow: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    reference_emulation: bool = False
    cuda_graph: bool = False
    cuda_only: bool = False
    same_step: bool = False
    twin_overrides: dict[str, Any] | None = None


_RK4 = {"method": "rk4", "solver_options": {"step_size": 0.25}}
_FFJORD_VARIANTS = [
    Variant(
        "ffjord",
        "ffjord",
        {},
        "vaeflow default: dopri5, direct backprop, Rademacher noise, divergence by autograd.grad",
        same_step=True,
    ),
    Variant(
        "ffjord-fused",
        "ffjord",
        {"fused": True},
        "divergence from the hand-written VJP, fused with the field (what compile compiles)",
        same_step=True,
    ),
    Variant("ffjord-adjoint", "ffjord", {"adjoint": True}, "adjoint method instead of direct"),
    Variant("ffjord-gaussian", "ffjord", {"noise": "gaussian"}, "Gaussian Hutchinson noise"),
    Variant(
        "ffjord-compiled",
        "ffjord",
        {"compile": True},
        "torch.compile of the fused field",
        same_step=True,
    ),
    Variant(
        "ffjord-compiled-cudagraphs",
        "ffjord",
        {"compile": "reduce-overhead"},
        "torch.compile mode reduce-overhead: the fused field replayed from CUDA graphs",
        cuda_only=True,
        same_step=True,
    ),
    Variant(
        "ffjord-rk4",
        "ffjord",
        _RK4,
        "fixed-step rk4, 4 steps per block: a different solver, NOT the dopri5 accuracy",
    ),
    Variant(
        "ffjord-rk4-torchdiffeq",
        "ffjord",
        {"method": "rk4", "solver_options": {"step_size": 0.25, "perturb": False}},
        "ffjord-rk4 through torchdiffeq's fixed-grid loop (perturb=False, its default, routes "
        "it there), which reads the device on the host every step: the same function",
    ),
    Variant(
        "ffjord-rk4-cudagraph",
        "ffjord",
        _RK4,
        "ffjord-rk4 with the whole training step captured in one CUDA graph (CUDA only)",
        cuda_graph=True,
    ),
    Variant(
        "ffjord-rk4-compiled-cudagraph",
        "ffjord",
        {**_RK4, "compile": True},
        "ffjord-rk4-cudagraph with the compiled field inside the graph (CUDA only)",
        cuda_graph=True,
    ),
    Variant(
        "ffjord-reference-emulation",
        "ffjord",
        {"adjoint": True, "noise": "gaussian"},
        "EMULATION of the paper code's choices, not its code: amortized tensors carried as ODE "
        "state, adjoint, Gaussian noise, autograd divergence, host copy of each batch, "
        "loss.item() every step",
        reference_emulation=True,
    ),
]
BASELINES = ("none", "planar", "iaf", "orthogonal", "householder", "triangular")
# Every baseline's whole training step in one CUDA graph. The orthogonal Sylvester flow tests
# the convergence of its orthogonalization on the host by default; on the device all
# max_ortho_iters iterations run, Q frozen once the test passes: the same Q bit for bit while
# the test passes within the cap. 30 rather than the default 100 (15 converge at
# initialisation on the paper's model); the check against the default step's eager twin
# (host test, cap 100) tells whether it is still the same step.
_GRAPH_OVERRIDES: dict[str, dict[str, Any]] = {
    "orthogonal": {"ortho_check": "device", "max_ortho_iters": 30}
}
_BASELINE_VARIANTS = [
    *(Variant(name, name, {}, "vaeflow default", same_step=True) for name in BASELINES),
    *(
        Variant(
            f"{name}-cudagraph",
            name,
            _GRAPH_OVERRIDES.get(name, {}),
            f"{name} with the whole training step in one CUDA graph (CUDA only; what "
            "`vaeflow train --set cuda_graph=true"
            + "".join(f" --flow-opt {k}={v}" for k, v in _GRAPH_OVERRIDES.get(name, {}).items())
            + "` runs)",
            cuda_graph=True,
            same_step=True,
            twin_overrides={} if name in _GRAPH_OVERRIDES else None,  # the default step
        )
        for name in BASELINES
    ),
]
VARIANTS: dict[str, Variant] = {v.name: v for v in (*_BASELINE_VARIANTS, *_FFJORD_VARIANTS)}


def get_variant(variant: Variant | str) -> Variant:
    """``variant`` itself, or the registered variant of that name."""
    if isinstance(variant, Variant):
        return variant
    return VARIANTS[check_choice("variant", variant, VARIANTS, "variants")]


def variant_config(variant: Variant | str, size: str = "small") -> TrainConfig:
    """The resolved config of ``variant`` at ``size`` (its overrides applied)."""
    variant = get_variant(variant)
    return model_config(variant.flow, size, variant.overrides)


# --------------------------------------------------------------------------------------------
# The reference emulation
# --------------------------------------------------------------------------------------------


class _StateCarryingField:
    """The FFJORD paper code's way to condition a CNF: the amortized tensors ride in the ODE
    state (``state = (z [B, D], logdet [B], *amortized)``) with zero time derivative, so every
    solver stage, error estimate and adjoint step touches them (27 M floats per block at the
    paper's size); the divergence comes from ``autograd.grad``."""

    def __init__(self, dynamics: Any, end_time: Tensor, eps: Tensor, counter: NFECounter) -> None:
        self.dynamics = dynamics
        self.end_time = end_time
        self.eps = eps
        self.counter = counter

    def __call__(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.counter.tick()
        create_graph = torch.is_grad_enabled()
        z, amortized = state[0], state[2:]
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            f = self.dynamics(s * self.end_time, z, amortized)
            trace, _ = _divergence(f, z, self.eps, create_graph)
        out = (self.end_time * f, self.end_time * trace, *(0.0 * a for a in amortized))
        return out if create_graph else tuple(o.detach() for o in out)


class StateCarryingFFJORD(FFJORD):
    """FFJORD whose training-mode forward carries the amortized tensors in the ODE state, as
    the paper's code does (:class:`_StateCarryingField`). Same function and parameters as
    :class:`FFJORD`; only its cost differs. Used by ``ffjord-reference-emulation`` only."""

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.uses_exact_trace() or self.regularize:
            return super()._forward(z0, h)
        self._counter = counter = NFECounter()
        z, logdet = z0, z0.new_zeros(z0.shape[0])
        for b, dynamics in enumerate(self.blocks):
            amortized = dynamics.amortize(h)
            end_time = self.end_times[b]
            func = _StateCarryingField(dynamics, end_time, self._noise(z), counter)
            state = (z, z.new_zeros(z.shape[0]), *amortized)
            params = (*dynamics.field_parameters(), end_time)
            out = solve(func, state, (0.0, 1.0), self.solver, adjoint_params=params)
            z, logdet = out[0], logdet + out[1]
        return z, logdet


def build_model(variant: Variant | str, size: str = "small", seed: int = 0) -> VAE:
    """The VAE of ``variant`` at ``size``, on the current default device (the CPU unless a
    ``torch.device`` context says otherwise; the caller moves it), seeded so that every
    variant of a flow starts from the same weights."""
    variant = get_variant(variant)
    config = variant_config(variant, size)
    torch.manual_seed(seed)
    model = build_vae(config)
    if variant.reference_emulation:
        # The emulation differs from FFJORD only in its forward method (no state of its own),
        # so the flow just built changes class: the same weights, and no second build of a
        # 145 M-parameter model.
        model.flow.__class__ = StateCarryingFFJORD
    return model
