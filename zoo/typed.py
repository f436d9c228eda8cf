"""Typed construction of config dataclasses from plain mappings (YAML, JSON, overrides).

:func:`build` checks every key and value against a dataclass's type hints (``Literal`` enumerations included) and the
bounds its fields declare with :func:`bounded`; every error is a :class:`~zoo.errors.ConfigError` naming the full key
path. Used by the recipe schema (:mod:`zoo.config`) and by every block's and FFN's config.
"""
from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any, Literal

from zoo.errors import ConfigError


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, note: str = "", **kwargs: Any) -> Any:
    """A dataclass field with bounds, checked at construction by a :func:`checked` class (``None`` is not checked);
    ``note`` is added to the error, e.g. what ``None`` means."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt, "note": note}
    return dataclasses.field(default=default, metadata={"bounds": bounds}, **kwargs)


def checked(cls: type) -> type:
    """Class decorator (under ``@dataclass``): the bounds the fields declare with :func:`bounded` are checked whenever
    the class is constructed, before its own ``__post_init__``."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self) -> None:
        check_bounds(cls, vars(self))
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return cls


def _describe(bounds: dict[str, Any]) -> str:
    """``>= 1``, ``> 0`` or an interval such as ``[0, 1)``."""
    low = ("[", bounds["ge"]) if bounds["ge"] is not None else ("(", bounds["gt"])
    high = ("]", bounds["le"]) if bounds["le"] is not None else (")", bounds["lt"])
    if low[1] is not None and high[1] is not None:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low[1] is not None:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _within(value: Any, bounds: dict[str, Any]) -> bool:
    return all(bounds[key] is None or compare(value, bounds[key]) for key, compare in _COMPARE.items())


def check_bounds(cls: type, values: dict[str, Any]) -> None:
    """Raise a ConfigError naming the first field of dataclass ``cls`` whose value (from ``values``, else its
    default) lies outside the bounds it declares with :func:`bounded`."""
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("bounds")
        value = values.get(f.name, f.default)
        if not bounds or value is None or value is dataclasses.MISSING or _within(value, bounds):
            continue
        note = f" ({bounds['note']})" if bounds["note"] else ""
        raise ConfigError(f.name, f"must be {_describe(bounds)}{note}, got {value}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it (ints widen to floats, lists are copied)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise  # a mapping meant for this section: its own error names the key
                continue
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(path, f"expected one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(hint)
        return {k: _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if hint is type(None):
        if value is not None:
            raise ConfigError(path, f"expected null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(path, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: Any, path: str = "") -> Any:
    """Construct dataclass ``cls`` from a mapping, checking keys and types; errors carry ``path``."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(key, f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


def differences(ours: Any, theirs: Any, path: str) -> list[tuple[str, Any, Any]]:
    """``(key path, ours, theirs)`` for every leaf where two plain config trees (dicts, lists, scalars) differ; a
    section present on one side only is one entry."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for key in dict.fromkeys([*ours, *theirs]) for d in differences(ours.get(key), theirs.get(key), f"{path}.{key}")]
    return [] if ours == theirs else [(path, ours, theirs)]


def describe_differences(found: list[tuple[str, Any, Any]], ours: str, theirs: str, limit: int = 80) -> str:
    """``key (A ours, B theirs); ...`` with long values shortened."""
    def show(value: Any) -> str:
        text = "absent" if value is None else repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    return "; ".join(f"{key} ({show(a)} {ours}, {show(b)} {theirs})" for key, a, b in found)


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config dataclass tree (for YAML and JSON)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj
