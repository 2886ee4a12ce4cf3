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
