"""Typed conversion between YAML mappings and frozen config dataclasses.

Every config section is a frozen dataclass whose field annotations are the schema: ``int``,
``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[T, ...]``, ``dict[str, Any]``
and nested section dataclasses. :func:`from_mapping` checks a parsed YAML mapping against it and
raises :class:`~stkd_dist.errors.ConfigError` naming the file and the dotted key, with a
"did you mean" suggestion for unknown keys and the expected type for wrong values.
:func:`to_mapping` turns a section back into plain YAML-safe data, so ``dump`` then ``load`` gives
an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from stkd_dist.errors import ConfigError

S = TypeVar("S")

_MISSING_VALUE = object()


def suggestion(key: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or an empty string."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(prefix: str, key: str) -> str:
    if not key:
        return prefix
    return f"{prefix}.{key}" if prefix else key


def _where(source: str | None, key: str) -> str:
    if source and key:
        return f"{source}: {key}"
    return source or key or "config"


def type_name(tp: Any) -> str:
    """A short, user-facing name for a type annotation (``"int"``, ``"list of str or null"``)."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if origin in (dict, Mapping) or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit an annotation (turned into ConfigError by the caller)."""


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Convert a YAML value to annotation ``tp``; nested sections recurse with dotted keys."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return from_mapping(tp, value, source=source, prefix=key)  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp) and type(value) is not bool:
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key, source) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_convert(v, a, key, source) for v, a in zip(value, args, strict=True))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponents without a dot (``3e-4``) as strings; accept them as numbers
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # schema bug, not input


def convert_value(value: Any, tp: Any, key: str, source: str | None = None) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise :class:`ConfigError` naming ``key``."""
    try:
        return _convert(value, tp, key, source)
    except _Mismatch:
        raise ConfigError(
            f"expected {type_name(tp)}, got {value!r} ({type_name(type(value))})",
            where=_where(source, key),
        ) from None


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_mapping(
    cls: type[S], data: Mapping[str, Any] | None, source: str | None = None, prefix: str = ""
) -> S:
    """Build section ``cls`` from a parsed YAML mapping.

    Missing keys take the dataclass defaults; unknown keys and wrong types raise
    :class:`ConfigError` with ``where = "<source>: <dotted.key>"``. Errors raised by the section's
    own ``__post_init__`` checks (``ValueError``/``ConfigError``) are re-raised with the location.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping, got {type_name(type(data))}", where=_where(source, prefix)
        )
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = _join(prefix, str(key))
        if key not in types_:
            section = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(
                f"unknown key {key!r} in {section}{suggestion(str(key), types_)}; "
                f"known keys: {', '.join(types_)}",
                where=_where(source, dotted),
            )
        kwargs[key] = convert_value(value, types_[key], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # a section's own validation names its field; prefix it with the section and file
        field = e.where or ""
        raise ConfigError(e.message, where=_where(source, _join(prefix, field))) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), where=_where(source, prefix)) from None


def to_mapping(obj: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) of a section, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_mapping(v) for v in obj]
    return obj


def resolve_key(cls: type, dotted: str, source: str | None = None) -> Any:
    """The annotation at ``dotted`` (``teacher.optim.lr``) in schema ``cls``.

    Keys below a free-form ``dict`` field (``teacher.kwargs.hidden``) are accepted as they are.
    An unknown key raises :class:`ConfigError` naming the section and suggesting the closest key.
    """
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{dotted!r} is not a dotted key like 'teacher.optim.lr'", where=source)
    tp: Any = cls
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            types_ = field_types(tp if isinstance(tp, type) else type(tp))
            if part not in types_:
                section = ".".join(parts[:i])
                section_text = f"section {section!r}" if section else "the top level"
                raise ConfigError(
                    f"unknown key {part!r} in {section_text}{suggestion(part, types_)}; "
                    f"known keys: {', '.join(types_)}",
                    where=_where(source, dotted),
                )
            tp = types_[part]
        elif get_origin(tp) in (dict, Mapping) or tp is dict:
            return Any
        else:
            raise ConfigError(
                f"{'.'.join(parts[:i])!r} is a {type_name(tp)}, it has no key {part!r}",
                where=_where(source, dotted),
            )
    return tp


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp
