"""Metrics as EvoApprox defines them, against brute force written here.

The circuits are the ones where conventions differ: a multiplier that is not 0 on a
zero operand (``p(0, b) != 0``) and the constant-zero multiplier. The reference is
plain Python over every pair (no numpy reductions, nothing shared with
``appmult.lut_gen.metrics``); the one-shot, streamed, weighted and netlist paths must
all agree with it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from appmult.lut_gen.metrics import METRIC_KEYS, MetricsAccumulator, error_metrics, metrics_under
from appmult.sim import Netlist


def _value(code: int, width: int, signed: bool) -> int:
    return code - (1 << width) if signed and code >= 1 << (width - 1) else code


def _exact_table(wa: int, wb: int, signed: bool) -> np.ndarray:
    return np.array([[_value(i, wa, signed) * _value(j, wb, signed) for j in range(1 << wb)]
                     for i in range(1 << wa)], dtype=np.int64)


def _zero_multiplier(wa: int, wb: int, signed: bool) -> np.ndarray:
    return np.zeros((1 << wa, 1 << wb), dtype=np.int64)


def _lsb_or_multiplier(wa: int, wb: int, signed: bool) -> np.ndarray:
    """Exact product with its LSB replaced by a[0] | b[0]: p(0, b) = b & 1 != 0 for odd b."""
    out = np.empty((1 << wa, 1 << wb), dtype=np.int64)
    for i in range(1 << wa):
        for j in range(1 << wb):
            v = _value(i, wa, signed) * _value(j, wb, signed)
            out[i, j] = (v & ~1) | ((i | j) & 1)
    return out


def _offset_on_zero_multiplier(wa: int, wb: int, signed: bool) -> np.ndarray:
    """Exact except that a = 0 gives b: a large relative error where exact = 0."""
    out = _exact_table(wa, wb, signed)
    out[0, :] = [_value(j, wb, signed) for j in range(1 << wb)]
    return out


def _brute(p, x, wa: int, wb: int, w=None) -> dict[str, float]:
    """Every metric by definition, over all pairs, in plain Python."""
    rows, cols = len(p), len(p[0])
    if w is None:
        w = [[1.0] * cols for _ in range(rows)]
    tot = tot_x = 0.0
    s_nz = s_abs = s_e = s_e2 = s_rel = s_rel1 = 0.0
    wce, wcre, wcre1, max_exact = 0, 0.0, 0.0, 0
    for i in range(rows):
        for j in range(cols):
            a, b, q = int(p[i][j]), int(x[i][j]), float(w[i][j])
            e = a - b
            max_exact = max(max_exact, abs(b))
            tot += q
            s_nz += q * (e != 0)
            s_abs += q * abs(e)
            s_e += q * e
            s_e2 += q * e * e
            rel1 = abs(e) / max(1, abs(b))
            s_rel1 += q * rel1
            if b != 0:
                tot_x += q
                s_rel += q * abs(e) / abs(b)
            if q > 0:
                wce = max(wce, abs(e))
                wcre1 = max(wcre1, rel1)
                if b != 0:
                    wcre = max(wcre, abs(e) / abs(b))
    full = 2 ** (wa + wb)
    mae, bias = s_abs / tot, s_e / tot
    ref = {
        "er": s_nz / tot, "mae": mae, "mae_pct": 100 * mae / full, "wce": wce, "wce_pct": 100 * wce / full,
        "mre": s_rel / tot_x, "wcre": wcre, "mre_max1": s_rel1 / tot, "wcre_max1": wcre1,
        "nmed": mae / max_exact, "mse": s_e2 / tot, "bias": bias,
        "std": math.sqrt(max(s_e2 / tot - bias * bias, 0.0)),
    }
    for key in ("er", "mre", "wcre", "mre_max1", "wcre_max1", "nmed"):
        ref[f"{key}_pct"] = 100 * ref[key]
    return ref


def _check(got, ref):
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


CIRCUITS = [_zero_multiplier, _lsb_or_multiplier, _offset_on_zero_multiplier]
SHAPES = [(4, 4, False), (4, 3, True), (3, 5, False)]


def test_metric_keys_units():
    # Every percentage ends in _pct and is 100 x its plain key; plain keys are fractions/absolutes.
    got = error_metrics(_lsb_or_multiplier(3, 3, False), _exact_table(3, 3, False))
    assert tuple(got) == METRIC_KEYS
    for key in METRIC_KEYS:
        if key.endswith("_pct") and key not in ("mae_pct", "wce_pct"):
            assert got[key] == pytest.approx(100 * got[key[:-4]]), key
    assert 0 <= got["er"] <= 1 and 0 <= got["mre"] <= 1


@pytest.mark.parametrize("circuit", CIRCUITS)
@pytest.mark.parametrize("wa,wb,signed", SHAPES)
def test_uniform_against_brute_force(circuit, wa, wb, signed):
    p, x = circuit(wa, wb, signed), _exact_table(wa, wb, signed)
    got = error_metrics(p, x)
    _check(got, _brute(p.tolist(), x.tolist(), wa, wb))
    assert got["pairs"] == 1 << (wa + wb) and got["weighted"] is False


@pytest.mark.parametrize("circuit", CIRCUITS)
@pytest.mark.parametrize("wa,wb,signed", SHAPES)
def test_streamed_equals_one_shot(circuit, wa, wb, signed):
    # The 16x16 path: rows streamed in uneven blocks, widths given explicitly.
    p, x = circuit(wa, wb, signed), _exact_table(wa, wb, signed)
    acc = MetricsAccumulator(width_a=wa, width_b=wb)
    cuts = sorted({0, 1, 3, (1 << wa) // 2, (1 << wa) - 1, 1 << wa})
    for r0, r1 in zip(cuts, cuts[1:]):
        acc.update(p[r0:r1], x[r0:r1])
    assert acc.result() == error_metrics(p, x)


@pytest.mark.parametrize("circuit", CIRCUITS)
@pytest.mark.parametrize("wa,wb,signed", SHAPES)
def test_metrics_under_against_brute_force(circuit, wa, wb, signed):
    rng = np.random.default_rng(wa * 10 + wb)
    ha = rng.integers(0, 5, 1 << wa).astype(float)
    hb = rng.integers(0, 5, 1 << wb).astype(float)
    ha[0] = 3.0  # the zero operand must carry weight: that is where the conventions differ
    p, x = circuit(wa, wb, signed), _exact_table(wa, wb, signed)
    w = [[ha[i] * hb[j] for j in range(1 << wb)] for i in range(1 << wa)]
    got = metrics_under(p, x, ha, hb)
    ref = _brute(p.tolist(), x.tolist(), wa, wb, w)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["weighted"] is True
    # A weighted accumulator streamed in blocks agrees with metrics_under.
    acc = MetricsAccumulator(weighted=True, width_a=wa, width_b=wb)
    wn = np.outer(ha / ha.sum(), hb / hb.sum())
    for r0, r1 in ((0, 1), (1, 1 << wa)):
        acc.update(p[r0:r1], x[r0:r1], wn[r0:r1])
    assert acc.result() == got


def test_constant_zero_multiplier_8x8():
    # EvoApprox: MRE = 100% (every nonzero exact product is missed entirely); EP = share
    # of nonzero exact products = 255*255/65536; the max(1, .) convention gives 99.22%.
    x = _exact_table(8, 8, False)
    got = error_metrics(_zero_multiplier(8, 8, False), x)
    assert got["mre"] == 1.0 and got["mre_pct"] == 100.0 and got["wcre_pct"] == 100.0
    assert got["er"] == 255 * 255 / 65536 and got["er_pct"] == pytest.approx(99.22, abs=5e-3)
    assert got["mre_max1"] == pytest.approx(255 * 255 / 65536, rel=1e-14)
    assert got["wce"] == 255 * 255 and got["wce_pct"] == pytest.approx(100 * 255 * 255 / 65536)
    assert got["mae_pct"] == pytest.approx(100 * (255 * 256 // 2) ** 2 / 65536 / 65536)


def test_nonzero_on_zero_operand_differs_by_convention():
    # p(0, b) = b: exact everywhere else, so the EvoApprox MRE is 0 while max(1, .) is not.
    x = _exact_table(4, 4, False)
    got = error_metrics(_offset_on_zero_multiplier(4, 4, False), x)
    assert got["mre"] == 0.0 and got["wcre"] == 0.0
    assert got["mre_max1"] == pytest.approx(sum(range(16)) / 256)
    assert got["wcre_max1"] == 15.0
    assert got["er"] == 15 / 256


def test_undefined_relative_errors_are_nan():
    # All weight on a = 0: no pair with a nonzero exact product, so MRE/WCRE are undefined.
    x = _exact_table(3, 3, False)
    ha = np.zeros(8)
    ha[0] = 1.0
    got = metrics_under(_offset_on_zero_multiplier(3, 3, False), x, ha, np.ones(8))
    assert math.isnan(got["mre"]) and math.isnan(got["wcre"]) and math.isnan(got["mre_pct"])
    assert got["mre_max1"] == pytest.approx(sum(range(8)) / 8)
    # Widths unknown (not a 2-D table of power-of-two sides): MAE% and WCE% are nan, not guessed.
    flat = error_metrics(np.array([1, 2, 3]), np.array([1, 2, 4]))
    assert math.isnan(flat["mae_pct"]) and math.isnan(flat["wce_pct"]) and flat["mae"] == 1 / 3
    assert error_metrics(np.array([1, 2, 3]), np.array([1, 2, 4]), width_a=1, width_b=1)["wce_pct"] == 25.0


def test_widths_wrong():
    with pytest.raises(TypeError, match=r"^width_a must be a non-negative integer or None, not -1$"):
        MetricsAccumulator(width_a=-1)
    with pytest.raises(TypeError, match=r"^width_b must be a non-negative integer or None, not 2.0$"):
        error_metrics(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int), width_b=2.0)


_VERILOG = {
    "zero": "module zero(input [3:0] a, input [2:0] b, output [6:0] p);\n  assign p = 7'd0;\nendmodule\n",
    "lsb_or": ("module lsb_or(input [3:0] a, input [2:0] b, output [6:0] p);\n"
               "  wire [6:0] m = a * b;\n  assign p = {m[6:1], a[0] | b[0]};\nendmodule\n"),
}


@pytest.mark.parametrize("name,circuit", [("zero", _zero_multiplier), ("lsb_or", _lsb_or_multiplier)])
def test_exhaustive_netlist_path(tmp_path, name, circuit):
    # The characterization path: a synthesized netlist streamed row block by row block.
    (tmp_path / f"{name}.v").write_text(_VERILOG[name])
    net = Netlist.from_verilog(tmp_path / f"{name}.v", top=name, width_a=4, width_b=3, signed=False)
    x = _exact_table(4, 3, False)
    np.testing.assert_array_equal(net.exhaustive(), circuit(4, 3, False))
    acc = MetricsAccumulator(width_a=4, width_b=3)
    for a0, a1, block in net.exhaustive_chunks(chunk_vectors=16):
        acc.update(block, x[a0:a1])
    got = acc.result()
    _check(got, _brute(circuit(4, 3, False).tolist(), x.tolist(), 4, 3))
    assert got == error_metrics(net.exhaustive(), x)
