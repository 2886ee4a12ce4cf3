"""cocotb tests (run inside the simulator): a MAC unit's accumulator against sums of LUT entries.

Started by :func:`appmult.tb.verify_mac` / :func:`appmult.tb.run_mac` with a JSON config
in ``APPMULT_TB_CONFIG``. Either seeded random operand vectors are driven for many cycles,
with idle cycles (``valid_in`` low), ``clear`` pulses alone and together with a beat, and
beats of extreme operands so that narrow accumulators overflow -- or the beats given in
the config's ``stimulus`` file. Every beat's ``valid_out`` must follow ``valid_in``; its
``acc`` is compared with the given ``expected`` accumulators, else with
:func:`appmult.reference.mac_reference` evaluated on the LUT (wrapped to ``acc_width``), and
recorded either way (``run_mac`` has no reference and reads them back). Not collected by
pytest.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import cocotb
import numpy as np

from appmult.codes import codes_by_value
from appmult.reference import mac_reference
from appmult.lut_gen.lutfile import load as load_lut
from appmult.tb.mac_drive import read_int, run_beats
from appmult.tb.protocol import read_tb_config, write_tb_result
from appmult.tb.stimulus import pack_lanes


def stimulus(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Operands and control per cycle: a, b (cycles, lanes), valid, clear (cycles,), and expected if given.

    From the config's ``stimulus`` file when there is one (validated by the runner), else
    seeded random beats.
    """
    if cfg.get("stimulus"):
        with np.load(cfg["stimulus"]) as f:
            return {k: f[k] for k in f.files}
    rng = np.random.default_rng(cfg["seed"])
    n, lanes, wa, wb = cfg["cycles"], cfg["lanes"], cfg["width_a"], cfg["width_b"]
    a = rng.integers(0, 1 << wa, (n, lanes))
    b = rng.integers(0, 1 << wb, (n, lanes))
    # A quarter of the beats use the extreme operands (most negative / largest), the
    # products that overflow a narrow accumulator fastest.
    ext = rng.random(n) < 0.25
    ends_a = codes_by_value(wa, cfg["signed"])[[0, -1]]
    ends_b = codes_by_value(wb, cfg["signed"])[[0, -1]]
    a[ext] = rng.choice(ends_a, (int(ext.sum()), lanes))
    b[ext] = rng.choice(ends_b, (int(ext.sum()), lanes))
    valid = rng.random(n) < 0.7
    clear = rng.random(n) < 0.05
    clear[0] = True
    return {"a": a, "b": b, "valid": valid, "clear": clear}


@cocotb.test()
async def accumulator_matches_lut(dut) -> None:
    """Every cycle's ``acc``/``valid_out`` against the running sum of LUT products."""
    cfg = read_tb_config("appmult.tb.verify_mac")
    try:
        st = stimulus(cfg)
        signed, width, latency = cfg["signed"], cfg["acc_width"], cfg["latency"]
        lut = None
        if "expected" in st:
            expected = st["expected"]
        elif cfg.get("lut"):
            lut = load_lut(cfg["lut"])
            expected = mac_reference(lut.product, st["a"], st["b"], valid=st["valid"], clear=st["clear"],
                                     acc_width=width, signed=signed)
        else:
            expected = None  # run_mac: record the accumulators, check the handshake only
        a_words = pack_lanes(st["a"], cfg["width_a"])
        b_words = pack_lanes(st["b"], cfg["width_b"])
        if len(dut.acc) != width:
            raise ValueError(f"acc port is {len(dut.acc)} bits, configured acc_width is {width}")
    except Exception:
        write_tb_result(cfg, {"error": traceback.format_exc(limit=3)})
        raise

    t0 = time.perf_counter()
    n = cfg["cycles"]
    observed = await run_beats(dut, a_words, b_words, st["valid"], st["clear"], latency=latency,
                               sample=lambda d: (d.acc.value, d.valid_out.value))
    sim_s = time.perf_counter() - t0

    mismatches = []
    accs: list[int | None] = []
    count = 0
    for k in range(n):
        acc_v, vo = observed[k + latency - 1]
        actual = read_int(acc_v, signed)
        accs.append(actual)
        vo_bit = int(str(vo)) if str(vo) in ("0", "1") else None  # a 1-bit port reads as Logic
        want = int(expected[k]) if expected is not None else None
        bad_acc = actual is None if want is None else actual != want
        if bad_acc or vo_bit != int(st["valid"][k]):
            count += 1
            if len(mismatches) < cfg["max_report"]:
                mismatches.append({"cycle": k, "valid_in": bool(st["valid"][k]), "clear": bool(st["clear"][k]),
                                   "expected_acc": want, "actual_acc": actual, "actual_bits": str(acc_v),
                                   "expected_valid_out": int(st["valid"][k]), "actual_valid_out": vo_bit})
    result = {"cycles": n, "results_checked": int(st["valid"].sum()), "mismatch_count": count,
              "mismatches": mismatches, "sim_loop_s": sim_s, "acc": accs}
    write_tb_result(cfg, result, lut=lut)
    listing = "\n".join(f"  {m}" for m in mismatches)
    assert count == 0, f"{count} of {n} cycles differ from the reference; first ones:\n{listing}"
