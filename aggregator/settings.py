"""Checking settings from their declarations: a value of the wrong type or out of range is a ``ConfigError``.

An operator's mistake in ``aggregator.toml`` must surface as one sentence naming the setting,
before anything heavy loads, not as a ``TypeError`` deep in a round. The rules live in the
declaration itself: a dataclass field's type (``int``, ``float``, ``bool``, ``str``, ``Path``,
``tuple[str, ...]``, any of them optional, or a type that says what it ``accepts``) and its
``within`` range (``"(0, 1]"``, ``">= 1"``), so a new setting is checked without code of its own.
Imports nothing beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting, or the file holding them, is wrong; the message says which and why, in one line."""


_NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
_INTERVAL = re.compile(rf"^([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")
_BOUND = re.compile(rf"^(>=|>|<=|<)\s*({_NUMBER})$")
_COMPARE = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}


def in_range(value: float, within: str) -> bool:
    """Whether ``value`` lies ``within`` an interval (``"(0, 1]"``, ``"[1, 65535]"``) or a bound (``"> 0"``)."""
    if m := _INTERVAL.match(within):
        low_open, low, high, high_open = m[1] == "(", float(m[2]), float(m[3]), m[4] == ")"
        return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if m := _BOUND.match(within):
        return _COMPARE[m[1]](value, float(m[2]))
    raise ValueError(f"a range is an interval like '(0, 1]' or a bound like '>= 1', got {within!r}")


def describe(hint: Any) -> str:
    """The type a setting wants, as an operator reads it: "an integer", "a list of strings"."""
    args = typing.get_args(hint)
    if _is_union(hint):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_plural(args[0])}"
    if hasattr(hint, "accepts"):
        return hint.description
    return _NAMES.get(hint, f"a {getattr(hint, '__name__', hint)}")


def check_value(name: str, hint: Any, value: Any, within: str | None = None) -> Any:
    """``value`` as setting ``name`` holds it (a list becomes a tuple, a string a ``Path``, an integer
    a float where a number is wanted); a ``ConfigError`` if it is not of type ``hint`` or not ``within``."""
    ok, converted = _convert(hint, value)
    if not ok:
        raise ConfigError(f"{name} must be {describe(hint)}, got {value!r}")
    if within is not None and isinstance(converted, (int, float)) and not isinstance(converted, bool) \
            and not in_range(converted, within):
        shape = "in " if within[0] in "[(" else ""
        raise ConfigError(f"{name} must be {shape}{within}, got {value!r}")
    return converted


def read_table(path: str | Path, section: str, known: Iterable[str]) -> dict[str, Any]:
    """Table ``[section]`` of TOML file ``path`` (or the whole file when it has none), every key a known
    setting; a missing or unreadable file, a syntax error (with its line and column) or an unknown key
    (with the closest known name) is a ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 text") from None
    table = raw.get(section, raw)
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in {path} must be a table of settings, got {table!r}")
    known = list(known)
    unknown = [key for key in table if key not in known]
    if unknown:
        raise ConfigError("; ".join(f"unknown setting {key!r} in {path}{_suggestion(key, known)}" for key in unknown))
    return table


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _plural(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers"}.get(hint, describe(hint))


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(whether ``value`` is a ``hint``, the value as the setting holds it)."""
    if _is_union(hint):
        for option in typing.get_args(hint):
            ok, converted = (value is None, None) if option is type(None) else _convert(option, value)
            if ok:
                return True, converted
        return False, None
    if typing.get_origin(hint) is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_convert(item, v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hasattr(hint, "accepts"):
        return hint.accepts(value), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            return False, None
        # an integer a float cannot hold exactly would be changed without a word
        exact = math.isfinite(number) and (isinstance(value, float) or number == value)
        return exact, number if exact else None
    if hint is Path:
        path = isinstance(value, os.PathLike) or (isinstance(value, str) and value != "")
        return path, Path(value) if path else None
    raise TypeError(f"no check for settings of type {hint!r}")  # a declaration this module cannot read: a bug


def check_settings(cls: type, values: Mapping[str, Any], localns: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every field of dataclass ``cls`` in ``values``, checked against its declared type and its
    ``metadata["within"]`` range (``localns`` resolves names the module imports only for type checkers)."""
    hints = typing.get_type_hints(cls, localns=dict(localns or {}))
    return {f.name: check_value(f.name, hints[f.name], values[f.name], f.metadata.get("within"))
            for f in dataclasses.fields(cls) if f.name in values}
