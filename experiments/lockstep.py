"""vaeflow's VAE and the FFJORD paper's code stepped in lockstep: the same initial weights, the
same batches and the same posterior noise, one Adamax step each per batch.

Where ``experiments/first_losses.py`` compares the two codes in distribution (each from its
own seeds, whose early training is chaotic), this removes the randomness: the reference's
no-flow VAE (``vae_lib.models.VAE``, the gated-conv encoder and decoder every cell shares) is
built, its weights are copied into vaeflow's static-MNIST model (the gated layers' two
convolutions become one), and both train on identical inputs with their own loss code
(``vae_lib``'s ``calculate_loss``; ``vaeflow.train.train_step``) and their own optimizer
objects. Equal losses step after step mean the same architecture, the same objective, the same
gradients and the same optimizer.

    python experiments/lockstep.py --steps 50 --reference ../shared/reference \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
LATENT = 64  # the papers' latent size
BETA = 0.01  # the KL weight of epoch 1 of a 100-epoch warm-up


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/lockstep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", type=Path, default=REPO.parent / "shared" / "reference")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--every", type=int, default=10, help="print every N steps (default 10)")
    return p


def reference_vae(reference: Path) -> tuple[torch.nn.Module, Any]:
    """The reference's no-flow VAE for static MNIST and its ``calculate_loss``."""
    sys.dont_write_bytecode = True  # the shared copy is read-only
    sys.path.insert(0, str(reference / "ffjord"))
    from vae_lib.models.VAE import VAE
    from vae_lib.optimization.loss import calculate_loss

    args = types.SimpleNamespace(z_size=LATENT, input_size=[1, 28, 28], input_type="binary",
                                 cuda=False)  # fmt: skip
    return VAE(args), calculate_loss


def vaeflow_weights(ref: torch.nn.Module) -> dict[str, Tensor]:
    """The reference VAE's weights under vaeflow's names: each gated layer's ``h`` and ``g``
    convolutions concatenated along the output channels (dim 0 of a ``Conv2d`` weight, dim 1
    of a ``ConvTranspose2d`` one)."""
    out: dict[str, Tensor] = {}
    for i, (enc, dec) in enumerate(zip(ref.q_z_nn, ref.p_x_nn, strict=True)):
        out[f"encoder.body.{i}.conv.weight"] = torch.cat([enc.h.weight, enc.g.weight], 0)
        out[f"encoder.body.{i}.conv.bias"] = torch.cat([enc.h.bias, enc.g.bias], 0)
        out[f"decoder.body.{i + 1}.conv.weight"] = torch.cat([dec.h.weight, dec.g.weight], 1)
        out[f"decoder.body.{i + 1}.conv.bias"] = torch.cat([dec.h.bias, dec.g.bias], 0)
    heads = {"encoder.mean": ref.q_z_mean, "encoder.scale": ref.q_z_var[0],
             "decoder.body.7": ref.p_x_mean[0]}  # fmt: skip
    for name, layer in heads.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = layer.weight, layer.bias
    return {k: v.detach().clone() for k, v in out.items()}


def lockstep(
    steps: int, reference: Path, data_dir: Path, batch_size: int = 100, seed: int = 0
) -> list[dict[str, float]]:
    """Per step: both codes' loss and KL (nats per image) on the same batch and noise."""
    from vaeflow.configs import resolve
    from vaeflow.data import load_dataset
    from vaeflow.model import build_model
    from vaeflow.train import make_optimizer, train_step

    torch.manual_seed(seed)
    ref, calculate_loss = reference_vae(reference)
    config = resolve("static_mnist", "none", {"data_dir": str(data_dir)})
    train = load_dataset("static_mnist", data_dir, "cpu").train
    ours = build_model(config)
    ours.load_state_dict(vaeflow_weights(ref))
    # The reference's own optimizer line (train_vae_flow.py), and vaeflow's from the config.
    opt_ref = torch.optim.Adamax(ref.parameters(), lr=5e-4, eps=1.0e-7)
    opt_ours = make_optimizer(config, ours)
    noise: dict[str, Tensor] = {}
    ref.reparameterize = lambda mu, var: noise["eps"] * var.sqrt() + mu
    ours._noise = lambda like, generator: noise["eps"]
    ref.train(), ours.train()
    gen = torch.Generator().manual_seed(seed + 1)
    loss_args = types.SimpleNamespace(input_type="binary")
    rows = []
    for step in range(1, steps + 1):
        x = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
        noise["eps"] = torch.randn(batch_size, LATENT, generator=gen)
        opt_ref.zero_grad()
        x_mean, z_mu, z_var, ldj, z0, zk = ref(x)
        loss, _, kl, _ = calculate_loss(x_mean, x, z_mu, z_var, z0, zk, ldj, loss_args, beta=BETA)
        loss.backward()
        opt_ref.step()
        out = train_step(ours, opt_ours, x, BETA)
        rows.append({"step": step, "reference_loss": loss.item(), "reference_kl": kl.item(),
                     "vaeflow_loss": out["loss"].item(),
                     "vaeflow_kl": out["kl"].item()})  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="size_average and reduce")  # the reference's BCE
    rows = lockstep(args.steps, args.reference, args.data_dir, args.batch_size, args.seed)
    print("| step | reference loss | vaeflow loss | reference KL | vaeflow KL |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["step"] in (1, args.steps) or r["step"] % args.every == 0:
            print(f"| {r['step']} | {r['reference_loss']:.3f} | {r['vaeflow_loss']:.3f} | "
                  f"{r['reference_kl']:.3f} | {r['vaeflow_kl']:.3f} |")
    worst = max(abs(r["vaeflow_loss"] - r["reference_loss"]) for r in rows)
    print(f"\nlargest loss difference over {len(rows)} steps: {worst:.2e} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
