"""The one override path of every command: a config file, then the command's flags, then
`--set KEY=VALUE`, built into the command's config dataclass with every value checked against
its field's type before anything loads.

A value of the wrong type, a non-finite number, a number outside its field's documented range
or an unknown key is one line naming the key, what it expects and what it got (`UserError`:
exit 2). Ranges travel with the field's type (`Annotated[int, Range(1)]`, spelled by the
aliases below: `PositiveInt`, `NonNegativeInt`, `PositiveFloat`, `NonNegativeFloat`,
`UnitFloat`), so the check, the error and the help's wording come from one place. Sections (a
dataclass field holding another config dataclass, e.g. `train`'s `loss`) are dicts checked the
same way, key by key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import tomllib

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field takes: at least `low` (more than it when `low_open`), at most
    `high`; None leaves that side open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else str(x)
        if self.low is not None and self.high is not None and not self.low_open:
            return f"in [{num(self.low)}, {num(self.high)}]"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {num(self.low)}")
        if self.high is not None:
            parts.append(f"<= {num(self.high)}")
        return " and ".join(parts)


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
UnitFloat = Annotated[float, Range(0, 1)]  # a fraction, a probability, a normalised score


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict; a clear error if it is malformed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        if p.suffix == ".toml":
            values = tomllib.loads(p.read_text())
        else:
            values = json.loads(p.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {p} is malformed: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {p} holds a {type(values).__name__}, not a mapping of "
                        "settings")
    return values


def config_values(args, fields: tuple[str, ...]) -> dict[str, Any]:
    """A command's settings as a dict: its `--config` file (if given), then each flag in
    `fields` that was given (argparse dest == config field name) on top."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in fields:
        v = getattr(args, name)
        if v is not None:
            values[name] = v
    return values


def apply_set(values: dict[str, Any], items: list[str], sections_only: bool = False) -> None:
    """Apply `--set KEY=VALUE` items to `values`: VALUE is JSON (or a bare string such as
    cosine), KEY is `name` or `section.name` (only the latter with `sections_only`)."""
    form = "SECTION.KEY=VALUE" if sections_only else "KEY=VALUE"
    for item in items:
        key, eq, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not key or (sections_only and not (dot and name)):
            raise UserError(f"--set {item!r} is not of the form {form}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if dot:
            if not isinstance(values.setdefault(section, {}), dict):
                raise UserError(f"--set {item!r}: {section} is not a section")
            values[section][name] = value
        else:
            values[key] = value


def unknown_keys_line(unknown: list[str], known, what: str, noun: str = "setting") -> str:
    """'unknown X setting(s) [...]' (or another `noun`, e.g. section), with the nearest known
    name for each when there is one, else the known names when they are few. Every refusal of
    an unknown key or section is worded by this function."""
    known = sorted(known)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{key!r}: did you mean {close[0]!r}?")
    if not hints and len(known) <= 8:
        hints.append(f"known: {', '.join(known)}")
    return f"unknown {what} {noun}(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")


def config_from(cls, values: dict[str, Any], what: str):
    """Build config dataclass `cls` from a dict (a config file merged with CLI flags), every
    value checked against its field's type; a section's dict builds its own dataclass."""
    if not isinstance(values, dict):
        raise UserError(f"{what} settings must be a mapping, not {_shown(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(unknown_keys_line(unknown, fields, what))
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {name: check_value(hints[name], value, what, name)
              for name, value in values.items()}
    return cls(**kwargs)


def field_type(cls, name: str):
    """The type annotation of field `name` of dataclass `cls` (resolved, with its range)."""
    return typing.get_type_hints(cls, include_extras=True)[name]


def check_value(tp, value, what: str, key: str):
    """`value` as field type `tp` holds it (lists become tuples where the type is a tuple, ints
    floats where it is a float, JSON's string keys ints where the keys are ints), or a one-line
    UserError."""
    try:
        return _convert(tp, value, key)
    except _Mismatch:
        raise UserError(f"{what} setting {key!r} expects {describe(tp)}, got {_shown(value)}") \
            from None


class _Mismatch(Exception):
    pass


def _convert(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Annotated:
        value = _convert(args[0], value, key)
        if not all(r.holds(value) for r in args[1:] if isinstance(r, Range)):
            raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):  # a section: named by its field
            return config_from(tp, value, key)
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    sequence = origin or tp
    if sequence in (tuple, list):  # JSON has lists only: either is taken for either
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return sequence(value)
        if sequence is tuple and not (len(args) == 2 and args[1] is Ellipsis):  # fixed length
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_convert(a, v, key) for a, v in zip(args, value, strict=True))
        return sequence(_convert(args[0], v, key) for v in value)
    if origin is dict:  # dict[K, V] (a bare dict is checked as any class below)
        if not isinstance(value, dict):
            raise _Mismatch
        key_tp, value_tp = args
        return {_dict_key(key_tp, k, key): _convert(value_tp, v, key)
                for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _dict_key(tp, k, key: str):
    if tp is int and isinstance(k, str):  # JSON and TOML keys are strings
        try:
            return int(k)
        except ValueError:
            raise _Mismatch from None
    return _convert(tp, k, key)


def describe(tp) -> str:
    """What a field of type `tp` takes, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return " ".join([describe(args[0]), *(str(r) for r in args[1:] if isinstance(r, Range))])
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} settings"
    words = {bool: "true or false", int: "an integer", float: "a finite number",
             str: "a string", Path: "a path (string)", tuple: "a list", list: "a list",
             dict: "a mapping"}
    if tp in words:
        return words[tp]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else \
            "a list [" + ", ".join(describe(a) for a in args) + "]"
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        if not args:
            return "a mapping"
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return " ".join([_plural(base), *(str(r) for r in extras if isinstance(r, Range))])
    plural = {int: "integers", float: "finite numbers", str: "strings", bool: "true/false"}
    return plural.get(tp, describe(tp))


def _shown(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True
