"""The GPU run's table stage: a row of the paper's table (every posterior on one data set)
trained by ``experiments/table.py`` (``vaeflow train`` subprocesses, several at once on the
one device, each under a stated wall-clock budget), then read back through
:mod:`vaeflow.runs`: test NELBO (exact trace for FFJORD), epochs, steps, mean NFE and the
paper's number per cell, and the learning curves against wall-clock.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gpu_guard import Deadline, stream_lines

from vaeflow.runs import find_runs

__all__ = ["SMOKE_SETS", "TABLE_SCRIPT", "cell_records", "run_table", "write_tiny_mnist"]

TABLE_SCRIPT = Path(__file__).resolve().with_name("table.py")
# A smoke run's model: an MLP VAE with toy flows on the tiny data set (5 steps per cell).
SMOKE_SETS = ("arch=mlp", "latent_dim=8", "context_dim=16", "split_sizes=[200,50,50]")
SMOKE_FLOW_OPTS = ("ffjord:hidden_dims=[16,16]", "ffjord:rank=2", "ffjord:num_blocks=1")
# What the report of ``table.py`` and a cell's startup and evaluation take besides the
# training budget (seconds): the per-cell budget is the stage's time less this.
OVERHEAD_S = 75.0


def write_tiny_mnist(out_dir: Path, source: Path | None, sizes: Sequence[int]) -> Path:
    """A ``binarized_mnist.npz`` with ``sizes`` (train, valid, test) rows in the layout of
    shared/data (784 bits packed per row): the first rows of ``source`` when it exists, else
    random bits (a smoke run only checks that everything runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    real = np.load(source, allow_pickle=False) if source is not None and source.is_file() else None
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        if real is not None:
            packed = real[f"x_{split}"][:n]
        else:
            packed = np.packbits((rng.random((n, 784)) < 0.2).astype(np.uint8), axis=1)
        arrays[f"x_{split}"] = packed
        arrays[f"shape_{split}"] = np.array([n, 784], dtype=np.int64)
    if real is not None:
        real.close()
    path = out_dir / "binarized_mnist.npz"
    np.savez_compressed(path, **arrays)
    return path


def table_command(
    dataset: str,
    flows: Sequence[str],
    runs_dir: Path,
    report_dir: Path,
    device: str,
    data_dir: Path,
    cell_minutes: float | None,
    stop_after_minutes: float,
    parallel: int,
    sets: Sequence[str],
    flow_opts: Sequence[str] = (),
) -> list[str]:
    """The ``experiments/table.py`` command for one row, one seed; ``cell_minutes=None`` is a
    smoke row (5 steps per cell)."""
    cmd = [
        sys.executable, str(TABLE_SCRIPT), "--datasets", dataset, "--flows", *flows,
        "--seeds", "1", "--parallel", str(parallel), "--device", device,
        "--data-dir", str(data_dir), "--runs-dir", str(runs_dir), "--out", str(report_dir),
        "--stop-after", f"{stop_after_minutes:.2f}",
    ]  # fmt: skip
    cmd += ["--smoke"] if cell_minutes is None else ["--budget-minutes", f"{cell_minutes:.2f}"]
    for item in sets:
        cmd += ["--set", item]
    for item in flow_opts:
        cmd += ["--flow-opt", item]
    return cmd


def run_table(
    command_args: Mapping[str, Any], stage: Deadline, log: Path, env: Mapping[str, str]
) -> dict[str, Any]:
    """Run the row (``command_args``: :func:`table_command`'s arguments but the stop time)
    under ``stage``'s deadline; ``experiments/table.py`` stops its cells itself a little
    before it, and is killed at it."""
    stop_after = max(stage.left() - 20.0, 10.0) / 60
    cmd = table_command(**command_args, stop_after_minutes=stop_after)
    done = stream_lines(cmd, stage.left(), log, env=env)
    out: dict[str, Any] = {"command": cmd, "returncode": done.returncode,
                           "seconds": round(done.seconds, 1)}  # fmt: skip
    if done.timed_out:
        out["error"] = f"experiments/table.py killed at the stage's deadline ({done.seconds:.0f} s)"
    elif done.returncode != 0:
        tail = [line for line in done.lines if line.strip()][-1:] or ["no output"]
        out["error"] = f"experiments/table.py exited with status {done.returncode}: {tail[0]}"
    return out


def _paper(dataset: str, flow: str) -> float | None:
    try:  # the paper's numbers live with the table's code, in one place
        from table_records import paper_value
    except ImportError:  # pragma: no cover - the table code being reorganised
        return None
    return paper_value(dataset, flow)


def _budget(config: Mapping[str, Any]) -> str:
    if config.get("max_steps") is not None:
        return f"{config['max_steps']} steps (smoke)"
    if config.get("max_minutes") is not None:
        return f"{config['max_minutes']:g} min"
    return f"{config.get('max_epochs')} epochs"


def cell_records(runs_dir: Path, flows: Sequence[str]) -> list[dict[str, Any]]:
    """One record per flow of ``flows`` from the run directories below ``runs_dir``: the
    budget, epochs, steps, mean NFE (FFJORD), wall-clock, test NELBO and the paper's number
    (``None`` where a cell did not finish)."""
    found = {run.config.flow: run for run in find_runs(runs_dir)}
    records = []
    for flow in flows:
        run = found.get(flow)
        record: dict[str, Any] = {"flow": flow, "status": "not run", "test_nelbo": None}
        records.append(record)
        if run is None:
            continue
        config = run.config
        record["dataset"] = config.dataset
        record["paper_nelbo"] = _paper(config.dataset, flow)
        record["budget"] = _budget(config.to_dict())
        record["max_minutes"] = config.max_minutes
        history = run.history
        record["train_seconds"] = history[-1]["seconds"] if history else None
        record["run_dir"] = str(run.path)
        results = run.results
        if results is None:
            record["status"] = "unfinished"
            continue
        record["status"] = "ok"
        for key in ("test_nelbo", "epochs", "steps", "stop_reason", "num_parameters",
                    "train_nfe_forward_mean", "train_nfe_backward_mean"):  # fmt: skip
            record[key] = results.get(key)
        record["eval_points"] = config.eval_points
    return records
