"""Hardware cost: figures, ratios to the exact multiplier, depth, switching activity, CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from appmult.cli import main
from appmult.hdl import ExactMultiplier, PartialProductMultiplier
from appmult.sim import FIGURES, Netlist, cost_relative, hardware_cost, logic_depth, switching_activity, synthesize



def yosys_json(cells: list[tuple[str, dict]], top: str = "hand") -> str:
    """A hand-written Yosys-style JSON netlist: a = bits 2,3; b = 4,5; p = 6,7."""
    return json.dumps({"modules": {top: {
        "ports": {"a": {"direction": "input", "bits": [2, 3]}, "b": {"direction": "input", "bits": [4, 5]},
                  "p": {"direction": "output", "bits": [6, 7]}},
        "cells": {f"c{i}": {"type": t, "connections": {k: [v] for k, v in conn.items()}}
                  for i, (t, conn) in enumerate(cells)}}}})


class KeepHighColumns(PartialProductMultiplier):
    """Test-only truncated-like multiplier: only partial products in columns >= 4."""

    family = "test_keep_high"

    def keep(self, i: int, j: int) -> bool:
        return i + j >= 4


@pytest.mark.parametrize("signed", [False, True])
def test_exact_is_ratio_one(signed):
    figures = synthesize(ExactMultiplier(width=6, signed=signed)).cost()
    assert figures["reference"] == f"exact:width_a=6,width_b=6,signed={str(signed).lower()}"
    assert figures["relative"] == {k: 1.0 for k in FIGURES}
    assert figures["gates"] == sum(figures["cells"].values()) > 0
    assert figures["aig_nodes"] >= figures["gates"] // 2
    assert figures["transistors"] > 4 * figures["gates"] // 2
    assert figures["ice40_lut4"] > 0
    assert 0 < figures["depth"] <= figures["depth_with_not"]


def test_truncated_like_is_cheaper():
    net = synthesize(KeepHighColumns(width=6))
    rel = cost_relative(net)
    for key in ("gates", "aig_nodes", "transistors", "ice40_lut4", "toggles_per_op"):
        assert rel[key] < 1.0, key
    assert rel["depth"] <= 1.0


def test_cost_of_multiplier_object_and_absolute_only():
    figures = hardware_cost(ExactMultiplier(width_a=4, width_b=3), relative=False)
    assert "relative" not in figures and "exact" not in figures
    assert figures["gates"] == len(synthesize(ExactMultiplier(width_a=4, width_b=3)).cells)


def test_cmos_transistors_match_gate_table():
    # Yosys' CMOS estimate for the simple gates: NAND/NOR 4, AND/OR/ANDNOT/ORNOT 6, XOR/XNOR/MUX 12, NOT 2.
    table = {"$_NOT_": 2, "$_NAND_": 4, "$_NOR_": 4, "$_AND_": 6, "$_OR_": 6, "$_ANDNOT_": 6, "$_ORNOT_": 6,
             "$_XOR_": 12, "$_XNOR_": 12, "$_MUX_": 12}
    figures = hardware_cost(ExactMultiplier(width=4, signed=True), relative=False)
    assert figures["transistors"] == sum(table[t] * n for t, n in figures["cells"].items())


def test_logic_depth_by_hand():
    # p0 = NOT(AND(a0, b0)) ; p1 = XOR(AND(a0, b0), OR(a1, b1)) -> levels 1 (NOT free) / 2; 2 / 2.
    cells = [("$_AND_", {"A": 2, "B": 4, "Y": 10}), ("$_NOT_", {"A": 10, "Y": 6}),
             ("$_OR_", {"A": 3, "B": 5, "Y": 11}), ("$_XOR_", {"A": 10, "B": 11, "Y": 7})]
    net = Netlist(yosys_json(cells), top="hand", width_a=2, width_b=2, signed=False)
    assert logic_depth(net) == 2
    assert logic_depth(net, count_inverters=True) == 2
    cells[3] = ("$_BUF_", {"A": 2, "Y": 7})
    net = Netlist(yosys_json(cells), top="hand", width_a=2, width_b=2, signed=False)
    assert logic_depth(net) == 1
    assert logic_depth(net, count_inverters=True) == 2


def test_switching_activity_by_hand():
    net = Netlist(yosys_json([("$_XOR_", {"A": 2, "B": 4, "Y": 6}), ("$_AND_", {"A": 3, "B": 5, "Y": 7})]),
                  top="hand", width_a=2, width_b=2, signed=False)
    act = switching_activity(net, samples=1 << 16)
    # XOR of two fair bits toggles with probability 1/2; AND (p=1/4) with 2*(1/4)*(3/4) = 3/8.
    assert act["toggles_per_op"] == pytest.approx(0.5 + 0.375, abs=0.02)
    assert act["weighted_toggles_per_op"] == pytest.approx(12 * 0.5 + 6 * 0.375, abs=0.2)
    fixed = switching_activity(net, p_a=[0, 0, 1, 0], p_b=[0, 1, 0, 0])
    assert fixed["toggles_per_op"] == 0.0
    with pytest.raises(ValueError, match=re.escape("p_a must be 4 non-negative probabilities, not shape (3,)")):
        switching_activity(net, p_a=[1, 1, 1])


def test_cli_cost_json(capsys):
    assert main(["cost", "exact:width=4", "--json", "--samples", "1024"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"] == "exact:width_a=4,width_b=4,signed=false"
    assert data["relative"]["gates"] == 1.0


def test_cli_cost_table(capsys):
    assert main(["cost", "exact:width=3,signed=true", "--samples", "1024"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("this:  exact:width_a=3,width_b=3,signed=true\nexact: exact:width_a=3,width_b=3,signed=true\n")
    assert re.search(r"^gates \(simple 2-input \+ MUX\)\s+\d+\s+\d+\s+1\.000$", out, re.M)


def test_cli_cost_wrong(capsys):
    assert main(["cost", "nosuchfamily:width=4"]) == 2
    assert "appmult cost: error: Unknown multiplier family 'nosuchfamily'" in capsys.readouterr().err
