"""FFJORD: exact and Hutchinson traces, a linear field with a known answer, adjoint against
direct backprop, NFE counts (and a fixed-step solve under a default device), RNODE terms, and
option errors."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from vaeflow.checks import InputError
from vaeflow.flows import FFJORD, Planar, Sequential, jacobian_logdet
from vaeflow.flows.ffjord import _Dynamics
from vaeflow.ode import SolverError, check_solver

D, H = 3, 2
TIGHT = dict(atol=1e-9, rtol=1e-9)
RK4 = dict(method="rk4", solver_options={"step_size": 0.25})


def make(**kw: object) -> FFJORD:
    torch.manual_seed(0)
    options = dict(hidden_dims=(16, 16), rank=2, **TIGHT)
    options.update(kw)
    return FFJORD(D, H, **options).double()


def sharpen(flow: FFJORD, factor: float = 3.0) -> FFJORD:
    """Scale the field's shared weights so its trace is far from zero."""
    with torch.no_grad():
        for block in flow.blocks:
            for layer in block.layers:
                layer.weight.mul_(factor)
    return flow


def data(batch: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, D, generator=g, dtype=torch.float64),
        torch.randn(batch, H, generator=g, dtype=torch.float64),
    )


class LinearField(_Dynamics):
    """``dz/dt = A z`` with a parameter ``A``: ``logdet = T tr(A)``, ``zK = expm(T A) z0``."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.layers = nn.ModuleList()

    def amortize(self, h: Tensor) -> tuple[Tensor, ...]:
        return ()

    def forward(self, t: Tensor, z: Tensor, amortized: Sequence[Tensor]) -> Tensor:
        return z @ self.a.T

    def field_parameters(self) -> list[nn.Parameter]:
        return [self.a]


def linear_flow(a: Tensor, end_time: float = 0.7, **kw: object) -> FFJORD:
    flow = make(end_time=end_time, **kw)
    flow.blocks[0] = LinearField(a)
    return flow


@pytest.mark.parametrize("dynamics", [pytest.param("lowrank", marks=pytest.mark.slow), "concat"])
def test_exact_trace_matches_jacobian(dynamics: str) -> None:
    flow = sharpen(make(dynamics=dynamics, num_blocks=2, trace="exact")).train()
    z0, h = data()
    _, logdet = flow(z0, h)
    expected = jacobian_logdet(flow, z0, h)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_reference_lowrank_init_matches_the_jacobian_and_the_papers_head() -> None:
    flow = sharpen(make(trace="exact", lowrank_init="reference")).train()
    z0, h = data()
    # A smaller context: with this start a unit-scale h makes the field stiff (2,030 function
    # evaluations per solve at these tolerances, a minute of Jacobian; 170 at 0.3 h).
    h = 0.3 * h
    _, logdet = flow(z0, h)
    assert logdet.abs().max() > 0.1  # the flow does something
    torch.testing.assert_close(logdet, jacobian_logdet(flow, z0, h), rtol=1e-6, atol=1e-8)
    # The paper's code: a plain nn.Linear head (uniform in +-1/sqrt(H)), V used as it is.
    torch.manual_seed(1)
    wide = FFJORD(64, 256, hidden_dims=(128, 128), rank=8, lowrank_init="reference")
    small = FFJORD(64, 256, hidden_dims=(128, 128), rank=8)
    ref_head, small_head = wide.blocks[0].head.linear.weight, small.blocks[0].head.linear.weight
    bound = 256**-0.5
    assert bound * 0.99 < ref_head.abs().max() <= bound
    assert bound / 8**0.5 * 0.99 < small_head.abs().max() <= bound / 8**0.5
    assert wide.blocks[0].v_scale.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(small.blocks[0].v_scale, torch.tensor([64.0, 128, 128]) ** -0.5)
    h = torch.randn(5, 256)
    p, (u0, v0, c0) = wide.blocks[0].head(h), wide.blocks[0].amortize(h)[:3]
    assert torch.equal(v0, p["v0"]) and torch.equal(u0, p["u0"]) and torch.equal(c0, p["c0"])
    with pytest.raises(InputError, match="valid values are 'reference', 'small'"):
        FFJORD(D, H, lowrank_init="tiny")


def test_a_checkpoint_carries_its_lowrank_scale() -> None:
    # The scale of V is saved with the parameters: a state dict loaded into a model built with
    # the other lowrank_init computes the function it was trained as; one without it (an older
    # vaeflow's, whose V scale was implicit) is refused rather than read wrongly.
    trained = make(lowrank_init="small").eval()
    other = make(lowrank_init="reference").eval()
    other.load_state_dict(trained.state_dict())
    z0, h = data()
    torch.testing.assert_close(other(z0, h)[0], trained(z0, h)[0])
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith("v_scale")}
    with pytest.raises(RuntimeError, match="v_scale"):
        other.load_state_dict(old)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(noise: str) -> None:
    n = 4000
    flow = sharpen(make(noise=noise, atol=1e-7, rtol=1e-7))
    z0, h = data(1)
    exact = flow.eval()(z0, h)[1]
    flow.train()
    torch.manual_seed(1)
    estimates = flow(z0.expand(n, D), h.expand(n, H))[1]
    mean, stderr = estimates.mean(), estimates.std() / n**0.5
    assert estimates.std() > 1e-4, "the estimator should be noisy"
    assert (mean - exact[0]).abs() < 4 * stderr + 1e-6


def test_rademacher_noise_is_plus_minus_one() -> None:
    flow = make()
    eps = flow._noise(torch.zeros(1000, D, dtype=torch.float64))
    assert set(eps.unique().tolist()) == {-1.0, 1.0}


def test_linear_field_logdet_is_T_trace_A() -> None:
    a = torch.tensor([[0.3, -1.0, 0.2], [0.5, -0.4, 0.0], [0.1, 0.7, 0.8]], dtype=torch.float64)
    T = 0.7
    flow = linear_flow(a, end_time=T).eval()
    z0, h = data()
    zK, logdet = flow(z0, h)
    torch.testing.assert_close(logdet, torch.full_like(logdet, T * a.trace().item()))
    torch.testing.assert_close(zK, z0 @ torch.linalg.matrix_exp(T * a).T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(flow.end_times, torch.tensor([T], dtype=torch.float64))


def test_linear_field_rnode_terms() -> None:
    """For dz/dt = A z: the Jacobian Frobenius term is T ||A||_F^2 (exact trace mode)."""
    a = torch.tensor([[0.3, -1.0, 0.2], [0.5, -0.4, 0.0], [0.1, 0.7, 0.8]], dtype=torch.float64)
    flow = linear_flow(a, end_time=0.5, regularize=True).eval()
    z0, h = data()
    flow(z0, h)
    reg = flow.last_regularization
    frob = reg["jacobian_frobenius"]
    torch.testing.assert_close(frob, torch.full_like(frob, 0.5 * (a * a).sum().item()))
    # kinetic = int_0^T ||A z(t)||^2 dt, checked by a fine trapezoidal rule on the exact path.
    ts = torch.linspace(0, 0.5, 2001, dtype=torch.float64)
    path = torch.stack([z0 @ torch.linalg.matrix_exp(t * a).T for t in ts])  # [S, B, D]
    speed = ((path @ a.T) ** 2).sum(-1)  # [S, B]
    torch.testing.assert_close(reg["kinetic"], torch.trapezoid(speed, ts, dim=0), rtol=1e-5, atol=0)


def test_regularization_gradients_flow() -> None:
    flow = make(regularize=True, atol=1e-6, rtol=1e-6).train()
    z0, h = data()
    flow(z0, h)
    reg = flow.last_regularization
    assert set(reg) == {"kinetic", "jacobian_frobenius"}
    assert all(v.shape == (4,) and (v >= 0).all() for v in reg.values())
    (reg["kinetic"].sum() + reg["jacobian_frobenius"].sum()).backward()
    assert flow.blocks[0].layers[0].weight.grad.abs().sum() > 0


def _grads(adjoint: bool) -> tuple[Tensor, list[Tensor]]:
    flow = make(adjoint=adjoint, num_blocks=2, atol=1e-10, rtol=1e-10).train()
    z0, h = data()
    z0.requires_grad_(True)
    h.requires_grad_(True)
    torch.manual_seed(7)  # the same Hutchinson noise in both runs
    zK, logdet = flow(z0, h)
    loss = (zK**2).sum() + (zK[:, 0] * 0.3).sum() - logdet.sum()
    loss.backward()
    grads = [z0.grad, h.grad] + [p.grad for p in flow.parameters()]
    return loss.detach(), grads, flow


def test_adjoint_and_direct_backprop_agree() -> None:
    loss_d, grads_d, flow_d = _grads(adjoint=False)
    loss_a, grads_a, flow_a = _grads(adjoint=True)
    torch.testing.assert_close(loss_a, loss_d, rtol=1e-8, atol=1e-9)
    assert len(grads_a) == len(grads_d)
    for ga, gd in zip(grads_a, grads_d, strict=True):
        assert ga is not None and gd is not None
        torch.testing.assert_close(ga, gd, rtol=1e-5, atol=1e-7)
    assert flow_d.nfe_backward == 0
    assert flow_a.nfe_backward > 0


def test_nfe_counts_reset_per_solve() -> None:
    flow = make(atol=1e-5, rtol=1e-5)
    z0, h = data()
    flow(z0, h)
    first = flow.nfe_forward
    assert first > 0 and flow.nfe_backward == 0
    flow(z0, h)
    assert flow.nfe_forward == first  # same solve, same count: it was reset, not accumulated
    flow.solver = type(flow.solver)(method="rk4", options={"step_size": 0.25})
    flow(z0, h)
    assert flow.nfe_forward == 4 * 4  # 4 steps x 4 stages


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


def test_an_empty_batch_leaves_no_statistics_of_the_previous_call() -> None:
    # a loss that reads last_regularization after an empty batch must not add the last one's
    flow = make(regularize=True)
    z0, h = data()
    flow(z0, h)
    assert flow.nfe_forward > 0 and flow.last_regularization["kinetic"].shape == (4,)
    zk, logdet = flow(z0[:0], h[:0])
    assert zk.shape == (0, D) and logdet.shape == (0,)
    assert flow.statistics() == {"nfe_forward": 0, "nfe_backward": 0}
    assert {k: v.shape for k, v in flow.last_regularization.items()} == {
        "kinetic": (0,), "jacobian_frobenius": (0,)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="dopri6"), "valid methods are .*dopri5"),
        (dict(solver_options={"step": 0.1}), "unknown option.*'step'.*valid options are"),
        (dict(method="rk4"), r"needs a step size: solver_options=\{step_size="),
        (dict(trace="skilling"), "valid values are 'hutchinson', 'exact'"),
        (dict(noise="uniform"), "valid values are 'gaussian', 'rademacher'"),
        (dict(dynamics="hyper"), "valid values are 'lowrank', 'concat'"),
        (dict(nonlinearity="relu6"), "unknown nonlinearity"),
        (dict(end_time=0.0), "end_time must be positive"),
        (dict(atol=0.0), "atol must be positive"),
        # a string would pass the eager fixed-step loop and break torchdiffeq's (the adjoint)
        (dict(method="rk4", solver_options={"step_size": "0.25"}), "step_size must be positive"),
        (dict(method="euler", solver_options={"step_size": True}), "step_size must be positive"),
        (dict(rank=0), "rank must be a positive integer"),
        # checked whichever dynamics reads it (it was accepted, and ignored, with the other)
        (dict(dynamics="concat", rank=-7), "rank must be a positive integer"),
        (dict(dynamics="lowrank", context_proj_dim=-5), "context_proj_dim must be a positive"),
        # each option's value too: torchdiffeq reads them only inside the first solve
        (dict(solver_options={"max_num_steps": "10"}), "max_num_steps must be a positive int"),
        (dict(solver_options={"norm": "seminorm"}), "norm must be a function"),
        (dict(solver_options={"first_step": -0.1}), "first_step must be positive"),
        (dict(solver_options={"step_t": "0.5"}), "step_t must be a list of times"),
        (dict(solver_options={"jump_t": [0.5, float("nan")]}), "each time of jump_t must be"),
        (dict(method="rk4", solver_options={"step_size": 0.25, "interp": "spline"}),
         "unknown interp 'spline'; valid values are 'linear', 'cubic'"),
        # numpy's solve: no gradients, so training would quietly leave the flow untrained
        (dict(method="scipy_solver"), "scipy_solver' gives no gradients.*adjoint=True"),
    ],
)
def test_bad_options_fail_before_any_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_check_solver_accepts_real_options() -> None:
    assert check_solver("dopri5", {"first_step": 0.1, "max_num_steps": 100}) == {
        "first_step": 0.1,
        "max_num_steps": 100,
    }
    assert check_solver("rk4", {"step_size": 0.1}) == {"step_size": 0.1}
    # times as plain values (config.json and checkpoints hold them): from a number, a tuple
    # or a tensor
    assert check_solver("dopri5", {"step_t": 0.5, "jump_t": (0.25, 1)}) == {
        "step_t": [0.5], "jump_t": [0.25, 1.0]}
    assert check_solver("dopri5", {"step_t": torch.tensor([0.5])}) == {"step_t": [0.5]}


def test_solver_failure_is_a_clear_error() -> None:
    a = torch.eye(D, dtype=torch.float64) * 200.0
    flow = linear_flow(a, end_time=1.0, solver_options={"max_num_steps": 5})
    z0, h = data()
    with pytest.raises(SolverError, match="dopri5.*failed"):
        flow(z0, h)


def test_eval_mode_uses_exact_trace_and_is_deterministic() -> None:
    flow = make()
    z0, h = data()
    flow.eval()
    assert flow.uses_exact_trace()
    a, b = flow(z0, h)[1], flow(z0, h)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    flow.train()
    assert not flow.uses_exact_trace()
    flow.exact_in_eval = False
    flow.eval()
    assert not flow.uses_exact_trace()


def test_fixed_end_time_is_a_buffer() -> None:
    flow = make(train_end_time=False)
    assert "log_end_time" not in dict(flow.named_parameters())
    assert "log_end_time" in flow.state_dict()


def test_replace_solver_changes_the_solve_not_the_model() -> None:
    coarse = sharpen(make(method="rk4", solver_options={"step_size": 0.5})).eval()
    z0, h = data()
    _, rough = coarse(z0, h)
    settings = Sequential(coarse).replace_solver(method="dopri5")  # reaches flows inside
    # A new method starts from no options (rk4's step_size is no dopri5 option).
    assert settings == {"method": "dopri5", **TIGHT, "options": {}}
    assert coarse.solver.options == {}
    _, fine = coarse(z0, h)
    torch.testing.assert_close(fine, jacobian_logdet(coarse, z0, h), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rough, fine, rtol=1e-6, atol=1e-6)  # two rk4 steps were coarse
    # The same method keeps its options unless given; tolerances alone leave them.
    coarse.replace_solver(method="rk4", solver_options={"step_size": 0.25})
    assert coarse.replace_solver(method="rk4")["options"] == {"step_size": 0.25}
    # a fixed-step flow keeps tolerances (its test figures are solved with dopri5 at them)
    assert coarse.tighten_solver(10.0) == {"atol": TIGHT["atol"] / 10, "rtol": TIGHT["rtol"] / 10}
    assert coarse.get_extra_state()["method"] == "rk4"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"adjoint": True}, "unknown solver setting.*'adjoint'.*valid settings are method, atol"),
        ({"method": "rk5"}, "unknown ODE solver method 'rk5'.*dopri5"),
        ({"method": "rk4"}, "needs a step size: solver_options="),
        ({"atol": -1.0}, "atol"),
        ({"solver_options": {"stepsize": 0.1}}, "unknown option.*'stepsize'"),
        ({"method": "rk4", "solver_options": {"step_size": 0.25}, "atol": 1e-3},
         "atol means nothing to the fixed-step solver 'rk4'.*; drop it, or"),
        ({"method": "rk4", "solver_options": {"step_size": 0.25}, "atol": 1e-3, "rtol": 1e-3},
         "atol and rtol mean nothing to the fixed-step solver 'rk4'.*; drop them, or"),
        ({"method": "euler", "solver_options": {"step_size": 2}}, "at most 1.*s in \\[0, 1\\]"),
    ],
)
def test_replace_solver_refuses_bad_settings_and_keeps_the_old(
    settings: dict, message: str
) -> None:
    flow = make()
    before = flow.solver
    with pytest.raises(InputError, match=message):
        flow.replace_solver(**settings)
    assert flow.solver is before


def test_a_flow_without_ode_has_no_solver_to_replace() -> None:
    assert Planar(D, H, num_steps=2).replace_solver(method="dopri5") is None
