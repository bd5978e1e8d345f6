"""Sylvester normalizing flows (van den Berg et al. 2018): orthogonal, Householder, triangular.

Every step maps ``z <- z + Q R tanh(R~ Q^T z + b)`` where ``Q [D, M]`` has orthonormal columns and
``R, R~ [M, M]`` are upper triangular, so that

    log |det dz'/dz| = sum_m log |1 + tanh'(.)_m R_mm R~_mm|.

The three variants differ only in how ``Q`` is made; all parameters come from the context.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..checks import check_number
from .base import ContextHead, Flow, check_positive_int

__all__ = ["OrthogonalSylvester", "HouseholderSylvester", "TriangularSylvester"]


class _Sylvester(Flow):
    """The shared Sylvester step. Subclasses say how ``Q`` is computed from the context."""

    def __init__(
        self, dim: int, context_dim: int, num_steps: int, num_vectors: int, q_shapes: dict
    ) -> None:
        super().__init__(dim, context_dim)
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.num_vectors = m = check_positive_int("num_vectors", num_vectors)
        k = num_steps
        shapes = {"full": (k, m, m), "diag1": (k, m), "diag2": (k, m), "b": (k, m), **q_shapes}
        self.head = ContextHead(context_dim, shapes)
        self.register_buffer("_upper", torch.triu(torch.ones(m, m), diagonal=1))

    def _q(self, p: dict[str, Tensor]) -> Tensor | None:
        """``Q [B, K, D, M]`` with orthonormal columns; ``None`` for permutations (triangular)."""
        raise NotImplementedError

    def _q_transpose_z(self, q: Tensor | None, k: int, z: Tensor) -> Tensor:
        return torch.einsum("bdm,bd->bm", q[:, k], z)

    def _q_times(self, q: Tensor | None, k: int, x: Tensor) -> Tensor:
        return torch.einsum("bdm,bm->bd", q[:, k], x)

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        p = self.head(h)
        full = p["full"]  # [B, K, M, M]
        # tanh keeps |R_mm R~_mm| < 1 <= 1 / max tanh', which makes each step invertible.
        diag1, diag2 = torch.tanh(p["diag1"]), torch.tanh(p["diag2"])  # [B, K, M]
        r1 = full * self._upper + torch.diag_embed(diag1)
        r2 = full.transpose(-1, -2) * self._upper + torch.diag_embed(diag2)
        q = self._q(p)
        z = z0
        logdet = z0.new_zeros(z0.shape[0])
        for k in range(self.num_steps):
            pre = torch.einsum("bmn,bn->bm", r2[:, k], self._q_transpose_z(q, k, z)) + p["b"][:, k]
            act = torch.tanh(pre)  # [B, M]
            z = z + self._q_times(q, k, torch.einsum("bmn,bn->bm", r1[:, k], act))
            diag = 1.0 + (1.0 - act * act) * diag1[:, k] * diag2[:, k]
            logdet = logdet + torch.log(diag.abs()).sum(-1)
        return z, logdet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_steps={self.num_steps}, M={self.num_vectors}"


class OrthogonalSylvester(_Sylvester):
    """O-SNF: ``Q [D, M]`` from the context, orthogonalized by the iteration
    ``Q <- Q (I + (I - Q^T Q) / 2)`` after scaling by its Frobenius norm (which puts every
    singular value in (0, 1], where the iteration converges).

    Args:
        num_steps: K (default 16).
        num_ortho_vecs: M, clipped to D (default 32).
        ortho_tol: stop when ``max |Q^T Q - I| < ortho_tol`` (default 1e-6 in float32; the
            float64 tolerance is 1e-12).
        max_ortho_iters: stop after this many iterations even when the tolerance is not reached
            (default 100). As in the papers' code, that is not an error: float32 rounding puts
            the residual's floor near 5e-7 on some hardware, so a long run must not end on it.
            A ``RuntimeWarning`` with the residual is issued once per flow.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_steps: int = 16,
        num_ortho_vecs: int = 32,
        ortho_tol: float = 1e-6,
        max_ortho_iters: int = 100,
    ) -> None:
        m = min(check_positive_int("num_ortho_vecs", num_ortho_vecs), dim)
        super().__init__(dim, context_dim, num_steps, m, {"q": (num_steps, dim, m)})
        self.ortho_tol = check_number("ortho_tol", ortho_tol, positive=True)
        self.max_ortho_iters = check_positive_int("max_ortho_iters", max_ortho_iters)
        self._warned = False

    def graph_blocker(self) -> str | None:
        return (
            "the orthogonal Sylvester flow tests the convergence of its orthogonalization on "
            "the host, which a CUDA graph cannot hold (householder and triangular can)"
        )

    def _q(self, p: dict[str, Tensor]) -> Tensor:
        q = p["q"]  # [B, K, D, M]
        q = q / q.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
        eye = torch.eye(self.num_vectors, dtype=q.dtype, device=q.device)
        tol = self.ortho_tol if q.dtype != torch.float64 else min(self.ortho_tol, 1e-12)
        # The convergence test needs the host; checking every few iterations keeps the
        # synchronizations few while the iteration itself converges quadratically.
        check_every = 5
        err = math.inf
        for it in range(1, self.max_ortho_iters + 1):
            qtq = q.transpose(-1, -2) @ q
            q = q @ (eye + 0.5 * (eye - qtq))
            if it % check_every == 0 or it == self.max_ortho_iters:
                err = float(((q.transpose(-1, -2) @ q) - eye).abs().amax().detach())
                if not math.isfinite(err):
                    raise FloatingPointError("orthogonalization of Q gave non-finite values")
                if err < tol:
                    return q
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"orthogonalization of Q stopped after {self.max_ortho_iters} iterations at "
                f"max |Q^T Q - I| = {err:.3g} (tolerance {tol:g}); going on with this Q "
                "(warned once per flow)",
                RuntimeWarning,
                stacklevel=2,
            )
        return q


class HouseholderSylvester(_Sylvester):
    """H-SNF: ``Q [D, D]`` is the product of ``num_householder`` reflections
    ``I - 2 v v^T / ||v||^2`` whose vectors ``v`` come from the context.

    Args:
        num_steps: K (default 16).
        num_householder: reflections per step (default 8).
    """

    def __init__(
        self, dim: int, context_dim: int, num_steps: int = 16, num_householder: int = 8
    ) -> None:
        self.num_householder = check_positive_int("num_householder", num_householder)
        super().__init__(dim, context_dim, num_steps, dim, {"v": (num_steps, num_householder, dim)})

    def _q(self, p: dict[str, Tensor]) -> Tensor:
        v = p["v"]  # [B, K, L, D]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q = torch.eye(self.dim, dtype=v.dtype, device=v.device).expand(*v.shape[:2], -1, -1)
        for i in range(self.num_householder):
            vi = v[:, :, i]  # [B, K, D]
            # Q <- Q (I - 2 v v^T)
            q = q - 2.0 * (q @ vi.unsqueeze(-1)) * vi.unsqueeze(-2)
        return q


class TriangularSylvester(_Sylvester):
    """T-SNF: ``Q`` is the identity or the reversal permutation, alternating between steps
    (``M = D``).

    Args:
        num_steps: K (default 16).
    """

    def __init__(self, dim: int, context_dim: int, num_steps: int = 16) -> None:
        super().__init__(dim, context_dim, num_steps, dim, {})

    def _q(self, p: dict[str, Tensor]) -> None:
        return None

    def _q_transpose_z(self, q: Tensor | None, k: int, z: Tensor) -> Tensor:
        return z.flip(-1) if k % 2 == 1 else z

    def _q_times(self, q: Tensor | None, k: int, x: Tensor) -> Tensor:
        return x.flip(-1) if k % 2 == 1 else x
