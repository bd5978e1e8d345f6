"""Review of the flows, the ODE solve, the VAE terms, the likelihoods and the networks: each test
here failed before the fix it names, or covers a case the other flow tests leave out."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from vaeflow.flows import (
    FFJORD,
    FLOWS,
    ContextHead,
    Flow,
    Planar,
    check_flow,
    flow_hyperparameters,
    make_flow,
)

RK4 = dict(method="rk4", solver_options={"step_size": 0.25})


def test_a_fixed_step_solve_keeps_its_grid_on_the_host_under_a_default_device() -> None:
    """Under ``with torch.device(...)`` (how a run builds its model) the fixed-step grid was made
    on that device: its ``.item()`` synchronised a GPU in every solve and failed on meta."""
    with torch.device("meta"):
        flow = FFJORD(3, 2, hidden_dims=(8,), rank=2, **RK4).train()
        z0, h = torch.randn(4, 3, requires_grad=True), torch.randn(4, 2)
        zK, logdet = flow(z0, h)  # any host read of a meta tensor raises
        (zK.sum() + logdet.sum()).backward()
    assert zK.device.type == "meta" and logdet.shape == (4,)
    assert flow.nfe_forward == 4 * 4  # 4 steps of 4 stages: the grid of step_size 0.25


class _PassingPlanar(Planar):
    """A flow of one's own that hands its options on to a built-in one."""

    def __init__(self, dim: int, context_dim: int, **options: object) -> None:
        super().__init__(dim, context_dim, **options)


def test_a_flow_whose_constructor_takes_kwargs_gets_its_options(monkeypatch) -> None:
    """Such a flow was refused every option ('valid ones are options') and listed ``options``
    as a hyperparameter of its own."""
    monkeypatch.setitem(FLOWS, "passing-planar", _PassingPlanar)
    flow = make_flow("passing-planar", 4, 3, num_steps=2)
    assert flow.num_steps == 2
    assert flow_hyperparameters("passing-planar") == {}
    with pytest.raises(TypeError, match="num_step"):  # its constructor refuses what it lacks
        make_flow("passing-planar", 4, 3, num_step=2)


# What test_flows.py (every flow at D = 4, the orthogonal flow's 32 vectors clipped to M = D)
# leaves out: M < D, where log|det| = sum log|1 + ...| needs Q^T Q = I_M and no longer follows
# from a square Q; a latent of one dimension; odd D under the triangular flow's reversal; one
# reflection; FFJORD with several blocks of learned end time, concat dynamics, or the fused
# field in training. (The IAF at D = 1 is left out: the papers' MADE gives its only output
# no input, z's or h's, so it ignores the context, as check_flow says.)
UNCOVERED = [
    ("orthogonal", 6, dict(num_steps=3, num_ortho_vecs=3)),
    ("orthogonal", 6, dict(num_steps=2, num_ortho_vecs=2, ortho_check="device",
                           max_ortho_iters=40)),
    ("householder", 5, dict(num_steps=3, num_householder=1)),
    ("triangular", 5, dict(num_steps=3)),
    ("planar", 1, dict(num_steps=3)),
    ("orthogonal", 1, dict(num_steps=3)),
    ("householder", 1, dict(num_steps=3, num_householder=2)),
    ("triangular", 1, dict(num_steps=3)),
    ("ffjord", 1, dict(hidden_dims=(8,), rank=2)),
    ("ffjord", 3, dict(hidden_dims=(8,), dynamics="concat", num_blocks=2, train_end_time=True)),
    ("ffjord", 3, dict(hidden_dims=(8, 8), rank=2, fused=True, regularize=True)),
]


@pytest.mark.parametrize(("name", "dim", "options"), UNCOVERED,
                         ids=[f"{n}-D{d}-{i}" for i, (n, d, _) in enumerate(UNCOVERED)])
def test_logdet_and_inverse_in_cases_the_flow_tests_leave_out(name, dim, options) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # also: the inverse is checked on the seed's rows
        check_flow(FLOWS[name](dim, 3, **options), perturb=0.3)


def test_fused_hutchinson_is_the_autograd_estimate_for_the_same_noise() -> None:
    """Training mode with fused=True (what compile=True runs) is tested nowhere else against
    the autograd product: the same noise must give the same estimate and RNODE terms."""
    torch.manual_seed(0)
    flow = FFJORD(3, 2, hidden_dims=(8, 5), rank=2, regularize=True, atol=1e-9, rtol=1e-9)
    flow = flow.double().train()
    z0, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    results = []
    for fused in (True, False):
        flow.fused = fused
        torch.manual_seed(3)  # the same Hutchinson noise
        zK, logdet = flow(z0, h)
        results.append((zK, logdet, dict(flow.last_regularization)))
    (z_f, ld_f, reg_f), (z_a, ld_a, reg_a) = results
    torch.testing.assert_close(z_f, z_a)
    torch.testing.assert_close(ld_f, ld_a)
    for key in reg_a:
        torch.testing.assert_close(reg_f[key], reg_a[key])


class _ScaledAffine(Flow):
    """``zK = z0 exp(a(h) + s) + b(h)`` with a learned scalar ``s``: ``logdet = sum(a) + D s``."""

    has_inverse = True

    def __init__(self, dim: int, context_dim: int, log_scale: float = 0.0) -> None:
        super().__init__(dim, context_dim)
        self.head = ContextHead(context_dim, {"a": (dim,), "b": (dim,)})
        self.log_scale = nn.Parameter(torch.tensor(log_scale))

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        p = self.head(h)
        a = p["a"] + self.log_scale
        return z0 * a.exp() + p["b"], a.sum(-1)

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        p = self.head(h)
        a = p["a"] + self.log_scale
        return (zK - p["b"]) * (-a).exp(), a.sum(-1)


@pytest.mark.parametrize("log_scale", [0.0, 0.5])
def test_check_flow_takes_a_flow_with_a_scalar_parameter(log_scale: float) -> None:
    """Its perturbation drew ``randn(*())``, a TypeError, for any 0-d parameter (and the zero
    one's fallback scale read ``shape[-1]`` of no shape)."""
    torch.manual_seed(0)
    check_flow(_ScaledAffine(3, 2, log_scale))


def test_diagonal_blocks_index_on_the_jacobian_s_device() -> None:
    # The row index was made on the default device: inside `with torch.device("meta")` (or
    # "cuda") it did not index a CPU Jacobian.
    from vaeflow.flows.jacobian import diagonal_blocks

    jac = torch.arange(2 * 3 * 2 * 3, dtype=torch.float64).reshape(2, 3, 2, 3)
    expected = torch.stack([jac[0, :, 0, :], jac[1, :, 1, :]])
    with torch.device("meta"):
        blocks = diagonal_blocks(jac)
    assert torch.equal(blocks, expected)
