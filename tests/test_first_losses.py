"""``experiments/first_losses.py``: the reference's per-batch log lines are parsed, and a smoke
run trains both codes for a few batches and reports both curves side by side (skipped where
the reference code, its dependencies or the MNIST file are not at hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from first_losses import parse_reference_terms, summarise
from gpu_reference import missing_dependencies

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def needs_reference(part: str) -> pytest.MarkDecorator:
    """Skip unless ``part`` of ../shared/reference, the reference's dependencies and the
    static-MNIST file are at hand."""
    return pytest.mark.skipif(
        bool(missing_dependencies())
        or not (SHARED / "reference" / part).exists()
        or not (SHARED / "data" / "binarized_mnist.npz").is_file(),
        reason=f"needs ../shared/reference/{part}, its dependencies and "
        "../shared/data/binarized_mnist.npz",
    )


def test_the_reference_log_lines_are_parsed() -> None:
    lines = [
        "INFO beta = 0.0100",
        "Epoch   1 [  100/50000 ( 0%)] | Time 1.234 | Loss  543.123456 | Rec  542.000000 | "
        "KL    112.345678",
        "Epoch   1 [  200/50000 ( 0%)] | Time 1.111 | Loss  530.5 | Rec  529.25 | KL    125.0"
        " | NFE Forward 26 | NFE Backward 32",
    ]
    assert parse_reference_terms(lines) == {
        "loss": [543.123456, 530.5], "recon": [542.0, 529.25], "kl": [112.345678, 125.0],
    }  # fmt: skip


def test_the_summary_compares_means_over_seeds() -> None:
    runs = [
        {"side": "reference", "flow": "none", "seed": 1, "loss": [10.0, 8.0], "recon": [9.0, 7.0],
         "kl": [1.0, 1.0]},
        {"side": "reference", "flow": "none", "seed": 2, "loss": [12.0, 6.0], "recon": [11.0, 5.0],
         "kl": [1.0, 1.0]},
        {"side": "vaeflow", "flow": "none", "seed": 1, "loss": [11.0, 7.0], "recon": [10.0, 6.0],
         "kl": [1.0, 1.0]},
    ]  # fmt: skip
    rows = {(r["term"], r["window"]): r for r in summarise(runs, ["none"], 2)}
    first = rows[("loss", "step 1")]
    assert first["reference"] == {"mean": 11.0, "min": 10.0, "max": 12.0}
    assert first["vaeflow"]["mean"] == 11.0 and first["gap"] == 0.0
    last = rows[("loss", "steps 1-2")]
    assert last["reference"]["mean"] == 9.0 and last["gap"] == 0.0


@needs_reference("refbench.py")
@pytest.mark.slow
def test_smoke_run_trains_both_codes_and_reports_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(REPO / "experiments" / "first_losses.py"), str(out), "--smoke",
        "--steps", "3", "--seeds", "1", "--flows", "planar", "--train-rows", "100",
        "--data-dir", str(SHARED / "data"), "--reference", str(SHARED / "reference"),
        "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "first-losses.json", "first-losses.md", "first-losses.png",
    ]  # fmt: skip
    summary = json.loads((out / "first-losses.json").read_text())
    for run in summary["runs"]:
        assert "error" not in run and len(run["loss"]) == 3, run
        # recon + beta * kl with the KL weight of epoch 1 of a 100-epoch warm-up
        loss, recon, kl = run["loss"][0], run["recon"][0], run["kl"][0]
        assert loss == pytest.approx(recon + 0.01 * kl, abs=1e-3), run
    report = (out / "first-losses.md").read_text()
    assert "SMOKE" in report and "| planar | kl | step 1 |" in report


def test_merge_reports_several_result_files_and_keeps_each_commit(tmp_path: Path) -> None:
    from first_losses import main

    def result(commit: str, flow: str, loss: float) -> dict:
        runs = [{"side": side, "flow": flow, "seed": 1, "loss": [loss, loss], "recon": [loss] * 2,
                 "kl": [1.0, 3.0], "seconds": 1.0} for side in ("reference", "vaeflow")]
        return {"commit": commit, "date": "2026-12-01", "command": f"run {commit}", "runs": runs,
                "machine": "CPU", "args": {"train_rows": 100, "steps": 2, "ffjord": "small",
                                           "smoke": False}}  # fmt: skip

    files = []
    for i, (commit, flow, loss) in enumerate([("aaa", "none", 5.0), ("bbb", "iaf", 7.0),
                                              ("ccc", "iaf", 9.0)]):  # fmt: skip
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(result(commit, flow, loss)))
    assert main([str(tmp_path / "out"), "--merge", *map(str, files)]) == 0
    report = (tmp_path / "out" / "first-losses.md").read_text()
    assert "at commit `aaa`" in report and "at commit `ccc`" in report
    assert "`bbb`" not in report  # its iaf runs were replaced by the later file's
    assert "| iaf | loss | step 1 | 9.00 [9.00, 9.00] | 9.00 [9.00, 9.00] | +0.00 |" in report
    assert "| none | kl | peak | 3.00 [3.00, 3.00] |" in report
    # A merged file merges again with its parts: aaa's runs stay, ddd's replace ccc's.
    files.append(tmp_path / "3.json")
    files[-1].write_text(json.dumps(result("ddd", "iaf", 4.0)))
    assert main([str(tmp_path / "again"), "--merge", str(tmp_path / "out" / "first-losses.json"),
                 str(files[-1])]) == 0  # fmt: skip
    report = (tmp_path / "again" / "first-losses.md").read_text()
    assert "at commit `aaa`" in report and "at commit `ddd`" in report
    assert "`ccc`" not in report and "`bbb`" not in report
    assert "| iaf | loss | step 1 | 4.00 [4.00, 4.00] |" in report


@needs_reference("ffjord/vae_lib")
@pytest.mark.slow
def test_lockstep_with_the_reference_gives_the_same_losses() -> None:
    # Same weights, batches and noise: the papers' encoder, decoder, baseline flows, ELBO and
    # Adamax step agree with the reference's own code to rounding, step after step.
    flows = ["none", "planar", "iaf", "orthogonal", "householder", "triangular"]
    done = _lockstep("--steps", "3", "--batch-size", "20", "--every", "1", "--flow", *flows)
    sections = _sections(done.stdout)
    assert sections[::2] == flows
    for flow, text in zip(sections[::2], sections[1::2], strict=True):
        values = _table(text)
        assert [v[0] for v in values] == [1, 2, 3], flow
        for _, ref_loss, our_loss, ref_kl, our_kl in values:
            assert our_loss == pytest.approx(ref_loss, abs=1e-2), flow
            assert our_kl == pytest.approx(ref_kl, abs=1e-2), flow
        assert values[-1][1] < values[0][1], flow  # and they did train
        if flow != "none":  # the flow's log-determinant is in the KL
            assert values[0][3] != pytest.approx(_first_kl(sections), abs=1e-3), flow


def _lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    """``experiments/lockstep.py *args`` on ../shared's reference and data; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "lockstep.py"), *args,
         "--reference", str(SHARED / "reference"), "--data-dir", str(SHARED / "data")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _sections(out: str) -> list[str]:
    """lockstep.py's output as ``[flow, its table, flow, its table, ...]``."""
    import re

    return re.split(r"^flow (\w+)[^\n]*:$", out, flags=re.M)[1:]


def _table(text: str) -> list[list[float]]:
    """The rows of a lockstep table: step, reference loss, vaeflow loss, reference KL,
    vaeflow KL."""
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    return [[float(v) for v in row] for row in rows[1:]]  # after the header


def _first_kl(sections: list[str]) -> float:
    """The step-1 KL of the run without a flow (same weights of the shared VAE, same noise)."""
    text = sections[sections.index("none") + 1]
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    return float(row.split("|")[4])


@needs_reference("ffjord/vae_lib")
@pytest.mark.slow
def test_ffjord_with_the_reference_weights_is_the_reference_flow() -> None:
    import re

    done = _lockstep("--ffjord", "--dims", "16-16", "--rank", "2", "--blocks", "2")
    found = dict(re.findall(r"largest (\w+) difference: (\S+)", done.stdout))
    moved = float(re.search(r"moves z0 by (\S+) on average", done.stdout).group(1))
    assert moved > 0.01, done.stdout  # the flow does something
    assert float(found["z0"]) < 1e-9, done.stdout
    assert float(found["zK"]) < 1e-5 and float(found["logdet"]) < 1e-5, done.stdout


@needs_reference("ffjord/vae_lib")
@pytest.mark.slow
def test_ffjord_training_steps_follow_the_reference() -> None:
    # Hutchinson estimator with the same probes; the reference's gradients come from the
    # adjoint, vaeflow's through the solver: float64 and a tight tolerance make them agree.
    done = _lockstep("--flow", "ffjord", "--dims", "8-8", "--rank", "2", "--blocks", "2",
                     "--tol", "1e-8", "--steps", "2", "--batch-size", "4", "--every", "1")
    flow, text = _sections(done.stdout)
    assert flow == "ffjord"
    values = _table(text)
    assert [v[0] for v in values] == [1, 2]
    for _, ref_loss, our_loss, ref_kl, our_kl in values:
        assert our_loss == pytest.approx(ref_loss, abs=1e-3)
        assert our_kl == pytest.approx(ref_kl, abs=1e-3)
    assert values[1][1] != values[0][1]  # a step was taken


@needs_reference("ffjord/vae_lib")
@pytest.mark.slow
def test_every_parameter_starts_at_the_reference_codes_scale() -> None:
    # The locksteps copy the reference's weights, so they cannot see how either code draws
    # them: here each code initialises its own model, and every parameter's root mean square
    # must agree (the IAF's former nn.Linear start, 5x smaller heads, fails this).
    flows = ["none", "planar", "iaf", "ffjord"]
    done = _lockstep("--init", "2", "--flow", *flows, "--dims", "8-8", "--rank", "2")
    for flow in flows:
        assert f"init {flow}: " in done.stdout and "outside" in done.stdout
    assert done.stdout.count(" 0 outside") == len(flows), done.stdout
