"""The first training losses of vaeflow and of the FFJORD paper's own code, side by side.

A fidelity check that needs no GPU: for each posterior, ``vaeflow train`` and the reference's
``train_vae_flow.py`` (``../shared/reference``, run unchanged through its ``refbench.py``, from
a copy in the work folder) train the paper's static-MNIST model for the first ``--steps``
batches of epoch 1 (KL weight 1/100, Adamax 5e-4, batch 100) from several seeds, on the same
training images (the first ``--train-rows`` of ``binarized_mnist.npz``), and log the loss,
reconstruction and KL terms of every batch (vaeflow with ``log_every=1``, read back from its
TensorBoard events; the reference from its own per-batch log lines). Same model, same loss,
same optimizer: the curves should overlap within the seeds' spread. An initialisation or a
loss term that differs shows as a gap at step 1; an optimizer or learning-rate difference as
curves that part.

FFJORD at the paper's size costs ~190 s per batch in the reference on a CPU, so by default both
sides run the same FFJORD architecture at a smaller width (``--ffjord small``: hidden 64-64,
rank 8, one block; ``--ffjord paper`` for the paper's). The seeds differ in what they draw
(initial weights, batch order, noise), not in distribution.

    python experiments/first_losses.py results/bench/first-losses --steps 50 --seeds 1 2 \\
        --data-dir ../shared/data --reference ../shared/reference

writes ``first-losses.md`` (a table per flow: step 1 and the mean of the last 10 steps, both
codes, with the spread over seeds), ``first-losses.json`` (every curve) and
``first-losses.png`` (loss and KL against step).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_report import environment
from bench_timing import repo_env
from gpu_guard import stream_lines
from gpu_reference import (
    REFERENCE_FLOWS,
    SMOKE_COMMON,
    SMOKE_FLOWS,
    missing_dependencies,
    prepare_reference,
)
from gpu_table import write_tiny_mnist

REPO = Path(__file__).resolve().parents[1]
FLOWS = tuple(REFERENCE_FLOWS)
TERMS = ("loss", "recon", "kl")
# The reference's per-batch line: "... | Loss   543.2 | Rec   540.1 | KL     3.1 ..."
_TERMS = re.compile(r"\| Loss\s+([-0-9.naif]+) \| Rec\s+([-0-9.naif]+) \| KL\s+([-0-9.naif]+)")
# The same FFJORD architecture on both sides at a CPU-friendly width (``--ffjord small``).
SMALL_FFJORD = {"hidden_dims": [64, 64], "rank": 8, "num_blocks": 1}
SMALL_FFJORD_REFERENCE = ["--dims", "64-64", "--rank", "8", "--num_blocks", "1"]
# A smoke run (the CI test): tiny models, a few batches (the reference's from gpu_reference).
SMOKE_SETS = {"latent_dim": 8, "batch_size": 10}
SMOKE_FLOW_OPTS: dict[str, dict[str, Any]] = {
    "ffjord": {"hidden_dims": [16, 16], "rank": 2, "num_blocks": 1},
    "planar": {"num_steps": 2},
    "iaf": {"num_steps": 1, "hidden_dim": 16},
    "orthogonal": {"num_steps": 2, "num_ortho_vecs": 2},
    "householder": {"num_steps": 2, "num_householder": 2},
    "triangular": {"num_steps": 2},
}
LAST = 10  # the window at the end of the curves that the table averages


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/first_losses.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where first-losses.{md,json,png} go")
    p.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    p.add_argument("--steps", type=int, default=50, help="batches per run (default 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--train-rows", type=int, default=10000,
                   help="training images both codes draw batches from (default 10000)")
    p.add_argument("--ffjord", choices=("small", "paper"), default="small")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--reference", type=Path, default=REPO.parent / "shared" / "reference")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--parallel", type=int, default=2,
                   help="runs at a time, one thread each (default 2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="a tiny model, a few batches (the test)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: one report of these first-losses.json files' runs (a "
                        "later file's run replaces an earlier one's of the same flow and seed)")
    return p


# ---- the two sides ------------------------------------------------------------------------


def _flow_opts(flow: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        return SMOKE_FLOW_OPTS.get(flow, {})
    return SMALL_FFJORD if flow == "ffjord" and args.ffjord == "small" else {}


def vaeflow_command(
    flow: str, seed: int, out: Path, data_dir: Path, args: argparse.Namespace
) -> list[str]:
    """``vaeflow train`` of the paper's static-MNIST cell for ``args.steps`` batches, every
    batch's terms logged; a short evaluation at the end (it is not what is compared)."""
    sets: dict[str, Any] = {
        "split_sizes": [args.train_rows, 100, 100], "log_every": 1, "is_samples": 0,
        "eval_points": 100, "valid_points": 100, "pictures": False, "checkpoint_every": 0,
        **(SMOKE_SETS if args.smoke else {}),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "vaeflow.cli", "train", "--dataset", "static_mnist",
           "--flow", flow, "--device", "cpu", "--seed", str(seed), "--data-dir", str(data_dir),
           "--max-steps", str(args.steps), "--quiet", "--out", str(out)]  # fmt: skip
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    for key, value in _flow_opts(flow, args).items():
        cmd += ["--flow-opt", f"{key}={json.dumps(value)}"]
    return cmd


def reference_command(flow: str, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    """The reference's ``train_vae_flow.py`` for the same cell, through ``refbench.py``."""
    cmd = [sys.executable, "../refbench.py", str(args.steps), "--dataset", "mnist",
           *REFERENCE_FLOWS[flow], "--log_interval", "1", "--manual_seed", str(seed),
           "--out_dir", str(out), "--no_cuda"]  # fmt: skip
    if args.smoke:
        cmd += [*SMOKE_COMMON, *SMOKE_FLOWS.get(flow, [])]
    elif flow == "ffjord" and args.ffjord == "small":
        cmd += SMALL_FFJORD_REFERENCE
    return cmd


def read_vaeflow_terms(run_dir: Path) -> dict[str, list[float]]:
    """Per-step ``train/{loss,recon,kl}`` of a run's TensorBoard events (``log_every=1``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for term in TERMS:
        scalars = sorted(events.Scalars(f"train/{term}"), key=lambda e: e.step)
        out[term] = [e.value for e in scalars]
    return out


def parse_reference_terms(lines: Sequence[str]) -> dict[str, list[float]]:
    """Per-batch Loss, Rec and KL of the reference's log lines."""
    rows = [tuple(map(float, m.groups())) for line in lines if (m := _TERMS.search(line))]
    return {term: [row[i] for row in rows] for i, term in enumerate(TERMS)}


# ---- running -----------------------------------------------------------------------------


def run_one(side: str, flow: str, seed: int, ctx: dict[str, Any]) -> dict[str, Any]:
    args, work = ctx["args"], ctx["work"]
    env = repo_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = work / "logs" / f"{side}-{flow}-seed{seed}.log"
    t0 = time.monotonic()
    if side == "vaeflow":
        out = work / "runs" / f"{flow}-seed{seed}"
        cmd = vaeflow_command(flow, seed, out, ctx["data_dir"], args)
        done = stream_lines(cmd, args.timeout, log, REPO, env)
        terms = read_vaeflow_terms(out) if done.returncode == 0 else {}
    else:
        cmd = reference_command(flow, seed, work / "reference-out" / f"{flow}-seed{seed}", args)
        done = stream_lines(cmd, args.timeout, log, ctx["reference_dir"], env)
        terms = parse_reference_terms(done.lines)
    record: dict[str, Any] = {"side": side, "flow": flow, "seed": seed, **terms,
                              "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
    steps = len(terms.get("loss", []))
    if steps < args.steps:
        tail = [line for line in done.lines if line.strip()][-1:] or ["no output"]
        record["error"] = (f"{steps} of {args.steps} steps; exit {done.returncode}"
                           f"{' (timed out)' if done.timed_out else ''}: {tail[0]}")
    print(f"{side:8s} {flow:12s} seed {seed}: {steps} steps in {record['seconds']} s"
          f"{'  ' + record['error'] if 'error' in record else ''}", flush=True)
    return record


def _stats(
    curves: list[list[float]], window: slice, reduce: Any = statistics.fmean
) -> dict[str, float] | None:
    values = [reduce(c[window]) for c in curves if c[window]]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarise(records: list[dict[str, Any]], flows: Sequence[str], steps: int) -> list[dict]:
    """Per flow and term: step 1 and the mean of the last ``LAST`` steps (and, for the KL, its
    peak: the largest value of each run), each side's mean over seeds and range, and the gap
    between the sides' means."""
    rows = []
    last = slice(max(steps - LAST, 0), steps)
    windows = [("step 1", slice(0, 1), statistics.fmean),
               (f"steps {last.start + 1}-{steps}", last, statistics.fmean),
               ("peak", slice(0, steps), max)]  # fmt: skip
    for flow in flows:
        for term in TERMS:
            for name, window, reduce in windows:
                if name == "peak" and term != "kl":
                    continue
                row: dict[str, Any] = {"flow": flow, "term": term, "window": name}
                for side in ("reference", "vaeflow"):
                    curves = [r[term] for r in records
                              if r["side"] == side and r["flow"] == flow and r.get(term)]
                    row[side] = _stats(curves, window, reduce)
                if row["reference"] and row["vaeflow"]:
                    row["gap"] = row["vaeflow"]["mean"] - row["reference"]["mean"]
                rows.append(row)
    return rows


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "—"
    return f"{stats['mean']:.2f} [{stats['min']:.2f}, {stats['max']:.2f}]"


def render(summary: dict[str, Any]) -> str:
    args = summary["args"]
    lines = [
        "# First training losses: vaeflow against the FFJORD paper's code" + (
            " (SMOKE: NOT comparable)" if args["smoke"] else ""),
        "",
        f"- machine: {summary['machine']}",
        *(f"- {part['runs']} runs ({part['what']}) at commit `{part['commit']}`, "
          f"{part['date']}: `{part['command']}`" for part in summary["parts"]),
        f"- static MNIST, the first {args['train_rows']} training images for both codes; "
        f"{args['steps']} batches of epoch 1 (KL weight 0.01); FFJORD size: {args['ffjord']}; "
        "one thread per run, two runs at a time",
        "- nats per image, batch means; each cell: mean over seeds [min, max over seeds]; "
        "gap = vaeflow - reference",
        "",
        "| flow | term | window | reference | vaeflow | gap |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        gap = f"{row['gap']:+.2f}" if "gap" in row else "—"
        lines.append(f"| {row['flow']} | {row['term']} | {row['window']} | "
                     f"{_cell(row['reference'])} | {_cell(row['vaeflow'])} | {gap} |")
    errors = [r for r in summary["runs"] if "error" in r]
    if errors:
        lines += ["", "Runs that did not finish:", ""]
        lines += [f"- {r['side']} {r['flow']} seed {r['seed']}: {r['error']}" for r in errors]
    lines += ["", "Seconds per run (whole command: start-up, data, the batches, and for "
              "vaeflow a 100-point evaluation):", ""]
    for side in ("reference", "vaeflow"):
        secs = {f"{r['flow']}/{r['seed']}": r["seconds"] for r in summary["runs"]
                if r["side"] == side}
        lines.append(f"- {side}: " + ", ".join(f"{k} {v:g}" for k, v in secs.items()))
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], flows: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(flows), figsize=(3.2 * len(flows), 6), squeeze=False)
    for j, flow in enumerate(flows):
        for i, term in enumerate(("loss", "kl")):
            ax = axes[i][j]
            for r in records:
                if r["flow"] != flow or not r.get(term):
                    continue
                ref = r["side"] == "reference"
                ax.plot(range(1, len(r[term]) + 1), r[term], color="C1" if ref else "C0",
                        ls="--" if ref else "-", lw=1,
                        label=f"{r['side']} seed {r['seed']}")  # fmt: skip
            ax.set_title(f"{flow}: {term}")
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("nats")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _part(source: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A report's line on ``runs`` of one command (``source``: its commit, date, command)."""
    flows = sorted({r["flow"] for r in runs}, key=FLOWS.index)
    seeds = sorted({r["seed"] for r in runs})
    return {**source, "runs": len(runs), "what": f"{', '.join(flows)}; seeds {seeds}"}


def write_report(summary: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "first-losses.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "first-losses.md").write_text(render(summary))
    plot(summary["runs"], summary["flows"], out_dir / "first-losses.png")
    print(f"wrote {out_dir}")


def _source(summary: dict[str, Any]) -> dict[str, str]:
    """Where a run comes from (a merged file keeps it per run, so it can be merged again)."""
    return {key: summary[key] for key in ("commit", "date", "command")}


def merge(args: argparse.Namespace) -> int:
    """One report of the runs of several result files (each part keeps its commit); a run of
    a later file replaces an earlier file's run of the same side, flow and seed."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    summaries = [json.loads(path.read_text()) for path in args.merge]
    for summary in summaries:
        for run in summary["runs"]:
            run.setdefault("source", _source(summary))
            runs[(run["side"], run["flow"], run["seed"])] = run
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for summary in summaries:  # the runs that no later file replaced, by where they come from
        for run in summary["runs"]:
            if runs[(run["side"], run["flow"], run["seed"])] is run:
                groups.setdefault(tuple(run["source"].values()), []).append(run)
    parts = [_part(kept[0]["source"], kept) for kept in groups.values()]
    records = sorted(runs.values(), key=lambda r: (FLOWS.index(r["flow"]), r["seed"], r["side"]))
    flows = sorted({r["flow"] for r in records}, key=FLOWS.index)
    steps = min(len(r.get("loss", [])) for r in records)
    merged = {**summaries[-1], "parts": parts, "flows": flows, "runs": records,
              "rows": summarise(records, flows, steps)}  # fmt: skip
    merged["args"] = {**merged["args"], "steps": steps}
    write_report(merged, args.out_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.merge:
        return merge(args)
    if args.steps < 1 or args.parallel < 1 or args.train_rows < (10 if args.smoke else 100):
        raise SystemExit("first_losses.py: --steps and --parallel must be positive, "
                         "--train-rows at least one batch")
    missing = missing_dependencies()
    if missing:
        raise SystemExit(f"first_losses.py: the reference code needs {', '.join(missing)}")
    npz = args.data_dir / "binarized_mnist.npz"
    if not npz.is_file():
        raise SystemExit(f"first_losses.py: {npz} is missing (see shared/data/README.md)")
    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="first-losses-")
    work = args.work or Path(scratch.name)
    data_dir = work / "data"
    write_tiny_mnist(data_dir, npz, (args.train_rows, 100, 100))
    ctx = {"args": args, "work": work, "data_dir": data_dir,
           "reference_dir": prepare_reference(args.reference, work, npz, args.train_rows)}
    jobs = [(side, flow, seed) for flow in args.flows for seed in args.seeds
            for side in ("reference", "vaeflow")]  # fmt: skip
    with ThreadPoolExecutor(args.parallel) as pool:
        records = list(pool.map(lambda job: run_one(*job, ctx), jobs))
    env = environment("cpu")
    summary = {
        "machine": env["device_name"], "commit": env["commit"], "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "command": " ".join(["python", "experiments/first_losses.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "flows": list(args.flows), "rows": summarise(records, args.flows, args.steps),
        "runs": records,
    }  # fmt: skip
    for record in records:
        record["source"] = _source(summary)
    summary["parts"] = [_part(_source(summary), records)]
    write_report(summary, args.out_dir)
    if scratch is not None:
        scratch.cleanup()
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
