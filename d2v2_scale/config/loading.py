"""Building a run's config: a named preset, then a YAML file, then command-line overrides
(`--model.depth 4`, `--model.depth=4` or `model.depth=4`), later ones winning.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from .common import ConfigError, _did_you_mean
from .merge import _check_key, _coerce, _merge
from .presets import PRESETS, preset_names
from .schema import RunConfig

__all__ = ["apply_overrides", "build_config", "load_preset", "load_yaml", "preset_names", "set_path"]


def load_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_did_you_mean(name, PRESETS)}; "
                          f"available: {', '.join(PRESETS)}")
    cfg = RunConfig.from_dict(copy.deepcopy(PRESETS[name]))
    cfg.preset = name
    return cfg


def load_yaml(path: str | os.PathLike, base: RunConfig | None = None) -> RunConfig:
    """Load a YAML config.  If it names a `preset`, start from that preset."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if base is None:
        base = load_preset(d["preset"]) if "preset" in d else RunConfig()
    _merge(base, d, prefix="")
    return base


def build_config(preset: str | None = None, yaml_path: str | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """Preset -> YAML -> command-line overrides, in that order (later wins)."""
    cfg = load_preset(preset) if preset else RunConfig()
    if yaml_path:
        cfg = load_yaml(yaml_path, base=cfg if preset else None)
    apply_overrides(cfg, overrides or [])
    if cfg.optim.total_steps == "auto":
        if cfg.max_steps is None:
            raise ConfigError("optim.total_steps=auto takes its value from max_steps: set max_steps too (or give "
                              "optim.total_steps a number of updates)")
        cfg.optim.total_steps = cfg.max_steps
    return cfg


def apply_overrides(cfg: RunConfig, args: list[str]) -> RunConfig:
    """Apply `--section.key value`, `--section.key=value` or `section.key=value` items."""
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" in a:
                key, value = a.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override --{a} has no value; write --{a} VALUE or {a}=VALUE")
                key, value = a, args[i + 1]
                i += 1
        elif "=" in a:
            key, value = a.split("=", 1)
        else:
            raise ConfigError(f"cannot read override {a!r}; write section.key=VALUE or --section.key VALUE")
        set_path(cfg, key.replace("-", "_"), yaml.safe_load(value) if value != "" else None)
        i += 1
    return cfg


def set_path(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for j, p in enumerate(parts[:-1]):
        _check_key(obj, p, ".".join(parts[:j]))
        obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:j + 1])} is a value, not a section")
    last = parts[-1]
    _check_key(obj, last, ".".join(parts[:-1]))
    f = {f.name: f for f in dataclasses.fields(obj)}[last]
    if dataclasses.is_dataclass(getattr(obj, last)):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} is a section; set its keys, e.g. {dotted}.KEY=VALUE")
        _merge(getattr(obj, last), value, prefix=dotted + ".")
        return
    setattr(obj, last, _coerce(value, f, obj, dotted))
