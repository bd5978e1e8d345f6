"""vaeflow's VAEs and the FFJORD paper's code stepped in lockstep: the same initial weights,
the same batches and the same posterior noise, one Adamax step each per batch.

Where ``experiments/first_losses.py`` compares the two codes in distribution (each from its
own seeds, whose early training is chaotic), this removes the randomness. For each posterior
of ``--flow`` the reference's static-MNIST VAE (``vae_lib.models``: the gated-conv encoder and
decoder every cell shares, and the planar, IAF or Sylvester flow with the papers' settings) is
built, its weights are copied into vaeflow's model of the same cell (the gated layers' two
convolutions become one, the flows' separate amortization layers the rows of one head), and
both train on identical inputs with their own loss code (``vae_lib``'s ``calculate_loss``;
``vaeflow.train.train_step``) and their own optimizer objects. Equal losses step after step
mean the same architecture, the same objective, the same gradients and the same optimizer.

``--flow ffjord`` does the same for the paper's flow at the size of ``--dims``, ``--rank`` and
``--blocks``, in float64 at ``--tol``: the reference's amortized low-rank CNF VAE
(``cnf_rank``, gradients by the adjoint) and vaeflow's FFJORD (``lowrank_init = "reference"``,
Gaussian Hutchinson probes, gradients through the solver) with the same probes.

``--init N`` checks what the locksteps cannot see, since they copy the reference's weights: how
each code draws them. Each initialises its own model from N seeds, and each parameter's root
mean square in vaeflow is compared with the reference's (a ratio outside ~4 standard deviations
of N draws is reported, and the exit status is 1).

``--ffjord`` checks FFJORD forward instead: the same weights (the shared layers' time column
moved from first to last, the head's rows reordered to vaeflow's ``U, V, c``), the same
``z0``, the exact trace in both, float64 and tight tolerances: ``zK`` and the log-determinant
agree to the solvers' error.

    python experiments/lockstep.py --steps 50 --flow none planar iaf orthogonal householder \\
        triangular --reference ../shared/reference --data-dir ../shared/data
    python experiments/lockstep.py --steps 5 --flow ffjord --dims 64-64 --rank 8 --tol 1e-8
    python experiments/lockstep.py --ffjord --dims 1024-1024 --rank 64 --blocks 2
    python experiments/lockstep.py --init 3 --flow none planar iaf orthogonal householder \\
        triangular ffjord --dims 16-16 --rank 2
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from reference_weights import (
    LATENT,
    REFERENCE_CLASSES,
    baseline_pair,
    ffjord_pair,
    flow_weights,
)
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
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
    p.add_argument("--flow", nargs="+", default=["none"], choices=[*REFERENCE_CLASSES, "ffjord"],
                   help="the posteriors of the training lockstep, one after the other "
                        "(default none)")
    p.add_argument("--init", type=int, metavar="SEEDS",
                   help="compare the codes' initialisations instead, parameter by parameter, "
                        "over this many seeds (for each --flow)")
    p.add_argument("--ffjord", action="store_true", help="the forward check of FFJORD instead")
    p.add_argument("--dims", default="64-64", help="FFJORD hidden widths (default 64-64)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--float64", action="store_true",
                   help="the baselines' lockstep in float64 (FFJORD's always is)")
    p.add_argument("--tol", type=float, default=1e-7, help="FFJORD's dopri5 atol = rtol")
    return p


def init_scales(
    flow: str, reference: Path, data_dir: Path, seeds: Sequence[int],
    ffjord: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """What the lockstep cannot see, since it copies the reference's weights: how each code
    initialises them. Per parameter of vaeflow's model of ``flow``, the root mean square of
    vaeflow's own initial values and of the reference's mapped onto it (masked weights: the
    entries the mask keeps), pooled over ``seeds``, and the largest ratio that ``n`` draws of
    one distribution would plausibly show (about 4 standard deviations)."""
    pooled: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for seed in seeds:
        if ffjord is not None:
            ref, ours, _ = ffjord_pair(reference, data_dir, **ffjord, seed=seed, copy=False)
        else:
            ref, ours, _ = baseline_pair(reference, data_dir, flow, seed, copy=False)
        mapped = flow_weights(flow, ref, ours)
        state = ours.state_dict()
        for name, param in ours.named_parameters():
            mine, theirs = param.detach().double(), mapped[name].double()
            mask = state.get(name.removesuffix("weight") + "mask")
            if name.endswith("weight") and mask is not None:
                mine, theirs = mine[mask.bool()], theirs[mask.bool()]
            pooled.setdefault(name, ([], []))[0].append(mine.flatten())
            pooled[name][1].append(theirs.flatten())
    rows = []
    for name, (mine, theirs) in pooled.items():
        a, b = torch.cat(mine), torch.cat(theirs)
        rms = [x.square().mean().sqrt().item() for x in (a, b)]
        ratio = rms[0] / rms[1] if rms[1] else (1.0 if rms[0] == 0 else math.inf)
        allowed = 4.0 / math.sqrt(2 * a.numel()) + 0.02
        rows.append({"name": name, "n": a.numel(), "vaeflow": rms[0], "reference": rms[1],
                     "ratio": ratio, "ok": abs(ratio - 1.0) <= allowed})  # fmt: skip
    return rows


def ffjord_forward(
    reference: Path, data_dir: Path, dims: Sequence[int], rank: int, blocks: int,
    points: int = 20, tol: float = 1e-7, seed: int = 0,
) -> dict[str, float]:
    """The largest differences of ``z0``, ``zK`` and the log-determinant between the two
    codes' FFJORD VAEs with the same weights and noise (exact trace, float64), and how far
    the flow moves ``z0`` (so that a flow that does nothing cannot pass)."""
    ref, ours, _ = ffjord_pair(reference, data_dir, dims, rank, blocks, tol, seed)
    ref.eval(), ours.eval()
    x = _train_images(data_dir)[:points].double()
    eps = torch.randn(points, LATENT, generator=torch.Generator().manual_seed(seed + 1),
                      dtype=torch.float64)  # fmt: skip
    ref.reparameterize = lambda mu, var: eps * var.sqrt() + mu
    _, _, _, ldj, z0_ref, zk_ref = ref(x)
    with torch.no_grad():
        mu, sigma, h = ours.encoder(x)
        z0 = mu + sigma * eps
        zk, logdet = ours.flow(z0, h)
    return {
        "z0": (z0_ref - z0).abs().max().item(), "zK": (zk_ref - zk).abs().max().item(),
        "logdet": (ldj - logdet).abs().max().item(), "moved": (zk - z0).abs().mean().item(),
        "logdet_mean": logdet.mean().item(),
    }  # fmt: skip


@functools.cache
def _train_images(data_dir: Path) -> Tensor:
    from vaeflow.data import load_dataset

    return load_dataset("static_mnist", data_dir, "cpu").train


def lockstep(
    steps: int, reference: Path, data_dir: Path, batch_size: int = 100, seed: int = 0,
    flow: str = "none",
    ffjord: dict[str, Any] | None = None,
    float64: bool = False,
) -> list[dict[str, float]]:
    """Per step: both codes' loss and KL (nats per image) on the same batch and noise, for
    the paper's static-MNIST cell with ``flow``; for ``"ffjord"``, :func:`ffjord_pair`'s
    models at the size ``ffjord`` (``dims``, ``rank``, ``blocks``, ``tol``) with the same
    Gaussian Hutchinson probes (the reference solves its gradients with the adjoint,
    vaeflow backpropagates through the solver: they agree to the solvers' error), always in
    float64; the other flows in float32 unless ``float64``."""
    if (flow == "ffjord") != (ffjord is not None):
        raise ValueError("the FFJORD lockstep needs its size (ffjord=...), and only it does")
    from vaeflow.train import make_optimizer, train_step

    dtype = torch.float64 if ffjord is not None or float64 else torch.float32
    if ffjord is not None:  # flow == "ffjord"
        ref, ours, config = ffjord_pair(reference, data_dir, **ffjord, seed=seed, exact=False)
    else:
        ref, ours, config = baseline_pair(reference, data_dir, flow, seed)
        ref.to(dtype), ours.to(dtype)
    from vae_lib.optimization.loss import calculate_loss  # importable once a pair is built
    train = _train_images(data_dir)
    # The reference's own optimizer line (train_vae_flow.py), and vaeflow's from the config.
    opt_ref = torch.optim.Adamax(ref.parameters(), lr=5e-4, eps=1.0e-7)
    opt_ours = make_optimizer(config, ours)
    noise: dict[str, Any] = {}
    ref.reparameterize = lambda mu, var: noise["eps"] * var.sqrt() + mu
    ours._noise = lambda like, generator: noise["eps"]
    if ffjord is not None:
        # The same Hutchinson probe per block in both: the reference draws its probe in
        # lib.layers.odefunc at each block's first evaluation, vaeflow per block solve.
        import lib.layers.odefunc as odefunc

        odefunc.sample_gaussian_like = lambda y: noise["reference_probes"].pop(0)
        ours.flow._noise = lambda z: noise["vaeflow_probes"].pop(0)
    ref.train(), ours.train()
    gen = torch.Generator().manual_seed(seed + 1)
    loss_args = types.SimpleNamespace(input_type="binary")
    rows = []
    for step in range(1, steps + 1):
        x = train[torch.randint(0, len(train), (batch_size,), generator=gen)].to(dtype)
        noise["eps"] = torch.randn(batch_size, LATENT, generator=gen, dtype=dtype)
        if ffjord is not None:
            probes = [torch.randn(batch_size, LATENT, generator=gen, dtype=dtype)
                      for _ in range(ffjord["blocks"])]  # fmt: skip
            noise["reference_probes"], noise["vaeflow_probes"] = list(probes), list(probes)
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


def _print_init_scales(args: argparse.Namespace, size: dict[str, Any]) -> int:
    outside = 0
    for flow in args.flow:
        rows = init_scales(flow, args.reference, args.data_dir, range(args.init),
                           size if flow == "ffjord" else None)  # fmt: skip
        bad = [r for r in rows if not r["ok"]]
        outside += len(bad)
        worst = max(rows, key=lambda r: abs(r["ratio"] - 1.0))
        print(f"init {flow}: {len(rows)} parameters over {args.init} seeds, {len(bad)} outside "
              f"(largest ratio of root mean squares {worst['ratio']:.3f}, {worst['name']})")
        for r in bad:
            print(f"  {r['name']}: vaeflow {r['vaeflow']:.4g}, reference {r['reference']:.4g} "
                  f"(ratio {r['ratio']:.3f}, n = {r['n']})")
    return 1 if outside else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="size_average and reduce")  # the reference's BCE
    size = {"dims": [int(w) for w in args.dims.split("-")], "rank": args.rank,
            "blocks": args.blocks, "tol": args.tol}  # fmt: skip
    if args.init:
        return _print_init_scales(args, size)
    if args.ffjord:
        diff = ffjord_forward(args.reference, args.data_dir, **size, seed=args.seed)
        print(f"FFJORD {args.dims}, rank {args.rank}, {args.blocks} blocks, 20 points, "
              f"float64, dopri5 at {args.tol:g}, exact trace: the flow moves z0 by "
              f"{diff['moved']:.4f} on average (log-determinant {diff['logdet_mean']:.4f})")
        for key in ("z0", "zK", "logdet"):
            print(f"largest {key} difference: {diff[key]:.2e}")
        return 0
    print(f"static MNIST, the papers' cells, {args.steps} steps of {args.batch_size} images")
    for flow in args.flow:
        rows = lockstep(args.steps, args.reference, args.data_dir, args.batch_size, args.seed,
                        flow, size if flow == "ffjord" else None, args.float64)  # fmt: skip
        about = " (float64)" if args.float64 else ""
        if flow == "ffjord":
            about = (f" ({args.dims}, rank {args.rank}, {args.blocks} blocks, float64, dopri5 "
                     f"at {args.tol:g}, Gaussian Hutchinson probes)")  # fmt: skip
        print(f"\nflow {flow}{about}:\n")
        print("| step | reference loss | vaeflow loss | reference KL | vaeflow KL |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["step"] in (1, args.steps) or r["step"] % args.every == 0:
                print(f"| {r['step']} | {r['reference_loss']:.3f} | {r['vaeflow_loss']:.3f} | "
                      f"{r['reference_kl']:.3f} | {r['vaeflow_kl']:.3f} |")
        worst = max(abs(r["vaeflow_loss"] - r["reference_loss"]) for r in rows)
        worst_kl = max(abs(r["vaeflow_kl"] - r["reference_kl"]) for r in rows)
        print(f"\n{flow}: largest loss difference over {len(rows)} steps: {worst:.2e} nats "
              f"(KL: {worst_kl:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
