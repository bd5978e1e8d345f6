"""Is a run's ODE solve accurate enough? FFJORD's log-determinant against that of the map.

    python experiments/solver_check.py runs/quick
    python experiments/solver_check.py runs/quick --step-sizes 0.5 0.25 0.0625 --points 64

For test points x, z0 drawn from q0(z0|x) and each solve (the run's own, rk4 at each
``--step-sizes``, dopri5 at the flow's tolerances), it prints the log-determinant that the
solver integrates (the exact trace, as the test NELBO uses it) beside ``log|det dzK/dz0|`` of
the map that the same solve computes (from the autograd Jacobian, D backward passes per point),
and how far zK moves from dopri5's. A solve whose two columns differ, or whose zK is far from
dopri5's, is not the continuous flow: a model trained with it can learn its error (README,
"The test figures of FFJORD"). On the CPU: 5 minutes for 64 points, latent 32 and 5 solves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import InputError, input_errors
from vaeflow.cli import USER_ERRORS
from vaeflow.evaluate import run_dataset, subset
from vaeflow.flows import Flow
from vaeflow.runs import load_model, read_config


def map_logdet(flow: Flow, z0: Tensor, h: Tensor) -> Tensor:
    """``log|det dzK/dz0|`` per row of ``z0 [B, D]`` (context ``h [B, H]``): ``[B]``."""
    rows = []
    for z, c in zip(z0, h, strict=True):
        jac = torch.autograd.functional.jacobian(lambda v, c=c: flow(v[None], c[None])[0][0], z)
        rows.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(rows)


def check(flow: Flow, z0: Tensor, h: Tensor, solves: Sequence[dict[str, Any]]) -> list[dict]:
    """One record per solve in ``solves`` (``replace_solver`` settings; ``{}``: as it is),
    each against the last solve's zK (the reference)."""
    records: list[dict] = []
    for settings in solves:
        with input_errors():
            flow.replace_solver(**settings)
        if any(r["solve"] == flow.get_extra_state() for r in records):
            continue  # the run's own solve is also among those asked for
        with torch.no_grad():
            zK, logdet = flow(z0, h)
        exact = map_logdet(flow, z0, h)
        records.append({
            "solve": flow.get_extra_state(), "zK": zK, "integrated": logdet.mean().item(),
            "map": exact.mean().item(), "max_gap": (logdet - exact).abs().max().item(),
        })
    reference = records[-1]["zK"]
    for record in records:
        record["zK_error"] = (record.pop("zK") - reference).norm(dim=1).mean().item()
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--points", type=int, default=32, help="test points (default 32)")
    parser.add_argument("--step-sizes", type=float, nargs="*", default=[0.5, 0.25, 0.125],
                        help="rk4 step sizes to compare (in the flow's time, [0, 1] per block)")
    parser.add_argument("--data-dir")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.run_dir)
        if config.flow != "ffjord":
            raise InputError(f"{args.run_dir} trains flow {config.flow!r}: it solves no ODE")
        if args.data_dir is not None:
            config.data_dir = args.data_dir
        model, _ = load_model(args.run_dir, args.checkpoint, "cpu", config)
        data = run_dataset(config, "cpu")
    except USER_ERRORS as err:  # a missing data file too, as `vaeflow eval` says it
        print(f"solver_check: error: {err}", file=sys.stderr)
        return 2
    model.eval()
    x = subset(data.test, args.points)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        mu, sigma, h = model.encoder(x)
        z0 = mu + sigma * torch.randn(mu.shape, generator=generator)
    trained = model.flow.get_extra_state()
    solves: list[dict[str, Any]] = [{}]  # the run's own solve first
    solves += [{"method": "rk4", "solver_options": {"step_size": s}} for s in args.step_sizes]
    solves.append({"method": "dopri5", "atol": trained["atol"], "rtol": trained["rtol"]})
    print(f"{args.run_dir}: {len(x)} test points, latent {z0.shape[1]}; trained with {trained}")
    print("| solve | integrated log-det | log-det of the map | max gap | mean ‖zK - zK(dopri5)‖ |")
    print("|---|---:|---:|---:|---:|")
    for r in check(model.flow, z0, h, solves):
        solve = r["solve"]
        step = solve["options"].get("step_size")
        name = f"{solve['method']} step {step:g}" if step else (
            f"{solve['method']} atol {solve['atol']:g} rtol {solve['rtol']:g}")
        print(f"| {name} | {r['integrated']:.3f} | {r['map']:.3f} | {r['max_gap']:.3f} | "
              f"{r['zK_error']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
