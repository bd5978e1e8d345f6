"""Every fast path computes the same function as the plain path: the same loss and the same
gradients (every parameter, the input z0 and the context h), in float64 at tight tolerance.

- the fused field (hand-written VJP) against the ``autograd.grad`` divergence (and its
  Hutchinson estimate in training against autograd's, for the same noise);
- ``torch.compile`` of the fused field against the eager field;
- the adjoint against direct backpropagation, on the whole VAE loss;
- vaeflow's own fixed-step solver against torchdiffeq's;
- and the fixed-step training step never reads a device value on the host (it runs on the
  meta device, where any such read raises).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor
from torchdiffeq import odeint

from vaeflow.flows import FFJORD
from vaeflow.flows import ffjord as ffjord_module
from vaeflow.flows.ffjord import NONLINEARITIES
from vaeflow.nets import make_networks
from vaeflow.ode import SolverConfig, solve, uses_static_solver
from vaeflow.train import train_step
from vaeflow.vae import VAE

D, H, B = 3, 2, 5
RK4 = dict(method="rk4", solver_options={"step_size": 0.1})
CLOSE = dict(rtol=1e-10, atol=1e-11)


def make_flow(**kw: object) -> FFJORD:
    torch.manual_seed(0)
    options = dict(hidden_dims=(8, 8), rank=2, num_blocks=2, atol=1e-7, rtol=1e-7)
    options.update(kw)
    flow = FFJORD(D, H, **options).double()
    with torch.no_grad():  # a field far from linear, so that any mistake in the VJP shows
        for block in flow.blocks:
            for layer in block.layers:
                layer.weight.mul_(2.0)
    return flow


def flow_loss_and_grads(flow: FFJORD, seed: int = 3) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(seed)  # the same Hutchinson noise for both paths
    zK, logdet = flow(z0, h)
    loss = (zK**2).sum() + (zK[:, 0] * 0.3).sum() - logdet.sum()
    if flow.regularize:
        reg = flow.last_regularization
        loss = loss + 0.1 * reg["kinetic"].sum() + 0.1 * reg["jacobian_frobenius"].sum()
    grads = torch.autograd.grad(loss, [z0, h, *flow.parameters()])
    return loss.detach(), list(grads)


def assert_same(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]], **tol) -> None:
    tol = tol or CLOSE
    torch.testing.assert_close(a[0], b[0], **tol)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, **tol)


# --------------------------------------------------------------------------------------------
# Fused field


@pytest.mark.parametrize("dynamics", ["lowrank", "concat"])
@pytest.mark.parametrize("trace", ["hutchinson", "exact"])
def test_fused_field_matches_autograd(dynamics: str, trace: str) -> None:
    """Adaptive dopri5, RNODE terms on: same loss, gradients and step count."""
    kw = dict(dynamics=dynamics, trace=trace, regularize=True)
    plain, fused = make_flow(fused=False, **kw), make_flow(fused=True, **kw)
    expected, got = flow_loss_and_grads(plain), flow_loss_and_grads(fused)
    assert_same(got, expected)
    assert fused.nfe_forward == plain.nfe_forward


def test_fused_field_matches_autograd_in_eval_and_inverse() -> None:
    """Eval mode (exact trace, no graph recorded) and the reverse-time solve of the inverse."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    h = torch.randn(B, H, generator=g, dtype=torch.float64)
    out = {}
    for fused in (False, True):
        flow = make_flow(fused=fused).eval()
        with torch.no_grad():
            zK, logdet = flow(z0, h)
            z_back, logdet_back = flow.inverse(zK, h)
        out[fused] = (zK, logdet, z_back, logdet_back)
    for a, b in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(a, b, **CLOSE)
    torch.testing.assert_close(out[True][2], z0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
def test_fused_field_matches_autograd_for_every_nonlinearity(nonlinearity: str) -> None:
    """On a fixed grid (ELU's second derivative jumps at 0, which makes adaptive step choices
    sensitive to rounding, so an adaptive solve would not compare like with like)."""
    kw = dict(nonlinearity=nonlinearity, regularize=True, **RK4)
    assert_same(
        flow_loss_and_grads(make_flow(fused=True, **kw)),
        flow_loss_and_grads(make_flow(fused=False, **kw)),
    )


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITIES))
def test_fused_derivative_is_finite_where_the_activation_is(nonlinearity: str) -> None:
    """Far from 0 on both sides (ELU's exp(x) of the branch not taken overflowed for x > 88,
    and torch.where's gradient turned its inf into a NaN)."""
    act, grad = NONLINEARITIES[nonlinearity], ffjord_module.NONLINEARITY_GRADS[nonlinearity]
    x = torch.tensor([-200.0, -30.0, -1.0, 0.5, 30.0, 200.0], requires_grad=True)
    y = act(x)
    (expected,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    d = grad(x, y)
    assert torch.isfinite(d).all() and torch.allclose(d, expected)
    (second,) = torch.autograd.grad(d.sum(), x)  # the fused trace backpropagates through it
    assert torch.isfinite(second).all()


def test_inference_mode_is_refused_where_the_trace_needs_autograd() -> None:
    x, h = torch.randn(3, 2), torch.randn(3, 3)
    fused = FFJORD(2, 3, hidden_dims=(4,), fused=True).eval()
    with torch.inference_mode():
        assert torch.isfinite(fused(x, h)[1]).all()  # the fused field needs no autograd
    flow = FFJORD(2, 3, hidden_dims=(4,), fused=False).eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="use torch.no_grad"):
        flow(x, h)
    with torch.no_grad():
        assert torch.isfinite(flow(x, h)[1]).all()


def test_fused_field_vjp_is_the_jacobian() -> None:
    """``forward_and_vjp`` returns ``probes^T df/dz`` for K probes at once (here the identity:
    the full Jacobian), checked against ``torch.autograd.functional.jacobian``."""
    flow = make_flow()
    block = flow.blocks[0]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    amortized = block.amortize(torch.randn(B, H, generator=g, dtype=torch.float64))
    t = torch.tensor(0.3, dtype=torch.float64)
    probes = torch.eye(D, dtype=torch.float64).expand(B, D, D)
    f, vjp = block.forward_and_vjp(t, z, amortized, probes)
    torch.testing.assert_close(f, block(t, z, amortized), rtol=1e-14, atol=1e-14)
    jac = torch.autograd.functional.jacobian(lambda x: block(t, x, amortized).sum(0), z)
    torch.testing.assert_close(vjp, jac.permute(1, 0, 2), rtol=1e-12, atol=1e-13)  # [B, out, in]


def test_default_fuses_the_exact_trace_only() -> None:
    flow = make_flow()
    assert flow.fused is None
    assert flow._fused_field(flow.blocks[0], exact=True) is not None
    assert flow._fused_field(flow.blocks[0], exact=False) is None
    assert make_flow(fused=False)._fused_field(flow.blocks[0], exact=True) is None


def test_custom_field_without_vjp_uses_autograd() -> None:
    """A field that does not write out its VJP still works with fused=True."""
    flow = make_flow(fused=True)
    assert flow.fused and flow._fused_field(flow.blocks[0], exact=False) is not None
    flow.blocks[0].supports_vjp = False
    assert flow._fused_field(flow.blocks[0], exact=False) is None
    assert flow._fused_field(flow.blocks[0], exact=True) is None
    expected = flow_loss_and_grads(make_flow(fused=False))
    assert_same(flow_loss_and_grads(flow), expected)


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


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compiled_field_matches_eager() -> None:
    """The real thing: inductor compiles the fused field (CPU C++ code; needs a C compiler).
    One block and one solve keep the compile time down."""
    kw = dict(num_blocks=1, regularize=True, **RK4)
    eager = flow_loss_and_grads(make_flow(**kw))
    compiled_flow = make_flow(compile=True, fused=False, **kw)  # compile implies fused
    assert compiled_flow.fused
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would not count
        got = flow_loss_and_grads(compiled_flow)
    assert compiled_flow._compiled is not None and compiled_flow._compiled.fn is not None
    assert_same(got, eager)


def test_compile_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ffjord_module.torch, "compile", broken_compile)
    flow = make_flow(compile=True, **RK4)
    with pytest.warns(RuntimeWarning, match="torch.compile is unavailable.*no compiler here"):
        got = flow_loss_and_grads(flow)
    assert_same(got, flow_loss_and_grads(make_flow(**RK4)))


def test_compile_failing_at_first_call_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def compile_that_fails_later(fn: object, **kwargs: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("inductor: C compiler not found")

        return compiled

    monkeypatch.setattr(ffjord_module.torch, "compile", compile_that_fails_later)
    flow = make_flow(compile=True, **RK4)
    with pytest.warns(RuntimeWarning, match="C compiler not found"):
        got = flow_loss_and_grads(flow)
    assert_same(got, flow_loss_and_grads(make_flow(**RK4)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(compile="fastest"), "unknown compile mode 'fastest'"),
        (dict(compile=1), "compile must be a bool"),
    ],
)
def test_bad_compile_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FFJORD(D, H, **kwargs)


# --------------------------------------------------------------------------------------------
# Adjoint against direct backprop, on the whole VAE loss


def tiny_vae(**flow_kw: object) -> VAE:
    torch.manual_seed(0)
    encoder, decoder = make_networks(
        "mlp", (1, 4, 4), latent_dim=D, context_dim=H, hidden_sizes=(8,)
    )
    flow = FFJORD(D, H, hidden_dims=(8, 8), rank=2, num_blocks=2, **flow_kw)
    return VAE(encoder, decoder, "bernoulli", flow).double()


def vae_loss_and_grads(vae: VAE, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(5)  # posterior and Hutchinson noise
    loss = vae.loss(x, beta=0.7)["loss"]
    return loss.detach(), list(torch.autograd.grad(loss, list(vae.parameters())))


@pytest.mark.parametrize("fused", [True, False])
def test_adjoint_matches_direct_on_the_vae_loss(fused: bool) -> None:
    x = (torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    tight = dict(atol=1e-10, rtol=1e-10, fused=fused)
    direct = vae_loss_and_grads(tiny_vae(adjoint=False, **tight), x)
    adjoint = vae_loss_and_grads(tiny_vae(adjoint=True, **tight), x)
    assert_same(adjoint, direct, rtol=1e-6, atol=1e-8)  # the two solve different ODEs
    assert all(g.abs().sum() > 0 for g in direct[1][-4:])


# --------------------------------------------------------------------------------------------
# vaeflow's fixed-step solver against torchdiffeq's


def _field(a: Tensor):
    def func(t: Tensor, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        z, _ = y
        return torch.tanh(z @ a.T) * (1 + t), (z * z).sum(-1) * t

    return func


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("span", [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("step_size", [0.25, 0.3])
def test_static_solver_matches_torchdiffeq(method: str, span: tuple, step_size: float) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    y0 = (torch.randn(B, D, generator=g, dtype=torch.float64), torch.zeros(B, dtype=torch.float64))
    config = SolverConfig(method=method, options={"step_size": step_size})
    assert uses_static_solver(config)
    ours = solve(_field(a), y0, span, config)
    theirs = tuple(
        y[-1]
        for y in odeint(
            _field(a), y0, torch.tensor(span, dtype=torch.float64), method=method,
            options={"step_size": step_size},
        )
    )  # fmt: skip
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)
    (g_ours,) = torch.autograd.grad(sum(o.sum() for o in ours), a)
    (g_theirs,) = torch.autograd.grad(sum(o.sum() for o in theirs), a)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-13, atol=1e-13)


def test_static_solver_is_not_used_where_torchdiffeq_is_needed() -> None:
    assert not uses_static_solver(SolverConfig("dopri5"))
    assert not uses_static_solver(SolverConfig("rk4", options={"step_size": 0.1, "perturb": True}))
    adjoint = SolverConfig("rk4", options={"step_size": 0.1}, adjoint=True)
    assert not uses_static_solver(adjoint)
    with torch.no_grad():  # the adjoint's forward pass records nothing: the static loop serves
        assert uses_static_solver(adjoint)


@pytest.mark.parametrize("flow", ["planar", "iaf", "householder", "triangular", "ffjord-rk4"])
def test_fixed_step_training_step_never_syncs(flow: str) -> None:
    """A whole training step (loss, backward, Adamax) on the meta device: tensors there have
    no values, so any ``.item()``, ``bool(tensor)`` or host copy raises. This is what lets a
    GPU run ahead of the host, and CUDA-graph capture of the step. The adaptive solver must
    read its error estimate on the host, so it cannot pass (checked last)."""
    from bench_variants import build_model

    def step(name: str) -> None:
        model = build_model(name, "small").to("meta")
        optimizer = torch.optim.Adamax(model.parameters(), lr=5e-4, eps=1e-7)
        train_step(model, optimizer, torch.empty(10, 1, 28, 28, device="meta"), 1.0)

    step(flow)
    if flow == "ffjord-rk4":
        with pytest.raises(RuntimeError, match="meta"):
            step("ffjord")  # dopri5
