"""The spec-string grammar: ``FAMILY`` or ``FAMILY:key=value,key=value``.

Values are integers, ``true``/``false``, floats, lists of integers in brackets
(``rows=[0,2]``), or plain text (``path=circuit.json``: no commas, brackets or spaces at
either end). This module knows the grammar only; which families and keys exist is
:mod:`appmult.hdl.registry`'s business. Report and plot labels use :func:`short_spec`.
"""

from __future__ import annotations

from typing import Any

from .errors import SpecError

__all__ = ["VALUE_KINDS", "convert_value", "echo", "format_value", "short_spec", "split_items", "split_spec"]

#: Value kinds a spec key can have, with how a user is told to write them.
VALUE_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "ints": "a list of integers like [0,2]", "str": "text without commas or brackets"}

# Echoing a huge spec back in every message helps nobody.
_ECHO_LIMIT = 80


def echo(text: str) -> str:
    """``repr(text)``, shortened to about 80 characters for error messages."""
    r = repr(text)
    return r if len(r) <= _ECHO_LIMIT else f"{r[:_ECHO_LIMIT - 20]}...{r[-12:]} ({len(text)} characters)"


def split_items(text: str) -> list[str]:
    """Split ``key=value,...`` at the commas outside brackets; empty items are dropped.

    Raises:
        SpecError: unbalanced brackets.
    """
    return [i.strip() for i in _split_raw(text) if i.strip()]


def _split_raw(text: str) -> list[str]:
    """The items of ``text`` between the commas outside brackets, empty ones included."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SpecError(f"Unbalanced ']' in spec parameters {echo(text)}")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SpecError(f"Unbalanced '[' in spec parameters {echo(text)}")
    items.append("".join(cur))
    return items


def split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``(family, [(key, value_text), ...])`` of a spec string, family lower-cased.

    Raises:
        SpecError: not a non-empty string, an item without ``=``, a repeated key,
            unbalanced brackets.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"A multiplier spec must be a non-empty string like 'exact:width=8', not {spec!r}")
    name, _, rest = spec.strip().partition(":")
    pairs: list[tuple[str, str]] = []
    if rest.strip() and any(not i.strip() for i in _split_raw(rest)):
        raise SpecError(f"Spec {echo(spec)} has an empty item (two commas in a row, or a comma at an end)")
    for item in split_items(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"Spec item {echo(item)} must be key=value")
        key = key.strip()
        if key in (k for k, _ in pairs):
            raise SpecError(f"Key {key!r} is given twice in spec {echo(spec)}")
        pairs.append((key, value))
    return name.strip().lower(), pairs


def convert_value(kind: str, text: str, where: str) -> Any:
    """The value of one spec item of ``kind`` (a :data:`VALUE_KINDS` key).

    Raises:
        SpecError: ``text`` is not of that kind; the message names ``where``.
    """
    t = text.strip()
    try:
        if kind == "int":
            return int(t, 0)
        if kind == "float":
            return float(t)
        if kind == "bool":
            low = t.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "ints":
            if not (t.startswith("[") and t.endswith("]")):
                raise ValueError
            inner = t[1:-1].strip()
            return [int(x, 0) for x in inner.split(",")] if inner else []
        if kind == "str":
            # split_items already cut at top-level commas; a bracket would not survive a round trip.
            if not t or any(c in t for c in ",[]"):
                raise ValueError
            return t
    except ValueError:
        pass
    raise SpecError(f"Spec value for {where} must be {VALUE_KINDS[kind]}, not {echo(text)}")


def format_value(value: Any) -> str:
    """A value written as a spec string writes it (``true``, ``[0,2]``, ``4``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(int(v)) for v in value) + "]"
    return str(value)


def short_spec(spec: str) -> str:
    """A spec for plot labels: family and its own parameters, without widths and signedness.

    ``"truncated:width_a=8,width_b=8,signed=false,columns=8,compensate=false"`` becomes
    ``"truncated(columns=8)"``; default-off flags (``=false``) are left out too, and a
    signed multiplier says ``signed``.
    """
    family, _, params = spec.partition(":")
    items = split_items(params)
    keep = [kv for kv in items if not kv.startswith(("width", "signed=")) and not kv.endswith("=false")]
    if "signed=true" in items:
        keep.append("signed")
    return f"{family}({','.join(keep)})" if keep else family
