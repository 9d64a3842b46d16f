"""Reading and writing settings: `load_config(path, overrides)` builds a Config from YAML + dotted `a.b=value`
overrides; `save_config` writes the resolved config back, loadable again; `with_values` is how a Tune trial's sample
becomes a Config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from idengine.config import Config, TuneConfig


def _parse_value(text: str) -> Any:
    """`train.lr=3e-4` -> 0.0003: YAML scalars, so numbers, booleans, null and [lists] work on the command line."""
    for number in (int, float):  # YAML 1.1 reads `3e-4` as a string
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


@functools.cache
def _field_types(section: str) -> dict[str, Any]:
    """The type of every field of a config section ({} for an unknown section)."""
    if section not in {f.name for f in dataclasses.fields(Config)}:
        return {}
    return typing.get_type_hints(type(getattr(Config(), section)))


def _wrong(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key} must be {expected}, not {value!r} ({type(value).__name__})")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A config value as its field's type, or ValueError naming the key, the value and the expected type.

    Only lossless conversions: a whole number for an int (never 2.5 or True), a finite number for a float (also the
    string `3e-4`, which YAML 1.1 reads as text), true/false for a bool (never "yes please"), a list for a tuple.
    """
    args = typing.get_args(hint)
    if type(None) in args:  # `str | None`: null, or the other type
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise _wrong(key, value, "true or false")
        return bool(value)
    if hint is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise _wrong(key, value, "a whole number")
        return int(value)
    if hint is float:
        return _to_float(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise _wrong(key, value, "text (quote it in YAML: '...')")
        return value
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _wrong(key, value, "a list of names, e.g. [query, value]")
        return tuple(value)
    if origin is dict and not isinstance(value, dict):
        raise _wrong(key, value, "a mapping, e.g. {name: value}")
    return value


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, str)):
        raise _wrong(key, value, "a number")
    try:
        number = float(value)  # YAML 1.1 reads `3e-4` as a string
    except ValueError:
        raise _wrong(key, value, "a number") from None
    if not math.isfinite(number):
        raise _wrong(key, value, "a finite number")
    return number


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown sections or keys, and values of the wrong type, raise ValueError."""
    sections = {}
    for f in dataclasses.fields(Config):
        sections[f.name] = f.default_factory()  # type: ignore[misc]
    for section, values in (raw or {}).items():
        if section not in sections:
            raise ValueError(f"unknown config section {section!r}; known: {sorted(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping of keys to values, not {values!r}")
        current = sections[section]
        types = _field_types(section)
        unknown = set(values) - set(types)
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in section {section!r}; known: {sorted(types)}")
        updates = {k: _coerce(f"{section}.{k}", v, types[k]) for k, v in values.items()}
        sections[section] = dataclasses.replace(current, **updates)
    return Config(**sections)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted `section.key=value` overrides to nested dicts (a copy)."""
    merged = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) >= 3 and parts[0] == "tune" and parts[1] == "space":
            # tune.space.train.lr={loguniform: [1e-5, 1e-3]}: the rest of the key is itself a dotted config key.
            merged.setdefault("tune", {}).setdefault("space", dict(TuneConfig().space))
            merged["tune"]["space"][".".join(parts[2:])] = _parse_value(text)
            continue
        if len(parts) != 2:
            raise ValueError(f"override {item!r} must name section.key (e.g. train.lr=3e-4)")
        value = _parse_value(text)
        if _field_types(parts[0]).get(parts[1]) in (str, str | None) and value is not None:
            value = text  # text as typed: `model.revision=0123` is not the number 123
        merged.setdefault(parts[0], {})[parts[1]] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides.

    Args:
        path: YAML file with sections named like the Config fields.
        overrides: `section.key=value` strings; values are parsed as YAML scalars.

    Returns:
        The validated, frozen Config.

    Raises:
        ValueError: unknown section or key, or a value out of range.
        FileNotFoundError: the YAML file does not exist.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    try:
        return config_from_dict(apply_overrides(raw, list(overrides)))
    except ValueError as err:
        if path is None or not _valid(apply_overrides({}, list(overrides))):
            raise
        raise ValueError(f"{path}: {err}") from None  # the overrides alone are fine: the file is at fault


def _valid(raw: dict[str, Any]) -> bool:
    try:
        config_from_dict(raw)
    except ValueError:
        return False
    return True


def _read_yaml(path: Path) -> dict[str, Any]:
    """The sections of a YAML config file; FileNotFoundError or ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found (--config)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or err
        raise ValueError(f"{path}: not a readable YAML config ({what}{where})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections (data:, model:, train: ...)")
    for section, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{path}: config section {section!r} must be a mapping of keys to values, not "
                             f"{values!r}")
    return raw


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain dicts/lists (tuples become lists) for YAML/JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {name: plain(section) for name, section in dataclasses.asdict(config).items()}


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable with load_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of config with dotted keys replaced (used by Tune to turn a trial's sample into a Config)."""
    raw = config_to_dict(config)
    for key, value in values.items():
        section, name = key.split(".", 1)
        if section not in raw or name not in raw[section]:
            raise ValueError(f"unknown config key {key!r}")
        raw[section][name] = value
    return config_from_dict(raw)
