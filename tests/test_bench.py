"""The benchmark (experiments/bench*.py): the paper model per flow, the CPU smoke mode end to
end (a well-formed table and CSV with positive timings and NFE), several runs at once, and clear
errors for bad options."""

from __future__ import annotations

import csv
import inspect

import bench
import bench_timing
import bench_variants
import pytest
import torch

from vaeflow import provenance
from vaeflow.flows import FLOWS
from vaeflow.graphs import graph_unavailable

FAST = ["--smoke", "--commit", "test", "--iters", "2", "--warmup", "1", "--batch-size", "10"]


def test_paper_ffjord_is_the_papers_model() -> None:
    """Two blocks whose amortization heads are Linear(256, 272448): 145.5 M parameters in
    all, as in the paper's code (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = bench_variants.build_model("ffjord", "paper")
    heads = [block.head.linear for block in model.flow.blocks]
    assert [(h.in_features, h.out_features) for h in heads] == [(256, 272448)] * 2
    assert sum(p.numel() for p in model.parameters()) == 145_473_121
    assert type(model.encoder).__name__ == "GatedConvEncoder"
    assert (model.latent_dim, model.context_dim) == (64, 256)
    flow = model.flow
    assert flow.config["hidden_dims"] == (1024, 1024) and flow.config["rank"] == 64
    assert (flow.solver.method, flow.solver.atol, flow.solver.rtol) == ("dopri5", 1e-5, 1e-5)


@pytest.mark.parametrize("flow", ["planar", "iaf", "orthogonal", "householder", "triangular"])
def test_paper_settings_are_the_flow_defaults(flow: str) -> None:
    """The baselines' paper settings are what ``FLOWS[name]()`` builds by default, but for the
    IAF's masks: the paper's code's layout needs a width that is a multiple of the latent size,
    so the class keeps the textbook MADE for any width (README, "Flows and their
    hyperparameters")."""
    settings = dict(bench_variants.model_config(flow, "paper").flow_kwargs)
    defaults = inspect.signature(FLOWS[flow].__init__).parameters
    if flow == "iaf":
        assert settings.pop("masks") == "reference" and defaults["masks"].default == "cycled"
    assert settings and all(defaults[k].default == v for k, v in settings.items())


@pytest.mark.slow
def test_smoke_run_writes_table_and_csv(tmp_path, capsys) -> None:
    variants = ["none", "planar", "ffjord", "ffjord-rk4", "ffjord-reference-emulation"]
    status = bench.main([*FAST, "--out-dir", str(tmp_path), "--variants", *variants])
    assert status == 0
    md, table = tmp_path / "cpu-smoke.md", tmp_path / "cpu-smoke.csv"
    assert f"wrote {md}" in capsys.readouterr().out
    header = table.read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header))
    rows = list(csv.DictReader(table.open()))
    assert [r["variant"] for r in rows] == variants
    for r in rows:
        assert float(r["ms_median"]) > 0 and float(r["steps_per_s"]) > 0
        assert float(r["ms_q25"]) <= float(r["ms_median"]) <= float(r["ms_q75"])
        assert r["device"] == "cpu" and r["device_name"].startswith("CPU: ")
        assert r["commit"] == "test"
        assert r["peak_mem_mib"] == ""  # GPU memory only
        assert r["size"] == "small" and r["batch_size"] == "10" and r["iters"] == "2"
    by_name = {r["variant"]: r for r in rows}
    assert by_name["planar"]["nfe_forward"] == ""
    assert float(by_name["ffjord"]["nfe_forward"]) > 0
    assert float(by_name["ffjord"]["nfe_backward"]) == 0  # direct backprop
    assert float(by_name["ffjord-reference-emulation"]["nfe_backward"]) > 0  # adjoint
    assert float(by_name["ffjord-rk4"]["nfe_forward"]) == 2 * 4 * 4  # blocks x steps x stages
    assert int(by_name["ffjord"]["ops_per_step"]) > int(by_name["none"]["ops_per_step"]) > 0
    # dopri5 reads its error estimate on the host at every step; the fixed-step loop does not
    reads = {k: int(r["host_reads_per_step"]) for k, r in by_name.items()}
    assert reads["ffjord"] > reads["ffjord-rk4"] + 2 * 4
    assert reads["ffjord-reference-emulation"] > reads["ffjord"]
    text = md.read_text()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    width = lines[header].count("|")
    body = lines[header + 2 : header + 2 + len(variants)]
    assert all(line.count("|") == width for line in body)
    assert "- device_name: CPU: " in text and "- torch: " in text and "- commit: test" in text
    assert "EMULATION" in text and "over `ffjord-reference-emulation`" in text


def test_rounds_pool_the_steps_of_each_variant(tmp_path) -> None:
    argv = [*FAST, "--out-dir", str(tmp_path), "--rounds", "2", "--variants", "none", "planar"]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "cpu-smoke.csv").open()))
    assert [(r["variant"], r["iters"]) for r in rows] == [("none", "4"), ("planar", "4")]


def test_cuda_only_variants_are_skipped_on_cpu() -> None:
    result = bench_timing.bench_variant("ffjord-rk4-cudagraph", "small", "cpu", iters=1, warmup=0)
    assert result.ms_median is None and result.note == "skipped: needs CUDA (CUDA graphs)"


def test_every_baseline_has_a_graphed_variant_that_a_graph_can_hold() -> None:
    # Each "-cudagraph" variant must build a model whose step a graph can hold (the flows' own
    # graph_blocker answers), or the GPU run would time a variant that can only be skipped.
    cuda = torch.device("cuda")  # only named: nothing runs on it
    from gpu_bench import DEFAULT_VARIANTS  # and the GPU run times every one of them

    assert {f"{name}-cudagraph" for name in bench_variants.BASELINES} <= set(DEFAULT_VARIANTS)
    for name in bench_variants.BASELINES:
        graphed = bench_variants.VARIANTS[f"{name}-cudagraph"]
        assert graphed.flow == name and graphed.cuda_graph and graphed.same_step
        with torch.device("meta"):
            default = bench_variants.build_model(name, "small")
            model = bench_variants.build_model(graphed, "small")
        assert graph_unavailable(model, cuda) is None, name
        # only the orthogonal flow needs an option for it (the same Q, tested in test_flows)
        assert (graph_unavailable(default, cuda) is None) == (name != "orthogonal"), name
    # same_step: the default step computed another way; never another solver or estimator
    same = {n for n, v in bench_variants.VARIANTS.items() if v.flow == "ffjord" and v.same_step}
    assert same == {"ffjord", "ffjord-fused", "ffjord-compiled", "ffjord-compiled-cudagraphs"}


def test_a_graphed_variant_is_checked_against_eager_steps_of_a_twin(monkeypatch, tmp_path):
    # CUDA graphs need a GPU: on the CPU an eager stand-in takes the graph's place, so that
    # what the GPU run relies on is tested here: the twin from the same seed and random state,
    # the comparison, the report. A stand-in that is not the eager step shows a gap.
    class Replay:
        def __init__(self, step, model, optimizer, x) -> None:
            self.step, self.model = step, model

        def __call__(self, x, beta=1.0, copy=True):
            return self.step(x * self.scale, beta)

    monkeypatch.setattr(bench_timing, "check_runnable", lambda variant, device: None)
    monkeypatch.setattr(bench_timing, "GraphedStep", Replay)
    plain = bench_timing.make_optimizer  # Adamax's capturable form is for devices with graphs
    monkeypatch.setattr(bench_timing, "make_optimizer", lambda c, m, capturable: plain(c, m))
    gaps = {}
    for scale in (1.0, 0.0):  # the step itself, then a step on blank images
        Replay.scale = scale
        result = bench_timing.bench_variant("planar-cudagraph", "small", "cpu", 2, 0, 10)
        gaps[scale] = result.graph_loss_gap
    assert gaps[1.0] == 0.0 and gaps[0.0] > 1.0
    # the orthogonal flow's device test with its lower cap is the default step (host test)
    Replay.scale = 1.0
    result = bench_timing.bench_variant("orthogonal-cudagraph", "small", "cpu", 2, 0, 10)
    assert result.graph_loss_gap == 0.0
    md, _ = bench.write_report([result], {}, tmp_path, "t")
    assert "graphed - eager loss, first steps: at most" in md.read_text()

    # a compiled field's twin is the same fused field, uncompiled (no second compilation)
    def built(variant, size, seed):
        raise LookupError(variant.overrides)

    monkeypatch.setattr(bench_timing, "build_model", built)
    compiled = bench_variants.VARIANTS["ffjord-rk4-compiled-cudagraph"]
    with pytest.raises(LookupError) as twin:
        bench_timing._eager_losses(compiled, "small", 0, torch.device("cpu"), torch.zeros(1))
    assert twin.value.args[0] == {**compiled.overrides, "compile": False, "fused": True}
    # the graphed orthogonal step (device test, lower cap) is checked against the default step
    orthogonal = bench_variants.VARIANTS["orthogonal-cudagraph"]
    assert orthogonal.overrides == {"ortho_check": "device", "max_ortho_iters": 30}
    with pytest.raises(LookupError) as twin:
        bench_timing._eager_losses(orthogonal, "small", 0, torch.device("cpu"), torch.zeros(1))
    assert twin.value.args[0] == {}


@pytest.mark.slow
def test_parallel_runs_report_aggregate_throughput() -> None:
    p = bench_timing.run_parallel(
        "none", 2, "small", "cpu", iters=2, warmup=0, batch_size=10, threads=1
    )
    assert p["processes"] == 2 and p["aggregate"] > 0 and p["single"] > 0
    assert p["speedup"] == pytest.approx(p["aggregate"] / p["single"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "ffjord-turbo"], "unknown variant 'ffjord-turbo'; valid variants are"),
        (["--flows", "glow"], "unknown flow"),
        (["--iters", "0"], "--iters must be at least 1"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--parallel", "0"], "--parallel must be positive"),
        (["--rounds", "0"], "--rounds must be positive"),
        (["--parallel", "2", "--variants", "ffjord-reference-emulation"], "not one"),
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--device", "cpu", "--variants", "ffjord-rk4-cudagraph"], "cannot run on cpu"),
    ],
)
def test_bad_options_are_clear_errors(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--out-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "CUDA is not available" in capsys.readouterr().err


def test_paper_model_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        bench_variants.model_config("planar", "huge")
    with pytest.raises(ValueError, match="unknown flow 'glow'"):
        bench_variants.model_config("glow")


def test_git_commit_reports_dirty_and_falls_back(monkeypatch) -> None:
    """The commit lookup, with git itself replaced (the test never runs git)."""
    import subprocess

    class Done:
        def __init__(self, stdout: str) -> None:
            self.stdout = stdout

    answers = {"rev-parse": "abc1234\n", "status": " M experiments/bench.py\n"}

    def fake_run(cmd, **kwargs):
        return Done(next(v for k, v in answers.items() if k in cmd))

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert provenance.git_commit() == "abc1234+dirty"
    answers["status"] = ""
    assert provenance.git_commit() == "abc1234"

    def no_git(cmd, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_commit() == "unknown"
