"""Pyro integration: any :class:`vaeflow.flows.Flow` as a Pyro conditional transform.

A guide refines its base posterior with an amortized flow::

    flow_t = ConditionalFlowTransform(FFJORD(dim=D, context_dim=H))

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow_t)                  # registers every parameter of the flow
        with pyro.plate("data", x.shape[0]):
            mu, sigma, h = encoder(x)                # [B, D], [B, D], [B, H]
            q = dist.TransformedDistribution(dist.Normal(mu, sigma), [flow_t.condition(h)])
            pyro.sample("z", q)                      # zK [B, D]: batch [B], event [D]

Shapes. The transform acts on whole vectors (``domain = codomain = real_vector``, event dim 1),
so ``TransformedDistribution`` itself reinterprets the last dimension of ``Normal(mu, sigma)`` as
the event: ``q`` has batch shape ``[B]`` and event shape ``[D]``, as a data plate needs. Writing
``dist.Normal(mu, sigma).to_event(1)`` as the base gives the same ``q``. Do **not** add
``.to_event(1)`` *after* the transform inside a data plate: that folds the data dimension into
the event (batch ``[]``, event ``[B, D]``), which is only right for a model that has no plate
and scores ``z`` with ``.to_event(2)``.

Scoring. ``Trace_ELBO`` scores the guide at the very tensor that ``pyro.sample`` drew. The
transform remembers its last forward call (keyed by tensor identity), so ``log_prob`` of that
value reuses the log-determinant of the forward pass: no inverse is run (FFJORD does no
reverse-time solve, and flows without an inverse, planar and Sylvester, can be used in a guide).
Its value is whatever the flow computed: for FFJORD in training mode a Hutchinson estimate (an
unbiased ELBO estimate), in eval mode the exact trace. Any other value is scored by inverting the
flow (:meth:`Flow.inverse`); for flows without an inverse that raises ``NotImplementedError``.

Leading sample dimensions (``q.rsample((n,))``, ``Trace_ELBO(num_particles=n,
vectorize_particles=True)``) work: ``h [B, H]`` is broadcast against ``z [..., B, D]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pyro.distributions as dist
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor
from torch.distributions import Transform, constraints

from vaeflow.flows.base import Flow

__all__ = ["ConditionalFlowTransform", "FlowTransform", "flow_guide_distribution"]


class FlowTransform(Transform):
    """A flow bound to one context: the bijection ``z0 [..., B, D] -> zK [..., B, D]``.

    Made by :meth:`ConditionalFlowTransform.condition`. It is not an ``nn.Module``: the
    parameters belong to the flow, which the conditional transform holds and registers.

    The last forward or inverse call is remembered as ``(z0, zK, logdet)``, keyed by tensor
    identity, whatever ``cache_size`` is: ``inverse(zK)`` and ``log_abs_det_jacobian(z0, zK)``
    of that pair are answered from memory, and so is a forward call on ``z0`` again, until the
    flow's parameters change or a backward pass goes through that call (an optimizer step
    may follow it). ``cache_size=1`` also keeps torch's own cache of the last call, which the
    backward pass ends too. So a transform built once and scored on the same data every step
    computes afresh each step.

    Args:
        flow: the flow, ``flow(z0 [N, D], h [N, H]) -> (zK [N, D], logdet [N])``.
        context: ``h [B, H]`` (or ``[H]``, shared by every sample).
        cache_size: 0 or 1, as for :class:`torch.distributions.Transform`.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow, context: Tensor, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        if not isinstance(context, Tensor) or context.dim() < 1:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context)
            raise ValueError(f"the context must be a tensor [B, H] or [H], got {shape}")
        if context.shape[-1] != flow.context_dim:
            # said here, where the guide builds its distribution, not at the first sample
            raise ValueError(
                f"{type(flow).__name__} takes a context of size H = {flow.context_dim} "
                f"([B, {flow.context_dim}] or [{flow.context_dim}]), got {tuple(context.shape)}"
            )
        self.flow = flow
        self.context = context
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (z0, zK, logdet)
        self._last_stamp: tuple[int, ...] = ()  # the parameters' versions at the last forward

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        if self._cache_size == cache_size:
            return self
        return FlowTransform(self.flow, self.context, cache_size=cache_size)

    def _flat(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [..., D]`` -> ``(z [N, D], h [N, H])``, ``h`` broadcast to ``z``'s batch shape."""
        if z.dim() < 1 or z.shape[-1] != self.flow.dim:
            raise ValueError(
                f"{type(self.flow).__name__} transforms vectors of size {self.flow.dim}; got a "
                f"value of shape {tuple(z.shape)}"
            )
        h = self.context
        try:
            h = h.expand(*z.shape[:-1], h.shape[-1])
        except RuntimeError as err:
            raise ValueError(
                f"the context of shape {tuple(self.context.shape)} does not broadcast against "
                f"z of shape {tuple(z.shape)} (expected z [..., B, D] with h [B, H])"
            ) from err
        return z.reshape(-1, z.shape[-1]), h.reshape(-1, h.shape[-1])

    def _remembered(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The last call's ``(z0, zK, logdet)`` while the flow's parameters are those of that
        call, else ``None``: after an optimizer step it no longer describes the flow."""
        return self._last if self._last is not None and self._stamp() == self._last_stamp else None

    def _call(self, z0: Tensor) -> Tensor:
        last = self._remembered()
        if last is not None and z0 is last[0]:
            # Torch's ComposeTransform recomputes each part's image to take its log-determinant:
            # with cache_size=0 that ran every flow again (FFJORD: another solve, and a new
            # Hutchinson estimate that no longer matched the sample's), and the next part then
            # missed its own memory too. Only while the parameters are those of that call: a
            # fixed z0 pushed through again after an optimizer step gets its new image.
            return last[1]
        flat, h = self._flat(z0)
        zK, logdet = self.flow(flat, h)
        zK = zK.reshape(z0.shape)
        self._remember(z0, zK, logdet.reshape(z0.shape[:-1]), output=zK)
        return zK

    def _remember(self, z0: Tensor, zK: Tensor, logdet: Tensor, output: Tensor) -> None:
        """Keep one call, ``z0, zK [..., B, D]`` and ``logdet [..., B]``, until the flow's
        parameters change or a backward pass goes through the call (through ``logdet`` or
        ``output``, the call's image: ``zK`` forward, ``z0`` inverse; not through the value
        the caller gave).

        The parameters' versions do not see every update: ``pyro.optim.ClippedAdam`` writes
        ``p.data``, which bumps no version counter, and torch's cache looks at no parameter. The
        backward pass that must come before any step does: it ends both memories, so that a
        value scored again after the step is not answered with the old parameters' figures (and
        their freed graph).
        """
        self._last = entry = (z0, zK, logdet)
        self._last_stamp = self._stamp()
        forget = _forgetter(weakref.ref(self), entry)
        for tensor in (output, logdet):
            if tensor.requires_grad:
                tensor.register_hook(forget)

    def _forget(self, entry: tuple[Tensor, Tensor, Tensor]) -> None:
        """Drop the remembered call ``entry`` and torch's cache of it, unless a later call has
        taken its place."""
        if self._last is entry:
            self._last = None
            if self._cache_size:
                self._cached_x_y = None, None

    def _stamp(self) -> tuple[int, ...]:
        """The flow's parameters' versions (each in-place update bumps its tensor's)."""
        return tuple(p._version for p in self.flow.parameters())

    def _inverse(self, zK: Tensor) -> Tensor:
        last = self._remembered()
        if last is not None and zK is last[1]:
            return last[0]
        if not self.flow.has_inverse:
            raise NotImplementedError(self._no_inverse_message())
        flat, h = self._flat(zK)
        try:
            z0, logdet = self.flow.inverse(flat, h)
        except NotImplementedError as err:
            raise NotImplementedError(self._no_inverse_message()) from err
        z0 = z0.reshape(zK.shape)
        self._remember(z0, zK, logdet.reshape(zK.shape[:-1]), output=z0)
        return z0

    def _no_inverse_message(self) -> str:
        return (
            f"{type(self.flow).__name__} has no inverse, so its Pyro transform can only score "
            "the very tensor it produced in its last forward call (the sample that pyro.sample "
            "drew from the guide). The value given is a different tensor (a copy, a value from "
            "another trace, a replayed or observed value). Score the transform's own samples, or "
            "use a flow with an inverse (none, iaf, ffjord)."
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log |det d y / d x|`` per vector: ``x, y [..., B, D]`` -> ``[..., B]``.

        The pair of the last forward or inverse call is answered from memory (for FFJORD: the
        trace estimate that call computed) while the flow's parameters are unchanged since. Any
        other pair runs the flow forward from ``x``,
        taking ``y`` to be its image, as torch's transforms do.
        """
        last = self._remembered()
        if last is not None and x is last[0] and y is last[1]:
            return last[2]
        flat, h = self._flat(x)
        _, logdet = self.flow(flat, h)
        return logdet.reshape(x.shape[:-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.flow).__name__}, cache_size={self._cache_size})"


def _forgetter(
    ref: weakref.ref[FlowTransform], entry: tuple[Tensor, Tensor, Tensor]
) -> Callable[[Tensor], None]:
    """A tensor hook that makes the transform behind ``ref`` (a weak reference: the hook must
    not keep it alive) forget its call ``entry``, the gradient left as it is."""

    def hook(grad: Tensor) -> None:
        transform = ref()
        if transform is not None:
            transform._forget(entry)

    return hook


class ConditionalFlowTransform(ConditionalTransformModule):
    """A :class:`vaeflow.flows.Flow` as a Pyro ``ConditionalTransformModule``.

    The flow is the submodule ``flow``, so ``pyro.module(name, t)`` registers every parameter of
    it as ``f"{name}$$$flow.{param_name}"``, and ``t.train()`` / ``t.eval()`` switch the flow's
    mode (FFJORD: Hutchinson or exact trace).

    Args:
        flow: any flow of :data:`vaeflow.flows.FLOWS`, ``flow(z0 [B, D], h [B, H])``.
        cache_size: passed to the transforms that :meth:`condition` makes (default 1).
    """

    def __init__(self, flow: Flow, cache_size: int = 1) -> None:
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"expected a vaeflow.flows.Flow, got {type(flow).__name__}")
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        self.flow = flow
        self.cache_size = cache_size

    def condition(self, context: Tensor) -> FlowTransform:
        """Bind the context ``h [B, H]``: a transform of ``z [..., B, D]``."""
        return FlowTransform(self.flow, context, cache_size=self.cache_size)

    def extra_repr(self) -> str:
        return f"cache_size={self.cache_size}"


def flow_guide_distribution(
    mu: Tensor, sigma: Tensor, h: Tensor, transform: ConditionalFlowTransform
) -> dist.TransformedDistribution:
    """``q(zK | x)``: ``N(mu, diag sigma^2)`` pushed through the flow conditioned on ``h``.

    Args:
        mu, sigma: ``[B, D]`` base posterior parameters.
        h: ``[B, H]`` context.
        transform: the conditional flow.

    Returns:
        a distribution with batch shape ``[B]`` and event shape ``[D]``.
    """
    return dist.TransformedDistribution(dist.Normal(mu, sigma), [transform.condition(h)])
