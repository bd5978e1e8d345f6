"""What every flow must satisfy, checked in one call: for a flow of one's own (README, "Adding a
flow") what ``tests/test_flows.py`` checks of the built-in ones.

>>> check_flow(Radial(dim=4, context_dim=8))       # raises FlowCheckError naming what is wrong
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor

from .base import Flow, Identity
from .jacobian import batch_jacobian, block_logdet, diagonal_blocks

__all__ = ["FlowCheckError", "check_flow"]


class FlowCheckError(AssertionError):
    """A flow breaks the contract of :class:`~vaeflow.flows.Flow`; the message says how."""


def check_flow(
    flow: Flow,
    *,
    batch: int = 5,
    seed: int = 0,
    perturb: float = 0.1,
    rtol: float = 1e-6,
    atol: float = 1e-7,
) -> None:
    """Check ``flow`` (a copy of it: the flow itself is left as it is) against the contract
    that the VAE, the training loop and the Pyro guide rely on, in float64:

    - ``forward(z0 [B, D], h [B, H])`` gives ``zK [B, D]`` and ``logdet [B]``, finite, for
      ``batch`` rows and for one;
    - in eval mode ``logdet`` is ``log |det d zK / d z0|`` of the autograd Jacobian, within
      ``rtol``/``atol`` (a flow that solves an ODE is checked with its copy's solver
      tolerances lowered, by ``tighten_solver``, to ``atol / 100``);
    - each row's ``zK`` depends on its own ``z0`` and ``h`` only (no batch statistics: the
      Jacobian between rows is zero);
    - ``zK`` depends on ``h`` (the flow is amortized), and ``z0``, ``h`` and every trainable
      parameter get a nonzero gradient in training mode;
    - ``inverse`` undoes ``forward`` (zK and logdet) where ``has_inverse``, and raises
      ``NotImplementedError`` where not.

    ``perturb`` adds Gaussian noise of that many times each parameter's root mean square (of
    ``1 / sqrt(n)``, ``n`` its last size, where it is all zeros; of 1 for a zero scalar) to the
    copy's parameters first, so that a flow initialised at the identity (zero heads) is checked
    away from it, where a wrong log-determinant shows; 0 checks it as it is.
    :class:`~vaeflow.flows.Identity` (``none``) is checked for shapes and values only.

    Raises:
        FlowCheckError: naming the first rule broken and by how much.
    """
    flow = copy.deepcopy(flow).double()
    # An ODE flow's logdet is as exact as its solve: at its training tolerances (FFJORD's 1e-5)
    # it would fail a check of 1e-7. The copy solves 100x below the check's atol instead.
    current = flow.tighten_solver(1.0)  # its tolerances, unchanged; None: it solves no ODE
    if current:
        flow.tighten_solver(max(1.0, max(current.values()) / (atol / 100)))
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        # the size as one tuple: randn() of no sizes (a scalar parameter's) is a TypeError
        return torch.randn(shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        for p in flow.parameters():
            # noise on each parameter's own scale; a zero one (an identity head) gets 1/sqrt(n),
            # and a zero scalar (a learned log-scale that starts at 0) gets 1
            scale = float(p.pow(2).mean().sqrt()) if p.numel() else 0.0
            fallback = p.shape[-1] ** -0.5 if p.dim() else 1.0
            p.add_(perturb * (scale or fallback) * draw(*p.shape))
    name = type(flow).__name__
    z0, h = draw(batch, flow.dim), draw(batch, flow.context_dim)
    for rows in (batch, 1):
        for training in (True, False):
            zK, logdet = flow.train(training)(z0[:rows], h[:rows])
            _expect(zK.shape == (rows, flow.dim) and logdet.shape == (rows,),
                    f"{name}.forward on {rows} row(s) gave zK {tuple(zK.shape)} and logdet "
                    f"{tuple(logdet.shape)}; expected ({rows}, {flow.dim}) and ({rows},)")
            _expect(bool(torch.isfinite(zK).all() and torch.isfinite(logdet).all()),
                    f"{name}.forward gave non-finite values")
    if isinstance(flow, Identity):
        _expect(bool((zK == z0[:1]).all() and (logdet == 0).all()),
                f"{name} changed z0 or gave a nonzero logdet")
        return
    flow.eval()
    zK, logdet = flow(z0, h)
    jac = batch_jacobian(flow, z0, h)  # [B, D, B, D]
    across = jac.clone()
    across[torch.arange(batch), :, torch.arange(batch), :] = 0
    _expect(bool((across == 0).all()),
            f"{name} mixes the rows of a batch: d zK[i] / d z0[j] reaches "
            f"{float(across.abs().max().detach()):.3g} for i != j (batch statistics?)")
    expected = block_logdet(jac)
    # The reference is only as exact as its conditioning: slogdet's error grows with the
    # block's condition number (an IAF at its initialisation contracts some rows by e^-40).
    cond = torch.linalg.cond(diagonal_blocks(jac))  # [B]
    slack = _rounding(cond, flow.dim)
    error = (logdet.detach() - expected).abs()
    allowed = atol + rtol * expected.abs() + slack
    _expect(bool((error <= allowed).all()),
            f"{name}'s eval-mode logdet is not log|det dzK/dz0|: off by up to "
            f"{float(error.max()):.3g} (logdet {logdet.tolist()}, autograd Jacobian "
            f"{expected.tolist()}, allowed {allowed.tolist()})")
    zK_other, _ = flow(z0, draw(batch, flow.context_dim))
    _expect(not torch.equal(zK_other, zK), f"{name} ignores the context h (not amortized)")
    _check_gradients(flow.train(), z0, h)
    # An inverse amplifies the rounding of each step by its contraction, more than the whole
    # map's conditioning tells: rows contracted to a condition number over 1e8 (an IAF at its
    # initialisation can reach 1e20 on unit inputs) are left out of that check.
    _check_inverse(flow.eval(), z0, (zK, logdet), h, rtol, atol, slack, cond <= 1e8)


def _rounding(factor: Tensor, dim: int) -> Tensor:
    """Float64 rounding ``[B]`` amplified by ``factor [B]`` over ``dim`` coordinates, with a
    margin of 100 for the many operations of a flow."""
    return 100.0 * dim * torch.finfo(torch.float64).eps * factor


def _check_gradients(flow: Flow, z0: Tensor, h: Tensor) -> None:
    """A loss of ``zK`` and ``logdet`` reaches ``z0``, ``h`` and every trainable parameter."""
    name = type(flow).__name__
    z0, h = z0.clone().requires_grad_(True), h.clone().requires_grad_(True)
    zK, logdet = flow(z0, h)
    weights = torch.linspace(-1.0, 1.0, flow.dim, dtype=torch.float64)
    ((zK * weights).sum() + (zK**2).sum() + logdet.sum()).backward()
    for what, t in (("z0", z0), ("h", h)):
        _expect(t.grad is not None and bool(t.grad.abs().sum() > 0),
                f"{name}: no gradient reaches {what}")
    dead = [n for n, p in flow.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    _expect(not dead, f"{name}: no gradient reaches the parameter(s) {', '.join(dead)}")


def _check_inverse(
    flow: Flow, z0: Tensor, forward: tuple[Tensor, Tensor], h: Tensor, rtol: float, atol: float,
    slack: Tensor, rows: Tensor,
) -> None:
    """``inverse`` undoes ``forward`` (the eval-mode ``(zK, logdet)`` of ``z0``) where
    ``has_inverse``, on the ``rows [B]`` (bool) that are conditioned well enough, within
    ``rtol``/``atol`` plus ``slack [B]`` times the row's scale; raises where not."""
    name = type(flow).__name__
    zK, logdet = forward
    if not flow.has_inverse:
        try:
            flow.inverse(zK, h)
        except NotImplementedError:
            return
        raise FlowCheckError(f"{name} has has_inverse = False, but its inverse returned")
    if not bool(rows.any()):
        warnings.warn(f"{name}'s inverse is not checked: every row's Jacobian has a condition "
                      "number over 1e8 (try another seed or a smaller perturb)", stacklevel=3)
        return
    back, logdet_back = flow.inverse(zK, h)
    scale = 1.0 + zK.detach().abs().amax(-1)  # [B]
    for what, got, want in (("z0", back, z0), ("logdet", logdet_back, logdet)):
        error = (got.detach() - want.detach()).abs().reshape(len(z0), -1).amax(-1)[rows]
        allowed = (atol + rtol * want.detach().abs().reshape(len(z0), -1).amax(-1)
                   + slack * scale)[rows]
        _expect(bool((error <= allowed).all()),  # a NaN fails too
                f"{name}.inverse does not undo forward: {what} off by up to "
                f"{float(error.max()):.3g} (allowed {allowed.tolist()})")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise FlowCheckError(message)
