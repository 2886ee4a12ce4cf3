"""The family registry and spec strings (``truncated:width=8,signed=true,columns=4``).

A spec is ``FAMILY`` or ``FAMILY:key=value,key=value``. Keys are ``width`` (both
operands), ``width_a``, ``width_b``, ``signed`` and the family's parameters
(``appmult list`` shows them). Values: integers, ``true``/``false``, floats, and
lists of integers in brackets (``rows=[0,2]``), and text (``path=circuit.json``). A
file-backed family (``netlist:path=circuit.json``) takes its widths from the file.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidTypeError, InvalidValueError, SpecError
from ..spec import convert_value, echo, format_value, split_spec
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
        raise InvalidTypeError(f"Only Multiplier subclasses can be registered, not {cls!r}")
    if cls.family in FAMILIES and FAMILIES[cls.family] is not cls:
        raise InvalidValueError(f"Family name {cls.family!r} is already registered to {FAMILIES[cls.family].__name__}")
    FAMILIES[cls.family] = cls
    return cls


def parse_spec(spec: str) -> tuple[type[Multiplier], dict[str, Any]]:
    """Parse a spec string into a family class and constructor keyword arguments.

    Raises:
        SpecError: unknown family, unknown or repeated key, malformed value.
    """
    name, pairs = split_spec(spec)
    if name not in FAMILIES:
        raise SpecError(f"Unknown multiplier family {echo(name)}; known families: {', '.join(FAMILIES)}")
    cls = FAMILIES[name]
    params = {p.name: p for p in (*_COMMON, *cls.PARAMS)}
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        if key not in params:
            raise SpecError(f"Unknown key {echo(key)} for family {name!r}; valid keys: {', '.join(params)}")
        kwargs[key] = convert_value(params[key].kind, value, f"{name} parameter {key}")
    return cls, kwargs


def from_spec(spec: str) -> Multiplier:
    """Build a multiplier from a spec string, e.g. ``from_spec("drum:width=8,k=4")``.

    Raises:
        SpecError: malformed spec (see :func:`parse_spec`).
        appmult.errors.InvalidTypeError, appmult.errors.InvalidValueError: a parameter
            value the family rejects.
    """
    cls, kwargs = parse_spec(spec)
    if not cls.FILE_BACKED and "width" not in kwargs and "width_a" not in kwargs and "width_b" not in kwargs:
        raise SpecError(f"Spec {echo(spec)} gives no width; add width=N or width_a=N,width_b=M")
    return cls(**kwargs)


def format_spec(mult: Multiplier) -> str:
    """Canonical spec string of a multiplier (explicit widths, signedness and parameters)."""
    items = [f"width_a={mult.width_a}", f"width_b={mult.width_b}", f"signed={format_value(mult.signed)}"]
    items += [f"{k}={format_value(v)}" for k, v in mult.params.items()]
    return f"{mult.family}:" + ",".join(items)
