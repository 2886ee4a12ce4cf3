"""MacUnit: Amaranth-simulator unit tests (fast) and cocotb runs of its exported Verilog.

References are sums of entries of the circuit's LUT (``circuit_lut``), wrapped to the
accumulator width; the wrap-around cases are also checked against hand-computed values.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from amaranth.sim import Simulator

from appmult.hdl import from_spec
from appmult.hdl.mac import MacUnit
from appmult.reference import mac_reference
from appmult.flows import required_acc_width
from appmult.lut_gen import LutFile, LutFileError
from appmult.flows import circuit_lut
from appmult.tb import run_mac, simulator_available, verify_mac
from appmult.tb.stimulus import pack_lanes

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = circuit_lut(from_spec(spec))
    return _LUTS[spec]


def simulate(mac: MacUnit, a, b, valid, clear) -> tuple[list[int], list[int]]:
    """Run beats through the MAC in Amaranth's simulator; acc and valid_out per beat."""
    mult = mac.multiplier
    a, b = np.asarray(a), np.asarray(b)
    a_words = pack_lanes(a, mult.width_a)
    b_words = pack_lanes(b, mult.width_b)
    n = len(a_words)
    seen: list[tuple[int, int]] = []

    async def testbench(ctx):
        for k in range(n + mac.latency - 1):
            beat = k < n
            ctx.set(mac.a, a_words[k] if beat else 0)
            ctx.set(mac.b, b_words[k] if beat else 0)
            ctx.set(mac.valid_in, int(valid[k]) if beat else 0)
            ctx.set(mac.clear, int(clear[k]) if beat else 0)
            await ctx.tick()
            seen.append((ctx.get(mac.acc), ctx.get(mac.valid_out)))

    sim = Simulator(mac)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    # Beat k is sampled at edge k and shows after edge k + latency - 1.
    out = seen[mac.latency - 1:]
    return [acc for acc, _ in out], [vo for _, vo in out]


# -- Amaranth simulator ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["exact:width=6,signed=true", "drum:width=6,k=3", "truncated:width=6,columns=4,signed=true"])
def test_random_beats_match_lut_sums(spec):
    mult = from_spec(spec)
    mac = MacUnit(mult, lanes=3, acc_width=14)
    rng = np.random.default_rng(5)
    n = 120
    a = rng.integers(0, 64, (n, 3))
    b = rng.integers(0, 64, (n, 3))
    valid = rng.random(n) < 0.7
    clear = rng.random(n) < 0.1
    acc, vo = simulate(mac, a, b, valid, clear)
    lut = lut_of(spec)
    assert acc == mac_reference(lut.product, a, b, valid=valid, clear=clear, acc_width=14,
                                signed=mult.signed).tolist()
    assert vo == valid.astype(int).tolist()


def test_clear_and_valid_together_starts_with_this_beat():
    mac = MacUnit(from_spec("exact:width=4"), lanes=2, acc_width=12)
    a = [[1, 2], [3, 4], [5, 6], [1, 1], [2, 2], [7, 7]]
    b = [[1, 1], [1, 1], [2, 2], [1, 1], [1, 1], [1, 1]]
    valid = [1, 1, 1, 0, 1, 0]
    clear = [0, 0, 1, 1, 0, 0]
    acc, vo = simulate(mac, a, b, valid, clear)
    # 3; 3+7; clear+valid -> 10+12=22; clear alone -> 0; 0+4; idle holds.
    assert acc == [3, 10, 22, 0, 4, 4]
    assert vo == [1, 1, 1, 0, 1, 0]


def test_latency_is_two_edges():
    mac = MacUnit(from_spec("exact:width=4"), lanes=1, acc_width=8)
    assert mac.latency == 2
    seen = []

    async def testbench(ctx):
        ctx.set(mac.a, 3)
        ctx.set(mac.b, 5)
        ctx.set(mac.valid_in, 1)
        await ctx.tick()
        ctx.set(mac.valid_in, 0)
        seen.append((ctx.get(mac.acc), ctx.get(mac.valid_out)))
        await ctx.tick()
        seen.append((ctx.get(mac.acc), ctx.get(mac.valid_out)))
        await ctx.tick()
        seen.append((ctx.get(mac.acc), ctx.get(mac.valid_out)))

    sim = Simulator(mac)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert seen == [(0, 0), (15, 1), (15, 0)]


def test_unsigned_overflow_wraps():
    mac = MacUnit(from_spec("exact:width=4"), lanes=2, acc_width=8)
    n = 3
    acc, _ = simulate(mac, [[15, 15]] * n, [[15, 15]] * n, [1] * n, [0] * n)
    assert acc == [450 % 256, 900 % 256, 1350 % 256]


def test_signed_overflow_wraps_twos_complement():
    mac = MacUnit(from_spec("exact:width=4,signed=true"), lanes=1, acc_width=8)
    n = 4
    acc, _ = simulate(mac, [[8]] * n, [[8]] * n, [1] * n, [0] * n)  # (-8) * (-8) = 64 per beat
    assert acc == [64, -128, -64, 0]


def test_required_acc_width_prevents_overflow():
    spec = "exact:width=8,signed=true"
    lut = lut_of(spec)
    lanes, beats = 4, 8
    width = required_acc_width(lut, lanes * beats)
    assert width == 21  # 32 * (-128 * -128) = 2**19 needs 21 signed bits
    a = np.full((beats, lanes), 0x80)
    for w, expected in ((width, 1 << 19), (width - 1, -(1 << 19))):
        acc, _ = simulate(MacUnit(from_spec(spec), lanes=lanes, acc_width=w), a, a, [1] * beats,
                          [1] + [0] * (beats - 1))
        assert acc[-1] == expected


def test_required_acc_width_from_lut_range():
    exact_u8 = lut_of("exact:width=8")
    assert required_acc_width(exact_u8, 1) == 16
    assert required_acc_width(exact_u8, 4) == 18  # 4 * 255**2 = 260100 < 2**18
    assert required_acc_width(lut_of("exact:width=8,signed=true"), 1) == 16
    assert required_acc_width(lut_of("exact:width=8,signed=true"), 2) == 17
    small = np.zeros((16, 16), dtype=np.int64)
    small[3, 3] = 5
    assert required_acc_width(LutFile(small.copy(), width_a=4, width_b=4, signed=False), 3) == 4  # 15 < 16
    small[2, 2] = -9
    assert required_acc_width(LutFile(small.copy(), width_a=4, width_b=4, signed=True), 2) == 6  # -18..10


def test_required_acc_width_from_multiplier_uses_circuit():
    assert required_acc_width(from_spec("exact:width=4"), 16) == 12  # 16 * 225 = 3600 < 4096


def test_required_acc_width_wrong():
    with pytest.raises(TypeError, match="^Fan-in must be a positive integer, not 0$"):
        required_acc_width(lut_of("exact:width=4"), 0)


def test_mac_reference_by_hand():
    product = np.arange(16).reshape(4, 4)  # a fake 2x2-bit table: lut[a, b] = 4a + b
    acc = mac_reference(product, [[1, 2], [3, 3], [0, 0]], [[0, 1], [3, 3], [1, 1]],
                        valid=[1, 1, 1], clear=[0, 0, 1], acc_width=5, signed=True)
    # 4 + 9 = 13; 13 + 15 + 15 = 43 wraps to 43 - 32 = 11 in 5 bits; clear then 1 + 1 = 2
    assert acc.tolist() == [13, 11, 2]


def test_mac_properties_and_default_width():
    mac = MacUnit(from_spec("exact:width=8,signed=true"), lanes=8)
    assert (mac.lanes, mac.acc_width, mac.signed, mac.latency) == (8, 32, True, 2)
    assert (len(mac.a), len(mac.b), len(mac.acc)) == (64, 64, 32)
    assert mac.acc.shape().signed
    assert MacUnit(from_spec("exact:width=16"), lanes=8).acc_width == 35
    assert repr(mac) == "<MacUnit 8 x exact:width_a=8,width_b=8,signed=true, acc 32 bits>"


def test_mac_factory():
    made = []

    def factory():
        made.append(from_spec("drum:width=4,k=2"))
        return made[-1]

    mac = MacUnit(from_spec("drum:width=4,k=2"), lanes=2, acc_width=10, factory=factory)
    from appmult.hdl import export_verilog
    export_verilog(mac, name="m")
    assert len({id(m) for m in made}) == len(made) >= 3  # one for the check, one per lane


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"lanes": 0}, TypeError, "MAC lane count must be an integer in 1..1024, not 0"),
    ({"lanes": 2, "acc_width": 0}, TypeError, "MAC accumulator width must be an integer in 1..62, not 0"),
    ({"lanes": 2, "acc_width": 63}, TypeError, "MAC accumulator width must be an integer in 1..62, not 63"),
    ({"lanes": 2, "factory": 3}, TypeError, "MAC lane factory must be callable, not 3"),
    ({"lanes": 2, "factory": lambda: from_spec("exact:width=5")}, ValueError,
     "MAC lane factory made exact:width_a=5,width_b=5,signed=false, but the template is "
     "exact:width_a=4,width_b=4,signed=false"),
])
def test_mac_wrong(kwargs, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        MacUnit(from_spec("exact:width=4"), **kwargs)


def test_mac_needs_multiplier():
    with pytest.raises(TypeError, match="^MacUnit needs a Multiplier, not 'exact'$"):
        MacUnit("exact", lanes=2)


def test_cli_export_mac(tmp_path):
    from appmult.cli import main
    out = tmp_path / "mac.v"
    assert main(["export", "exact:width=8,signed=true", "--mac", "4", "--acc-width", "20", "-o", str(out),
                 "--name", "mac4"]) == 0
    text = out.read_text()
    assert re.search(r"module mac4\(", text)
    assert "output [19:0] acc;" in text and "input [31:0] a;" in text


def test_cli_export_mac_wrong(capsys):
    from appmult.cli import main
    assert main(["export", "exact:width=8", "--acc-width", "20"]) == 2
    assert "error: --acc-width applies to a MAC unit; add --mac N" in capsys.readouterr().err
    assert main(["export", "exact:width=8", "--mac", "2", "--registered"]) == 2
    assert "a MAC unit (--mac) is always registered" in capsys.readouterr().err


# -- cocotb, exported Verilog ---------------------------------------------------------------------

icarus = pytest.mark.skipif(not simulator_available("icarus"), reason="Icarus Verilog is not installed")


@pytest.mark.simulator
@icarus
@pytest.mark.parametrize("spec, lanes, acc_width", [
    ("exact:width=8,signed=true", 4, 24),
    ("drum:width=8,k=4", 4, 32),
    ("truncated:width=8,signed=true,columns=6", 3, 12),  # wraps constantly
    ("exact:width=8", 2, 11),                             # unsigned, wraps
])
def test_mac_verilog_matches_lut(spec, lanes, acc_width, tmp_path):
    mac = MacUnit(from_spec(spec), lanes=lanes, acc_width=acc_width)
    result = verify_mac(mac, lut_of(spec), build_dir=tmp_path, cycles=1500, seed=2)
    assert result.passed, result.mismatches
    assert result.cycles == 1500 and result.results_checked > 900


@pytest.mark.simulator
@icarus
def test_mac_verilog_mismatch_is_reported(tmp_path):
    # A MAC built on a truncated multiplier checked against the exact LUT must fail.
    mac = MacUnit(from_spec("truncated:width=8,columns=6"), lanes=2, acc_width=24)
    result = verify_mac(mac, lut_of("exact:width=8"), build_dir=tmp_path, cycles=200)
    assert not result.passed and result.mismatch_count > 0
    first = result.mismatches[0]
    assert first["expected_acc"] != first["actual_acc"]
    assert "FAIL" in result.summary()


def given_beats(rng, lanes: int, beats: int, width: int) -> dict[str, np.ndarray]:
    valid = rng.random(beats) < 0.8
    clear = np.zeros(beats, dtype=bool)
    clear[[0, 3, 7]] = True
    valid[7] = False  # a clear alone zeroes the accumulator
    return {"a": rng.integers(0, 1 << width, (beats, lanes)), "b": rng.integers(0, 1 << width, (beats, lanes)),
            "valid": valid, "clear": clear}


@pytest.mark.simulator
@icarus
def test_run_mac_returns_accumulator_after_each_given_beat(tmp_path):
    spec = "truncated:width=6,columns=4,signed=true"
    mac = MacUnit(from_spec(spec), lanes=3, acc_width=16)
    st = given_beats(np.random.default_rng(5), 3, 12, 6)
    acc = run_mac(mac, st, build_dir=tmp_path)
    want = mac_reference(lut_of(spec).product, st["a"], st["b"], valid=st["valid"], clear=st["clear"],
                         acc_width=16, signed=True)
    assert acc.dtype == np.int64 and acc.shape == (12,)
    assert np.array_equal(acc, want)
    assert (acc < 0).any()  # read back as signed numbers


@pytest.mark.simulator
@icarus
def test_verify_mac_with_given_beats_and_expected(tmp_path):
    spec = "drum:width=6,k=3"
    mac = MacUnit(from_spec(spec), lanes=2, acc_width=20)
    st = given_beats(np.random.default_rng(1), 2, 8, 6)
    ok = verify_mac(mac, lut_of(spec), stimulus=st, build_dir=tmp_path / "ok")
    assert ok.passed and ok.cycles == 8 and len(ok.acc) == 8
    wrong = np.array(ok.acc, dtype=np.int64)
    wrong[5] += 1
    bad = verify_mac(mac, lut_of(spec), stimulus=st, expected=wrong, build_dir=tmp_path / "bad")
    assert not bad.passed and bad.mismatch_count == 1
    assert bad.mismatches[0]["cycle"] == 5 and bad.mismatches[0]["actual_acc"] == ok.acc[5]


@pytest.mark.parametrize("stimulus, exc, message", [
    ({"a": np.zeros((2, 3), int)}, ValueError, "MAC stimulus needs 'b': (beats, lanes) operand codes"),
    ({"a": np.zeros((2, 2), int), "b": np.zeros((2, 3), int)}, ValueError,
     "MAC stimulus 'a' must have shape (beats >= 1, 3) for a 3-lane MAC, not (2, 2)"),
    ({"a": np.zeros((2, 3), int), "b": np.full((2, 3), 64)}, ValueError,
     "MAC stimulus 'b' holds codes outside 0..63 (6-bit operand)"),
    ({"a": np.zeros((2, 3), int), "b": np.zeros((1, 3), int)}, ValueError,
     "MAC stimulus 'a' has 2 beats but 'b' has 1"),
    ({"a": np.zeros((2, 3)), "b": np.zeros((2, 3), int)}, TypeError,
     "MAC stimulus 'a' must hold integer codes, not float64"),
    ({"a": np.zeros((2, 3), int), "b": np.zeros((2, 3), int), "valid": [1, 0]}, ValueError,
     "MAC stimulus 'valid' must be 2 booleans (one per beat), not int64 of shape (2,)"),
    ({"a": np.zeros((2, 3), int), "b": np.zeros((2, 3), int), "acc": 1}, ValueError,
     "MAC stimulus has unknown keys 'acc'; expected 'a', 'b', 'valid', 'clear'"),
])
def test_run_mac_bad_stimulus(stimulus, exc, message):
    mac = MacUnit(from_spec("exact:width=6"), lanes=3)
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        run_mac(mac, stimulus)


def test_run_mac_needs_a_mac():
    with pytest.raises(TypeError, match="^run_mac takes a MacUnit, not 3$"):
        run_mac(3, {})


@pytest.mark.simulator
@pytest.mark.slow
@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator >= 5.036 is not installed")
def test_mac_verilator(tmp_path):
    spec = "exact:width=8,signed=true"
    mac = MacUnit(from_spec(spec), lanes=4, acc_width=20)
    result = verify_mac(mac, lut_of(spec), sim="verilator", build_dir=tmp_path, cycles=3000)
    assert result.passed, result.mismatches


def test_verify_mac_refuses_a_lut_outside_the_product_range(tmp_path):
    # An entry off by 2**acc_width wrapped to the right accumulator: a false PASS.
    spec = "exact:width=4,signed=true"
    product = lut_of(spec).product.astype(np.int64).copy()
    product[3, 5] += 1 << 11
    bad = LutFile(product, width_a=4, width_b=4, signed=True, metadata={"spec": spec})
    mac = MacUnit(from_spec(spec), lanes=2, acc_width=11)
    with pytest.raises(LutFileError, match=re.escape(
            f"LUT {bad.lut_id} holds {15 + 2048} at codes a = 3, b = 5: the MAC's multiplier "
            f"{from_spec(spec).spec} has a 8-bit product (-128..127), so the LUT is not its table (1 entries "
            "outside)")):
        verify_mac(mac, bad, build_dir=tmp_path, cycles=10)
