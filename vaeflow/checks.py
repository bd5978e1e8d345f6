"""One home for the checks of user-supplied values: each returns the value (normalized) or
raises a ``ValueError`` that names the argument, what it must be, and what it got.

They raise :class:`InputError`, a ``ValueError``: the CLI turns it (and only it, with the other
known failures) into a one-line message; any other exception is a bug and keeps its traceback.
Code that validates user input with library calls that raise a plain ``ValueError`` (building a
flow from hyperparameters, reading a data file) marks the boundary with :func:`input_errors`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "InputError",
    "input_errors",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_positive_int",
    "check_annotated",
    "check_options",
    "annotation_alternatives",
    "is_none_word",
    "is_number",
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


def check_int(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An ``int`` (not a bool) that is at least ``minimum`` and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (
        minimum is not None and value < minimum
    ) or (maximum is not None and value > maximum):
        if maximum is not None:
            low = "" if minimum is None else f"{minimum} <= "
            kind = f"an integer {low}n <= {maximum}"
        elif minimum == 1:
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


def is_number(value: Any) -> bool:
    """Whether ``value`` is a plain real number: an int or a float, not a bool (which Python
    counts as an int, and which a config means as a switch)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
) -> float:
    """A real number (int or float, not a bool), finite unless ``finite=False``."""
    ok = is_number(value)
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


def is_none_word(value: Any) -> bool:
    """Whether ``value`` is one of the words that stand for None where a value may be None:
    ``none``, ``None``, ``null`` (any case). A command line and TOML have no null of their own."""
    return isinstance(value, str) and value.lower() in ("none", "null")


def annotation_alternatives(annotation: object) -> list[str]:
    """The alternatives of a type annotation, as text: ``"int | None"`` -> ``["int", "None"]``,
    ``"Optional[dict[str, Any]]"`` -> ``["dict[str, Any]", "None"]``. Annotations are text under
    ``from __future__ import annotations``; a real type (a flow of one's own) is written out."""
    if isinstance(annotation, type):
        text = annotation.__name__
    else:
        text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
    text = text.strip()
    if text.startswith("Optional[") and text.endswith("]"):
        return [*annotation_alternatives(text[len("Optional["):-1]), "None"]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):  # split at the top-level "|" only, not inside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return ["None" if part == "NoneType" else part for part in parts]


def check_annotated(name: str, value: Any, annotation: object) -> Any:
    """``value`` read by the type ``annotation`` of its option, where a command line or a TOML
    file cannot say what it means:

    - a word of :func:`is_none_word` is None where the type admits None and takes no string (a
      string option keeps the word: ``none`` is a flow, and may be a folder);
    - a string is refused where a list is expected and no string is: Python would take
      ``"big"`` as the sequence ``('b', 'i', 'g')``.

    Anything else is returned unchanged, for the option's own checks.
    """
    if annotation is inspect.Parameter.empty or not isinstance(value, str):
        return value
    alternatives = annotation_alternatives(annotation)
    if "str" in alternatives:
        return value
    optional = "None" in alternatives
    if optional and is_none_word(value):
        return None
    lists = [a for a in alternatives if a.split("[")[0] in ("list", "tuple", "Sequence")]
    if lists:
        item = lists[0].partition("[")[2].split(",")[0].strip(" ]")
        items = {"int": " of integers", "float": " of numbers"}.get(item, "")
        raise InputError(
            f"{name} must be a list{items}{' or None' if optional else ''}, not the string "
            f"{value!r}"
        )
    return value


def check_options(
    options: Mapping[str, Any], takers: Iterable[Any], prefix: str = ""
) -> dict[str, Any]:
    """Options given as text or TOML (flow hyperparameters, ``net_kwargs``), each read by
    :func:`check_annotated` with its annotation in the signature of the first of ``takers``
    (classes or functions) that takes it; an option that none takes is left to the takers'
    own check, which names the valid ones."""
    annotations: dict[str, object] = {}
    for taker in takers:
        for param in inspect.signature(taker).parameters.values():
            annotations.setdefault(param.name, param.annotation)
    return {
        key: check_annotated(f"{prefix}{key}", value, annotations.get(key, inspect.Parameter.empty))
        for key, value in options.items()
    }


def check_device_name(name: str) -> Any:
    """``name`` as a ``torch.device`` (None for ``"auto"``), whether or not this machine has it:
    a config for a GPU may be written, printed and checked on a laptop."""
    import torch

    if name == "auto":
        return None
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(
            f"invalid device {name!r} (try 'auto', 'cpu', 'cuda', 'cuda:1')"
        ) from err


def resolve_device(name: str) -> Any:
    """A ``torch.device``: ``"auto"`` -> CUDA when available, else CPU; anything else must name
    a device that exists here. A CPU device with an index (``"cpu:0"``) is plain ``cpu``."""
    import torch

    device = check_device_name(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # There is one CPU device, and torch.load's map_location only knows it as "cpu": given
        # torch.device("cpu:0") it refuses every storage ("don't know how to restore data
        # location ... cpu:0"), so a run on "cpu:0" could not read back its own checkpoints.
        return torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        # torch names device types that this build or machine cannot use ('meta' holds no
        # data, 'mps' off a Mac, 'xpu' or 'hpu' without their build or plug-in): only the
        # accelerator it sees is taken, or the run's first transfer fails with a traceback.
        seen = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if seen is None or seen.type != device.type:
            raise InputError(
                f"device {name!r} asked for, but there is no {device.type} device here (try "
                "'auto', 'cpu', 'cuda', 'cuda:1')"
            )
        return device
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
