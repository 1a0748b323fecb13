"""One way to read the config files users commit, and to build checked `*Config` dataclasses.

Every setting group is a frozen dataclass named `*Config` that checks itself in
`__post_init__` (peft's pattern). A file (.toml, .yaml/.yml or .json) holds any subset of a
config's fields, nested configs as nested tables; unknown keys are an error, so a typo never
silently falls back to a default. The CLI reads its defaults from the same dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from patronus.errors import ConfigError

T = TypeVar("T")


def read_config_file(path: str | Path, what: str = "config") -> dict:
    """The settings in a .toml, .yaml/.yml or .json file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"{what} file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} file {path} is not valid: {str(e).splitlines()[0]}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{what} file {path} must hold settings (name = value), not {type(values).__name__}")
    if bad := _non_text_keys(values):
        raise ConfigError(f"{what} file {path} has setting names that are not text: {bad[0]!r}")
    return values


def _non_text_keys(values: dict) -> list:
    """Keys that are not strings, at any depth (YAML reads `? ` or `1:` as other types)."""
    bad = [k for k in values if not isinstance(k, str)]
    for v in values.values():
        if isinstance(v, dict):
            bad += _non_text_keys(v)
        elif isinstance(v, list):
            bad += [k for item in v if isinstance(item, dict) for k in _non_text_keys(item)]
    return bad


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, nested tables merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _tuples(value: Any) -> Any:
    """Lists (as files write them) to tuples (as frozen configs hold them), recursively."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "none"}


def _typed(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether `value` fits the type `hint` of a config field, and the value to use (ints
    become floats where a float belongs). Hints this does not know are accepted as they are."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, v = _typed(value, arm)
            if ok:
                return True, v
        return False, value
    if origin is tuple:
        if not isinstance(value, tuple):
            return False, value
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return False, value
        checked = [_typed(v, a) for v, a in zip(value, arms)]
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:  # NaN and infinity are never a setting (JSON and YAML can spell them)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if hint in (str, type(None)):
        return isinstance(value, hint), value
    return True, value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each {_describe(args[0])}"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def build(cls: type[T], values: dict, where: str) -> T:
    """`cls(**values)` with nested config tables built too, unknown keys and values of the wrong
    type refused (before `__post_init__` checks ranges and combinations)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} settings must be a table (name = value), not {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(values) - set(fields):
        raise ConfigError(f"unknown {where} setting(s): {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = value if isinstance(value, sub) else build(sub, value, f"{where}.{key}")
        else:
            ok, kwargs[key] = _typed(_tuples(value), sub)
            if not ok:
                raise ConfigError(f"{where}.{key} must be {_describe(sub)}, got {value!r}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a nested table where a number belongs
        raise ConfigError(f"{where} settings: {e}") from e


def default(cls: type, name: str) -> Any:
    """A field's default, so CLI flags and config dataclasses cannot drift apart."""
    f = cls.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def settings_changed(saved: dict, current: dict, defaults: dict, added: tuple[str, ...] = ()) -> bool:
    """Whether a run started with `saved` settings would now run with other ones. The settings in
    `added` (dotted paths) came to the code after runs existed: one absent from `saved` counts as
    unchanged while it keeps its default, so a new option does not strand older work directories.
    Any other missing setting is a change."""
    def filled(s: dict, c: dict, d: dict, prefix: str) -> dict:
        out = dict(s)
        for k, v in c.items():
            if k not in out and f"{prefix}{k}" in added and d.get(k) == v:
                out[k] = v
            elif isinstance(v, dict) and isinstance(out.get(k), dict) and isinstance(d.get(k), dict):
                out[k] = filled(out[k], v, d[k], f"{prefix}{k}.")
        return out

    return filled(saved, current, defaults, "") != current


def to_dict(cfg: Any) -> dict:
    """A config as plain JSON-able values (tuples become lists), for files and comparisons."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
