"""Observation models p(x | z) for images, chosen by name from :data:`LIKELIHOODS`.

A decoder outputs *parameters* ``[B, out_channels(C), H, W]`` for images ``x [B, C, H, W]``; a
likelihood turns them into log-probabilities, means and samples. Likelihoods hold no learnable
state, so they are plain objects, not modules.

- ``"bernoulli"``: binary pixels; the parameters are logits, ``C`` channels.
- ``"categorical256"``: 8-bit pixels ``x = k / 255``; ``256 * C`` logit channels, laid out as
  ``[B, 256, C, H, W]`` (value-major), as in the Sylvester-flows code.
- ``"logistic"``: 8-bit pixels ``x = k / 255`` under a logistic density discretized into 256 bins
  of width 1/255 centred on ``k / 255``, the two edge bins open (PixelCNN++), ``2 * C`` channels:
  the first ``C`` give the location (through a sigmoid), the last ``C`` its log-scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "Bernoulli",
    "Categorical256",
    "DiscretizedLogistic",
    "get_likelihood",
]

NUM_BINS = 256


def _sum_pixels(t: Tensor) -> Tensor:
    """``[B, ...] -> [B]``."""
    return t.flatten(1).sum(1)


def _to_bins(x: Tensor) -> Tensor:
    """``x = k / 255`` in [0, 1] -> ``k`` as a long tensor, robust to float rounding."""
    return torch.round(x * (NUM_BINS - 1)).long().clamp_(0, NUM_BINS - 1)


class Likelihood:
    """Interface of an observation model ``p(x | params)`` on images ``[B, C, H, W]``."""

    name: str = ""
    # The interval the data must lie in, checked by :meth:`check_values` (None: any value). Each
    # built-in models images scaled to [0, 1]; a likelihood of one's own states its own.
    support: tuple[float, float] | None = None

    def out_channels(self, in_channels: int) -> int:
        """Number of decoder output channels needed for images with ``in_channels`` channels."""
        raise NotImplementedError

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``params [B, out_channels(C), H, W]``, ``x [B, C, H, W]`` -> ``log p(x) [B]``, summed
        over pixels and channels."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """``params [B, out_channels(C), H, W]`` -> ``E[x] [B, C, H, W]`` in [0, 1]."""
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``params [B, out_channels(C), H, W]`` -> a draw ``x [B, C, H, W]``."""
        raise NotImplementedError

    def channels_of(self, params: Tensor) -> int:
        """The number ``C`` of image channels described by ``params [B, out_channels(C), H, W]``."""
        if params.dim() != 4:
            raise ValueError(f"{self.name}: params must be [B, K, H, W], got {tuple(params.shape)}")
        per_channel = self.out_channels(1)
        if params.shape[1] % per_channel:
            raise ValueError(
                f"{self.name}: params have {params.shape[1]} channels, not a multiple of "
                f"{per_channel}"
            )
        return params.shape[1] // per_channel

    def check(self, params: Tensor, x: Tensor) -> None:
        """Raise a ``ValueError`` unless ``params`` has the shape that ``x`` calls for."""
        self.check_data(x)
        b, c, h, w = x.shape
        expected = (b, self.out_channels(c), h, w)
        if tuple(params.shape) != expected:
            raise ValueError(
                f"{self.name}: for x of shape {tuple(x.shape)} params must have shape "
                f"{expected}, got {tuple(params.shape)}"
            )

    def check_data(self, x: Tensor) -> None:
        """Raise a ``ValueError`` unless ``x`` is a floating-point ``[B, C, H, W]`` tensor;
        free (shape and dtype are on the host), so the VAE calls it before its encoder."""
        if x.dim() != 4:
            raise ValueError(f"{self.name}: x must be [B, C, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"{self.name}: x must be a floating-point tensor, got {x.dtype} (images of 0-255 "
                "integers: x.float() / 255)"
            )

    def check_values(self, x: Tensor) -> None:
        """Raise a ``ValueError`` unless every value of ``x`` lies in :attr:`support`. It
        reads ``x``'s extremes back to the host, so evaluation calls it, not the training step
        (whose data the loader checked)."""
        if self.support is None or not x.is_floating_point() or x.numel() == 0:
            return
        lo, hi = self.support
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if not (lo <= low and high <= hi):
            raise ValueError(
                f"{self.name}: x must hold values in [{lo:g}, {hi:g}], got values from {low:g} "
                f"to {high:g}" + (" (images of 0-255: divide by 255)" if high > 1.0 else "")
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; ``params`` are logits ``[B, C, H, W]``."""

    name = "bernoulli"
    support = (0.0, 1.0)

    def out_channels(self, in_channels: int) -> int:
        return in_channels

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        self.check(params, x)
        # The logits form never evaluates log(sigmoid) directly, so saturated logits stay finite.
        return -_sum_pixels(F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


class Categorical256(Likelihood):
    """A 256-way categorical per pixel and channel over the values ``k / 255``.

    ``params [B, 256 * C, H, W]`` are logits read as ``[B, 256, C, H, W]``.
    """

    name = "categorical256"
    support = (0.0, 1.0)

    def out_channels(self, in_channels: int) -> int:
        return NUM_BINS * in_channels

    def logits(self, params: Tensor) -> Tensor:
        """``[B, 256 * C, H, W] -> [B, 256, C, H, W]``."""
        c = self.channels_of(params)
        b, _, h, w = params.shape
        return params.reshape(b, NUM_BINS, c, h, w)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        self.check(params, x)
        nll = F.cross_entropy(self.logits(params), _to_bins(x), reduction="none")
        return -_sum_pixels(nll)

    def mean(self, params: Tensor) -> Tensor:
        probs = torch.softmax(self.logits(params), dim=1)
        values = torch.arange(NUM_BINS, device=params.device, dtype=probs.dtype) / (NUM_BINS - 1)
        return torch.einsum("bkchw,k->bchw", probs, values)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        logits = self.logits(params)
        # Gumbel-max: one elementwise pass, and the generator is honoured on every device.
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        tiny = torch.finfo(logits.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp_min(tiny)))
        k = torch.argmax(logits + gumbel, dim=1)
        return k.to(params.dtype) / (NUM_BINS - 1)


def _log_one_minus_exp_neg(log_delta: Tensor) -> Tensor:
    """``log(1 - exp(-delta))`` for ``delta = exp(log_delta) > 0``, stable at both ends.

    For tiny ``delta`` it tends to ``log(delta)``, which stays finite even when ``delta`` itself
    underflows (a very wide logistic). Each branch is clamped to its own range so that the one
    ``torch.where`` discards has a finite gradient: it is multiplied by zero, and ``0 * inf`` is
    NaN.
    """
    small = log_delta < -10.0
    approx = log_delta - 0.5 * torch.exp(log_delta.clamp(max=-10.0))
    exact = torch.log(-torch.expm1(-torch.exp(log_delta.clamp(min=-10.0))))
    return torch.where(small, approx, exact)


class DiscretizedLogistic(Likelihood):
    """Logistic density discretized into 256 bins on [0, 1], edge bins open (PixelCNN++).

    Value ``k / 255`` owns the bin ``[(k - 1/2) / 255, (k + 1/2) / 255]``, except that bin 0
    extends to -inf and bin 255 to +inf, so the 256 probabilities sum to one.

    ``params [B, 2C, H, W]``: channels ``[:C]`` give the location ``sigmoid(params)`` in (0, 1)
    (the Sylvester code's sigmoid mean); channels ``[C:]`` give the log-scale, floored softly at
    ``min_log_scale`` as ``min + softplus(raw - min)``. The floor keeps ``1 / scale`` finite; a soft
    floor, unlike PixelCNN++'s clamp, never zeroes the gradient, so a scale cannot get stuck. The
    default -9 (scale 1.2e-4, 1/32 of a bin) still lets one bin hold all but 2.5e-7 of the
    mass (a cost of 2.5e-7 nats per pixel), as constant backgrounds (Frey Faces) need.
    """

    name = "logistic"
    support = (0.0, 1.0)

    def __init__(self, min_log_scale: float = -9.0) -> None:
        self.min_log_scale = float(min_log_scale)

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """``params [B, 2C, H, W]`` -> ``(loc [B, C, H, W] in (0, 1), log_scale [B, C, H, W])``."""
        c = self.channels_of(params)
        loc = torch.sigmoid(params[:, :c])
        log_scale = self.min_log_scale + F.softplus(params[:, c:] - self.min_log_scale)
        return loc, log_scale

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        self.check(params, x)
        loc, log_scale = self.split(params)
        k = _to_bins(x)
        kf = k.to(loc.dtype)
        inv_scale = torch.exp(-log_scale)
        # Each edge is one rounding of (k +- 1/2) / 255, so bin k's upper edge and bin k+1's
        # lower edge are the same number and the 256 probabilities telescope to one even when
        # the scale is far below float32's resolution of the edges.
        upper = ((kf + 0.5) / (NUM_BINS - 1) - loc) * inv_scale
        lower = ((kf - 0.5) / (NUM_BINS - 1) - loc) * inv_scale
        # sigmoid(u) - sigmoid(l) = sigmoid(u) * sigmoid(-l) * (1 - exp(-(u - l))): every factor
        # is computed in log space, so neither tail cancels catastrophically (no 1e-12 fudge
        # or branch on the CDF difference as in PixelCNN++ is needed).
        log_width = math.log(1.0 / (NUM_BINS - 1)) - log_scale  # log(u - l)
        log_middle = F.logsigmoid(upper) + F.logsigmoid(-lower) + _log_one_minus_exp_neg(log_width)
        log_first = F.logsigmoid(upper)  # bin 0: CDF(upper) - 0
        log_last = F.logsigmoid(-lower)  # bin 255: 1 - CDF(lower)
        logp = torch.where(k == 0, log_first, torch.where(k == NUM_BINS - 1, log_last, log_middle))
        return _sum_pixels(logp)

    def mean(self, params: Tensor) -> Tensor:
        loc, log_scale = self.split(params)
        # E[k] = sum_{j=1}^{255} P(k >= j) = sum_j (1 - CDF(threshold_j)): exact, edge bins
        # included, unlike returning the location.
        thresholds = (torch.arange(1, NUM_BINS, device=params.device, dtype=loc.dtype) - 0.5) / (
            NUM_BINS - 1
        )
        z = (loc.unsqueeze(-1) - thresholds) * torch.exp(-log_scale).unsqueeze(-1)
        return torch.sigmoid(z).sum(-1) / (NUM_BINS - 1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        loc, log_scale = self.split(params)
        u = torch.rand(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        eps = torch.finfo(loc.dtype).eps
        u = u.clamp(eps, 1.0 - eps)
        y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        # Rounding to the nearest k/255 is exactly the bin assignment; clamping opens the edges.
        k = torch.round(y * (NUM_BINS - 1)).clamp(0, NUM_BINS - 1)
        return k / (NUM_BINS - 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_log_scale={self.min_log_scale})"


LIKELIHOODS: dict[str, type[Likelihood]] = {
    Bernoulli.name: Bernoulli,
    Categorical256.name: Categorical256,
    DiscretizedLogistic.name: DiscretizedLogistic,
}


def get_likelihood(name: str | Likelihood, **kwargs: object) -> Likelihood:
    """Build the likelihood called ``name`` in :data:`LIKELIHOODS` (an instance passes through).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Likelihood):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a likelihood name")
        return name
    if name not in LIKELIHOODS:
        valid = ", ".join(repr(n) for n in LIKELIHOODS)
        raise ValueError(f"unknown likelihood {name!r}; valid values are {valid}")
    return LIKELIHOODS[name](**kwargs)
