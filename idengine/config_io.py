"""Reading and writing settings: `load_config(path, overrides)` builds a Config from YAML + dotted `a.b=value`
overrides; `save_config` writes the resolved config back, loadable again; `with_values` is how a Tune trial's sample
becomes a Config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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


def _coerce(section: str, name: str, value: Any, target: Any) -> Any:
    if isinstance(target, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads `3e-4` as a string
        except ValueError:
            raise ValueError(f"{section}.{name} must be a number, not {value!r}") from None
    if isinstance(target, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts; unknown sections or keys raise ValueError."""
    sections = {}
    for f in dataclasses.fields(Config):
        sections[f.name] = f.default_factory()  # type: ignore[misc]
    for section, values in (raw or {}).items():
        if section not in sections:
            raise ValueError(f"unknown config section {section!r}; known: {sorted(sections)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        current = sections[section]
        known = {f.name for f in dataclasses.fields(current)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in section {section!r}; known: {sorted(known)}")
        updates = {k: _coerce(section, k, v, getattr(current, k)) for k, v in values.items()}
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
        merged.setdefault(parts[0], {})[parts[1]] = _parse_value(text)
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
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, list(overrides)))


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
