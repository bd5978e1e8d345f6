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

from ..checks import check_choice, check_number
from .base import ContextHead, Flow, check_positive_int

__all__ = ["ORTHO_CHECKS", "OrthogonalSylvester", "HouseholderSylvester", "TriangularSylvester"]


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


# Where the orthogonalization's convergence is tested (OrthogonalSylvester's ortho_check).
ORTHO_CHECKS = ("host", "device")


def _converged(err: float, tol: float) -> bool:
    """``err < tol`` for the orthogonalization's residual; a non-finite one is an error."""
    if not math.isfinite(err):
        raise FloatingPointError("orthogonalization of Q gave non-finite values")
    return err < tol


def _capturing(t: Tensor) -> bool:
    """Whether ``t``'s device is recording a CUDA graph now (when no host read may happen)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class OrthogonalSylvester(_Sylvester):
    """O-SNF: ``Q [D, M]`` from the context, orthogonalized by the iteration
    ``Q <- Q (I + (I - Q^T Q) / 2)`` after scaling by its Frobenius norm (which puts every
    singular value in (0, 1], where the iteration converges).

    Args:
        num_steps: K (default 16).
        num_ortho_vecs: M, clipped to D (default 32).
        ortho_tol: stop when ``max |Q^T Q - I| < ortho_tol`` (default 1e-6 in float32; the
            float64 tolerance is 1e-12), tested every 5 iterations.
        max_ortho_iters: stop after this many iterations even when the tolerance is not reached
            (default 100). As in the papers' code, that is not an error: float32 rounding puts
            the residual's floor near 5e-7 on some hardware, so a long run must not end on it.
            A ``RuntimeWarning`` with the residual is issued once per flow.
        ortho_check: ``"host"`` (default, the papers' code): the test reads the residual on the
            host and the loop ends there. ``"device"``: the loop always runs
            ``max_ortho_iters`` iterations and ``Q`` stops changing once the same test passes,
            on the device, so the result is the same ``Q`` bit for bit (and the same
            gradients) with no host read, which lets a CUDA graph hold the training step, at
            the cost of the iterations after convergence: lower ``max_ortho_iters`` with it.
            Outside a graph capture the final residual is still read once per call, to warn
            (and to refuse non-finite values) as ``"host"`` does.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_steps: int = 16,
        num_ortho_vecs: int = 32,
        ortho_tol: float = 1e-6,
        max_ortho_iters: int = 100,
        ortho_check: str = "host",
    ) -> None:
        m = min(check_positive_int("num_ortho_vecs", num_ortho_vecs), dim)
        super().__init__(dim, context_dim, num_steps, m, {"q": (num_steps, dim, m)})
        self.ortho_tol = check_number("ortho_tol", ortho_tol, positive=True)
        self.max_ortho_iters = check_positive_int("max_ortho_iters", max_ortho_iters)
        self.ortho_check = check_choice("ortho_check", ortho_check, ORTHO_CHECKS)
        self._warned = False
        # The largest final residual of the calls inside a graph capture, written there on the
        # device and read by check_replays (not saved: it is a diagnostic, not the model).
        self.register_buffer("replay_residual", torch.zeros(()), persistent=False)

    def graph_blocker(self) -> str | None:
        if self.ortho_check == "device":
            return None
        return (
            "the orthogonal Sylvester flow tests the convergence of its orthogonalization on "
            "the host, which a CUDA graph cannot hold (--flow-opt ortho_check=device tests it "
            "on the device; householder and triangular can)"
        )

    def _q(self, p: dict[str, Tensor]) -> Tensor:
        q = p["q"]  # [B, K, D, M]
        q = q / q.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
        eye = torch.eye(self.num_vectors, dtype=q.dtype, device=q.device)
        tol = self._tolerance(q.dtype)
        # The test needs the residual over the whole batch; every few iterations keeps it (and,
        # on the host, the synchronizations) rare while the iteration converges quadratically.
        check_every = 5
        done = None  # "device": whether the test has passed, on the device
        if self.ortho_check == "device":
            done = torch.zeros((), dtype=torch.bool, device=q.device)
        err: float | Tensor = math.inf
        for it in range(1, self.max_ortho_iters + 1):
            step = q @ (eye + 0.5 * (eye - q.transpose(-1, -2) @ q))
            q = step if done is None else torch.where(done, q, step)  # frozen once converged
            if it % check_every == 0 or it == self.max_ortho_iters:
                err = ((q.transpose(-1, -2) @ q) - eye).abs().amax().detach()
                if done is not None:
                    done = done | (err < tol)
                elif _converged(err := float(err), tol):
                    return q
        if done is not None:
            if _capturing(q):
                # A graph cannot read the device: keep the worst residual for check_replays
                # (torch.maximum keeps a NaN, so a non-finite Q is refused there too).
                assert isinstance(err, Tensor)
                worst = torch.maximum(self.replay_residual, err.to(self.replay_residual))
                self.replay_residual.copy_(worst)
                return q
            if _converged(err := float(err), tol):
                return q
        self._warn(err, tol)
        return q

    def _tolerance(self, dtype: torch.dtype) -> float:
        return self.ortho_tol if dtype != torch.float64 else min(self.ortho_tol, 1e-12)

    def _warn(self, err: float, tol: float) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"orthogonalization of Q stopped after {self.max_ortho_iters} iterations at "
                f"max |Q^T Q - I| = {err:.3g} (tolerance {tol:g}); going on with this Q "
                "(warned once per flow)",
                RuntimeWarning,
                stacklevel=3,
            )

    def check_replays(self) -> None:
        """Warn, as an eager call does, when a graph's replays ended the orthogonalization
        above the tolerance (``max_ortho_iters`` too low for ``ortho_check="device"``), and
        refuse a non-finite ``Q``; one host read, and only after a capture."""
        if self.ortho_check != "device":
            return  # the host test ran in every call, and nothing was recorded
        worst, tol = float(self.replay_residual), self._tolerance(self.replay_residual.dtype)
        self.replay_residual.zero_()
        if not _converged(worst, tol):
            self._warn(worst, tol)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ortho_check={self.ortho_check!r}"


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
