"""Inverse autoregressive flow (Kingma et al. 2016) with context-conditioned MADE steps.

The architecture is the one the Sylvester and FFJORD papers' IAF baseline uses: one projection of
the encoder's context to the MADE width, shared by every step, and per step a MADE whose first
masked layer reads ``z``; the projected context is added after that layer's activation.

Two mask layouts (``masks``), both autoregressive, with the same parameter count:

- ``"cycled"`` (the default): Germain et al.'s MADE. Hidden degrees cycle through ``1 .. D-1``,
  every masked layer connects a unit to every unit of no higher degree, and the steps' orders
  alternate (natural, reversed, natural, ...).
- ``"reference"``: the papers' code (``vae_lib``'s ``MaskedLinear`` and ``IAF``), which every
  per-data-set config uses. Hidden degrees come in blocks of ``W / D`` (unit ``j`` has degree
  ``j // (W / D) + 1``, so the last block feeds no output); hidden-to-hidden layers connect
  unit ``i`` to the units ``j <= i`` only; and the code reverses ``z`` before every second
  step without restoring it, so the orders run natural, reversed, reversed, natural, natural,
  ... Needs ``W`` to be a multiple of ``D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import InputError, check_number
from .base import Flow, check_choice, check_positive_int

__all__ = ["IAF", "MADE", "MASKS"]

MASKS = ("cycled", "reference")


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask ``[out, in]``.

    Initialised as the papers' code initialises its masked layers: He-normal weights with
    standard deviation ``sqrt(2 / out_features)`` and zero biases. (That code stores weights
    as ``[in, out]``, so PyTorch's fan-in is the output size there; in this ``[out, in]``
    layout that is the fan-out.) PyTorch's ``nn.Linear`` default would start the MADE's output
    heads about 5x smaller at the papers' sizes.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # The mask is saved, the MADE's degrees (which its inverse reads) are not: masks of
        # another layout (``masks=``) or order would load, and the forward would follow them
        # while the inverse followed this model's own. Refused, by name, instead.
        saved = state_dict.get(prefix + "mask")
        if saved is not None and (
            saved.shape != self.mask.shape or not torch.equal(saved.to(self.mask), self.mask)
        ):
            error_msgs.append(
                f"{prefix}mask differs from this model's: the parameters were trained with other "
                "IAF masks (the masks= option, 'cycled' or 'reference'); build the IAF as it was "
                "trained"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MADE(nn.Module):
    """An autoregressive network ``z [B, D], c [B, W] -> (m [B, D], s [B, D])`` where output
    ``i`` depends on the inputs before ``i`` in ``order`` only.

    Layers: ``x = elu(L1(z)) + c``, then ``x = elu(Lj(x))`` for the other hidden layers, then
    the masked heads ``m = Lm(x)``, ``s = Ls(x)``. ``c`` is the context already projected to the
    width ``W`` (the IAF shares one projection between its steps).

    Args:
        dim: D.
        hidden_dim: W, the width of every hidden layer.
        num_hidden_layers: masked hidden layers (>= 1); the papers' IAF uses 2.
        reverse: use the order D, ..., 1 instead of 1, ..., D.
        masks: ``"cycled"`` or ``"reference"`` (see the module's docstring).
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_hidden_layers: int = 2, reverse: bool = False,
        masks: str = "cycled",
    ) -> None:
        super().__init__()
        check_choice("masks", masks, MASKS)
        degrees_in = torch.arange(1, dim + 1)
        if reverse:
            degrees_in = degrees_in.flip(0)
        if masks == "cycled":
            # Hidden degrees cycle through 1..D-1 so every input that may be used is used.
            degrees_hidden = torch.arange(hidden_dim) % max(dim - 1, 1) + 1
        else:
            if hidden_dim % dim:
                raise InputError(
                    f"masks='reference' needs hidden_dim to be a multiple of dim, got "
                    f"hidden_dim={hidden_dim}, dim={dim}; masks='cycled' takes any width"
                )
            degrees_hidden = torch.arange(hidden_dim) // (hidden_dim // dim) + 1
        # not saved: a function of (dim, reverse), which the constructor gets again
        self.register_buffer("degrees", degrees_in, persistent=False)
        layers: list[nn.Module] = []
        previous = degrees_in
        for i in range(num_hidden_layers):
            if masks == "reference" and i > 0:
                # By unit index (i sees j <= i): a subset of the degree rule, since these
                # degrees do not decrease with the index.
                mask = torch.tril(torch.ones(hidden_dim, hidden_dim))
            else:
                mask = (degrees_hidden[:, None] >= previous[None, :]).float()
            layers.append(MaskedLinear(previous.numel(), hidden_dim, mask))
            previous = degrees_hidden
        self.hidden = nn.ModuleList(layers)
        out_mask = (degrees_in[:, None] > previous[None, :]).float()
        self.out_m = MaskedLinear(hidden_dim, dim, out_mask)
        self.out_s = MaskedLinear(hidden_dim, dim, out_mask)

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``z [B, D]``, projected context ``c [B, W]`` -> ``(m [B, D], s [B, D])``."""
        x = F.elu(self.hidden[0](z)) + c
        for layer in self.hidden[1:]:
            x = F.elu(layer(x))
        return self.out_m(x), self.out_s(x)


class IAF(Flow):
    """``num_steps`` IAF steps with the gated (LSTM-style) update

        sigma = sigmoid(s + forget_bias),  z <- sigma * z + (1 - sigma) * m,

    where ``(m, s) = MADE(z, c)`` and ``c = Linear(h)`` is one context projection shared by all
    steps; ``logdet = sum log sigma``. Steps alternate the autoregressive order so that every
    dimension can depend on every other.

    Args:
        dim: D.
        context_dim: H.
        num_steps: number of IAF steps (default 4).
        hidden_dim: MADE width (default 320, as in the Sylvester paper's IAF).
        num_hidden_layers: masked hidden layers per MADE (default 2, as in the papers' code:
            ``z -> W``, context added, ``W -> W``).
        forget_bias: added to ``s`` so a fresh flow starts close to the identity (default 1.0).
        masks: the MADEs' masks and the steps' orders: ``"cycled"`` (default) or
            ``"reference"``, the papers' code (see the module's docstring).
    """

    has_inverse = True

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_steps: int = 4,
        hidden_dim: int = 320,
        num_hidden_layers: int = 2,
        forget_bias: float = 1.0,
        masks: str = "cycled",
    ) -> None:
        super().__init__(dim, context_dim)
        self.num_steps = check_positive_int("num_steps", num_steps)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("num_hidden_layers", num_hidden_layers)
        self.forget_bias = check_number("forget_bias", forget_bias)
        self.masks = check_choice("masks", masks, MASKS)
        self.context = nn.Linear(context_dim, hidden_dim)
        self.steps = nn.ModuleList(
            MADE(dim, hidden_dim, num_hidden_layers, self.reversed_step(k), masks)
            for k in range(num_steps)
        )

    def reversed_step(self, k: int) -> bool:
        """Whether step ``k`` (from 0) runs in the reversed order. The reference code flips
        ``z`` before steps 1, 3, 5, ... and never flips it back, so its step ``k`` sees ``z``
        reversed after ``(k + 1) // 2`` flips."""
        return (k if self.masks == "cycled" else (k + 1) // 2) % 2 == 1

    def _gate(self, made: MADE, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        m, s = made(z, c)
        return m, s + self.forget_bias

    def _forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        c = self.context(h)
        z = z0
        logdet = z0.new_zeros(z0.shape[0])
        for made in self.steps:
            m, s = self._gate(made, z, c)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1.0 - sigma) * m
            logdet = logdet + F.logsigmoid(s).sum(-1)
        return z, logdet

    def _inverse(self, zK: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        c = self.context(h)
        z = zK
        logdet = zK.new_zeros(zK.shape[0])
        for made in reversed(self.steps):
            target = z
            # The outputs of degree k depend on the inputs of lower degree only, so pass k
            # finds the coordinate of degree k exactly: D passes recover the input. The others
            # stay 0 until their pass: iterated, they can overflow where sigma is small, and a
            # masked weight's 0 times an infinite input is NaN, in the exact coordinates too.
            z = torch.zeros_like(target)
            for k in range(1, self.dim + 1):
                m, s = self._gate(made, z, c)
                sigma = torch.sigmoid(s)
                z = torch.where(made.degrees == k, (target - (1.0 - sigma) * m) / sigma, z)
            m, s = self._gate(made, z, c)
            logdet = logdet + F.logsigmoid(s).sum(-1)
        return z, logdet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_steps={self.num_steps}, masks={self.masks!r}"
