"""``check_flow``: every built-in flow passes it, and so does a flow with a scalar (0-d)
parameter; each broken flow below fails it with the rule it breaks named (so the check cannot
pass a flow that is wrong in these ways)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import AffineFlow
from torch import Tensor, nn

from vaeflow.flows import FLOWS, FlowCheckError, check_flow

# FFJORD at its default tolerances (1e-5): check_flow solves its copy far below them
SMALL = {"ffjord": dict(hidden_dims=(16, 16), rank=2, num_blocks=2)}


@pytest.mark.parametrize("name", list(FLOWS))
def test_every_built_in_flow_passes(name: str) -> None:
    torch.manual_seed(0)
    flow = FLOWS[name](dim=4, context_dim=3, **SMALL.get(name, {}))
    before = {k: v.clone() for k, v in flow.state_dict().items() if isinstance(v, Tensor)}
    flow.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the inverse is checked on the seed's rows
        check_flow(flow)
    # a copy was checked: the flow keeps its parameters, dtype, mode and solver
    assert flow.training
    assert flow.tighten_solver(1.0) in (None, {"atol": 1e-5, "rtol": 1e-5})
    after = {k: v for k, v in flow.state_dict().items() if isinstance(v, Tensor)}
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


class Affine(AffineFlow):
    """The shared affine flow, with switches that each break it in one way: only these tests
    want a wrong flow (a doubled logdet, a mixed batch, ...), so the switches live here."""

    def __init__(self, dim: int, context_dim: int, broken: str = "", zero: bool = False) -> None:
        super().__init__(dim, context_dim, zero=zero)
        self.broken = broken
        if broken == "dead":
            self.unused = nn.Parameter(torch.zeros(3))

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return super()._params(torch.zeros_like(h) if self.broken == "unamortized" else h)

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        zK, logdet = super()._forward(z0, h)
        if self.broken == "mixing":  # batch statistics: a row depends on the others
            zK = zK + 0.1 * z0.mean(0)
        if self.broken == "logdet":
            logdet = 2 * logdet
        if self.broken == "shape":
            logdet = logdet.unsqueeze(-1)
        if self.broken == "nan":
            zK = zK / (z0 - z0)
        return zK, logdet

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.broken == "inverse":  # forgets the shift
            a, _ = self._params(h)
            return zK * (-a).exp(), a.sum(-1)
        return super()._inverse(zK, h)


def test_a_correct_flow_of_ones_own_passes() -> None:
    torch.manual_seed(0)
    check_flow(Affine(4, 3))
    check_flow(Affine(4, 3, zero=True))


@pytest.mark.parametrize(("broken", "words"), [
    ("logdet", "eval-mode logdet is not log|det dzK/dz0|"),
    ("mixing", "mixes the rows of a batch"),
    ("unamortized", "ignores the context h"),
    ("dead", "no gradient reaches the parameter(s) unused"),
    ("inverse", "inverse does not undo forward: z0"),
    ("shape", "logdet (5, 1); expected (5, 4) and (5,)"),
    ("nan", "non-finite values"),
])
def test_a_broken_flow_fails_with_the_rule_named(broken: str, words: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(FlowCheckError) as info:
        check_flow(Affine(4, 3, broken=broken))
    assert words in str(info.value)


def test_perturb_finds_a_wrong_logdet_behind_an_identity_start() -> None:
    """Zero heads: the flow starts as the identity, where a doubled logdet is still 0 = 0
    (unperturbed, only the unused context is seen)."""
    torch.manual_seed(0)
    with pytest.raises(FlowCheckError, match="ignores the context h"):
        check_flow(Affine(4, 3, broken="logdet", zero=True), perturb=0.0)
    with pytest.raises(FlowCheckError, match="logdet is not"):
        check_flow(Affine(4, 3, broken="logdet", zero=True))


class _ScaledAffine(AffineFlow):
    """The shared affine flow with a learned scalar ``s`` added to ``a(h)``:
    ``zK = z0 exp(a(h) + s) + b(h)``, ``logdet = sum(a) + D s``. It differs to hold a 0-d
    parameter, which is what the test below is about."""

    def __init__(self, dim: int, context_dim: int, log_scale: float = 0.0) -> None:
        super().__init__(dim, context_dim)
        self.log_scale = nn.Parameter(torch.tensor(log_scale))

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        a, b = super()._params(h)
        return a + self.log_scale, b


@pytest.mark.parametrize("log_scale", [0.0, 0.5])
def test_check_flow_takes_a_flow_with_a_scalar_parameter(log_scale: float) -> None:
    """Its perturbation drew ``randn(*())``, a TypeError, for any 0-d parameter (and the zero
    one's fallback scale read ``shape[-1]`` of no shape)."""
    torch.manual_seed(0)
    check_flow(_ScaledAffine(3, 2, log_scale))
