"""Tests of the likelihoods, the encoder/decoder networks and the VAE (CPU, a few seconds).

Most checks use a linear-Gaussian model, ``z ~ N(0, I)``, ``x | z ~ N(Wz + b, s^2 I)`` with
orthogonal columns in ``W``: its true posterior is a diagonal Gaussian, so the ELBO, the KL and
``log p(x)`` have closed forms, and an encoder (or encoder + affine flow) that outputs the true
posterior makes every importance weight equal to ``p(x)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import AffineFlow
from torch import Tensor, nn

from vaeflow.checks import InputError
from vaeflow.flows.base import Flow, Identity
from vaeflow.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical256,
    DiscretizedLogistic,
    Likelihood,
    get_likelihood,
)
from vaeflow.nets import (
    GatedConv2d,
    GatedConvTranspose2d,
    MLPDecoder,
    make_networks,
)
from vaeflow.vae import VAE, bits_per_dim, eval_mode, evaluating, log_mean_exp

F64 = torch.float64
SHAPE = (1, 2, 3)  # images of the toy model: Dx = 6
DX = 6
D = 3
NOISE_STD = 0.3


# ------------------------------------------------------------------------------------------------
# The linear-Gaussian toy model


class GaussianLikelihood(Likelihood):
    """``N(x; params, std^2)`` per pixel: not in the registry, only for closed forms."""

    name = "gaussian"

    def __init__(self, std: float) -> None:
        self.std = std

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        self.check(params, x)
        return torch.distributions.Normal(params, self.std).log_prob(x).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return params


class LinearEncoder(nn.Module):
    """``mu = A x + a``, ``sigma = exp(log_sigma)`` (the same for every x), ``h = Hc x``."""

    def __init__(self, A: Tensor, a: Tensor, log_sigma: Tensor, context_dim: int = DX) -> None:
        super().__init__()
        self.input_shape = SHAPE
        self.latent_dim = A.shape[0]
        self.context_dim = context_dim
        self.A = nn.Parameter(A.clone())
        self.a = nn.Parameter(a.clone())
        self.log_sigma = nn.Parameter(log_sigma.clone())
        # The context is x itself (padded or cut), so an affine flow can depend on x linearly.
        self.register_buffer("Hc", torch.eye(context_dim, DX, dtype=A.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xf = x.flatten(1)
        mu = xf @ self.A.T + self.a
        sigma = self.log_sigma.exp().expand_as(mu)
        return mu, sigma, xf @ self.Hc.T


class LinearDecoder(nn.Module):
    """``params = W z + b`` as an image."""

    def __init__(self, W: Tensor, b: Tensor) -> None:
        super().__init__()
        self.input_shape = SHAPE
        self.latent_dim = W.shape[1]
        self.out_channels = SHAPE[0]
        self.W = nn.Parameter(W.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, z: Tensor) -> Tensor:
        return (z @ self.W.T + self.b).reshape(z.shape[0], *SHAPE)


class Toy:
    """The toy model's parameters, its true posterior and its closed forms (float64)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DX, D, generator=g, dtype=F64))
        self.c = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
        self.W = q * self.c  # W^T W = diag(c^2): the true posterior is diagonal
        self.b = torch.randn(DX, generator=g, dtype=F64)
        s2 = NOISE_STD**2
        self.post_var = 1.0 / (1.0 + self.c**2 / s2)
        self.A = self.post_var[:, None] * self.W.T / s2
        self.a = -self.A @ self.b
        self.x = (
            torch.randn(8, D, generator=g, dtype=F64) @ self.W.T
            + self.b
            + NOISE_STD * torch.randn(8, DX, generator=g, dtype=F64)
        ).reshape(8, *SHAPE)

    def log_px(self, x: Tensor) -> Tensor:
        cov = self.W @ self.W.T + NOISE_STD**2 * torch.eye(DX, dtype=F64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.flatten(1))

    def model(
        self,
        A: Tensor | None = None,
        a: Tensor | None = None,
        log_sigma: Tensor | None = None,
        flow: Flow | None = None,
    ) -> VAE:
        """The VAE whose encoder gives ``N(A x + a, exp(log_sigma)^2)``; by default the true
        posterior."""
        A = self.A if A is None else A
        a = self.a if a is None else a
        log_sigma = 0.5 * self.post_var.log() if log_sigma is None else log_sigma
        encoder = LinearEncoder(A, a, log_sigma)
        decoder = LinearDecoder(self.W, self.b)
        return VAE(encoder, decoder, GaussianLikelihood(NOISE_STD), flow).double()

    def wrong_posterior(self) -> VAE:
        """A deliberately imperfect (but not absurd) diagonal Gaussian posterior."""
        g = torch.Generator().manual_seed(1)
        A = self.A + 0.02 * torch.randn(D, DX, generator=g, dtype=F64)
        log_sigma = 0.5 * self.post_var.log() + torch.tensor([0.3, -0.2, 0.25], dtype=F64)
        return self.model(A=A, a=self.a + 0.02, log_sigma=log_sigma)

    def closed_forms(self, model: VAE, x: Tensor) -> dict[str, Tensor]:
        """Expectations under q0 of the per-sample terms, for a model without flow."""
        with torch.no_grad():
            m, sigma, _ = model.encoder(x)
            v = sigma**2
            resid = x.flatten(1) - m @ self.W.T - self.b
            s2 = NOISE_STD**2
            recon = 0.5 * DX * math.log(2 * math.pi * s2) + (
                resid.pow(2).sum(1) + (v * self.c**2).sum(1)
            ) / (2 * s2)
            kl = 0.5 * (v + m**2 - 1 - v.log()).sum(1)
            log_q0 = -0.5 * D * (1 + math.log(2 * math.pi)) - 0.5 * v.log().sum(1)
            log_pz = -0.5 * (m**2 + v).sum(1) - 0.5 * D * math.log(2 * math.pi)
        return {"recon": recon, "kl": kl, "log_q0": log_q0, "log_pz": log_pz, "nelbo": recon + kl}


@pytest.fixture(scope="module")
def toy() -> Toy:
    return Toy()


# ------------------------------------------------------------------------------------------------
# ELBO


def test_elbo_terms_match_closed_form_without_flow(toy: Toy) -> None:
    torch.manual_seed(0)
    model = toy.wrong_posterior()
    n = 20000
    x = toy.x
    terms = model.elbo_terms(x.repeat(n, 1, 1, 1))
    expected = toy.closed_forms(model, x)
    for name, value in expected.items():
        samples = terms[name].detach().view(n, -1)
        se = samples.std(0) / math.sqrt(n)
        # 5 standard errors: a wrong constant, sign or variance term is off by far more.
        err = (samples.mean(0) - value).abs()
        assert torch.all(err < 5 * se + 1e-12), (name, err, se)
    assert torch.all(terms["logdet"] == 0)
    # The gap to log p(x) is the KL to the true posterior: positive for this encoder.
    assert torch.all(-expected["nelbo"] < toy.log_px(x) - 1e-3)


def test_nelbo_average_matches_closed_form(toy: Toy) -> None:
    torch.manual_seed(1)
    model = toy.wrong_posterior()
    n = 20000
    per_sample = model._neg_log_weights(toy.x, n, None, None, detach=True)
    got = model.nelbo(toy.x, n_samples=n, generator=torch.Generator().manual_seed(3))
    se = per_sample.std(0) / math.sqrt(n)
    assert torch.all((got - toy.closed_forms(model, toy.x)["nelbo"]).abs() < 5 * se)


def test_log_weights_of_sample_ranges_are_the_whole_sets_rows(toy: Toy) -> None:
    """The ranks of a distributed IS estimate each take a range of the samples: the ranges
    laid end to end are the weights of all samples, and the RNG ends where it would."""
    model = toy.wrong_posterior()
    torch.manual_seed(5)
    whole = model.log_weights(toy.x, 7, batch_size=6)
    after = torch.rand(())
    parts = []
    for lo, hi in [(0, 3), (3, 3), (3, 7)]:
        torch.manual_seed(5)
        parts.append(model.log_weights(toy.x, 7, batch_size=6, samples=(lo, hi)))
        assert torch.rand(()) == after
    assert [p.shape[0] for p in parts] == [3, 0, 4]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=0)
    torch.manual_seed(5)
    estimate = model.importance_log_likelihood(toy.x, 7, batch_size=6)
    torch.testing.assert_close(log_mean_exp(whole), estimate, rtol=0, atol=0)
    with pytest.raises(InputError, match=r"0 <= lo <= hi <= n_samples=7, got \(2, 8\)"):
        model.log_weights(toy.x, 7, samples=(2, 8))


def test_true_posterior_gives_log_evidence_for_every_sample(toy: Toy) -> None:
    # With q0 the true posterior, log w = log p(x) for every z: no Monte Carlo error at all.
    model = toy.model()
    terms = model.elbo_terms(toy.x.repeat(50, 1, 1, 1))
    torch.testing.assert_close(
        -terms["nelbo"].detach(), toy.log_px(toy.x).repeat(50), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        model.importance_log_likelihood(toy.x, n_samples=64, batch_size=40),
        toy.log_px(toy.x),
        rtol=0,
        atol=1e-9,
    )


def test_flow_logdet_enters_with_the_right_sign(toy: Toy) -> None:
    # q0 = N(0, I) and an amortized affine flow onto the true posterior: only the right logdet
    # (log|det dzK/dz0| subtracted from log q0) makes every weight equal p(x).
    flow = AffineFlow(D, DX).double()
    weight, bias = flow.head.linear.weight, flow.head.linear.bias  # rows: a(h) [:D], b(h) [D:]
    with torch.no_grad():
        weight[:D].zero_()
        bias[:D].copy_(0.5 * toy.post_var.log())
        weight[D:].copy_(toy.A)
        bias[D:].copy_(toy.a)
    model = toy.model(
        A=torch.zeros(D, DX, dtype=F64),
        a=torch.zeros(D, dtype=F64),
        log_sigma=torch.zeros(D, dtype=F64),
        flow=flow,
    )
    terms = model.elbo_terms(toy.x.repeat(20, 1, 1, 1))
    assert torch.all(terms["logdet"] != 0)
    torch.testing.assert_close(
        -terms["nelbo"].detach(), toy.log_px(toy.x).repeat(20), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        terms["kl"], terms["log_q0"] - terms["logdet"] - terms["log_pz"], rtol=0, atol=0
    )


def test_loss_dict(toy: Toy) -> None:
    model = toy.wrong_posterior()
    beta = torch.tensor(0.25, dtype=F64)
    out = model.loss(toy.x, beta=beta, generator=torch.Generator().manual_seed(0))
    terms = model.elbo_terms(toy.x, generator=torch.Generator().manual_seed(0))
    expected_keys = {"loss", "recon", "kl", "log_q0", "log_pz", "logdet", "nelbo"}
    assert expected_keys | {"nelbo_per_sample"} == set(out)
    for key in expected_keys:
        assert out[key].shape == ()
    torch.testing.assert_close(out["loss"], out["recon"] + beta * out["kl"])
    torch.testing.assert_close(out["nelbo"], out["recon"] + out["kl"])
    torch.testing.assert_close(out["nelbo_per_sample"], terms["nelbo"])
    torch.testing.assert_close(out["kl"], terms["kl"].mean())
    assert model.loss(toy.x, beta=0.0)["loss"].requires_grad


# ------------------------------------------------------------------------------------------------
# Importance sampling


def test_importance_sampling_bounds_elbo_and_converges(toy: Toy) -> None:
    torch.manual_seed(2)
    model = toy.wrong_posterior()
    log_px = toy.log_px(toy.x)
    elbo = -toy.closed_forms(model, toy.x)["nelbo"]
    gap = {}
    for k in (1, 10, 5000):
        ll = model.importance_log_likelihood(toy.x, n_samples=k, batch_size=4000)
        assert torch.isfinite(ll).all()
        gap[k] = (log_px - ll).mean()
    assert (log_px - elbo).mean() > 0.05  # the posterior really is wrong
    assert gap[10] < gap[1]
    assert gap[5000] < 0.1 * (log_px - elbo).mean()
    assert gap[5000].abs() < 5e-3
    with torch.no_grad():
        elbo_mc = -model.nelbo(toy.x, n_samples=1000)
    assert ll.mean() >= elbo_mc.mean()


def test_importance_sampling_does_not_depend_on_chunking(toy: Toy) -> None:
    model = toy.wrong_posterior()
    results = []
    for batch_size in (1, 3, 40, 10**6):  # 1, 1, 5, and all 101 samples per chunk
        g = torch.Generator().manual_seed(7)
        results.append(
            model.importance_log_likelihood(
                toy.x, n_samples=101, batch_size=batch_size, generator=g
            )
        )
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-12)
    a = model.nelbo(toy.x, 33, batch_size=8, generator=torch.Generator().manual_seed(1))
    b = model.nelbo(toy.x, 33, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_importance_sampling_survives_underflowing_weights(toy: Toy) -> None:
    # Far from the data every weight is exp(-1e5): a sum of exp would be 0, logsumexp is not.
    torch.manual_seed(3)
    x = toy.x + 100.0
    log_px = toy.log_px(x)
    assert torch.all(log_px < -1e4)
    exact = toy.model().importance_log_likelihood(x, n_samples=300, batch_size=128)
    torch.testing.assert_close(exact, log_px, rtol=1e-12, atol=1e-9)
    model = toy.wrong_posterior()
    ll = model.importance_log_likelihood(x, n_samples=300, batch_size=128)
    assert torch.isfinite(ll).all()
    assert torch.all(ll >= -model.nelbo(x, n_samples=300) - 1e-6)
    assert torch.all(ll <= log_px + 1.0)


def test_importance_sampling_float32_large_n() -> None:
    torch.manual_seed(4)
    encoder, decoder = make_networks("mlp", (1, 8, 8), 4, 8, "bernoulli", hidden_sizes=(16,))
    model = VAE(encoder, decoder, "bernoulli")
    x = torch.rand(3, 1, 8, 8).round()
    ll = model.importance_log_likelihood(x, n_samples=5000, batch_size=1500)
    assert ll.shape == (3,) and not ll.requires_grad and torch.isfinite(ll).all()
    assert ll.mean() > -model.nelbo(x, n_samples=2000).mean()


# ------------------------------------------------------------------------------------------------
# Gradients, sampling, helpers


@pytest.mark.parametrize("arch", ["gatedconv", "mlp"])
def test_gradients_reach_every_parameter(arch: str) -> None:
    torch.manual_seed(5)
    encoder, decoder = make_networks(arch, (1, 28, 20), latent_dim=4, likelihood="logistic")
    model = VAE(encoder, decoder, "logistic", AffineFlow(4, 256))
    x = torch.randint(0, 256, (2, 1, 28, 20)) / 255.0
    model.loss(x, beta=0.5)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_sample_and_reconstruct() -> None:
    encoder, decoder = make_networks("mlp", (1, 28, 20), 5, 16, "categorical256")
    model = VAE(encoder, decoder, "categorical256")
    images = model.sample(4, generator=torch.Generator().manual_seed(0))
    again = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 28, 20)
    torch.testing.assert_close(images, again)
    assert images.min() >= 0 and images.max() <= 1
    x = torch.rand(2, 1, 28, 20)
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and not rec.requires_grad
    torch.testing.assert_close(rec, model.reconstruct(x))  # deterministic


def test_bits_per_dim() -> None:
    nll = torch.tensor([560 * math.log(2.0), 0.0])
    torch.testing.assert_close(bits_per_dim(nll, 560), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        bits_per_dim(nll, 0)


def test_vae_rejects_mismatched_parts() -> None:
    encoder, decoder = make_networks("mlp", (1, 8, 8), 4, 8, "bernoulli")
    with pytest.raises(ValueError, match="flow"):
        VAE(encoder, decoder, "bernoulli", Identity(5, 8))
    with pytest.raises(ValueError, match="flow"):
        VAE(encoder, decoder, "bernoulli", Identity(4, 7))
    with pytest.raises(ValueError, match="output channels"):
        VAE(encoder, decoder, "logistic")
    model = VAE(encoder, decoder)
    assert isinstance(model.flow, Identity) and isinstance(model.likelihood, Bernoulli)
    with pytest.raises(ValueError, match="n_samples"):
        model.importance_log_likelihood(torch.zeros(2, 1, 8, 8), n_samples=0)
    empty = torch.zeros(0, 1, 8, 8)  # no rows: no figures, and no division by the batch
    assert model.importance_log_likelihood(empty, n_samples=3, batch_size=10).shape == (0,)
    assert model.nelbo(empty, n_samples=2, batch_size=10).shape == (0,)


# ------------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 28, 20)])
@pytest.mark.parametrize("arch", ["gatedconv", "mlp"])
def test_network_shapes(arch: str, shape: tuple[int, int, int]) -> None:
    x = torch.rand(2, *shape)
    for likelihood in sorted(LIKELIHOODS):
        encoder, decoder = make_networks(
            arch, shape, latent_dim=6, context_dim=256, likelihood=likelihood
        )
        if likelihood == "bernoulli":  # the encoder does not depend on the likelihood
            mu, sigma, h = encoder(x)
            assert mu.shape == sigma.shape == (2, 6) and h.shape == (2, 256)
            assert torch.all(sigma > 0)
        lik = get_likelihood(likelihood)
        params = decoder(mu)
        assert params.shape == (2, lik.out_channels(shape[0]), *shape[1:]), likelihood
        assert lik.log_prob(params, x).shape == (2,)
        assert lik.mean(params).shape == x.shape


@pytest.mark.parametrize("arch", ["gatedconv", "mlp"])
def test_context_dim(arch: str) -> None:
    encoder, _ = make_networks(arch, (3, 8, 12), latent_dim=2, context_dim=10)
    assert encoder(torch.rand(4, 3, 8, 12))[2].shape == (4, 10)


def test_network_errors() -> None:
    with pytest.raises(ValueError, match="'gatedconv', 'mlp'"):
        make_networks("resnet", (1, 28, 28))
    with pytest.raises(ValueError, match="divisible by 4"):
        make_networks("gatedconv", (1, 30, 28))
    with pytest.raises(TypeError, match="hidden_sizes"):
        make_networks("gatedconv", (1, 28, 28), hidden_sizes=(10,))
    with pytest.raises(ValueError, match="activation"):
        make_networks("mlp", (1, 28, 28), activation="swishy")
    for bad in (-1.0, float("nan"), "1e-6"):  # a negative floor gave a negative sigma, NaN
        with pytest.raises(ValueError, match="min_sigma must be >= 0"):
            make_networks("mlp", (1, 8, 8), scale="std", min_sigma=bad)
    encoder, decoder = make_networks("mlp", (1, 28, 28), latent_dim=3)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        encoder(torch.rand(2, 1, 28, 20))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        decoder(torch.rand(2, 4))


@pytest.mark.parametrize(("hidden_sizes", "message"), [
    ((300, 0), "hidden_sizes[1] must be a positive integer, got 0"),
    ([True, 4], "hidden_sizes[0] must be a positive integer, got True"),  # not the size 1
    ((16, 2.5), "hidden_sizes[1] must be a positive integer, got 2.5"),
    ((), "hidden_sizes must be a non-empty list of positive integers, got ()"),
    (300, "hidden_sizes must be a non-empty list of positive integers, got 300"),
    ("300", "hidden_sizes must be a non-empty list of positive integers, got '300'"),
])
def test_a_bad_hidden_size_is_an_input_error_naming_it(hidden_sizes: object, message: str) -> None:
    # as the other net options' checks (head_channels, min_sigma): an InputError, which the
    # CLI prints in one line, in check_int's words; it was a plain ValueError (a TypeError for
    # an int) in words of its own
    with pytest.raises(InputError) as info:
        make_networks("mlp", (1, 8, 8), hidden_sizes=hidden_sizes)
    assert str(info.value) == message
    with pytest.raises(InputError) as info:  # the decoder checks them too
        MLPDecoder((1, 8, 8), 4, 1, hidden_sizes=hidden_sizes)
    assert str(info.value) == message


def test_the_paper_s_variance_bounds_are_no_default_of_the_std_head() -> None:
    # the 256-way likelihood's bounds bound a variance: scale="std" is built without them,
    # not refused for an option the caller never gave
    encoder, _ = make_networks("gatedconv", (1, 28, 20), likelihood="categorical256", scale="std")
    assert encoder.variance_bounds is None and encoder.scale_kind == "std"
    encoder, _ = make_networks("gatedconv", (1, 28, 20), likelihood="categorical256")
    assert encoder.variance_bounds == (0.01, 7.0)


def test_gated_layers_gate() -> None:
    torch.manual_seed(6)
    layer = GatedConv2d(2, 3, 3, 1, 1)
    x = torch.randn(2, 2, 5, 5)
    both = nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)
    torch.testing.assert_close(layer(x), both[:, :3] * torch.sigmoid(both[:, 3:]))
    t = GatedConvTranspose2d(4, 8, 5, 2, 2, output_padding=1)
    assert t(torch.randn(1, 4, 7, 5)).shape == (1, 8, 14, 10)
    # each half initialised as a lone ConvTranspose2d(4, 8, 5): bound 1 / sqrt(8 * 25)
    bound = 1 / math.sqrt(8 * 25)
    for half in t.conv.weight.chunk(2, dim=1):
        assert 0.9 * bound < half.abs().max() <= bound


# ------------------------------------------------------------------------------------------------
# Likelihoods


def test_bernoulli_log_prob() -> None:
    torch.manual_seed(7)
    logits = torch.randn(4, 2, 5, 3, dtype=F64) * 5
    logits[0, 0, 0] = torch.tensor([-300.0, 300.0, 0.0], dtype=F64)  # saturated: stays finite
    x = torch.rand(4, 2, 5, 3, dtype=F64).round()
    x[0, 0, 0] = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    reference = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), reference)
    manual = x * nn.functional.logsigmoid(logits) + (1 - x) * nn.functional.logsigmoid(-logits)
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), manual.flatten(1).sum(1))
    assert torch.isfinite(Bernoulli().log_prob(logits.float(), x.float())).all()


def test_categorical_log_prob_and_layout() -> None:
    torch.manual_seed(8)
    b, c, h, w = 3, 3, 4, 2
    params = torch.randn(b, 256 * c, h, w, dtype=F64) * 3
    k = torch.randint(0, 256, (b, c, h, w))
    x = k / 255.0
    # Logit of value v for channel ch sits at channel v * C + ch.
    logits = params.reshape(b, 256, c, h, w).movedim(1, -1)
    reference = torch.distributions.Categorical(logits=logits).log_prob(k).flatten(1).sum(1)
    torch.testing.assert_close(Categorical256().log_prob(params, x), reference)
    v, ch = int(k[0, 2, 1, 0]), 2
    single = params[0, v * c + ch, 1, 0] - torch.logsumexp(params[0, ch::c, 1, 0], 0)
    torch.testing.assert_close(
        single,
        torch.distributions.Categorical(logits=logits[0, ch, 1, 0]).log_prob(torch.tensor(v)),
    )
    # off-grid float rounding of k / 255 still hits the right bin
    torch.testing.assert_close(Categorical256().log_prob(params, x.float().double()), reference)


def _logistic_reference(loc: Tensor, log_scale: Tensor) -> Tensor:
    """``[..., 256]`` bin probabilities in float64 as CDF differences, edge bins open."""
    k = torch.arange(256, dtype=F64)
    upper = torch.where(k == 255, torch.tensor(math.inf, dtype=F64), (k + 0.5) / 255)
    lower = torch.where(k == 0, torch.tensor(-math.inf, dtype=F64), (k - 0.5) / 255)
    s = log_scale.exp().unsqueeze(-1)
    loc = loc.unsqueeze(-1)
    cdf = torch.sigmoid((upper - loc) / s) - torch.sigmoid((lower - loc) / s)
    # Above the location a CDF difference cancels to 0; the survival function's does not.
    survival = torch.sigmoid((loc - lower) / s) - torch.sigmoid((loc - upper) / s)
    return torch.where(k / 255 > loc, survival, cdf)


def _all_bins(params: Tensor) -> tuple[Tensor, Tensor]:
    """Single-pixel params ``[S, 2, 1, 1]`` -> the log-probability of each of the 256 values
    ``[S, 256]`` (and those values)."""
    s = params.shape[0]
    values = (torch.arange(256, dtype=params.dtype) / 255).repeat(s).view(s * 256, 1, 1, 1)
    logp = DiscretizedLogistic().log_prob(params.repeat_interleave(256, 0), values)
    return logp.view(s, 256), values.view(s, 256)


def test_logistic_log_prob_matches_direct_formula() -> None:
    torch.manual_seed(9)
    params = torch.randn(5, 2 * 3, 4, 4)
    params[:, 3:] = params[:, 3:] - 4.0  # scales around a few bins wide
    x = torch.randint(0, 256, (5, 3, 4, 4)) / 255.0
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # both open edge bins
    lik = DiscretizedLogistic()
    loc, log_scale = lik.split(params.double())
    assert torch.all((loc > 0) & (loc < 1)) and torch.all(log_scale >= lik.min_log_scale)
    probs = _logistic_reference(loc, log_scale)
    k = torch.round(x.double() * 255).long()
    reference = probs.gather(-1, k.unsqueeze(-1)).squeeze(-1).log().flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(params, x).double(), reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(lik.log_prob(params.double(), x.double()), reference)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_logistic_bins_sum_to_one_even_at_extremes(dtype: torch.dtype) -> None:
    raw = [-1e4, -30.0, -3.0, 0.0, 2.0, 30.0, 1e4]
    grid = torch.tensor([(m, s) for m in raw for s in raw], dtype=dtype).view(-1, 2, 1, 1)
    logp, _ = _all_bins(grid)
    assert torch.isfinite(logp).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        torch.logsumexp(logp, 1), torch.zeros(len(grid), dtype=dtype), rtol=0, atol=tol
    )


def test_logistic_gradients_finite_at_extremes() -> None:
    raw = [-1e4, -30.0, 0.0, 30.0, 1e4]
    grid = torch.tensor([(m, s) for m in raw for s in raw]).view(-1, 2, 1, 1)
    for value in (0.0, 1 / 255, 0.5, 254 / 255, 1.0):
        params = grid.clone().requires_grad_()
        logp = DiscretizedLogistic().log_prob(params, torch.full((len(grid), 1, 1, 1), value))
        assert torch.isfinite(logp).all()
        logp.sum().backward()
        assert torch.isfinite(params.grad).all()


def test_logistic_concentrates_on_one_bin() -> None:
    # the floor on the scale must still allow an almost deterministic pixel (Frey backgrounds)
    loc_raw = math.log(0.4 / 0.6)  # location 0.4 = 102 / 255, the centre of bin 102
    params = torch.tensor([loc_raw, -1e3], dtype=F64).view(1, 2, 1, 1)
    x = torch.full((1, 1, 1, 1), 102 / 255, dtype=F64)  # 102/255 = 0.4
    assert DiscretizedLogistic().log_prob(params, x) > -1e-6


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_mean_and_sample(name: str) -> None:
    torch.manual_seed(10)
    lik = get_likelihood(name)
    params = torch.randn(1, lik.out_channels(1), 1, 1, dtype=F64)
    if name == "logistic":
        params[:, 1] = -4.0
    # Exact mean by enumerating the values the likelihood puts mass on.
    values = (
        torch.arange(256, dtype=F64) / 255
        if name != "bernoulli"
        else torch.tensor([0.0, 1.0], dtype=F64)
    )
    logp = lik.log_prob(params.expand(len(values), -1, -1, -1), values.view(-1, 1, 1, 1))
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0, dtype=F64))
    mean = (logp.exp() * values).sum()
    torch.testing.assert_close(lik.mean(params).squeeze(), mean)
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = lik.sample(params.expand(n, -1, -1, -1), generator=g)
    assert draws.shape == (n, 1, 1, 1)
    assert torch.all((draws * 255 - torch.round(draws * 255)).abs() < 1e-9)  # on the grid
    se = draws.std() / math.sqrt(n)
    assert (draws.mean() - mean).abs() < 5 * se
    again = lik.sample(params.expand(n, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, again)


def test_data_outside_the_likelihood_s_support_is_refused() -> None:
    model = VAE(*make_networks("mlp", (1, 4, 4), 2, 3, hidden_sizes=(8,)))
    x = torch.randint(0, 2, (3, 1, 4, 4)).float()
    assert model.nelbo(x).shape == (3,)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got values from 0 to 255.*255"):
        model.nelbo(x * 255)  # a positive log-probability, had it been computed
    with pytest.raises(ValueError, match=r"got values from -1"):
        model.importance_log_likelihood(x - 1, n_samples=2)
    with pytest.raises(ValueError, match=r"floating-point tensor, got torch.uint8.*/ 255"):
        model.loss(x.to(torch.uint8))
    with pytest.raises(ValueError, match=r"beta .* >= 0, got -1"):
        model.loss(x, beta=-1)
    # a likelihood of one's own states its support, or none (the toy Gaussian: any real)
    assert Likelihood.support is None and Bernoulli.support == (0.0, 1.0)


def test_likelihood_registry_and_checks() -> None:
    assert set(LIKELIHOODS) == {"bernoulli", "categorical256", "logistic"}
    assert [
        get_likelihood(n).out_channels(3) for n in ("bernoulli", "categorical256", "logistic")
    ] == [3, 768, 6]
    with pytest.raises(ValueError, match="'bernoulli', 'categorical256', 'logistic'"):
        get_likelihood("gaussian")
    lik = get_likelihood("logistic", min_log_scale=-7.0)
    assert isinstance(lik, DiscretizedLogistic) and lik.min_log_scale == -7.0
    assert get_likelihood(lik) is lik
    with pytest.raises(ValueError, match="params must have shape"):
        Bernoulli().log_prob(torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="params must have shape"):
        DiscretizedLogistic().log_prob(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


def test_eval_mode_gives_each_module_its_own_mode_back() -> None:
    """A frozen (eval-mode) encoder inside a training model stays frozen after an evaluation;
    ``model.train(True)`` on the way out would have set it training again."""
    encoder, decoder = make_networks("mlp", (1, 28, 20), 5, 16, "bernoulli")
    model = VAE(encoder, decoder, "bernoulli").train()
    model.encoder.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.decoder.training
    assert not any(m.training for m in model.encoder.modules())
    # also when the body raises, and for a plain module
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    net[1].eval()
    with pytest.raises(ValueError), evaluating(net):
        raise ValueError
    assert [m.training for m in net.modules()] == [True, True, False]
