"""Posterior flows behind one interface, and the ``FLOWS`` registry the CLI and configs use.

from vaeflow.flows import FLOWS
flow = FLOWS["ffjord"](dim=64, context_dim=256)
zK, logdet = flow(z0, h)          # z0 [B, 64], h [B, 256] -> zK [B, 64], logdet [B]
"""

from __future__ import annotations

import inspect
import re

from .base import ContextHead, Flow, Identity, Sequential, use_solver
from .check import FlowCheckError, check_flow
from .ffjord import FFJORD
from .iaf import IAF
from .jacobian import jacobian_logdet
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


def register_flow(name: str, cls: type[Flow]) -> type[Flow]:
    """Add a flow class of one's own to :data:`FLOWS` as ``name``, so that everything that names
    a flow takes it: :class:`~vaeflow.configs.TrainConfig`, :func:`~vaeflow.configs.resolve`,
    ``--flow`` of :func:`vaeflow.cli.main` called from the same script, ``vaeflow flows``.
    Register it again, in the same way, in any process that loads a run of it.

    Raises:
        ValueError: ``name`` is taken or is not made of letters, digits, ``_`` and ``-``.
        TypeError: ``cls`` is not a subclass of :class:`Flow`.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"a flow name is letters, digits, '_' and '-', got {name!r}")
    if name in FLOWS:
        raise ValueError(f"flow name {name!r} is taken (by {FLOWS[name].__name__}); "
                         f"taken names: {', '.join(FLOWS)}")
    if not (isinstance(cls, type) and issubclass(cls, Flow)):
        raise TypeError(f"register_flow takes a subclass of vaeflow.flows.Flow, got {cls!r}")
    FLOWS[name] = cls
    return cls


def _constructor_parameters(name: str) -> tuple[list[inspect.Parameter], bool]:
    """The named hyperparameters of the constructor of the flow registered as ``name``
    (``dim`` and ``context_dim`` aside: the model sets them), and whether it also takes
    ``**kwargs`` (a flow that hands its options on, e.g. a subclass of a built-in one)."""
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid flows are {', '.join(FLOWS)}")
    fixed = ("self", "dim", "context_dim")
    params = inspect.signature(FLOWS[name].__init__).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p for p in params if p.name not in fixed and p.kind not in variadic]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return named, takes_any


def flow_hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters of the flow registered as ``name`` and their defaults, in the order
    of its constructor (``dim`` and ``context_dim`` aside: the model sets them)."""
    return {p.name: p.default for p in _constructor_parameters(name)[0]}


def check_hyperparameters(name: str, hyperparameters: dict[str, object]) -> None:
    """Raise a ``ValueError`` for an unknown flow ``name`` or a hyperparameter that its
    constructor does not take, listing the valid ones (builds nothing). A constructor with
    ``**kwargs`` takes any name here: it is the one to refuse what it does not know."""
    named, takes_any = _constructor_parameters(name)
    valid = [p.name for p in named]
    unknown = [] if takes_any else sorted(set(hyperparameters) - set(valid))
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
    "register_flow",
    "jacobian_logdet",
    "check_flow",
    "FlowCheckError",
    "make_flow",
    "flow_hyperparameters",
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
