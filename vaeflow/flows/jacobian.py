"""The log-determinant of a flow from its autograd Jacobian: the reference that every flow's own
``logdet`` is tested against (``tests/test_flows.py``, :func:`~vaeflow.flows.check_flow`), and
the check for a flow of one's own (README, "Adding a flow")."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Flow

__all__ = ["jacobian_logdet", "batch_jacobian", "diagonal_blocks", "block_logdet"]


def batch_jacobian(flow: Flow, z0: Tensor, h: Tensor) -> Tensor:
    """``d zK / d z0`` ``[B, D, B, D]`` of the whole batch map of ``flow`` at ``z0 [B, D]``
    given ``h [B, H]`` (D backward passes per row: for checks, not training). A flow maps each
    row on its own, so only the diagonal blocks ``[i, :, i, :]`` may be nonzero."""
    return torch.autograd.functional.jacobian(lambda z: flow(z, h)[0], z0)


def diagonal_blocks(jac: Tensor) -> Tensor:
    """Each row's own Jacobian ``[B, D, D]`` in a :func:`batch_jacobian` ``[B, D, B, D]``."""
    rows = torch.arange(jac.shape[0], device=jac.device)  # not the default device: a check may
    # run inside `with torch.device(...)`, as runs build their models
    return jac[rows, :, rows, :]


def block_logdet(jac: Tensor) -> Tensor:
    """``log |det|`` ``[B]`` of the diagonal blocks of a :func:`batch_jacobian` ``[B, D, B, D]``."""
    return torch.linalg.slogdet(diagonal_blocks(jac))[1]


def jacobian_logdet(flow: Flow, z0: Tensor, h: Tensor) -> Tensor:
    """``log |det d zK / d z0|`` ``[B]`` of ``flow`` at ``z0 [B, D]`` given ``h [B, H]``, from the
    autograd Jacobian of the whole batch map (D backward passes: for checks, not training).
    Each sample's map depends only on its own row, so its Jacobian is a diagonal block.

    Use float64 and a map that is not nearly singular at ``z0``: ``slogdet`` loses accuracy with
    the Jacobian's conditioning (e.g. the IAF at the papers' initialisation on random inputs).
    """
    return block_logdet(batch_jacobian(flow, z0, h))
