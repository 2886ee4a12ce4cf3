"""Importing the field's circuits: port inference, and no silent zeros from undriven nets.

Circuits are small Verilog/BLIF files written by the tests; every LUT is checked against
the exact product computed here in plain Python.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from appmult.sim import Netlist, NetlistError


def _exact(wa: int, wb: int) -> np.ndarray:
    return np.array([[i * j for j in range(1 << wb)] for i in range(1 << wa)], dtype=np.int64)


def _write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- item 10: undriven nets and sequential elements are refused -------------------------------

LATCH_UNDECLARED_CLOCK = """\
# p[0] goes through a latch clocked by 'clk', which is not declared anywhere.
.model latchu
.inputs a[0] a[1] b[0] b[1]
.outputs p[0] p[1] p[2] p[3]
.names a[0] b[0] t0
11 1
.latch t0 p[0] re clk 0
.names a[1] b[0] p[1]
11 1
.names a[0] b[1] p[2]
11 1
.names a[1] b[1] p[3]
11 1
.end
"""


def test_blif_latch_undeclared_clock_wrong(tmp_path):
    path = _write(tmp_path, "latchu.blif", LATCH_UNDECLARED_CLOCK)
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'latchu' is not combinational: it contains sequential cells $_DFF_P_ (1); "
            "the circuit must be combinational")):
        Netlist.from_blif(path, width_a=2, width_b=2, signed=False)


def test_verilog_undriven_output_wrong(tmp_path):
    path = _write(tmp_path, "und.v", "module und(input [3:0] a, input [3:0] b, output [7:0] p);\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(
            "Output 'p' of module 'und' is not driven at bits 0, 1, 2, 3, 4, 5, 6, 7: "
            "an undriven output has no defined value; assign every bit (a constant 0 or 1 where intended)")):
        Netlist.from_verilog(path, top="und", width_a=4, width_b=4, signed=False)


def test_verilog_partly_undriven_output_wrong(tmp_path):
    path = _write(tmp_path, "pund.v", "module pund(input [3:0] a, input [3:0] b, output [7:0] p);\n"
                                      "  assign p[6:0] = a * b;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape("Output 'p' of module 'pund' is not driven at bits 7: ")):
        Netlist.from_verilog(path, top="pund", width_a=4, width_b=4, signed=False)


def test_verilog_undriven_internal_net_wrong(tmp_path):
    # Yosys folds the undriven 't' away as "don't care"; the result would silently be a*b.
    path = _write(tmp_path, "iund.v", "module iund(input [3:0] a, input [3:0] b, output [7:0] p);\n"
                                      "  wire [1:0] t;\n  assign p = a * b + t;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'iund' reads nets that nothing drives: t[0], t[1]; an undriven net has no defined value")):
        Netlist.from_verilog(path, top="iund", width_a=4, width_b=4, signed=False)


def test_verilog_constant_output_bits_accepted(tmp_path):
    # Bits tied to constants are driven: a constant-zero multiplier is a valid circuit.
    path = _write(tmp_path, "zero.v", "module zero(input [3:0] a, input [3:0] b, output [7:0] p);\n"
                                      "  assign p = {a[3] & b[3], 6'd0, 1'b1};\nendmodule\n")
    net = Netlist.from_verilog(path, top="zero", width_a=4, width_b=4, signed=False)
    a, b = np.arange(16)[:, None], np.arange(16)[None, :]
    np.testing.assert_array_equal(net.exhaustive(), 128 * ((a >> 3) & (b >> 3)) + 1)


def test_verilog_non_utf8_wrong(tmp_path):
    path = _write(tmp_path, "latin1.v", b"// caf\xe9\nmodule m(input [1:0] a, input [1:0] b, output [3:0] p);\n"
                                        b"  assign p = a * b;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(
            f"Cannot read {str(path)!r}: byte 0xe9 at offset 6 is not UTF-8 text; save the file as UTF-8 (or ASCII)")):
        Netlist.from_verilog(path, top="m", width_a=2, width_b=2, signed=False)


# -- port inference ---------------------------------------------------------------------------

@pytest.mark.parametrize("names", [("A", "B", "O"), ("A", "B", "Z"), ("IN1", "IN2", "Out")])
def test_verilog_ports_inferred(tmp_path, caplog, names):
    x, y, z = names
    path = _write(tmp_path, "mul.v", f"module mul(input [3:0] {x}, input [2:0] {y}, output [6:0] {z});\n"
                                     f"  assign {z} = {x} * {y};\nendmodule\n")
    with caplog.at_level(logging.INFO, logger="appmult.sim.netlist"):
        net = Netlist.from_verilog(path, top="mul", signed=False)
    assert net.ports == names and (net.width_a, net.width_b, net.width_p) == (4, 3, 7)
    np.testing.assert_array_equal(net.exhaustive(), _exact(4, 3))
    note = (f"Module 'mul': took operand a = {x!r} (4 bits), operand b = {y!r} (3 bits) and product "
            f"p = {z!r} (7 bits) from its two inputs and one output in declaration order")
    assert net.inferred == note
    assert note in caplog.messages


def test_verilog_ports_declaration_order(tmp_path):
    # The first declared input is operand a, whatever its name; non-commutative widths show it.
    path = _write(tmp_path, "rev.v", "module rev(input [2:0] B, output [6:0] O, input [3:0] A);\n"
                                     "  assign O = (A * B) + A;\nendmodule\n")
    net = Netlist.from_verilog(path, top="rev", signed=False)
    assert net.ports == ("B", "A", "O") and (net.width_a, net.width_b) == (3, 4)
    np.testing.assert_array_equal(net.exhaustive(), _exact(3, 4) + np.arange(16)[None, :])


def test_verilog_ports_partly_given(tmp_path):
    path = _write(tmp_path, "rev.v", "module rev(input [2:0] B, output [6:0] O, input [3:0] A);\n"
                                     "  assign O = A * B;\nendmodule\n")
    net = Netlist.from_verilog(path, top="rev", a="A", signed=False)
    assert net.ports == ("A", "B", "O") and (net.width_a, net.width_b) == (4, 3)
    np.testing.assert_array_equal(net.exhaustive(), _exact(4, 3))
    assert net.inferred == ("Module 'rev': took operand b = 'B' (3 bits) and product p = 'O' (7 bits) "
                            "from its two inputs and one output in declaration order")


def test_verilog_conventional_names_nothing_inferred(tmp_path):
    path = _write(tmp_path, "abp.v", "module abp(input [1:0] b, input [2:0] a, output [4:0] p);\n"
                                     "  assign p = a * b;\nendmodule\n")
    net = Netlist.from_verilog(path, signed=False, width_a=3, width_b=2)
    assert net.ports == ("a", "b", "p") and net.top == "abp" and net.inferred is None
    np.testing.assert_array_equal(net.exhaustive(), _exact(3, 2))


def test_verilog_widths_inferred_note(tmp_path):
    path = _write(tmp_path, "abp.v", "module abp(input [1:0] a, input [2:0] b, output [4:0] p);\n"
                                     "  assign p = a * b;\nendmodule\n")
    net = Netlist.from_verilog(path, top="abp", signed=False)
    assert net.inferred == "Module 'abp': took width_a = 2 and width_b = 3 from ports 'a' and 'b'"
    np.testing.assert_array_equal(net.exhaustive(), _exact(2, 3))


def test_blif_ports_inferred(tmp_path):
    path = _write(tmp_path, "m.blif", """\
.model m
.inputs X[0] X[1] Y[0] Y[1]
.outputs Q[0] Q[1] Q[2] Q[3]
.names X[0] Y[0] Q[0]
11 1
.names X[1] Y[0] X[0] Y[1] Q[1]
1100 1
1110 1
1101 1
0011 1
1011 1
0111 1
.names X[1] Y[1] X[0] Y[0] Q[2]
1100 1
1101 1
1110 1
.names X[1] Y[1] X[0] Y[0] Q[3]
1111 1
.end
""")
    net = Netlist.from_blif(path, signed=False)
    assert net.ports == ("X", "Y", "Q") and (net.width_a, net.width_b) == (2, 2)
    np.testing.assert_array_equal(net.exhaustive(), _exact(2, 2))


@pytest.mark.parametrize("decl,message", [
    ("input [3:0] A, input [3:0] B, input [3:0] C, output [7:0] O",
     "Cannot tell which ports of module 'amb' are the operands a, b and the product p: "
     "inputs A, B, C; outputs O. Name them with a=, b= and p="),
    ("input [3:0] A, input [3:0] B, output [7:0] O, output [7:0] P2",
     "Cannot tell which ports of module 'amb' are the operands a, b and the product p: "
     "inputs A, B; outputs O, P2. Name them with a=, b= and p="),
])
def test_verilog_ports_ambiguous_wrong(tmp_path, decl, message):
    outputs = [w.split()[-1] for w in decl.split(", ") if w.startswith("output")]
    body = "".join(f"  assign {o} = A * B;\n" for o in outputs)
    path = _write(tmp_path, "amb.v", f"module amb({decl});\n{body}endmodule\n")
    with pytest.raises(NetlistError, match=f"^{re.escape(message)}$"):
        Netlist.from_verilog(path, top="amb", signed=False)


def test_verilog_given_port_missing_wrong(tmp_path):
    path = _write(tmp_path, "mul.v", "module mul(input [3:0] A, input [3:0] B, output [7:0] O);\n"
                                     "  assign O = A * B;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape("Module 'mul' has no port 'a' (ports: A, B, O)")):
        Netlist.from_verilog(path, top="mul", a="a", signed=False)
    with pytest.raises(NetlistError, match=re.escape("Port 'O' of module 'mul' is an output, expected an input")):
        Netlist.from_verilog(path, top="mul", b="O", signed=False)


def test_verilog_output_assigned_x_wrong(tmp_path):
    # An explicit x has no defined value either; the evaluator would have read it as 0.
    path = _write(tmp_path, "xo.v", "module xo(input [1:0] a, input [1:0] b, output [3:0] p);\n"
                                    "  assign p = {1'bx, a[1] & b[1], a[0] & b[1], a[0] & b[0]};\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape("Output 'p' of module 'xo' is not driven at bits 3: ")):
        Netlist.from_verilog(path, top="xo", signed=False)


def test_hand_netlist_undriven_nets_wrong():
    # A gate netlist given directly: bit 9 has no driver (read by a gate, or on the output).
    def netlist(cells, p):
        return json.dumps({"modules": {"hand": {
            "ports": {"a": {"direction": "input", "bits": [2, 3]}, "b": {"direction": "input", "bits": [4, 5]},
                      "p": {"direction": "output", "bits": p}},
            "cells": {f"c{i}": {"type": t, "connections": {k: [v] for k, v in c.items()}}
                      for i, (t, c) in enumerate(cells)},
            "netnames": {"w": {"bits": [9]}}}}})
    with pytest.raises(NetlistError, match=re.escape("Output 'p' of module 'hand' is not driven at bits 1: ")):
        Netlist(netlist([], [2, 9]), top="hand", signed=False)
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'hand' has gates reading nets that nothing drives: w; an undriven net has no defined value")):
        Netlist(netlist([("$_AND_", {"A": 2, "B": 9, "Y": 6})], [6, 3]), top="hand", signed=False)


# A file with two candidate top modules: Yosys' automatic top picked the adder and the
# search ran on it without a word (found by fuzzing the CLI).
_TWO_TOPS = ("module m(input [3:0] A, input [3:0] B, output [7:0] O);\n assign O = A * B;\nendmodule\n"
             "module n(input [3:0] A, input [3:0] B, output [7:0] O);\n assign O = A + B;\nendmodule\n")


def test_verilog_two_candidate_tops_wrong(tmp_path):
    path = tmp_path / "two.v"
    path.write_text(_TWO_TOPS)
    with pytest.raises(NetlistError, match=re.escape("defines modules that 'n' does not use (m), so its top "
                                                     "module is ambiguous (Yosys picked 'n')")):
        Netlist.from_verilog(path, signed=False)
    net = Netlist.from_verilog(path, signed=False, top="m")  # named: that one, exhaustively the product
    a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    assert np.array_equal(net.evaluate(a.ravel(), b.ravel()), (a * b).ravel())


def test_verilog_with_a_submodule_keeps_the_automatic_top(tmp_path):
    path = tmp_path / "hier.v"
    path.write_text("module pp(input x, input y, output z);\n assign z = x & y;\nendmodule\n"
                    "module m(input [1:0] A, input [1:0] B, output [3:0] O);\n wire p01, p10;\n"
                    " pp u0(A[0], B[1], p01);\n pp u1(A[1], B[0], p10);\n"
                    " assign O = (A[0] & B[0]) + ((p01 + p10) << 1) + ((A[1] & B[1]) << 2);\nendmodule\n")
    net = Netlist.from_verilog(path, signed=False)
    a, b = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    assert np.array_equal(net.evaluate(a.ravel(), b.ravel()), (a * b).ravel())


def test_verilog_with_a_parameterized_submodule_keeps_the_automatic_top(tmp_path):
    # hierarchy keeps the submodule as ``$paramod\pp\W=...``: still the top's own, not a second top
    path = tmp_path / "param.v"
    path.write_text("module pp #(parameter W = 1) (input [W-1:0] x, input [W-1:0] y, output [W-1:0] z);\n"
                    " assign z = x & y;\nendmodule\n"
                    "module m(input [1:0] A, input [1:0] B, output [3:0] O);\n wire p01, p10;\n"
                    " pp #(.W(1)) u0(A[0], B[1], p01);\n pp #(.W(1)) u1(A[1], B[0], p10);\n"
                    " assign O = (A[0] & B[0]) + ((p01 + p10) << 1) + ((A[1] & B[1]) << 2);\nendmodule\n")
    net = Netlist.from_verilog(path, signed=False)
    a, b = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    assert np.array_equal(net.evaluate(a.ravel(), b.ravel()), (a * b).ravel())


def test_verilog_port_named_b_declared_first_is_operand_b(tmp_path):
    # An input called b declared before an unnamed one was taken as operand a (the LUT transposed,
    # reported only in a log line): a port named after its role takes it before any is placed.
    path = _write(tmp_path, "m.v", "module m(input [4:0] b, input [2:0] x, output [7:0] p);\n"
                                   "  assign p = x * b;\nendmodule\n")
    net = Netlist.from_verilog(path, signed=False)
    assert net.ports == ("x", "b", "p") and (net.width_a, net.width_b) == (3, 5)
    np.testing.assert_array_equal(net.exhaustive(), _exact(3, 5))
    assert net.inferred == ("Module 'm': took operand a = 'x' (3 bits) from its two inputs and one output in "
                            "declaration order")


@pytest.mark.parametrize("body, message", [
    ("assign p = a[0] ? a * b : 8'bz;",  # tri-state for even a
     "Module 'm' feeds z (high impedance) into its logic ($mux): a multiplier's product must be 0 or 1 on every "
     "bit for every input. Write 0 or 1 instead"),
    ("wire [7:0] t = a * b;\n  assign p = a[0] ? t : 8'bx;",  # x for even a
     "Module 'm' feeds x (don't-care) constants into its logic ($mux) that reach the product: for a = 0, b = 0 "
     "(codes) it is 0 with x tied as 'setundef -zero' and 255 as 'setundef -one', and at 127 more pairs: there "
     "the Verilog has no defined product and synthesis would pick one. Write 0 or 1 instead"),
    # two x sources that cancel when tied alike (both 0 or both 1): independent random ties show them
    ("wire u = a[1] ? 1'bx : 1'b0;\n  wire w = a[1] ? 1'bx : 1'b1;\n  assign p = a * b ^ {7'b0, ~(u ^ w)};",
     "Module 'm' feeds x (don't-care) constants into its logic ($mux) that reach the product: for a = 2, b = 0 "
     "(codes) it is 1 with x tied as 'setundef -zero' and 0 as 'setundef -random 1', and at 127 more pairs: "
     "there the Verilog has no defined product and synthesis would pick one. Write 0 or 1 instead"),
])
def test_verilog_x_or_z_for_some_inputs_wrong(tmp_path, body, message):
    # Only an output bit that is x/z for every input was refused; synthesis picked values for
    # the others, which the Verilog simulation does not have.
    path = _write(tmp_path, "m.v", f"module m(input [3:0] a, input [3:0] b, output [7:0] p);\n  {body}\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(message)):
        Netlist.from_verilog(path, signed=False)


@pytest.mark.parametrize("default", ["", "    default: p = 4'bx;\n"])
def test_verilog_truth_table_case_statement(tmp_path, default):
    # A case over every input pair is a truth table: its x arm (no default, or an x default) is
    # never selected. It was refused as sequential ($meminit: the checks' proc made a ROM of it).
    rows = "".join(f"    4'd{(x << 2) | y}: p = 4'd{(x * y) ^ (x & y & 1)};\n" for x in range(4) for y in range(4))
    path = _write(tmp_path, "m.v", "module m(input [1:0] a, input [1:0] b, output reg [3:0] p);\n"
                                   f"  always @* case ({{a, b}})\n{rows}{default}  endcase\nendmodule\n")
    net = Netlist.from_verilog(path, signed=False)
    want = np.array([[(x * y) ^ (x & y & 1) for y in range(4)] for x in range(4)])
    np.testing.assert_array_equal(net.exhaustive(), want)


def test_verilog_signed_ports_read_as_unsigned_wrong(tmp_path):
    path = _write(tmp_path, "m.v", "module m(input signed [3:0] a, input signed [3:0] b, output signed [7:0] p);\n"
                                   "  assign p = a * b;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'm' declares operand ports 'a' and 'b' signed, but the multiplier is read as unsigned: pass "
            "signed=True (--signed), or drop the signed keyword if the operands are unsigned")):
        Netlist.from_verilog(path, signed=False)
    net = Netlist.from_verilog(path, signed=True)
    v = np.arange(16)
    v = np.where(v >= 8, v - 16, v)
    np.testing.assert_array_equal(net.exhaustive(), np.outer(v, v))  # indexed by codes, values out


def _two_arm_case(width: int, default: str) -> str:
    # case over b's low bits, every value listed: a full case (Yosys adds an x arm when there is no default)
    arms = "".join(f"      2'd{k}: p = a * b;\n" for k in range(4))
    return (f"module m(input [{width - 1}:0] a, input [{width - 1}:0] b, output reg [{2 * width - 1}:0] p);\n"
            f"  always @* case (b[1:0])\n{arms}{default}    endcase\nendmodule\n")


@pytest.mark.parametrize("default", ["", "      default: p = 0;\n"])
def test_verilog_wide_full_case(tmp_path, default):
    # Yosys gives a full case an x arm (also for a dead default); above 12-bit operands the ties are
    # compared as gate netlists (identical here) or by an equivalence proof, not on every pair.
    net = Netlist.from_verilog(_write(tmp_path, "m.v", _two_arm_case(13, default)), signed=False)
    a = np.array([0, 1, 8191, 4097, 5])
    b = np.array([8191, 3, 8191, 2, 6])
    np.testing.assert_array_equal(net.evaluate(a, b), a * b)


def test_verilog_wide_x_reaching_the_product_wrong(tmp_path):
    path = _write(tmp_path, "m.v", "module m(input [12:0] a, input [1:0] b, output [14:0] p);\n"
                                   "  assign p = a[0] ? a * b : 15'bx;\nendmodule\n")
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'm' feeds x (don't-care) constants into its logic ($mux) that reach the product, or could not "
            "be shown not to: with x tied as 'setundef -zero' and as 'setundef -one' the circuits differ and no "
            "proof that they compute the same was found in 30 s (13x2 is too wide to compare every pair). A case "
            "statement without a live default arm makes such x (Yosys drops the default of a full case): write its "
            "last arm as the default, and 0 or 1 for any x")):
        Netlist.from_verilog(path, signed=False)


def test_verilog_narrow_case_without_default(tmp_path):
    net = Netlist.from_verilog(_write(tmp_path, "m.v", _two_arm_case(4, "")), signed=False)
    np.testing.assert_array_equal(net.exhaustive(), _exact(4, 4))
