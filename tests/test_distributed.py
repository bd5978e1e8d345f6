"""Data-parallel training on the CPU with gloo: DDP gradients against one process, ``torchrun``
runs against single-process runs, a rank killed and the run resumed, two "machines" on one
host, a missing data file downloaded once per machine. Every process is tiny (MLP nets, the
structured tiny MNIST) and runs one thread.

Run as a script (``torchrun ... tests/test_distributed.py --kill-rank R --kill-step K train
...``), this file is ``vaeflow`` with one rank SIGKILLed at its K-th training step; with
``--local-sources SERVER MARKER``, ``vaeflow`` downloading static MNIST from a local folder;
with ``--eval-probe R DIR``, rank R running in another folder and every rank naming its
importance samples; with ``--fail-solve-rank R``, rank R's evaluation failing its solve.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_SPLITS

import vaeflow.train as train_mod
from vaeflow import distributed
from vaeflow.checks import InputError
from vaeflow.cli import main
from vaeflow.data import load_dataset
from vaeflow.distributed import SINGLE, World, shard_bounds
from vaeflow.evaluate import dataset_log_likelihood, dataset_nelbo, evaluate_run
from vaeflow.rng import fork_rng
from vaeflow.runs import RunError

HERE = Path(__file__).resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "30"}


def cli_args(data_dir: Path, flow: str, *extra: str) -> list[str]:
    """``vaeflow train`` options of a seconds-long run (test_cli's tiny options, 10 epochs'
    worth of batches of 21 rows: 9 of 21 and one of 11, so the shards are unequal)."""
    field = ["--flow-opt", "hidden_dims=[8]", "--flow-opt", "rank=2", "--flow-opt",
             "num_blocks=1", "--flow-opt", "atol=1e-4", "--flow-opt", "rtol=1e-4"]
    return [
        "train", "--dataset", "static_mnist", "--data-dir", str(data_dir),
        "--set", f"split_sizes={list(TINY_SPLITS)}", "--arch", "mlp",
        "--set", "net_kwargs={hidden_sizes=[16]}", "--set", "latent_dim=4",
        "--set", "context_dim=8", "--set", "is_samples=3", "--set", "is_points=4",
        "--set", "log_every=2", "--set", "eval_points=30", "--set", "pictures=false",
        "--batch-size", "21",
        "--device", "cpu", "--quiet", "--flow", flow,
        *(field if flow == "ffjord" else ["--flow-opt", "num_steps=2"]), *extra,
    ]


def torchrun(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args], env=ENV, capture_output=True,
        text=True, timeout=timeout, cwd=cwd,
    )


def standalone(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 --no-python COMMAND``."""
    return torchrun("--standalone", "--nproc_per_node=2", "--no-python", *command,
                    timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# The rules, without processes


def test_shards_cover_the_batch_and_weights_average_to_one() -> None:
    for rows, world in [(7, 2), (100, 3), (1, 4), (20, 2)]:
        bounds = [shard_bounds(rows, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        weights = [World(r, world).shard(torch.zeros(rows, 1))[1] for r in range(world)]
        assert sum(weights) / world == pytest.approx(1.0)
    x, weight = World(3, 4).shard(torch.arange(2.0)[:, None])
    assert weight == 0.0 and x.tolist() == [[0.0]]  # a stand-in row that does not count
    assert SINGLE.shard(x) == (x, 1.0)


def test_a_timeout_torch_cannot_take_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """inf and 1e20 passed the check and overflowed in datetime.timedelta, a traceback at
    start; with 1e10 s the store of torch.distributed timed out at once."""
    for text in ("inf", "1e20", "1e10", "nan", "0", "-3", "1e-4", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
        with pytest.raises(InputError, match=rf"VAEFLOW_DIST_TIMEOUT must be .*'{text}'"):
            distributed.timeout_seconds()
    for text, value in (("4", 4.0), ("0.5", 0.5), ("1e9", 1e9)):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
        assert distributed.timeout_seconds() == value
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT


def test_more_ranks_than_gpus_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node=2 on a machine that shows one GPU: rank 1 failed in
    torch.cuda.set_device (invalid device ordinal, a traceback); now a sentence says what to
    do. Checked before torch.cuda is touched, so it runs on a CPU-only machine too."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    with pytest.raises(InputError, match=r"LOCAL_RANK 1, but this machine shows 1 GPU.*"
                                         r"--nproc_per_node"):
        World(1, 2, 1).device(torch.device("cuda"))
    assert chosen == []
    assert World(0, 2, 0).device(torch.device("cuda")) == torch.device("cuda", 0)
    assert chosen == [0]


def test_the_main_process_of_each_machine_is_local_rank_0() -> None:
    """One download per machine: LOCAL_RANK 0 of every node, not only global rank 0 (another
    node's data directory may not be shared)."""
    assert SINGLE.is_local_main and World(0, 4, 0).is_local_main
    assert World(2, 4, 0).is_local_main  # the first rank of the second machine
    assert not World(1, 4, 1).is_local_main and not World(3, 4, 1).is_local_main


def test_a_peer_of_a_rank_with_a_users_error_raises_the_same_class() -> None:
    """A rank that waited for another's download stopped as a lost peer (a PeerError, which
    `vaeflow train` reports with advice to resume a run that never started); a data file that
    is missing or fails its checksum is the user's to fix, as bad input is."""
    from vaeflow.data import ChecksumError, DataNotFoundError
    from vaeflow.runs import RunError

    for err, cls in ((DataNotFoundError("gone"), DataNotFoundError),
                     (ChecksumError("bad"), ChecksumError), (RunError("locked"), InputError),
                     (RuntimeError("bug"), distributed.PeerError)):
        peer = distributed._peer_error(3, *distributed._report(err))
        assert type(peer) is cls
        assert str(peer) == f"rank 3 stopped: {type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------
# DDP gradients against one process: 2 processes spawned, noise fixed


def _model(data_dir: Path, flow: str) -> tuple[Any, Any]:
    from test_train import tiny_config

    kwargs = {"ffjord": {"hidden_dims": [8], "rank": 2, "trace": "exact", "method": "rk4",
                         "solver_options": {"step_size": 0.25}},
              "planar": {"num_steps": 2}, "none": {}}[flow]
    config = tiny_config(data_dir, flow, flow_kwargs=kwargs)
    data = load_dataset("static_mnist", data_dir, split_sizes=TINY_SPLITS)
    torch.manual_seed(0)
    return train_mod.build_model(config, data), data


def _fixed_noise(model: Any, eps: torch.Tensor) -> None:
    """The posterior noise of row i is eps[i], whichever rank holds the row."""
    model._noise = lambda like, generator: eps[: len(like)]


def _gradient_worker(rank: int, port: int, data_dir: Path, out: Path) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[distributed.TIMEOUT_ENV] = "4"
    torch.set_num_threads(1)
    world = distributed.start()
    assert world == World(rank, 2, rank, owned=True)
    report = {}
    # 7 rows: shards of 4 and 3; 1 row: rank 1 computes on a stand-in row of weight 0.
    # "none": the context head gets no gradient (DDP must be told).
    for flow, rows in (("planar", 7), ("planar", 1), ("ffjord", 7), ("none", 7)):
        model, data = _model(data_dir, flow)
        x = data.train[:rows]
        eps = torch.randn(rows, 4, generator=torch.Generator().manual_seed(1))
        reference, _ = _model(data_dir, flow)
        _fixed_noise(reference, eps)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.0)
        expected = train_mod.train_step(reference, optimizer, x, 0.5)
        ddp = world.replicate(model, x[:2])
        xs, weight = world.shard(x)
        lo, hi = shard_bounds(rows, rank, 2)
        _fixed_noise(model, eps[lo:hi] if hi > lo else eps[:1])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        got = train_mod.train_step(model, optimizer, xs, 0.5, forward=ddp, weight=weight)
        names = sorted(got)
        synced = world.sync_window(torch.stack([got[n] for n in names])[None], [3.0 + rank, 0],
                                   None, 1.0 + rank)
        for i, n in enumerate(names):  # the logged terms are the global batch's
            assert synced.values[0, i].item() == pytest.approx(expected[n].item(), rel=1e-5), n
        assert synced.nfe == (3.5, 0.0) and synced.seconds == 1.0  # NFE mean, rank 0's clock
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        report[flow] = ddp.find_unused_parameters
    # the sharded evaluation equals one process's, stand-in rows included (batches of 2, 2, 1)
    model, data = _model(data_dir, "planar")
    x = data.test[:5]
    for fn, kwargs in ((dataset_nelbo, {"batch_size": 2, "n_samples": 2}),
                       (dataset_log_likelihood, {"n_samples": 3, "batch_rows": 3})):
        figures = []
        for w in (SINGLE, world):
            with fork_rng(x.device, 7):
                figures.append(float(fn(model, x, **kwargs, world=w)))
        assert figures[0] == pytest.approx(figures[1], rel=1e-6), fn
    if rank == 1:  # hangs: rank 0's next collective must fail after the timeout, not hang
        import time

        time.sleep(5)
        os._exit(0)
    try:
        world.sum(torch.ones(()))
    except RuntimeError as err:
        report["timeout"] = world.lost_contact(err)
    out.write_text(json.dumps(report))
    os._exit(0)  # the group is broken: leave without tearing it down


@pytest.mark.slow
def test_ddp_gradients_equal_one_process(tiny_data_dir: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "report.json"
    mp.spawn(_gradient_worker, args=(free_port(), tiny_data_dir, out), nprocs=2)
    assert read(out) == {"planar": False, "ffjord": False, "none": True, "timeout": True}


# --------------------------------------------------------------------------------------------
# torchrun end to end


@pytest.fixture(scope="module")
def reference_runs(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same planar run with one process (in-process) and under torchrun with 2."""
    root = tmp_path_factory.mktemp("ddp")
    args = cli_args(tiny_data_dir, "planar", "--max-epochs", "2",
                    "--set", "checkpoint_every=4")
    assert main([*args, "--out", str(root / "one")]) == 0
    done = standalone(["vaeflow", *args, "--out", str(root / "two")])
    assert done.returncode == 0, done.stderr[-8000:]
    return root


def test_torchrun_run_matches_one_process(reference_runs: Path) -> None:
    one, two = reference_runs / "one", reference_runs / "two"
    a, b = read(one / "results.json"), read(two / "results.json")
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["steps"] == a["steps"] == 20 and b["epochs"] == 2
    # different noise on rank 1's rows (its own stream): close, not equal
    assert b["test_nelbo"] == pytest.approx(a["test_nelbo"], rel=2e-3)
    assert read(two / "timing.json")["world_size"] == 2
    history = read(two / "history.json")
    assert len(history) == 2 and history[-1]["valid_nelbo"] == pytest.approx(
        read(one / "history.json")[-1]["valid_nelbo"], rel=2e-3)
    # only rank 0 wrote: one event file, one run
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in reference_runs.iterdir()) == ["one", "two"]
    ckpt = torch.load(two / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    # the sharded evaluation gives one process's figures
    again = evaluate_run(two, pictures=False)
    assert again["test_nelbo"] == pytest.approx(b["test_nelbo"], rel=1e-6)
    assert again["test_nll_is"] == pytest.approx(b["test_nll_is"], rel=1e-6)


def test_torchrun_eval_shares_the_test_set_and_prints_once(reference_runs: Path) -> None:
    """`vaeflow eval` under torchrun: one process's figures, printed once, and rank 1 needs no
    run directory (it runs in an empty folder, the run named by a relative path)."""
    elsewhere = reference_runs.parent / f"{reference_runs.name}-empty"
    elsewhere.mkdir(exist_ok=True)
    # 1,500 samples, over the 1,000 rows of a flow call: one datum a batch, its samples shared
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--eval-probe", "1",
                    str(elsewhere), "eval", "two", "--json", "--is-samples", "1500",
                    cwd=reference_runs)
    assert done.returncode == 0, done.stderr[-8000:]
    shared = json.loads(done.stdout)  # one JSON document: only rank 0 printed
    assert "rank 0: IS samples (0, 750) of 1 rows" in done.stderr
    assert "rank 1: IS samples (750, 1500) of 1 rows" in done.stderr
    one = evaluate_run(reference_runs / "two", pictures=False, is_samples=1500)
    assert one["is_points"] == 4
    assert shared.keys() == one.keys()
    for key, value in one.items():
        if isinstance(value, float):
            assert shared[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert shared[key] == value, key
    assert not list(elsewhere.iterdir())  # rank 1 wrote nothing either


def test_a_solve_that_fails_on_one_rank_stops_the_evaluation_on_every_rank(
    reference_runs: Path,
) -> None:
    """Rank 1's solve fails mid-way: it says so with the solver advice, and rank 0 stops at once
    with rank 1's reason (not after the collective timeout, as a lost contact)."""
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--fail-solve-rank", "1",
                    "eval", str(reference_runs / "two"), "--json")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "failed: the solve went wrong on purpose. Try other solver settings" in out
    assert ("the evaluation of " in out
            and "stopped: rank 1 stopped: SolverError: the solve went wrong on purpose" in out)
    assert "lost contact" not in out


def test_killed_rank_then_resume_matches_the_uninterrupted_run(
    reference_runs: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = cli_args(tiny_data_dir, "planar", "--max-epochs", "2", "--set", "checkpoint_every=4")
    killed = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--kill-rank", "1",
                      "--kill-step", "15", *args, "--out", str(run))
    assert killed.returncode != 0
    assert "lost contact with the other ranks" in killed.stderr  # rank 0 says why it stopped
    assert not (run / "results.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["progress"]["step"] == 12
    with pytest.raises(RunError, match="world size 2.*has 1.*--nproc_per_node=2"):
        train_mod.train(resume=run, progress=False)  # one process: refused, says why
    resumed = standalone(["vaeflow", "train", "--resume", str(run), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    assert read(run / "results.json") == read(reference_runs / "two" / "results.json")
    a = torch.load(run / "best.pt", weights_only=True)
    b = torch.load(reference_runs / "two" / "best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_the_process_group_is_destroyed_with_no_ddp_module_holding_it(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    # A DDP module alive at destroy_process_group keeps the group until the interpreter's exit,
    # where the end of its gloo threads can abort a rank after its work is done (the likely
    # cause of a rare "terminate called without an active exception" in these tests, with no
    # Python frame: a finished run whose exit status said it failed).
    args = cli_args(tiny_data_dir, "planar", "--max-steps", "3", "--set", "is_samples=0")
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--count-ddp", *args,
                    "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-8000:]
    counts = sorted(line for line in done.stderr.splitlines() if "DDP alive at stop" in line)
    assert counts == ["rank 0: 0 DDP alive at stop", "rank 1: 0 DDP alive at stop"]


@pytest.mark.slow
def test_two_machines_train_ffjord_with_the_adjoint(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Two torchrun launches, one process each, meet at a c10d rendezvous on localhost."""
    args = cli_args(tiny_data_dir, "ffjord", "--max-steps", "4", "--flow-opt", "adjoint=true")
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}",
             "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
             "--rdzv-id=vaeflow-test", "--no-python", "vaeflow", *args,
             "--out", str(tmp_path / "two")],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=120)
        # the workers run the console script: a C++ abort at teardown (seen twice, not
        # reproduced in 85 tries) prints Python's stacks above torchrun's own report
        assert node.returncode == 0, err[-8000:]
    a, b = read(tmp_path / "one" / "results.json"), read(tmp_path / "two" / "results.json")
    assert b["world_size"] == 2 and b["steps"] == 4
    assert b["train_nfe_forward_mean"] >= 8  # the mean over ranks of the adaptive solves
    assert b["train_nfe_backward_mean"] > 0  # the adjoint's backward solve ran inside DDP
    # each rank's adaptive solve takes its own steps: close to one process, within the solver
    assert b["test_nelbo"] == pytest.approx(a["test_nelbo"], rel=5e-3)


def write_sources(data_dir: Path, server: Path) -> None:
    """The .amat source files of ``data_dir``'s tiny static MNIST, as Larochelle's server holds
    them, into ``server`` (the ``--local-sources`` of the script below)."""
    import numpy as np

    server.mkdir()
    with np.load(data_dir / "binarized_mnist.npz") as z:
        for split in ("train", "valid", "test"):
            bits = np.unpackbits(z[f"x_{split}"], axis=1)[:, :784]
            text = "".join(" ".join(map(str, row)) + "\n" for row in bits)
            (server / f"binarized_mnist_{split}.amat").write_text(text)


def fetches(marker: Path) -> list[str]:
    """The ``RANK LOCAL_RANK FILE`` lines of the fetches that the script's ranks made."""
    return sorted(marker.read_text().splitlines()) if marker.exists() else []


@pytest.mark.slow
def test_a_missing_data_file_is_downloaded_once_per_machine(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Each rank downloaded the file itself: with 8 GPUs, 8 downloads at once from one server.
    Now LOCAL_RANK 0 downloads it while the other ranks wait, then every rank reads it."""
    server, data_dir, marker = tmp_path / "server", tmp_path / "data", tmp_path / "fetches"
    write_sources(tiny_data_dir, server)
    args = cli_args(data_dir, "planar", "--max-steps", "2", "--set", "is_samples=0")
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--local-sources",
                    str(server), str(marker), *args, "--out", str(tmp_path / "run"), timeout=90)
    assert done.returncode == 0, done.stderr[-8000:]
    assert fetches(marker) == [f"0 0 binarized_mnist_{s}.amat" for s in ("test", "train", "valid")]
    assert sorted(p.name for p in data_dir.iterdir()) == ["binarized_mnist.npz"]  # no temp files
    assert read(tmp_path / "run" / "results.json")["world_size"] == 2


@pytest.mark.slow
def test_a_failed_download_stops_every_rank_with_its_message(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The server lacks the files (as offline): rank 0's download fails, and rank 1, which
    waited for it, stops too, with the same one-line error (no traceback, no resume advice:
    nothing was trained) instead of a hang."""
    server, data_dir, marker = tmp_path / "server", tmp_path / "data", tmp_path / "fetches"
    server.mkdir()
    args = cli_args(data_dir, "planar", "--max-steps", "2")
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--local-sources",
                    str(server), str(marker), *args, "--out", str(tmp_path / "run"), timeout=90)
    assert done.returncode != 0
    assert fetches(marker) == ["0 0 binarized_mnist_train.amat"]  # the first file failed
    # what the ranks wrote, above torchrun's own report (a traceback of the launcher)
    ranks = done.stderr.split("torch/distributed/elastic")[0]
    errors = [line for line in ranks.splitlines() if line.startswith("vaeflow: ")]
    assert sorted(errors) == [  # one per rank, as one process prints it (its exit status 2)
        "vaeflow: error: data set 'static_mnist' needs binarized_mnist.npz, which is not in the "
        f"data directory {data_dir}.",
        "vaeflow: error: rank 0 stopped: DataNotFoundError: data set 'static_mnist' needs "
        f"binarized_mnist.npz, which is not in the data directory {data_dir}.",
    ], done.stderr[-8000:]
    assert ranks.count("Downloading binarized_mnist_train.amat failed (no network?)") == 2
    assert "Traceback" not in ranks and "--resume" not in ranks
    assert not data_dir.exists() and not (tmp_path / "run").exists()  # nothing kept


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_refused_before_a_download(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The node's download came before the device check: ``--device cuda`` on a machine
    without CUDA fetched the whole data set first, then stopped."""
    server, data_dir, marker = tmp_path / "server", tmp_path / "data", tmp_path / "fetches"
    write_sources(tiny_data_dir, server)
    args = cli_args(data_dir, "planar", "--max-steps", "2", "--device", "cuda")
    done = torchrun("--standalone", "--nproc_per_node=2", str(HERE), "--local-sources",
                    str(server), str(marker), *args, "--out", str(tmp_path / "run"), timeout=90)
    assert done.returncode != 0
    assert "CUDA is not available here" in done.stderr, done.stderr[-8000:]
    assert fetches(marker) == []


# --------------------------------------------------------------------------------------------
# As a script: vaeflow with one rank killed


def _run_with_a_kill(argv: list[str]) -> int:
    """``--kill-rank R --kill-step K VAEFLOW_ARGS...``: rank R dies at its K-th step."""
    rank, step, rest = int(argv[1]), int(argv[3]), argv[4:]
    real, count = train_mod.train_step, {"n": 0}

    def step_or_die(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        count["n"] += 1
        if count["n"] == step and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    train_mod.train_step = step_or_die  # type: ignore[assignment]
    return main(rest)


def _run_counting_ddp_at_stop(argv: list[str]) -> int:
    """``--count-ddp VAEFLOW_ARGS...``: say how many DDP modules are alive as the session
    destroys the process group."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    real = distributed.stop

    def stop(world: distributed.World) -> None:
        gc.collect()
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        print(f"rank {world.rank}: {alive} DDP alive at stop", file=sys.stderr)
        real(world)

    distributed.stop = stop  # type: ignore[assignment]
    return main(argv[1:])


def _run_with_local_sources(argv: list[str]) -> int:
    """``--local-sources SERVER MARKER VAEFLOW_ARGS...``: static MNIST's sources are the files
    of folder SERVER (``file://`` URLs, which the real fetch reads; their checksums as found
    there), and each fetch appends ``RANK LOCAL_RANK FILE`` to MARKER. A fetch takes 0.3 s,
    so that a rank which did not wait would find the file missing too."""
    import dataclasses
    import time

    from vaeflow.data import DATASETS, _digest, download

    server, marker, rest = Path(argv[1]), Path(argv[2]), argv[3:]
    spec = DATASETS["static_mnist"]
    sources = []
    for s in spec.sources:
        path = server / s.filename
        digest = _digest(path, "sha256") if path.exists() else "0" * 64
        sources.append(dataclasses.replace(s, urls=(path.as_uri(),), checksum=("sha256", digest)))
    DATASETS["static_mnist"] = dataclasses.replace(spec, sources=tuple(sources))
    real = download._fetch

    def fetch(url: str, dest: Path) -> None:
        """The real fetch, counted and slowed down."""
        with open(marker, "a") as f:
            f.write(f"{os.environ['RANK']} {os.environ['LOCAL_RANK']} {Path(url).name}\n")
        time.sleep(0.3)
        real(url, dest)

    download._fetch = fetch  # type: ignore[assignment]
    return main(rest)


def _run_an_eval_probe(argv: list[str]) -> int:
    """``--eval-probe R DIR VAEFLOW_ARGS...``: rank R runs in DIR (as on a machine without the
    run directory), and each rank says which importance samples it computes for how many
    rows (once per range)."""
    from vaeflow.vae import VAE

    if int(os.environ["RANK"]) == int(argv[1]):
        os.chdir(argv[2])
    real, said = VAE.log_weights, set()

    def log_weights(self: VAE, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        line = f"rank {os.environ['RANK']}: IS samples {kwargs.get('samples')} of {len(x)} rows"
        if line not in said:
            said.add(line)
            print(line, file=sys.stderr)
        return real(self, x, *args, **kwargs)

    VAE.log_weights = log_weights  # type: ignore[method-assign]
    return main(argv[3:])


def _run_with_a_failing_solve(argv: list[str]) -> int:
    """``--fail-solve-rank R VAEFLOW_ARGS...``: rank R's second NELBO batch raises the
    SolverError of a failed ODE solve."""
    from vaeflow.ode import SolverError
    from vaeflow.vae import VAE

    real, count = VAE.nelbo, {"n": 0}

    def nelbo(self: VAE, *args: Any, **kwargs: Any) -> torch.Tensor:
        count["n"] += 1
        if count["n"] == 2 and int(os.environ["RANK"]) == int(argv[1]):
            raise SolverError("the solve went wrong on purpose")
        return real(self, *args, **kwargs)

    VAE.nelbo = nelbo  # type: ignore[method-assign]
    return main(argv[2:])


if __name__ == "__main__":
    if sys.argv[1] == "--eval-probe":
        sys.exit(_run_an_eval_probe(sys.argv[1:]))
    if sys.argv[1] == "--fail-solve-rank":
        sys.exit(_run_with_a_failing_solve(sys.argv[1:]))
    if sys.argv[1] == "--count-ddp":
        sys.exit(_run_counting_ddp_at_stop(sys.argv[1:]))
    if sys.argv[1] == "--local-sources":
        sys.exit(_run_with_local_sources(sys.argv[1:]))
    sys.exit(_run_with_a_kill(sys.argv[1:]))
