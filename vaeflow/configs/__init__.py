"""The papers' settings as package data, and the one resolver that turns a data set, a flow and
overrides into a :class:`TrainConfig`.

    from vaeflow.configs import resolve
    config = resolve("static_mnist", "ffjord", {"max_steps": 50}, flow_options={"adjoint": True})

Layers, lowest priority first:

1. :class:`TrainConfig`'s defaults (the papers' training protocol);
2. ``protocol.toml`` (the baselines' and FFJORD's settings shared by every data set);
3. ``datasets/<dataset>.toml`` (what differs for the data set: FFJORD's sizes);
4. a named preset, ``presets/<name>.toml`` (for example ``quick``);
5. a user's file (``config_file``, the CLI's ``--config``);
6. ``overrides`` (config keys) and ``flow_options`` (flow hyperparameters).

Every file holds a ``[train]`` table of config keys and ``[flows.<flow>]`` tables of
hyperparameters; a file's ``[flows.<flow>]`` applies only to runs of that flow. A file may also
hold ``[datasets.<dataset>.train]`` and ``[datasets.<dataset>.flows.<flow>]``: settings for runs
on that data set only, applied over the file's general ones (the quick preset's smaller decoder
for Frey Faces, whose 256-way output layer would otherwise hold 73 M parameters). The CLI, the
comparison table, the benchmark and Python users all resolve through :func:`resolve`, so the
papers' settings are written once, here, and travel with an installed wheel.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from vaeflow.checks import InputError, check_choice, input_errors
from vaeflow.configs.train_config import OPTIMIZERS, TrainConfig
from vaeflow.data import DATASETS
from vaeflow.flows import FLOWS, check_hyperparameters

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "OPTIMIZERS", "ConfigError", "resolve", "presets", "read_config_file"]

_TABLES = ("train", "flows")
_FILE_TABLES = (*_TABLES, "datasets")  # a file's top level: also per-data-set sections
# Keys that resolve's arguments set, over every layer: a layer that set them would be ignored.
_CHOSEN = ("dataset", "flow")


class ConfigError(InputError):
    """A config file that cannot be read, or holds tables or keys that mean nothing."""


def _package_file(*parts: str) -> Any:
    return resources.files(__name__).joinpath(*parts)


def presets() -> list[str]:
    """The names of the presets that ship with vaeflow."""
    folder = _package_file("presets")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _parse(text: str, source: str) -> dict[str, Any]:
    """A config file's tables, checked so that nothing in it is silently ignored: a key outside
    a table, an unknown table, data set, config key, flow or flow hyperparameter is refused,
    naming ``source`` and the valid ones."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {source} is not valid TOML: {err}") from err
    _check_tables(table, source, _FILE_TABLES)
    datasets = table.get("datasets", {})
    if not isinstance(datasets, dict) or not all(isinstance(v, dict) for v in datasets.values()):
        raise ConfigError(f"{source}: [datasets.<dataset>] must be tables")
    for name, section in datasets.items():
        with input_errors(f"{source}: "):
            check_choice("data set", name, DATASETS, "data sets")
        _check_tables(section, f"{source}: [datasets.{name}]", _TABLES)
    return table


def _check_tables(table: Mapping[str, Any], source: str, allowed: tuple[str, ...]) -> None:
    """Check one level of ``[train]`` and ``[flows.<flow>]`` tables (and, at a file's top,
    ``[datasets.<dataset>]``)."""
    loose = sorted(k for k, v in table.items() if k not in allowed and not isinstance(v, dict))
    if loose:
        raise ConfigError(
            f"{source}: key(s) {', '.join(map(repr, loose))} outside any table: config keys go "
            "in a [train] table (a line [train] above them), flow hyperparameters in "
            "[flows.<flow>]"
        )
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{source}: unknown table(s) {unknown}; valid tables are "
            + ", ".join(f"[{t}]" if t == "train" else f"[{t}.<{t[:-1]}>]" for t in allowed)
        )
    train = table.get("train", {})
    flows = table.get("flows", {})
    if not isinstance(train, dict) or not isinstance(flows, dict) or not all(
        isinstance(v, dict) for v in flows.values()
    ):
        raise ConfigError(f"{source}: [train] and [flows.<flow>] must be tables")
    with input_errors(f"{source}: [train]: "):
        TrainConfig.check_keys(train)
    chosen = sorted(set(train) & set(_CHOSEN))
    if chosen:
        raise ConfigError(
            f"{source}: [train]: {' and '.join(chosen)} cannot be set in a file: a run's data "
            "set and flow are chosen by --dataset and --flow (resolve's arguments); per-flow "
            "settings go in [flows.<flow>]"
        )
    for name, hyperparameters in flows.items():
        with input_errors(f"{source}: [flows.{name}]: "):
            check_choice("flow", name, FLOWS, "flows")
            check_hyperparameters(name, hyperparameters)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A user's TOML config file as ``{"train": {...}, "flows": {...}}``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    return _parse(text, str(path))


def _package_table(*parts: str) -> dict[str, Any] | None:
    item = _package_file(*parts)
    if not item.is_file():
        return None
    return _parse(item.read_text(), f"vaeflow/configs/{'/'.join(parts)}")


def _merge(values: dict[str, Any], table: Mapping[str, Any], flow: str, dataset: str) -> None:
    """Lay a file's settings for a run of ``flow`` on ``dataset`` over ``values``: its general
    tables, then its section for ``dataset``."""
    for level in (table, table.get("datasets", {}).get(dataset, {})):
        values.update(level.get("train", {}))
        flow_table = level.get("flows", {}).get(flow)
        if flow_table is not None:
            values["flow_kwargs"] = {**values.get("flow_kwargs", {}), **flow_table}


def resolve(
    dataset: str,
    flow: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    flow_options: Mapping[str, Any] | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    paper: bool = True,
) -> TrainConfig:
    """The :class:`TrainConfig` of a run of ``flow`` on ``dataset`` (layers in the module
    docstring). ``paper=False`` skips the package's paper settings (layers 2 and 3).

    Raises:
        ValueError: an unknown data set, flow, preset, key or hyperparameter, or a bad value;
            the message names it and the valid ones (and ``config_file``, when the file's
            values are what makes it bad).
    """
    TrainConfig.check_names(dataset, flow)
    layers: list[Mapping[str, Any] | None] = []
    if paper:
        layers += [_package_table("protocol.toml"), _package_table("datasets", f"{dataset}.toml")]
    if preset is not None:
        if preset not in presets():
            raise ConfigError(
                f"unknown preset {preset!r}; valid presets are {', '.join(presets()) or '(none)'}"
            )
        layers.append(_package_table("presets", f"{preset}.toml"))
    user_file = None if config_file is None else read_config_file(config_file)
    overrides = dict(overrides or {})
    for key, chosen in zip(_CHOSEN, (dataset, flow), strict=True):
        if key in overrides and overrides[key] != chosen:
            raise ConfigError(
                f"{key} {overrides[key]!r} set as a config key, but this run's {key} is "
                f"{chosen!r}: choose it with --{key} (resolve's {key} argument)"
            )

    def merged(*tables: Mapping[str, Any] | None, command_line: bool = True) -> dict[str, Any]:
        values: dict[str, Any] = {"dataset": dataset, "flow": flow}
        for table in tables:
            if table is not None:
                _merge(values, table, flow, dataset)
        if command_line:
            values.update(overrides)
            if flow_options:
                values["flow_kwargs"] = {**values.get("flow_kwargs", {}), **flow_options}
        return values

    try:
        return TrainConfig.from_dict(merged(*layers, user_file))
    except InputError as err:
        # A bad value is checked only once every layer is laid, so the error is matched to the
        # layers that give it alone: the command line's own (the value used where both set a
        # key), else the file's own (named as the culprit), else the file's and the command
        # line's values clash (the file named as the settings the command line's meet).
        if user_file is None or _error(merged(*layers)) == str(err):
            raise
        if _error(merged(*layers, user_file, command_line=False)) == str(err):
            raise ConfigError(f"{config_file}: {err}") from err
        raise ConfigError(f"{err} (with the settings of {config_file})") from err


def _error(values: Mapping[str, Any]) -> str | None:
    """The message of the :class:`InputError` that ``values`` make, ``None`` where they make a
    valid :class:`TrainConfig`."""
    try:
        TrainConfig.from_dict(values)
    except InputError as err:
        return str(err)
    return None
