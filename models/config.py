"""One way to declare, validate, build and print a unit's configuration.

Every unit of the suite (a model recipe, a watermark scheme, an attack, a
fingerprint) has a frozen dataclass config. Its fields declare their type
in the annotation and their bounds in :func:`option`; :func:`validate`,
called from the dataclass' ``__post_init__``, checks every field against
both and normalises what JSON gives back (lists to tuples, dicts to nested
configs, integers to floats), so a config read from a key file or a command
line is the same object as one written in Python. The command lines of
:mod:`models.cli` are generated from the same declarations.

Cross-field rules (``k <= n``) stay in the config's own ``__post_init__``,
after ``validate(self)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from models.errors import UserError

__all__ = ["as_dict", "build_config", "field_help", "fields", "option", "replace", "validate"]

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str = "",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: Sequence[Any] | None = None,
    factory: Any = _MISSING,
    cli: bool = True,
) -> Any:
    """A config field with its bounds and help text.

    Args:
        default: the default value (or ``factory`` for a mutable or nested one).
        help: one line for ``--help`` and the docs.
        low: the smallest allowed value (numbers; ``low_open`` excludes it).
        high: the largest allowed value (numbers).
        choices: the allowed values (strings).
        cli: offer the field as a command-line flag.
    """
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "cli": cli}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields(cls_or_config) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved type)`` for every field of a config class or instance."""
    cls = cls_or_config if isinstance(cls_or_config, type) else type(cls_or_config)
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, allows None)`` for ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        every = typing.get_args(tp)
        args = [a for a in every if a is not type(None)]
        inner = args[0] if len(args) == 1 else functools.reduce(operator.or_, args)
        return inner, len(args) < len(every)
    return tp, False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against type ``tp``; JSON's lists and dicts turned into tuples and configs."""
    inner, nullable = _optional(tp)
    if value is None:
        if nullable or tp is Any:
            return None
        raise UserError(f"{name} must be given, got None")
    origin = typing.get_origin(inner)
    if inner is Any:
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if inner is int:
        if hasattr(value, "__index__") and not isinstance(value, bool):
            return int(value)
        raise UserError(f"{name} must be an integer, got {value!r}")
    if inner is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            and not hasattr(value, "__float__")
        ):
            raise UserError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise UserError(f"{name} must be a number, got nan")
        return value
    if inner is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise UserError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise UserError(f"{name} must have {len(args)} values, got {value!r}")
        return tuple(
            _coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, Mapping):
            return build_config(inner, value)
        raise UserError(f"{name} must be a {inner.__name__} or a mapping of its fields")
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        for arm in typing.get_args(inner):
            try:
                return _coerce(name, value, arm)
            except UserError:
                continue
        raise UserError(f"{name} has a value of the wrong type: {value!r}")
    return value


def _check_bounds(name: str, value: Any, meta: Mapping) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(
            f"unknown {name} {value!r}; expected one of: {', '.join(map(str, choices))}"
        )
    items = value if isinstance(value, tuple) else (value,)
    low, high = meta.get("low"), meta.get("high")
    for item in items:
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        too_low = low is not None and (item <= low if meta.get("low_open") else item < low)
        too_high = high is not None and item > high
        if too_low or too_high or (isinstance(item, float) and not math.isfinite(item)):
            lo = "(" if meta.get("low_open") else "["
            bound = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise UserError(f"{name} must lie in {bound}, got {item!r}")


def validate(config: Any) -> None:
    """Check and normalise every field of the frozen dataclass ``config`` in place.

    Raises:
        UserError: a value of the wrong type or out of its declared bounds,
            naming the field, the value and what is accepted.
    """
    for f, tp in fields(config):
        value = _coerce(f.name, getattr(config, f.name), tp)
        _check_bounds(f.name, value, f.metadata)
        object.__setattr__(config, f.name, value)


def build_config(cls: type, values: Mapping[str, Any] | None = None):
    """Build config ``cls`` from ``values``, refusing keys it does not have.

    Nested configs may be given as mappings (as JSON gives them back).
    """
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"expected some of: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:
        raise UserError(f"bad options for {cls.__name__}: {exc}") from None


def replace(config: Any, **changes: Any):
    """``dataclasses.replace`` where a dotted name reaches into a nested config (``train.epochs``)."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in changes.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[name] = value
    types = dict(fields(config))
    for head, inner in nested.items():
        current = getattr(config, head, None)
        if current is None and head in {f.name for f in types}:  # unset: start from defaults
            kind, _ = _optional(types[next(f for f in types if f.name == head)])
            current = kind() if dataclasses.is_dataclass(kind) else None
        if not dataclasses.is_dataclass(current):
            raise UserError(f"{type(config).__name__} has no nested config {head!r}")
        flat[head] = replace(current, **inner)
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {type(config).__name__}; "
            f"expected some of: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(config, **flat)


def as_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON values (tuples as lists, nested configs as dicts)."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
