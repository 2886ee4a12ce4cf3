"""Gradient LUTs against brute-force implementations of the DESIGN recipe."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from appmult.lut_gen.gradients import (
    HALF_WINDOWS,
    auto_half_window,
    broadcast_lut1d,
    check_half_window,
    lre_gradients,
    lut1d_gradients,
    lut2d_and_lut1d,
    lut2d_gradients,
    ste_gradients,
)


def _vals(width, signed):
    return [(c - (1 << width) if signed and c >= 1 << (width - 1) else c) for c in range(1 << width)]


def _exact(wa, wb, signed):
    va, vb = _vals(wa, signed), _vals(wb, signed)
    return np.array([[x * y for y in vb] for x in va], dtype=np.int64)


def _ref_axis(line_by_value, values_sorted, h, signed):
    """Per-element recipe on one line (already in value order)."""
    n = len(line_by_value)
    s = [sum(line_by_value[max(0, i - h):min(n - 1, i + h) + 1]) / (min(n - 1, i + h) + 1 - max(0, i - h))
         for i in range(n)]
    edge = (max(line_by_value) - min(line_by_value)) / n
    if signed:
        mv = sum(values_sorted) / n
        cov = sum((v - mv) * f for v, f in zip(values_sorted, line_by_value))
        edge *= -1.0 if cov < 0 else 1.0
    return [(s[i + 1] - s[i - 1]) / 2 if h + 1 <= i <= n - 2 - h else edge for i in range(n)]


def _ref_lut2d(p, wa, wb, signed, h):
    va, vb = _vals(wa, signed), _vals(wb, signed)
    oa = sorted(range(1 << wa), key=lambda c: va[c])
    ob = sorted(range(1 << wb), key=lambda c: vb[c])
    ga = np.zeros(p.shape)
    gb = np.zeros(p.shape)
    for b in range(1 << wb):
        g = _ref_axis([int(p[a, b]) for a in oa], [va[a] for a in oa], h, signed)
        for k, a in enumerate(oa):
            ga[a, b] = g[k]
    for a in range(1 << wa):
        g = _ref_axis([int(p[a, b]) for b in ob], [vb[b] for b in ob], h, signed)
        for k, b in enumerate(ob):
            gb[a, b] = g[k]
    return ga, gb


@pytest.mark.parametrize("signed", [False, True])
def test_ste(signed):
    ga, gb = ste_gradients(3, 2, signed)
    va, vb = _vals(3, signed), _vals(2, signed)
    assert ga.shape == gb.shape == (8, 4) and ga.dtype == np.float32
    for a in range(8):
        for b in range(4):
            assert ga[a, b] == vb[b] and gb[a, b] == va[a]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("h", [1, 2, 4])
@pytest.mark.parametrize("widths", [(5, 4), (4, 5), (5, 5)])
def test_lut2d_vs_brute_force(signed, h, widths):
    wa, wb = widths
    rng = np.random.default_rng(10 * h + wa)
    p = _exact(wa, wb, signed) + rng.integers(-40, 41, size=(1 << wa, 1 << wb))
    ga, gb = lut2d_gradients(p, wa, wb, signed, h)
    ra, rb = _ref_lut2d(p, wa, wb, signed, h)
    np.testing.assert_allclose(ga, ra, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(gb, rb, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("h", [1, 4, 8])
def test_lut2d_exact_interior_is_ste_edges_scaled(signed, h):
    wa, wb = 6, 5
    p = _exact(wa, wb, signed)
    ga, gb = lut2d_gradients(p, wa, wb, signed, h)
    sa, sb = ste_gradients(wa, wb, signed)
    va = np.array(_vals(wa, signed))
    vb = np.array(_vals(wb, signed))
    na, nb = 1 << wa, 1 << wb
    rank_a = np.argsort(np.argsort(va))  # position of each code on the value axis
    rank_b = np.argsort(np.argsort(vb))
    inner_a = (rank_a >= h + 1) & (rank_a <= na - 2 - h)
    inner_b = (rank_b >= h + 1) & (rank_b <= nb - 2 - h)
    # Interior: exactly STE. Edges: value * (N-1)/N (range over N codes divided by N),
    # with the sign of the slope, so never the wrong sign for negative operands.
    assert np.array_equal(ga[inner_a], sa[inner_a])
    np.testing.assert_allclose(ga[~inner_a], np.broadcast_to(vb * (na - 1) / na, ga.shape)[~inner_a], rtol=1e-6)
    assert np.array_equal(gb[:, inner_b], sb[:, inner_b])
    np.testing.assert_allclose(gb[:, ~inner_b], np.broadcast_to((va * (nb - 1) / nb)[:, None], gb.shape)[:, ~inner_b],
                               rtol=1e-6)


def test_lut2d_edges_are_per_column():
    # Non-commutative, rectangular 4x3 table: the edge constant of d/da belongs to the
    # column b (range over a), not to the row (the public script's bug).
    rng = np.random.default_rng(7)
    p = rng.integers(0, 100, size=(16, 8)) * np.arange(1, 9)[None, :]
    ga, gb = lut2d_gradients(p, 4, 3, False, 2)
    col_edge = (p.max(axis=0) - p.min(axis=0)) / 16
    row_edge = (p.max(axis=1) - p.min(axis=1)) / 8
    for a in (0, 1, 2, 13, 14, 15):
        np.testing.assert_allclose(ga[a, :], col_edge, rtol=1e-6)
    for b in (0, 1, 2, 5, 6, 7):
        np.testing.assert_allclose(gb[:, b], row_edge, rtol=1e-6)
    assert not np.allclose(ga[0, :], row_edge[:8])


@pytest.mark.parametrize("signed", [False, True])
def test_lut1d_and_lre_direct_formulas(signed):
    wa, wb = 5, 4
    rng = np.random.default_rng(11)
    p = _exact(wa, wb, signed) + rng.integers(-9, 10, size=(32, 16))
    ga2, gb2 = lut2d_gradients(p, wa, wb, signed, 2)
    ga, gb = lut1d_gradients(p, wa, wb, signed, 2)
    assert ga.shape == (16,) and gb.shape == (32,)
    np.testing.assert_allclose(ga, ga2.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, gb2.astype(np.float64).mean(axis=1), rtol=1e-5, atol=1e-5)
    la, lb = lut1d_gradients(p, wa, wb, signed, method="lre")
    va, vb = np.array(_vals(wa, signed)), np.array(_vals(wb, signed))
    for b in range(16):
        np.testing.assert_allclose(la[b], np.polyfit(va, p[:, b], 1)[0], rtol=1e-5, atol=1e-5)
    for a in range(32):
        np.testing.assert_allclose(lb[a], np.polyfit(vb, p[a, :], 1)[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(la, lre_gradients(p, wa, wb, signed)[0])
    # The exact multiplier's slopes are exactly the other operand's values.
    ea, eb = lre_gradients(_exact(wa, wb, signed), wa, wb, signed)
    np.testing.assert_allclose(ea, vb, atol=1e-5)
    np.testing.assert_allclose(eb, va, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_lut2d_and_lut1d_one_pass(signed):
    rng = np.random.default_rng(12)
    p = _exact(6, 5, signed) + rng.integers(-9, 10, size=(64, 32))
    (ga, gb), (ca, cb) = lut2d_and_lut1d(p, 6, 5, signed, 4)
    assert np.array_equal(ga, lut2d_gradients(p, 6, 5, signed, 4)[0])
    assert np.array_equal(gb, lut2d_gradients(p, 6, 5, signed, 4)[1])
    assert np.array_equal(ca, lut1d_gradients(p, 6, 5, signed, 4)[0])
    assert np.array_equal(cb, lut1d_gradients(p, 6, 5, signed, 4)[1])


def test_broadcast_lut1d():
    fa, fb = broadcast_lut1d(np.arange(4), np.arange(8) * 10, 3, 2)
    assert fa.shape == fb.shape == (8, 4) and fa.dtype == np.float32
    assert fa[5, 3] == 3 and fb[5, 3] == 50


def test_broadcast_lut1d_wrong():
    with pytest.raises(ValueError, match=r"^Compact LUT-1D tables must have shapes \(4,\) and \(8,\) for 3x2 "
                                         r"operands, not \(8,\) and \(4,\)$"):
        broadcast_lut1d(np.zeros(8), np.zeros(4), 3, 2)


def test_auto_half_window():
    a = np.arange(256)[:, None]
    b = np.arange(256)[None, :]
    assert auto_half_window(a * b, 8, 8, False) == 1
    coarse = ((a >> 5) << 5) * b  # staircase in a: needs smoothing
    h = auto_half_window(coarse, 8, 8, False)
    assert h in HALF_WINDOWS and h > 1 and 2 * h + 1 < 256
    assert lut2d_gradients(coarse, 8, 8, False, "auto")[0].tolist() == lut2d_gradients(coarse, 8, 8, False, h)[0].tolist()
    # Capped by the narrower operand: 3-bit b allows H in {1, 2} only.
    h3 = auto_half_window(((np.arange(64)[:, None] >> 3) << 3) * np.arange(8)[None, :], 6, 3, False)
    assert h3 in (1, 2)


def test_half_window_wrong():
    p = _exact(4, 3, False)
    with pytest.raises(ValueError, match=r"^Half window must be one of 1, 2, 4, \.\.\., 64 or 'auto', not 3$"):
        lut2d_gradients(p, 4, 3, False, 3)
    with pytest.raises(ValueError, match=r"^Half window must be one of 1, 2, 4, \.\.\., 64, not 'auto'$"):
        check_half_window("auto", allow_auto=False)
    with pytest.raises(ValueError, match=r"^Half window 4 is too large for a 3-bit operand b: "
                                         r"LUT-2D needs 2\*H\+1 < 8$"):
        lut2d_gradients(p, 4, 3, False, 4)
    with pytest.raises(ValueError, match=r"^LUT-1D method must be 'mean' or 'lre', not 'median'$"):
        lut1d_gradients(p, 4, 3, False, 1, method="median")
    with pytest.raises(ValueError, match=r"^Product table shape \(16, 8\) does not match widths 3x3"):
        lut2d_gradients(p, 3, 3, False, 1)
    with pytest.raises(TypeError, match=r"^Product table must hold integers, not float64$"):
        lut2d_gradients(p.astype(float), 4, 3, False, 1)
    with pytest.raises(TypeError, match=r"^Operand width width_a must be an integer in 1\.\.16, not 0$"):
        ste_gradients(0, 3, False)


def test_numpy_only_imports():
    code = ("import sys, appmult.lut_gen, appmult.lut_gen.gradients, appmult.lut_gen.metrics; "
            "bad = [m for m in ('amaranth', 'torch', 'matplotlib') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_lazy_package_names():
    code = ("import sys, appmult.lut_gen as g; assert 'amaranth' not in sys.modules; "
            "assert callable(g.Characterization) and callable(g.write_listing); "
            "assert all(hasattr(g, n) for n in g.__all__)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
