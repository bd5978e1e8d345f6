"""Amortized planar flows (Rezende & Mohamed 2015), parameters computed from the context."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ContextHead, Flow, check_positive_int

__all__ = ["Planar"]


class Planar(Flow):
    """``num_steps`` planar steps ``z <- z + u_hat tanh(w^T z + b)``, each with its own ``u, w, b``
    computed from the context ``h`` by one linear head (as in the Sylvester paper's code).

    ``u_hat = u + (m(w^T u) - w^T u) w / ||w||^2`` with ``m(a) = -1 + softplus(a)`` makes
    ``w^T u_hat >= -1``, which keeps every step invertible.

    Args:
        dim: latent size D.
        context_dim: context size H.
        num_steps: number K of planar steps (default 16, the Sylvester paper's setting).
    """

    def __init__(self, dim: int, context_dim: int, num_steps: int = 16) -> None:
        super().__init__(dim, context_dim)
        self.num_steps = check_positive_int("num_steps", num_steps)
        k, d = num_steps, dim
        self.head = ContextHead(context_dim, {"u": (k, d), "w": (k, d), "b": (k,)})

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        p = self.head(h)
        u, w, b = p["u"], p["w"], p["b"]  # [B, K, D], [B, K, D], [B, K]
        wu = (w * u).sum(-1, keepdim=True)  # [B, K, 1]
        w_norm_sq = (w * w).sum(-1, keepdim=True)
        u_hat = u + (F.softplus(wu) - 1.0 - wu) * w / w_norm_sq  # [B, K, D]
        z = z0
        logdet = z0.new_zeros(z0.shape[0])
        for k in range(self.num_steps):
            a = torch.tanh((w[:, k] * z).sum(-1) + b[:, k])  # [B]
            z = z + u_hat[:, k] * a.unsqueeze(-1)
            # det(I + u_hat psi^T) = 1 + psi^T u_hat, psi = (1 - tanh^2) w
            psi_u = (1.0 - a * a) * (w[:, k] * u_hat[:, k]).sum(-1)
            logdet = logdet + torch.log((1.0 + psi_u).abs() + 1e-12)
        return z, logdet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_steps={self.num_steps}"
