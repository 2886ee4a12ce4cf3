"""The family registry and spec strings (``truncated:width=8,signed=true,columns=4``).

A spec is ``FAMILY`` or ``FAMILY:key=value,key=value``. Keys are ``width`` (both
operands), ``width_a``, ``width_b``, ``signed`` and the family's parameters
(``appmult list`` shows them). Values: integers, ``true``/``false``, floats, and
lists of integers in brackets (``rows=[0,2]``).
"""

from __future__ import annotations

from typing import Any

from ._base import Multiplier, Param

__all__ = ["FAMILIES", "format_spec", "from_spec", "parse_spec", "register_family"]

#: Family name -> class, in registration order.
FAMILIES: dict[str, type[Multiplier]] = {}

_COMMON = (
    Param("width", "int", None, "both operand widths (2..16)"),
    Param("width_a", "int", None, "width of operand a"),
    Param("width_b", "int", None, "width of operand b"),
    Param("signed", "bool", False, "two's complement operands and product"),
)


def register_family(cls: type[Multiplier]) -> type[Multiplier]:
    """Class decorator adding a family to :data:`FAMILIES` under ``cls.family``."""
    if not (isinstance(cls, type) and issubclass(cls, Multiplier)):
        raise TypeError(f"Only Multiplier subclasses can be registered, not {cls!r}")
    if cls.family in FAMILIES and FAMILIES[cls.family] is not cls:
        raise ValueError(f"Family name {cls.family!r} is already registered to {FAMILIES[cls.family].__name__}")
    FAMILIES[cls.family] = cls
    return cls


def _split_items(text: str) -> list[str]:
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in spec parameters {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in spec parameters {text!r}")
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def _convert(family: str, param: Param, text: str) -> Any:
    where = f"{family} parameter {param.name}"
    t = text.strip()
    try:
        if param.kind == "int":
            return int(t, 0)
        if param.kind == "float":
            return float(t)
        if param.kind == "bool":
            low = t.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if param.kind == "ints":
            if not (t.startswith("[") and t.endswith("]")):
                raise ValueError
            inner = t[1:-1].strip()
            return [int(x, 0) for x in inner.split(",")] if inner else []
    except ValueError:
        pass
    expect = {"int": "an integer", "float": "a number", "bool": "true or false",
              "ints": "a list of integers like [0,2]"}[param.kind]
    raise ValueError(f"Spec value for {where} must be {expect}, not {text!r}")


def parse_spec(spec: str) -> tuple[type[Multiplier], dict[str, Any]]:
    """Parse a spec string into a family class and constructor keyword arguments.

    Raises:
        ValueError: unknown family, unknown or repeated key, malformed value.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"A multiplier spec must be a non-empty string like 'exact:width=8', not {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in FAMILIES:
        raise ValueError(f"Unknown multiplier family {name!r}; known families: {', '.join(FAMILIES)}")
    cls = FAMILIES[name]
    params = {p.name: p for p in (*_COMMON, *cls.PARAMS)}
    kwargs: dict[str, Any] = {}
    for item in _split_items(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"Spec item {item!r} must be key=value")
        if key not in params:
            raise ValueError(f"Unknown key {key!r} for family {name!r}; "
                             f"valid keys: {', '.join(params)}")
        if key in kwargs:
            raise ValueError(f"Key {key!r} is given twice in spec {spec!r}")
        kwargs[key] = _convert(name, params[key], value)
    return cls, kwargs


def from_spec(spec: str) -> Multiplier:
    """Build a multiplier from a spec string, e.g. ``from_spec("drum:width=8,k=4")``.

    Raises:
        ValueError: malformed spec (see :func:`parse_spec`) or a parameter value the
            family rejects.
        TypeError: a parameter of the wrong type or out of range.
    """
    cls, kwargs = parse_spec(spec)
    if "width" not in kwargs and "width_a" not in kwargs and "width_b" not in kwargs:
        raise ValueError(f"Spec {spec!r} gives no width; add width=N or width_a=N,width_b=M")
    return cls(**kwargs)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(int(v)) for v in value) + "]"
    return str(value)


def format_spec(mult: Multiplier) -> str:
    """Canonical spec string of a multiplier (explicit widths, signedness and parameters)."""
    items = [f"width_a={mult.width_a}", f"width_b={mult.width_b}", f"signed={_format_value(mult.signed)}"]
    items += [f"{k}={_format_value(v)}" for k, v in mult.params.items()]
    return f"{mult.family}:" + ",".join(items)
