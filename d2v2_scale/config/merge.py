"""Merging plain dicts (presets, YAML files, command-line overrides) into the typed sections.

Every key is checked against the section's fields (an unknown key names the closest known one)
and every value is coerced to the field's declared type, so a typo or a wrong type stops the run
with one line before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .common import ConfigError, _did_you_mean


def _check_key(obj: Any, key: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        section = where or "top level"
        raise ConfigError(f"unknown config key {(where + '.' if where else '') + key!r} in {section}"
                          f"{_did_you_mean(key, names)}; known keys: {', '.join(names)}")


def _merge(obj: Any, d: dict, prefix: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    for k, v in d.items():
        _check_key(obj, k, prefix.rstrip("."))
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, prefix=prefix + k + ".")
        else:
            f = {f.name: f for f in dataclasses.fields(obj)}[k]
            setattr(obj, k, _coerce(v, f, obj, prefix + k))


def _coerce(value: Any, f: dataclasses.Field, owner: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, or raise a readable error."""
    if value == "auto" and f.metadata.get("auto"):
        return value  # resolved by build_config (optim.total_steps=auto)
    hints = typing.get_type_hints(type(owner))
    tp = hints.get(f.name, Any)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if math.isnan(v):
                raise TypeError
            return v
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if tp in (tuple, list) or origin in (tuple, list):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(value) if (tp is tuple or origin is tuple) else [
                list(x) if isinstance(x, tuple) else x for x in value]
    except (TypeError, ValueError):
        tname = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{name}={value!r} is not a valid {tname}") from None
    return value


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x
