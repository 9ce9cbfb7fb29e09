"""Typed configuration: the one way every command is configured.

Every component keeps its own dataclass (e.g. `trainer.config.TrainConfig`); each default lives
there and nowhere else. This module turns a dataclass into command-line flags, and files and
flags into an instance:

    defaults (the dataclass) <- `--config FILE` (JSON/YAML, any URI) <- flags <- `--set a.b=v`

Unknown keys are an error, so a typo is an error, not a default. A command then logs its resolved
configuration (`announce`) and writes it beside its output (`save`), as TFX components record
their exec properties.

Flags are generated from the fields: `batch_size` -> `--batch-size`, a field of a section (a
nested dataclass) -> `--loss.queue-size`; the settings' own spelling (`--batch_size`) is accepted
too. Help text comes from `field(metadata={"help": ...})` or the field's trailing `# comment`;
more option strings from metadata "flags"; metadata "positional" makes a positional argument,
"required" a field that must be given, "choices" a closed set.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import re
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # what `save` writes beside a command's output
_DEST = "cfg__"  # argparse dest prefix of generated flags: never collides with a command's own


# --- values -------------------------------------------------------------------------------

def _optional_inner(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "none":
            return None
        return _coerce(_optional_inner(tp), value, where)
    if origin in (list, tuple) and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return origin(_coerce(inner, v, where) for v in value)
    if (tp is dict or origin is dict) and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: expected a JSON object, got {value!r} ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {value!r}")
        return value
    if tp is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{where}: expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: expected int, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def read_file(path: str, what: str = "file") -> dict:
    """A JSON or YAML (by suffix) mapping at any URI; a missing file or a syntax error names it."""
    from ebr import storage

    path = str(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = storage.read_text(path)
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {path}: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path}: line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def _apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
        node[leaf] = value
    return data


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """Config from an optional JSON/YAML file, then `a.b=value` overrides on top."""
    data: dict = read_file(str(path), "config file") if path else {}
    return from_dict(cls, _apply_overrides(data, list(overrides or [])))


# --- fields -------------------------------------------------------------------------------

def setting(default: Any = None, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its flag's help text and the metadata above ("flags",
    "positional", "required", "choices"); a list or dict default is copied per instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def required(help: str, **metadata: Any) -> Any:
    """A string setting with no default: the command fails naming its flag unless it is given
    (a flag, the `--config` file or `--set`)."""
    return setting("", help, required=True, **metadata)


# --- flags --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}, over the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+?)\s*$", source, re.M):
            out[m.group(1)] = m.group(2)
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(tp: Any) -> str:
    tp = _optional_inner(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return "section"
    if tp is bool:
        return "bool"
    if origin in (list, tuple):
        return "list"
    if tp is dict or origin is dict:
        return "dict"
    return "scalar"


def _leaves(cls: type, prefix: tuple[str, ...] = ()):
    """(path, field, type hint, owning class) of every non-section field, sections walked."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if _kind(tp) == "section":
            yield from _leaves(_optional_inner(tp), prefix + (field.name,))
        else:
            yield prefix + (field.name,), field, tp, cls


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """`--config`, `--set` and one flag per field of `cls`; fields of a section (a nested
    dataclass) are `--section.field` in a group of their own (see the module doc)."""
    groups: dict[str, Any] = {}
    for path, field, tp, owner in _leaves(cls):
        meta, kind, key = field.metadata, _kind(tp), ".".join(path)
        target = parser
        if len(path) > 1:
            section = ".".join(path[:-1])
            if section not in groups:
                groups[section] = parser.add_argument_group(
                    f"{section} settings", f"also --set {section}.KEY=VALUE or the config file")
            target = groups[section]
        help_text = meta.get("help", _comments(owner).get(field.name, ""))
        default = _default(field)
        if kind != "bool" and default not in ("", None, [], (), {}):
            help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        help_text = help_text.replace("%", "%%")
        dest = _DEST + key
        if meta.get("positional"):
            target.add_argument(dest, metavar=field.name.upper(), nargs="?",
                                default=argparse.SUPPRESS, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = f"{help_text} (default: {str(bool(default)).lower()})".lstrip()
        elif kind in ("list", "dict"):
            kw.update(action="append", metavar="KEY=VALUE" if kind == "dict" else "VALUE")
            kw["help"] += " (repeatable)" if kind == "dict" else " (repeatable or comma-separated)"
        else:
            kw["metavar"] = field.name.upper()
        if meta.get("choices"):
            kw["choices"] = tuple(meta["choices"])
        target.add_argument(flag_name(key), *meta.get("flags", ()), **kw)
        if "_" in key:
            # The settings' own spelling (`--learning_rate`, `--loss.queue_size`) is accepted
            # too: Vertex AI hyperparameter tuning passes `--PARAMETER_ID=value` with the ids
            # users write in their study spec.
            alias = {**kw, "help": argparse.SUPPRESS}
            if kind == "bool":
                alias["action"] = "store_true"
            target.add_argument("--" + key, **alias)
    parser.add_argument("--config", dest=_DEST + "_file", metavar="FILE", default=None,
                        help="JSON/YAML file of settings (any URI); flags and --set override it")
    parser.add_argument("--set", dest=_DEST + "_set", action="append", default=[],
                        metavar="KEY=VALUE", help="override any setting, dotted into sections "
                                                  "(repeatable)")
    return parser


def _dict_items(items: list[str], flag: str) -> dict:
    out: dict = {}
    for item in items:
        if item.lstrip().startswith("{"):
            out.update(_coerce(dict, item, flag))
            continue
        if "=" not in item:
            raise ValueError(f"{flag} {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The configuration a command's parsed arguments describe (see the module doc's order)."""
    path = getattr(args, _DEST + "_file", None)
    loaded: dict = read_file(path, "config file") if path else {}
    # Sections and mappings merge key by key (default <- file <- flags <- --set), so
    # `--params nprobe=64` or `--set loss.temperature=0.1` keeps the others' defaults.
    hints = typing.get_type_hints(cls)
    seed: dict = {}
    for field in dataclasses.fields(cls):
        kind, default = _kind(hints[field.name]), _default(field)
        if kind == "section" and default is not None:
            seed[field.name] = dataclasses.asdict(default)
        elif kind == "dict" and default:
            seed[field.name] = dict(default)
    data = _merge(seed, loaded)
    for path_, field, tp, _ in _leaves(cls):
        dest = _DEST + ".".join(path_)
        if not hasattr(args, dest):
            continue
        raw, kind = getattr(args, dest), _kind(tp)
        node = data
        for part in path_[:-1]:
            node = node.setdefault(part, {})
        if kind == "list":
            raw = [v for item in raw for v in item.split(",") if v]
        elif kind == "dict":
            current = node.get(field.name)
            raw = {**(current if isinstance(current, dict) else {}),
                   **_dict_items(raw, flag_name(".".join(path_)))}
        node[field.name] = raw
    cfg = from_dict(cls, _apply_overrides(data, list(getattr(args, _DEST + "_set", []))))
    for path_, field, _, _ in _leaves(cls):
        value = functools.reduce(getattr, path_, cfg)
        if field.metadata.get("required") and value in ("", None):
            key = ".".join(path_)
            raise ValueError(f"{flag_name(key)} is required (a flag, or {key} in --config / --set)")
    return cfg


# --- record -------------------------------------------------------------------------------

def as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def announce(command: str, cfg: Any) -> None:
    """Logs the resolved configuration a command runs with, before it starts."""
    log.info("ebr %s configuration: %s", command,
             json.dumps(as_dict(cfg), sort_keys=True, default=str))


def save(cfg: Any, directory: str, name: str = CONFIG_FILE) -> str:
    """Writes the resolved configuration beside a command's output (any URI); returns its path."""
    from ebr import storage

    path = storage.join(directory, name)
    storage.write_bytes(path, (json.dumps(as_dict(cfg), indent=2, sort_keys=True, default=str)
                               + "\n").encode())
    return path
