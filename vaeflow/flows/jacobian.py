"""The log-determinant of a flow from its autograd Jacobian: the reference that every flow's own
``logdet`` is tested against (``tests/test_flows.py``), and the check for a flow of one's own
(README, "Adding a flow")."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Flow

__all__ = ["jacobian_logdet"]


def jacobian_logdet(flow: Flow, z0: Tensor, h: Tensor) -> Tensor:
    """``log |det d zK / d z0|`` ``[B]`` of ``flow`` at ``z0 [B, D]`` given ``h [B, H]``, from the
    autograd Jacobian of the whole batch map (D backward passes: for checks, not training).
    Each sample's map depends only on its own row, so its Jacobian is a diagonal block.

    Use float64 and a map that is not nearly singular at ``z0``: ``slogdet`` loses accuracy with
    the Jacobian's conditioning (e.g. the IAF at the papers' initialisation on random inputs).
    """
    jac = torch.autograd.functional.jacobian(lambda z: flow(z, h)[0], z0)  # [B, D, B, D]
    rows = torch.arange(z0.shape[0])
    return torch.linalg.slogdet(jac[rows, :, rows, :])[1]  # blocks [B, D, D] -> [B]
