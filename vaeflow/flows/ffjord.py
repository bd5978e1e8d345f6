"""Amortized FFJORD (Grathwohl et al. 2019): a continuous normalizing flow whose dynamics
depend on the encoder's context ``h(x)``.

Each block solves, over ``s`` in [0, 1] with ``t = s T``,

    dz/ds = T f(z, t; h),    d logdet/ds = T tr(df/dz),

so an end time ``T`` that is learned (``train_end_time=True``; fixed by default, as in the
paper) is an ordinary parameter of the dynamics: both direct backpropagation and the adjoint
give its exact gradient. The trace is estimated with
Hutchinson's estimator ``eps^T (df/dz) eps`` (one vector-Jacobian product per evaluation, ``eps``
drawn once per solve) in training, and computed exactly in evaluation.

This module is over 500 lines because each dynamics' hand-written vector-Jacobian product (the
fast path of the trace) must mirror its forward pass line for line, so the two sit together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import InputError, check_bool, check_number, input_errors
from ..ode import ADAPTIVE_SOLVERS, NFECounter, SolverConfig, solve, uses_static_solver
from .base import ContextHead, Flow, check_choice, check_positive_int

__all__ = [
    "FFJORD",
    "LowRankDynamics",
    "ConcatDynamics",
    "DYNAMICS",
    "LOWRANK_INITS",
    "NONLINEARITIES",
]

NONLINEARITIES = {
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "elu": F.elu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}
# d act / d x from the input x and the output y = act(x), for the fused VJP. Each is the
# derivative that autograd uses for the same function (softplus: linear above its threshold 20).
NONLINEARITY_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "softplus": lambda x, y: torch.where(x > 20.0, 1.0, torch.sigmoid(x)),
    "tanh": lambda x, y: 1.0 - y * y,
    # the branch not taken is computed too: exp of a large x would be inf, and 0 * inf a NaN
    "elu": lambda x, y: torch.where(x > 0, 1.0, torch.exp(x.clamp(max=0.0))),
    "silu": lambda x, y: torch.sigmoid(x) * (1.0 + x * (1.0 - torch.sigmoid(x))),
    "sigmoid": lambda x, y: y * (1.0 - y),
}
TRACES = ("hutchinson", "exact")
NOISES = ("gaussian", "rademacher")
# How the low-rank field's per-sample update starts (see LowRankDynamics).
LOWRANK_INITS = ("reference", "small")


class _Dynamics(nn.Module):
    """A field ``f(t, z; h)``. :meth:`amortize` computes the per-sample tensors from ``h`` once
    per solve; :meth:`forward` evaluates ``f`` at every solver step with them.

    A field that also implements :meth:`forward_and_vjp` (and sets ``supports_vjp = True``)
    gets the fused divergence: its vector-Jacobian products are written out by hand, plain
    tensor operations that need no inner ``autograd.grad`` and that ``torch.compile`` can fuse.
    """

    layers: nn.ModuleList
    supports_vjp: bool = False

    def amortize(self, h: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def forward(self, t: Tensor, z: Tensor, amortized: Sequence[Tensor]) -> Tensor:
        return self._field(t, z, amortized, keep=False)[0]

    def _field(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], keep: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """``f [B, D]`` and, when ``keep``, the activation derivatives of the hidden layers."""
        raise NotImplementedError

    def _activate(self, pre: Tensor, is_last: bool, act_grads: list[Tensor] | None) -> Tensor:
        """The layer output from its pre-activation; records ``act'(pre)`` in ``act_grads``."""
        if is_last:
            return pre
        x = self.act(pre)
        if act_grads is not None:
            act_grads.append(self.act_grad(pre, x))
        return x

    def forward_and_vjp(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], probes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``f(t, z) [B, D]`` and the products ``probes^T df/dz [B, K, D]`` for ``K`` probe
        vectors per sample, ``probes [B, K, D]``."""
        raise NotImplementedError(f"{type(self).__name__} has no fused vector-Jacobian product")

    def field_parameters(self) -> list[nn.Parameter]:
        """The parameters used inside the field; those used only by :meth:`amortize` get their
        gradients through the amortized tensors, so the adjoint need not integrate them."""
        return list(self.layers.parameters())


class LowRankDynamics(_Dynamics):
    """The FFJORD paper's amortized field: an MLP ``D -> hidden... -> D`` whose layer ``i`` has
    weight ``W_i + U_i(h) V_i(h)^T`` (shared plus a rank-``r`` per-sample update) and bias
    ``b_i + c_i(h)``; time enters every layer as an extra input.

    Args:
        dim: D.
        context_dim: H.
        hidden_dims: widths of the hidden layers.
        rank: r of the per-sample update.
        nonlinearity: a name in ``NONLINEARITIES``.
        init: ``"small"`` (default): the head starts ``sqrt(r)`` below PyTorch's default and
            ``V`` is divided by ``sqrt(fan-in)`` throughout training, so a fresh update is tiny
            against the shared weights' output whatever the scale of ``h`` (and, under
            Adam(ax), ``V`` moves ``sqrt(fan-in)`` times slower). ``"reference"`` (the paper's
            code, which the per-data-set configs use): ``U, V, c`` come from one linear head
            with PyTorch's default initialisation, used as they are. How large the update then
            starts depends on the scale of ``h``: at the paper's MNIST size, with its gated-conv
            encoder, ~15 % of the shared output (``"small"``: ~0.03 %); with a unit-scale
            ``h`` of a few hundred entries it dominates and the field is stiff.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int],
        rank: int,
        nonlinearity: str,
        init: str = "small",
    ) -> None:
        super().__init__()
        check_choice("lowrank_init", init, LOWRANK_INITS)
        self.act = NONLINEARITIES[nonlinearity]
        self.act_grad = NONLINEARITY_GRADS[nonlinearity]
        widths = [dim, *hidden_dims, dim]
        self.layers = nn.ModuleList(
            nn.Linear(d_in + 1, d_out) for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            shapes[f"u{i}"] = (d_out, rank)
            shapes[f"v{i}"] = (d_in, rank)
            shapes[f"c{i}"] = (d_out,)
        small = init == "small"
        self.head = ContextHead(context_dim, shapes, init_scale=rank**-0.5 if small else 1.0)
        # V's factor per layer ("small": 1/sqrt(fan-in)), saved with the parameters: a model
        # loaded from a checkpoint computes the function it was trained as, whatever its config.
        scales = [(layer.in_features - 1) ** -0.5 if small else 1.0 for layer in self.layers]
        self.register_buffer("v_scale", torch.tensor(scales))

    def amortize(self, h: Tensor) -> tuple[Tensor, ...]:
        p = self.head(h)
        out: list[Tensor] = []
        for i in range(len(self.layers)):  # V scaled once per solve, not per step
            out += [p[f"u{i}"], p[f"v{i}"] * self.v_scale[i], p[f"c{i}"]]
        return tuple(out)

    supports_vjp = True

    def _field(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], keep: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """``f [B, D]`` and, when ``keep``, the activation derivatives of the hidden layers."""
        x = z
        tt = t.to(z.dtype).expand(z.shape[0], 1)
        last = len(self.layers) - 1
        act_grads: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            u, v, c = amortized[3 * i : 3 * i + 3]  # [B, out, r], [B, in, r], [B, out]
            low_rank = torch.einsum("bor,br->bo", u, torch.einsum("bi,bir->br", x, v))
            pre = layer(torch.cat([x, tt], dim=-1)) + low_rank + c
            x = self._activate(pre, i == last, act_grads if keep else None)
        return x, act_grads

    def forward_and_vjp(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], probes: Tensor
    ) -> tuple[Tensor, Tensor]:
        f, act_grads = self._field(t, z, amortized, keep=True)
        g = probes  # [B, K, out] -> [B, K, in], layer by layer from the output
        for i in reversed(range(len(self.layers))):
            if i < len(act_grads):
                g = g * act_grads[i].unsqueeze(1)
            u, v = amortized[3 * i], amortized[3 * i + 1]
            w = self.layers[i].weight[:, :-1]  # the time column does not depend on z
            low_rank = torch.einsum("bkr,bir->bki", torch.einsum("bko,bor->bkr", g, u), v)
            g = g @ w + low_rank
        return f, g


class ConcatDynamics(_Dynamics):
    """A cheaper conditioning: an MLP on ``[z, t, g(h)]`` with ``g`` a linear projection of the
    context computed once per solve; time also enters every hidden layer.

    Args:
        dim: D.
        context_dim: H.
        hidden_dims: widths of the hidden layers.
        nonlinearity: a name in ``NONLINEARITIES``.
        context_proj_dim: size of ``g(h)`` (default 32).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int],
        nonlinearity: str,
        context_proj_dim: int = 32,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.act = NONLINEARITIES[nonlinearity]
        self.act_grad = NONLINEARITY_GRADS[nonlinearity]
        self.proj = nn.Linear(context_dim, context_proj_dim)
        widths = [dim + context_proj_dim, *hidden_dims, dim]
        self.layers = nn.ModuleList(
            nn.Linear(d_in + 1, d_out) for d_in, d_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def amortize(self, h: Tensor) -> tuple[Tensor, ...]:
        return (self.proj(h),)

    supports_vjp = True

    def _field(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], keep: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """``f [B, D]`` and, when ``keep``, the activation derivatives of the hidden layers."""
        tt = t.to(z.dtype).expand(z.shape[0], 1)
        x = torch.cat([z, amortized[0]], dim=-1)
        last = len(self.layers) - 1
        act_grads: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            pre = layer(torch.cat([x, tt], dim=-1))
            x = self._activate(pre, i == last, act_grads if keep else None)
        return x, act_grads

    def forward_and_vjp(
        self, t: Tensor, z: Tensor, amortized: Sequence[Tensor], probes: Tensor
    ) -> tuple[Tensor, Tensor]:
        f, act_grads = self._field(t, z, amortized, keep=True)
        g = probes
        for i in reversed(range(len(self.layers))):
            if i < len(act_grads):
                g = g * act_grads[i].unsqueeze(1)
            # The first layer's inputs are [z, g(h), t]: only the z columns carry on.
            w = self.layers[i].weight[:, : self.dim] if i == 0 else self.layers[i].weight[:, :-1]
            g = g @ w
        return f, g


DYNAMICS = {"lowrank": LowRankDynamics, "concat": ConcatDynamics}


def _divergence(
    f: Tensor, z: Tensor, eps: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """``tr(df/dz)`` per sample, and ``||df/dz||_F^2`` (its estimate for Hutchinson).

    Exact when ``eps`` is None (D vector-Jacobian products), else Hutchinson with ``eps [B, D]``.
    Samples must not interact inside ``f`` (true of every field here), so a batch-summed VJP
    gives each sample's own row.
    """
    if eps is not None:
        (vjp,) = torch.autograd.grad(f, z, eps, create_graph=create_graph)
        return (vjp * eps).sum(-1), (vjp * vjp).sum(-1)
    trace = f.new_zeros(f.shape[0])
    frob = f.new_zeros(f.shape[0])
    for i in range(f.shape[1]):
        (row,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        trace = trace + row[:, i]
        frob = frob + (row * row).sum(-1)
    return trace, frob


def fused_augmented_field(
    dynamics: _Dynamics,
    s: Tensor,
    z: Tensor,
    end_time: Tensor,
    amortized: tuple[Tensor, ...],
    probes: Tensor,
    regularize: bool,
) -> tuple[Tensor, ...]:
    """The augmented field of :class:`_BlockODE` with the fused divergence, as one function of
    tensors (what ``compile=True`` hands to ``torch.compile``).

    ``z [B, D]``; ``probes [B, K, D]`` are the Hutchinson noise (``K = 1``) or the identity
    (``K = D``, the exact trace). Returns ``T f [B, D]``, ``T tr [B]`` and, when
    ``regularize``, ``T ||f||^2 [B]`` and ``T ||probes^T df/dz||^2 [B]``.
    """
    f, vjp = dynamics.forward_and_vjp(s * end_time, z, amortized, probes)
    out = (end_time * f, end_time * (vjp * probes).sum((-2, -1)))
    if regularize:
        out = out + (end_time * (f * f).sum(-1), end_time * (vjp * vjp).sum((-2, -1)))
    return out


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _CompiledField:
    """``torch.compile`` of :func:`fused_augmented_field`, falling back to the eager function,
    with one warning, wherever compilation is unavailable (no C compiler, an unsupported Python
    or platform). The compiled function takes the dynamics as an argument, so it holds no
    reference to a module and one compiled graph serves every block of the same shape."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fn: Callable[..., tuple[Tensor, ...]] | None = None
        self.fallback_reason: str | None = None  # why it runs eagerly, once it gave up
        try:
            self.fn = torch.compile(fused_augmented_field, mode=mode)
        except Exception as err:  # torch.compile refuses some Python versions up front
            self._give_up(err)

    def _give_up(self, err: Exception) -> None:
        self.fn = None
        self.fallback_reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        warnings.warn(
            f"FFJORD(compile=...): torch.compile is unavailable here ({self.fallback_reason}); "
            "using the eager fused field, which computes the same function more slowly",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, *args: Any) -> tuple[Tensor, ...]:
        if self.fn is None:
            return fused_augmented_field(*args)
        try:
            return self.fn(*args)
        except Exception as err:
            # A fault in the field itself raises again here, from the eager code.
            out = fused_augmented_field(*args)
            self._give_up(err)
            return out


class _BlockODE:
    """The augmented dynamics of one block for one solve, on the state
    ``(z [B, D], logdet [B][, kinetic [B], jacobian_frobenius [B]])`` over ``s`` in [0, 1].

    ``fused``, when given, evaluates it all in one call (:func:`fused_augmented_field` or its
    compiled form); otherwise the divergence comes from ``autograd.grad`` of the field.
    """

    def __init__(
        self,
        dynamics: _Dynamics,
        amortized: tuple[Tensor, ...],
        end_time: Tensor,
        eps: Tensor | None,
        regularize: bool,
        counter: NFECounter,
        fused: Callable[..., tuple[Tensor, ...]] | None = None,
    ) -> None:
        self.dynamics = dynamics
        self.amortized = amortized
        self.end_time = end_time
        self.eps = eps
        self.regularize = regularize
        self.counter = counter
        self.fused = fused
        self.probes = None if eps is None else eps.unsqueeze(1)

    def __call__(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.counter.tick()
        if self.fused is not None:
            if self.probes is None:  # exact trace: the D unit vectors, one product each
                z = state[0]
                eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
                self.probes = eye.expand(z.shape[0], -1, -1)
            return self.fused(
                self.dynamics,
                s,
                state[0],
                self.end_time,
                self.amortized,
                self.probes,
                self.regularize,
            )
        create_graph = torch.is_grad_enabled()
        z = state[0]
        with torch.enable_grad():
            # A state that is not part of a graph we must extend (no-grad solves, the adjoint's
            # forward pass) gets a fresh leaf, so the divergence's VJP always reaches z.
            if not (create_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            f = self.dynamics(s * self.end_time, z, self.amortized)
            trace, frob = _divergence(f, z, self.eps, create_graph)
        T = self.end_time
        out = (T * f, T * trace)
        if self.regularize:
            out = out + (T * (f * f).sum(-1), T * frob)
        if not create_graph:
            out = tuple(o.detach() for o in out)
        return out


# What :meth:`FFJORD.replace_solver` may change: the solve, not the model or its gradient.
SOLVER_SETTINGS = ("method", "atol", "rtol", "solver_options")


def _solver(
    method: str, atol: Any, rtol: Any, options: Any, adjoint: bool
) -> SolverConfig:
    """The checked :class:`SolverConfig` of the hyperparameters of the same names."""
    atol = check_number("atol", atol, positive=True)
    rtol = check_number("rtol", rtol, positive=True)
    if options is not None and not isinstance(options, Mapping):
        raise InputError(
            f"solver_options must be a table such as {{step_size = 0.1}}, got {options!r}"
        )
    with input_errors():
        config = SolverConfig(method=method, atol=atol, rtol=rtol, options=options,
                              adjoint=adjoint)
    step = (config.options or {}).get("step_size")
    # Each block solves over s in [0, 1] (the time rescaled by T), and a step longer than the
    # interval is cut to it: step_size=2 would quietly be one step, not what it says.
    if step is not None and step > 1:  # a float: check_solver checked it
        raise InputError(
            f"step_size must be at most 1, got {step!r}: FFJORD integrates over s in [0, 1] "
            "(the time t = s T rescaled by the end time), so step_size=1/N takes N steps"
        )
    return config


class FFJORD(Flow):
    """Amortized FFJORD: ``num_blocks`` continuous flows in sequence, each with dynamics
    conditioned on the context ``h`` and its own end time (fixed by default, as in the paper's
    amortized models; learnable with ``train_end_time=True``).

    Args:
        dim: latent size D.
        context_dim: context size H.
        dynamics: ``"lowrank"`` (the paper's: shared weights plus a rank-``rank`` per-sample
            update and a per-sample bias) or ``"concat"`` (``[z, t, proj(h)]`` as input).
        hidden_dims: hidden widths of the field's MLP (default (512, 512); the paper's MNIST
            model uses (1024, 1024) with rank 64 and 2 blocks).
        rank: rank of the per-sample weight update for ``"lowrank"`` (default 8).
        lowrank_init: how that update starts: ``"small"`` (default, safe for a context of
            any scale) or ``"reference"`` (the paper's code; its configs use it); see
            :class:`LowRankDynamics`.
        num_blocks: number of CNF blocks (default 1).
        nonlinearity: one of ``NONLINEARITIES`` (default ``"softplus"``).
        end_time: (initial) integration time T of each block (default 0.5).
        train_end_time: learn T (default False: the FFJORD paper's amortized VAEs keep T = 0.5
            fixed; learning it is a departure, one more parameter per block).
        trace: ``"hutchinson"`` or ``"exact"``, used in training mode (default hutchinson).
        exact_in_eval: use the exact trace in eval mode whatever ``trace`` says (default True).
        noise: ``"rademacher"`` or ``"gaussian"`` Hutchinson noise (default rademacher, the
            lower-variance choice).
        method: torchdiffeq solver (default ``"dopri5"``).
        atol, rtol: solver tolerances (default 1e-5 each).
        solver_options: solver options (e.g. ``{"step_size": 0.1}`` for fixed-step methods),
            checked on construction.
        adjoint: use the adjoint method for gradients (default False: direct backpropagation
            through the solver, faster when memory allows).
        regularize: also integrate the RNODE terms (kinetic energy and Jacobian Frobenius norm),
            readable per sample from :attr:`last_regularization` after each forward.
        context_proj_dim: the projection size for ``"concat"`` dynamics (default 32).
        fused: compute the divergence from vector-Jacobian products written out by hand, in
            one pass with the field, rather than with an inner ``autograd.grad``. The same
            function to rounding. ``None`` (default): fused for the exact trace, where it
            replaces D sequential ``autograd.grad`` calls by one batched pass over the D unit
            vectors (6x faster at the paper's MNIST size on a CPU), and autograd for
            Hutchinson's single product (about the same work either way in eager mode).
            ``True``: always fused (what ``compile`` compiles); ``False``: never. Fields
            without a hand-written product (``supports_vjp = False``) use ``autograd.grad``
            whatever this says.
        compile: ``torch.compile`` the fused field (default False; implies ``fused``): ``True``
            or a mode in ``COMPILE_MODES``. The first calls compile (seconds to a minute or
            more); where compilation is unavailable, a warning says so and the eager fused
            field runs.

    A fixed-step ``method`` (``"euler"``, ``"midpoint"``, ``"rk4"`` with ``{"step_size": h}``)
    without the adjoint never synchronises with the device (see :mod:`vaeflow.ode`).

    After a forward, :attr:`nfe_forward` and :attr:`nfe_backward` count the function
    evaluations of that call's solves (the backward count fills in once ``backward()`` runs,
    and stays 0 with direct backpropagation).
    """

    has_inverse = True

    def __init__(
        self,
        dim: int,
        context_dim: int,
        dynamics: str = "lowrank",
        hidden_dims: Sequence[int] = (512, 512),
        rank: int = 8,
        lowrank_init: str = "small",
        num_blocks: int = 1,
        nonlinearity: str = "softplus",
        end_time: float = 0.5,
        train_end_time: bool = False,
        trace: str = "hutchinson",
        exact_in_eval: bool = True,
        noise: str = "rademacher",
        method: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        solver_options: dict[str, Any] | None = None,
        adjoint: bool = False,
        regularize: bool = False,
        context_proj_dim: int = 32,
        fused: bool | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(dim, context_dim)
        check_choice("dynamics", dynamics, DYNAMICS)
        check_choice("lowrank_init", lowrank_init, LOWRANK_INITS)
        check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        check_choice("trace", trace, TRACES)
        check_choice("noise", noise, NOISES)
        if isinstance(hidden_dims, str | bytes) or not isinstance(hidden_dims, Sequence):
            raise InputError(
                f"hidden_dims must be a list of positive integers, got {hidden_dims!r}"
            )
        hidden_dims = tuple(check_positive_int("hidden_dims entry", w) for w in hidden_dims)
        check_positive_int("num_blocks", num_blocks)
        end_time = check_number("end_time", end_time, positive=True)
        # Booleans from a command line or a hand-written file: "False" must not count as true.
        train_end_time = check_bool("train_end_time", train_end_time)
        exact_in_eval = check_bool("exact_in_eval", exact_in_eval)
        adjoint = check_bool("adjoint", adjoint)
        regularize = check_bool("regularize", regularize)
        if fused is not None:
            fused = check_bool("fused", fused)
        if isinstance(compile, str) and compile.lower() in ("true", "false"):
            compile = check_bool("compile", compile)
        if isinstance(compile, str):
            check_choice("compile mode", compile, COMPILE_MODES)
        elif not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, got {compile!r}")
        self.solver = _solver(method, atol, rtol, solver_options, adjoint)
        if method == "scipy_solver" and not self.solver.adjoint:
            # Its solve runs in numpy: the state it returns has no autograd graph, so training
            # would leave the flow (and the encoder's mean) without gradients and say nothing.
            # (As an evaluation solve, test_solver or --solver, which needs none, it is fine.)
            raise InputError(
                "method 'scipy_solver' gives no gradients through its solve: train with "
                "adjoint=True or another method (it may still be the test_solver)"
            )
        self.trace = trace
        self.exact_in_eval = exact_in_eval
        self.noise = noise
        self.regularize = regularize
        self.compile_mode: str | None = (
            compile if isinstance(compile, str) else ("default" if compile else None)
        )
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused: bool | None = True if self.compile_mode is not None else fused
        self._compiled: _CompiledField | None = None
        self.config = dict(
            dynamics=dynamics,
            hidden_dims=hidden_dims,
            rank=rank,
            lowrank_init=lowrank_init,
            num_blocks=num_blocks,
            nonlinearity=nonlinearity,
            end_time=end_time,
            train_end_time=train_end_time,
        )
        # Both checked whichever dynamics reads them: a sweep of rank=-7 with concat dynamics
        # must not pass for a model that silently ignores it.
        check_positive_int("rank", rank)
        check_positive_int("context_proj_dim", context_proj_dim)
        if dynamics == "lowrank":

            def make() -> _Dynamics:
                return LowRankDynamics(
                    dim, context_dim, hidden_dims, rank, nonlinearity, lowrank_init
                )
        else:

            def make() -> _Dynamics:
                return ConcatDynamics(dim, context_dim, hidden_dims, nonlinearity, context_proj_dim)

        self.blocks = nn.ModuleList(make() for _ in range(num_blocks))
        log_t = torch.full((num_blocks,), math.log(end_time))
        if train_end_time:
            self.log_end_time = nn.Parameter(log_t)
        else:
            self.register_buffer("log_end_time", log_t)
        self._counter = NFECounter()
        self.last_regularization: dict[str, Tensor] = {}

    @property
    def end_times(self) -> Tensor:
        """The integration times ``T`` of the blocks, ``[num_blocks]``."""
        return self.log_end_time.exp()

    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the solves in the last forward (or inverse) call."""
        return self._counter.forward

    @property
    def nfe_backward(self) -> int:
        """Function evaluations of the adjoint solves in the backward of the last call."""
        return self._counter.backward

    def statistics(self) -> dict[str, int]:
        return {"nfe_forward": self._counter.forward, "nfe_backward": self._counter.backward}

    @contextlib.contextmanager
    def evaluation_trace(self, exact: bool | None = True) -> Iterator[None]:
        saved = self.exact_in_eval
        self.exact_in_eval = saved if exact is None else exact
        try:
            yield
        finally:
            self.exact_in_eval = saved

    def graph_blocker(self) -> str | None:
        if uses_static_solver(self.solver):
            return None
        adjoint = " with the adjoint" if self.solver.adjoint else ""
        return (
            f"CUDA graphs need a fixed-step solver without the adjoint (this flow uses "
            f"{self.solver.method!r}{adjoint}; e.g. --flow-opt method=rk4 "
            "--flow-opt solver_options={step_size=0.25})"
        )

    def tighten_solver(self, factor: float = 10.0) -> dict[str, float]:
        # Set directly, not through replace_solver: a fixed-step flow keeps tolerances too
        # (its test figures are solved with dopri5 at them), though its own solve ignores them.
        self.solver = _solver(self.solver.method, self.solver.atol / factor,
                              self.solver.rtol / factor, self.solver.options, self.solver.adjoint)
        return {"atol": self.solver.atol, "rtol": self.solver.rtol}

    def replace_solver(self, **settings: Any) -> dict[str, Any]:
        unknown = sorted(set(settings) - set(SOLVER_SETTINGS))
        if unknown:
            raise InputError(
                f"unknown solver setting(s) {', '.join(map(repr, unknown))}; valid settings are "
                f"{', '.join(SOLVER_SETTINGS)}"
            )
        old = self.solver
        method = settings.get("method", old.method)
        # rk4's step_size means nothing to dopri5: a new method starts from no options.
        options = settings.get("solver_options", old.options if method == old.method else None)
        given = sorted({"atol", "rtol"} & set(settings))
        if given and method not in ADAPTIVE_SOLVERS:
            # A fixed-step solve takes no error-controlled steps: the tolerances would be
            # accepted and change nothing.
            raise InputError(
                f"{' and '.join(given)} {'mean' if len(given) > 1 else 'means'} nothing to the "
                f"fixed-step solver {method!r}, which "
                f"controls no error; drop {'them' if len(given) > 1 else 'it'}, or set its step "
                "with solver_options={step_size=H}"
            )
        atol, rtol = settings.get("atol", old.atol), settings.get("rtol", old.rtol)
        self.solver = _solver(method, atol, rtol, options, old.adjoint)
        return self.get_extra_state()

    # The solver's settings travel in the state_dict (``_extra_state``): a model trained on
    # after a NaN retry tightened them is evaluated at the tolerances it was trained with.
    # (``options`` is recorded, for the reports; the options in use come from the config.)
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "method": self.solver.method, "atol": self.solver.atol, "rtol": self.solver.rtol,
            "options": dict(self.solver.options or {}),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("method") != self.solver.method:
            raise ValueError(
                f"the saved FFJORD solver state {state!r} does not belong to a flow solved with "
                f"{self.solver.method!r}"
            )
        self.solver = dataclasses.replace(
            self.solver, atol=float(state["atol"]), rtol=float(state["rtol"])
        )

    def uses_exact_trace(self, training: bool | None = None) -> bool:
        """Whether the next call computes the exact trace (eval mode, or ``trace="exact"``);
        ``training`` asks it of that mode instead of the flow's own."""
        training = self.training if training is None else training
        return self.trace == "exact" or (not training and self.exact_in_eval)

    def _noise(self, z: Tensor) -> Tensor:
        if self.noise == "gaussian":
            return torch.randn_like(z)
        return torch.randint_like(z, 0, 2).mul_(2).sub_(1)

    def _fused_field(
        self, dynamics: _Dynamics, exact: bool
    ) -> Callable[..., tuple[Tensor, ...]] | None:
        """The fused evaluation for ``dynamics`` (compiled if asked), or None for autograd."""
        fused = exact if self.fused is None else self.fused
        if not (fused and dynamics.supports_vjp):
            return None
        if self.compile_mode is None:
            return fused_augmented_field
        if self._compiled is None:
            self._compiled = _CompiledField(self.compile_mode)
        return self._compiled

    def _solve(self, z: Tensor, h: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
        self._counter = counter = NFECounter()
        exact = self.uses_exact_trace()
        end_times = self.end_times
        order = range(len(self.blocks))
        span = (1.0, 0.0) if reverse else (0.0, 1.0)
        logdet = z.new_zeros(z.shape[0])
        reg = [z.new_zeros(z.shape[0]), z.new_zeros(z.shape[0])]
        for b in reversed(order) if reverse else order:
            dynamics = self.blocks[b]
            field = self._fused_field(dynamics, exact)
            if field is None and torch.is_inference_mode_enabled():
                # the trace's vector-Jacobian product needs autograd, which inference mode
                # cannot turn back on (torch would say only "does not require grad")
                raise RuntimeError(
                    "FFJORD's trace here needs autograd, which torch.inference_mode() turns off"
                    ": use torch.no_grad() instead, or build the flow with fused=True (whose "
                    "field computes its own products)"
                )
            amortized = dynamics.amortize(h)
            func = _BlockODE(
                dynamics,
                amortized,
                end_times[b],
                None if exact else self._noise(z),
                self.regularize,
                counter,
                field,
            )
            state = (z, z.new_zeros(z.shape[0]))
            if self.regularize:
                state = state + (z.new_zeros(z.shape[0]), z.new_zeros(z.shape[0]))
            params = (*dynamics.field_parameters(), func.end_time, *amortized)
            out = solve(func, state, span, self.solver, adjoint_params=params)
            z = out[0]
            logdet = logdet + out[1]
            if self.regularize:
                reg = [reg[0] + out[2], reg[1] + out[3]]
        if self.regularize:
            sign = -1.0 if reverse else 1.0
            self.last_regularization = {
                "kinetic": sign * reg[0],
                "jacobian_frobenius": sign * reg[1],
            }
        # Integrating backwards in s accumulates minus the forward log-determinant.
        return z, -logdet if reverse else logdet

    def _forget_last_call(self, z: Tensor) -> None:
        self._counter = NFECounter()  # no solve ran
        if self.regularize:
            self.last_regularization = {name: z.new_zeros(0)
                                        for name in ("kinetic", "jacobian_frobenius")}

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(z0, h, reverse=False)

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(zK, h, reverse=True)

    def extra_repr(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return (
            f"{super().extra_repr()}, {items}, trace={self.trace}, noise={self.noise}, "
            f"solver={self.solver.method}, atol={self.solver.atol}, rtol={self.solver.rtol}, "
            f"adjoint={self.solver.adjoint}, fused={self.fused}, compile={self.compile_mode}"
        )
