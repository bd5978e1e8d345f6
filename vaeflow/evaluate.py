"""Test figures of a trained VAE: the NELBO (exact trace for continuous flows) and the
importance-sampled log-likelihood, under a fixed seed so that they are a deterministic function
of the parameters.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vaeflow.checks import check_int, input_errors, resolve_device
from vaeflow.claim import RunLock, check_new_run_dir, clear_run_files
from vaeflow.configs import TrainConfig
from vaeflow.data import Dataset, ensure_dataset, load_dataset
from vaeflow.distributed import SINGLE, World, shard_bounds
from vaeflow.flows import FFJORD, use_solver
from vaeflow.model import build_model
from vaeflow.ode import ADAPTIVE_SOLVERS
from vaeflow.plots import image_grids, write_run_pictures
from vaeflow.progress import eval_batches
from vaeflow.rng import fork_rng
from vaeflow.runs import (
    BEST,
    Run,
    RunError,
    atomic_save,
    model_from_state,
    model_state,
    read_config,
    solver_settings,
)
from vaeflow.vae import VAE, bits_per_dim, eval_mode, log_mean_exp

__all__ = [
    "eval_mode",
    "subset",
    "dataset_nelbo",
    "dataset_log_likelihood",
    "evaluate",
    "fork_rng",
    "evaluate_run",
    "failed_figures",
    "run_pictures",
    "ensure_machine_data",
    "run_dataset",
    "save_run",
    "smoke_eval_counts",
    "test_solve_changes",
]


def failed_figures(results: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``None`` where every figure of ``results`` is finite; else why the evaluation failed
    (naming the non-finite figures) and the results to keep (those figures as ``None``), as
    ``results.json`` of a failed run holds them."""
    bad = {k: v for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return None
    error = (f"the final evaluation gave non-finite figures ({', '.join(map(str, bad))}: "
             f"{', '.join(map(str, bad.values()))})")
    return error, {k: (None if k in bad else v) for k, v in results.items()}


def subset(x: Tensor, points: int | None, seed: int = 0) -> Tensor:
    """``points`` rows of ``x [N, ...]`` drawn without replacement with a fixed seed (in their
    stored order), or all of ``x``. Not a prefix: stored splits need not be in random order
    (static MNIST's test split starts with darker digits)."""
    if points is None or points >= len(x):
        return x
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=g)[:points].sort().values
    return x[index.to(x.device)]


def dataset_nelbo(
    model: VAE,
    x: Tensor,
    batch_size: int,
    n_samples: int = 1,
    exact: bool | None = True,
    progress: bool = False,
    world: World = SINGLE,
) -> Tensor:
    """Mean NELBO (nats per datum) over ``x [N, C, H, W]`` in eval mode; a 0-dim tensor. A
    continuous flow takes its exact trace, the training estimator (``exact`` False), or what it
    was built to use in eval mode (None: FFJORD's ``exact_in_eval``).

    Runs under ``no_grad``: FFJORD switches autograd on inside its field for the trace and
    returns detached values, so no graph is kept. Under torchrun (``world``) each rank takes
    its rows of every batch (:meth:`World.eval_rows`) and the sums are reduced: the same figure
    as one process (see :mod:`vaeflow.distributed`).
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with eval_mode(model, exact), torch.no_grad():
        for start in eval_batches(len(x), batch_size, progress, "test NELBO"):
            xb = x[start : start + batch_size]
            # A batch is a together block (no collective in it): a rank whose solve fails stops
            # every rank with its reason at this batch's end. One meeting after the loop would
            # leave it waiting for the others' hours of work, past the collective timeout.
            with world.together(), world.eval_rows(model, len(xb)) as (keep, counted):
                nelbo = model.nelbo(xb[keep], n_samples, batch_size=batch_size * n_samples)
            if counted:
                total = total + nelbo.detach().double().sum()
    return world.sum(total) / len(x)


def dataset_log_likelihood(
    model: VAE,
    x: Tensor,
    n_samples: int,
    batch_rows: int,
    progress: bool = False,
    world: World = SINGLE,
    exact: bool | None = True,
) -> Tensor:
    """Mean importance-sampled ``log p(x)`` (nats) over ``x [N, C, H, W]``, with the trace that
    ``exact`` asks for (see :func:`dataset_nelbo`), in batches of ``batch_rows // n_samples``
    data points (at least one) whose ``n_samples`` samples go through the networks
    ``batch_rows`` rows at a time.

    Under torchrun each rank takes its share of every datum's samples (with the noise they have
    in one process, :meth:`VAE.log_weights`), and the log-weights are summed into place, so
    that K = 5000 samples of one datum at a time keep every GPU busy: the same figure as one
    process.
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    per_batch = max(1, batch_rows // n_samples)
    lo, hi = shard_bounds(n_samples, world.rank, world.size)
    with eval_mode(model, exact), torch.no_grad():
        for start in eval_batches(len(x), per_batch, progress, "importance sampling"):
            xb = x[start : start + per_batch]
            with world.together():  # as in dataset_nelbo
                mine = model.log_weights(xb, n_samples, batch_rows, samples=(lo, hi))
            if world.distributed:  # every rank's samples in their rows, the others' 0
                log_w = mine.new_zeros(n_samples, len(xb))
                log_w[lo:hi] = mine
                mine = world.sum(log_w)
            total = total + log_mean_exp(mine).double().sum()
    return total / len(x)


def ensure_machine_data(config: TrainConfig, world: World = SINGLE) -> None:
    """Under torchrun, the run's data file present on this machine: its ``LOCAL_RANK`` 0
    downloads a missing one, so that a machine downloads once, not once per rank (eight
    fetches at once from one server can trip its rate limit). Call it inside a
    :meth:`World.together` block: the machine's other ranks wait at its end, and a failed
    download stops every rank with its message. One process: nothing is done here
    (:func:`run_dataset` reads the file, downloading it if needed)."""
    if world.distributed and world.is_local_main:
        ensure_dataset(config.dataset, config.data_dir, split_sizes=config.split_sizes)


def run_dataset(config: TrainConfig, device: torch.device | str) -> Dataset:
    """The data set of a run's ``config`` (its ``data_dir`` and ``split_sizes``) on
    ``device``. A bad data file, a name or split sizes it does not hold, raise an
    ``InputError`` from the data package itself: a blanket conversion here would also turn a
    bug's ``ValueError`` into a one-line message without its traceback."""
    split_sizes = tuple(config.split_sizes) if config.split_sizes is not None else None
    return load_dataset(config.dataset, config.data_dir, device, split_sizes=split_sizes)


def test_solve_changes(model: VAE, config: TrainConfig) -> dict[str, Any]:
    """What the solve of the test figures changes in the training solve's settings:
    ``config.test_solver`` when set; else ``{"method": "dopri5"}`` when the model was trained
    with a fixed-step solver, and ``{}`` (the training solve itself) when it was not."""
    if config.test_solver is not None:
        return dict(config.test_solver)
    flows = [m for m in model.modules() if isinstance(m, FFJORD)]
    fixed = any(flow.solver.method not in ADAPTIVE_SOLVERS for flow in flows)
    return {"method": "dopri5"} if fixed else {}


@contextlib.contextmanager
def evaluation_solve(
    model: VAE, config: TrainConfig, solver: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """Within this block the model's ODE solves are those of the test figures, then as before.

    ``config.test_solver`` when set; otherwise the training solve when it is adaptive, and
    dopri5 at the flow's own tolerances after training with a fixed-step solver (rk4, euler,
    midpoint): a few fixed steps are not the continuous flow, and a model trained with them
    learns their error (see ``TrainConfig``). ``solver`` (``vaeflow eval --solver``) changes
    those settings further. The RNODE terms of a regularized flow are not integrated: a
    training loss, they would only enter the adaptive solver's error control (and cost work),
    so that the figures of the same weights would depend on whether they were trained with them.
    """
    flows = [m for m in model.modules() if isinstance(m, FFJORD)]
    saved = [(flow.solver, flow.regularize) for flow in flows]
    try:
        for flow in flows:
            flow.regularize = False
        with input_errors():
            for changes in (test_solve_changes(model, config), solver or {}):
                if changes:
                    use_solver(model.flow, config.flow, changes)
        yield
    finally:
        for flow, (old, regularize) in zip(flows, saved, strict=True):
            flow.solver, flow.regularize = old, regularize


def run_pictures(model: VAE, data: Dataset, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The run's picture grids (:func:`vaeflow.plots.image_grids`: 64 prior samples, and 32
    test images (:func:`subset`) beside their reconstructions), the reconstructions through the
    solve of the test figures (:func:`evaluation_solve`), so that they show the model the
    figures measure; the same seed every time."""
    with evaluation_solve(model, config):
        # 32 test images drawn with a fixed seed, the same for every run: not the first ones,
        # which in static MNIST's stored order are all zeros
        return image_grids(model, subset(data.test, 32), config.seed + 2)


def _counts(
    config: TrainConfig, eval_points: int | None, is_samples: int | None, is_points: int | None
) -> tuple[int | None, int, int | None]:
    """The test figures' point and sample counts, the config's where not given, checked."""
    eval_points = config.eval_points if eval_points is None else eval_points
    is_samples = config.is_samples if is_samples is None else is_samples
    is_points = config.is_points if is_points is None else is_points
    if eval_points is not None:
        check_int("eval_points", eval_points, minimum=1)
    check_int("is_samples", is_samples, minimum=0)
    if is_points is not None:
        check_int("is_points", is_points, minimum=1)
    return eval_points, is_samples, is_points


def evaluate(
    model: VAE,
    data: Dataset,
    config: TrainConfig,
    *,
    eval_points: int | None = None,
    is_samples: int | None = None,
    is_points: int | None = None,
    solver: Mapping[str, Any] | None = None,
    progress: bool = False,
    world: World = SINGLE,
) -> dict[str, Any]:
    """Test-set figures of ``model``: NELBO (exact trace) and the IS log-likelihood.

    The arguments override the config's ``eval_points``, ``is_samples`` (0: no IS estimate)
    and ``is_points``; ``progress`` shows a bar per estimate; under torchrun ``world`` shards
    the work over the ranks (every rank gets the figures). For data sets reported in bits
    per dimension (Frey Faces) the ``*_bpd`` entries are the headline numbers. The ODE solves
    are those of :func:`evaluation_solve` (``solver`` changes them further), for these figures
    only; ``"solver"`` in the result says which they were.
    """
    eval_points, is_samples, is_points = _counts(config, eval_points, is_samples, is_points)
    test = subset(data.test, eval_points)
    num_dims = math.prod(data.input_shape)
    # exact=None below: each flow's own eval setting, so that FFJORD's exact_in_eval=False (a
    # departure the README lists) keeps the training estimator for the test figures too.
    flows = [f for f in model.modules() if isinstance(f, FFJORD)]
    trace = "exact" if all(f.uses_exact_trace(training=False) for f in flows) else "Hutchinson"
    dev = data.test.device
    with evaluation_solve(model, config, solver):
        # A fixed seed per estimate makes each a deterministic function of the parameters and
        # of its own counts: the IS figure must not move with the NELBO's eval_points.
        with fork_rng(dev, config.seed + 1):
            # Each flow call's function evaluations (host counters, no device read).
            nfes: list[int] = []
            hook = model.flow.register_forward_hook(
                lambda flow, args, output: nfes.append(flow.statistics().get("nfe_forward", 0))
            )
            try:
                nelbo = float(
                    dataset_nelbo(model, test, config.batch_size, config.eval_samples,
                                  exact=None, progress=progress, world=world)
                )
            finally:
                hook.remove()
        out: dict[str, Any] = {
            "test_nelbo": nelbo,
            "test_nelbo_bpd": bits_per_dim(nelbo, num_dims),
            "test_points": len(test),
            "eval_samples": config.eval_samples,
            "solver": solver_settings(model),
        }
        if out["solver"]:  # a continuous flow's log-density change: how its trace was taken
            out["trace"] = trace
        if flows:  # the mean over the ranks' calls (each rank's adaptive solves are its own)
            nfe = torch.tensor(sum(nfes) / max(len(nfes), 1), dtype=torch.float64, device=dev)
            out["test_nfe_forward"] = float(world.sum(nfe)) / world.size
        if is_samples > 0:
            xs = subset(data.test, is_points)
            # seed + 2 draws the pictures; validations use seed + 3 + epoch, epochs from 1
            with fork_rng(dev, config.seed + 3):
                ll = float(dataset_log_likelihood(
                    model, xs, is_samples, config.eval_batch_rows, progress=progress,
                    world=world, exact=None,
                ))
            out.update(
                test_nll_is=-ll,
                test_nll_is_bpd=bits_per_dim(-ll, num_dims),
                is_samples=is_samples,
                is_points=len(xs),
            )
    out["unit"] = "bits/dim" if data.bits_per_dim else "nats"
    return out


def smoke_eval_counts(config: TrainConfig) -> dict[str, int]:
    """A run limited by ``max_steps`` is a smoke run: unless the config says how much to
    evaluate, evaluate on 500 test points and 50 IS points with 10 samples."""
    if config.max_steps is None:
        return {}
    out: dict[str, int] = {}
    defaults = TrainConfig.__dataclass_fields__
    if config.eval_points == defaults["eval_points"].default:
        out["eval_points"] = 500
    if config.is_points == defaults["is_points"].default:
        out["is_points"] = 50
    if config.is_samples == defaults["is_samples"].default:
        out["is_samples"] = 10
    return out


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    eval_points: int | None = None,
    is_samples: int | None = None,
    is_points: int | None = None,
    data_dir: str | None = None,
    checkpoint: str = "best",
    solver: Mapping[str, Any] | None = None,
    progress: bool = False,
    pictures: bool = True,
    world: World = SINGLE,
) -> dict[str, Any]:
    """Evaluate the best (or last) model of a run on the test set (see :func:`evaluate`), and
    (``pictures``) write its PNGs into the run directory: only for the run's own figures (the
    best model, its own solve), so that a look at the last model or through another solver
    never replaces the pictures of the model that the run reports.

    Under torchrun (``world``, every rank calling this) the test set is shared among the
    ranks, each on its own device, and every rank returns the figures of one process. Only
    rank 0 reads or writes the run directory (the config and parameters are sent to the
    others, who need no shared file system), and each machine's ``LOCAL_RANK`` 0 downloads a
    missing data file for its ranks (:func:`ensure_machine_data`).

    ``solver`` changes the ODE solver settings of the test figures (``method``, ``atol``,
    ``rtol``, ``solver_options``; see :func:`evaluation_solve` and
    :meth:`vaeflow.flows.Flow.replace_solver`), e.g. ``{"method": "rk4", "solver_options":
    {"step_size": 0.5}}`` to see a model as its fixed steps saw it; ``results["solver"]`` says
    which settings gave the figures."""
    config = world.from_main(lambda: read_config(run_dir))
    if device is not None:
        config.device = device
    if data_dir is not None:
        config.data_dir = data_dir
    # load_model's steps, with rank 0 reading for every rank (the device first, as there)
    with world.together():
        dev = world.device(resolve_device(config.device))
    path, state = world.from_main(
        lambda: model_state(run_dir, checkpoint, world.map_location(dev))
    )
    with world.together():  # e.g. one GPU without the memory: every rank hears of it
        model = model_from_state(config, state, path, dev)
    del state  # rank 0's copy of a large model, once it is in the model
    smoke = smoke_eval_counts(config)
    kw = {
        "eval_points": eval_points if eval_points is not None else smoke.get("eval_points"),
        "is_samples": is_samples if is_samples is not None else smoke.get("is_samples"),
        "is_points": is_points if is_points is not None else smoke.get("is_points"),
    }
    # Options are checked before the data set is read (seconds, or a download): a bad count
    # or solver setting says so at once, not after the data, nor instead of a missing-data
    # message the user would fix first.
    _counts(config, **kw)
    with evaluation_solve(model, config, solver):
        pass  # entering it checks the settings on this model's flow; leaving it restores them
    with world.together():
        ensure_machine_data(config, world)
    with world.together():  # a data file that one machine cannot read stops every rank
        data = run_dataset(config, dev)
    results = evaluate(model, data, config, **kw, solver=solver,
                       progress=progress and world.is_main, world=world)
    results.update(
        dataset=config.dataset, flow=config.flow, checkpoint=checkpoint,
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if pictures and checkpoint == "best" and not solver:
        world.from_main(lambda: write_run_pictures(run_dir, run_pictures(model, data, config)))
    return results


def save_run(
    run_dir: str | os.PathLike[str],
    model: VAE,
    config: TrainConfig,
    *,
    evaluate: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Make a run directory of a model trained outside ``vaeflow train`` (a loop of one's own,
    a Pyro guide's networks): ``config.json`` and ``best.pt``, so that ``vaeflow eval``,
    :func:`load_model` and the pictures treat it as any run's best model, and (``evaluate``)
    its test figures in ``results.json``, so that ``vaeflow compare`` sets it beside trained
    runs. ``model`` must be the model that ``config`` describes (:func:`vaeflow.model.build_model`
    of it, trained); a parameter of another name or shape is refused by name.

    Returns the test figures written (``None`` without ``evaluate``). Such a run has no
    ``checkpoint.pt``: it cannot be resumed, and ``vaeflow compare`` shows no epochs or steps.

    Raises:
        RunError: ``run_dir`` holds files (``overwrite`` replaces the run files in it), the
            model does not fit the config, or its test figures are not finite (the run is
            saved and marked failed, as ``vaeflow train`` marks one).
    """
    if not isinstance(model, VAE) or not isinstance(config, TrainConfig):
        raise TypeError("save_run(run_dir, model, config) takes a VAE and its TrainConfig, got "
                        f"{type(model).__name__} and {type(config).__name__}")
    directory = Path(run_dir)
    # Checked on the meta device: the config's model without allocating it.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()
                    if isinstance(v, torch.Tensor)}
    # A continuous flow's solver settings are a dict in the state_dict (``_extra_state``), not
    # a tensor: they are saved as they are, so that the run is evaluated at those tolerances.
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
             for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    wrong = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
    missing, extra = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if wrong or missing or extra:
        parts = [f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                 for label, names in (("shapes differ for", wrong), ("the model lacks", missing),
                                      ("the config has no", extra)) if names]
        raise RunError(f"the model is not the one its config describes: {'; '.join(parts)} "
                       "(build it with vaeflow.model.build_model(config))")
    check_new_run_dir(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    # The folder's lock, as `vaeflow train` takes it: overwrite must not delete the files of a
    # run that a live process is training there (check_new_run_dir passes any folder then).
    with RunLock(directory):
        if overwrite:
            clear_run_files(directory)
        run = Run(directory)
        run.write_config(config)
        atomic_save(state, directory / BEST)
        if not evaluate:
            return None
        # the closing pictures as `vaeflow train` draws them: none with pictures=False (a sweep)
        results = evaluate_run(directory, progress=progress, pictures=config.pictures)
        results.update(stop_reason="saved with save_run, trained elsewhere")
        failed = failed_figures(results)
        if failed is not None:
            # as `vaeflow train` marks it: compare shows the run failed, not NaN figures
            error, kept = failed
            run.write_results({**kept, "status": "failed", "error": error})
            raise RunError(f"{error}. The model is saved in {directory}: evaluate it again with "
                           f"`vaeflow eval {directory}`, with other solver settings (e.g. "
                           "--solver atol=1e-6 --solver rtol=1e-6)")
        results["status"] = "finished"
        run.write_results(results)
    return results
