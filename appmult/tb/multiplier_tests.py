"""cocotb tests (run inside the simulator): a multiplier's products against a LUT file.

Started by :func:`appmult.tb.verify_multiplier`, which builds the wrapper
``appmult_tb_wrapper`` (``lanes`` instances of the design on packed ``a``/``b``/``p``
buses) and passes a JSON config through the ``APPMULT_TB_CONFIG`` environment variable.
Not collected by pytest (the file name does not start with ``test_``).

Speed: inputs for all lanes are written in one go and read back after a 1 ns ``Timer``
(or a clock edge); the values are collected as raw bit vectors and compared with the LUT
in numpy once the simulation loop is done, so the per-pair cost is a fraction of one
simulator round trip.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import cocotb
import numpy as np
from cocotb.triggers import Timer

from appmult.codes import codes_to_values
from appmult.lut_gen.lutfile import load as load_lut
from appmult.tb.protocol import read_tb_config, write_tb_result
from appmult.tb.stimulus import pack_lanes, unpack_lanes


def _as_value(code: int, width: int, signed: bool) -> int:
    return code - (1 << width) if signed and code >= 1 << (width - 1) else code


def _resolve(values: list, lanes: int, width: int) -> tuple[np.ndarray, dict[int, str]]:
    """Output codes per pair (-1 where X/Z) and the bit strings of unresolved lanes."""
    words = [v.to_unsigned() if v.is_resolvable else 0 for v in values]
    codes = unpack_lanes(words, lanes, width)
    unresolved: dict[int, str] = {}
    for k, v in enumerate(values):
        if v.is_resolvable:
            continue
        s = str(v)  # MSB first: lane lanes-1 comes first
        for lane in range(lanes):  # each lane on its own: the others of the word are still known
            bits = s[len(s) - (lane + 1) * width: len(s) - lane * width]
            if any(c not in "01" for c in bits):
                unresolved[k * lanes + lane] = bits
                codes[k * lanes + lane] = -1
            else:
                codes[k * lanes + lane] = int(bits, 2)
    return codes, unresolved


def _check_port_widths(dut, cfg: dict[str, Any]) -> None:
    """The design's own ports must have the LUT's widths (the wrapper would silently pad)."""
    try:
        inner = dut.lane[0].dut
        widths = {"a": len(inner.a), "b": len(inner.b), "p": len(inner.p)}
    except (AttributeError, IndexError, KeyError, TypeError):
        return  # this simulator does not expose generate scopes; the bus widths still match
    want = {"a": cfg["width_a"], "b": cfg["width_b"], "p": cfg["width_p"]}
    if widths != want:
        raise ValueError(f"Design ports a/b/p are {widths['a']}/{widths['b']}/{widths['p']} bits but the "
                         f"LUT needs {want['a']}/{want['b']}/{want['p']}")


async def _drive_combinational(dut, a_words: list[int], b_words: list[int]) -> list:
    """Each batch of operands on the inputs, ``p`` read 1 ns later."""
    outputs = []
    for a_word, b_word in zip(a_words, b_words):
        dut.a.value = a_word
        dut.b.value = b_word
        await Timer(1, "ns")
        outputs.append(dut.p.value)
    return outputs


async def _drive_registered(dut, a_words: list[int], b_words: list[int]) -> tuple[list, int]:
    """Reset, then one batch per clock edge; ``p`` after each edge, and how often it moved before one."""
    dut.clk.value = 0
    dut.rst.value = 1
    dut.a.value = 0
    dut.b.value = 0
    await Timer(1, "ns")
    dut.clk.value = 1
    await Timer(1, "ns")
    dut.clk.value = 0
    dut.rst.value = 0
    previous = dut.p.value
    outputs = []
    held_changed = 0
    for a_word, b_word in zip(a_words, b_words):
        dut.a.value = a_word
        dut.b.value = b_word
        dut.clk.value = 0
        await Timer(1, "ns")
        # New operands are on the inputs but no edge yet: a registered output must hold.
        if dut.p.value != previous:
            held_changed += 1
        dut.clk.value = 1
        await Timer(1, "ns")
        previous = dut.p.value
        outputs.append(previous)
    return outputs, held_changed


@cocotb.test()
async def products_match_lut(dut) -> None:
    """Drive every configured operand pair and compare ``p`` with the LUT."""
    cfg = read_tb_config("appmult.tb.verify_multiplier")
    try:
        lut = load_lut(cfg["lut"])
        pairs = np.load(cfg["pairs"], allow_pickle=False)
        lanes, wa, wb, wp = cfg["lanes"], cfg["width_a"], cfg["width_b"], cfg["width_p"]
        signed, registered = cfg["signed"], cfg["registered"]
        _check_port_widths(dut, cfg)
        n = len(pairs)
        n_batches = -(-n // lanes)
        # Pad the last batch with copies of the first pair; padded results are dropped.
        padded = np.concatenate([pairs, np.repeat(pairs[:1], n_batches * lanes - n, axis=0)])
        a_words = pack_lanes(padded[:, 0].reshape(n_batches, lanes), wa)
        b_words = pack_lanes(padded[:, 1].reshape(n_batches, lanes), wb)
    except Exception:  # report the testbench problem to the Python side, then fail
        write_tb_result(cfg, {"error": traceback.format_exc(limit=3)})
        raise

    t0 = time.perf_counter()
    if registered:
        outputs, held_changed = await _drive_registered(dut, a_words, b_words)
    else:
        outputs, held_changed = await _drive_combinational(dut, a_words, b_words), 0
    sim_s = time.perf_counter() - t0

    actual, unresolved = _resolve(outputs, lanes, wp)
    actual = actual[:n]
    a_codes, b_codes = pairs[:, 0], pairs[:, 1]
    expected = lut.product[a_codes, b_codes]
    # Compared as values: a LUT entry outside the product port's range can never be what the
    # RTL drives (compared as bit patterns, 271 passed for 15 in a signed 4x4 table).
    unknown = actual == -1
    values = codes_to_values(np.where(unknown, 0, actual), wp, signed)
    bad = np.flatnonzero(unknown | (expected != values))
    mismatches = []
    for i in bad[:cfg["max_report"]]:
        code = int(actual[i])
        bits = unresolved.get(int(i), format(code, f"0{wp}b") if code >= 0 else "x" * wp)
        mismatches.append({
            "a_code": int(a_codes[i]), "b_code": int(b_codes[i]),
            "a_value": _as_value(int(a_codes[i]), wa, signed),
            "b_value": _as_value(int(b_codes[i]), wb, signed),
            "expected": int(expected[i]),
            "actual": None if code < 0 else _as_value(code, wp, signed),
            "actual_bits": bits,
        })
    result = {"pairs_checked": int(n), "mismatch_count": int(len(bad)), "mismatches": mismatches,
              "registered_output_changed_before_edge": held_changed, "sim_loop_s": sim_s}
    if held_changed:
        result["error"] = (f"registered output changed before the clock edge in {held_changed} cycles: "
                           f"the design is not registered as configured")
    write_tb_result(cfg, result, lut=lut)
    assert held_changed == 0, result["error"]
    listing = "\n".join(
        f"  a={m['a_value']} (code {m['a_code']:#x}), b={m['b_value']} (code {m['b_code']:#x}): "
        f"LUT {m['expected']}, RTL {m['actual'] if m['actual'] is not None else m['actual_bits']}"
        for m in mismatches)
    assert len(bad) == 0, f"{len(bad)} of {n} products differ from the LUT; first ones:\n{listing}"
