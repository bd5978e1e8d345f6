"""The flow interface shared by every posterior flow, and small helpers the flows share.

A flow maps a base-posterior sample ``z0`` to ``zK`` conditioned on a context vector ``h`` that
the encoder computes from ``x``. Every flow returns the log-determinant of that map, so that

    log qK(zK | x) = log q0(z0 | x) - logdet.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vaeflow.checks import InputError, check_choice, check_positive_int

__all__ = [
    "Flow", "Identity", "Sequential", "ContextHead", "check_choice", "check_inputs",
    "check_positive_int", "use_solver",
]


def check_inputs(flow: Flow, z: Tensor, h: Tensor) -> None:
    """Raise a clear error when ``z [B, D]`` or ``h [B, H]`` do not fit ``flow``."""
    if z.dim() != 2 or z.shape[1] != flow.dim:
        raise ValueError(
            f"{type(flow).__name__} expects z of shape [B, {flow.dim}], got {tuple(z.shape)}"
        )
    if h.dim() != 2 or h.shape[1] != flow.context_dim or h.shape[0] != z.shape[0]:
        raise ValueError(
            f"{type(flow).__name__} expects a context h of shape [{z.shape[0]}, "
            f"{flow.context_dim}], got {tuple(h.shape)}"
        )
    # One rule for every flow: inputs in the flow's own floating dtype (no silent promotion,
    # no raw matmul error from deep inside a solver).
    ref = next(itertools.chain(flow.parameters(), flow.buffers()), None)
    if ref is not None and ref.is_floating_point():
        for name, t in (("z", z), ("h", h)):
            if t.dtype != ref.dtype:
                raise ValueError(
                    f"{type(flow).__name__} holds {ref.dtype} parameters but got {name} of dtype "
                    f"{t.dtype}; convert the inputs (e.g. {name}.to({ref.dtype})) or the flow "
                    f"(flow.to({t.dtype}))"
                )


class Flow(nn.Module):
    """An amortized normalizing flow ``z0 -> zK`` conditioned on a context ``h``.

    Subclasses implement :meth:`_forward` (and :meth:`_inverse` where the map has an inverse that
    can be computed). Constructors take ``(dim, context_dim, **hyperparameters)``.

    Attributes:
        dim: size D of the latent variable.
        context_dim: size H of the context vector produced by the encoder.
        has_inverse: whether :meth:`inverse` is implemented.
    """

    has_inverse: bool = False

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.context_dim = check_positive_int("context_dim", context_dim)

    def forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Push ``z0 [B, D]`` through the flow conditioned on ``h [B, H]``.

        Returns:
            ``(zK [B, D], logdet [B])`` with ``logdet = log |det d zK / d z0|`` (for a continuous
            flow in training mode: an unbiased estimate of it).
        """
        check_inputs(self, z0, h)
        if z0.shape[0] == 0:
            return self._empty_call(z0)
        return self._forward(z0, h)

    def inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the flow: ``zK [B, D]`` and ``h [B, H]`` -> ``(z0 [B, D], logdet [B])``.

        ``logdet`` is that of the forward map at the returned ``z0``, ``log |det d zK / d z0|``,
        so ``log qK(zK) = log q0(z0) - logdet`` in both directions.

        Raises:
            NotImplementedError: for flows without an inverse that can be computed.
        """
        check_inputs(self, zK, h)
        if not self.has_inverse:
            raise NotImplementedError(
                f"{type(self).__name__} has no inverse that can be computed; only samples it "
                "produced itself can be scored"
            )
        if zK.shape[0] == 0:
            return self._empty_call(zK)
        return self._inverse(zK, h)

    def _empty_call(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """An empty batch ``z [0, D]``: nothing to transform (a solver would fail on it), and
        no flow inside may keep describing its previous call (its NFE, its regularization)."""
        for module in self.modules():
            if isinstance(module, Flow):
                module._forget_last_call(z)
        return z.clone(), z.new_zeros(0)

    def _forget_last_call(self, z: Tensor) -> None:
        """Reset what this flow keeps of its last call to what an empty batch ``z [0, D]``
        gives; a flow that keeps nothing per call (the default) has nothing to reset."""

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # What a training loop needs to know of a flow, without knowing its class. The defaults
    # combine the flows inside this one (a Sequential, a flow made of flows), so a flow that
    # has no solver of its own needs to override none of them.

    def subflows(self) -> list[Flow]:
        """The flows directly inside this one (not looking inside those)."""
        return list(_subflows(self))

    def statistics(self) -> dict[str, int]:
        """Counters of the last call, summed over the flows inside, read without touching the
        device: for a continuous flow ``nfe_forward`` and ``nfe_backward`` (function
        evaluations of the solves in the last forward, and in its backward). Empty for flows
        with no such counters."""
        total: dict[str, int] = {}
        for flow in self.subflows():
            for name, value in flow.statistics().items():
                total[name] = total.get(name, 0) + value
        return total

    @contextlib.contextmanager
    def evaluation_trace(self, exact: bool | None = True) -> Iterator[None]:
        """Within this context, eval mode computes the exact log-determinant (``exact``), the
        training estimator (False), or what each flow was built to use in eval mode (None:
        FFJORD's ``exact_in_eval``); flows whose log-determinant is always exact ignore it."""
        with contextlib.ExitStack() as stack:
            for flow in self.subflows():
                stack.enter_context(flow.evaluation_trace(exact))
            yield

    def tighten_solver(self, factor: float = 10.0) -> dict[str, float] | None:
        """Divide the ODE solver tolerances by ``factor``; return the new ``{"atol", "rtol"}``
        (of the last flow changed), or ``None`` when the flow solves no ODE. The tolerances
        are part of :meth:`state_dict`, so a model saved after this is evaluated with them."""
        out = None
        for flow in self.subflows():
            out = flow.tighten_solver(factor) or out
        return out

    def replace_solver(self, **settings: Any) -> dict[str, Any] | None:
        """Solve from now on with other ODE solver ``settings`` (``method``, ``atol``, ``rtol``,
        ``solver_options``; a new ``method`` starts from no options): to evaluate a model with
        another solver than it was trained with. Returns the new settings (of the last flow
        changed), or ``None`` when the flow solves no ODE."""
        out = None
        for flow in self.subflows():
            out = flow.replace_solver(**settings) or out
        return out

    def graph_blocker(self) -> str | None:
        """Why a training step through this flow cannot be captured in a CUDA graph (a host
        synchronisation, a data-dependent number of operations), or ``None`` when it can;
        the first reason among the flows inside."""
        for flow in self.subflows():
            reason = flow.graph_blocker()
            if reason is not None:
                return reason
        return None

    def check_replays(self) -> None:
        """Check on the host what the replays of a CUDA-graphed training step recorded on the
        device, since a graph cannot read the device itself, and start recording afresh; the
        trainer calls it wherever it reads a graphed run's losses. It warns or raises as the
        eager step would have (the flows inside, in turn)."""
        for flow in self.subflows():
            flow.check_replays()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


def use_solver(flow: Flow, name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``flow.replace_solver(**settings)``, refused by name when ``flow`` (registered as
    ``name``) solves no ODE, since then the settings would silently mean nothing."""
    out = flow.replace_solver(**settings)
    if out is None:
        raise InputError(f"flow {name!r} solves no ODE: there is no solver to set")
    return out


def _subflows(module: nn.Module) -> Iterator[Flow]:
    for child in module.children():
        if isinstance(child, Flow):
            yield child
        else:
            yield from _subflows(child)


class Identity(Flow):
    """No flow: ``zK = z0`` and ``logdet = 0``. The registry's ``"none"``."""

    has_inverse = True

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__(dim, context_dim)

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(z0.shape[0])

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return zK, zK.new_zeros(zK.shape[0])


class Sequential(Flow):
    """Flows applied one after the other, sharing the context; log-determinants add up."""

    def __init__(self, *flows: Flow) -> None:
        if not flows:
            raise ValueError("Sequential needs at least one flow")
        dims = {(f.dim, f.context_dim) for f in flows}
        if len(dims) != 1:
            raise ValueError(f"all flows must share (dim, context_dim); got {sorted(dims)}")
        super().__init__(flows[0].dim, flows[0].context_dim)
        self.flows = nn.ModuleList(flows)
        self.has_inverse = all(f.has_inverse for f in flows)

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z0.new_zeros(z0.shape[0])
        z = z0
        for flow in self.flows:
            z, ld = flow(z, h)
            logdet = logdet + ld
        return z, logdet

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        logdet = zK.new_zeros(zK.shape[0])
        z = zK
        for flow in reversed(self.flows):
            z, ld = flow.inverse(z, h)
            logdet = logdet + ld
        return z, logdet


class ContextHead(nn.Module):
    """One linear layer that computes every amortized parameter of a flow from the context.

    ``ContextHead(H, {"u": (K, D), "b": (K,)})(h)`` returns ``{"u": [B, K, D], "b": [B, K]}``.
    One matmul serves all named outputs, as the amortized flows of the Sylvester paper do.

    Args:
        context_dim: size H of the context.
        shapes: name -> per-sample shape of each amortized parameter.
        init_scale: the weights start uniform in ``+-init_scale / sqrt(H)``, so a fresh flow is
            close to a map that does not depend much on ``h``.
    """

    def __init__(
        self, context_dim: int, shapes: Mapping[str, tuple[int, ...]], init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.sizes = [math.prod(shape) for shape in self.shapes.values()]
        self.linear = nn.Linear(context_dim, sum(self.sizes))
        bound = init_scale / math.sqrt(context_dim)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.uniform_(self.linear.bias, -bound, bound)

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        """``h [B, H]`` -> ``{name: [B, *shape]}``."""
        flat = self.linear(h)
        parts = torch.split(flat, self.sizes, dim=-1)
        return {
            name: part.reshape(h.shape[0], *shape)
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }
