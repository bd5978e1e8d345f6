"""The GPU run's reports from its summary: ``bench.md`` (vaeflow's step times, through the
benchmark's own report writer, beside the reference code's) and ``table.md`` (the row of the
table with the paper's numbers and the budget), and the speed-up over the reference per flow.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench_report import Result, write_report
from bench_variants import VARIANTS

from vaeflow.flows import FLOWS

__all__ = ["SPEED_TARGETS", "render_bench", "render_table", "speedups", "targets"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _bench_results(summary: Mapping[str, Any]) -> list[Result]:
    bench = summary.get("bench", {})
    out = []
    for record in bench.get("variants", []):
        if record.get("result"):
            result = Result(**record["result"])
            if record["status"] != "ok":
                result.note = record.get("error", "")
        else:
            name = record["variant"]
            flow = VARIANTS[name].flow if name in VARIANTS else "?"
            result = Result(name, flow, bench.get("size", ""), bench.get("device", ""),
                            bench.get("batch_size") or 100, 0, 0)  # fmt: skip
            result.note = f"{record['status']}: {record.get('error', '')}"
        out.append(result)
    return out


# A graphed variant stands for the eager step only if its first replays gave the eager
# steps' losses (Result.graph_loss_gap) to within this many nats (losses are 80-600 nats).
GRAPH_GAP_TOL = 1e-2


def _same_step(r: Result, variant: Any) -> bool:
    """Whether ``r`` may stand for its flow's default step: a same-step variant, a finite
    loss, and for a CUDA graph a passed check against eager steps."""
    if not variant.same_step or (r.final_loss is not None and not math.isfinite(r.final_loss)):
        return False
    return not variant.cuda_graph or (r.graph_loss_gap is not None
                                      and r.graph_loss_gap <= GRAPH_GAP_TOL)  # fmt: skip


def speedups(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per flow measured by both: vaeflow's default variant's ms per step, the reference's ms
    per iteration, ``speedup`` = reference / vaeflow (above 1: vaeflow is faster) and its
    inverse ``vaeflow_over_reference``; then the fastest variant that computes the same step
    (``Variant.same_step``: e.g. the step in one CUDA graph whose first replays matched eager
    steps, or the compiled field; never another solver or estimator, nor a non-finite loss),
    as ``best_variant``, ``best_ms`` and ``best_speedup``."""
    ms: dict[str, float] = {}
    best: dict[str, tuple[float, str]] = {}
    for r in _bench_results(summary):
        variant = VARIANTS.get(r.variant)
        if not r.ms_median or variant is None:
            continue
        if r.variant == variant.flow:
            ms[variant.flow] = r.ms_median
        if _same_step(r, variant) and r.ms_median < best.get(variant.flow, (math.inf, ""))[0]:
            best[variant.flow] = (r.ms_median, r.variant)
    out = {}
    for flow, ref in summary.get("reference", {}).get("flows", {}).items():
        if ref.get("s_per_iter") and ms.get(flow):
            ref_ms = ref["s_per_iter"] * 1e3
            # none when no variant may stand for the step (e.g. the default's loss is NaN)
            best_ms, best_name = best.get(flow, (None, None))
            out[flow] = {"vaeflow_ms": ms[flow], "reference_ms": ref_ms,
                         "speedup": ref_ms / ms[flow],
                         "vaeflow_over_reference": ms[flow] / ref_ms,
                         "best_variant": best_name, "best_ms": best_ms,
                         "best_speedup": best_ms and ref_ms / best_ms}  # fmt: skip
    return out


# What the GPU run is to show: vaeflow's step this many times faster than the paper's code on
# the same GPU (FFJORD; every other flow), and a test NELBO in every cell of one table row.
SPEED_TARGETS = {"ffjord": 10.0, "baseline": 3.0}


def targets(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Each flow's speed-up against its target, by the default step and by the fastest same
    step (None: not measured on both sides), and whether every posterior has a test NELBO in
    the table row; ``met``: all of it, in a run that is not a smoke run."""
    ratios = summary.get("ratios") or {}
    speed: dict[str, Any] = {}
    for flow in summary.get("reference", {}).get("flows", {}):
        target = SPEED_TARGETS.get(flow, SPEED_TARGETS["baseline"])
        r = ratios.get(flow)
        speed[flow] = {"target": target, "default": None, "same_step": None}
        if r:
            best = r["best_speedup"]
            speed[flow].update(default=r["speedup"] >= target,
                               same_step=None if best is None else best >= target)  # fmt: skip
    measured = {c["flow"] for c in summary.get("table", {}).get("cells", [])
                if c.get("test_nelbo") is not None}  # fmt: skip
    row = measured >= set(FLOWS)
    met = speed.keys() >= set(FLOWS) and all(v["same_step"] for v in speed.values()) and row
    return {"speed": speed, "table_row": row, "met": met and not summary.get("smoke")}


def render_bench(summary: Mapping[str, Any]) -> str:
    """``bench.md``: the benchmark's table of vaeflow's variants, then the reference's times
    and the speed-ups."""
    env = {k: str(v) for k, v in summary.get("environment", {}).items()}
    env = {k: v for k, v in env.items() if k not in Result.__dataclass_fields__}
    with tempfile.TemporaryDirectory() as tmp:
        md, _ = write_report(_bench_results(summary), env, tmp, "bench", summary["command"])
        lines = Path(md).read_text().splitlines()
    smoke = " (SMOKE, CPU)" if summary["smoke"] else ""
    lines[0] = f"# GPU run: training step of every flow{smoke}"
    ref = summary.get("reference", {})
    lines += ["", "## The reference code on the same device", ""]
    if "skipped" in ref:
        lines.append(f"Skipped: {ref['skipped']}.")
    elif not ref:
        stage = summary["stages"].get("reference")
        lines.append(f"Not run: {stage.get('error', '')}" if stage else "Not run (--stages).")
    else:
        lines += [ref["note"] + ".", "",
                  "| flow | reference args | s/iter | batches | NFE fwd | NFE bwd | status |",
                  "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for flow, r in ref["flows"].items():
            args = " ".join(a for a in r["args"] if not a.startswith(("/", "--out_dir")))
            lines.append(
                f"| {flow} | `{args}` | {_fmt(r.get('s_per_iter'), 4)} | {_fmt(r.get('iters'))} "
                f"| {_fmt(r.get('nfe_forward'), 1)} | {_fmt(r.get('nfe_backward'), 1)} "
                f"| {r['status']} {r.get('error', '')} |"
            )
    lines += _graph_check(summary)
    ratios = summary.get("ratios") or {}
    if ratios:
        same = "SMOKE: other sizes, NOT comparable" if summary["smoke"] else "same device and model"
        lines += ["", f"## vaeflow against the reference ({same})", "",
                  "vaeflow's default step, and the fastest variant of the same step (same "
                  "model, solver, estimator and gradient; `Variant.same_step`).", "",
                  "| flow | reference ms/iter | vaeflow ms/step | speed-up | fastest same step "
                  "| its ms/step | its speed-up |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for flow, r in ratios.items():
            best = "" if r["best_speedup"] is None else f"{r['best_speedup']:.2f}x"
            lines.append(f"| {flow} | {r['reference_ms']:.1f} | {r['vaeflow_ms']:.1f} "
                         f"| {r['speedup']:.2f}x | {_fmt(r['best_variant'])} "
                         f"| {_fmt(r['best_ms'], 1)} | {best} |")  # fmt: skip
    lines += _targets(summary)
    return "\n".join(lines) + "\n"


def _targets(summary: Mapping[str, Any]) -> list[str]:
    got = summary.get("targets")
    if not got:
        return []
    mark = {True: "met", False: "NOT met", None: "not measured"}
    lines = ["", "## Targets", "",
             f"FFJORD {SPEED_TARGETS['ffjord']:g}x and every other flow "
             f"{SPEED_TARGETS['baseline']:g}x faster than the reference's step on the same GPU; "
             "a test NELBO in every cell of the table row.", "",
             "| flow | target | default step | fastest same step |",
             "|---|---:|---|---|"]  # fmt: skip
    for flow, v in got["speed"].items():
        lines.append(f"| {flow} | {v['target']:g}x | {mark[v['default']]} "
                     f"| {mark[v['same_step']]} |")  # fmt: skip
    smoke = " (a smoke run counts for nothing)" if summary.get("smoke") else ""
    lines += ["", f"Table row: {mark[got['table_row']]}. All targets: {mark[got['met']]}{smoke}."]
    return lines


def _graph_check(summary: Mapping[str, Any]) -> list[str]:
    """The eager and CUDA-graphed runs of the same ``vaeflow train`` command, side by side."""
    graph = summary.get("graph")
    stage = summary["stages"].get("graph")
    lines = ["", "## The training loop in one CUDA graph (`--set cuda_graph=true`)", ""]
    if not graph:
        return lines + [f"Not run: {stage.get('error', '')}" if stage else "Not run (--stages)."]
    lines += [f"The same fixed-step FFJORD run, {graph['steps']} steps, same seed, eager and "
              "graphed (the random streams are the same: only the order of floating-point "
              "operations can separate them).", "",
              "| loop | train s | last train loss | test NELBO | exit | note |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for mode in ("eager", "graph"):
        r = graph.get(mode, {})
        note = "fell back to eager: see the log" if r.get("fallback") else ""
        code = "killed at its limit" if r and r.get("returncode") is None else r.get("returncode")
        lines.append(f"| {mode} | {_fmt(r.get('train_seconds'))} | {_fmt(r.get('train_loss'), 3)} "
                     f"| {_fmt(r.get('test_nelbo'), 3)} | {_fmt(code)} | {note} |")
    if "speedup" in graph:
        lines += ["", f"Speed-up of the graphed loop: {graph['speedup']:.2f}x; test NELBO "
                      f"difference (graph - eager): {_fmt(graph.get('nelbo_difference'), 4)} nats."]
    if stage and stage.get("status") != "ok":
        lines += ["", f"Stage status: {stage.get('status')}: {stage.get('error', '')}"]
    return lines


def render_table(summary: Mapping[str, Any]) -> str:
    """``table.md``: one row of the paper's table, ours beside the paper's, with the budget."""
    table = summary.get("table")
    smoke = " (SMOKE: NOT comparable)" if summary["smoke"] else ""
    head = [f"# GPU run: one row of the table{smoke}",
            "", f"- device: {summary.get('device')}", f"- commit: {summary['commit']}",
            f"- command: `{summary['command']}`"]  # fmt: skip
    if not table:
        error = summary["stages"].get("table", {}).get("error", "not run")
        return "\n".join([*head, "", f"Not run: {error}"]) + "\n"
    minutes = table["cell_minutes"]
    budget = "5 steps (smoke)" if minutes is None else f"{minutes:.2f} min"
    head += [f"- data set: {table['dataset']}; one seed; all cells at once on the one device",
             f"- per-cell budget: {budget} of training and validation (then the best model is "
             "evaluated)",
             f"- cell settings: `{' '.join(table['sets'])}`",
             "- test NELBO in nats, FFJORD with the exact trace; the paper's is Table 3 of the "
             "FFJORD paper (days of training per cell: far beyond this budget)"]  # fmt: skip
    rows = ["", "| flow | paper | ours | budget | epochs | steps | NFE fwd | NFE bwd "
            "| train s | status |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for c in table["cells"]:
        rows.append(
            f"| {c['flow']} | {_fmt(c.get('paper_nelbo'))} | {_fmt(c.get('test_nelbo'))} "
            f"| {c.get('budget', '')} | {_fmt(c.get('epochs'))} | {_fmt(c.get('steps'))} "
            f"| {_fmt(c.get('train_nfe_forward_mean'), 1)} "
            f"| {_fmt(c.get('train_nfe_backward_mean'), 1)} | {_fmt(c.get('train_seconds'), 0)} "
            f"| {c['status']} |"
        )
    return "\n".join(head + rows) + "\n"
