"""appmult.sim: synthesis, user netlists, bit-parallel evaluation, the Amaranth reference."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from appmult.hdl import ExactMultiplier, PartialProductMultiplier, export_verilog
from appmult.sim import Netlist, NetlistError, YosysError, run_yosys, simulate_amaranth, synthesize
from appmult.sim import yosys as yosys_mod
from appmult.sim.bitparallel import BitParallelEvaluator, words_to_values

DATA = Path(__file__).parent / "data"


def all_pairs(wa: int, wb: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(1 << wa), np.arange(1 << wb), indexing="ij")


def true_product(wa: int, wb: int, signed: bool) -> np.ndarray:
    """Independent reference: numpy product of the operand values, wrapped to wa+wb bits."""
    a, b = all_pairs(wa, wb)
    if signed:
        a = np.where(a >= 1 << (wa - 1), a - (1 << wa), a)
        b = np.where(b >= 1 << (wb - 1), b - (1 << wb), b)
    return a * b  # |a*b| < 2**(wa+wb-1): no wrapping needed


class DropLowColumns(PartialProductMultiplier):
    """Test-only approximate multiplier: partial products of the lowest columns dropped."""

    family = "test_drop_low"

    def keep(self, i: int, j: int) -> bool:
        return i + j >= 3


# -- synthesize + exhaustive -------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("wa,wb", [(4, 4), (8, 8), (6, 3), (3, 7), (2, 2)])
def test_exact_netlist_exhaustive(wa, wb, signed):
    net = synthesize(ExactMultiplier(width_a=wa, width_b=wb, signed=signed))
    assert (net.width_a, net.width_b, net.width_p, net.signed) == (wa, wb, wa + wb, signed)
    lut = net.exhaustive()
    assert lut.shape == (1 << wa, 1 << wb) and lut.dtype == np.int64
    np.testing.assert_array_equal(lut, true_product(wa, wb, signed))


@pytest.mark.parametrize("signed", [False, True])
def test_evaluate_matches_exhaustive(signed):
    net = synthesize(ExactMultiplier(width_a=8, width_b=6, signed=signed))
    lut = net.exhaustive()
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=5000)
    b = rng.integers(0, 64, size=5000)
    np.testing.assert_array_equal(net.evaluate(a, b), lut[a, b])
    # Small chunks, odd sizes, broadcasting and scalar shapes.
    np.testing.assert_array_equal(net.evaluate(a[:777], b[:777], chunk_vectors=100), lut[a[:777], b[:777]])
    col = net.evaluate(np.arange(256)[:, None], np.array([[5, 63]]))
    np.testing.assert_array_equal(col, lut[:, [5, 63]])
    assert net.evaluate(255, 63).shape == ()
    empty = np.array([], dtype=np.int64)
    assert net.evaluate(empty, empty).shape == (0,)


def test_evaluate_wrong():
    net = synthesize(ExactMultiplier(width=4))
    with pytest.raises(ValueError, match=re.escape("Operand code 16 is out of range for a 4-bit operand (0..15)")):
        net.evaluate([1, 16], [0, 0])
    with pytest.raises(TypeError, match="Operand codes must be integers, not float64"):
        net.evaluate([1.0], [0])


@pytest.mark.parametrize("wa,wb,chunk", [(6, 3, 64), (3, 7, 64), (8, 8, 1024), (5, 5, 1 << 20)])
def test_exhaustive_chunks_cover_rows(wa, wb, chunk):
    net = synthesize(ExactMultiplier(width_a=wa, width_b=wb, signed=True))
    blocks = list(net.exhaustive_chunks(chunk_vectors=chunk))
    assert blocks[0][0] == 0 and blocks[-1][1] == 1 << wa
    for (_, stop, _), (start, _, _) in zip(blocks, blocks[1:]):
        assert stop == start
    lut = np.concatenate([blk for _, _, blk in blocks])
    np.testing.assert_array_equal(lut, true_product(wa, wb, True))


def test_approximate_design_matches_model():
    m = DropLowColumns(width_a=5, width_b=4, signed=True)
    a, b = all_pairs(5, 4)
    lut = synthesize(m).exhaustive()
    np.testing.assert_array_equal(lut, m.model(a, b))
    assert (lut != true_product(5, 4, True)).any()


def test_words_to_values_against_bit_loop():
    rng = np.random.default_rng(7)
    for width_p, signed in [(3, False), (8, True), (13, True), (24, False), (32, True)]:
        words = rng.integers(0, 2**63, size=(width_p, 5), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        got = words_to_values(words, signed)
        v = np.arange(64 * 5)
        ref = np.zeros(v.size, dtype=np.int64)
        for k in range(width_p):
            bit = (words[k, v // 64] >> (v % 64).astype(np.uint64)) & np.uint64(1)
            ref |= bit.astype(np.int64) << k
        if signed:
            ref = np.where(ref >= 1 << (width_p - 1), ref - (1 << width_p), ref)
        np.testing.assert_array_equal(got, ref)


# -- hand-written netlists: evaluator semantics, errors ---------------------------------------

def yosys_json(cells: list[tuple[str, dict]], a=(2, 3), b=(4, 5), p=(6, 7), top="hand") -> str:
    """A Yosys-style JSON netlist written by hand (bit ids are integers)."""
    return json.dumps({"modules": {top: {
        "ports": {"a": {"direction": "input", "bits": list(a)},
                  "b": {"direction": "input", "bits": list(b)},
                  "p": {"direction": "output", "bits": list(p)}},
        "cells": {f"c{i}": {"type": t, "connections": {k: [v] for k, v in conn.items()}}
                  for i, (t, conn) in enumerate(cells)}}}})


@pytest.mark.parametrize("ctype,formula", [
    ("$_AND_", lambda x, y: x & y), ("$_OR_", lambda x, y: x | y), ("$_XOR_", lambda x, y: x ^ y),
    ("$_NAND_", lambda x, y: 1 - (x & y)), ("$_NOR_", lambda x, y: 1 - (x | y)),
    ("$_XNOR_", lambda x, y: 1 - (x ^ y)), ("$_ANDNOT_", lambda x, y: x & (1 - y)),
    ("$_ORNOT_", lambda x, y: x | (1 - y)),
])
def test_gate_semantics(ctype, formula):
    # p[0] = gate(a0, b0); p[1] = MUX(A=a1, B=b1, S=NOT(BUF(a0))).
    cells = [(ctype, {"A": 2, "B": 4, "Y": 6}), ("$_BUF_", {"A": 2, "Y": 10}),
             ("$_NOT_", {"A": 10, "Y": 11}), ("$_MUX_", {"A": 3, "B": 5, "S": 11, "Y": 7})]
    net = Netlist(yosys_json(cells), top="hand", width_a=2, width_b=2, signed=False)
    a, b = all_pairs(2, 2)
    a0, a1, b0, b1 = a & 1, a >> 1, b & 1, b >> 1
    p1 = np.where(1 - a0, b1, a1)
    np.testing.assert_array_equal(net.exhaustive(), formula(a0, b0) + 2 * p1)


def test_constant_and_passthrough_outputs():
    net = Netlist(yosys_json([], p=(3, "1", "0", "x", 4)), top="hand", width_a=2, width_b=2, signed=True)
    a, b = all_pairs(2, 2)
    ref = (a >> 1) + 2 + 16 * (b & 1)
    np.testing.assert_array_equal(net.exhaustive(), np.where(ref >= 16, ref - 32, ref))


def test_unsupported_cell_wrong():
    text = yosys_json([("$_AOI3_", {"A": 2, "B": 3, "C": 4, "Y": 6})])
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'hand' contains unsupported cell types $_AOI3_ (1); supported: $_ANDNOT_, $_AND_, "
            "$_BUF_, $_MUX_, $_NAND_, $_NOR_, $_NOT_, $_ORNOT_, $_OR_, $_XNOR_, $_XOR_")):
        Netlist(text, top="hand", width_a=2, width_b=2, signed=False)


def test_combinational_loop_wrong():
    text = yosys_json([("$_AND_", {"A": 2, "B": 7, "Y": 6}), ("$_OR_", {"A": 6, "B": 4, "Y": 7})])
    net = Netlist(text, top="hand", width_a=2, width_b=2, signed=False)
    with pytest.raises(ValueError, match="The netlist has a combinational loop"):
        net.exhaustive()


def test_netlist_json_wrong():
    with pytest.raises(NetlistError, match="Not a Yosys JSON netlist"):
        Netlist("{not json", top="x", width_a=2, width_b=2, signed=False)
    with pytest.raises(NetlistError, match=re.escape("Module 'other' not found in the netlist (modules: hand)")):
        Netlist(yosys_json([]), top="other", width_a=2, width_b=2, signed=False)


# -- user circuits: Verilog and BLIF ------------------------------------------------------------

def test_from_verilog_approximate_lsb():
    net = Netlist.from_verilog(DATA / "approx_lsb4x4.v", top="approx_lsb4x4", width_a=4, width_b=4, signed=False)
    a, b = all_pairs(4, 4)
    np.testing.assert_array_equal(net.exhaustive(), ((a * b) & ~1) | ((a | b) & 1))
    assert net.verilog == (DATA / "approx_lsb4x4.v").read_text()


def test_from_verilog_evoapprox_ports():
    net = Netlist.from_verilog(DATA / "evo_trunc4x4.v", top="evo_trunc4x4", width_a=4, width_b=4, signed=False,
                               a="A", b="B", p="O", width_p=8)
    a, b = all_pairs(4, 4)
    dropped = (a & 1) * (b & 1) + 2 * ((a >> 1) & 1) * (b & 1) + 2 * (a & 1) * ((b >> 1) & 1)
    np.testing.assert_array_equal(net.exhaustive(), a * b - dropped)
    assert net.ports == ("A", "B", "O")


def test_from_verilog_signed():
    net = Netlist.from_verilog(DATA / "signed4x3.v", top="signed4x3", width_a=4, width_b=3, signed=True)
    np.testing.assert_array_equal(net.exhaustive(), true_product(4, 3, True))


def test_from_blif():
    net = Netlist.from_blif(DATA / "mul2x2.blif", width_a=2, width_b=2, signed=False)
    assert net.top == "mul2x2" and net.verilog is None and net.source_format == "blif"
    np.testing.assert_array_equal(net.exhaustive(), true_product(2, 2, False))


def test_from_verilog_missing_port_wrong():
    with pytest.raises(NetlistError, match=re.escape("Module 'approx_lsb4x4' has no port 'x' (ports: a, b, p)")):
        Netlist.from_verilog(DATA / "approx_lsb4x4.v", top="approx_lsb4x4", width_a=4, width_b=4, signed=False,
                             a="x")


def test_from_verilog_width_wrong():
    with pytest.raises(NetlistError, match=re.escape(
            "Port 'a' of module 'approx_lsb4x4' is 4 bits wide, expected width_a=8")):
        Netlist.from_verilog(DATA / "approx_lsb4x4.v", top="approx_lsb4x4", width_a=8, width_b=4, signed=False)
    with pytest.raises(NetlistError, match=re.escape(
            "Port 'O' of module 'evo_trunc4x4' is 8 bits wide, expected width_p=9")):
        Netlist.from_verilog(DATA / "evo_trunc4x4.v", top="evo_trunc4x4", width_a=4, width_b=4, signed=False,
                             a="A", b="B", p="O", width_p=9)


def test_from_verilog_direction_wrong():
    with pytest.raises(NetlistError, match=re.escape(
            "Port 'p' of module 'approx_lsb4x4' is an output, expected an input")):
        Netlist.from_verilog(DATA / "approx_lsb4x4.v", top="approx_lsb4x4", width_a=8, width_b=4, signed=False,
                             a="p", p="a")


def test_sequential_wrong():
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'registered4x4' is not combinational: it contains sequential cells $_DFF_P_ (8); "
            "the circuit must be combinational")):
        Netlist.from_verilog(DATA / "registered4x4.v", top="registered4x4", width_a=4, width_b=4, signed=False)
    with pytest.raises(NetlistError, match=re.escape(
            "Module 'latch2x2' is not combinational: it contains sequential cells $_DFF_P_ (1); "
            "the circuit must be combinational")):
        Netlist.from_blif(DATA / "latch2x2.blif", width_a=2, width_b=2, signed=False)


def test_corrupt_file_wrong():
    path = DATA / "corrupt.v"
    with pytest.raises(YosysError, match=re.escape(
            f"Yosys could not synthesize {str(path)!r}: corrupt.v:1: ERROR: syntax error, unexpected end of file\n")):
        Netlist.from_verilog(path, top="corrupt4x4", width_a=4, width_b=4, signed=False)
    with pytest.raises(FileNotFoundError):
        Netlist.from_verilog(DATA / "no_such_file.v", top="x", width_a=4, width_b=4, signed=False)


def test_synthesize_wrong():
    with pytest.raises(TypeError, match="synthesize takes an Amaranth wiring.Component"):
        synthesize("exact:width=4")


# -- identity, serialization, cache ---------------------------------------------------------------

def test_hashes_and_round_trip():
    m = ExactMultiplier(width=5, signed=True)
    net = synthesize(m)
    assert net.sha256_verilog == hashlib.sha256(export_verilog(m).encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", net.sha256_netlist)
    copy = Netlist.from_dict(json.loads(json.dumps(net.to_dict())))
    assert copy.sha256_netlist == net.sha256_netlist and copy.sha256_verilog == net.sha256_verilog
    np.testing.assert_array_equal(copy.exhaustive(), net.exhaustive())
    other = synthesize(ExactMultiplier(width=5, signed=False))
    assert other.sha256_netlist != net.sha256_netlist
    with pytest.raises(NetlistError, match="Not a netlist dictionary: missing or malformed 'top'"):
        Netlist.from_dict({k: v for k, v in net.to_dict().items() if k != "top"})


@pytest.fixture
def counted_yosys(tmp_path, monkeypatch):
    """A fresh cache directory and a counter of real (uncached) Yosys runs."""
    monkeypatch.setenv("APPMULT_CACHE", str(tmp_path))
    calls = []
    real = yosys_mod._run_uncached

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(yosys_mod, "_run_uncached", counting)
    return calls


def test_synthesize_cache_hit_runs_no_yosys(counted_yosys, tmp_path):
    m = ExactMultiplier(width=3, signed=True)
    first = synthesize(m)
    assert len(counted_yosys) == 1
    assert any((tmp_path / "yosys").rglob("*.json"))
    second = synthesize(ExactMultiplier(width=3, signed=True))
    assert len(counted_yosys) == 1
    assert second.sha256_netlist == first.sha256_netlist
    synthesize(m, cache=False)
    assert len(counted_yosys) == 2


def test_run_yosys_cache_and_errors(counted_yosys, tmp_path):
    script = "read_verilog x.v\nwrite_json out.json\n"
    files = {"x.v": "module m(input a, output y); assign y = ~a; endmodule\n"}
    first = run_yosys(script, files, ["out.json"])
    second = run_yosys(script, files, ["out.json"])
    assert len(counted_yosys) == 1 and first["out.json"] == second["out.json"]
    # A damaged cache entry is recomputed, not trusted.
    for entry in (tmp_path / "yosys").rglob("*.json"):
        entry.write_text("garbage")
    assert run_yosys(script, files, ["out.json"])["out.json"] == first["out.json"]
    assert len(counted_yosys) == 2
    with pytest.raises(RuntimeError, match=re.escape("ERROR: No such command: no_such_command")):
        run_yosys("no_such_command\n", {})
    with pytest.raises(ValueError, match=re.escape("Yosys file names must be plain relative names, not '../x.v'")):
        run_yosys("", {"../x.v": ""})


# -- Amaranth simulator as the independent reference -------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("make", [lambda s: ExactMultiplier(width=4, signed=s),
                                  lambda s: DropLowColumns(width=4, signed=s)])
def test_amaranth_agrees_exhaustive_4x4(make, signed):
    m = make(signed)
    a, b = all_pairs(4, 4)
    np.testing.assert_array_equal(simulate_amaranth(m, a, b), synthesize(m).exhaustive())


@pytest.mark.parametrize("signed", [False, True])
def test_amaranth_agrees_sample_8x8(signed):
    m = DropLowColumns(width=8, signed=signed)
    rng = np.random.default_rng(3)
    a = np.concatenate([[0, 128, 255, 128], rng.integers(0, 256, 1000)])
    b = np.concatenate([[128, 128, 255, 0], rng.integers(0, 256, 1000)])
    np.testing.assert_array_equal(simulate_amaranth(m, a, b), synthesize(m).evaluate(a, b))


def test_evaluator_exhaustive_words_tiny():
    # Fewer than 64 vectors in all: one word, low bits only.
    ev = BitParallelEvaluator([1, 2], [3], [("$_XOR_", {"A": 1, "B": 2, "Y": 3})])
    chunks = list(ev.exhaustive_words())
    assert [(first, n) for first, n, _ in chunks] == [(0, 4)]
    assert int(chunks[0][2][0, 0]) & 0xF == 0b0110


def test_exhaustive_too_large_wrong():
    net = Netlist(yosys_json([], a=tuple(range(2, 18)), b=tuple(range(18, 34)), p=(2,)),
                  top="hand", width_a=16, width_b=16, signed=False)
    with pytest.raises(ValueError, match=re.escape(
            "A 16x16 table has 2**32 entries (more than 2**30); stream it with exhaustive_chunks()")):
        net.exhaustive()
    a0, a1, block = next(net.exhaustive_chunks())
    assert (a0, a1, block.shape) == (0, 16, (16, 65536))
    np.testing.assert_array_equal(block, np.broadcast_to(np.arange(16)[:, None] & 1, (16, 65536)))
