"""A Pyro VAE on static binarized MNIST whose guide is encoder -> Normal -> amortized flow.

    VAEFLOW_DATA=/work/shared/data python experiments/pyro_vae.py --flow ffjord --max-steps 200

The model is ``z ~ N(0, I)``, ``x ~ Bernoulli(decoder(z))``; the guide is
``q(z|x) = flow_h(N(mu(x), diag sigma(x)^2))`` with ``(mu, sigma, h) = encoder(x)``, the flow
wrapped by :class:`vaeflow.pyro.ConditionalFlowTransform`. Training is ``pyro.infer.SVI`` with
``Trace_ELBO`` and ``ClippedAdam``; FFJORD uses the Hutchinson trace in training and the exact
trace for the test negative ELBO at the end. TensorBoard event files (the loss per step, its
KL weight and the FFJORD NFE) and ``results.json`` go to the run directory ``--out``.

The default networks are small enough for a CPU: MLP encoder/decoder (300, 300), latent size 32,
context size 64, and for FFJORD one block with hidden (64, 64), rank 8, dopri5 with
atol = rtol = 1e-4 (see ``FLOW_DEFAULTS``; ``--flow-opt name=value`` overrides any of them).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from vaeflow.checks import (
    check_choice,
    check_device_name,
    check_int,
    check_number,
    check_options,
    check_positive_int,
    resolve_device,
)
from vaeflow.cli import parse_value
from vaeflow.data import DataFileError, DataNotFoundError, Dataset, load_dataset
from vaeflow.flows import FLOWS, make_flow
from vaeflow.nets import make_networks
from vaeflow.pyro import ConditionalFlowTransform
from vaeflow.vae import evaluating

# A small FFJORD that trains at a few steps per second on a CPU.
FLOW_DEFAULTS: dict[str, dict[str, Any]] = {
    "ffjord": dict(hidden_dims=(64, 64), rank=8, method="dopri5", atol=1e-4, rtol=1e-4),
}


@dataclass
class Config:
    """Everything a run depends on; saved in ``results.json``."""

    flow: str = "ffjord"
    max_steps: int = 2000
    batch_size: int = 100
    lr: float = 1e-3
    data_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    eval_size: int = 1000
    out: str = "runs/pyro_vae"
    latent_dim: int = 32
    context_dim: int = 64
    arch: str = "mlp"
    warmup_steps: int = 0
    log_every: int = 20
    clip_norm: float = 10.0
    threads: int = 1
    flow_kw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # vaeflow's own checks, so that a value is refused here as `vaeflow train` refuses it
        check_choice("flow", self.flow, FLOWS, "flows")
        for name in ("max_steps", "batch_size", "eval_size", "log_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("threads", "warmup_steps"):
            check_int(name, getattr(self, name), minimum=0)
        check_number("lr", self.lr, positive=True)
        check_number("clip_norm", self.clip_norm, positive=True)
        check_device_name(self.device)  # its spelling; whether it is here, when a run starts
        # read as `vaeflow train --flow-opt` reads them: `none`, lists and tables by the
        # hyperparameter's annotation
        self.flow_kw = check_options(self.flow_kw, [FLOWS[self.flow]], "--flow-opt ")

    def flow_hyperparameters(self) -> dict[str, Any]:
        return {**FLOW_DEFAULTS.get(self.flow, {}), **self.flow_kw}


class PyroVAE(nn.Module):
    """The generative model and the flow guide, as two Pyro programs over one batch.

    Both take ``x [B, 1, 28, 28]`` and a KL weight ``beta`` (> 0) that scales the ``z`` sites.
    ``z`` may carry leading particle dimensions (``vectorize_particles``): the decoder sees them
    flattened.

    Args:
        encoder: ``x -> (mu [B, D], sigma [B, D], h [B, H])``.
        decoder: ``z [N, D] -> logits [N, 1, 28, 28]``.
        flow: a :class:`vaeflow.flows.Flow` with ``dim = D``, ``context_dim = H``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, flow: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.flow = ConditionalFlowTransform(flow)
        self.latent_dim: int = flow.dim

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("decoder", self.decoder)
        d = self.latent_dim
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(d), x.new_ones(d)).to_event(1)
            with poutine.scale(scale=beta):
                z = pyro.sample("z", prior)  # [..., B, D]
            logits = self.decoder(z.reshape(-1, d)).reshape(*z.shape[:-1], *x.shape[1:])
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)

    def guide(self, x: Tensor, beta: float = 1.0) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("flow", self.flow)
        with pyro.plate("data", x.shape[0]):
            mu, sigma, h = self.encoder(x)
            q = dist.TransformedDistribution(dist.Normal(mu, sigma), [self.flow.condition(h)])
            with poutine.scale(scale=beta):
                pyro.sample("z", q)


def build(config: Config, input_shape: tuple[int, int, int]) -> PyroVAE:
    """Encoder, decoder and flow for ``config``, on the CPU (the caller moves them)."""
    encoder, decoder = make_networks(
        config.arch, input_shape, latent_dim=config.latent_dim, context_dim=config.context_dim
    )
    flow = make_flow(
        config.flow, config.latent_dim, config.context_dim, **config.flow_hyperparameters()
    )
    return PyroVAE(encoder, decoder, flow)


def batches(data: Dataset, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Shuffled training batches, epoch after epoch, without end."""
    loader = data.loader("train", batch_size, shuffle=True, drop_last=True, seed=seed)
    while True:
        yield from loader


def eval_subset(x: Tensor, size: int) -> Tensor:
    """``size`` points of ``x [N, ...]``: all of them, or a random subset drawn with a fixed seed.

    Not the first ``size``: the static MNIST test split is not in random order (its first
    thousand digits have more ink and a NELBO some 40 nats above the rest), so a prefix would
    bias the estimate. The seed is fixed so that every run is scored on the same points.
    """
    if size >= len(x):
        return x
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(x), generator=generator)[:size].sort().values
    return x[index.to(x.device)]


@torch.no_grad()
def evaluate_nelbo(vae: PyroVAE, x: Tensor, batch_size: int) -> float:
    """The negative ELBO per data point (nats) on ``x [N, 1, 28, 28]``, one posterior sample
    per point, the flow in eval mode (FFJORD: the exact trace)."""
    elbo = Trace_ELBO()
    total = 0.0
    with evaluating(vae):
        for start in range(0, len(x), batch_size):
            total += elbo.loss(vae.model, vae.guide, x[start : start + batch_size])
    return total / len(x)


def run(config: Config, data: Dataset | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train with SVI for ``config.max_steps`` steps and evaluate the test NELBO.

    Args:
        config: the run.
        data: a loaded data set; ``None`` loads static binarized MNIST from ``config.data_dir``
            (else ``$VAEFLOW_DATA``) onto ``config.device``.
        verbose: print the loss every ``config.log_every`` steps.

    The test NELBO is measured on ``config.eval_size`` test points (see :func:`eval_subset`).

    Returns:
        the results also written to ``<out>/results.json``: per-datum losses of the first and
        last steps (``first_loss``, ``last_loss``, and means over the first and last
        ``log_every`` steps), ``test_nelbo``, ``eval_size``, wall times, and the config.
    """
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    if data is None:
        data = load_dataset("static_mnist", config.data_dir, device)
    vae = build(config, data.input_shape).to(device)
    # ClippedAdam clips each parameter's gradient norm: a rare stiff FFJORD batch cannot wreck
    # the weights with one huge step.
    optimizer = ClippedAdam({"lr": config.lr, "clip_norm": config.clip_norm})
    svi = SVI(vae.model, vae.guide, optimizer, loss=Trace_ELBO())

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(out))
    losses: list[float] = []
    start = time.perf_counter()
    try:
        stream = batches(data, config.batch_size, config.seed)
        for step in range(1, config.max_steps + 1):
            x = next(stream)
            beta = min(1.0, step / config.warmup_steps) if config.warmup_steps else 1.0
            loss = svi.step(x, beta) / x.shape[0]
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {step}; stopping")
            losses.append(loss)
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/beta", beta, step)
            nfe = getattr(vae.flow.flow, "nfe_forward", None)
            if nfe is not None:
                writer.add_scalar("train/nfe_forward", nfe, step)
            if verbose and (step % config.log_every == 0 or step == 1):
                recent = losses[-config.log_every :]
                extra = f"  nfe {nfe}" if nfe is not None else ""
                print(
                    f"step {step:5d}  loss {loss:8.2f}  mean(last {len(recent)}) "
                    f"{sum(recent) / len(recent):8.2f}{extra}  "
                    f"{time.perf_counter() - start:6.1f}s",
                    flush=True,
                )
        train_time = time.perf_counter() - start
        x_test = eval_subset(data.test, config.eval_size)
        eval_start = time.perf_counter()
        test_nelbo = evaluate_nelbo(vae, x_test, config.batch_size)
        eval_time = time.perf_counter() - eval_start
        writer.add_scalar("test/nelbo", test_nelbo, config.max_steps)
    finally:
        writer.close()

    window = min(config.log_every, len(losses))
    results = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "first_mean_loss": sum(losses[:window]) / window,
        "last_mean_loss": sum(losses[-window:]) / window,
        "loss_window": window,
        "test_nelbo": test_nelbo,
        "eval_size": len(x_test),
        "train_seconds": train_time,
        "eval_seconds": eval_time,
        "config": asdict(config),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if verbose:
        print(
            f"test NELBO {test_nelbo:.2f} nats on {len(x_test)} test points (exact trace); "
            f"train {train_time:.1f}s, eval {eval_time:.1f}s; results in {out / 'results.json'}"
        )
    return results


def _flow_kw(text: str) -> tuple[str, Any]:
    """``name=value`` with ``value`` read as TOML, as ``vaeflow train --flow-opt`` reads it
    (``hidden_dims=[64,64]``, ``adjoint=true``, ``solver_options={step_size=0.25}``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), parse_value(value.strip())


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--flow", default=defaults.flow, choices=list(FLOWS))
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--data-dir", default=None, help="default: $VAEFLOW_DATA, else the cache")
    p.add_argument("--device", default=defaults.device,
                   help="cpu, cuda, cuda:N or auto (CUDA when there is one)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--eval-size", type=int, default=defaults.eval_size, help="test points")
    p.add_argument("--out", default=defaults.out, help="run directory (TensorBoard, results)")
    p.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    p.add_argument("--context-dim", type=int, default=defaults.context_dim)
    p.add_argument("--arch", default=defaults.arch, choices=["mlp", "gatedconv"])
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        help="KL weight min(1, step / warmup_steps); 0: no warm-up",
    )
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch CPU threads (0: torch's default); 1, the default, is the fastest "
        "for these small networks on a CPU shared with other work",
    )
    p.add_argument(
        "--flow-opt",
        "--flow-kw",  # its first name; vaeflow train calls it --flow-opt
        dest="flow_kw",
        type=_flow_kw,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="flow hyperparameter, read as TOML as by vaeflow train, e.g. --flow-opt "
        "atol=1e-5 --flow-opt hidden_dims=[32,32] (`vaeflow flows` lists them)",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out")
    args = vars(p.parse_args(argv))
    args["flow_kw"] = dict(args["flow_kw"])
    overwrite = args.pop("overwrite")
    try:
        config = Config(**args)
        resolve_device(config.device)  # a device this machine lacks is refused now too
        # the flow is built once here, on no device, so a bad hyperparameter is refused now
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            make_flow(config.flow, config.latent_dim, config.context_dim,
                      **config.flow_hyperparameters())
    except ValueError as err:
        p.error(str(err))
    if (Path(config.out) / "results.json").exists() and not overwrite:
        p.error(f"{config.out} holds the results of an earlier run: choose another --out, "
                "or --overwrite")
    return config


if __name__ == "__main__":
    config = parse_args()
    try:
        run(config)
    except (DataNotFoundError, DataFileError) as err:  # no data: a message, not a traceback
        raise SystemExit(f"pyro_vae.py: error: {err}") from None
