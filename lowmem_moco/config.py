"""Loading a run configuration and validating it: YAML recipes layered over the schema's
defaults (schema.py), plus dotted overrides.

    cfg = load_config("recipes/demo.yaml", ["train.epochs=3", "model.arch=resnet50"])

Every mistake (unknown key, wrong type, impossible combination) raises `ConfigError`
with the key's dotted name and what to do instead. The checks of a config's values live in
validation.py (re-exported here, as are the schema's names, for the modules that read them).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import (ALIASES, AUGMENT_LISTS, CHOICES, DATA_SOURCES, IMAGENET_MEAN, IMAGENET_STD, OPTIMIZERS,
                     PRECISIONS, AugmentConfig, Config, DataConfig, EvalConfig, MocoConfig, ModelConfig, PerView,
                     TrainConfig)
from .validation import get_key, resolve_precision, validate, validate_augment, validate_for_processes

__all__ = [  # the schema, re-exported, and what this module adds
    "ALIASES", "AUGMENT_LISTS", "CHOICES", "DATA_SOURCES", "IMAGENET_MEAN", "IMAGENET_STD", "OPTIMIZERS",
    "PRECISIONS", "AugmentConfig", "Config", "DataConfig", "EvalConfig", "MocoConfig", "ModelConfig",
    "TrainConfig", "read_recipe", "parse_override", "load_config", "config_from_dict", "flat_config",
    "config_yaml", "save_config", "get_key", "validate_augment", "validate", "validate_for_processes",
    "resolve_precision",
]


# ---------------------------------------------------------------- loading and overrides


def _all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        keys += _all_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return keys


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are.

    YAML 1.1 reads `no`/`off` as booleans and a quoted `'no'` as a string: both spellings are
    accepted for bool keys and for enumerated values (CHOICES, ALIASES).
    """
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if base == PerView:  # one number (both views) or a list (validation checks it holds two)
        if isinstance(value, (list, tuple)) and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a number or [view 1, view 2], got {value!r} ({where}); "
                              f"e.g. {key}=[1.0,0.1]")
        base = list if isinstance(value, (list, tuple)) else float
    if base is list:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r} ({where}); e.g. {key}=[0.2,1.0]")
        return [float(v) for v in value]
    if key == "train.micro_batch_size" and isinstance(value, str):  # auto: resolved when training starts
        if value == "auto":
            return value
        raise ConfigError(f"train.micro_batch_size must be an integer, null or auto; got {value!r} ({where})")
    if base is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        value = _BOOL_WORDS[value.lower()]
    if key in ALIASES and isinstance(value, (str, bool)):
        value = ALIASES[key].get(value.lower() if isinstance(value, str) else value, value)
    if base is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as text; it is the number everyone means
    if base is str and key not in CHOICES and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML reads 2024 or 40 as numbers; a text key takes them as written
    if key in CHOICES and not isinstance(value, str):
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {value!r} ({where})")
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
    )
    if not ok:
        expected = base.__name__ + (" or null" if optional else "")
        raise ConfigError(f"{key} must be {expected}, got {value!r} ({where}); fix the value")
    return float(value) if base is float else value


def _apply(cfg: Any, key: str, value: Any, where: str) -> None:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown key {key!r} ({where}){_suggest(key)}")
        hint = _hints(type(node))[part]
        if hint is dict:  # free-form mapping: the rest of the dotted key is one entry's name
            _set_entry(getattr(node, part), ".".join(parts[: i + 1]), ".".join(parts[i + 1:]), value, where)
            return
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.<name>=... ({where})")
            setattr(node, part, _coerce(key, value, hint, where))
        else:
            node = getattr(node, part)


def _set_entry(mapping: dict, key: str, name: str, value: Any, where: str) -> None:
    if name:  # dotted names nest, so recipes may hold nested mappings (e.g. block_args)
        *outer, last = name.split(".")
        for part in outer:
            mapping = mapping.setdefault(part, {})
        mapping[last] = value
    elif isinstance(value, dict) or value is None:
        mapping.clear()
        mapping.update(value or {})
    else:
        raise ConfigError(f"{key} must be a mapping, got {value!r} ({where}); "
                          f"e.g. {key}.zero_init_last=false")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}; give the path to a .yaml recipe (see recipes/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (e.g. 'train: {{epochs: 10}}')")
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict = (),
                base: Config | None = None) -> Config:
    """Defaults (or `base`, e.g. a finished run's config), then the recipe, then overrides:
    `key=value` strings (the command line's, values read as YAML) or a dict of dotted keys to
    values (Python callers, e.g. {"train.epochs": 1})."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if recipe is not None:
        for key, value in _flatten(read_recipe(recipe)).items():
            _apply(cfg, key, value, f"in {recipe}")
    if isinstance(overrides, dict):
        pairs, where = overrides.items(), "in the overrides"
    else:
        pairs, where = map(parse_override, overrides), "on the command line"
    for key, value in pairs:
        _apply(cfg, key, value, where)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a saved config (e.g. output_dir/config.yaml or a checkpoint's copy)."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _apply(cfg, key, value, "in a saved config")
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with flat lists on one line ([0.2, 1.0]), as recipes write them."""


_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", items, flow_style=not any(isinstance(v, (list, dict)) for v in items)))


def flat_config(cfg: Config) -> dict:
    """{dotted key: value}, lists and mappings as text: what experiment trackers store as hyper-parameters."""
    return {key: value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
            for key, value in _flatten(cfg.to_dict()).items()}


def config_yaml(cfg: Config) -> str:
    """The config as YAML, in schema order."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
