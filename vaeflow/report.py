"""What ``vaeflow train``, ``vaeflow eval`` and ``vaeflow compare`` print: the closing summary of
a run, and a table of runs side by side. Everything is read through :mod:`vaeflow.runs`."""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vaeflow.configs import TrainConfig
from vaeflow.data import figure_text, get_spec
from vaeflow.flows import FLOWS, flow_hyperparameters
from vaeflow.plots import LEARNING_CURVE, RECONSTRUCTIONS, SAMPLES, tested_record
from vaeflow.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    EVENTS,
    HISTORY,
    RESULTS,
    TIMING,
    Run,
    RunError,
    epochs_in,
    find_runs,
)

__all__ = [
    "figures", "solver_text", "summary", "next_commands", "compare_rows", "compare_table",
    "differing_settings", "run_settings", "expand_runs", "budget_options", "LOG_ONLY_KEYS",
]


def _minutes(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"  # not "0 s" for 0.4 s


def _count(n: int | None, noun: str) -> str:
    """``n`` with ``noun`` in the singular or the plural (``1 epoch``, ``1,210,480 parameters``);
    ``- epochs`` where the count is missing."""
    if n is None:
        return f"- {noun}s"
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def figures(results: Mapping[str, Any]) -> list[str]:
    """The headline figures of ``results.json`` as lines (bits/dim for Frey Faces)."""
    unit = results.get("unit", "nats")
    lines = []
    if unit == "bits/dim":
        lines.append(f"test NELBO: {results['test_nelbo_bpd']:.4f} bits/dim "
                     f"({results['test_nelbo']:.2f} nats)")
    else:
        lines.append(f"test NELBO: {results['test_nelbo']:.2f} nats")
    if "test_nll_is" in results:
        value = results["test_nll_is_bpd"] if unit == "bits/dim" else results["test_nll_is"]
        lines.append(
            f"test NLL (importance sampling, {_count(results['is_samples'], 'sample')}, "
            f"{_count(results['is_points'], 'point')}): {figure_text(value, unit)} {unit}"
        )
    return lines


def solver_text(solver: Sequence[Mapping[str, Any]]) -> str:
    """The ODE solver settings of ``results["solver"]`` in words, e.g. ``dopri5 (atol 1e-05,
    rtol 1e-05)`` or ``rk4 (step_size 0.5)``; ``""`` for a flow without ODE."""
    words = []
    for entry in solver:
        options = entry.get("options") or {}
        if "step_size" in options:
            text = f"{entry['method']} (step_size {options['step_size']:g})"
        elif "atol" in entry:
            text = f"{entry['method']} (atol {entry['atol']:g}, rtol {entry['rtol']:g})"
        else:  # a fixed-step method on a grid of its own (step_t), no tolerance to name
            text = entry["method"]
        if text not in words:
            words.append(text)
    return "; ".join(words)


def _built_in(flow: str) -> bool:
    """Whether ``flow`` ships with vaeflow, so that the ``vaeflow`` command knows it; a flow of
    one's own is known only to the script that registers it."""
    return flow in FLOWS and FLOWS[flow].__module__.startswith("vaeflow.")


# best.pt of a run stopped before its first validation holds its last model
_NONE_CHOSEN = "no epoch was validated, so none was chosen"


def evaluated_model(run_dir: str | os.PathLike[str], checkpoint: str) -> str:
    """The model that ``vaeflow eval --checkpoint CHECKPOINT`` read (``best``, ``last``), in
    words: ``the best model``, or the last one where training stopped before its first
    validation (not a model saved by :func:`vaeflow.evaluate.save_run`: no checkpoint, no
    history, trained elsewhere)."""
    run = Run(Path(run_dir))
    if checkpoint == "best" and (run.path / CHECKPOINT).is_file() and not run.history:
        return f"the last model: {_NONE_CHOSEN}"
    return f"the {checkpoint} model"


def _tested_model(run: Run, results: Mapping[str, Any]) -> list[str]:
    """Which model the figures measure, where a --max-steps stop left steps after the last
    validation (such a stop, unlike the time budget's, validates no partial epoch)."""
    steps = results.get("steps")
    if results.get("checkpoint") or steps is None:  # vaeflow eval says which model it read
        return []
    history = run.history
    if not history:
        return [f"tested: the last model ({_NONE_CHOSEN})"]
    at = tested_record(history, results)
    best = None if at is None else history[at]
    if best is None or history[-1]["step"] >= steps:
        return []
    after = steps - history[-1]["step"]
    return [f"tested: the best model, of epoch {best['epoch']} (step {best['step']:,}); the "
            f"{_count(after, 'step')} after the last validation {'is' if after == 1 else 'are'} "
            "not in it (--max-epochs or max_minutes validate where they stop)"]


def next_commands(run_dir: str | os.PathLike[str], flow: str, world_size: int = 1, *,
                  resumable: bool = True, events: bool = True,
                  train_on: Sequence[str] = ()) -> list[str]:
    """What the closing summary suggests doing next with the run of ``flow`` in ``run_dir``,
    trained by ``world_size`` processes: shell commands, and for a flow of one's own the calls
    from a script that registers it (the shell's ``vaeflow`` cannot build its model). A run
    without a checkpoint (``save_run``'s) is not offered ``--resume``, which refuses it, nor
    one without TensorBoard events TensorBoard. ``train_on``: the options of a larger budget
    for a run that its budget stopped, which its resume then trains on with (a plain resume of
    a finished run trains and evaluates nothing: it prints the summary again)."""
    path = str(run_dir)
    where = shlex.quote(path)
    again = ("    # train on with a larger budget" if train_on else
             "    # continue (e.g. after a kill)")
    # A checkpoint resumes only at the world size that wrote it (its ranks' random states).
    torchrun = f"torchrun --standalone --nproc_per_node={world_size}"
    tensorboard = [f"tensorboard --logdir {where}"] if events else []
    compare = f"vaeflow compare {where} OTHER_RUN..."
    if _built_in(flow):
        options = "".join(f" {shlex.quote(word)}" for word in train_on)
        resume = f"vaeflow train --resume {where}{options}{again}"
        if world_size > 1:
            resume = f"{torchrun} --no-python {resume} with the same {world_size} processes"
        return [*tensorboard, f"vaeflow eval {where}", *([resume] if resumable else []), compare]
    resume = f"vaeflow.cli.main({['train', '--resume', path, *train_on]!r}){again}"
    if world_size > 1:
        resume += f", in the script run by {torchrun}"
    return [
        *tensorboard,
        compare,
        f"# flow {flow!r} is your own: from a Python script that registers it again "
        "(vaeflow.flows.register_flow)",
        f"vaeflow.cli.main({['eval', path]!r})",
        *([resume] if resumable else []),
    ]


def budget_options(budget: Mapping[str, Any]) -> list[str]:
    """The ``vaeflow train --resume`` options that set ``budget`` (budget keys are among what a
    resume may change, ``vaeflow.runs.RESUMABLE``): ``--max-epochs N``, ``--max-steps N``,
    ``--set max_minutes=M``, and ``--set KEY=none`` for no limit (no named option says that)."""
    args: list[str] = []
    for key, value in sorted(budget.items()):
        if value is None:
            args += ["--set", f"{key}=none"]
        elif key in ("max_epochs", "max_steps"):
            args += [f"--{key.replace('_', '-')}", str(value)]
        else:
            # exact, so that the run's config holds the very value that a grid compares
            text = f"{value:g}"
            args += ["--set", f"{key}={text if float(text) == value else repr(value)}"]
    return args


def larger_budget(
    config: TrainConfig, results: Mapping[str, Any], seconds: float | None = None
) -> list[str]:
    """``vaeflow train --resume`` options that give again each budget (epochs, minutes, steps)
    that a finished run stopped by a budget has spent, on top of what it used (epochs and
    steps doubled; minutes: those it trained, ``seconds``, plus the budget, rounded up to a
    tenth): the one its stop names, and any other spent too, which would keep the resume from
    training; none for another stop (early stopping, a failure)."""
    if results.get("status") != "finished":
        return []
    reason = str(results.get("stop_reason", ""))
    # the stop names the first spent budget in the order epochs, minutes, steps
    by_epochs, by_time = reason.startswith("max_epochs="), reason.startswith("time budget")
    if not (by_epochs or by_time or reason.startswith("max_steps=")):
        return []
    budget: dict[str, Any] = {"max_epochs": 2 * config.max_epochs} if by_epochs else {}
    minutes, steps = config.max_minutes, config.max_steps
    if minutes is not None and (by_time or (by_epochs and (seconds or 0.0) >= 60 * minutes)):
        more = 2 * minutes if seconds is None else seconds / 60 + minutes
        budget["max_minutes"] = math.ceil(more * 10) / 10
    if steps is not None and int(results.get("steps") or 0) >= steps:
        budget["max_steps"] = 2 * steps
    return budget_options(budget)


def summary(run_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> str:
    """The closing summary of a run: what was trained, its figures, its files, what next."""
    run = Run(Path(run_dir))
    config = run.config
    timing = run.timing or {}
    lines = [
        "",
        f"== {config.dataset} / {config.flow}: "
        f"{_count(results.get('num_parameters', 0), 'parameter')}, {config.arch} networks, "
        f"latent {config.latent_dim}",
        *(f"   {line}" for line in figures(results)),
    ]
    solves = solver_text(results.get("solver") or [])
    if solves:
        trace = f", {results['trace']} trace" if results.get("trace") else ""
        if results.get("test_nfe_forward") is not None:
            trace += f", NFE {results['test_nfe_forward']:.1f} per test solve"
        lines.append(f"   ODE solves: {solves}{trace}")
    trained = [_count(results.get("epochs"), "epoch"), _count(results.get("steps"), "step")]
    if timing.get("train_seconds") is not None:
        trained.append(f"{_minutes(timing['train_seconds'])} of training")
    if "train_nfe_forward_mean" in results:
        trained.append(f"NFE {results['train_nfe_forward_mean']:.1f} per forward solve")
    if results.get("stop_reason"):
        trained.append(f"stopped: {results['stop_reason']}")
    if "epochs" in results:
        lines.append(f"   {', '.join(trained)}")
        lines += [f"   {line}" for line in _tested_model(run, results)]
    files = [CONFIG, RESULTS, HISTORY, TIMING, BEST, CHECKPOINT, SAMPLES, RECONSTRUCTIONS,
             LEARNING_CURVE]
    present = [name for name in files if (run.path / name).is_file()]
    events = any(run.path.glob(EVENTS))
    if events:
        present.append("TensorBoard events")
    world_size = int(results.get("world_size", timing.get("world_size", 1)))
    # vaeflow eval's figures have no status: how the run stopped is in its results.json
    stopped = results if "status" in results else (run.results or {})
    commands = next_commands(run.path, config.flow, world_size, events=events,
                             resumable=(run.path / CHECKPOINT).is_file(),
                             train_on=larger_budget(config, stopped, timing.get("train_seconds")))
    lines += [
        f"   files in {run.path}: {', '.join(present)}",
        "   next:",
        *(f"     {command}" for command in commands),
    ]
    return "\n".join(lines)


def expand_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Run directories, or folders holding runs (searched below), in the order given; a run
    named twice (twice over, or itself and through a folder above it) is listed once, where it
    came first."""
    runs: dict[Path, Run] = {}
    for path in paths:
        if not Path(path).exists():  # a typo'd path: not "holds no run", which sends one looking
            raise RunError(f"{path} does not exist")
        found = [Run(Path(path))] if Run(Path(path)).is_run else find_runs(path)
        if not found:
            raise RunError(f"{path} is not a vaeflow run directory and holds none")
        for run in found:
            # resolved: "runs/a", "./runs/a" and a symbolic link to it are one run
            runs.setdefault(run.path.resolve(), run)
    return list(runs.values())


_COLUMNS = ("run", "dataset", "flow", "parameters", "test NELBO", "IS NLL", "unit", "epochs",
            "wall-clock", "train NFE", "settings")
# Config keys that change neither what a run learns nor its figures (eval_batch_rows, a memory
# setting, regroups the importance samples' noise: the IS figure moves within its Monte Carlo
# error, as with another seed of the evaluation): not among its settings.
LOG_ONLY_KEYS = frozenset({"data_dir", "log_every", "image_every", "pictures", "checkpoint_every",
                           "eval_batch_rows"})


def _text(value: Any) -> str:
    """A setting as one writes it on the command line (TOML-like): ``true``, ``[64, 64]``."""
    return value if isinstance(value, str) else json.dumps(value)


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """A run's settings as plain JSON values (lists, not tuples): the training keys, and the
    flow's hyperparameters as ``FLOW.KEY`` (``ffjord.method``) with the class defaults filled
    in, so that a default left out and the same value set are one setting; the keys that only
    change the logs or the pictures are left out. ``vaeflow compare`` and TensorBoard's HParams
    tab show them."""
    values = {k: v for k, v in config.to_dict().items() if k not in LOG_ONLY_KEYS}
    try:
        defaults = flow_hyperparameters(config.flow)
    except ValueError:  # a flow of one's own that this process has not registered
        defaults = {}
    hyper = {**defaults, **values.pop("flow_kwargs")}
    values.update({f"{config.flow}.{k}": v for k, v in hyper.items()})
    return json.loads(json.dumps(values, default=str))


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """Per run, the settings (:func:`run_settings`) in which the runs differ, as ``key=value``
    words: training keys (``seed=1``) and, among the runs of one flow, its hyperparameters
    (``ffjord.method=rk4``). The data set and the flow are left out: they have columns."""
    plain = [run_settings(run.config) for run in runs]
    keys = sorted({k for c in plain for k in c} - {"dataset", "flow"})
    varying = []
    for key in keys:
        flow = key.split(".")[0] if "." in key else None
        group = [c for c in plain if flow is None or c["flow"] == flow]
        if len(group) > 1 and any(c.get(key) != group[0].get(key) for c in group):
            varying.append(key)
    return [" ".join(f"{k}={_text(c[k])}" for k in varying if k in c) for c in plain]


def compare_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run, as plain JSON values (``vaeflow compare --json``): ``run``, ``dataset``,
    ``flow``, ``status`` (``finished``; ``unfinished``, ``failed`` when its final evaluation
    failed, or ``not evaluated``: a model saved by :func:`vaeflow.evaluate.save_run` with
    ``evaluate=False``: ``vaeflow eval`` measures it, ``evaluate=True`` records its figures),
    ``parameters``, ``test NELBO``, ``IS NLL`` and the best ``valid NELBO`` so far in
    ``unit`` (bits/dim for a data set reported so, Frey Faces; else nats), ``epochs``,
    ``wall-clock seconds`` (of training and validation; so far, for a run not finished),
    ``train NFE`` (mean function evaluations per training solve), ``test points`` and
    ``IS points`` (the test points of the NELBO and of the IS NLL: the IS estimate, 100 times
    dearer, is often made on a seeded subset of them) and
    ``settings`` (:func:`differing_settings`); None where a run has no such figure. A run of a
    flow that this process has not registered is read all the same."""
    from vaeflow.model import count_parameters

    rows = []
    for run, settings in zip(runs, differing_settings(runs), strict=True):
        config, results, timing, history = run.config, run.results, run.timing or {}, run.history
        spec = get_spec(config.dataset)
        finished = results or {}
        nelbo, is_nll = finished.get("test_nelbo"), finished.get("test_nll_is")
        valid = min((h["valid_nelbo"] for h in history), default=None)
        seconds = timing.get("train_seconds")
        # the model is built (on the meta device) only from a flow this process knows, and
        # only where the count is not in results.json (one written by hand may lack it)
        parameters = (results or {}).get("num_parameters")
        if parameters is None and config.flow in FLOWS:
            parameters = count_parameters(config)
        if results is not None:
            status = "finished"
        else:
            if run.failure:
                status = "failed"
            elif (run.path / BEST).is_file() and not (run.path / CHECKPOINT).is_file():
                # save_run(evaluate=False): a model, no training (which checkpoints from step 0)
                status = "not evaluated"
            else:
                status = "unfinished"
            # timing.json is written when a session returns: a run killed (or still training)
            # has none, or an earlier session's; each epoch's record and the checkpoint hold
            # the same clock, summed over resumes, so the largest is the time trained so far
            seconds = max((s for s in (seconds, history[-1]["seconds"] if history else None,
                                       _checkpoint_seconds(run)) if s is not None), default=None)
        rows.append({
            "run": str(run.path), "dataset": config.dataset, "flow": config.flow,
            "status": status, "parameters": parameters,
            # in bits/dim as evaluate computes them, so a figure equals results.json's
            **{key: None if value is None else spec.in_unit(value)
               for key, value in (("test NELBO", nelbo), ("IS NLL", is_nll),
                                  ("valid NELBO", valid))},
            "unit": spec.unit,
            # a model saved by save_run has figures but no epochs of vaeflow's: unknown, not 0
            "epochs": finished.get("epochs", epochs_in(history)
                                   if history or results is None else None),
            "wall-clock seconds": seconds,
            "train NFE": finished.get("train_nfe_forward_mean"),
            "test points": finished.get("test_points"),
            "IS points": finished.get("is_points") if is_nll is not None else None,
            "settings": settings,
        })
    return rows


def _checkpoint_seconds(run: Run) -> float | None:
    """The training time in the checkpoint of an unfinished run; None where it has none or it
    does not read (a damaged file is ``vaeflow train --resume``'s to name, not the table's)."""
    try:
        return run.progress_seconds
    except RunError:
        return None


def _cells(row: Mapping[str, Any]) -> dict[str, str]:
    """A row of :func:`compare_rows` as the table's text, ``-`` where there is no figure."""
    def figure(value: float | None, fmt: str | None = None) -> str:
        if value is None:
            return "-"
        return figure_text(value, row["unit"]) if fmt is None else format(value, fmt)

    nelbo = figure(row["test NELBO"])
    if row["status"] != "finished":  # not finished: its best validation NELBO so far, if any
        valid = row["valid NELBO"]
        nelbo = row["status"] + (f" (valid {figure(valid)})" if valid is not None else "")
    return {
        "run": row["run"], "dataset": row["dataset"], "flow": row["flow"],
        "parameters": figure(row["parameters"], ","), "test NELBO": nelbo,
        "IS NLL": figure(row["IS NLL"]), "unit": row["unit"], "epochs": figure(row["epochs"], "d"),
        # an unfinished run's time is so far: its test NELBO cell says it is unfinished
        "wall-clock": _minutes(row["wall-clock seconds"]),
        "train NFE": figure(row["train NFE"], ".1f"),
        "settings": row["settings"] or "-",
    }


def compare_table(runs: Sequence[Run]) -> str:
    """A plain-text table of ``runs`` (the figures in each run's ``unit``: nats; bits/dim for
    Frey Faces)."""
    figures = compare_rows(runs)
    rows = [_cells(row) for row in figures]
    # "settings" only where the runs differ in more than data set and flow
    columns = [c for c in _COLUMNS if c != "settings" or any(r[c] != "-" for r in rows)]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = "  ".join(c.ljust(widths[c]) for c in columns).rstrip()
    out = [line, "  ".join("-" * widths[c] for c in columns)]
    out += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(out + _subset_notes(figures))


def _subset_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines under the table where a run's IS NLL covers fewer test points than its NELBO (the
    config's ``is_points``, drawn with a fixed seed): the two columns are then figures of
    different sets of images."""
    groups: dict[tuple[int, int], list[str]] = {}
    for row in rows:
        is_points, points = row["IS points"], row["test points"]
        if is_points is not None and points is not None and is_points < points:
            groups.setdefault((is_points, points), []).append(row["run"])
    if not groups:
        return []
    notes = [""]
    for (is_points, points), names in groups.items():
        which = "" if len(names) == len(rows) else f" ({', '.join(names)})"
        notes.append(f"IS NLL on {is_points:,} (a seeded draw) of the {points:,} test points of "
                     f"the NELBO{which}")
    return notes
