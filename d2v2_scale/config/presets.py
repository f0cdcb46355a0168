"""Named presets, read from the YAML files in config/presets/ (shipped with the package).

Each `NAME.yaml` holds the values that differ from the section defaults (config/schema.py,
config/model.py), grouped by section as in a run's `config.yaml`.  A file may start from another
with `base: OTHER`: the other preset's resolved values, then this file's, merged section by
section (a key given here wins; keys not given keep the base's).  Files whose name starts with
`_` are shared fragments (`base: _image`), not presets.  Keys and types are checked when a preset
is loaded into a `RunConfig` (config/loading.py), like any YAML file's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .common import ConfigError

PRESET_DIR = Path(__file__).with_name("presets")
# libyaml's safe loader where PyYAML has it (every process that imports the config reads these)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# The presets in the order `d2v2-train --help` and error messages list them: data2vec 2.0
# (docs/REFERENCE.md §1.9), its CPU-sized tiny twins, data2vec 1.0 (§2), data2vec-aqc (§3.9).
NAMES = ("image-base", "image-large", "image-huge", "audio-base", "audio-large", "text-base", "text-large",
         "image-tiny", "audio-tiny", "text-tiny",
         "d2v1-audio-base", "d2v1-text-base", "d2v1-image-base", "d2v1-image-tiny", "d2v1-audio-tiny",
         "d2v1-text-tiny",
         "aqc-base", "aqc-tiny")


def _read(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset file {path} does not exist (a `base:` names a preset or a _fragment in "
                          f"{PRESET_DIR})")
    try:
        d = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset file {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for k, v in d.items() if k != "base"):
        raise ConfigError(f"preset file {path} must hold a mapping of sections (model:, optim:, ...) "
                          "and optionally base: NAME")
    return d


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(name: str, _chain: tuple[str, ...] = (), _done: dict | None = None) -> dict:
    """The preset's values with its `base:` chain applied: {section: {key: value}}.  `_done`
    keeps the chains already resolved (a fresh copy is returned either way)."""
    if name in _chain:
        raise ConfigError(f"preset {name!r}: its base chain comes back to itself ({' -> '.join(_chain + (name,))})")
    if _done is not None and name in _done:
        return copy.deepcopy(_done[name])
    d = _read(name)
    base = d.pop("base", None)
    out = _deep_merge(resolve(str(base), _chain + (name,), _done), d) if base is not None else d
    if _done is not None:
        _done[name] = copy.deepcopy(out)
    return out


def _resolve_all() -> dict[str, dict]:
    done: dict[str, dict] = {}
    return {name: resolve(name, _done=done) for name in NAMES}


PRESETS: dict[str, dict] = _resolve_all()


def preset_names() -> list[str]:
    return list(PRESETS)
