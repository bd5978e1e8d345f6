"""vaeflow flows as Pyro guide transforms: SVI beats the best diagonal Gaussian on a correlated
posterior, log_prob reuses the forward log-determinant, inverses and their errors, shapes, the
param store, the transform's memory of its last call (whatever its cache_size, and not past a
change of the flow's parameters), the docs example and the Pyro VAE experiment."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro_vae
import pytest
import torch
from conftest import run_readme
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.infer import SVI, Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn
from torch.testing import assert_close

from vaeflow.flows import FFJORD, FLOWS, Flow, make_flow
from vaeflow.pyro import ConditionalFlowTransform, FlowTransform, flow_guide_distribution

D, H = 2, 4  # latent and context sizes
# Small flows: a test of the Pyro plumbing, not of capacity.
SMALL: dict[str, dict[str, object]] = {
    "planar": dict(num_steps=8),
    "iaf": dict(num_steps=2, hidden_dim=16),
    "orthogonal": dict(num_steps=4),
    "householder": dict(num_steps=4, num_householder=2),
    "triangular": dict(num_steps=4),
    "ffjord": dict(hidden_dims=(16, 16), rank=2, atol=1e-4, rtol=1e-4),
}
TIGHT_FFJORD = dict(hidden_dims=(16, 16), rank=2, atol=1e-10, rtol=1e-10)
WITH_INVERSE = [name for name, cls in FLOWS.items() if cls.has_inverse]
WITHOUT_INVERSE = [name for name, cls in FLOWS.items() if not cls.has_inverse]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Every tensor here is tiny: a second thread costs more in hand-offs than it saves.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_param_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def build(name: str, seed: int = 0, **kw: object) -> Flow:
    torch.manual_seed(seed)
    hyper = {**SMALL.get(name, {}), **kw}
    return make_flow(name, D, H, **hyper).double()


def base_inputs(batch: int = 5, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``mu [B, D]``, ``sigma [B, D]``, ``h [B, H]`` in float64."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, D, generator=g, dtype=torch.float64)
    sigma = 0.5 + torch.rand(batch, D, generator=g, dtype=torch.float64)
    h = torch.randn(batch, H, generator=g, dtype=torch.float64)
    return mu, sigma, h


def forbid_inverse(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> None:
    def inverse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the flow's inverse ran while scoring the transform's own sample")

    monkeypatch.setattr(flow, "inverse", inverse)


def count_inverse(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = flow.inverse

    def inverse(zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        return original(zK, h)

    monkeypatch.setattr(flow, "inverse", inverse)
    return calls


# --------------------------------------------------------------------------------------------
# SVI on a linear-Gaussian model with a correlated posterior


class LinearGaussian:
    """``z ~ N(0, I_2)``, ``x | z ~ N(A z, s^2)`` with ``A = [1, 1]``, ``s = 0.3``.

    The posterior of ``z`` given one ``x`` is Gaussian with precision ``P = I + A^T A / s^2`` and
    correlation -0.92. The best diagonal Gaussian (mean exact, variances ``1 / P_ii``) misses the
    evidence by ``KL = (sum_i log P_ii - log det P) / 2 = 0.92`` nats per point, the same for
    every ``x``; a guide that models the correlation can close that gap.
    """

    s = 0.3
    num_points = 8

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)  # [1, D]
        z = torch.randn(self.num_points, D, generator=g, dtype=torch.float64)
        self.x = z @ self.A.T + self.s * torch.randn(self.num_points, 1, generator=g)  # [N, 1]
        precision = torch.eye(D, dtype=torch.float64) + self.A.T @ self.A / self.s**2
        self.gap_per_point = 0.5 * float(precision.diagonal().log().sum() - precision.logdet())
        marginal = dist.Normal(0.0, math.sqrt(float(self.A @ self.A.T) + self.s**2))
        self.log_evidence = float(marginal.log_prob(self.x).sum())
        self.gap = self.num_points * self.gap_per_point
        self.best_diagonal_loss = -self.log_evidence + self.gap

    def model(self, x: Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.A.T, self.s).to_event(1), obs=x)


class LinearEncoder(nn.Module):
    """``x [B, 1] -> (mu [B, D], sigma [B, D], h [B, H])``: the exact posterior mean is linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2 * D + H)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, scale, h = self.linear(x).split([D, D, H], dim=-1)
        return mu, nn.functional.softplus(scale) + 1e-4, h


def flow_guide(encoder: nn.Module, transform: ConditionalFlowTransform) -> Callable:
    def guide(x: Tensor) -> None:
        pyro.module("encoder", encoder)
        pyro.module("flow", transform)
        with pyro.plate("data", x.shape[0]):
            mu, sigma, h = encoder(x)
            pyro.sample("z", flow_guide_distribution(mu, sigma, h, transform))

    return guide


@pytest.fixture(scope="module")
def problem() -> LinearGaussian:
    return LinearGaussian()


# FFJORD costs ~15x a discrete flow per step; it converges in fewer.
SVI_STEPS = {"ffjord": 120}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "ffjord" else n for n in FLOWS]
)
def test_svi_with_flow_guide_beats_best_diagonal_gaussian(
    name: str, problem: LinearGaussian
) -> None:
    steps = SVI_STEPS.get(name, 200)
    flow = build(name)
    transform = ConditionalFlowTransform(flow)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    guide = flow_guide(LinearEncoder().double(), transform)
    # The decaying learning rate lets the last iterate settle instead of rattling around.
    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(problem.model, guide, optim, Trace_ELBO())
    losses = [svi.step(problem.x) for _ in range(steps)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 5.0

    transform.eval()  # FFJORD: exact trace
    with torch.no_grad():
        # 2000 vectorized particles: the ELBO to ~0.1 nats, and leading sample dims exercised.
        loss = Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(
            problem.model, guide, problem.x
        )
    bar, evidence = problem.best_diagonal_loss, -problem.log_evidence
    # No guide can beat the evidence: a wrong log-determinant would show up here.
    assert loss > evidence - 0.3, (loss, evidence)
    if name == "none":
        # The diagonal family reaches (close to) its analytic optimum and cannot pass it.
        assert bar - 0.3 < loss < bar + 0.4 * problem.gap, (loss, bar)
    else:
        # Seen: every flow recovers 60-98% of the gap over seeds; ask for 30%.
        assert loss < bar - 0.3 * problem.gap, (loss, bar, evidence)


# --------------------------------------------------------------------------------------------
# log_prob: the forward log-determinant for the transform's own sample, the inverse otherwise


@pytest.mark.parametrize("cache_size", [0, 1])
@pytest.mark.parametrize("name", list(FLOWS))
def test_log_prob_of_own_sample_reuses_forward_logdet(
    name: str, cache_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = build(name)  # training mode: FFJORD uses a Hutchinson estimate
    mu, sigma, h = base_inputs()
    q = flow_guide_distribution(mu, sigma, h, ConditionalFlowTransform(flow, cache_size))
    forbid_inverse(flow, monkeypatch)
    torch.manual_seed(3)
    zK = q.rsample((2,))  # [2, B, D]
    nfe = getattr(flow, "nfe_forward", None)
    log_q = q.log_prob(zK)
    assert log_q.shape == (2, 5)
    if nfe is not None:
        assert flow.nfe_forward == nfe, "log_prob ran another solve"

    # Replay the same draws (base noise, then FFJORD's Hutchinson noise) by hand.
    torch.manual_seed(3)
    z0 = dist.Normal(mu, sigma).rsample((2,))
    zK_hand, logdet = flow(z0.reshape(-1, D), h.expand(2, -1, -1).reshape(-1, H))
    assert_close(zK, zK_hand.reshape(2, 5, D))
    expected = dist.Normal(mu, sigma).log_prob(z0).sum(-1) - logdet.reshape(2, 5)
    assert_close(log_q, expected, rtol=1e-12, atol=1e-12)
    if name != "none":
        assert logdet.abs().max() > 1e-3, "a flow that does nothing tests nothing"


def test_hutchinson_logdet_is_reused_not_redrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring FFJORD's sample in training mode returns the estimate of its forward pass, which
    differs from the exact trace (so a recomputation would be caught)."""
    flow = build("ffjord")
    mu, sigma, h = base_inputs(batch=64)
    q = flow_guide_distribution(mu, sigma, h, ConditionalFlowTransform(flow))
    zK = q.rsample()
    transform = q.transforms[0]
    z0, _, estimate = transform._last
    forbid_inverse(flow, monkeypatch)
    assert_close(q.log_prob(zK), dist.Normal(mu, sigma).log_prob(z0).sum(-1) - estimate)
    flow.eval()
    _, exact = flow(z0, h)
    assert (estimate - exact).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["planar", "ffjord"])
def test_trace_elbo_with_vectorized_particles_runs_no_inverse(
    name: str, monkeypatch: pytest.MonkeyPatch, problem: LinearGaussian
) -> None:
    flow = build(name)
    forbid_inverse(flow, monkeypatch)
    torch.manual_seed(0)
    guide = flow_guide(LinearEncoder().double(), ConditionalFlowTransform(flow))
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    before = {n: p.detach().clone() for n, p in flow.named_parameters()}
    assert math.isfinite(svi.step(problem.x))
    for n, p in flow.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} was not updated"


@pytest.mark.parametrize("name", WITH_INVERSE)
def test_log_prob_of_another_value_inverts_the_flow(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = TIGHT_FFJORD if name == "ffjord" else {}
    flow = build(name, **kw).eval()  # FFJORD: exact trace both ways
    mu, sigma, h = base_inputs()
    cond = ConditionalFlowTransform(flow)
    q = flow_guide_distribution(mu, sigma, h, cond)
    with torch.no_grad():
        zK = q.sample((3,))
        fresh = q.log_prob(zK)
        z0 = q.transforms[0]._last[0]
        calls = count_inverse(flow, monkeypatch)
        other = q.log_prob(zK.clone())
        assert calls[0] == 1
        if name == "ffjord":
            assert flow.nfe_forward > 0  # the reverse-time solve
        # A transform conditioned afresh has never seen zK: it inverts too.
        again = flow_guide_distribution(mu, sigma, h, cond).log_prob(zK)
        assert calls[0] == 2
        recovered = cond.condition(h).inv(zK.clone())
    assert_close(other, fresh, rtol=1e-8, atol=1e-8)
    assert_close(again, fresh, rtol=1e-8, atol=1e-8)
    assert_close(recovered, z0, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", WITHOUT_INVERSE)
def test_flows_without_inverse_raise_a_clear_error(name: str) -> None:
    flow = build(name)
    mu, sigma, h = base_inputs()
    transform = ConditionalFlowTransform(flow)
    q = flow_guide_distribution(mu, sigma, h, transform)
    zK = q.rsample()
    q.log_prob(zK)  # its own sample is fine
    message = rf"{type(flow).__name__} has no inverse.*very tensor it produced"
    with pytest.raises(NotImplementedError, match=message):
        q.log_prob(zK.clone())
    with pytest.raises(NotImplementedError, match=message):
        transform.condition(h).inv(zK)


# --------------------------------------------------------------------------------------------
# Shapes, composition, registration, errors


def test_event_shapes_and_to_event() -> None:
    flow = build("iaf")
    transform = ConditionalFlowTransform(flow)
    mu, sigma, h = base_inputs()
    t = transform.condition(h)
    assert isinstance(t, FlowTransform) and t.bijective
    assert t.domain.event_dim == 1 and t.codomain.event_dim == 1
    q = flow_guide_distribution(mu, sigma, h, transform)
    assert q.batch_shape == (5,) and q.event_shape == (D,)
    q1 = dist.TransformedDistribution(dist.Normal(mu, sigma).to_event(1), [transform.condition(h)])
    assert q1.batch_shape == (5,) and q1.event_shape == (D,)
    z = q.rsample()
    assert_close(q1.log_prob(z), q.log_prob(z))
    # .to_event(1) after the transform folds the data dimension into the event.
    folded = q.to_event(1)
    assert folded.batch_shape == () and folded.event_shape == (5, D)
    z = folded.rsample()
    assert_close(folded.log_prob(z), q.log_prob(z).sum())
    # One context [H] shared by the whole batch.
    shared = dist.TransformedDistribution(dist.Normal(mu, sigma), [transform.condition(h[0])])
    z = shared.rsample((4,))
    assert z.shape == (4, 5, D) and shared.log_prob(z).shape == (4, 5)


def test_composed_conditional_flows_score_without_inverse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = build("planar", seed=0), build("triangular", seed=1)
    stack = ConditionalComposeTransformModule(
        [ConditionalFlowTransform(first), ConditionalFlowTransform(second)]
    )
    forbid_inverse(first, monkeypatch)
    forbid_inverse(second, monkeypatch)
    mu, sigma, h = base_inputs()
    q = dist.TransformedDistribution(dist.Normal(mu, sigma), [stack.condition(h)])
    torch.manual_seed(0)
    zK = q.rsample()
    torch.manual_seed(0)
    z0 = dist.Normal(mu, sigma).rsample()
    z1, logdet1 = first(z0, h)
    z2, logdet2 = second(z1, h)
    assert_close(zK, z2)
    expected = dist.Normal(mu, sigma).log_prob(z0).sum(-1) - logdet1 - logdet2
    assert_close(q.log_prob(zK), expected)


@pytest.mark.parametrize("name", list(FLOWS))
def test_pyro_module_registers_every_flow_parameter(name: str) -> None:
    flow = build(name)
    pyro.module("flow", ConditionalFlowTransform(flow))
    store = pyro.get_param_store()
    expected = {f"flow$$$flow.{n}": p for n, p in flow.named_parameters()}
    assert set(store.keys()) == set(expected)
    for key, param in expected.items():
        assert store.get_param(key) is param, key


def test_errors() -> None:
    flow = build("planar")
    with pytest.raises(TypeError, match="vaeflow.flows.Flow"):
        ConditionalFlowTransform(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_size"):
        ConditionalFlowTransform(flow, cache_size=2)
    transform = ConditionalFlowTransform(flow)
    with pytest.raises(ValueError, match="context"):
        transform.condition(torch.tensor(1.0))
    wrong_size = f"Planar takes a context of size H = {H}.*got \\(3, {H + 1}\\)"
    with pytest.raises(ValueError, match=wrong_size):
        transform.condition(torch.zeros(3, H + 1, dtype=torch.float64))
    t = transform.condition(torch.zeros(3, H, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not broadcast"):
        t(torch.zeros(5, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="vectors of size 2"):
        t(torch.zeros(3, D + 1, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["planar", "ffjord"])
def test_on_cuda(name: str, problem: LinearGaussian) -> None:
    device = torch.device("cuda")
    flow = build(name).to(device)
    transform = ConditionalFlowTransform(flow)
    guide = flow_guide(LinearEncoder().double().to(device), transform)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    x = problem.x.to(device)
    assert math.isfinite(svi.step(x))
    mu, sigma, h = (t.to(device) for t in base_inputs())
    q = flow_guide_distribution(mu, sigma, h, transform)
    zK = q.rsample()
    assert zK.device.type == "cuda" and q.log_prob(zK).device.type == "cuda"


# --------------------------------------------------------------------------------------------
# The transform's memory of its last call: its own sample is scored without running the
# flows again, whatever its cache_size, and nothing is remembered past a parameter change


@pytest.mark.parametrize("cache_size", [0, 1])
def test_composed_transforms_score_their_sample_without_running_the_flows_again(
    cache_size: int,
) -> None:
    """Torch's ComposeTransform recomputes each part's image to take its log-determinant. The
    transform remembers its last call whatever ``cache_size`` is: scoring the sample runs no
    flow again (for FFJORD: no second solve, and the Hutchinson estimate of the sample)."""
    torch.manual_seed(0)
    d, h_dim = 2, 4
    flows = [make_flow("ffjord", d, h_dim, hidden_dims=(8,), atol=1e-4, rtol=1e-4).double(),
             make_flow("planar", d, h_dim, num_steps=2).double()]
    calls = [0, 0]
    for i, flow in enumerate(flows):
        flow.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    stack = ConditionalComposeTransformModule(
        [ConditionalFlowTransform(flow, cache_size) for flow in flows]
    )
    mu = torch.zeros(3, d, dtype=torch.float64)
    h = torch.randn(3, h_dim, dtype=torch.float64)
    q = dist.TransformedDistribution(dist.Normal(mu, torch.ones_like(mu)), [stack.condition(h)])
    torch.manual_seed(1)
    zK = q.rsample()
    assert calls == [1, 1]
    log_q = q.log_prob(zK)
    assert calls == [1, 1]

    torch.manual_seed(1)  # the same base noise, then the same Hutchinson noise, by hand
    z0 = dist.Normal(mu, torch.ones_like(mu)).rsample()
    z1, logdet1 = flows[0](z0, h)
    _, logdet2 = flows[1](z1, h)
    expected = dist.Normal(mu, torch.ones_like(mu)).log_prob(z0).sum(-1) - logdet1 - logdet2
    torch.testing.assert_close(log_q, expected)


def test_without_a_cache_a_fixed_input_follows_the_flows_parameters() -> None:
    """cache_size=0 asks for no cache: the same z0 tensor pushed through again after the
    parameters changed (an optimizer step; a fixed grid of points drawn each epoch) gets the
    new image, not the remembered one of its last call."""
    torch.manual_seed(0)
    flow = make_flow("planar", 2, 4, num_steps=2).double()
    t = ConditionalFlowTransform(flow, cache_size=0).condition(
        torch.randn(3, 4, dtype=torch.float64))
    z0 = torch.randn(3, 2, dtype=torch.float64)
    first = t(z0).detach().clone()
    assert torch.equal(t(z0), first)  # unchanged parameters: the memory may answer
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1)
    moved = t(z0)
    expected, logdet = flow(z0, t.context.expand(3, -1))
    torch.testing.assert_close(moved, expected)
    assert not torch.equal(moved, first)
    torch.testing.assert_close(t.log_abs_det_jacobian(z0, moved), logdet)


def test_after_a_parameter_change_the_inverse_and_logdet_are_not_remembered() -> None:
    """The memory of the last call answers the inverse of its zK and the log-determinant of
    its pair only while the parameters are unchanged: after an optimizer step the same zK
    inverts under the new flow, and the pair's logdet is the new flow's at z0."""
    torch.manual_seed(0)
    flow = make_flow("iaf", 2, 4, num_steps=2, hidden_dim=8).double()
    t = ConditionalFlowTransform(flow, cache_size=0).condition(
        torch.randn(3, 4, dtype=torch.float64))
    h = t.context.expand(3, -1)
    z0 = torch.randn(3, 2, dtype=torch.float64)
    zK = t(z0)
    assert t.inv(zK) is z0  # unchanged parameters: answered from memory
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.testing.assert_close(t.log_abs_det_jacobian(z0, zK), flow(z0, h)[1])
    back = t.inv(zK)
    assert not torch.allclose(back, z0)
    torch.testing.assert_close(flow(back, h)[0], zK)


def fit_fixed_data(cache_size: int, optimizer: str, steps: int = 3) -> list[tuple[float, float]]:
    """Fit ``q = flow_h(N(0, I))`` (one IAF, one fixed context ``h [H]``) to fixed data
    ``X [N, D]`` by maximum likelihood, ``q`` built once and ``q.log_prob(X)`` scored on the
    same tensor every step, as a density fit in Pyro is written. Returns per step the loss
    that was stepped on and the loss of the same parameters scored by a fresh transform."""
    torch.manual_seed(0)
    D, H = 2, 3
    flow = make_flow("iaf", D, H, num_steps=2, hidden_dim=8).double()
    conditional = ConditionalFlowTransform(flow, cache_size=cache_size)
    h = torch.zeros(H, dtype=torch.float64)
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [conditional.condition(h)])
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    optim_class = ClippedAdam if optimizer == "ClippedAdam" else torch.optim.Adam
    optim = optim_class(flow.parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        optim.zero_grad()
        loss = -q.log_prob(x).mean()
        loss.backward()
        with torch.no_grad():
            fresh = dist.TransformedDistribution(base, [conditional.condition(h)])
            out.append((loss.item(), -fresh.log_prob(x.clone()).mean().item()))
        optim.step()
    return out


@pytest.mark.parametrize("cache_size", [0, 1])
@pytest.mark.parametrize("optimizer", ["Adam", "ClippedAdam"])
def test_a_transform_kept_across_steps_scores_with_the_new_parameters(
    cache_size: int, optimizer: str
) -> None:
    # The transform remembered its last call until the flow's parameters' versions changed,
    # but pyro.optim.ClippedAdam updates p.data, which bumps no version: the second step
    # scored x with the first step's (freed) graph, "Trying to backward through the graph a
    # second time"; with cache_size=1 torch's own cache did so for any optimizer.
    losses = fit_fixed_data(cache_size, optimizer)
    for stepped, fresh in losses:
        assert stepped == pytest.approx(fresh, rel=1e-10)
    assert losses[-1][0] != losses[0][0]  # the steps changed the flow


# --------------------------------------------------------------------------------------------
# The docs example and the experiment script


def test_readme_pyro_example_runs_as_written() -> None:
    namespace = run_readme("Pyro guides", min_blocks=2)
    losses = namespace["losses"]
    assert isinstance(losses, list) and losses and all(math.isfinite(v) for v in losses)
    flow = namespace["flow"]
    assert isinstance(flow, ConditionalFlowTransform) and isinstance(flow.flow, FFJORD)
    assert set(pyro.get_param_store().keys()) >= {
        f"flow$$$flow.{n}" for n, _ in flow.flow.named_parameters()
    }


def test_experiment_smoke(tmp_path: Path) -> None:
    from vaeflow.data import Dataset

    g = torch.Generator().manual_seed(0)

    def images(n: int) -> Tensor:
        return torch.bernoulli(torch.full((n, 1, 28, 28), 0.2), generator=g)

    data = Dataset(
        name="tiny",
        train=images(32),
        valid=images(8),
        test=images(12),
        input_shape=(1, 28, 28),
        likelihood="bernoulli",
        dynamic_binarization=False,
        bits_per_dim=False,
    )
    config = pyro_vae.parse_args(
        ["--flow", "ffjord", "--max-steps", "3", "--batch-size", "8", "--eval-size", "10",
         "--latent-dim", "4", "--context-dim", "8", "--warmup-steps", "2", "--threads", "0",
         "--flow-opt", "hidden_dims=[16, 16]", "--flow-opt", "solver_options=none",
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    # TOML, as vaeflow train reads --flow-opt: a list, and the word none where None is allowed
    assert config.flow_hyperparameters()["hidden_dims"] == [16, 16]
    assert config.flow_hyperparameters()["solver_options"] is None
    results = pyro_vae.run(config, data, verbose=False)
    assert math.isfinite(results["first_loss"]) and math.isfinite(results["test_nelbo"])
    assert results["eval_size"] == 10
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_nelbo"] == results["test_nelbo"]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    with pytest.raises(SystemExit):
        pyro_vae.parse_args(["--flow", "nope"])
    # a bad hyperparameter, or a run directory in use, is refused before any training
    for argv in (["--flow", "planar", "--flow-kw", "nope=1"],
                 ["--flow", "ffjord", "--flow-opt", "atol=-1"],
                 ["--flow", "ffjord", "--flow-opt", "hidden_dims=big"],
                 ["--lr", "0"],
                 ["--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit):
            pyro_vae.parse_args(argv)
    assert pyro_vae.parse_args(["--out", str(tmp_path / "run"), "--overwrite"]).out


def test_experiment_evaluation_gives_each_module_its_own_mode_back() -> None:
    config = pyro_vae.parse_args(["--flow", "planar", "--latent-dim", "4"])
    vae = pyro_vae.build(config, (1, 28, 28)).train()
    vae.encoder.eval()  # frozen by the user
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(pyro_vae.evaluate_nelbo(vae, x, batch_size=4))
    assert vae.training and not any(m.training for m in vae.encoder.modules())


@pytest.mark.parametrize(
    ("device", "message"),
    [("nope", "invalid device 'nope'"), ("cuda:7", "device 'cuda:7' asked for")],
)
def test_the_pyro_experiment_refuses_a_bad_device_on_entry(
    device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It ended in a RuntimeError traceback from torch.device (or from run(), for CUDA on a
    # machine without it) after parsing; now an argparse error, as for every other option.
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        pyro_vae.parse_args(["--device", device, "--out", "unused"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
