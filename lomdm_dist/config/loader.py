"""YAML + ``key.sub=value`` overrides -> a validated :class:`Config`.

Why hand-written rather than OmegaConf: the checks we need (unknown keys, Literal choices, tuples,
messages that name the full dotted key) are ~100 lines over ``dataclasses`` and PyYAML, and the
typed dataclasses stay the single source of truth without a second schema language.

Files and override values are read by one YAML dialect (:class:`ConfigLoader`): PyYAML's safe
loader, whose YAML 1.1 rules read ``1e-3`` as a string, taught YAML 1.2's floats. An integer key
also takes a number in exponent form whose value is whole (``train.max_steps=1e3``); ``1000.0``
or ``1.5`` stay errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .schema import Config

_FLOAT = re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?      # 3.0, 3., 3.0e-4, 3.0e4
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                  # 3e-4, 1E6
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?           # .5, -.5e-3
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*        # 190:20:30.15 (YAML 1.1 base 60)
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
"""Plain scalars read as floats: PyYAML's YAML 1.1 set plus YAML 1.2's exponent forms (``1e-3``,
``1.0e3``), which YAML 1.1 reads as strings although every config author means a number."""

_FLOAT_TAG = "tag:yaml.org,2002:float"


class YamlFloat(float):
    """A float read from YAML that remembers how it was written: a string-typed key given a
    number-like value (``run.name: 1e-3``, ``slurm.qos: 1.10``) keeps the characters as written."""

    text: str

    def __new__(cls, value: float, text: str) -> "YamlFloat":
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax; reads config files and override values,
    so ``optim.lr: 1e-3`` in a file and ``optim.lr=1e-3`` on the command line mean the same number."""

    def construct_yaml_float(self, node: yaml.ScalarNode) -> YamlFloat:
        return YamlFloat(super().construct_yaml_float(node), self.construct_scalar(node))


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":  # ahead of int, as in PyYAML, so '1e3' never becomes an integer
    ConfigLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_FLOAT_TAG, _FLOAT))
ConfigLoader.add_constructor(_FLOAT_TAG, ConfigLoader.construct_yaml_float)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader` (the config files' and overrides' dialect)."""
    return yaml.load(text, Loader=ConfigLoader)


def _plain(value: Any) -> Any:
    """``value`` with every :class:`YamlFloat` turned into a plain float (for untyped keys)."""
    if isinstance(value, YamlFloat):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _whole_exponent_form(value: Any) -> bool:
    """A number written with an exponent (``1e3``, ``2.5E4``) whose value is a whole number: the
    way large counts are written, read as the integer it names. Other floats (``1000.0``) are not."""
    return (isinstance(value, YamlFloat) and value.is_integer()
            and "e" in value.text.lower() and ":" not in value.text)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against the type ``annotation``; return it converted (int->float, list->tuple)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return _plain(value)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is Union:
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} elements, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if _whole_exponent_form(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):   # range checks such as ``x <= 0`` are all False for NaN
            raise ConfigError(f"{key} must be a finite number, got {getattr(value, 'text', value)!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value.text if isinstance(value, YamlFloat) else str(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{full}' (known under '{prefix or 'top level'}': "
                              f"{', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.max_steps=10'`` -> ``('train.max_steps', 10)``; the value is parsed as YAML, in the
    config files' dialect (:class:`ConfigLoader`), so ``optim.lr=1e-3`` is a number."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {err}") from None
    return key, value


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate."""
    if path is None:
        return config_from_yaml("", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return config_from_yaml(p.read_text(), overrides, source=f"config file {p}")


def config_from_yaml(text: str, overrides: typing.Sequence[str] = (), *, source: str = "config") -> Config:
    """:func:`load_config` for YAML text already in memory (e.g. a checkpoint's ``config.yaml``);
    ``source`` names it in error messages."""
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must hold a mapping of sections")
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "").validate()


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or the new one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
