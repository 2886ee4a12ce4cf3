"""Error metrics against independent straightforward computations."""

from __future__ import annotations

import importlib
import math
from fractions import Fraction

import numpy as np
import pytest

from appmult.codes import codes_to_values
from appmult.lut_gen.metrics import METRIC_KEYS, MetricsAccumulator, error_metrics, exact_product, metrics_under

SPECS = [
    "exact:width=5",
    "exact:width_a=5,width_b=3,signed=true",
    "truncated:width=6,columns=4",
    "truncated:width=5,columns=3,signed=true",
    "perforated:width=5,rows=[0,1]",
    "broken_array:width=6,hbl=1,vbl=4",
    "drum:width=6,k=3",
    "drum:width=6,k=3,signed=true",
    "mitchell:width=6",
    "loa:width=6,lower=3",
]


def _model_table(spec: str):
    hdl = importlib.import_module("appmult.hdl")
    family = spec.partition(":")[0]
    try:
        importlib.import_module(f"appmult.hdl.{family}")
    except ImportError:
        pytest.skip(f"family {family} is not available")
    if family not in hdl.FAMILIES:
        pytest.skip(f"family {family} is not registered")
    m = hdl.from_spec(spec)
    a = np.arange(1 << m.width_a)[:, None]
    b = np.arange(1 << m.width_b)[None, :]
    return m, m.model(a, b)


def _reference(p, x):
    """Straightforward numpy: no shared code with appmult.lut_gen.metrics."""
    e = (p - x).astype(np.float64)
    xf = np.abs(x).astype(np.float64)
    rel = np.abs(e) / np.where(xf == 0, 1.0, xf)
    return {
        "er_pct": 100.0 * np.mean(e != 0), "mae": np.mean(np.abs(e)),
        "nmed": np.mean(np.abs(e)) / xf.max(), "mre_max1": np.mean(rel), "wce": np.abs(e).max(),
        "wcre_max1": rel.max(), "mse": np.mean(e ** 2), "bias": np.mean(e), "std": np.std(e),
    }


@pytest.mark.parametrize("spec", SPECS)
def test_error_metrics_families(spec):
    m, p = _model_table(spec)
    x = exact_product(m.width_a, m.width_b, m.signed)
    got = error_metrics(p, x)
    ref = _reference(p, x)
    assert set(got) == set(METRIC_KEYS)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert got["nmed_pct"] == pytest.approx(100 * ref["nmed"])
    assert got["mre_max1_pct"] == pytest.approx(100 * ref["mre_max1"])
    assert got["pairs"] == p.size and got["weighted"] is False
    if spec.startswith("exact"):
        assert all(got[k] == 0 for k in ("er", "mae", "nmed", "mre", "wce", "wcre", "mse", "bias", "std"))
    else:
        assert got["er"] > 0


def test_exact_product_independent():
    wa, wb = 4, 3
    x = exact_product(wa, wb, True)
    for a in range(16):
        for b in range(8):
            va = a - 16 if a >= 8 else a
            vb = b - 8 if b >= 4 else b
            assert x[a, b] == va * vb
    assert np.array_equal(exact_product(wa, wb, True, 3, 7), x[3:7])


def test_mre_zero_convention():
    # exact 0 -> the term is |e| itself (denominator max(1, 0) = 1).
    m = error_metrics(np.array([[3, 10]]), np.array([[0, 5]]))
    assert m["mre_max1"] == pytest.approx((3 / 1 + 5 / 5) / 2)
    assert m["wcre_max1"] == 3.0


def _brute_weighted(p, x, w):
    tot = sum(w.flat)
    acc = dict(er_pct=0.0, mae=0.0, mre_max1=0.0, bias=0.0, mse=0.0)
    wce, wcre = 0, 0.0
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            e = int(p[i, j]) - int(x[i, j])
            q = w[i, j] / tot
            rel = abs(e) / max(1, abs(int(x[i, j])))
            acc["er_pct"] += 100 * q * (e != 0)
            acc["mae"] += q * abs(e)
            acc["mre_max1"] += q * rel
            acc["bias"] += q * e
            acc["mse"] += q * e * e
            if w[i, j] > 0:
                wce, wcre = max(wce, abs(e)), max(wcre, rel)
    acc["std"] = math.sqrt(acc["mse"] - acc["bias"] ** 2)
    acc["wce"], acc["wcre_max1"] = wce, wcre
    acc["nmed"] = acc["mae"] / np.abs(x).max()
    return acc


@pytest.mark.parametrize("signed", [False, True])
def test_weighted_vs_brute_force(signed):
    rng = np.random.default_rng(1)
    x = exact_product(4, 3, signed)
    p = x + rng.integers(-5, 6, size=x.shape) * (rng.random(x.shape) < 0.6)
    w = rng.random(x.shape) * (rng.random(x.shape) < 0.8)
    got = error_metrics(p, x, w)
    ref = _brute_weighted(p, x, w)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["weighted"] is True


def test_uniform_weights_equal_unweighted():
    rng = np.random.default_rng(2)
    x = exact_product(5, 4, False)
    p = x + rng.integers(-20, 3, size=x.shape)
    a, b = error_metrics(p, x), error_metrics(p, x, np.full(x.shape, 7.0))
    for key in ("er", "mae", "nmed", "mre", "wce", "wcre", "mse", "bias", "std"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_metrics_under_is_outer_product():
    rng = np.random.default_rng(3)
    x = exact_product(4, 5, True)
    p = x + rng.integers(-3, 4, size=x.shape)
    ha, hb = rng.integers(0, 10, 16), rng.integers(0, 10, 32)
    got = metrics_under(p, x, ha, hb)
    ref = _brute_weighted(p, x, np.outer(ha / ha.sum(), hb / hb.sum()))
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("weighted", [False, True])
def test_stream_equals_one_shot(weighted):
    rng = np.random.default_rng(4)
    x = exact_product(7, 6, True)
    p = x + rng.integers(-1000, 1000, size=x.shape) * (rng.random(x.shape) < 0.3)
    w = rng.random(x.shape) if weighted else None
    one = error_metrics(p, x, w)
    cuts = [0, 1, 2, 17, 40, 41, 100, 128]
    acc = MetricsAccumulator(weighted=weighted)
    for r0, r1 in zip(cuts, cuts[1:]):
        acc.update(p[r0:r1], x[r0:r1], None if w is None else w[r0:r1])
    assert acc.result() == one  # bit-identical, not approximately equal


def test_stream_large_errors_exact():
    # 16x16-sized values: |e| up to 2**32 - 1; the integer sums must not overflow.
    rng = np.random.default_rng(5)
    x = rng.integers(-(1 << 30), 1 << 30, size=(300, 64))
    p = np.where(rng.random(x.shape) < 0.5, np.int64((1 << 31) - 1), np.int64(-(1 << 31)))
    e = [int(v) for v in (p - x).flat]
    n = len(e)
    got = error_metrics(p, x)
    assert got["mse"] == float(Fraction(sum(v * v for v in e), n))
    assert got["mae"] == float(Fraction(sum(abs(v) for v in e), n))
    assert got["bias"] == float(Fraction(sum(e), n))
    var = Fraction(sum(v * v for v in e), n) - Fraction(sum(e), n) ** 2
    assert got["std"] == pytest.approx(math.sqrt(var), rel=1e-15)
    assert got["wce"] == max(abs(v) for v in e)


def test_error_metrics_wrong():
    x = exact_product(3, 3, False)
    with pytest.raises(ValueError, match=r"^Approximate and exact product shapes differ: \(8, 4\) vs \(8, 8\)$"):
        error_metrics(x[:, :4], x)
    with pytest.raises(TypeError, match=r"^Approximate products must be integers, not float64$"):
        error_metrics(x.astype(float), x)
    with pytest.raises(ValueError, match=r"^Weights must be finite and non-negative$"):
        error_metrics(x, x, -np.ones(x.shape))
    with pytest.raises(ValueError, match=r"^Weights shape \(2,\) does not match the products' \(8, 8\)$"):
        error_metrics(x, x, np.ones(2))
    with pytest.raises(ValueError, match=r"^All operand weights are zero"):
        error_metrics(x, x, np.zeros(x.shape))
    with pytest.raises(ValueError, match=r"^No product pairs were added"):
        MetricsAccumulator().result()
    acc = MetricsAccumulator()
    with pytest.raises(ValueError, match=r"^Weights must be given with every update of a weighted"):
        acc.update(x, x, np.ones(x.shape))
    with pytest.raises(ValueError, match=r"^Histogram hist_a must have one entry per code \(8,\), not shape \(3,\)$"):
        metrics_under(x, x, [1, 2, 3], np.ones(8))
    with pytest.raises(ValueError, match=r"^Histogram hist_b is all zeros$"):
        metrics_under(x, x, np.ones(8), np.zeros(8))


def test_values_helper_consistent():
    # exact_product uses codes_to_values; cross-check one signed corner (-128 * -128).
    x = exact_product(8, 8, True)
    assert x[128, 128] == 16384 and x[128, 127] == -128 * 127
    assert codes_to_values(np.array([128]), 8, True)[0] == -128


@pytest.mark.parametrize("errors", [[1 << 33], [1 << 32, -(1 << 32)], [(1 << 61) - 3, 5, -(1 << 40)]])
def test_errors_beyond_32_bits_are_summed_exactly(errors):
    # A third-party circuit may have a product port up to 62 bits wide: |e|**2 and the block's
    # sums wrapped in 64 bits (MSE and std reported as 0, or "math domain error").
    exact = exact_product(4, 4, False)
    product = exact.copy()
    for k, e in enumerate(errors):
        product.flat[17 * k + 3] += e
    m = error_metrics(product, exact, width_a=4, width_b=4)
    n = exact.size
    diffs = [int(p) - int(x) for p, x in zip(product.ravel().tolist(), exact.ravel().tolist())]
    assert m["mae"] == pytest.approx(float(Fraction(sum(abs(d) for d in diffs), n)), rel=1e-12)
    assert m["mse"] == pytest.approx(float(Fraction(sum(d * d for d in diffs), n)), rel=1e-12)
    mean = Fraction(sum(diffs), n)
    var = Fraction(sum(d * d for d in diffs), n) - mean * mean
    assert m["std"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert m["wce"] == max(abs(d) for d in diffs)
