"""Test figures of a trained VAE: the NELBO (exact trace for continuous flows) and the
importance-sampled log-likelihood, under a fixed seed so that they are a deterministic function
of the parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import check_int
from vaeflow.configs import TrainConfig
from vaeflow.data import Dataset
from vaeflow.vae import VAE

__all__ = [
    "eval_mode",
    "subset",
    "dataset_nelbo",
    "dataset_log_likelihood",
    "evaluate",
    "fork_rng",
]


@contextlib.contextmanager
def eval_mode(model: VAE, exact: bool = True) -> Iterator[None]:
    """Eval mode, with the flow's exact log-determinant (a continuous flow's exact trace)
    unless ``exact`` is False; the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with model.flow.evaluation_trace(exact):
            yield
    finally:
        model.train(was_training)


def subset(x: Tensor, points: int | None, seed: int = 0) -> Tensor:
    """``points`` rows of ``x [N, ...]`` drawn without replacement with a fixed seed (in their
    stored order), or all of ``x``. Not a prefix: stored splits need not be in random order
    (static MNIST's test split starts with darker digits)."""
    if points is None or points >= len(x):
        return x
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=g)[:points].sort().values
    return x[index.to(x.device)]


def _batches(n: int, size: int, progress: bool, desc: str) -> Iterator[int]:
    """The start of each batch of ``size`` rows out of ``n``, with a progress bar (that
    disappears when done) when ``progress``."""
    starts = range(0, n, size)
    if not progress:
        return iter(starts)
    from tqdm.auto import tqdm

    return iter(tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True))


def dataset_nelbo(
    model: VAE,
    x: Tensor,
    batch_size: int,
    n_samples: int = 1,
    exact: bool = True,
    progress: bool = False,
) -> Tensor:
    """Mean NELBO (nats per datum) over ``x [N, C, H, W]`` in eval mode; a 0-dim tensor.

    Runs under ``no_grad``: FFJORD switches autograd on inside its field for the trace and
    returns detached values, so no graph is kept.
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with eval_mode(model, exact), torch.no_grad():
        for start in _batches(len(x), batch_size, progress, "test NELBO"):
            xb = x[start : start + batch_size]
            nelbo = model.nelbo(xb, n_samples, batch_size=batch_size * n_samples).detach()
            total = total + nelbo.double().sum()
    return total / len(x)


def dataset_log_likelihood(
    model: VAE, x: Tensor, n_samples: int, batch_rows: int, progress: bool = False
) -> Tensor:
    """Mean importance-sampled ``log p(x)`` (nats) over ``x [N, C, H, W]``, exact trace."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    per_batch = max(1, batch_rows // n_samples)
    with eval_mode(model, exact=True), torch.no_grad():
        for start in _batches(len(x), per_batch, progress, "importance sampling"):
            xb = x[start : start + per_batch]
            ll = model.importance_log_likelihood(xb, n_samples, batch_size=batch_rows)
            total = total + ll.double().sum()
    return total / len(x)


def evaluate(
    model: VAE,
    data: Dataset,
    config: TrainConfig,
    *,
    eval_points: int | None = None,
    is_samples: int | None = None,
    is_points: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Test-set figures of ``model``: NELBO (exact trace) and the IS log-likelihood.

    The arguments override the config's ``eval_points``, ``is_samples`` (0: no IS estimate)
    and ``is_points``; ``progress`` shows a bar per estimate. For data sets reported in bits
    per dimension (Frey Faces) the ``*_bpd`` entries are the headline numbers.
    """
    eval_points = config.eval_points if eval_points is None else eval_points
    is_samples = config.is_samples if is_samples is None else is_samples
    is_points = config.is_points if is_points is None else is_points
    if eval_points is not None:
        check_int("eval_points", eval_points, minimum=1)
    check_int("is_samples", is_samples, minimum=0)
    if is_points is not None:
        check_int("is_points", is_points, minimum=1)
    test = subset(data.test, eval_points)
    num_dims = math.prod(data.input_shape)
    # A fixed seed makes the evaluation a deterministic function of the parameters.
    with fork_rng(data.test.device, config.seed + 1):
        nelbo = float(
            dataset_nelbo(model, test, config.batch_size, config.eval_samples, progress=progress)
        )
        out: dict[str, Any] = {
            "test_nelbo": nelbo,
            "test_nelbo_bpd": nelbo / (num_dims * math.log(2.0)),
            "test_points": len(test),
            "eval_samples": config.eval_samples,
            "trace": "exact",
        }
        if is_samples > 0:
            xs = subset(data.test, is_points)
            ll = float(dataset_log_likelihood(
                model, xs, is_samples, config.eval_batch_rows, progress=progress
            ))
            out.update(
                test_nll_is=-ll,
                test_nll_is_bpd=-ll / (num_dims * math.log(2.0)),
                is_samples=is_samples,
                is_points=len(xs),
            )
    out["unit"] = "bits/dim" if data.bits_per_dim else "nats"
    return out


@contextlib.contextmanager
def fork_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with the global RNGs (CPU, and ``device``'s when CUDA) seeded with
    ``seed``; the previous states are restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield
