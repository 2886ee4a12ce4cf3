"""Contracts of the gradient tables, metrics and LUT file, pinned where mutation testing
(``make mutate``, tests/README.md) found them unchecked.

References are independent: plain loops and numpy written from the definitions in
DESIGN.md and the module docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest

from appmult.codes import codes_to_values
from appmult.lut_gen import (auto_half_window, broadcast_lut1d, lre_gradients, lut1d_gradients,
                             lut2d_and_lut1d, lut2d_gradients, ste_gradients)


def _table(wa: int, wb: int, signed: bool, seed: int = 0) -> np.ndarray:
    """A truncated-like product table with some noise: approximate and non-commutative."""
    rng = np.random.default_rng(seed)
    va = codes_to_values(np.arange(1 << wa), wa, signed)
    vb = codes_to_values(np.arange(1 << wb), wb, signed)
    return (np.outer(va, vb) & ~3) + rng.integers(-1, 2, (1 << wa, 1 << wb))


@pytest.mark.parametrize("signed", [False, True])
def test_every_gradient_table_is_float32_of_the_documented_shape(signed):
    wa, wb = 4, 5
    p = _table(wa, wb, signed)
    full = (1 << wa, 1 << wb)
    for ga, gb in (ste_gradients(wa, wb, signed), lut2d_gradients(p, wa, wb, signed, 2),
                   lut2d_and_lut1d(p, wa, wb, signed, 2)[0]):
        assert ga.dtype == gb.dtype == np.float32 and ga.shape == gb.shape == full
    for ga, gb in (lre_gradients(p, wa, wb, signed), lut1d_gradients(p, wa, wb, signed, 2),
                   lut1d_gradients(p, wa, wb, signed, method="lre"), lut2d_and_lut1d(p, wa, wb, signed, 2)[1]):
        assert ga.dtype == gb.dtype == np.float32
        assert ga.shape == (1 << wb,) and gb.shape == (1 << wa,)


@pytest.mark.parametrize("signed", [False, True])
def test_lut1d_default_half_window_is_the_automatic_one(signed):
    p = _table(5, 5, signed, seed=3)
    h = auto_half_window(p, 5, 5, signed)
    got = lut1d_gradients(p, 5, 5, signed)
    want = lut1d_gradients(p, 5, 5, signed, h)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(lut2d_gradients(p, 5, 5, signed)[0], lut2d_gradients(p, 5, 5, signed, h)[0])


def test_lut2d_and_lut1d_refuses_auto():
    with pytest.raises(ValueError, match=r"^Half window must be one of 1, 2, 4, \.\.\., 64, not 'auto'$"):
        lut2d_and_lut1d(_table(4, 4, False), 4, 4, False, "auto")


def test_broadcast_lut1d_checks_each_shape():
    ga, gb = np.arange(8.0), np.arange(4.0)          # 2x3 operands: grad_a per b (8), grad_b per a (4)
    full_a, full_b = broadcast_lut1d(ga, gb, 2, 3)
    assert full_a.dtype == full_b.dtype == np.float32
    assert np.array_equal(full_a, np.tile(ga, (4, 1))) and np.array_equal(full_b, np.tile(gb[:, None], (1, 8)))
    for bad in ((ga, np.arange(5.0)), (np.arange(7.0), gb)):    # one of the two wrong is enough
        with pytest.raises(ValueError, match=r"^Compact LUT-1D tables must have shapes \(8,\) and \(4,\)"):
            broadcast_lut1d(*bad, 2, 3)


# -- auto_half_window: the documented heuristic, re-implemented with plain loops ------------

def _ref_lut2d_lines(f: np.ndarray, h: int, signed: bool, values: np.ndarray) -> np.ndarray:
    """LUT-2D derivative along axis 1 of ``f`` (each row one line, sorted by value), from
    DESIGN.md's four steps: clipped moving average (prefix sums), central difference inside,
    one edge constant per line (with the slope's sign for signed operands)."""
    m, n = f.shape
    c = np.concatenate([np.zeros((m, 1)), np.cumsum(f, axis=1)], axis=1)
    lo = np.maximum(0, np.arange(n) - h)
    hi = np.minimum(n - 1, np.arange(n) + h) + 1
    s = (c[:, hi] - c[:, lo]) / (hi - lo)
    edge = (f.max(axis=1) - f.min(axis=1)) / n
    if signed:
        cov = ((values - values.mean())[None, :] * f).sum(axis=1)
        edge = edge * np.where(cov == 0, 1.0, np.sign(cov))
    g = np.repeat(edge[:, None], n, axis=1)
    i = np.arange(h + 1, n - 1 - h)
    g[:, i] = (s[:, i + 1] - s[:, i - 1]) / 2
    return g


def _ref_roughness(g: np.ndarray, h: int) -> float:
    inner = g[:, h + 1:g.shape[1] - 1 - h]
    if inner.shape[1] < 2:
        return 0.0
    scale = np.abs(inner).mean()
    return 0.0 if scale == 0 else float(np.abs(np.diff(inner, axis=1)).mean() / scale)


def _ref_roughness_by_h(p, wa, wb, signed, max_lines=128) -> dict[int, float]:
    va = codes_to_values(np.arange(1 << wa), wa, signed)
    vb = codes_to_values(np.arange(1 << wb), wb, signed)
    order_a, order_b = np.argsort(va, kind="stable"), np.argsort(vb, kind="stable")
    na, nb = 1 << wa, 1 << wb
    cols = order_b[sorted(set(np.linspace(0, nb - 1, min(max_lines, nb)).astype(int)))]
    rows = order_a[sorted(set(np.linspace(0, na - 1, min(max_lines, na)).astype(int)))]
    fa = p[np.ix_(order_a, cols)].T.astype(float)       # one line per sampled column b
    fb = p[np.ix_(rows, order_b)].astype(float)         # one line per sampled row a
    return {h: max(_ref_roughness(_ref_lut2d_lines(fa, h, signed, va[order_a]), h),
                   _ref_roughness(_ref_lut2d_lines(fb, h, signed, vb[order_b]), h))
            for h in (1, 2, 4, 8, 16, 32, 64) if 2 * h + 1 < min(na, nb)}


def _ref_choice(rough: dict[int, float], threshold: float = 0.05) -> int:
    """The smallest H at or below the threshold, else the (first) smoothest."""
    for h, r in rough.items():
        if r <= threshold:
            return h
    return min(rough, key=lambda h: (rough[h], h))


def _noisy(wa, wb, signed, noise, seed, step=1):
    rng = np.random.default_rng(seed)
    va = codes_to_values(np.arange(1 << wa), wa, signed)
    vb = codes_to_values(np.arange(1 << wb), wb, signed)
    exact = np.outer(va, vb)
    return (exact // step) * step + rng.integers(-noise, noise + 1, exact.shape)


CASES = [(6, 6, False, 0, 0, 8), (6, 6, True, 0, 1, 16), (6, 5, False, 3, 2, 1), (6, 6, True, 40, 3, 1),
         (8, 8, False, 0, 4, 64), (8, 8, True, 300, 5, 1), (8, 7, False, 2000, 6, 1), (7, 8, True, 0, 7, 256),
         (5, 6, False, 200, 8, 1), (8, 8, False, 20, 9, 16)]


def _check_against_reference(p, wa, wb, signed):
    rough = _ref_roughness_by_h(p, wa, wb, signed)
    assert auto_half_window(p, wa, wb, signed) == _ref_choice(rough)
    for threshold in (0.0, 0.2, 1.0, np.inf):
        assert auto_half_window(p, wa, wb, signed, threshold=threshold) == _ref_choice(rough, threshold)
    assert auto_half_window(p, wa, wb, signed, max_lines=5) == \
        _ref_choice(_ref_roughness_by_h(p, wa, wb, signed, max_lines=5))
    # Thresholds just above and just below each half window's roughness pin every
    # roughness value (not only the decision at the default threshold).
    for r in rough.values():
        for threshold in (r * (1 + 1e-7), r * (1 - 1e-7)):
            if r > 0:
                assert auto_half_window(p, wa, wb, signed, threshold=threshold) == _ref_choice(rough, threshold)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}{'s' if c[2] else 'u'}-n{c[3]}-q{c[5]}")
def test_auto_half_window_follows_its_documented_heuristic(case):
    wa, wb, signed, noise, seed, step = case
    _check_against_reference(_noisy(wa, wb, signed, noise, seed, step), wa, wb, signed)


@pytest.mark.parametrize("wa, wb", [(8, 5), (5, 8), (3, 3)])
def test_auto_half_window_rough_in_one_direction(wa, wb):
    """A steep ramp in ``a``: d/da is smooth relative to its size, while d/db is a
    row-dependent slope plus noise, so the roughness comes from the sampled rows alone;
    3-bit operands leave two interior values at H = 2."""
    rng = np.random.default_rng(wa * 16 + wb)
    a, b = np.arange(1 << wa)[:, None], np.arange(1 << wb)[None, :]
    p = a * 10 ** 6 + (a + 1) * b * 20 + rng.integers(-200, 201, (1 << wa, 1 << wb))
    _check_against_reference(p, wa, wb, False)


def test_auto_half_window_two_interior_values():
    """3-bit operands at H = 2 leave two interior gradient values; this random table is
    rougher there than at H = 1, so the fallback (no H reaches the threshold) picks H = 1."""
    p = np.random.default_rng(1).integers(0, 64, (8, 8))
    rough = _ref_roughness_by_h(p, 3, 3, False)
    assert rough[1] < rough[2]
    _check_against_reference(p, 3, 3, False)


def test_auto_half_window_cases_are_not_all_alike():
    """The cases above reach several different half windows (else they would test little)."""
    chosen = {_ref_choice(_ref_roughness_by_h(_noisy(*c[:4], c[4], c[5]), *c[:3])) for c in CASES}
    assert len(chosen) >= 3, chosen


@pytest.mark.parametrize("wa, wb", [(2, 2), (2, 6), (6, 2)])
def test_two_bit_operands_take_half_window_one(wa, wb):
    """2*H+1 < 4 admits only H = 1, for the automatic choice and for explicit tables."""
    p = _noisy(wa, wb, False, 1, 0)
    assert auto_half_window(p, wa, wb, False) == 1
    ga, gb = lut2d_gradients(p, wa, wb, False, 1)
    assert ga.shape == gb.shape == p.shape
    with pytest.raises(ValueError, match=r"^Half window 2 is too large for a 2-bit operand "):
        lut2d_gradients(p, wa, wb, False, 2)
    with pytest.raises(ValueError, match=r"^No LUT-2D half window fits 1x2 operands \(needs 2\*H\+1 < 2\)$"):
        auto_half_window(np.zeros((2, 4), np.int64), 1, 2, False)


def test_check_fits_names_the_operand():
    p = _noisy(3, 5, False, 0, 0)
    with pytest.raises(ValueError, match=r"^Half window 4 is too large for a 3-bit operand a: LUT-2D needs 2\*H\+1 < 8$"):
        lut2d_gradients(p, 3, 5, False, 4)
    with pytest.raises(ValueError, match=r"^Half window 4 is too large for a 3-bit operand b: LUT-2D needs 2\*H\+1 < 8$"):
        lut2d_gradients(p.T.copy(), 5, 3, False, 4)


def test_operand_width_limits():
    for wa, wb in ((1, 16), (16, 1)):
        ga, gb = ste_gradients(wa, wb, False)
        assert ga.shape == (1 << wa, 1 << wb)
    for bad, name in ((0, "width_b"), (17, "width_b"), (True, "width_b")):
        with pytest.raises(TypeError, match=f"^Operand width {name} must be an integer in 1..16, not {bad!r}$"):
            ste_gradients(3, bad, False)
    with pytest.raises(TypeError, match="^Operand width width_a must be an integer in 1..16, not 0$"):
        ste_gradients(0, 3, False)


def test_signed_edge_constant_of_a_line_without_slope_is_positive():
    """A column whose least-squares slope is exactly 0 keeps the published (positive) edge
    constant (max - min) / N; a decreasing column gets it negated."""
    w = 4
    v = codes_to_values(np.arange(16), w, True)          # -8..7, mean -0.5
    p = np.outer(v, v)
    p[:, 1] = v * (v + 1)                                # symmetric about -0.5: zero covariance
    ga, _ = lut2d_gradients(p, w, w, True, 1)
    code_of_min = int(np.flatnonzero(v == -8)[0])        # an edge of the value axis
    span = float(p[:, 1].max() - p[:, 1].min())
    assert ga[code_of_min, 1] == pytest.approx(span / 16)
    neg_b = int(np.flatnonzero(v == -3)[0])              # d(a*b)/da = b = -3 < 0: negative edge
    assert ga[code_of_min, neg_b] == pytest.approx(-(3 * 15) / 16)


# -- error metrics -------------------------------------------------------------------------

from appmult.lut_gen import MetricsAccumulator, error_metrics, metrics_under  # noqa: E402


def _mae(p, x) -> float:
    return float(np.mean(np.abs(np.asarray(p, np.int64) - np.asarray(x, np.int64))))


@pytest.mark.parametrize("shape, widths, scale", [
    ((4, 8), (None, None), 32),        # read from a (2**wa, 2**wb) table
    ((1, 4), (None, None), 4),         # one row: width_a = 0
    ((4, 1), (None, None), 4),         # one column: width_b = 0
    ((3, 4), (None, None), None),      # 3 rows: not a table of codes
    ((4, 3), (None, None), None),
    ((4, 4), (3, 3), 64),              # given widths win over the table's shape
    ((4, 4), (3, None), 32),
    ((4, 4), (None, 1), 8),
])
def test_mae_and_wce_pct_full_scale(shape, widths, scale):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, shape)
    p = x + rng.integers(-3, 4, shape)
    m = error_metrics(p, x, width_a=widths[0], width_b=widths[1])
    wce = int(np.abs(p - x).max())
    if scale is None:
        assert np.isnan(m["mae_pct"]) and np.isnan(m["wce_pct"])
    else:
        assert m["mae_pct"] == pytest.approx(100 * _mae(p, x) / scale)
        assert m["wce_pct"] == pytest.approx(100 * wce / scale)


def test_blocks_that_are_not_2d_tables_give_no_full_scale():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, 16)
    p = x + 1
    assert np.isnan(error_metrics(p, x)["mae_pct"])                 # 1-D: no table shape
    assert np.isnan(error_metrics(p, x, width_b=4)["mae_pct"])      # width_a still unknown
    assert error_metrics(p, x, width_a=0, width_b=4)["mae_pct"] == pytest.approx(100 / 16)
    acc = MetricsAccumulator()
    acc.update(p[:8].reshape(2, 4), x[:8].reshape(2, 4))
    acc.update(p[8:].reshape(1, 8), x[8:].reshape(1, 8))            # rows of another length
    assert np.isnan(acc.result()["mae_pct"])


def test_3d_blocks_are_rows_of_their_last_axis():
    rng = np.random.default_rng(3)
    x = rng.integers(-40, 40, (2, 3, 4))
    p = x + rng.integers(-2, 3, x.shape)
    a, b = error_metrics(p, x), error_metrics(p.reshape(6, 4), x.reshape(6, 4))
    for k in ("mae", "mre", "wce", "wcre", "mse", "bias", "std", "er", "pairs"):
        assert a[k] == b[k], k


def test_relative_metrics_without_and_with_one_nonzero_exact_product():
    x = np.zeros((2, 2), np.int64)
    p = np.array([[0, 3], [1, 0]])
    m = error_metrics(p, x)
    assert np.isnan(m["mre"]) and np.isnan(m["wcre"]) and m["nmed"] == 0.0 and m["max_exact"] == 0
    assert np.isnan(error_metrics(p, x, weights=np.ones((2, 2)))["mre"])
    x1 = np.array([[0, 0], [0, 4]])
    p1 = np.array([[0, 0], [0, 5]])
    m1 = error_metrics(p1, x1)
    assert m1["mre"] == pytest.approx(0.25) and m1["wcre"] == pytest.approx(0.25)
    mw = error_metrics(p1, x1, weights=np.ones((2, 2)))
    assert mw["mre"] == pytest.approx(0.25) and mw["wcre"] == pytest.approx(0.25)


def test_integer_weights_are_weights():
    rng = np.random.default_rng(4)
    x = rng.integers(-30, 30, (4, 4))
    p = x + rng.integers(-2, 3, (4, 4))
    w = rng.integers(0, 5, (4, 4))
    w[1, :] = 0                                              # a row of zero weight
    a, b = error_metrics(p, x, weights=w), error_metrics(p, x, weights=w.astype(float))
    for k in ("mae", "mre", "mse", "bias", "std", "er", "wce"):
        assert a[k] == pytest.approx(b[k]), k
    keep = w > 0
    e = (p - x)[keep].astype(float)
    ww = w[keep] / w[keep].sum()
    assert a["bias"] == pytest.approx((ww * e).sum()) and a["mae"] == pytest.approx((ww * np.abs(e)).sum())
    assert a["std"] == pytest.approx(np.sqrt((ww * (e - (ww * e).sum()) ** 2).sum()))


def test_exact_products_must_be_integers():
    with pytest.raises(TypeError, match=r"^Exact products must be integers, not float64$"):
        error_metrics(np.zeros((2, 2), np.int64), np.zeros((2, 2)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_histograms_must_be_finite_and_non_negative(bad):
    p = np.zeros((4, 4), np.int64)
    h = np.ones(4)
    h[2] = bad
    with pytest.raises(ValueError, match=r"^Histogram hist_b must be finite and non-negative$"):
        metrics_under(p, p, np.ones(4), h)


def test_a_block_larger_than_the_streaming_block():
    """One update of more than 2**22 pairs is split into row blocks: every row counts once."""
    n = (1 << 22) + 6
    x = np.zeros((n, 1), np.int64)
    p = x.copy()
    p[-3:, 0] = (5, -7, 2)                   # errors only in the last (partial) block
    p[:2, 0] = (1, 1)                        # and in the first
    m = error_metrics(p, x, width_a=0, width_b=0)
    assert m["pairs"] == n and m["wce"] == 7
    assert m["mae"] == pytest.approx(16 / n) and m["bias"] == pytest.approx(2 / n)
    assert m["er"] == pytest.approx(5 / n)


# -- the LUT file ----------------------------------------------------------------------------

import io  # noqa: E402
import zipfile  # noqa: E402

from appmult.lut_gen import LutFile, LutFileError, load  # noqa: E402


def _small_lut(wa=3, wb=2, signed=False) -> LutFile:
    return LutFile(_noisy(wa, wb, signed, 1, 0), width_a=wa, width_b=wb, signed=signed)


def test_set_gradient_stores_a_private_read_only_float32_copy_and_rehashes():
    lut = _small_lut()
    before = lut.sha256
    ga = np.arange(32, dtype=np.float32).reshape(8, 4)
    gb = np.ones((8, 4), dtype=np.float32)
    lut.set_gradient("lut2d", ga, gb)
    assert lut.sha256 != before                                    # the hash covers gradients
    sa, sb = lut.gradient("lut2d")
    assert not sa.flags.writeable and not sb.flags.writeable
    ga[0, 0] = gb[0, 0] = 99.0                                     # the caller's arrays stay the caller's
    assert sa[0, 0] == 0.0 and sb[0, 0] == 1.0
    again = lut.sha256
    lut.set_gradient("lut2d", ga, gb)
    assert lut.sha256 != again
    lut.set_gradient("lut1d", np.arange(4.0), np.asfortranarray(np.ones(8)))   # float64 in
    assert all(g.dtype == np.float32 for g in lut.gradient("lut1d"))


@pytest.mark.parametrize("ga_shape, gb_shape", [((8, 4), (4,)), ((4,), (8, 4)), ((4,), (4,)), ((8,), (8,))])
def test_set_gradient_refuses_mixed_or_wrong_shapes(ga_shape, gb_shape):
    with pytest.raises(LutFileError, match=r"^Gradient tables for 'lut1d' have shapes "):
        _small_lut().set_gradient("lut1d", np.zeros(ga_shape), np.zeros(gb_shape))


def test_non_square_gradients_and_wide_products_round_trip(tmp_path):
    """12x3 bits: gradient members (128 KiB) beyond the fixed header slack, so the size
    limits derived from the widths decide; a product beyond int32 is stored as int64."""
    p = _noisy(12, 3, False, 1, 0)
    p[0, 0] = 2 ** 40
    full = (4096, 8)
    lut = LutFile(p, width_a=12, width_b=3, signed=False,
                  gradients={"lut2d": (np.ones(full), np.full(full, 2.0)),
                             "lut1d": (np.arange(8.0), np.arange(4096.0))})
    back = load(lut.save(tmp_path / "wide.npz"))
    assert back.sha256 == lut.sha256 and np.array_equal(back.product, p)
    assert np.array_equal(back.gradient("lut2d")[1], np.full(full, 2.0))
    assert np.array_equal(back.gradient("lut1d")[1], np.arange(4096.0))


def _rewrite_member(src, dst, name, transform):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == name:
                buf = io.BytesIO()
                np.save(buf, transform(np.load(io.BytesIO(data), allow_pickle=False)))
                data = buf.getvalue()
            zout.writestr(info.filename, data)


def test_gradient_members_must_be_float32(tmp_path):
    lut = LutFile(_noisy(3, 3, False, 1, 0), width_a=3, width_b=3, signed=False,
                  gradients={"lut1d": (np.arange(8.0), np.ones(8))})
    src = lut.save(tmp_path / "ok.npz")
    _rewrite_member(src, tmp_path / "f64.npz", "grad__lut1d__a.npy", lambda a: a.astype(np.float64))
    with pytest.raises(LutFileError, match=r"float32 of shape \(8, 8\) or \(8,\)"):
        load(tmp_path / "f64.npz")


def test_fortran_ordered_members_are_read_in_their_order(tmp_path):
    """Another writer may store a member in Fortran order; its values must not come back
    transposed (the content hash would refuse them, or worse, a square table would load
    wrong if the hash did not cover it)."""
    lut = LutFile(_noisy(3, 3, True, 2, 1), width_a=3, width_b=3, signed=True,
                  gradients={"lut2d": (np.arange(64.0).reshape(8, 8), np.ones((8, 8)))})
    src = lut.save(tmp_path / "c.npz")
    _rewrite_member(src, tmp_path / "f1.npz", "product.npy", np.asfortranarray)
    _rewrite_member(tmp_path / "f1.npz", tmp_path / "f.npz", "grad__lut2d__a.npy", np.asfortranarray)
    back = load(tmp_path / "f.npz")
    assert np.array_equal(back.product, lut.product)
    assert np.array_equal(back.gradient("lut2d")[0], np.arange(64.0).reshape(8, 8))


@pytest.mark.parametrize("spec, says", [
    ("exact:width_a=4,width_b=3", "width_a=4"),
    ("exact:width_a=3,width_b=4", "width_b=4"),
    ("exact:width_a=3,width_b=3,signed=true", "signed=true"),
    ("exact:width=3,signed=false", None),                        # agrees
    ("exact:width_a=3,width_b=3,k=4", None),                     # other parameters say nothing
    ("exact:width_a=3,width_b=3,signed=true,", "signed=true"),   # a stray comma (a spec error) still states it
    ("exact:width_a=3,,width_b=4", "width_b=4"),
])
def test_metadata_spec_claims_are_checked_one_by_one(spec, says):
    table = _noisy(3, 3, False, 0, 0)
    if says is None:
        LutFile(table, width_a=3, width_b=3, signed=False, metadata={"spec": spec})
        return
    with pytest.raises(LutFileError, match=f"^LUT metadata spec '{spec}' says {says}, but the table is 3x3 unsigned$"):
        LutFile(table, width_a=3, width_b=3, signed=False, metadata={"spec": spec})


@pytest.mark.parametrize("wa, wb", [(1, 16), (16, 1)])
def test_widths_one_and_sixteen_round_trip(wa, wb, tmp_path):
    lut = LutFile(np.zeros((1 << wa, 1 << wb), np.int64), width_a=wa, width_b=wb, signed=False)
    back = load(lut.save(tmp_path / "edge.npz"))
    assert (back.width_a, back.width_b) == (wa, wb) and back.sha256 == lut.sha256


def test_content_hash_is_stable():
    """Every LUT file on disk stores this hash: a change to how it is computed (canonical
    JSON of header and metadata, little-endian int64 products, float32 gradients) makes
    every existing file fail its integrity check. Change the expected value only together
    with FORMAT_VERSION."""
    def make(signed=True, **md):
        return LutFile(np.array([[0, 1], [2, -3], [4, 5], [-6, 7]]), width_a=2, width_b=1, signed=signed,
                       metadata=md or {"zeta": 1, "alpha": [1.5, "x"], "spec": "custom table"},
                       gradients={"lut1d": (np.array([0.5, -1.0]), np.array([1.0, 2.0, 3.0, 4.0]))})
    assert make().sha256 == "96143ccafc2940500d4c168b65902f68a537c46ca44dc19a5cb14878170a7337"
    assert make(signed=False).sha256 != make().sha256             # the header is hashed
    assert make(note="a").sha256 != make(note="b").sha256         # the metadata is hashed


@pytest.mark.parametrize("metadata", [{"x": float("nan")}, {"x": np.arange(3)}, {"x": {1, 2}}])
def test_metadata_must_be_canonical_json(metadata):
    with pytest.raises(LutFileError, match="^LUT metadata must be JSON-serialisable: "):
        LutFile(np.zeros((2, 2), np.int64), width_a=1, width_b=1, signed=False, metadata=metadata)


@pytest.mark.parametrize("bad", [0, 17, True, 2.0])
def test_lut_widths_out_of_range_are_refused(bad):
    with pytest.raises(LutFileError, match=f"^LUT width_b must be an integer in 1..16, not {bad!r}$"):
        LutFile(np.zeros((2, 2), np.int64), width_a=1, width_b=bad, signed=False)


def _with_extra_member(src, dst, name: str, payload: np.ndarray):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        buf = io.BytesIO()
        np.save(buf, payload)
        zout.writestr(name, buf.getvalue())


@pytest.mark.parametrize("member", ["notes__a.npy", "readme.txt", "grad__extra__a.npy"])
def test_members_that_the_header_does_not_account_for_are_refused(member, tmp_path):
    src = _small_lut().save(tmp_path / "ok.npz")
    _with_extra_member(src, tmp_path / "extra.npz", member, np.zeros(4, np.float32))
    with pytest.raises(LutFileError, match=f"{member}"):
        load(tmp_path / "extra.npz")


def test_missing_gradient_names_what_there_is():
    lut = _small_lut()
    with pytest.raises(KeyError, match=r"holds no 'lut2d' gradient tables \(it has: none\)"):
        lut.gradient("lut2d")
    with pytest.raises(LutFileError, match=r"^LUT width_a must be an integer in 1..16, not 0$"):
        LutFile(np.zeros((1, 2), np.int64), width_a=0, width_b=1, signed=False)


import warnings  # noqa: E402


@pytest.mark.parametrize("wa, wb", [(2, 2), (2, 5), (5, 2)])
@pytest.mark.parametrize("signed", [False, True])
def test_auto_half_window_two_bit_operand_has_no_interior(wa, wb, signed):
    """A 2-bit operand leaves no interior gradient value at H = 1 (the only half window
    that fits): its roughness is 0 by definition, not the mean of an empty slice, so the
    choice follows the reference and no RuntimeWarning escapes."""
    p = _noisy(wa, wb, signed, 3, wa * 16 + wb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_against_reference(p, wa, wb, signed)


@pytest.mark.parametrize("weighted", [False, True])
def test_3d_block_is_bit_identical_to_its_rows_streamed_one_by_one(weighted):
    """The last axis is a row whatever the block's rank: one 3-D update and the same
    rows fed one at a time give bit-identical results (the float relative sums and the
    weighted per-row statistics depend on which elements share a row)."""
    from appmult.lut_gen import METRIC_KEYS
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x = rng.integers(-40, 40, (2, 3, 4))
        p = x + rng.integers(-2, 3, x.shape)
        w = rng.random(x.shape) if weighted else None
        one = MetricsAccumulator(weighted=weighted, width_a=3, width_b=2)
        one.update(p, x, w)
        rows = MetricsAccumulator(weighted=weighted, width_a=3, width_b=2)
        for i in range(6):
            rows.update(p.reshape(6, 4)[i], x.reshape(6, 4)[i], None if w is None else w.reshape(6, 4)[i])
        a, b = one.result(), rows.result()
        for k in METRIC_KEYS:
            assert a[k] == b[k], (seed, k)


@pytest.mark.parametrize("k, m, zero_row", [(4, 4, 1), (4, 3, 0), (8, 5, 7)])
def test_zero_weight_row_mean_is_defined_whatever_the_freed_memory(k, m, zero_row):
    """A row of zero weight has no mean; it must enter the merge as a defined value (0,
    times weight 0), never as whatever memory numpy hands back. Freed NaN buffers of the
    per-row size sit in numpy's small-allocation cache before the call, so an
    uninitialised per-row output would pick one up and turn bias/std/mse into nan."""
    rng = np.random.default_rng(k * 10 + m)
    x = rng.integers(-30, 30, (k, m))
    p = x + rng.integers(-2, 3, (k, m))
    w = rng.random((k, m)) + 0.1
    w[zero_row] = 0.0
    keep = w > 0
    e = (p - x)[keep].astype(float)
    ww = w[keep] / w[keep].sum()
    bias = (ww * e).sum()
    for _ in range(3):
        junk = [np.full(k, np.nan) for _ in range(8)]
        del junk
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = error_metrics(p, x, weights=w)
        assert r["bias"] == pytest.approx(bias)
        assert r["std"] == pytest.approx(np.sqrt((ww * (e - bias) ** 2).sum()))
        assert r["mse"] == pytest.approx((ww * e * e).sum())
