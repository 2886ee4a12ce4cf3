"""Product tables for the nn tests, written independently of appmult.hdl (numpy formulas)."""

from __future__ import annotations

import numpy as np


def values(width: int, signed: bool) -> np.ndarray:
    """Operand value of each code."""
    c = np.arange(1 << width)
    return np.where(c >= (1 << (width - 1)), c - (1 << width), c) if signed else c


def codes(v, width: int) -> np.ndarray:
    return np.asarray(v).astype(np.int64) & ((1 << width) - 1)


def exact(width: int, signed: bool) -> np.ndarray:
    v = values(width, signed)
    return np.outer(v, v)


def truncated(width: int, columns: int, signed: bool = False) -> np.ndarray:
    """Drop partial-product bits in columns < ``columns`` (signed: on the exact product's
    two's complement partial products, i.e. Baugh-Wooley without those low bits)."""
    a = np.arange(1 << width)[:, None]
    b = np.arange(1 << width)[None, :]
    p = np.zeros((1 << width, 1 << width), np.int64)
    for i in range(width):
        for j in range(width):
            if i + j < columns:
                continue
            bit = ((a >> i) & 1) * ((b >> j) & 1)
            neg = signed and ((i == width - 1) != (j == width - 1))
            p += (-bit if neg else bit) << (i + j)
    return p


def mitchell_like(width: int, signed: bool) -> np.ndarray:
    """Mitchell's logarithmic multiplier on magnitudes (sign restored): high rank."""
    v = values(width, signed)
    m = np.abs(v)
    k = np.array([max(int(x).bit_length() - 1, 0) for x in m])
    x = m - (1 << k)
    k1, k2 = k[:, None], k[None, :]
    x1, x2 = x[:, None], x[None, :]
    cross = x1 * (1 << k2) + x2 * (1 << k1)
    small = cross < (1 << (k1 + k2))  # f1 + f2 < 1
    p = np.where(small, (1 << (k1 + k2)) + cross, 2 * cross)
    p = np.where((m[:, None] == 0) | (m[None, :] == 0), 0, p)
    return p * np.outer(np.sign(v), np.sign(v))


def random_lut(width: int, seed: int = 0, scale: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).integers(-scale, scale + 1, size=(1 << width, 1 << width))


# -- the helpers themselves (the other nn tests rely on them) -----------------------------

def test_truncated_without_columns_is_exact():
    for signed in (False, True):
        assert np.array_equal(truncated(6, 0, signed), exact(6, signed))


def test_truncated_underestimates_unsigned():
    t = truncated(8, 4)
    assert (t <= exact(8, False)).all() and (t != exact(8, False)).any()


def test_most_negative_code():
    assert exact(8, True)[128, 128] == 16384  # -128 * -128


def test_mitchell_like_is_high_rank_and_close():
    for signed in (False, True):
        p = mitchell_like(6, signed)
        assert np.linalg.matrix_rank(p.astype(float)) > 12  # above the low-rank kernel's limit
        ex = exact(6, signed)
        assert (np.abs(p - ex) <= 0.12 * np.abs(ex)).all()  # Mitchell's error is at most ~11.1%
