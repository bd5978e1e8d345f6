"""The ``vaeflow`` command: ``train``, ``eval``, ``compare``, ``flows``.

    vaeflow train --dataset static_mnist --flow ffjord    # the paper's model: 145 M params, a GPU
    vaeflow train --dataset static_mnist --flow ffjord --preset quick    # small: minutes on a CPU
    vaeflow train --dataset caltech --flow ffjord --preset quick --max-steps 50 --out runs/smoke
    vaeflow train --resume runs/smoke                                  # continue a killed run
    vaeflow eval runs/smoke                                            # test NELBO and IS LL
    vaeflow compare runs/mnist-planar runs/mnist-ffjord                # table and curves
    vaeflow flows                                                      # flows and their options
    vaeflow flows --dataset static_mnist                    # and what the paper's models set

The settings of a run come, lowest priority first, from :class:`vaeflow.configs.TrainConfig`'s
defaults, the papers' settings that ship with vaeflow (``vaeflow/configs/``: the shared
``protocol.toml`` and the data set's ``datasets/DATASET.toml``), a named ``--preset``
(``quick``: a small model that learns within minutes on a CPU), ``--config FILE`` (``[train]``
and ``[flows.<flow>]`` tables), and the command line (named options, then ``--set KEY=VALUE``
for any config key and ``--flow-opt KEY=VALUE`` for any flow hyperparameter; VALUE is read as
TOML: ``--flow-opt hidden_dims=[64,64]``, ``adjoint=true``).

``none`` (or ``None``, ``null``; in a file the string ``"none"``) sets an option that may be
None back to None: ``--set max_minutes=none`` drops the quick preset's time budget,
``--set max_steps=none`` a step limit. An option that takes a string keeps the word as it is
(``--flow none`` is the VAE without a flow).

This module is over 500 lines because it is the whole command line in one place: the four
commands' options, the checks that turn a wrong one into a sentence naming the valid ones, and
how each failure is told (one line for what a user fixes, a traceback for a bug); the work
itself is the library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaeflow import report
from vaeflow.checks import InputError, check_options, input_errors
from vaeflow.configs import TrainConfig, presets, resolve
from vaeflow.data import DATASETS
from vaeflow.distributed import USER_ERRORS  # one line each; the experiments catch the same
from vaeflow.flows import FFJORD, FLOWS, flow_hyperparameters
from vaeflow.nets import ARCHITECTURES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["main", "resolve_config", "parse_value", "parse_pairs", "build_parser", "USER_ERRORS"]


def _plain(text: str) -> str:
    """reStructuredText markup of a docstring dropped, for ``--help`` (users read it as plain
    text): ``x`` -> x, :class:`a.B` -> a.B, :func:`~a.b` -> b."""
    def role(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        return target.rsplit(".", 1)[-1] if tilde else target

    return re.sub(r":[a-z]+:`(~?)([^`]+)`", role, text).replace("``", "")


class CLIError(InputError):
    """Bad command-line input (exit status 2)."""


def parse_value(text: str) -> Any:
    """A command-line value read as TOML (numbers, booleans, lists, quoted strings), with
    Python's ``True``/``False`` read as booleans too; anything else that is not TOML is taken
    as a bare string (the config's type checks then refuse it where a number was meant)."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_pairs(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (``--set``, ``--flow-opt``) -> ``{KEY: value}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{option} takes KEY=VALUE, got {item!r}")
        key, value = key.strip(), value.strip()
        out[key] = parse_value(value)
        kind = {"{": "table", "[": "list"}.get(value[:1])
        if kind is not None and isinstance(out[key], str):
            # meant as a table or a list, but not TOML: most often a string without quotes
            example = '{method="dopri5", atol=1e-6}' if kind == "table" else '["a", "b"]'
            raise CLIError(
                f"{option} {key}={value} is not a TOML {kind}: its strings need quotes, as in "
                f"{key}='{example}' (the shell's quotes around it keep the inner ones)"
            )
    return out


# named options of `train`: argparse dest -> config key
_NAMED = {
    "arch": "arch",
    "device": "device",
    "seed": "seed",
    "max_epochs": "max_epochs",
    "max_steps": "max_steps",
    "data_dir": "data_dir",
    "lr": "lr",
    "batch_size": "batch_size",
    "warmup_epochs": "warmup_epochs",
    "early_stopping_epochs": "early_stopping_epochs",
}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``vaeflow train`` arguments, through
    :func:`vaeflow.configs.resolve` (see the module docstring)."""
    overrides = {key: getattr(args, dest) for dest, key in _NAMED.items()
                 if getattr(args, dest) is not None}
    overrides.update(parse_pairs(args.set, "--set"))
    return resolve(
        args.dataset,
        args.flow,
        overrides,
        flow_options=parse_pairs(args.flow_opt, "--flow-opt"),
        preset=args.preset,
        config_file=args.config,
        paper=not args.no_dataset_config,
    )


def _default_out(dataset: str, flow: str) -> Path:
    return Path("runs") / f"{dataset}-{flow}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args: argparse.Namespace) -> int:
    from vaeflow.train import train

    if args.resume:
        if args.dataset or args.flow:
            from vaeflow.runs import read_config

            # Naming the run's own data set or flow again changes nothing.
            saved = read_config(args.resume, any_flow=True)
            if args.dataset == saved.dataset:
                args.dataset = None
            if args.flow == saved.flow:
                args.flow = None
        if (args.dataset or args.flow or args.config or args.flow_opt or args.preset
                or args.no_dataset_config):
            raise CLIError(
                "--resume continues a run with its saved config; drop --dataset/--flow/"
                "--preset/--config/--flow-opt/--no-dataset-config (start a new run with --out "
                "to change them)"
            )
        if args.out or args.overwrite or args.print_config:
            raise CLIError("--resume writes into RUN_DIR itself; drop --out/--overwrite/"
                           "--print-config")
        # What may change on the way (device, data directory, budget) takes effect; anything
        # else is refused by name, never ignored.
        changes = {key: getattr(args, dest) for dest, key in _NAMED.items()
                   if getattr(args, dest) is not None}
        changes.update(parse_pairs(args.set, "--set"))
        results = train(resume=args.resume, changes=changes, progress=not args.quiet)
        run_dir = Path(args.resume)
    else:
        missing = [name for name in ("dataset", "flow") if getattr(args, name) is None]
        if missing:
            raise CLIError(
                f"train needs --{' and --'.join(missing)} (or --resume RUN_DIR); data sets: "
                f"{', '.join(DATASETS)}; flows: {', '.join(FLOWS)}"
            )
        config = resolve_config(args)
        if args.print_config:
            from vaeflow.model import count_parameters

            # The networks are built here for the count, as a run builds them: net_kwargs that
            # the architecture refuses are bad input, as they are in a run.
            with input_errors():
                shown = {**config.to_dict(), "num_parameters": count_parameters(config)}
            print(json.dumps(shown, indent=2, sort_keys=True))
            return 0
        run_dir = Path(args.out) if args.out else _default_out(args.dataset, args.flow)
        if _rank_zero():
            print(f"run directory: {run_dir}", file=sys.stderr)
        results = train(config, run_dir, progress=not args.quiet, overwrite=args.overwrite)
    if _rank_zero():  # under torchrun only rank 0 has the run directory (other machines may not)
        print(report.summary(run_dir, results))
    return 0


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_eval(args: argparse.Namespace) -> int:
    from vaeflow import distributed
    from vaeflow.ode import SolverError
    from vaeflow.train import evaluate_run

    # The settings are FFJORD's hyperparameters of the same names, read as --flow-opt's.
    solver = check_options(parse_pairs(args.solver, "--solver"), [FFJORD])
    world = distributed.SINGLE
    try:
        # Under torchrun the ranks share the test set. A failure leaves the session by its
        # exception, never by a return: its closing meeting would wait for a rank that died.
        with distributed.session() as world:
            results = evaluate_run(
                args.run_dir,
                device=args.device,
                eval_points=args.eval_points,
                is_samples=args.is_samples,
                is_points=args.is_points,
                data_dir=args.data_dir,
                checkpoint=args.checkpoint,
                solver=solver,
                progress=not args.json,
                world=world,
            )
    except SolverError as err:  # the run is untouched: another solve may well succeed
        _say(
            f"error: the evaluation of {args.run_dir} failed: {err}. Try other solver "
            f"settings: `vaeflow eval {args.run_dir} --solver atol=1e-6 --solver rtol=1e-6`, or "
            "fixed steps: `--solver method=rk4 --solver 'solver_options={step_size=0.05}'`"
        )
        return 1
    except RuntimeError as err:
        if not world.lost_contact(err):
            raise
        # Another rank failed (and printed why) or went silent; the run is untouched.
        _say(f"error: the evaluation of {args.run_dir} stopped: "
             f"{world.lost_contact_reason(err)}")
        return 1
    if not world.is_main:  # every rank has the figures; one prints them
        return 0
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(f"{results['dataset']} / {results['flow']} "
              f"({report.evaluated_model(args.run_dir, args.checkpoint)}; "
              f"{results['test_points']} test points)")
        print(report.summary(args.run_dir, results))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    # a JSON reader (a script) gets no file written beside it unless it asks for one
    plot = args.plot or ("none" if args.json else "compare.png")
    if plot != "none":
        from vaeflow.plots import check_figure_path, plot_learning_curves

        check_figure_path(plot)  # a bad --plot is an error before the table, not a traceback
    runs = report.expand_runs(args.runs)
    if args.json:
        print(json.dumps(report.compare_rows(runs), indent=2))
    else:
        print(report.compare_table(runs))
    if plot != "none":
        try:
            path, skipped = plot_learning_curves([run.path for run in runs], plot)
        except InputError as err:  # no epoch finished anywhere: the table is still useful
            print(f"no plot: {err}", file=sys.stderr)
        else:
            print(f"learning curves: {path}", file=sys.stderr)
            for run in skipped:
                print(f"  left out {run.path}: no epoch of it has finished", file=sys.stderr)
    return 0


def _same(a: Any, b: Any) -> bool:
    """Equal as hyperparameters: a TOML list and a tuple default with the same items are."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return list(a) == list(b)
    return a == b


def cmd_flows(args: argparse.Namespace) -> int:
    if args.preset and not args.dataset:
        raise CLIError("flows --preset needs --dataset (a preset applies over a data set's "
                         f"settings); data sets: {', '.join(DATASETS)}")
    for name, cls in FLOWS.items():
        defaults = flow_hyperparameters(name)
        opts = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "(no options)"
        print(f"{name:12s} {cls.__name__}: {opts}")
        if args.dataset is None or not defaults:
            continue
        # What a run of this flow on the data set builds: the papers' settings (and a preset).
        config = resolve(args.dataset, name, preset=args.preset)
        changed = {k: v for k, v in config.flow_kwargs.items() if not _same(v, defaults.get(k))}
        sets = ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "the class defaults"
        where = args.dataset + (f" --preset {args.preset}" if args.preset else "")
        print(f"{'':12s} {where} (latent {config.latent_dim}, context {config.context_dim}): "
              f"{sets}")
    return 0


def _paper(key: str, papers: bool = True) -> str:
    """`` (default V, the papers' protocol)`` for a help text, read from TrainConfig so that
    the text cannot drift from the value; a preset or --config may set another."""
    value = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == key)
    return f" (default {value}, the papers' protocol)" if papers else f" (default {value})"


class _Version(argparse.Action):
    """``--version``, worked out only when asked for (it runs git)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    """What a bug report or a results table needs to name the code: the package version, the
    checkout's commit (as run directories record it), torch (CUDA build or not), Python."""
    import platform

    import torch

    from vaeflow import __version__
    from vaeflow.provenance import git_commit

    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    return (f"vaeflow {__version__} (commit {git_commit()}), torch {torch.__version__}{cuda}, "
            f"Python {platform.python_version()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaeflow",
        description="VAEs with normalizing-flow posteriors (FFJORD, planar, IAF, Sylvester).",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="vaeflow's version, its checkout's commit, torch's and Python's")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a VAE (or --resume one)",
        # the docstring's use, not its last paragraph (which is for the code's readers)
        description=_plain((__doc__ or "").split("\n\nThis module is over")[0]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--dataset", choices=list(DATASETS), help="data set")
    t.add_argument("--flow", choices=list(FLOWS), help="posterior flow")
    t.add_argument("--out", help="run directory (default runs/DATASET-FLOW-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    t.add_argument("--preset", choices=presets() or None,
                   help="a named configuration that ships with vaeflow (over the paper's)")
    t.add_argument("--config", help="a TOML file with [train] and [flows.NAME] tables, and "
                   "[datasets.DATASET.train] / [datasets.DATASET.flows.NAME] for one data set")
    t.add_argument("--no-dataset-config", action="store_true",
                   help="ignore the papers' settings (vaeflow/configs): TrainConfig defaults")
    t.add_argument("--arch", choices=ARCHITECTURES, help="encoder/decoder architecture")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    t.add_argument("--seed", type=int, help=f"random seed{_paper('seed', papers=False)}")
    t.add_argument("--max-epochs", type=int,
                   help=f"stop after this many epochs{_paper('max_epochs')}")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs)")
    t.add_argument("--data-dir", help="data directory (default $VAEFLOW_DATA or a user cache)")
    t.add_argument("--lr", type=float, help=f"learning rate{_paper('lr')}")
    t.add_argument("--batch-size", type=int, help=f"training batch size{_paper('batch_size')}")
    t.add_argument("--warmup-epochs", type=int,
                   help=f"epochs of linear KL warm-up, 0: none{_paper('warmup_epochs')}")
    t.add_argument("--early-stopping-epochs", type=int,
                   help="stop after this many epochs without a better validation NELBO, 0: "
                   f"never{_paper('early_stopping_epochs')}")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any TrainConfig key (repeatable), e.g. --set max_grad_norm=100; "
                   "none sets an optional key to None: --set max_minutes=none")
    t.add_argument("--flow-opt", action="append", metavar="KEY=VALUE",
                   help="a flow hyperparameter (repeatable), e.g. --flow-opt adjoint=true")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config and the model's number of trainable "
                   "parameters (num_parameters) and exit; reads no data")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's best model on the test set")
    e.add_argument("run_dir", help="a run directory (vaeflow train --out)")
    e.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    e.add_argument("--data-dir", help="data directory (default: the run's, else $VAEFLOW_DATA "
                   "or a user cache)")
    e.add_argument("--eval-points", type=int, help="test points for the NELBO, a seeded subset "
                   "(default: the run's eval_points, all when it has none; 500 for a smoke run: "
                   "one trained with --max-steps and the default counts)")
    e.add_argument("--is-samples", type=int, help="importance samples (0: skip; default: the "
                   "run's is_samples; 10 for a smoke run)")
    e.add_argument("--is-points", type=int, help="test points for the IS estimate (default: "
                   "the run's is_points; 50 for a smoke run)")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best: the best validation epoch's model (best.pt, default); last: the "
                   "last checkpoint's (checkpoint.pt)")
    e.add_argument("--solver", action="append", metavar="KEY=VALUE",
                   help="evaluate with another ODE solver setting (repeatable; method, atol, "
                   "rtol, solver_options), e.g. --solver method=dopri5 --solver atol=1e-5")
    e.add_argument("--json", action="store_true", help="print all figures as JSON")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="a table and learning curves of runs, finished or not")
    c.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories, or folders holding runs")
    c.add_argument("--plot", metavar="PNG",
                   help="where to write the runs' learning curves, in the format its suffix "
                   "names (.png, .pdf, .svg, ...; default: compare.png in "
                   "the current folder, replaced if it exists, and none with --json; 'none': "
                   "no plot)")
    c.add_argument("--json", action="store_true",
                   help="print the table as JSON: numbers as numbers (null where a run has "
                   "none), the test figures' unit in 'unit'")
    c.set_defaults(func=cmd_compare)

    f = sub.add_parser("flows", help="list the flows and their hyperparameters")
    f.add_argument("--dataset", choices=list(DATASETS),
                   help="also show what a run on this data set sets (the papers' models)")
    f.add_argument("--preset", choices=presets() or None, help="with --dataset: over the paper's")
    f.set_defaults(func=cmd_flows)

    return parser


def _enable_faulthandler() -> None:
    """Print every thread's Python stack on a fatal signal (SIGSEGV, SIGABRT, ...).

    A C++ abort inside torch (a gloo thread at a torchrun job's teardown, say) otherwise ends
    the process with one line such as "terminate called without an active exception" and no
    hint of what Python was doing. Only the console script does this: a caller of
    :func:`main` in its own process (a test, a notebook) keeps its own stderr settings."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor
        pass


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an option the command does not know is refused by the
    command's own parser (``vaeflow train: error: ...``, with train's usage, which names its
    options) and with the nearest option named: argparse leaves such words to the top-level
    parser, whose usage names only ``COMMAND``."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    after = argv[argv.index(args.command) + 1:] if args.command in argv else []
    if not extra or not all(word in after for word in extra):
        return parser.parse_args(argv)  # before the command: the top-level parser's own error
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = commands.choices[args.command]
    known = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
    # train: a config key or a flow hyperparameter spelt as an option (--max-minutes)
    keys = {f.name for f in dataclasses.fields(TrainConfig)} if args.command == "train" else set()
    hyper = {k for name in FLOWS for k in flow_hyperparameters(name)} if keys else set()
    hints = []
    for word in extra:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            key = option.lstrip("-").replace("-", "_")
            if key in keys:
                near = [f"--set {key}=VALUE"]
            elif key in hyper:
                near = [f"--flow-opt {key}=VALUE"]
            else:
                near = difflib.get_close_matches(option, known, n=2)
            if near:
                hints.append(f"{option}: did you mean {' or '.join(near)}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    command.error(f"unrecognized arguments: {' '.join(extra)}{hint}; `vaeflow {args.command} "
                  "--help` describes every option")


def _say(text: str, before: str = "") -> None:
    """``vaeflow: TEXT`` on stderr in one write, the newline with it: under torchrun every rank
    says why it stopped on the same stderr, and ``print``'s two writes (text, then newline)
    let another rank's message in between, on the same line."""
    sys.stderr.write(f"{before}vaeflow: {text}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaeflow`` console script; returns the exit status."""
    if argv is None:
        _enable_faulthandler()
    argv = list(sys.argv[1:] if argv is None else argv)
    from vaeflow.train import TrainingError

    try:
        args = _parse(build_parser(), argv)
        status = int(args.func(args))
        sys.stdout.flush()  # here, not at exit, so that a reader gone away is caught below
        return status
    except USER_ERRORS as err:
        _say(f"error: {err}")
        return 2
    except BrokenPipeError:
        # The reader went away (``vaeflow flows | head``): nothing is wrong, so no traceback.
        # Point stdout at devnull, or Python's own flush at exit would raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by it
    except OSError as err:
        if err.filename is None:  # not about a file: a bug, or the OS failing us elsewhere
            raise
        # read-only folder, a path through a regular file, a full disk: the path and the reason
        _say(f"error: {err.filename}: {err.strerror or err}")
        return 1
    except TrainingError as err:
        # Most of these messages already begin "training stopped at step ...": say it once.
        message = str(err)
        if not message.startswith("training stopped"):
            message = f"training stopped: {message}"
        _say(message)
        return 1
    except KeyboardInterrupt as err:
        _say(f"interrupted. {err}", before="\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
