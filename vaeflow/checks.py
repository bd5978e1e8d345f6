"""One home for the checks of user-supplied values: each returns the value (normalized) or
raises a ``ValueError`` that names the argument, what it must be, and what it got.

They raise :class:`InputError`, a ``ValueError``: the CLI turns it (and only it, with the other
known failures) into a one-line message; any other exception is a bug and keeps its traceback.
Code that validates user input with library calls that raise a plain ``ValueError`` (building a
flow from hyperparameters, reading a data file) marks the boundary with :func:`input_errors`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "InputError",
    "input_errors",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_positive_int",
    "resolve_device",
]


class InputError(ValueError):
    """A value given by the user (an option, a config key, a file) that cannot be used."""


@contextlib.contextmanager
def input_errors(prefix: str = "") -> Iterator[None]:
    """Inside this block a ``ValueError`` (or ``TypeError``) means bad input: it is raised again
    as an :class:`InputError`, with ``prefix`` before its message."""
    try:
        yield
    except InputError as err:
        if not prefix:
            raise
        raise InputError(f"{prefix}{err}") from err
    except (ValueError, TypeError) as err:
        raise InputError(f"{prefix}{err}") from err


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An ``int`` (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (
        minimum is not None and value < minimum
    ):
        if minimum == 1:
            kind = "a positive integer"
        elif minimum is None:
            kind = "an integer"
        else:
            kind = f"an integer >= {minimum}"
        raise InputError(f"{name} must be {kind}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """An ``int`` >= 1."""
    return check_int(name, value, minimum=1)


def check_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
) -> float:
    """A real number (int or float, not a bool), finite unless ``finite=False``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and finite and not math.isfinite(value):
        ok = False
    if ok and positive and not value > 0:
        ok = False
    if ok and nonnegative and not value >= 0:
        ok = False
    if not ok:
        kind = "positive" if positive else ">= 0" if nonnegative else "a number"
        if finite:
            kind += " and finite" if positive or nonnegative else " (finite)"
        raise InputError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``True``/``False``; the strings ``true/false/True/False`` (from a command line or a
    file written by hand) are read as booleans, anything else is refused: ``"False"`` must never
    count as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InputError(f"{name} must be true or false, got {value!r}")


def check_choice(
    name: str,
    value: Any,
    choices: Sequence[str] | Mapping[str, object],
    plural: str | None = None,
) -> str:
    """One of ``choices``; the error lists them ("valid flows are none, planar, ..." with
    ``plural="flows"``, else "valid values are 'a', 'b'")."""
    if not isinstance(value, str) or value not in choices:
        if plural is None:
            raise InputError(
                f"unknown {name} {value!r}; valid values are {', '.join(map(repr, choices))}"
            )
        raise InputError(f"unknown {name} {value!r}; valid {plural} are {', '.join(choices)}")
    return value


def resolve_device(name: str) -> Any:
    """A ``torch.device``: ``"auto"`` -> CUDA when available, else CPU; anything else must name
    a device that exists here. A CPU device with an index (``"cpu:0"``) is plain ``cpu``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(
            f"invalid device {name!r} (try 'auto', 'cpu', 'cuda', 'cuda:1')"
        ) from err
    if device.type == "cpu":
        # There is one CPU device, and torch.load's map_location only knows it as "cpu": given
        # torch.device("cpu:0") it refuses every storage ("don't know how to restore data
        # location ... cpu:0"), so a run on "cpu:0" could not read back its own checkpoints.
        return torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and (
        device.index >= torch.cuda.device_count()
    ):
        raise InputError(
            f"device {name!r} asked for, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return device
