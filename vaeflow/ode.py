"""ODE solves for the continuous flows: option checking, adjoint or direct backprop, NFE counts.

Everything a solve needs is passed in; nothing here keeps global state. Options are checked on
entry against the solver's own signature, so a typo fails before any work is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS

__all__ = [
    "SOLVERS",
    "ADAPTIVE_SOLVERS",
    "SolverError",
    "NFECounter",
    "SolverConfig",
    "check_solver",
    "solve",
]

# Arguments of a solver's __init__ that the solve fills in itself, not the user.
_INTERNAL_ARGS = {"self", "func", "y0", "rtol", "atol", "dtype", "kwargs", "unused_kwargs"}
# torchdiffeq accepts these for every method (handled before the solver is built).
_COMMON_OPTIONS = {"norm"}


def _solver_options(method: str) -> set[str]:
    names: set[str] = set(_COMMON_OPTIONS)
    for klass in inspect.getmro(SOLVERS[method]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            names.add(name)
    return names - _INTERNAL_ARGS


ADAPTIVE_SOLVERS = frozenset(
    name for name, klass in SOLVERS.items() if "step_size" not in _solver_options(name)
)


class SolverError(RuntimeError):
    """An ODE solve failed (step size underflow, too many steps, non-finite state)."""


def check_solver(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a solver name and its options; return the options as a new dict.

    Raises:
        ValueError: naming the valid methods, or the valid options of ``method``.
    """
    if method not in SOLVERS:
        raise ValueError(
            f"unknown ODE solver method {method!r}; valid methods are {', '.join(sorted(SOLVERS))}"
        )
    options = dict(options or {})
    valid = _solver_options(method)
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for solver {method!r}; "
            f"valid options are {', '.join(sorted(valid))}"
        )
    if (
        method not in ADAPTIVE_SOLVERS
        and "step_size" not in options
        and ("grid_constructor" not in options)
    ):
        raise ValueError(f"fixed-step solver {method!r} needs options={{'step_size': ...}}")
    if "step_size" in options and not float(options["step_size"]) > 0:
        raise ValueError(f"step_size must be positive, got {options['step_size']!r}")
    return options


@dataclass(frozen=True)
class SolverConfig:
    """How to solve: torchdiffeq ``method`` with its ``options``, tolerances, and gradient mode.

    ``adjoint=True`` uses the adjoint method (memory O(1) in the number of steps, one more solve
    backwards); ``False`` backpropagates through the solver's operations (faster when it fits).
    """

    method: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    options: Mapping[str, Any] | None = None
    adjoint: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", check_solver(self.method, self.options))
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")


class NFECounter:
    """Counts function evaluations of one solve: ``forward`` during the solve, ``backward``
    during the adjoint's backward solve (zero with direct backprop).

    Counting is plain Python integer arithmetic: it never synchronizes with the GPU.
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def tick(self) -> None:
        # torchdiffeq's adjoint runs its backward solve inside autograd's backward pass, the only
        # time the dynamics are called while the autograd engine executes a node.
        if torch._C._current_autograd_node() is not None:
            self.backward += 1
        else:
            self.forward += 1


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


def _step_norm(norm: Callable[[tuple[Tensor, ...]], Tensor] | None):
    """The error norm for step-size control, fed detached tensors.

    The step sizes an adaptive solver picks depend on the state; without the detach, direct
    backpropagation would differentiate through that choice, and the gradient (and the Jacobian
    of the computed map) would pick up terms that belong to the controller, not to the flow.
    """

    def detached(ys: tuple[Tensor, ...]) -> Tensor:
        ys = tuple(y.detach() for y in ys)
        if norm is not None:
            return norm(ys)
        return torch.stack([_rms(y) for y in ys]).max()

    return detached


def solve(
    func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    t: Tensor,
    config: SolverConfig,
    adjoint_params: Sequence[Tensor] = (),
) -> tuple[Tensor, ...]:
    """Integrate ``dy/dt = func(t, y)`` from ``t[0]`` to ``t[-1]`` and return ``y(t[-1])``.

    Args:
        func: the dynamics, on a tuple state.
        y0: the initial state, a tuple of tensors.
        t: the time points [2].
        config: the solver and gradient mode.
        adjoint_params: tensors that ``func`` uses and whose gradients the adjoint must return
            (parameters, and tensors computed from the encoder's context).

    Raises:
        SolverError: when the step size underflows or the solver takes too many steps.
    """
    options = dict(config.options)
    if config.method in ADAPTIVE_SOLVERS:
        options["norm"] = _step_norm(options.get("norm"))
    kwargs: dict[str, Any] = dict(
        rtol=config.rtol, atol=config.atol, method=config.method, options=options
    )
    try:
        if config.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in adjoint_params if p.requires_grad)
            ys = odeint_adjoint(func, y0, t, adjoint_params=params, **kwargs)
        else:
            ys = odeint(func, y0, t, **kwargs)
    except AssertionError as err:  # torchdiffeq signals underflow and step limits by assert
        raise SolverError(
            f"ODE solve with {config.method} (atol={config.atol}, rtol={config.rtol}) failed: "
            f"{err}. The dynamics are likely too stiff or non-finite; lower the learning rate, "
            "regularize the dynamics, or loosen the tolerances."
        ) from err
    return tuple(y[-1] for y in ys)
