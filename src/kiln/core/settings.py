"""One parser for every settings block: a frozen dataclass declares the keys, their types and defaults.

`parse(Cls, raw, where)` refuses unknown keys (with a did-you-mean), checks each value against the
field's declared type, and fills in the defaults, so a block is declared once and checked the same
way everywhere: the params blocks (export, validate, benchmark, calibration, data.preprocess) and
each runtime's `options`. A field's `metadata={"doc": ...}` is what error messages quote.

Supported field types: bool, int, float (an int is taken), str, Literal[...], tuple[X, ...] (from a
list), dict (any mapping), Any, and `X | None`. Anything richer is checked by the class itself after
parsing (a `check(self, where)` method, called when present).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

from kiln.core.errors import KilnError, close_matches

T = TypeVar("T")


def known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse(cls: type[T], raw: Mapping[str, Any] | None, where: str) -> T:
    """An instance of the dataclass `cls` from `raw` (the params mapping at `where`)."""
    if raw is not None and not isinstance(raw, Mapping):
        raise KilnError(f"{where} must be a mapping of settings, got {raw!r}")
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        hint = "".join(close_matches(k, fields) for k in unknown)
        raise KilnError(f"{where} has unknown keys {unknown}{hint}; known: {describe(cls)}")
    hints = typing.get_type_hints(cls)
    values = {name: convert(value, hints[name], f"{where}.{name}") for name, value in raw.items()}
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check is not None:
        check(where)
    return settings


def describe(cls: type) -> str:
    """`key (default ...)` for each field, with its doc where it has one."""
    parts = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )  # type: ignore[misc]
        doc = f.metadata.get("doc")
        parts.append(f"{f.name}{' (' + doc + ')' if doc else ''} = {default!r}")
    return "; ".join(parts)


def convert(value: Any, kind: Any, where: str) -> Any:
    """`value` checked against the type `kind` (and lists made tuples where the type says so)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(value, option, where)
            except KilnError as e:
                errors.append(str(e))
        raise KilnError(errors[0] if len(errors) == 1 else f"{where} must be {' or '.join(_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise KilnError(f"{where} {value!r} is not one of {', '.join(map(str, args))}{close_matches(value, args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KilnError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise KilnError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise KilnError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KilnError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KilnError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise KilnError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"kiln.core.settings cannot check {where}: unsupported field type {kind!r}")


def _name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) is Literal:
        return " | ".join(map(str, typing.get_args(kind)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def to_params(settings: Any) -> dict[str, Any]:
    """The settings as params-shaped data (tuples as lists), e.g. for a run record."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
