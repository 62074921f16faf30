"""Checked dataclasses: the machinery behind `CompressionConfig` and every method's settings.

A `Validated` dataclass runs its `validate()` when built and again on every later assignment; an invalid assignment
raises a `ValueError` naming the field and what is allowed, and keeps the old value. `check_types` converts what a
YAML file or a command line gives (ints for floats, lists for tuples) and refuses the rest. Written by hand: the
dataclass-validation libraries (pydantic, attrs validators) would replace the plain dataclasses that transformers'
`HfArgumentParser` and the recipes read.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, is_dataclass

_MISSING = object()


def check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"CompressionConfig.{name}={value!r} is invalid: allowed {allowed}")


def check_ratios(name: str, values, low: float, high: float) -> None:
    ok = values is not None and len(values) > 0 and all(low < float(v) <= high for v in values)
    check(ok, name, values, f"a non-empty list of numbers in ({low}, {high}]")


def conform(value, hint) -> tuple[bool, object]:
    """(whether `value` has the annotated type `hint`, the value converted: ints to float for float fields, an
    integral float to int for int fields, lists to tuples for tuple fields). Numbers must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for option in args:
            if option is not type(None):
                ok, converted = conform(value, option)
                if ok:
                    return True, converted
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            return False, value
        items = [conform(item, args[index] if origin is tuple else args[0]) for index, item in enumerate(value)]
        if not all(ok for ok, _ in items):
            return False, value
        converted = [item for _, item in items]
        return True, tuple(converted) if origin is tuple else converted
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float:
        return is_number and math.isfinite(value), float(value) if is_number else value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    if is_dataclass(hint):
        return isinstance(value, hint), value
    return True, value


def describe_type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if option is type(None) else describe_type(option) for option in args)
    if origin is list:
        return f"a list of {describe_type(args[0])}s"
    if origin is tuple:
        return f"{len(args)} values ({', '.join(describe_type(arg) for arg in args)})"
    names = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(config, prefix: str) -> None:
    """Every field of `config` holds its annotated type (so that the range checks never meet a string)."""
    hints = typing.get_type_hints(type(config))
    for config_field in fields(config):
        value = getattr(config, config_field.name)
        ok, converted = conform(value, hints[config_field.name])
        check(ok, f"{prefix}{config_field.name}", value, describe_type(hints[config_field.name]))
        if converted is not value:
            object.__setattr__(config, config_field.name, converted)


class Validated:
    """Dataclass mixin: validated when built (`__post_init__`) and again on every later assignment to a field; an
    invalid assignment raises the field-naming `ValueError` and leaves the old value in place."""

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_") or not self.__dict__.get("_built"):
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name, _MISSING)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except ValueError:
            if old is _MISSING:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        raise NotImplementedError


def from_dict(cls, values: dict, prefix: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"CompressionConfig.{prefix}" if prefix else "CompressionConfig"
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)


__all__ = ["Validated", "check", "check_ratios", "check_types", "conform", "describe_type", "from_dict"]
