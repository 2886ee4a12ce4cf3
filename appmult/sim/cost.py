"""Hardware-cost figures of a multiplier netlist, next to the exact multiplier's.

Figures (all from the same synthesized gate netlist unless noted):

* ``gates``, ``cells`` -- gate count in total and by Yosys cell type.
* ``aig_nodes`` -- two-input ANDs after ``aigmap`` of the gate netlist (inverters free).
* ``depth`` -- logic levels on the longest input-to-output path, counting every gate
  except inverters and buffers (inverters are usually absorbed into the neighbouring
  gates' polarity); ``depth_with_not`` counts them too.
* ``transistors`` -- Yosys ``stat -tech cmos`` estimate for the gate netlist.
* ``ice40_lut4``, ``ice40_carry`` -- ``synth_ice40`` of the design's source (the same
  RTL), SB_LUT4 and SB_CARRY cells.
* ``toggles_per_op`` -- switching-activity power proxy: expected number of gate
  outputs that change when one operand pair is followed by the next, with pairs drawn
  independently (uniform, or from given operand distributions);
  ``weighted_toggles_per_op`` weights each gate by its CMOS transistor count (a
  switched-capacitance proxy).

``relative`` holds each figure divided by the exact multiplier's of the same widths
and signedness (:class:`appmult.hdl.ExactMultiplier`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import InvalidValueError
from ..hdl import ExactMultiplier
from .bitparallel import GATE_TYPES, BitParallelEvaluator
from .netlist import Netlist, synthesize
from .yosys import run_yosys

__all__ = ["FIGURES", "cost_relative", "hardware_cost", "logic_depth", "switching_activity"]

#: Numeric figures that get a ratio to the exact multiplier.
FIGURES = ("gates", "aig_nodes", "depth", "depth_with_not", "transistors", "ice40_lut4", "ice40_carry",
           "toggles_per_op", "weighted_toggles_per_op")

# Transistors per gate in static CMOS, as Yosys' own ``stat -tech cmos`` counts them
# (used only to weight switching activity; the transistor figure comes from Yosys).
_CMOS = {"$_BUF_": 4, "$_NOT_": 2, "$_AND_": 6, "$_OR_": 6, "$_NAND_": 4, "$_NOR_": 4, "$_XOR_": 12,
         "$_XNOR_": 12, "$_ANDNOT_": 6, "$_ORNOT_": 6, "$_MUX_": 12}
_INVERTERS = ("$_NOT_", "$_BUF_")


def logic_depth(netlist: Netlist, *, count_inverters: bool = False) -> int:
    """Logic levels on the longest path from an operand bit to a product bit.

    Args:
        netlist: the gate netlist.
        count_inverters: count ``$_NOT_`` (and ``$_BUF_``) gates as a level.

    Returns:
        The depth (0 when every output is an input bit or a constant).
    """
    driver = {conn["Y"]: (t, conn) for t, conn in netlist.cells}
    level: dict[Any, int] = {}

    def depth_of(net: Any) -> int:
        # Iterative post-order walk: netlists of 16x16 multipliers are deeper than
        # Python's recursion limit would comfortably allow.
        stack = [net]
        while stack:
            n = stack[-1]
            if n in level:
                stack.pop()
                continue
            if n not in driver:
                level[n] = 0
                stack.pop()
                continue
            t, conn = driver[n]
            srcs = [conn[p] for p in GATE_TYPES[t]]
            pending = [s for s in srcs if s not in level]
            if pending:
                stack.extend(pending)
                continue
            step = 1 if count_inverters or t not in _INVERTERS else 0
            level[n] = max(level[s] for s in srcs) + step
            stack.pop()
        return level[net]

    return max((depth_of(n) for n in netlist.port_bits["p"]), default=0)


def _yosys_figures(netlist: Netlist) -> dict[str, Any]:
    top = netlist.top
    gate_script = "\n".join([
        "read_json netlist.json", f"hierarchy -top {top}",
        "tee -q -o cmos.txt stat -tech cmos",
        "aigmap", "opt_clean", "tee -q -o aig.json stat -json", ""])
    out = run_yosys(gate_script, {"netlist.json": netlist.netlist_json}, ("cmos.txt", "aig.json"))
    transistors = None
    for line in out["cmos.txt"].decode("utf-8").splitlines():
        if "Estimated number of transistors" in line:
            transistors = int(line.split(":")[1].strip().rstrip("+"))
    aig = _cells_by_type(out["aig.json"])
    fmt = netlist.source_format
    reader = {"verilog": "read_verilog -sv design.v", "blif": "read_blif design.blif",
              "rtlil": "read_rtlil design.il"}[fmt]
    name = {"verilog": "design.v", "blif": "design.blif", "rtlil": "design.il"}[fmt]
    ice_script = "\n".join([reader, f"synth_ice40 -top {top}", "tee -q -o ice40.json stat -json", ""])
    ice = _cells_by_type(run_yosys(ice_script, {name: netlist.source_text}, ("ice40.json",))["ice40.json"])
    return {"aig_nodes": aig.get("$_AND_", 0), "transistors": transistors,
            "ice40_lut4": ice.get("SB_LUT4", 0), "ice40_carry": ice.get("SB_CARRY", 0), "ice40_cells": ice}


def _cells_by_type(stat_json: bytes) -> dict[str, int]:
    data = json.loads(stat_json.decode("utf-8"))
    return {k: int(v) for k, v in data["design"].get("num_cells_by_type", {}).items()}


def switching_activity(netlist: Netlist, *, samples: int = 1 << 14, p_a=None, p_b=None,
                       seed: int = 0) -> dict[str, float]:
    """Switching-activity power proxy from the bit-parallel simulator.

    Draws ``samples`` operand pairs twice (independently) and counts, per gate output,
    how often it differs between the two: the toggle probability of that gate when one
    random pair follows another.

    Args:
        netlist: the gate netlist.
        samples: pairs per draw (rounded up to a multiple of 64).
        p_a: probabilities of the ``a`` codes (length ``2**width_a``; e.g. a histogram
            of real layer inputs); ``None`` for uniform.
        p_b: probabilities of the ``b`` codes; ``None`` for uniform.
        seed: random seed.

    Returns:
        ``toggles_per_op`` (sum of toggle probabilities over gates),
        ``weighted_toggles_per_op`` (each gate weighted by its CMOS transistor count),
        ``mean_toggle_rate`` (per gate).

    Raises:
        ValueError: a distribution has the wrong length or is not a distribution.
    """
    rng = np.random.default_rng(seed)
    n = max(64, -(-int(samples) // 64) * 64)

    def draw(width: int, p, name: str) -> np.ndarray:
        if p is None:
            return rng.integers(0, 1 << width, size=2 * n)
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (1 << width,) or (p < 0).any() or p.sum() <= 0:
            raise InvalidValueError(f"{name} must be {1 << width} non-negative probabilities, not shape {p.shape}")
        return rng.choice(1 << width, size=2 * n, p=p / p.sum())

    a = draw(netlist.width_a, p_a, "p_a")
    b = draw(netlist.width_b, p_b, "p_b")
    cells = netlist.cells
    gates = [(t, c) for t, c in cells if t != "$_BUF_"]
    if not gates:
        return {"toggles_per_op": 0.0, "weighted_toggles_per_op": 0.0, "mean_toggle_rate": 0.0}
    bits = netlist.port_bits
    # Every gate output is an output, so the evaluator keeps them all.
    ev = BitParallelEvaluator(bits["b"] + bits["a"], [c["Y"] for _, c in gates], cells)
    cols = [((b >> k) & 1).astype(np.uint8) for k in range(netlist.width_b)]
    cols += [((a >> k) & 1).astype(np.uint8) for k in range(netlist.width_a)]
    words, n_words = ev.pack_inputs(cols)
    out = ev.run_words(words, n_words)
    half = n_words // 2
    rate = np.bitwise_count(out[:, :half] ^ out[:, half:]).sum(axis=1) / n
    weights = np.array([_CMOS.get(t, 6) for t, _ in gates], dtype=np.float64)
    return {"toggles_per_op": float(rate.sum()), "weighted_toggles_per_op": float((rate * weights).sum()),
            "mean_toggle_rate": float(rate.mean())}


def _absolute(netlist: Netlist, activity: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"gates": len(netlist.cells), "cells": netlist.cell_counts()}
    figures.update(_yosys_figures(netlist))
    figures["depth"] = logic_depth(netlist)
    figures["depth_with_not"] = logic_depth(netlist, count_inverters=True)
    figures.update(switching_activity(netlist, **activity))
    return figures


def _exact_netlist(netlist: Netlist) -> Netlist:
    return synthesize(ExactMultiplier(width_a=netlist.width_a, width_b=netlist.width_b, signed=netlist.signed))


def hardware_cost(source, *, relative: bool = True, samples: int = 1 << 14, p_a=None, p_b=None,
                  seed: int = 0) -> dict[str, Any]:
    """Hardware-cost figures of a multiplier, and their ratios to the exact multiplier.

    Yosys runs go through the on-disk cache, so a second call is fast.

    Args:
        source: a :class:`~appmult.sim.Netlist`, or an Amaranth multiplier (synthesized).
        relative: also compute the exact multiplier's figures and the ratios.
        samples: operand pairs for the switching-activity estimate.
        p_a: distribution of ``a`` codes for the switching activity (``None``: uniform).
        p_b: distribution of ``b`` codes (``None``: uniform).
        seed: random seed of the switching-activity estimate.

    Returns:
        The figures listed in the module docstring; with ``relative``, also
        ``"exact"`` (the exact multiplier's figures), ``"relative"`` (figure / exact,
        ``None`` where the exact figure is 0) and ``"reference"`` (the exact spec).

    Raises:
        YosysError: a Yosys run failed.
    """
    netlist = source if isinstance(source, Netlist) else synthesize(source)
    activity = {"samples": samples, "p_a": p_a, "p_b": p_b, "seed": seed}
    result = _absolute(netlist, activity)
    if relative:
        exact = _exact_netlist(netlist)
        ref = _absolute(exact, activity)
        result["reference"] = (f"exact:width_a={netlist.width_a},width_b={netlist.width_b},"
                               f"signed={str(netlist.signed).lower()}")
        result["exact"] = ref
        result["relative"] = {k: (result[k] / ref[k] if ref[k] else None) for k in FIGURES}
    return result


def cost_relative(netlist: Netlist, **kwargs: Any) -> dict[str, float | None]:
    """Each figure of :func:`hardware_cost` divided by the exact multiplier's.

    Args:
        netlist: the netlist (or an Amaranth multiplier).
        **kwargs: passed to :func:`hardware_cost` (switching-activity options).

    Returns:
        Figure name -> ratio (1.0 for the exact multiplier itself).
    """
    return hardware_cost(netlist, relative=True, **kwargs)["relative"]
