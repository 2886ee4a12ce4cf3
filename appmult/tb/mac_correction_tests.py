"""cocotb test (run inside the simulator) of a MAC unit with the control-variate correction.

:func:`appmult.tb.run_mac_correction` exports a :class:`appmult.hdl.MacUnit` built with
``correction=True``, drives given operand beats (``a``, ``b``, ``valid``, ``clear``) and,
per beat, the output channel's ``alpha_fx`` and ``beta``, and reads back ``acc``, ``xsum``
and ``corrected`` after every beat. Inside the simulator every cycle is checked against
:func:`appmult.reference.mac_reference` (products from the LUT, activation sums from the
``a`` values) and :func:`appmult.reference.mac_correction_reference`; the observed values
are also returned, so a caller can compare them with a layer's
:meth:`~appmult.nn.ApproxLinear.int_forward_corrected`. Not collected by pytest.

Timing: ``corrected`` is combinational from ``acc``/``xsum`` and the ``alpha_fx``/``beta``
inputs, and beat ``k`` shows in ``acc`` after edge ``k + latency - 1``; so the driver puts
beat ``k``'s ``alpha_fx``/``beta`` on the pins together with beat ``k + latency - 1``'s
operands, i.e. while beat ``k``'s sum is what ``acc`` holds.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import cocotb
import numpy as np

from appmult.codes import codes_to_values
from appmult.reference import mac_correction_reference, mac_reference
from appmult.lut_gen.lutfile import LutFile
from appmult.lut_gen.lutfile import load as load_lut
from appmult.tb.mac_drive import read_int, run_beats
from appmult.tb.protocol import read_tb_config, write_tb_result
from appmult.tb.stimulus import MAC_CORRECTION_STIMULUS, pack_lanes


def expected_outputs(lut: LutFile, st: dict[str, np.ndarray], *, acc_width: int, sum_width: int,
                     frac_bits: int) -> dict[str, np.ndarray]:
    """``acc``, ``xsum`` and ``corrected`` after each beat, from the LUT (numpy reference)."""
    signed = lut.signed
    acc = mac_reference(lut.product, st["a"], st["b"], valid=st["valid"], clear=st["clear"],
                        acc_width=acc_width, signed=signed)
    # The activation accumulator is a MAC whose "product" is the a operand's value.
    xs_table = np.repeat(codes_to_values(np.arange(1 << lut.width_a), lut.width_a, signed)[:, None],
                         1 << lut.width_b, axis=1)
    xsum = mac_reference(xs_table, st["a"], st["b"], valid=st["valid"], clear=st["clear"],
                         acc_width=sum_width, signed=signed)
    corrected = np.array([mac_correction_reference(acc[k], xsum[k], int(st["alpha_fx"][k]), int(st["beta"][k]),
                                                   frac_bits=frac_bits, acc_width=acc_width)
                          for k in range(len(acc))], dtype=np.int64)
    return {"acc": acc, "xsum": xsum, "corrected": corrected}


@cocotb.test()
async def corrected_accumulator_matches_reference(dut) -> None:
    """Every valid beat's ``acc``, ``xsum`` and ``corrected`` against the numpy reference."""
    cfg = read_tb_config("appmult.tb.run_mac_correction")
    try:
        lut = load_lut(cfg["lut"])
        with np.load(cfg["stimulus"], allow_pickle=False) as z:
            st = {k: z[k] for k in MAC_CORRECTION_STIMULUS}
        signed, latency = cfg["signed"], cfg["latency"]
        want = expected_outputs(lut, st, acc_width=cfg["acc_width"], sum_width=cfg["sum_width"],
                                frac_bits=cfg["frac_bits"])
        a_words = pack_lanes(st["a"], lut.width_a)
        b_words = pack_lanes(st["b"], lut.width_b)
    except Exception:
        write_tb_result(cfg, {"error": traceback.format_exc(limit=3)})
        raise

    t0 = time.perf_counter()
    n = len(a_words)

    def hold_correction(k: int) -> None:
        # The correction inputs belong to the beat that acc shows after this edge.
        shown = k - (latency - 1)
        if shown >= 0:
            dut.alpha_fx.value = int(st["alpha_fx"][shown])
            dut.beta.value = int(st["beta"][shown])

    seen = await run_beats(dut, a_words, b_words, st["valid"], st["clear"], latency=latency,
                           sample=lambda d: (d.acc.value, d.xsum.value, d.corrected.value),
                           extra_ports=("alpha_fx", "beta"), before_edge=hold_correction)
    sim_s = time.perf_counter() - t0

    observed = {"acc": [], "xsum": [], "corrected": []}
    mismatches: list[dict[str, Any]] = []
    count = 0
    for k in range(n):
        acc_v, xs_v, cor_v = seen[k + latency - 1]
        got = {"acc": read_int(acc_v, signed), "xsum": read_int(xs_v, signed), "corrected": read_int(cor_v, True)}
        for key in observed:
            observed[key].append(got[key])
        if any(got[key] != int(want[key][k]) for key in got):
            count += 1
            if len(mismatches) < cfg["max_report"]:
                mismatches.append({"beat": k, **{f"expected_{key}": int(want[key][k]) for key in got},
                                   **{f"actual_{key}": got[key] for key in got}})
    write_tb_result(cfg, {"beats": n, "mismatch_count": count, "mismatches": mismatches, "observed": observed,
                          "sim_loop_s": sim_s}, lut=lut)
    listing = "\n".join(f"  {m}" for m in mismatches)
    assert count == 0, f"{count} of {n} beats differ from the reference; first ones:\n{listing}"
