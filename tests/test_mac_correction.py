"""MacUnit with the control-variate correction: Amaranth simulator vs numpy (fast), and the
exported Verilog in cocotb/Icarus vs the corrected PyTorch layer's integer outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from amaranth.sim import Simulator

from appmult.codes import values_to_codes
from appmult.hdl import from_spec
from appmult.hdl.export import export_verilog
from appmult.hdl.mac import MacUnit
from appmult.reference import mac_correction_reference, mac_reference
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear
from appmult.reference import correct_accumulator
from appmult.flows import circuit_lut
from appmult.tb import simulator_available
from appmult.tb.stimulus import pack_lanes

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = circuit_lut(from_spec(spec))
    return _LUTS[spec]


def simulate(mac: MacUnit, st: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Beats through the MAC in Amaranth's simulator; acc, xsum, corrected per beat.

    Beat ``k``'s alpha_fx/beta are on the pins while ``acc`` holds beat ``k``.
    """
    mult = mac.multiplier
    a_words, b_words = pack_lanes(st["a"], mult.width_a), pack_lanes(st["b"], mult.width_b)
    n = len(a_words)
    seen: list[tuple[int, int, int]] = []

    async def testbench(ctx):
        for k in range(n + mac.latency - 1):
            beat = k < n
            ctx.set(mac.a, a_words[k] if beat else 0)
            ctx.set(mac.b, b_words[k] if beat else 0)
            ctx.set(mac.valid_in, int(st["valid"][k]) if beat else 0)
            ctx.set(mac.clear, int(st["clear"][k]) if beat else 0)
            shown = k - (mac.latency - 1)
            if shown >= 0:
                ctx.set(mac.alpha_fx, int(st["alpha_fx"][shown]))
                ctx.set(mac.beta, int(st["beta"][shown]))
            await ctx.tick()
            seen.append((ctx.get(mac.acc), ctx.get(mac.xsum), ctx.get(mac.corrected)))

    sim = Simulator(mac)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    out = seen[mac.latency - 1:]
    return {"acc": [o[0] for o in out], "xsum": [o[1] for o in out], "corrected": [o[2] for o in out]}


def random_stimulus(rng, n: int, lanes: int, wa: int, wb: int, alpha_width: int, acc_width: int):
    return {"a": rng.integers(0, 1 << wa, (n, lanes)), "b": rng.integers(0, 1 << wb, (n, lanes)),
            "valid": rng.random(n) < 0.7, "clear": rng.random(n) < 0.1,
            "alpha_fx": rng.integers(-(1 << (alpha_width - 1)), 1 << (alpha_width - 1), n),
            "beta": rng.integers(-(1 << (acc_width - 2)), 1 << (acc_width - 2), n)}


@pytest.mark.parametrize("spec,frac", [("truncated:width=6,columns=4,signed=true", 4),
                                       ("perforated:width=6,rows=[0,1]", 0),
                                       ("drum:width=6,k=3", 3)])
def test_correction_matches_numpy(spec, frac):
    mult = from_spec(spec)
    mac = MacUnit(mult, lanes=3, acc_width=16, correction=True, alpha_frac_bits=frac)
    rng = np.random.default_rng(3)
    st = random_stimulus(rng, 100, 3, 6, 6, mac.alpha_width, 16)
    got = simulate(mac, st)
    lut = lut_of(spec)
    acc = mac_reference(lut.product, st["a"], st["b"], valid=st["valid"], clear=st["clear"], acc_width=16,
                        signed=mult.signed)
    xs_table = np.repeat(np.arange(64)[:, None] - (np.where(np.arange(64) >= 32, 64, 0)[:, None]
                                                   if mult.signed else 0), 64, axis=1)
    xsum = mac_reference(xs_table, st["a"], st["b"], valid=st["valid"], clear=st["clear"],
                         acc_width=mac.sum_width, signed=mult.signed)
    assert got["acc"] == acc.tolist()
    assert got["xsum"] == xsum.tolist()
    want = [int(mac_correction_reference(acc[k], xsum[k], int(st["alpha_fx"][k]), int(st["beta"][k]),
                                         frac_bits=frac, acc_width=16)) for k in range(len(acc))]
    assert got["corrected"] == want
    # Unwrapped, the MAC's formula is the layer's (appmult.nn.correction), bit for bit.
    ref = correct_accumulator(acc.astype(np.int64), xsum.astype(np.int64), st["alpha_fx"].astype(np.int64),
                              st["beta"].astype(np.int64), frac)
    wrapped = ((ref + (1 << 16)) % (1 << 17)) - (1 << 16)
    assert got["corrected"] == wrapped.tolist()


def test_correction_reference_by_hand():
    # alpha = 1.25 (F=2 -> 5), xsum = 3: 3.75 rounds half up to 4; -3.75 -> floor(-3.25) = -4.
    assert mac_correction_reference([100], [3], 5, 10, frac_bits=2, acc_width=16).tolist() == [100 - 4 - 10]
    assert mac_correction_reference([100], [-3], 5, 0, frac_bits=2, acc_width=16).tolist() == [100 + 4]
    # -2.5 rounds half up to -2.
    assert mac_correction_reference([0], [-1], 10, 0, frac_bits=2, acc_width=16).tolist() == [2]
    # Wraps to acc_width + 1 bits, two's complement.
    assert mac_correction_reference([0], [0], 0, -(1 << 16), frac_bits=0, acc_width=16).tolist() == [-(1 << 16)]


def test_correction_ports_and_defaults():
    mac = MacUnit(from_spec("exact:width=8"), lanes=4, correction=True, alpha_frac_bits=6)
    assert (mac.alpha_frac_bits, mac.alpha_width, mac.sum_width) == (6, 16, 24)
    sig = mac.signature.members
    assert sig["corrected"].shape.width == 33 and sig["corrected"].shape.signed
    assert sig["beta"].shape.width == 32 and sig["alpha_fx"].shape.width == 16
    assert "correction alpha 16 bits (F=6), xsum 24 bits" in repr(mac)
    plain = MacUnit(from_spec("exact:width=8"), lanes=4)
    assert not plain.correction and plain.alpha_width is None and "xsum" not in plain.signature.members
    verilog = export_verilog(mac, name="cv_mac")
    for port in ("alpha_fx", "beta", "xsum", "corrected"):
        assert port in verilog


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(correction=1), TypeError, "MAC correction must be a bool, not 1"),
    (dict(correction=True, alpha_frac_bits=25), TypeError,
     "MAC alpha fractional bits must be an integer in 0..24, not 25"),
    (dict(correction=True, alpha_width=1), TypeError, "MAC alpha width must be an integer in 2..40, not 1"),
    (dict(correction=True, sum_width=0), TypeError, "MAC sum width must be an integer in 1..62, not 0"),
    (dict(sum_width=12), ValueError, "MAC alpha_width and sum_width need correction=True"),
])
def test_correction_wrong(kwargs, exc, message):
    with pytest.raises(exc, match=f"^{message}$"):
        MacUnit(from_spec("exact:width=4"), lanes=2, **kwargs)


# -- cocotb: RTL MAC == corrected layer ---------------------------------------------------------

def layer_stimulus(layer: ApproxLinear, x: torch.Tensor, lanes: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Beats computing every output of a linear layer, one output (n, c) after another.

    Returns the stimulus and the beat index at which each output (row-major ``(n, c)``) is
    complete.
    """
    lut = layer.lut.lut_file
    qx, _, _, qw, _, _ = layer._int_quantize(x)
    alpha_fx, beta = layer.correction.channel_params(qw)
    xc = values_to_codes(qx.to(torch.int64).numpy(), lut.width_a, lut.signed)
    wc = values_to_codes(qw.to(torch.int64).numpy(), lut.width_b, lut.signed)
    n, k = xc.shape
    per = k // lanes
    a, b, clear, al, be, ends = [], [], [], [], [], []
    for i in range(n):
        for c in range(wc.shape[0]):
            for j in range(per):
                a.append(xc[i, j * lanes:(j + 1) * lanes])
                b.append(wc[c, j * lanes:(j + 1) * lanes])
                clear.append(j == 0)
                al.append(int(alpha_fx[c]))
                be.append(int(beta[c]))
            ends.append(len(a) - 1)
    st = {"a": np.array(a), "b": np.array(b), "valid": np.ones(len(a), bool), "clear": np.array(clear),
          "alpha_fx": np.array(al), "beta": np.array(be)}
    return st, ends


icarus = pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")


@pytest.mark.simulator
@icarus
@pytest.mark.parametrize("spec,frac", [("truncated:width=8,columns=6", 8),
                                       ("perforated:width=8,rows=[0,1,2],signed=true", 4)])
def test_rtl_mac_equals_corrected_layer(spec, frac, tmp_path):
    from appmult.tb import run_mac_correction
    lut = lut_of(spec)
    torch.manual_seed(1)
    layer = ApproxLinear(16, 3, config=ApproxConfig(lut, correction="control_variate",
                                                    correction_frac_bits=frac)).eval()
    x = torch.randn(4, 16) if lut.signed else torch.rand(4, 16)
    layer(x)  # initialize the activation range
    want = layer.int_forward_corrected(x).reshape(-1).tolist()
    st, ends = layer_stimulus(layer, x, lanes=4)
    mac = MacUnit(from_spec(spec), lanes=4, correction=True, alpha_frac_bits=frac)
    result = run_mac_correction(mac, lut, st, build_dir=tmp_path)
    assert result["mismatch_count"] == 0, result["mismatches"]
    got = [result["observed"]["corrected"][e] for e in ends]
    assert got == want
    # The correction did something: the raw accumulators differ from the corrected ones.
    assert [result["observed"]["acc"][e] for e in ends] != want


def test_run_mac_correction_wrong(tmp_path):
    from appmult.tb import run_mac_correction
    lut = lut_of("exact:width=4")
    with pytest.raises(TypeError, match="run_mac_correction needs a MacUnit with correction=True"):
        run_mac_correction(MacUnit(from_spec("exact:width=4"), lanes=2), lut, {}, build_dir=tmp_path)
    mac = MacUnit(from_spec("exact:width=4"), lanes=2, correction=True, alpha_frac_bits=2)
    if not simulator_available("icarus"):
        pytest.skip("Icarus Verilog is not installed")
    with pytest.raises(ValueError, match="MAC correction stimulus lacks alpha_fx, beta"):
        run_mac_correction(mac, lut, {"a": [], "b": [], "valid": [], "clear": []}, build_dir=tmp_path)
    st = {"a": np.zeros((1, 2)), "b": np.zeros((1, 2)), "valid": [True], "clear": [True],
          "alpha_fx": [1 << 10], "beta": [0]}
    with pytest.raises(ValueError, match=r"MAC alpha_fx values must fit the 8-bit signed port \(-128..127\)"):
        run_mac_correction(mac, lut, st, build_dir=tmp_path)
