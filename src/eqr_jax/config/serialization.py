"""Configs to and from plain dicts / JSON, and ``section.key=value`` overrides; unknown keys and
values of the wrong type are `ConfigError`s naming where."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping, Sequence

from eqr_jax.config.sections import ConfigError, RunConfig


def to_dict(cfg: Any) -> dict:
    """Nested plain-dict form of a config dataclass (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls, d: Mapping[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise `ConfigError`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(types)}")
    kwargs = {}
    for key, value in d.items():
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a JSON or command-line value to the annotated field type."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[...]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        tp = inner[0]
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes"):
                    return True
                if low in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {tp.__name__}") from None
    return value


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (e.g. ``train.lr=3e-4 model.hidden_size=128``).

    A key without a section is looked up in every section and must be unambiguous.
    """
    d = to_dict(cfg)
    sections = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.type)
                or f.name in ("model", "data", "train", "eval")}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1:
            owners = [s for s in sorted(sections) if parts[0] in d[s]]
            if parts[0] == "preset":
                raise ConfigError("choose a preset with --preset, not an override")
            if not owners:
                raise ConfigError(f"override {key!r}: unknown key")
            if len(owners) > 1:
                raise ConfigError(f"override {key!r} is ambiguous between sections {owners}; "
                                  f"write e.g. {owners[0]}.{key}")
            parts = [owners[0], parts[0]]
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(f"override {key!r}: expected <section>.<key> with section in "
                              f"{sorted(sections)}")
        section, name = parts
        if name not in d[section]:
            raise ConfigError(f"override {key!r}: unknown key {name!r} in section {section!r}; "
                              f"valid keys are {sorted(d[section])}")
        d[section][name] = value
    return from_dict(RunConfig, d)


def save(cfg: RunConfig, path) -> None:
    """Write the resolved config as JSON to ``path`` (local or gs://), atomically."""
    from eqr_jax import storage

    storage.write_text(storage.path(path), to_json(cfg))


def load(path) -> RunConfig:
    """The config saved at ``path`` (local or gs://); `ConfigError` when it is not valid."""
    from eqr_jax import storage

    text = storage.read_text(storage.path(path))
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(RunConfig, d, where=str(path))
