"""The GPU run's reference stage: the FFJORD paper's own code (``rtqichen/ffjord``, kept in
``../shared/reference``) timed on the same device, flow by flow, from a copy made at run time
in the work folder (ignored by git: none of its code enters this project).

Its ``refbench.py N ARGS`` runs ``train_vae_flow.py ARGS`` unchanged for N training batches and
logs a ``Time`` per batch (the wall-clock between batch ends, its own host syncs included): those
lines are parsed. It reads static MNIST as ``data/MNIST_static/*.amat`` text; the copy gets amat
files of the first rows of ``binarized_mnist.npz`` only, enough for the batches timed (the time
of a batch does not depend on the size of the file; parsing all 70,000 rows would cost ~20 s per
flow).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gpu_guard import Deadline, stream_lines

__all__ = [
    "REFERENCE_FLOWS",
    "SMOKE_COMMON",
    "SMOKE_FLOWS",
    "missing_dependencies",
    "prepare_reference",
    "run_reference",
]

# vaeflow's flow name -> the reference's arguments for the papers' MNIST model (the Sylvester
# paper's baselines: 16 planar/Sylvester steps, 32 orthogonal vectors, 8 Householder
# reflections, IAF 4 steps with MADE width 320; FFJORD's cnf_rank command from its README).
REFERENCE_FLOWS: dict[str, list[str]] = {
    "ffjord": ["--flow", "cnf_rank", "--rank", "64", "--dims", "1024-1024", "--num_blocks", "2"],
    "none": ["--flow", "no_flow"],
    "planar": ["--flow", "planar", "--num_flows", "16"],
    "iaf": ["--flow", "iaf", "--num_flows", "4", "--made_h_size", "320"],
    "orthogonal": ["--flow", "orthogonal", "--num_flows", "16", "--num_ortho_vecs", "32"],
    "householder": ["--flow", "householder", "--num_flows", "16", "--num_householder", "8"],
    "triangular": ["--flow", "triangular", "--num_flows", "16"],
}
# A smoke run's tiny sizes, over the above (the flags come last, so these win).
SMOKE_FLOWS: dict[str, list[str]] = {
    "ffjord": ["--rank", "2", "--dims", "16-16", "--num_blocks", "1"],
    "planar": ["--num_flows", "2"],
    "iaf": ["--num_flows", "1", "--made_h_size", "16"],
    "orthogonal": ["--num_flows", "2", "--num_ortho_vecs", "2"],
    "householder": ["--num_flows", "2", "--num_householder", "2"],
    "triangular": ["--num_flows", "2"],
}
SMOKE_COMMON = ["--z_size", "8", "--batch_size", "10"]
# The FFJORD run is the comparison that matters most and the slowest: a larger share of time.
_WEIGHT = {"ffjord": 3.0}
_TIME = re.compile(r"\| Time ([0-9.]+) \|")
_NFE = re.compile(r"NFE Forward ([0-9.]+) \| NFE Backward ([0-9.]+)")
_DEPENDENCIES = ("scipy", "six", "matplotlib", "torchdiffeq")


def missing_dependencies() -> list[str]:
    """The modules the reference code imports that are not installed here."""
    return [m for m in _DEPENDENCIES if importlib.util.find_spec(m) is None]


def _write_amat(npz: Path, out: Path, rows: Mapping[str, int]) -> None:
    """``binarized_mnist_<split>.amat``: the first ``rows[split]`` images of ``npz`` (packed
    bits, as in shared/data) as lines of 784 space-separated 0/1."""
    out.mkdir(parents=True, exist_ok=True)
    with np.load(npz, allow_pickle=False) as z:
        for split, n in rows.items():
            bits = np.unpackbits(z[f"x_{split}"][:n], axis=1, count=784)
            np.savetxt(out / f"binarized_mnist_{split}.amat", bits, fmt="%d", delimiter=" ")


def prepare_reference(source: Path, work: Path, npz: Path, train_rows: int) -> Path:
    """Copy the reference (``source`` holds ``refbench.py`` and ``ffjord/``) to
    ``work/reference`` with amat files of ``train_rows`` training images; return the folder to
    run it from (``work/reference/ffjord``)."""
    for needed in (source / "refbench.py", source / "ffjord" / "train_vae_flow.py", npz):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing (see results/gpu/README.md)")
    copy = work / "reference"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.amat", "__pycache__"))
    copy.chmod(0o755)
    for path in copy.rglob("*"):  # the shared folder is read-only; the copy must be writable
        path.chmod(0o755 if path.is_dir() else 0o644)
    rows = {"train": train_rows, "valid": 100, "test": 100}
    _write_amat(npz, copy / "ffjord" / "data" / "MNIST_static", rows)
    return copy / "ffjord"


def parse_times(lines: Sequence[str]) -> dict[str, Any]:
    """Per-batch ``Time`` (s) and NFE of the reference's log lines; ``s_per_iter`` is the
    median after the first batches (cuDNN autotuning, allocator warm-up) are dropped."""
    times = [float(m.group(1)) for line in lines if (m := _TIME.search(line))]
    nfe = [tuple(map(float, m.groups())) for line in lines if (m := _NFE.search(line))]
    skip = 2 if len(times) >= 5 else (1 if len(times) >= 2 else 0)
    out: dict[str, Any] = {"times_s": times, "iters": len(times), "warmup_dropped": skip}
    out["s_per_iter"] = statistics.median(times[skip:]) if times else None
    if nfe:
        out["nfe_forward"] = statistics.median(n[0] for n in nfe[skip:] or nfe)
        out["nfe_backward"] = statistics.median(n[1] for n in nfe[skip:] or nfe)
    return out


def run_reference(
    flows: Sequence[str],
    run_dir: Path,
    stage: Deadline,
    logs: Path,
    env: Mapping[str, str],
    iters: int,
    cuda: bool,
    smoke: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the reference for ``iters`` batches of each of ``flows`` (vaeflow's names) from
    ``run_dir``, one after the other (a shared GPU would distort the times), each killed at
    its share of the time left in ``stage`` with the batches it timed kept."""
    records: dict[str, dict[str, Any]] = {}
    for i, flow in enumerate(flows):
        args = ["--dataset", "mnist", *REFERENCE_FLOWS[flow], "--log_interval", "1",
                "--manual_seed", "1", "--out_dir", str(logs / f"reference-{flow}")]  # fmt: skip
        if smoke:
            args += [*SMOKE_COMMON, *SMOKE_FLOWS.get(flow, [])]
        if not cuda:
            args.append("--no_cuda")
        weights = [_WEIGHT.get(f, 1.0) for f in flows[i:]]
        limit = stage.left() * weights[0] / sum(weights)
        record: dict[str, Any] = {"args": args}
        records[flow] = record
        if limit < 2:
            record.update(status="skipped", error="no time left in the stage")
            print(f"reference {flow:12s} skipped: {record['error']}", flush=True)
            continue
        cmd = [sys.executable, "../refbench.py", str(iters), *args]
        done = stream_lines(cmd, limit, logs / f"reference-{flow}.log", run_dir, env)
        record.update(parse_times(done.lines), seconds=round(done.seconds, 1))
        if record["s_per_iter"] is None:
            tail = [line for line in done.lines[-5:] if line.strip()]
            why = f"timed out after {limit:.0f} s" if done.timed_out else (
                f"exited with status {done.returncode}")
            record.update(status="failed", error=f"{why}: {tail[-1] if tail else 'no output'}")
        else:
            cut = f" (cut short at {limit:.0f} s)" if done.timed_out else ""
            record.update(status="ok", error=cut.strip(" ()"))
        s_per_iter = record.get("s_per_iter")
        # a failure says why here too, not only in summary.json and the log
        shown = f"{s_per_iter:.4g} s/iter" if s_per_iter is not None else record["error"]
        print(f"reference {flow:12s} {record['status']} {shown}", flush=True)
    return records
