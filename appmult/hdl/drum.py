"""DRUM: dynamic range unbiased multiplier (Hashemi, Bahar, Reda; ICCAD 2015)."""

from __future__ import annotations

from typing import Any

import numpy as np
from amaranth.hdl import Const, Module, Mux, Value

from ..errors import InvalidTypeError
from ._base import Param, SignMagnitudeMultiplier
from ._leading_one import leading_one, leading_one_np
from .registry import register_family

__all__ = ["DrumMultiplier"]


@register_family
class DrumMultiplier(SignMagnitudeMultiplier):
    """DRUM: each operand is reduced to its ``k`` leading bits, which a ``k x k`` multiplier multiplies.

    S. Hashemi, R. I. Bahar, S. Reda, "DRUM: A Dynamic Range Unbiased Multiplier for
    Approximate Applications", ICCAD 2015.

    Per operand magnitude ``x`` with leading one at position ``t``: if ``t >= k`` the
    segment is bits ``t .. t-k+1`` with its lowest bit forced to 1 (the dropped bits are
    replaced by their expected value, which unbiases the error), and the shift is
    ``t - k + 1``; otherwise (``x < 2**k``) the segment is ``x`` itself with shift 0.
    The product is ``(seg_a * seg_b) << (shift_a + shift_b)``. Hardware: a leading-one
    detector per operand, a variable right shift, a ``k x k`` exact multiplier and a
    variable left shift. ``k >= max(width_a, width_b)`` is exact.

    Sign: sign-magnitude (:class:`~appmult.hdl.SignMagnitudeMultiplier`): the unsigned
    DRUM core multiplies ``|a|`` and ``|b|`` and the result is negated when the signs
    differ. An approximated magnitude stays below ``2**width``, so unsigned products fit
    ``width_a + width_b`` bits. Signed, the largest approximated magnitudes come from the
    most negative codes: ``2**(w-1)`` becomes ``2**(w-1) + 2**(w-k)``; for ``k = 2`` (both
    widths above 2) the product of the two most negative codes is ``9/4 * 2**(wp-2)``,
    beyond the largest signed output ``2**(wp-1) - 1``. The core saturates to that largest
    value in exactly the cases where this can happen (checked in the constructor, since
    the approximation is monotone in the magnitude, from the two largest magnitudes); for
    ``k >= 3`` it cannot, and no saturation logic is built.

    Args:
        k: segment width in bits, ``2 .. max(width_a, width_b)``.
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``k`` is not an integer in range.
    """

    family = "drum"
    DESCRIPTION = ("DRUM (Hashemi 2015): k leading bits per operand, LSB forced to 1, k x k multiply, "
                   "shift; sign-magnitude when signed")
    PARAMS = (Param("k", "int", 4, "segment width in bits (2..max width)"),)

    def __init__(self, *, k: int = 4, **kwargs: Any):
        super().__init__(**kwargs)
        top = max(self.width_a, self.width_b)
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= top:
            raise InvalidTypeError(f"DRUM segment width k must be an integer in 2..{top}, not {k!r}")
        self._k = k
        self._limit = (1 << (self.width_p - 1)) - 1 if self.signed else (1 << self.width_p) - 1
        # The approximation is monotone in the magnitude, so the largest magnitudes give
        # the largest core product.
        big_a = (1 << (self.width_a - 1)) if self.signed else (1 << self.width_a) - 1
        big_b = (1 << (self.width_b - 1)) if self.signed else (1 << self.width_b) - 1
        worst = int(self._approx(np.array(big_a), self.width_a) * self._approx(np.array(big_b), self.width_b))
        self._saturate = worst > self._limit

    @property
    def k(self) -> int:
        """Segment width in bits."""
        return self._k

    # -- numpy ----------------------------------------------------------------------------
    def _approx(self, x: np.ndarray, width: int) -> np.ndarray:
        """DRUM approximation of magnitudes ``x`` (``seg << shift``)."""
        t = leading_one_np(x, width)
        shift = np.maximum(t - self._k + 1, 0)
        seg = (x >> shift) | (shift > 0)
        return seg << shift

    def core_model(self, a_mag: np.ndarray, b_mag: np.ndarray) -> np.ndarray:
        prod = self._approx(a_mag, self.width_a) * self._approx(b_mag, self.width_b)
        return np.minimum(prod, self._limit)

    # -- hardware -------------------------------------------------------------------------
    def _segment(self, x: Value, width: int) -> tuple[Value, Value | None]:
        """The ``k``-bit segment of ``x`` and its shift (``None`` when always 0)."""
        k = self._k
        if k >= width:
            return x, None
        shift = leading_one(x, [0] * k + [t - k + 1 for t in range(k, width)])
        # When shift == 0, x < 2**k is exact; otherwise bit k-1 of the segment is the
        # leading one and the forced 1 replaces the truncated bits' expected value.
        seg = (x >> shift)[:k] | (shift != 0)
        return seg, shift

    def core(self, m: Module, a_mag: Value, b_mag: Value) -> Value:
        seg_a, sh_a = self._segment(a_mag, self.width_a)
        seg_b, sh_b = self._segment(b_mag, self.width_b)
        prod = seg_a * seg_b
        shifts = [s for s in (sh_a, sh_b) if s is not None]
        if shifts:
            prod = prod << (shifts[0] if len(shifts) == 1 else shifts[0] + shifts[1])
        if self._saturate:
            return Mux(prod > self._limit, Const(self._limit, self.width_p), prod[:self.width_p])
        return prod[:self.width_p]
