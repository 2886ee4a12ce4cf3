"""Contracts of the operand codes and the bit-parallel evaluator, pinned where mutation
testing (``make mutate``, tests/README.md) found them unchecked.

References are written from the definitions (two's complement by hand, Python integers),
not from the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from appmult.codes import (check_codes, code_range, codes_by_value, codes_to_values, value_range,
                           values_to_codes, wrap_value)


def _twos(code: int, width: int) -> int:
    return code - (1 << width) if code >> (width - 1) else code


@pytest.mark.parametrize("width", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("signed", [False, True])
def test_codes_and_values_by_definition(width, signed):
    codes = np.arange(1 << width)
    want = [_twos(int(c), width) if signed else int(c) for c in codes]
    values = codes_to_values(codes, width, signed)
    assert values.dtype == np.int64 and values.tolist() == want
    assert values_to_codes(np.array(want), width, signed).tolist() == codes.tolist()
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    assert value_range(width, signed) == (lo, hi) and code_range(width) == (0, (1 << width) - 1)
    order = codes_by_value(width, signed)
    assert [want[int(c)] for c in order] == list(range(lo, hi + 1))   # every value once, ascending


@pytest.mark.parametrize("signed", [False, True])
def test_range_ends_are_accepted_and_one_past_refused(signed):
    w = 6
    lo, hi = value_range(w, signed)
    assert values_to_codes([lo, hi], w, signed).tolist() == [lo & 63, hi & 63]
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=f"^Value {bad} does not fit a 6-bit "):
            values_to_codes([0, bad], w, signed)
    assert check_codes([0, 63], w).tolist() == [0, 63]
    for bad in (-1, 64):
        with pytest.raises(ValueError, match=f"^Operand code {bad} is out of range for a 6-bit operand"):
            check_codes([5, bad], w)


@pytest.mark.parametrize("signed", [False, True])
def test_wrap_value_is_assignment_to_a_port(signed):
    w = 5
    ints = np.arange(-100, 101)
    want = [(_twos(int(v) & 31, w) if signed else int(v) & 31) for v in ints]
    assert wrap_value(ints, w, signed).tolist() == want


@pytest.mark.parametrize("signed", [False, True])
def test_out_of_range_message_names_the_bad_value_not_a_range_end(signed):
    """The message names the first value outside the range, even after in-range ends."""
    w = 6
    lo, hi = value_range(w, signed)
    with pytest.raises(ValueError, match=f"^Value {hi + 1} does not fit"):
        values_to_codes([hi, lo, hi + 1], w, signed)
    with pytest.raises(ValueError, match="^Operand code 64 is out of range"):
        check_codes([0, 63, 64], w)


def test_wrap_value_of_narrow_unsigned_arrays():
    """Small unsigned dtypes (codes read from files) wrap like Python integers, no uint8 wrap-around."""
    got = wrap_value(np.array([20, 3, 255], dtype=np.uint8), 5, True)
    assert got.dtype == np.int64 and got.tolist() == [-12, 3, -1]
    assert wrap_value(np.array([40], dtype=np.uint16), 5, False).tolist() == [8]


def test_width_range_ends():
    assert value_range(62, True) == (-(1 << 61), (1 << 61) - 1) and value_range(1, False) == (0, 1)
    for bad in (0, 63, True, 8.0):
        with pytest.raises(TypeError, match=f"^Width must be an integer in 1..62, not {bad!r}$"):
            value_range(bad, False)
        with pytest.raises(TypeError, match="^Width must be an integer in 1..62"):
            codes_to_values([0], bad, False)


# -- the bit-parallel evaluator, on hand-written gate netlists ------------------------------

import itertools  # noqa: E402
import json  # noqa: E402

from appmult.sim import Netlist  # noqa: E402

_OPS = {"$_AND_": lambda a, b: a & b, "$_OR_": lambda a, b: a | b, "$_XOR_": lambda a, b: a ^ b,
        "$_BUF_": lambda a: a}


def _netlist(wa: int, wb: int, p_bits: list, gates: list[tuple[str, list, int]]) -> Netlist:
    """A Yosys-JSON netlist: ``a`` is nets 2.., ``b`` follows, gates ``(type, inputs, output)``."""
    a = list(range(2, 2 + wa))
    b = list(range(2 + wa, 2 + wa + wb))
    cells = {f"g{k}": {"type": t, "connections": {**dict(zip("AB", [[i] for i in ins])), "Y": [y]}}
             for k, (t, ins, y) in enumerate(gates)}
    module = {"ports": {"a": {"direction": "input", "bits": a}, "b": {"direction": "input", "bits": b},
                        "p": {"direction": "output", "bits": p_bits}}, "cells": cells}
    return Netlist(json.dumps({"modules": {"top": module}}), top="top", signed=False)


def _reference(wa, wb, p_bits, gates):
    """The netlist's function, gate by gate in Python (gates listed in any order)."""
    table = np.zeros((1 << wa, 1 << wb), np.int64)
    for ca, cb in itertools.product(range(1 << wa), range(1 << wb)):
        val = {2 + k: (ca >> k) & 1 for k in range(wa)} | {2 + wa + k: (cb >> k) & 1 for k in range(wb)}
        pending = list(gates)
        while pending:
            for g in list(pending):
                t, ins, y = g
                if all(i in val for i in ins):
                    val[y] = _OPS[t](*(val[i] for i in ins))
                    pending.remove(g)
        table[ca, cb] = sum(val[n] << k for k, n in enumerate(p_bits))
    return table


def test_a_net_read_twice_at_its_last_use_frees_its_register_once():
    """OR(n, n) is the last reader of n: freeing n's register twice would hand it to two
    live values later (n12 is still needed after n14 is written)."""
    gates = [("$_XOR_", [3, 5], 12), ("$_AND_", [2, 5], 13), ("$_OR_", [12, 13], 14),
             ("$_AND_", [2, 4], 10), ("$_OR_", [10, 10], 11), ("$_XOR_", [12, 14], 15)]
    p_bits = [11, 14, 12, 15]
    n = _netlist(2, 2, p_bits, gates)
    assert n.exhaustive().tolist() == _reference(2, 2, p_bits, gates).tolist()


def test_buffer_chains_and_loops():
    chain = [("$_BUF_", [2], 10), ("$_BUF_", [10], 11), ("$_BUF_", [11], 12)]   # every cell a buffer
    n = _netlist(1, 1, [12], chain)
    assert n.exhaustive().tolist() == [[0, 0], [1, 1]]
    loop = [("$_BUF_", [11], 10), ("$_BUF_", [10], 11), ("$_AND_", [2, 3], 12)]
    with pytest.raises(ValueError, match="^Combinational loop through buffers$"):
        _netlist(1, 1, [10, 12], loop).exhaustive()


def test_a_net_driven_twice_is_refused():
    twice = [("$_AND_", [2, 3], 10), ("$_OR_", [2, 3], 10)]
    with pytest.raises(ValueError, match="^Net 10 is driven more than once$"):
        _netlist(1, 1, [10], twice).exhaustive()
    onto_input = [("$_AND_", [2, 3], 10), ("$_OR_", [2, 10], 3)]
    with pytest.raises(ValueError, match="^Net 3 is driven more than once$"):
        _netlist(1, 1, [10], onto_input).exhaustive()


def test_exhaustive_words_chunks():
    small = _netlist(2, 2, [10], [("$_AND_", [2, 4], 10)])
    chunks = [(first, count, words.shape) for first, count, words in small.evaluator.exhaustive_words()]
    assert chunks == [(0, 16, (1, 1))]         # fewer than 64 vectors: one word, low bits
    wide = _netlist(11, 10, [10 ** 6], [("$_AND_", [2, 13], 10 ** 6)])   # 21 inputs
    chunks = [(first, count, words.shape) for first, count, words in wide.evaluator.exhaustive_words()]
    assert chunks == [(0, 1 << 20, (1, 1 << 14)), (1 << 20, 1 << 20, (1, 1 << 14))]   # default 2**20 vectors


def test_pack_inputs_words():
    ev = _netlist(1, 1, [10], [("$_AND_", [2, 3], 10)]).evaluator
    for n, words in ((10, 1), (64, 1), (65, 2)):
        packed, n_words = ev.pack_inputs([np.ones(n, np.uint8), np.zeros(n, np.uint8)])
        assert n_words == words and [w.shape for w in packed] == [(words,), (words,)]
    assert ev.pack_inputs([]) == ([], 1)
