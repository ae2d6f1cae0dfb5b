"""Load a configuration: preset or YAML file, then ``--set`` overrides, then typed validation.

``load_config("demo")`` reads the built-in preset ``demo``; ``load_config("exp.yaml")`` reads a
file. Overrides are ``key=value`` strings with dotted keys (``teacher.optim.lr=3e-4``); the value
is parsed with ``yaml.safe_load`` and checked against the key's type before it is applied.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import yaml

from stkd_dist.config.base import convert_value, from_mapping, resolve_key, suggestion, to_mapping
from stkd_dist.config.schema import Config
from stkd_dist.errors import ConfigError
from stkd_dist.location import (
    Location,
    PathInput,
    as_path,
    location,
    read_text,
    url,
    write_text_atomic,
)

PRESET_SUFFIX = ".yaml"


def _presets_dir() -> Any:
    return resources.files("stkd_dist") / "presets"


def preset_names() -> list[str]:
    """Names of the built-in presets (``stkd config list``)."""
    return sorted(
        p.name.removesuffix(PRESET_SUFFIX)
        for p in _presets_dir().iterdir()
        if p.name.endswith(PRESET_SUFFIX)
    )


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``; an unknown name raises with a suggestion."""
    names = preset_names()
    if name not in names:
        raise ConfigError(
            f"no preset named {name!r}{suggestion(name, names)}; presets: {', '.join(names)}",
            where="--config",
        )
    return (_presets_dir() / f"{name}{PRESET_SUFFIX}").read_text(encoding="utf-8")


def read_source(ref: PathInput) -> tuple[str, str, str]:
    """``(text, source, stem)`` of a config given as a file path or a preset name.

    ``source`` names it in error messages (the path, or ``preset <name>``); ``stem`` is the default
    run name.
    """
    path = as_path(ref).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path), path.stem
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the config file ({e})", where=str(path)) from e
    text = str(ref)
    looks_like_path = os.sep in text or text.endswith((".yaml", ".yml"))
    if looks_like_path and text not in preset_names():
        raise ConfigError("no such config file (give a YAML file or a preset name)", where=text)
    return preset_text(text), f"preset {text}", text


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """``yaml.safe_load`` of a config text; syntax errors name the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML{at}: {problem}", where=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping of sections, got {type(data).__name__}", where=source
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (``3e-4`` -> 0.0003, ``null`` -> None)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE (e.g. teacher.optim.lr=3e-4), got {item!r}", "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value {raw!r} as YAML ({e})", f"--set {key}") from None
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the raw mapping ``data`` with each ``key=value`` override applied.

    Each key must exist in the schema (unknown keys raise with a suggestion) and each value must
    have the key's type.
    """
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        key, value = parse_override(item)
        tp = resolve_key(Config, key, source="--set")
        convert_value(value, tp, key, source="--set")  # type check now, with the option's name
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def config_from_text(
    text: str, source: str, default_name: str | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Parse, override and validate a config text; ``run.name`` defaults to ``default_name``."""
    data = apply_overrides(parse_yaml(text, source), overrides)
    cfg = from_mapping(Config, data, source=source)
    if cfg.run.name is None and default_name is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=default_name))
    return cfg


def load_config(ref: PathInput, overrides: Iterable[str] = ()) -> Config:
    """Load a preset name or a YAML file, apply ``key=value`` overrides, and validate.

    Raises :class:`ConfigError` naming the file and the dotted key for unknown keys (with a
    "did you mean" suggestion), wrong types (with the expected type) and out-of-range values.
    """
    text, source, stem = read_source(ref)
    return config_from_text(text, source, default_name=stem, overrides=overrides)


def dump_config(cfg: Config) -> str:
    """The config as YAML; ``config_from_text(dump_config(cfg), ...)`` equals ``cfg``."""
    return yaml.safe_dump(to_mapping(cfg), sort_keys=False, default_flow_style=False)


def write_config(cfg: Config, path: PathInput | Location) -> Location:
    """Write ``cfg`` as YAML to ``path`` (a local path or an object-store URL) atomically."""
    loc = location(path)
    write_text_atomic(loc, dump_config(cfg))
    return loc


def read_config(path: PathInput | Location) -> Config:
    """Read a resolved config written by :func:`write_config` (a run's ``config.yaml``)."""
    loc = location(path)
    try:
        text = read_text(loc)
    except OSError as e:
        raise ConfigError(f"cannot read the config ({e})", where=url(loc)) from e
    return config_from_text(text, url(loc))
