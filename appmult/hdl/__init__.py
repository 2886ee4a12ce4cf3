"""Approximate multipliers as Amaranth components, and their Verilog export.

Never imports torch. Families register themselves in :data:`FAMILIES`; build one
directly (``TruncatedMultiplier(width=8, columns=4)``) or from a spec string
(``from_spec("truncated:width=8,columns=4")``).
"""

from ._base import MAX_WIDTH, MIN_WIDTH, Multiplier, Param, PartialProductMultiplier, SignMagnitudeMultiplier
from .export import RegisteredMultiplier, export_verilog
from .mac import MAX_ACC_WIDTH, MacUnit
from .registry import FAMILIES, format_spec, from_spec, parse_spec, register_family

# Importing a family registers it; this order is the order `appmult list` shows.
# isort: off
from .exact import ExactMultiplier
from .truncated import TruncatedMultiplier
from .perforated import PerforatedMultiplier
from .broken_array import BrokenArrayMultiplier
from .drum import DrumMultiplier
from .mitchell import MitchellMultiplier
from .loa import LoaArrayMultiplier
from .netlist_multiplier import (CIRCUIT_FORMAT, CIRCUIT_VERSION, GATE_OPS, NetlistMultiplier, check_circuit,
                                 circuit_digest, load_circuit)
# isort: on

__all__ = [
    "CIRCUIT_FORMAT",
    "CIRCUIT_VERSION",
    "FAMILIES",
    "GATE_OPS",
    "MAX_WIDTH",
    "MIN_WIDTH",
    "BrokenArrayMultiplier",
    "DrumMultiplier",
    "ExactMultiplier",
    "LoaArrayMultiplier",
    "MAX_ACC_WIDTH",
    "MacUnit",
    "MitchellMultiplier",
    "Multiplier",
    "NetlistMultiplier",
    "Param",
    "PartialProductMultiplier",
    "PerforatedMultiplier",
    "RegisteredMultiplier",
    "SignMagnitudeMultiplier",
    "TruncatedMultiplier",
    "check_circuit",
    "circuit_digest",
    "export_verilog",
    "format_spec",
    "from_spec",
    "load_circuit",
    "parse_spec",
    "register_family",
]
