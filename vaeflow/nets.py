"""Encoders and decoders: the gated-conv networks of the Sylvester-flows paper, and MLPs.

An encoder maps images ``x [B, C, H, W]`` to the base posterior ``q0(z0 | x) = N(mu, diag
sigma^2)`` and a context ``h`` for the amortized flow: ``(mu [B, D], sigma [B, D], h [B, H])``.
A decoder maps ``z [B, D]`` to the parameters ``[B, out_channels, H, W]`` of a likelihood from
:mod:`vaeflow.likelihoods`. :func:`make_networks` builds a matching pair by name.

The gated-conv architecture follows van den Berg et al. (2018), "Sylvester normalizing flows for
variational inference", reimplemented from the paper's description.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaeflow.checks import InputError, check_number, check_positive_int
from vaeflow.likelihoods import Likelihood, get_likelihood

__all__ = [
    "ARCHITECTURES",
    "ACTIVATIONS",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "Encoder",
    "Decoder",
    "GatedConvEncoder",
    "GatedConvDecoder",
    "MLPEncoder",
    "MLPDecoder",
    "make_networks",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}

GATEDCONV_FEATURES = 256
SCALES = ("variance", "std")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        valid = ", ".join(repr(n) for n in ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; valid values are {valid}")
    return ACTIVATIONS[name]()


class _Gated(nn.Module):
    """``h * sigmoid(g)`` where ``(h, g)`` are the two halves of ``self.conv``'s channels."""

    conv: nn.Module
    activation: nn.Module | None

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.conv(x).chunk(2, dim=1)
        if self.activation is not None:
            h = self.activation(h)
        return h * torch.sigmoid(g)


class GatedConv2d(_Gated):
    """``conv_h(x) * sigmoid(conv_g(x))``: a convolution gated by a second one.

    Both convolutions are one ``Conv2d`` with ``2 * out_channels`` outputs split in half, which is
    the same function and initialisation as two layers but one kernel launch.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` as for ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, 2 * out_channels, kernel_size, stride, padding, dilation=dilation
        )
        self.activation = activation

class GatedConvTranspose2d(_Gated):
    """``convT_h(x) * sigmoid(convT_g(x))``: a transposed convolution gated by a second one.

    Fused into one ``ConvTranspose2d`` like :class:`GatedConv2d`; each half is initialised as a
    lone ``ConvTranspose2d(in_channels, out_channels)`` would be (its fan-in counts the output
    channels, so a plain fused layer would start smaller by sqrt(2)).

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H', W']`` as for ``nn.ConvTranspose2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        output_padding: int = 0,
        dilation: int = 1,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels,
            2 * out_channels,
            kernel_size,
            stride,
            padding,
            output_padding=output_padding,
            dilation=dilation,
        )
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each half like ``nn.ConvTranspose2d.reset_parameters`` does a lone layer."""
        out_channels = self.conv.out_channels // 2
        fan_in = out_channels * math.prod(self.conv.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            for half in self.conv.weight.chunk(2, dim=1):
                nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            assert self.conv.bias is not None
            self.conv.bias.uniform_(-bound, bound)


class Encoder(nn.Module):
    """Base class: a feature network followed by the ``mu``, ``sigma`` and context heads.

    ``mu = Linear(features)``; the softplus of a second head is the posterior's VARIANCE, as in
    the papers' code: ``sigma = sqrt(softplus(Linear(features)) + min_sigma^2)``, the floor
    keeping ``log sigma`` finite when the softplus underflows. With ``variance_bounds=(lo, hi)``
    the variance is clamped to ``[lo, hi]`` instead (the papers' code does this for the 256-way
    likelihood, a hard tanh to [0.01, 7], which keeps a Frey Faces posterior from collapsing
    onto one grey level). ``scale="std"`` reads the softplus as the standard deviation instead
    (``sigma = softplus(.) + min_sigma``), a departure kept as an option. Subclasses build
    ``self.body`` mapping ``x [B, C, H, W]`` to features ``[B, num_features]`` and pass the
    context head.

    Attributes:
        input_shape: ``(C, H, W)``.
        latent_dim: D.
        context_dim: size H of the context vector ``h``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int,
        context_dim: int,
        body: nn.Module,
        num_features: int,
        context: nn.Module,
        min_sigma: float = 1e-6,
        variance_bounds: tuple[float, float] | None = None,
        scale: str = "variance",
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; valid values are {', '.join(SCALES)}")
        if scale == "std" and variance_bounds is not None:
            raise ValueError("variance_bounds needs scale='variance'")
        self.scale_kind = scale
        self.input_shape = _check_shape(input_shape)
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        # a floor below 0 would make the std head's sigma negative (the loss NaN)
        self.min_sigma = check_number("min_sigma", min_sigma, nonnegative=True)
        if variance_bounds is not None:
            if isinstance(variance_bounds, str | bytes) or not isinstance(
                variance_bounds, Sequence
            ) or len(variance_bounds) != 2:
                raise ValueError(f"variance_bounds must be two numbers (lo, hi), got "
                                 f"{variance_bounds!r}")
            # check_number: a bool is no bound (float(True) would read as 1.0)
            lo, hi = (check_number("variance_bounds", v) for v in variance_bounds)
            if not 0 < lo < hi:
                raise ValueError(f"variance_bounds must be 0 < lo < hi, got {variance_bounds!r}")
            variance_bounds = (lo, hi)
        self.variance_bounds = variance_bounds
        self.body = body
        self.mean = nn.Linear(num_features, latent_dim)
        self.scale = nn.Linear(num_features, latent_dim)
        self.context = context

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, C, H, W]`` -> ``(mu [B, D], sigma [B, D], h [B, context_dim])``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            dims = ", ".join(map(str, self.input_shape))
            raise ValueError(
                f"{type(self).__name__} expects x of shape [B, {dims}], got {tuple(x.shape)}"
            )
        features = self.body(x)
        mu = self.mean(features)
        raw = F.softplus(self.scale(features))
        if self.scale_kind == "std":
            sigma = raw + self.min_sigma
        elif self.variance_bounds is None:
            sigma = (raw + self.min_sigma**2).sqrt()
        else:
            sigma = raw.clamp(*self.variance_bounds).sqrt()
        return mu, sigma, self.context(features)


class Decoder(nn.Module):
    """Base class: ``z [B, D]`` -> likelihood parameters ``[B, out_channels, H, W]``.

    Attributes:
        input_shape: ``(C, H, W)`` of the images modelled.
        latent_dim: D.
        out_channels: channels of the parameters (from the likelihood).
    """

    def __init__(
        self, input_shape: Sequence[int], latent_dim: int, out_channels: int, body: nn.Module
    ) -> None:
        super().__init__()
        self.input_shape = _check_shape(input_shape)
        self.latent_dim = latent_dim
        self.out_channels = out_channels
        self.body = body

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, D]`` -> ``params [B, out_channels, H, W]``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__} expects z of shape [B, {self.latent_dim}], "
                f"got {tuple(z.shape)}"
            )
        _, h, w = self.input_shape
        return self.body(z).reshape(z.shape[0], self.out_channels, h, w)


def _gatedconv_last_kernel(input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Spatial size after the two stride-2 layers = the last encoder kernel (7x7; 7x5 for Frey)."""
    _, h, w = input_shape
    if h % 4 or w % 4:
        raise ValueError(
            f"the gatedconv networks need H and W divisible by 4 (two stride-2 layers that the "
            f"decoder mirrors), got {h}x{w}"
        )
    return h // 4, w // 4


class GatedConvEncoder(Encoder):
    """The Sylvester paper's gated-conv encoder; the context is its 256 features.

    Layers (``in, out, kernel, stride, padding``): (C,32,5,1,2), (32,32,5,2,2), (32,64,5,1,2),
    (64,64,5,2,2), (64,64,5,1,2), (64,256,H/4 x W/4,1,0): 7x7 for 28x28, 7x5 for 28x20.
    When ``context_dim != 256`` a ``Linear(256, context_dim)`` projects the features to the
    context (``mu`` and ``sigma`` still read the 256 features). ``variance_bounds``: see
    :class:`Encoder`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int,
        context_dim: int = GATEDCONV_FEATURES,
        min_sigma: float = 1e-6,
        variance_bounds: tuple[float, float] | None = None,
        scale: str = "variance",
    ) -> None:
        shape = _check_shape(input_shape)
        kernel = _gatedconv_last_kernel(shape)
        body = nn.Sequential(
            GatedConv2d(shape[0], 32, 5, 1, 2),
            GatedConv2d(32, 32, 5, 2, 2),
            GatedConv2d(32, 64, 5, 1, 2),
            GatedConv2d(64, 64, 5, 2, 2),
            GatedConv2d(64, 64, 5, 1, 2),
            GatedConv2d(64, GATEDCONV_FEATURES, kernel, 1, 0),
            nn.Flatten(),
        )
        context: nn.Module = (
            nn.Identity()
            if context_dim == GATEDCONV_FEATURES
            else nn.Linear(GATEDCONV_FEATURES, context_dim)
        )
        super().__init__(
            shape, latent_dim, context_dim, body, GATEDCONV_FEATURES, context, min_sigma,
            variance_bounds, scale,
        )


class GatedConvDecoder(Decoder):
    """The Sylvester paper's gated-conv decoder, mirroring :class:`GatedConvEncoder`.

    ``z`` is read as a 1x1 image; layers: T(D,64,H/4 x W/4,1,0), T(64,64,5,1,2),
    T(64,32,5,2,2,op=1), T(32,32,5,1,2), T(32,32,5,2,2,op=1), T(32,32,5,1,2), then the head
    ``Conv2d(32, out_channels, 1)`` for the likelihood parameters (T = GatedConvTranspose2d).
    With ``head_channels`` the head is ``Conv2d(32, head_channels, 5, padding=2)`` followed by
    ``Conv2d(head_channels, out_channels, 1)``, the papers' head for the 256-way likelihood.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int,
        out_channels: int,
        head_channels: int | None = None,
    ) -> None:
        shape = _check_shape(input_shape)
        kernel = _gatedconv_last_kernel(shape)
        head: list[nn.Module] = [nn.Conv2d(32, out_channels, 1)]
        if head_channels is not None:
            # 0 would build a decoder whose output ignores z (only the last bias is left), and a
            # negative or fractional count fails inside torch with a message that names no option
            check_positive_int("head_channels", head_channels)
            head = [
                nn.Conv2d(32, head_channels, 5, 1, 2),
                nn.Conv2d(head_channels, out_channels, 1),
            ]
        body = nn.Sequential(
            nn.Unflatten(1, (latent_dim, 1, 1)),
            GatedConvTranspose2d(latent_dim, 64, kernel, 1, 0),
            GatedConvTranspose2d(64, 64, 5, 1, 2),
            GatedConvTranspose2d(64, 32, 5, 2, 2, output_padding=1),
            GatedConvTranspose2d(32, 32, 5, 1, 2),
            GatedConvTranspose2d(32, 32, 5, 2, 2, output_padding=1),
            GatedConvTranspose2d(32, 32, 5, 1, 2),
            *head,
        )
        super().__init__(shape, latent_dim, out_channels, body)


def _mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers through ``sizes``, each followed by the activation."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), _activation(activation)]
    return nn.Sequential(*layers)


def _check_hidden(hidden_sizes: Sequence[int]) -> tuple[int, ...]:
    """The MLP's hidden layer sizes as a tuple: a non-empty sequence of positive integers (an
    :class:`InputError` names the bad one, as the other net options' checks do)."""
    iterable = isinstance(hidden_sizes, Iterable) and not isinstance(hidden_sizes, str | bytes)
    sizes = tuple(hidden_sizes) if iterable else ()
    if not sizes:
        raise InputError(
            f"hidden_sizes must be a non-empty list of positive integers, got {hidden_sizes!r}"
        )
    for i, size in enumerate(sizes):
        check_positive_int(f"hidden_sizes[{i}]", size)
    return sizes


class MLPEncoder(Encoder):
    """Fully connected encoder: flatten, ``hidden_sizes`` layers with ``activation``.

    The context is ``Linear(hidden_sizes[-1], context_dim)`` of the last hidden layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int,
        context_dim: int = 256,
        hidden_sizes: Sequence[int] = (300, 300),
        activation: str = "relu",
        min_sigma: float = 1e-6,
        variance_bounds: tuple[float, float] | None = None,
        scale: str = "variance",
    ) -> None:
        shape = _check_shape(input_shape)
        sizes = _check_hidden(hidden_sizes)
        body = nn.Sequential(nn.Flatten(), _mlp((math.prod(shape), *sizes), activation))
        context = nn.Linear(sizes[-1], context_dim)
        super().__init__(
            shape, latent_dim, context_dim, body, sizes[-1], context, min_sigma, variance_bounds,
            scale,
        )


class MLPDecoder(Decoder):
    """Fully connected decoder: ``z`` through ``reversed(hidden_sizes)`` layers with
    ``activation``, then a linear layer to ``out_channels * H * W`` parameters."""

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int,
        out_channels: int,
        hidden_sizes: Sequence[int] = (300, 300),
        activation: str = "relu",
    ) -> None:
        shape = _check_shape(input_shape)
        sizes = _check_hidden(hidden_sizes)[::-1]
        body = nn.Sequential(
            _mlp((latent_dim, *sizes), activation),
            nn.Linear(sizes[-1], out_channels * shape[1] * shape[2]),
        )
        super().__init__(shape, latent_dim, out_channels, body)


ARCHITECTURES = ("gatedconv", "mlp")

# What the papers' gated-conv VAE does differently per likelihood (by name): for the 256-way
# categorical a 5x5 convolution to 256 channels before the logits, and a bounded variance.
PAPER_NETS: dict[str, dict[str, object]] = {
    "categorical256": {"head_channels": 256, "variance_bounds": (0.01, 7.0)},
}


def make_networks(
    arch: str,
    input_shape: tuple[int, int, int],
    latent_dim: int = 64,
    context_dim: int = 256,
    likelihood: str | Likelihood = "bernoulli",
    **kw: object,
) -> tuple[Encoder, Decoder]:
    """Build a matching ``(encoder, decoder)`` pair.

    Args:
        arch: ``"gatedconv"`` or ``"mlp"``.
        input_shape: ``(C, H, W)``; gatedconv needs H and W divisible by 4.
        latent_dim: D.
        context_dim: size of the context ``h``; for gatedconv anything but 256 adds a linear
            projection of the 256 conv features.
        likelihood: a name in :data:`vaeflow.likelihoods.LIKELIHOODS` (or an instance): it fixes
            the decoder's ``out_channels``.
        **kw: ``min_sigma``, ``variance_bounds`` and ``scale`` (encoder, both archs); for
            ``"gatedconv"`` ``head_channels`` (decoder); for ``"mlp"`` also ``hidden_sizes``
            and ``activation`` (shared by encoder and decoder). For ``"gatedconv"`` the defaults of
            :data:`PAPER_NETS` for the likelihood apply unless given (``None`` turns one off;
            ``scale="std"`` takes no ``variance_bounds``, which bound a variance).

    Raises:
        ValueError: for an unknown arch (listing the valid ones), bad shapes or options.
        TypeError: for a keyword that the chosen arch does not take.
    """
    if arch not in ARCHITECTURES:
        valid = ", ".join(repr(a) for a in ARCHITECTURES)
        raise ValueError(f"unknown arch {arch!r}; valid values are {valid}")
    shape = _check_shape(input_shape)
    check_positive_int("latent_dim", latent_dim)
    check_positive_int("context_dim", context_dim)
    lik = get_likelihood(likelihood)
    out_channels = lik.out_channels(shape[0])
    allowed = {
        "gatedconv": {"min_sigma", "variance_bounds", "scale", "head_channels"},
        "mlp": {"min_sigma", "variance_bounds", "scale", "hidden_sizes", "activation"},
    }
    unknown = set(kw) - allowed[arch]
    if unknown:
        raise TypeError(
            f"make_networks({arch!r}) got unexpected keyword(s) {sorted(unknown)}; it accepts "
            f"{sorted(allowed[arch])}"
        )
    if arch == "gatedconv":
        defaults = dict(PAPER_NETS.get(lik.name, {}))
        if kw.get("scale") == "std":  # the bounds are a variance's: the std head has none
            defaults.pop("variance_bounds", None)
        kw = {**defaults, **kw}
    enc_keys = ("min_sigma", "variance_bounds", "scale")
    enc_kw = {k: v for k, v in kw.items() if k in enc_keys}
    shared = {k: v for k, v in kw.items() if k not in enc_keys}
    if arch == "gatedconv":
        encoder: Encoder = GatedConvEncoder(shape, latent_dim, context_dim, **enc_kw)  # type: ignore[arg-type]
        decoder: Decoder = GatedConvDecoder(shape, latent_dim, out_channels, **shared)  # type: ignore[arg-type]
    else:
        encoder = MLPEncoder(shape, latent_dim, context_dim, **shared, **enc_kw)  # type: ignore[arg-type]
        decoder = MLPDecoder(shape, latent_dim, out_channels, **shared)  # type: ignore[arg-type]
    return encoder, decoder
