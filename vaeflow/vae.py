"""The VAE with a flow posterior: ELBO terms, sampling, and importance-sampled log-likelihood.

With ``q0(z0 | x) = N(mu(x), diag sigma(x)^2)`` from the encoder, a flow ``z0 -> zK`` conditioned
on the encoder's context ``h(x)``, a standard normal prior and a likelihood ``p(x | zK)``, one
posterior sample gives the log-weight

    log w = log p(x | zK) + log p(zK) - log q0(z0 | x) + logdet,   logdet = log |det dzK/dz0|,

whose expectation is the ELBO. Training (:meth:`VAE.loss`), evaluation (:meth:`VAE.nelbo`) and
the log-likelihood estimate (:meth:`VAE.importance_log_likelihood`) all go through the same
:meth:`VAE._terms`, so they cannot drift apart.

Nothing here moves modules or tensors between devices and nothing calls ``.item()``: results
stay on the input's device so that a training loop can log them without synchronising.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from vaeflow.checks import InputError, check_positive_int
from vaeflow.flows.base import Flow, Identity
from vaeflow.likelihoods import Likelihood, get_likelihood

__all__ = ["VAE", "bits_per_dim", "eval_mode", "evaluating", "log_mean_exp", "log_standard_normal"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def log_standard_normal(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` for ``z [B, D]`` -> ``[B]``."""
    return -0.5 * z.pow(2).sum(-1) - z.shape[-1] * _HALF_LOG_2PI


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Negative log-likelihood in nats per datum ``[B]`` (or one figure) -> bits per dimension
    ``[B]`` (or one figure).

    ``nll / (num_dims * ln 2)``. This is right as it stands for likelihoods over discrete values
    (Bernoulli, the 256-way categorical, the discretized logistic, e.g. Frey Faces with ``x = k /
    255``): no dequantization offset is needed because no density over [0, 1] is involved.
    """
    check_positive_int("num_dims", num_dims)
    return nll_nats / (num_dims * math.log(2.0))


class VAE(nn.Module):
    """A VAE whose posterior is a Gaussian ``q0`` pushed through an amortized flow.

    Args:
        encoder: ``x [B, C, H, W] -> (mu [B, D], sigma [B, D], h [B, H])``, with attributes
            ``latent_dim`` and ``context_dim`` (and ``input_shape``, optional).
        decoder: ``z [B, D] -> params [B, out_channels, H, W]`` of the likelihood.
        likelihood: a :class:`~vaeflow.likelihoods.Likelihood` or its registry name.
        flow: ``Flow(dim=D, context_dim=H)``; ``None`` means no flow (:class:`Identity`).

    Raises:
        ValueError: when the sizes of the encoder, decoder, flow and likelihood disagree.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood | str = "bernoulli",
        flow: Flow | None = None,
    ) -> None:
        super().__init__()
        for attr in ("latent_dim", "context_dim"):
            if not hasattr(encoder, attr):
                raise ValueError(f"the encoder must have a `{attr}` attribute")
        latent_dim: int = encoder.latent_dim
        context_dim: int = encoder.context_dim
        if flow is None:
            flow = Identity(latent_dim, context_dim)
        if (flow.dim, flow.context_dim) != (latent_dim, context_dim):
            raise ValueError(
                f"flow has (dim, context_dim) = ({flow.dim}, {flow.context_dim}) but the encoder "
                f"gives ({latent_dim}, {context_dim})"
            )
        if getattr(decoder, "latent_dim", latent_dim) != latent_dim:
            raise ValueError(
                f"decoder latent_dim {decoder.latent_dim} != encoder latent_dim {latent_dim}"
            )
        self.likelihood = get_likelihood(likelihood)
        input_shape = getattr(encoder, "input_shape", None) or getattr(decoder, "input_shape", None)
        if input_shape is not None and hasattr(decoder, "out_channels"):
            needed = self.likelihood.out_channels(input_shape[0])
            if decoder.out_channels != needed:
                raise ValueError(
                    f"the {self.likelihood.name or type(self.likelihood).__name__} likelihood "
                    f"needs {needed} decoder output channels for {input_shape[0]}-channel "
                    f"images, the decoder has {decoder.out_channels}"
                )
        self.encoder = encoder
        self.decoder = decoder
        self.flow = flow
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        self.input_shape: tuple[int, ...] | None = (
            tuple(input_shape) if input_shape is not None else None
        )

    # ----------------------------------------------------------------------------------------
    # ELBO

    def _noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Standard normal noise shaped, placed and typed like ``like``."""
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def _terms(
        self, x: Tensor, mu: Tensor, sigma: Tensor, h: Tensor, eps: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample ELBO terms ``[N]`` for ``x [N, C, H, W]`` and ``mu, sigma, eps [N, D]``,
        ``h [N, H]``: the one place where the ELBO is written down."""
        z0 = mu + sigma * eps
        zK, logdet = self.flow(z0, h)
        params = self.decoder(zK)
        recon = -self.likelihood.log_prob(params, x)
        # (z0 - mu) / sigma is eps by construction: using eps avoids a division and its rounding.
        log_q0 = -0.5 * eps.pow(2).sum(-1) - sigma.log().sum(-1) - eps.shape[-1] * _HALF_LOG_2PI
        log_pz = log_standard_normal(zK)
        kl = log_q0 - logdet - log_pz
        return {
            "recon": recon,
            "kl": kl,
            "log_q0": log_q0,
            "log_pz": log_pz,
            "logdet": logdet,
            "nelbo": recon + kl,
        }

    def elbo_terms(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """One reparametrized posterior sample per datum; every term per sample.

        Args:
            x: ``[B, C, H, W]``.
            generator: for the posterior noise (the flow may draw its own, e.g. Hutchinson).

        Returns:
            ``[B]`` tensors: ``recon = -log p(x|zK)``, ``kl = log q0(z0|x) - logdet - log p(zK)``
            (single-sample), ``log_q0``, ``log_pz``, ``logdet`` and ``nelbo = recon + kl``.
        """
        self.likelihood.check_data(x)  # before the encoder, whose error would be torch's
        mu, sigma, h = self.encoder(x)
        return self._terms(x, mu, sigma, h, self._noise(mu, generator))

    def loss(
        self,
        x: Tensor,
        beta: float | Tensor = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The training objective and its parts, batch-averaged, left on the device.

        Args:
            x: ``[B, C, H, W]``.
            beta: KL weight (warm-up); a float or a scalar tensor.

        Returns:
            Scalars ``loss = recon + beta * kl`` (to minimise), ``recon``, ``kl``, ``log_q0``,
            ``log_pz``, ``logdet``, ``nelbo`` (``recon + kl``), and ``nelbo_per_sample [B]``.
        """
        if isinstance(beta, (int, float)) and not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta (the KL weight) must be finite and >= 0, got {beta!r}")
        terms = self.elbo_terms(x, generator=generator)
        out = {name: value.mean() for name, value in terms.items()}
        out["loss"] = out["recon"] + beta * out["kl"]
        out["nelbo_per_sample"] = terms["nelbo"]
        return out

    # ----------------------------------------------------------------------------------------
    # Evaluation

    def _neg_log_weights(
        self,
        x: Tensor,
        n_samples: int,
        batch_size: int | None,
        generator: torch.Generator | None,
        detach: bool,
        samples: tuple[int, int] | None = None,
    ) -> Tensor:
        """``-log w`` (the per-sample NELBO) for ``n_samples`` posterior samples per datum.

        ``x [B, C, H, W] -> [n_samples, B]``. The encoder runs once; ``mu``, ``sigma``, ``h`` and
        ``x`` are repeated so that at most ``batch_size`` rows (samples x data) go through the
        flow and decoder at a time (``None``: all at once). The noise is drawn one ``[B, D]``
        slice per sample, so for a given RNG state the result does not depend on ``batch_size``.
        ``detach`` drops each chunk's graph as soon as it is computed, bounding memory.

        ``samples=(lo, hi)`` computes samples ``lo .. hi - 1`` only (``[hi - lo, B]``), with the
        noise they have among all ``n_samples``: every sample's noise is drawn, in order, and
        the others' is dropped, so that the RNG ends where it would and the ranks of a
        distributed evaluation, each taking its samples, give one process's weights.
        """
        check_positive_int("n_samples", n_samples)
        lo, hi = (0, n_samples) if samples is None else samples
        if not 0 <= lo <= hi <= n_samples:
            raise InputError(f"samples must be (lo, hi) with 0 <= lo <= hi <= n_samples="
                             f"{n_samples}, got {samples}")
        # One read of x's extremes per evaluation call: x = 255 would otherwise give a positive
        # Bernoulli log-probability, and a NELBO that looks like a result.
        self.likelihood.check_data(x)
        self.likelihood.check_values(x)
        batch = x.shape[0]
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        # an empty batch takes every sample in one chunk (of no rows)
        per_chunk = n_samples if batch_size is None or batch == 0 else max(1, batch_size // batch)
        mu, sigma, h = self.encoder(x)
        chunks = []
        for _ in range(lo):
            self._noise(mu, generator)  # another rank's samples: their draws, not their work
        for start in range(lo, hi, per_chunk):
            m = min(per_chunk, hi - start)
            eps = torch.cat([self._noise(mu, generator) for _ in range(m)])

            def rep(t: Tensor, m: int = m) -> Tensor:
                return t.repeat(m, *([1] * (t.dim() - 1)))  # sample-major: row i*B + b

            nelbo = self._terms(rep(x), rep(mu), rep(sigma), rep(h), eps)["nelbo"].view(m, batch)
            chunks.append(nelbo.detach() if detach else nelbo)
        for _ in range(hi, n_samples):
            self._noise(mu, generator)
        return torch.cat(chunks) if chunks else mu.new_zeros(0, batch)  # (an empty range)

    def nelbo(
        self,
        x: Tensor,
        n_samples: int = 1,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Negative ELBO per datum, averaged over ``n_samples`` posterior samples.

        For evaluation the caller puts the flow in eval mode (FFJORD then uses the exact trace).
        The result is differentiable; ``batch_size`` bounds the rows per decoder call.

        Args:
            x: ``[B, C, H, W]``.

        Returns:
            ``[B]``.
        """
        return self._neg_log_weights(x, n_samples, batch_size, generator, detach=False).mean(0)

    def importance_log_likelihood(
        self,
        x: Tensor,
        n_samples: int = 5000,
        batch_size: int = 500,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Importance-sampled ``log p(x)`` with ``qK`` as the proposal (as in IWAE).

        ``log p(x) ~ logsumexp_k(log w_k) - log K`` with the log-weights of the module docstring.
        The weights are kept in log space over all chunks and combined once, so even weights
        that would underflow in ``exp`` give the right answer.

        Args:
            x: ``[B, C, H, W]``.
            n_samples: K, importance samples per datum.
            batch_size: the most rows (samples x data points) sent through the flow and decoder
                at once: ``max(1, batch_size // B)`` samples per datum per chunk. With one datum
                at a time (B = 1) this is "``batch_size`` samples per datum". For B above
                ``batch_size`` a chunk is still one sample of every datum, B rows: split x to
                bound memory further. The answer does not depend on it.

        Returns:
            ``[B]``, detached: it is an evaluation quantity and each chunk's graph is freed.
        """
        return log_mean_exp(self.log_weights(x, n_samples, batch_size, generator=generator))

    def log_weights(
        self,
        x: Tensor,
        n_samples: int = 5000,
        batch_size: int = 500,
        *,
        samples: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The importance log-weights ``log w_k = log p(x, zK) - log qK(zK | x)`` of
        :meth:`importance_log_likelihood`, ``x [B, C, H, W] -> [K, B]`` detached, or of its
        samples ``lo .. hi - 1`` only (``samples=(lo, hi)``: ``[hi - lo, B]``, with the noise
        those samples have among all ``K``, so that a distributed evaluation can share the
        samples of a datum among its ranks). ``log_mean_exp`` of all ``K`` rows is the
        estimate."""
        return -self._neg_log_weights(x, n_samples, batch_size, generator, detach=True,
                                      samples=samples)

    # ----------------------------------------------------------------------------------------
    # Images

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images ``[n, C, H, W]``: the mean of ``p(x | z)`` at ``z ~ N(0, I)``."""
        check_positive_int("n", n)
        # The prior lives wherever the model does; a module with no parameters samples on CPU.
        ref = next(self.parameters(), torch.empty(0))
        z = torch.randn(n, self.latent_dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> the mean of ``p(x | zK)`` at ``zK = flow(mu(x))`` ``[B, C, H, W]``.

        Deterministic (the posterior mean of ``q0`` pushed through the flow). Not wrapped in
        ``no_grad``, because a continuous flow may need autograd for its trace; the result is
        detached.
        """
        mu, _, h = self.encoder(x)
        zK, _ = self.flow(mu, h)
        return self.likelihood.mean(self.decoder(zK)).detach()


def log_mean_exp(log_w: Tensor) -> Tensor:
    """``log(mean_k exp(log_w[k]))`` over the first dimension, in log space (weights that would
    underflow in ``exp`` still count): ``[K, ...] -> [...]``."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


@contextlib.contextmanager
def eval_mode(model: VAE, exact: bool | None = True) -> Iterator[None]:
    """Eval mode, with the flow's exact log-determinant (a continuous flow's exact trace)
    unless ``exact`` is False (or None: as the flow was built, :meth:`Flow.evaluation_trace`);
    each module's previous mode after (:func:`evaluating`)."""
    with evaluating(model), model.flow.evaluation_trace(exact):
        yield


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` and all its submodules in eval mode; each one's own mode back after.

    ``module.train(was_training)`` would not do: it sets every submodule to the parent's mode,
    so a submodule that the caller had put in eval mode (a frozen encoder) would come back
    training.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
