"""Typed configuration: dataclasses loaded from JSON/YAML files with `key=value` overrides.

Every component keeps its own dataclass (e.g. `trainer.config.TrainConfig`); this module only
turns files and flags into them, rejecting unknown keys so a typo is an error, not a default.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin in (list, tuple) and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(inner, v, where) for v in value)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _coerce(args[0], value, where)
    if tp is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{where}: expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def read_file(path: str | Path, what: str = "file") -> dict:
    """A JSON or YAML (by suffix) mapping; a missing file or a syntax error names the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {p}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {p}: line {e.lineno}: {e.msg}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Config from an optional JSON/YAML file, then `a.b=value` overrides on top."""
    data: dict = read_file(path, "config file") if path else {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, data)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
