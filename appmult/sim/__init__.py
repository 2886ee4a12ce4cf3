"""Fast exhaustive simulation of multiplier circuits, and their hardware cost.

* :func:`synthesize` -- an Amaranth multiplier to a gate :class:`Netlist` (Yosys).
* :meth:`Netlist.from_verilog`, :meth:`Netlist.from_blif` -- a user's own circuit.
* :meth:`Netlist.evaluate`, :meth:`Netlist.exhaustive`, :meth:`Netlist.exhaustive_chunks`
  -- bit-parallel evaluation (64 vectors per machine word per gate).
* :func:`simulate_amaranth` -- Amaranth's own simulator, an independent reference.
* :func:`hardware_cost`, :meth:`Netlist.cost` -- gates, AIG size, depth, transistors, iCE40
  LUTs, switching activity, each relative to the exact multiplier.

Importing this package imports Amaranth (through appmult.hdl) but not torch.
"""

from .amaranth_sim import simulate_amaranth
from .cost import FIGURES, cost_relative, hardware_cost, logic_depth, switching_activity
from .netlist import Netlist, NetlistError, synthesize
from .yosys import YosysError, cache_dir, run_yosys, yosys_version

__all__ = [
    "FIGURES",
    "Netlist",
    "NetlistError",
    "YosysError",
    "cache_dir",
    "cost_relative",
    "hardware_cost",
    "logic_depth",
    "run_yosys",
    "simulate_amaranth",
    "switching_activity",
    "synthesize",
    "yosys_version",
]
