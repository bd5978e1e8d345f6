"""The GPU run's CPU rehearsal: ``experiments/gpu_run.py --smoke`` runs every stage at tiny
sizes and writes its few files; a variant that raises and one that hangs are recorded with
their errors while the run goes on; the reference stage is skipped (with the reason) only
where its dependencies or its code are missing."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from bench_report import Result
from bench_variants import BASELINES, VARIANTS
from gpu_guard import Deadline, LineWorker, StageTimeout, stream_lines
from gpu_reference import missing_dependencies, parse_times
from gpu_report import render_bench, speedups, targets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.mark.slow
def test_smoke_run_writes_every_file_and_survives_failures(tmp_path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    reference = SHARED / "reference"
    cmd = [
        sys.executable, str(REPO / "experiments" / "gpu_run.py"), str(out), "--smoke",
        "--minutes", "5", "--work", str(work), "--data-dir", str(SHARED / "data"),
        "--reference", str(reference), "--reference-flows", "none", "--reference-iters", "2",
        "--variants", "none", "planar", "iaf", "ffjord-rk4", "ffjord-rk4-cudagraph",
        "--fault", "planar=raise", "--fault", "iaf=hang", "--variant-timeout", "8",
        "--table-flows", "none", "ffjord",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.md", "logs.tar.gz", "nelbo_vs_time.png", "summary.json", "table.md"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["environment"]["cuda_available"] in (True, False)
    assert summary["commit"] and summary["device"].startswith("CPU")
    variants = {r["variant"]: r for r in summary["bench"]["variants"]}
    assert variants["planar"]["status"] == "failed"
    assert "injected fault in planar" in variants["planar"]["error"]
    assert variants["iaf"]["status"] == "timeout"
    assert variants["ffjord-rk4-cudagraph"]["status"] == "skipped"
    for name in ("none", "ffjord-rk4"):  # before and after the failures: the run went on
        assert variants[name]["status"] == "ok" and variants[name]["result"]["ms_median"] > 0
    assert variants["ffjord-rk4"]["result"]["nfe_forward"] == 2 * 4 * 4

    stages = summary["stages"]
    if missing_dependencies() or not (reference / "refbench.py").is_file():
        assert stages["reference"]["status"] in ("skipped", "failed")
    else:
        ref = summary["reference"]["flows"]["none"]
        assert stages["reference"]["status"] == "ok", stages["reference"]
        assert ref["status"] == "ok" and ref["s_per_iter"] > 0, ref
        assert summary["ratios"]["none"]["speedup"] > 0

    graph = summary["graph"]  # eager and graphed training ran (on a CPU the graph falls back)
    assert stages["graph"]["status"] == "ok", stages["graph"]
    assert graph["eager"]["test_nelbo"] > 0 and graph["graph"]["test_nelbo"] > 0
    assert graph["graph"]["fallback"] == (not summary["environment"]["cuda_available"])
    # on a CPU both loops are eager: same seed, same steps, the same losses exactly
    if graph["graph"]["fallback"]:
        assert graph["eager"]["train_loss"] == graph["graph"]["train_loss"] is not None
        assert graph["nelbo_difference"] == 0

    cells = {c["flow"]: c for c in summary["table"]["cells"]}
    assert stages["table"]["status"] == "ok", stages["table"]
    for flow in ("none", "ffjord"):
        assert cells[flow]["status"] == "ok" and cells[flow]["steps"] == 5
        assert cells[flow]["test_nelbo"] > 0 and cells[flow]["paper_nelbo"] > 80
    assert cells["ffjord"]["train_nfe_forward_mean"] > 0

    bench_md, table_md = (out / "bench.md").read_text(), (out / "table.md").read_text()
    assert "injected fault in planar" in bench_md and "timeout" in bench_md
    assert "## The training loop in one CUDA graph" in bench_md and "| graph |" in bench_md
    assert summary["targets"]["met"] is False and "a smoke run counts for nothing" in bench_md
    assert "| ffjord | 82.82 |" in table_md and "SMOKE" in table_md
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/bench.log" in names and "logs/table.log" in names
    assert not [n for n in names if n.endswith((".pt", ".amat"))]


def test_speedups_take_the_default_and_the_fastest_same_step() -> None:
    def record(variant: str, ms: float | None, status: str = "ok", **more) -> dict:
        flow = VARIANTS[variant].flow
        result = Result(variant, flow, "paper", "cuda", 100, 30, 5, ms_median=ms, **more)
        fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "samples"}
        return {"variant": variant, "status": status, "result": fields if ms else None}

    summary = {
        "smoke": False, "command": "test", "stages": {},
        "bench": {"variants": [
            record("ffjord", 200.0), record("ffjord-rk4", 20.0),  # another solver: never best
            record("ffjord-compiled", 80.0), record("ffjord-adjoint", 50.0),
            record("planar", 9.0), record("planar-cudagraph", 3.0, graph_loss_gap=0.0),
            record("iaf", 12.0), record("iaf-cudagraph", None, "timeout"),
            # a graph whose replays were not the eager steps, a NaN loss: neither counts
            record("householder", 10.0), record("householder-cudagraph", 2.0, graph_loss_gap=3.0),
            record("triangular", 10.0, final_loss=7.0),
            record("triangular-cudagraph", 2.0, graph_loss_gap=0.0, final_loss=math.nan),
        ]},
        "reference": {"note": "n", "flows": {
            f: {"args": [], "status": "ok", "s_per_iter": s}
            for f, s in (("ffjord", 4.0), ("planar", 0.018), ("iaf", 0.024), ("none", 0.01),
                         ("householder", 0.02), ("triangular", 0.02))
        }},
    }  # fmt: skip
    ratios = speedups(summary)
    assert set(ratios) == {"ffjord", "planar", "iaf", "householder", "triangular"}  # not "none"
    assert ratios["householder"]["best_variant"] == "householder"
    assert ratios["triangular"]["best_variant"] == "triangular"
    assert ratios["ffjord"]["speedup"] == pytest.approx(20.0)
    assert (ratios["ffjord"]["best_variant"], ratios["ffjord"]["best_speedup"]) == (
        "ffjord-compiled", pytest.approx(50.0))
    assert ratios["planar"]["speedup"] == pytest.approx(2.0)
    assert ratios["planar"]["best_variant"] == "planar-cudagraph"
    assert ratios["planar"]["best_speedup"] == pytest.approx(6.0)
    assert (ratios["iaf"]["best_variant"], ratios["iaf"]["best_speedup"]) == ("iaf", 2.0)
    summary["ratios"] = ratios
    summary["targets"] = got = targets(summary)
    assert "| planar | 18.0 | 9.0 | 2.00x | planar-cudagraph | 3.0 | 6.00x |" in render_bench(
        summary)
    assert got["speed"]["ffjord"] == {"target": 10.0, "default": True, "same_step": True}
    assert got["speed"]["planar"] == {"target": 3.0, "default": False, "same_step": True}
    assert got["speed"]["iaf"] == {"target": 3.0, "default": False, "same_step": False}
    assert got["speed"]["none"] == {"target": 3.0, "default": None, "same_step": None}
    assert not got["table_row"] and not got["met"]
    assert "| planar | 3x | NOT met | met |" in render_bench(summary)
    # every flow fast enough and a whole row: met (a smoke run never is)
    flows = [*BASELINES, "ffjord"]
    summary["ratios"] = {f: {"speedup": 30.0, "best_speedup": 30.0} for f in flows}
    summary["reference"]["flows"] = {f: {} for f in flows}
    summary["table"] = {"cells": [{"flow": f, "test_nelbo": 90.0} for f in flows]}
    assert targets(summary)["met"] and targets(summary)["table_row"]
    summary["table"]["cells"][-1]["test_nelbo"] = None  # the FFJORD cell did not finish
    assert not targets(summary)["table_row"] and not targets(summary)["met"]
    summary["table"]["cells"][-1]["test_nelbo"] = 90.0
    assert not targets({**summary, "smoke": True})["met"]
    # a default step whose loss is NaN, and nothing else timed: its speed-up, but no same step
    summary["bench"]["variants"] = [record("planar", 9.0, final_loss=math.nan)]
    summary["reference"]["flows"] = {"planar": {"args": [], "status": "ok", "s_per_iter": 0.018}}
    summary["ratios"] = ratios = speedups(summary)
    assert ratios["planar"]["speedup"] == pytest.approx(2.0)
    assert ratios["planar"]["best_variant"] is ratios["planar"]["best_speedup"] is None
    assert targets(summary)["speed"]["planar"]["same_step"] is None
    assert "| planar | 18.0 | 9.0 | 2.00x |  |  |  |" in render_bench(summary)


def test_stream_lines_keeps_what_came_before_a_timeout(tmp_path) -> None:
    code = "import time; print('| Time 0.5 |', flush=True); time.sleep(60)"
    done = stream_lines([sys.executable, "-c", code], 3, tmp_path / "log")
    assert done.timed_out and done.returncode is None and done.seconds < 30
    assert parse_times(done.lines)["s_per_iter"] == 0.5
    assert "killed after its time limit" in (tmp_path / "log").read_text()


def test_stream_lines_waits_for_the_exit_status_after_the_output_ends(tmp_path) -> None:
    # Output closed, then a second of teardown (as interpreter and CUDA shutdown take) before
    # the exit: that is a finished process with its status, not one to kill.
    code = ("import os, sys, time; print('done', flush=True); os.close(1); os.close(2); "
            "time.sleep(1); sys.exit(3)")  # fmt: skip
    done = stream_lines([sys.executable, "-c", code], 30, tmp_path / "log")
    assert (done.lines, done.returncode, done.timed_out) == (["done"], 3, False)
    code = "import os, time; os.close(1); os.close(2); time.sleep(60)"
    done = stream_lines([sys.executable, "-c", code], 3, tmp_path / "log2")
    assert done.timed_out and done.returncode is None and done.seconds < 30


def test_line_worker_times_out_and_reports_death(tmp_path) -> None:
    hang = LineWorker([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a")
    with pytest.raises(StageTimeout, match="time limit of 1 s"):
        hang.request({"x": 1}, timeout=1)
    dead = LineWorker([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "b")
    with pytest.raises(RuntimeError, match="status 3"):
        dead.answer(timeout=20)
    assert Deadline(5).sub(100).left() <= 5


def test_device_auto_is_resolved_before_the_environment_is_recorded(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The prepared GPU call passes no --device: "auto" went to torch.device() in the
    # environment stage, which failed, and the run then fell back to the CPU.
    import gpu_run
    import torch

    def run(monkeypatch_cuda: bool, name: str) -> tuple[gpu_run.GpuRun, list[str]]:
        argv = [str(tmp_path / name / "out"), "--stages", "bench", "--minutes", "1",
                "--work", str(tmp_path / name / "work"), "--data-dir", str(tmp_path / "none")]
        benched: list[str] = []
        monkeypatch.setattr(gpu_run.GpuRun, "bench", lambda self: benched.append(self.device))
        monkeypatch.setattr(gpu_run.GpuRun, "plot", lambda self: None)
        if monkeypatch_cuda:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        runner = gpu_run.GpuRun(gpu_run._parser().parse_args(argv), argv)
        assert runner.run() == 0
        return runner, benched

    runner, benched = run(False, "here")
    assert runner.stages["environment"]["status"] == "ok", runner.stages["environment"]
    assert runner.summary["environment"]["cuda_available"] is torch.cuda.is_available()
    assert benched == ["cuda" if torch.cuda.is_available() else "cpu"]

    seen: list[str] = []

    def environment(device: str) -> dict:
        seen.append(device)
        return {"cuda_available": True, "gpu": "a GPU"}

    monkeypatch.setattr(gpu_run, "_environment", environment)
    runner, benched = run(True, "gpu")  # as on the GPU machine
    assert seen == ["cuda"] and benched == ["cuda"] and runner.summary["device"] == "a GPU"


def test_a_bench_worker_restarts_after_a_capture_left_its_stream_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a GPU a failed capture in a cudagraph variant leaves torch.cuda.graph's capture stream
    # current: the worker must be replaced, though the device still synchronises.
    import io

    import bench_timing
    import gpu_bench
    import torch

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    sent: list[dict] = []
    streams = {"current": "capture stream", "default": "default stream"}
    monkeypatch.setattr(bench_timing, "bench_variant", fails)
    monkeypatch.setattr(gpu_bench, "send", sent.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams["current"])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: streams["default"])
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: real_randn(*a, **k))
    request = json.dumps({"variant": "none-cudagraph", "size": "small"}) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(request))
    assert gpu_bench._serve() == 0
    assert sent[0] == {"ready": True}
    assert sent[1]["status"] == "failed" and sent[1]["restart"] is True
    streams["current"] = "default stream"  # the same failure, the stream put back: no restart
    sent.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO(request))
    assert gpu_bench._serve() == 0 and sent[1]["restart"] is False


def test_the_table_row_comes_before_the_graph_check_and_gets_the_larger_share(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The issue's targets rest on the speed ratios and a whole table row: in the prepared
    # 8-minute call the table runs before the graph check, and the graph check, given too
    # little time for its two runs, says so (and how to run it alone) instead of starting them.
    import gpu_run

    got: dict[str, float] = {}

    def stage(name: str):
        def use_its_time(self: gpu_run.GpuRun) -> None:
            seconds = self.stage_deadline(name).left()
            got[name] = seconds
            self.deadline.end -= seconds  # as if the stage had used all of its share

        return use_its_time

    for name in ("bench", "reference", "table"):
        monkeypatch.setattr(gpu_run.GpuRun, name, stage(name))
    real_graph = gpu_run.GpuRun.graph

    def graph(self: gpu_run.GpuRun) -> None:
        got["graph"] = self.deadline.left()
        real_graph(self)

    monkeypatch.setattr(gpu_run.GpuRun, "graph", graph)
    monkeypatch.setattr(gpu_run.GpuRun, "data", lambda self: setattr(self, "npz", tmp_path))
    monkeypatch.setattr(gpu_run.GpuRun, "plot", lambda self: None)
    monkeypatch.setattr(gpu_run, "_environment", lambda device: {"cuda_available": True})
    monkeypatch.setattr(gpu_run, "missing_dependencies", lambda: [])
    argv = [str(tmp_path / "out"), "--minutes", "8", "--device", "cpu",
            "--work", str(tmp_path / "work")]
    runner = gpu_run.GpuRun(gpu_run._parser().parse_args(argv), argv)
    assert runner.run() == 0
    assert list(got) == ["bench", "reference", "table", "graph"]
    assert got["table"] > max(got["bench"], got["reference"]) and got["table"] > 180
    graph = runner.stages["graph"]
    assert graph["status"] == "failed" and "--stages graph" in graph["error"]
    assert not (tmp_path / "work" / "graph").exists()  # no run was started


def test_a_non_finite_loss_does_not_cost_the_summary(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A variant whose loss diverged on the GPU comes back from its worker as NaN (the bench
    # notes it, "non-finite loss"); summary.json is strict JSON, and writing it failed, so the
    # window's main result was lost while bench.md told of the NaN.
    import gpu_run

    def bench(self: gpu_run.GpuRun) -> None:
        result = {"variant": "ffjord-rk4-cudagraph", "final_loss": math.nan,
                  "graph_loss_gap": math.inf, "note": "non-finite loss"}
        self.summary["bench"] = {"variants": [{"variant": "ffjord-rk4-cudagraph",
                                               "status": "ok", "result": None, "error": ""}],
                                 "raw": [result, -math.inf]}

    monkeypatch.setattr(gpu_run.GpuRun, "bench", bench)
    monkeypatch.setattr(gpu_run.GpuRun, "plot", lambda self: None)
    monkeypatch.setattr(gpu_run, "_environment", lambda device: {"cuda_available": True})
    argv = [str(tmp_path / "out"), "--stages", "bench", "--minutes", "1", "--device", "cpu",
            "--work", str(tmp_path / "work"), "--data-dir", str(tmp_path / "none")]
    runner = gpu_run.GpuRun(gpu_run._parser().parse_args(argv), argv)
    assert runner.run() == 0
    assert runner.stages["report"]["status"] == "ok", runner.stages["report"]

    def strict(name: str) -> None:
        raise ValueError(f"{name} in summary.json")

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=strict)
    assert summary["bench"]["raw"] == [
        {"variant": "ffjord-rk4-cudagraph", "final_loss": "NaN", "graph_loss_gap": "Infinity",
         "note": "non-finite loss"}, "-Infinity"]
    assert summary["stages"]["bench"]["status"] == "ok"
