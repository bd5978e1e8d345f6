"""ODE solves for the continuous flows: option checking, adjoint or direct backprop, NFE counts.

Everything a solve needs is passed in; nothing here keeps global state. Options are checked on
entry against the solver's own signature, so a typo fails before any work is done.

Fixed-step solves (``euler``, ``midpoint``, ``rk4`` with only a ``step_size``) without the adjoint
are integrated here rather than by torchdiffeq, with the same grid and the same arithmetic
(the results agree to rounding): torchdiffeq's fixed-grid loop compares device tensors on the
host at every step, which stalls a GPU, while this loop knows its grid in advance, never
synchronises, and can be captured whole in a CUDA graph.
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

from vaeflow.checks import (
    InputError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    is_number,
)

__all__ = [
    "SOLVERS",
    "ADAPTIVE_SOLVERS",
    "STATIC_SOLVERS",
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


# Fixed-step methods that :func:`solve` integrates itself (see the module docstring).
STATIC_SOLVERS = frozenset({"euler", "midpoint", "rk4"})


def _function(name: str, value: Any) -> Any:
    if not callable(value):
        raise InputError(f"{name} must be a function, got {value!r}")
    return value


def _times(name: str, value: Any) -> list[float]:
    """A list of finite times from a sequence (or a 0-D/1-D tensor) of numbers: the plain
    values that config.json and a checkpoint hold, which torchdiffeq turns into a tensor."""
    if isinstance(value, Tensor) and value.dim() <= 1 and value.is_floating_point():
        value = value.reshape(-1).tolist()
    elif is_number(value):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InputError(f"{name} must be a list of times (numbers), e.g. [0.5], got {value!r}")
    return [check_number(f"each time of {name}", t) for t in value]


# How each option's value is checked on entry; torchdiffeq reads them only inside the solve,
# where a string step count or a norm that is no function fails as a TypeError in its code.
_OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "step_size": lambda n, v: check_number(n, v, positive=True),
    "first_step": lambda n, v: check_number(n, v, positive=True),
    "safety": lambda n, v: check_number(n, v, positive=True),
    "ifactor": lambda n, v: check_number(n, v, positive=True),
    "dfactor": lambda n, v: check_number(n, v, positive=True),
    "max_step": lambda n, v: check_number(n, v, positive=True, finite=False),
    "min_step": lambda n, v: check_number(n, v, nonnegative=True),
    "max_num_steps": lambda n, v: check_int(n, v, minimum=1),
    "max_iters": lambda n, v: check_int(n, v, minimum=1),
    "max_order": lambda n, v: check_int(n, v, minimum=1),
    "perturb": check_bool,
    "implicit": check_bool,
    "interp": lambda n, v: check_choice(n, v, ("linear", "cubic")),
    "solver": lambda n, v: check_choice(n, v, ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")),
    "norm": _function,
    "grid_constructor": _function,
    "step_t": _times,
    "jump_t": _times,
}


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
        # Named as the user writes it: the flow hyperparameter (and --solver, test_solver
        # setting) is solver_options; `options` is only this function's argument.
        raise ValueError(
            f"fixed-step solver {method!r} needs a step size: solver_options={{step_size=H}} "
            "(e.g. solver_options={step_size=0.25}, four steps per solve)"
        )
    for name, value in options.items():
        if name in _OPTION_CHECKS:
            options[name] = _OPTION_CHECKS[name](name, value)
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


_ONE_THIRD = 1 / 3  # the constants of torchdiffeq's rk4 (its 3/8-rule variant), bit for bit
_TWO_THIRDS = 2 / 3

State = tuple[Tensor, ...]


def uses_static_solver(config: SolverConfig) -> bool:
    """Whether :func:`solve` integrates ``config`` itself (fixed step, no adjoint while
    gradients are recorded): then a solve never synchronises with the device."""
    return (
        config.method in STATIC_SOLVERS
        and set(config.options or {}) == {"step_size"}
        and not (config.adjoint and torch.is_grad_enabled())
    )


def _static_grid(t0: float, t1: float, step_size: float, dtype: torch.dtype) -> list[Tensor]:
    """torchdiffeq's grid for ``step_size`` on ``[t0, t1]`` (``t0 < t1``), the last step cut
    short to end at ``t1``: 0-d tensors of ``dtype`` on the host, so reading them is free."""
    # On the CPU by name: under a default-device context (``with torch.device("cuda")``, as a
    # model is built for a run) they would land there, and the .item() below would synchronise
    # (on the meta device, fail) in every solve.
    host = torch.device("cpu")
    start = torch.tensor(t0, dtype=dtype, device=host)
    end = torch.tensor(t1, dtype=dtype, device=host)
    niters = torch.ceil((end - start) / step_size + 1).item()
    grid = torch.arange(0, niters, dtype=dtype, device=host) * step_size + start
    grid[-1] = end
    return list(grid.unbind())


def _static_step(
    method: str, func: Callable[[Tensor, State], State], t0: Tensor, t1: Tensor, y: State
) -> State:
    """One step of ``method`` from ``t0`` to ``t1``: the increment ``y1 - y0``, computed with
    torchdiffeq's formulas in torchdiffeq's order of operations."""
    dt = t1 - t0
    k1 = func(t0, y)
    if method == "euler":
        return tuple(dt * k for k in k1)
    if method == "midpoint":
        half_dt = 0.5 * dt
        k2 = func(t0 + half_dt, tuple(yi + ki * half_dt for yi, ki in zip(y, k1, strict=True)))
        return tuple(dt * k for k in k2)
    k2 = func(
        t0 + dt * _ONE_THIRD,
        tuple(yi + dt * ki * _ONE_THIRD for yi, ki in zip(y, k1, strict=True)),
    )
    k3 = func(
        t0 + dt * _TWO_THIRDS,
        tuple(yi + dt * (b - a * _ONE_THIRD) for yi, a, b in zip(y, k1, k2, strict=True)),
    )
    k4 = func(t1, tuple(yi + dt * (a - b + c) for yi, a, b, c in zip(y, k1, k2, k3, strict=True)))
    return tuple(
        (a + 3 * (b + c) + d) * dt * 0.125 for a, b, c, d in zip(k1, k2, k3, k4, strict=True)
    )


def _static_solve(
    func: Callable[[Tensor, State], State],
    y0: State,
    t0: float,
    t1: float,
    method: str,
    step_size: float,
) -> State:
    """Integrate on the fixed grid; decreasing time is solved as torchdiffeq does, forwards in
    ``-t`` with the field negated."""
    reverse = t1 < t0
    if reverse:
        t0, t1 = -t0, -t1

        def step_func(t: Tensor, y: State) -> State:
            return tuple(-1.0 * f for f in func(-t, y))
    else:
        step_func = func
    grid = _static_grid(t0, t1, step_size, y0[0].dtype)
    y = y0
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        dy = _static_step(method, step_func, a, b, y)
        y = tuple(yi + di for yi, di in zip(y, dy, strict=True))
    return y


def solve(
    func: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    t: Tensor | tuple[float, float],
    config: SolverConfig,
    adjoint_params: Sequence[Tensor] = (),
) -> tuple[Tensor, ...]:
    """Integrate ``dy/dt = func(t, y)`` from ``t[0]`` to ``t[-1]`` and return ``y(t[-1])``.

    Args:
        func: the dynamics, on a tuple state.
        y0: the initial state, a tuple of tensors.
        t: the time points [2], a tensor or two floats (floats spare a fixed-step solve the
            copy of the times to the device). A fixed-step solve calls ``func`` with times as
            0-d host tensors, which combine with tensors on any device as Python numbers do.
        config: the solver and gradient mode.
        adjoint_params: tensors that ``func`` uses and whose gradients the adjoint must return
            (parameters, and tensors computed from the encoder's context).

    Raises:
        SolverError: when the step size underflows or the solver takes too many steps.
    """
    if uses_static_solver(config):
        t0, t1 = (float(x) for x in (t if isinstance(t, tuple) else t.tolist()))
        return _static_solve(func, y0, t0, t1, config.method, float(config.options["step_size"]))
    if not isinstance(t, Tensor):
        t = torch.tensor(t, dtype=y0[0].dtype, device=y0[0].device)
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
            # what to do depends on the caller (a training step, a test solve): it says
            f"ODE solve with {config.method} (atol={config.atol}, rtol={config.rtol}) failed: "
            f"{err} (the dynamics are likely too stiff, or not finite)"
        ) from err
    return tuple(y[-1] for y in ys)
