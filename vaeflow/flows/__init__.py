"""Posterior flows behind one interface, and the ``FLOWS`` registry the CLI and configs use.

from vaeflow.flows import FLOWS
flow = FLOWS["ffjord"](dim=64, context_dim=256)
zK, logdet = flow(z0, h)          # z0 [B, 64], h [B, 256] -> zK [B, 64], logdet [B]
"""

from __future__ import annotations

from .base import ContextHead, Flow, Identity, Sequential, use_solver
from .ffjord import FFJORD
from .iaf import IAF
from .planar import Planar
from .sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester

FLOWS: dict[str, type[Flow]] = {
    "none": Identity,
    "planar": Planar,
    "iaf": IAF,
    "orthogonal": OrthogonalSylvester,
    "householder": HouseholderSylvester,
    "triangular": TriangularSylvester,
    "ffjord": FFJORD,
}


def check_hyperparameters(name: str, hyperparameters: dict[str, object]) -> None:
    """Raise a ``ValueError`` for an unknown flow ``name`` or a hyperparameter that its
    constructor does not take, listing the valid ones (builds nothing)."""
    import inspect

    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid flows are {', '.join(FLOWS)}")
    fixed = ("self", "dim", "context_dim")
    valid = [p for p in inspect.signature(FLOWS[name].__init__).parameters if p not in fixed]
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for flow {name!r}; "
            f"valid ones are {', '.join(valid) or '(none)'}"
        )


def make_flow(name: str, dim: int, context_dim: int, **hyperparameters: object) -> Flow:
    """Build the flow registered as ``name``; an unknown name or hyperparameter raises a
    ``ValueError`` that lists the valid ones."""
    check_hyperparameters(name, hyperparameters)
    return FLOWS[name](dim, context_dim, **hyperparameters)


__all__ = [
    "FLOWS",
    "make_flow",
    "check_hyperparameters",
    "use_solver",
    "Flow",
    "Identity",
    "Sequential",
    "ContextHead",
    "Planar",
    "IAF",
    "OrthogonalSylvester",
    "HouseholderSylvester",
    "TriangularSylvester",
    "FFJORD",
]
