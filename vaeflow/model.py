"""The VAE that a :class:`~vaeflow.configs.TrainConfig` describes, built from the data set's
description (image shape and likelihood), so that no data need be read to build it."""

from __future__ import annotations

import torch

from vaeflow.configs import TrainConfig
from vaeflow.data import Dataset, DatasetSpec, get_spec
from vaeflow.flows import make_flow
from vaeflow.nets import make_networks
from vaeflow.vae import VAE

__all__ = ["build_model", "count_parameters"]


def build_model(config: TrainConfig, data: Dataset | DatasetSpec | None = None) -> VAE:
    """The VAE of ``config`` for ``data``'s image shape and likelihood (by default the spec of
    ``config.dataset``), on the current default device (the CPU unless a ``torch.device``
    context says otherwise)."""
    data = data if data is not None else get_spec(config.dataset)
    try:
        encoder, decoder = make_networks(
            config.arch,
            data.input_shape,
            latent_dim=config.latent_dim,
            context_dim=config.context_dim,
            likelihood=data.likelihood,
            **config.net_kwargs,
        )
    except TypeError as err:  # an option the architecture does not take: bad input
        raise ValueError(f"net_kwargs: {err}") from err
    flow_kwargs = dict(config.flow_kwargs)
    if config.regularization():
        flow_kwargs["regularize"] = True
    flow = make_flow(config.flow, config.latent_dim, config.context_dim, **flow_kwargs)
    return VAE(encoder, decoder, data.likelihood, flow)


def count_parameters(config: TrainConfig) -> int:
    """Trainable parameters of the model that ``config`` trains, built on the meta device (no
    data read or downloaded, no memory allocated)."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
