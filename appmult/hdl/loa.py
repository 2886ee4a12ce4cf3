"""Array multiplier whose row additions use Lower-part-OR Adders (LOA, Mahdiani et al. 2010)."""

from __future__ import annotations

from typing import Any

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value

from ..errors import InvalidTypeError
from ._base import Param, SignMagnitudeMultiplier
from .registry import register_family

__all__ = ["LoaArrayMultiplier"]


@register_family
class LoaArrayMultiplier(SignMagnitudeMultiplier):
    """Array multiplier accumulating its partial-product rows with Lower-part-OR Adders.

    The LOA is from H. R. Mahdiani, A. Ahmadi, S. M. Fakhraie, C. Lucas, "Bio-Inspired
    Imprecise Computational Blocks for Efficient VLSI Implementation of Soft-Computing
    Applications", IEEE Trans. Circuits and Systems I, 57(4):850-862, 2010.

    ``LOA_l(x, y)`` on ``width_a + width_b``-bit words: the ``l`` low bits of the result
    are ``x | y`` (bitwise OR, no carries); the bits from ``l`` up are the exact sum
    ``(x >> l) + (y >> l) + c`` with carry-in ``c = x[l-1] & y[l-1]``. ``l = 0`` is an
    exact adder; for ``l >= width_a + width_b`` the whole word is ``x | y``.

    The unsigned core forms rows ``r_j = (a if b[j] else 0) << j`` (bit positions are
    absolute, so row ``j`` is 0 below bit ``j``) and accumulates them in order,
    ``acc = r_0``, then ``acc = LOA_l(acc, r_j)`` for ``j = 1 .. width_b - 1``, as an
    array multiplier's ripple of row adders does. Unlike truncation, the error depends on
    carries that the OR loses and on the carry-in guess, and it can be positive.

    No accumulation overflows: by induction ``acc_j < 2**(width_a + j + 1)`` (when
    ``l <= j`` row ``j`` is 0 in the OR part and the addition is exact; otherwise both
    high parts are below ``2**(width_a + j - l)``, so the result is at most
    ``(2**(width_a + j - l + 1) - 1) * 2**l + 2**l - 1``). Hence unsigned products fit
    ``width_a + width_b`` bits.

    Sign: sign-magnitude (:class:`~appmult.hdl.SignMagnitudeMultiplier`): the core
    multiplies ``|a|`` and ``|b|`` and the result is negated when the signs differ.
    ``|b| = 2**(width_b - 1)`` has a single row (exact, ``<= 2**(wp-2)``); any other ``|b|``
    has rows ``0 .. width_b - 2`` only, so by the bound above the core stays below
    ``2**(wp - 1)`` and the signed result fits.

    Args:
        lower: width ``l`` of the OR part, ``0 .. width_a + width_b`` (0 is exact).
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``lower`` is not an integer in range.
    """

    family = "loa"
    DESCRIPTION = ("array multiplier whose row additions OR the `lower` low bits (LOA, Mahdiani 2010); "
                   "sign-magnitude when signed")
    PARAMS = (Param("lower", "int", None, "width of the OR part of each row adder (required)"),)

    def __init__(self, *, lower: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        top = self.width_p
        if not isinstance(lower, int) or isinstance(lower, bool) or not 0 <= lower <= top:
            raise InvalidTypeError(f"LOA lower-part width must be an integer in 0..{top}, not {lower!r}")
        self._lower = lower

    @property
    def lower(self) -> int:
        """Width of the OR part of each row adder."""
        return self._lower

    # -- numpy ----------------------------------------------------------------------------
    def _loa_np(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        lo = self._lower
        if lo == 0:
            return x + y
        low = (x | y) & ((1 << lo) - 1)
        cin = (x >> (lo - 1)) & (y >> (lo - 1)) & 1
        return (((x >> lo) + (y >> lo) + cin) << lo) | low

    def core_model(self, a_mag: np.ndarray, b_mag: np.ndarray) -> np.ndarray:
        acc = np.where(b_mag & 1, a_mag, 0)
        for j in range(1, self.width_b):
            acc = self._loa_np(acc, np.where((b_mag >> j) & 1, a_mag << j, 0))
        return acc

    # -- hardware -------------------------------------------------------------------------
    def _loa(self, x: Value, y: Value) -> Value:
        lo, wp = self._lower, self.width_p
        if lo == 0:
            return (x + y)[:wp]
        if lo >= wp:
            # The adder part is empty; its carry-in would leave the word.
            return (x | y)[:wp]
        low = (x | y)[:lo]
        high = x[lo:] + y[lo:] + (x[lo - 1] & y[lo - 1])
        return Cat(low, high)[:wp]

    def core(self, m: Module, a_mag: Value, b_mag: Value) -> Value:
        wp = self.width_p

        def row(j: int) -> Value:
            # Zero-extended to the full output width, so the OR part sees absolute bit positions.
            r = Mux(b_mag[j], a_mag, Const(0, self.width_a)).shift_left(j)
            return Cat(r, Const(0, wp - len(r)))

        acc = row(0)
        for j in range(1, self.width_b):
            # A named signal per stage: the LOA reads `acc` several times, and an inline
            # expression would be copied into every use (exponential in the row count).
            stage = Signal(wp, name=f"acc{j}")
            m.d.comb += stage.eq(self._loa(acc, row(j)))
            acc = stage
        return acc
