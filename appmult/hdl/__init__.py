"""Approximate multipliers as Amaranth components, and their Verilog export.

Never imports torch. Families register themselves in :data:`FAMILIES`; build one
directly (``TruncatedMultiplier(width=8, columns=4)``) or from a spec string
(``from_spec("truncated:width=8,columns=4")``).
"""

from ._base import MAX_WIDTH, MIN_WIDTH, Multiplier, Param, PartialProductMultiplier, SignMagnitudeMultiplier
from .exact import ExactMultiplier
from .export import RegisteredMultiplier, export_verilog
from .registry import FAMILIES, format_spec, from_spec, parse_spec, register_family

__all__ = [
    "FAMILIES",
    "MAX_WIDTH",
    "MIN_WIDTH",
    "ExactMultiplier",
    "Multiplier",
    "Param",
    "PartialProductMultiplier",
    "RegisteredMultiplier",
    "SignMagnitudeMultiplier",
    "export_verilog",
    "format_spec",
    "from_spec",
    "parse_spec",
    "register_family",
]
