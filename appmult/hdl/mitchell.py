"""Mitchell's logarithmic multiplier (J. N. Mitchell, 1962)."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Value

from ._base import SignMagnitudeMultiplier
from ._leading_one import leading_one, leading_one_np
from .registry import register_family

__all__ = ["MitchellMultiplier"]


@register_family
class MitchellMultiplier(SignMagnitudeMultiplier):
    """Mitchell's logarithmic multiplier: add piecewise-linear logarithms, then take the antilog.

    J. N. Mitchell, "Computer Multiplication and Division Using Binary Logarithms",
    IRE Trans. Electronic Computers, EC-11(4):512-517, 1962.

    With ``F = max(width_a, width_b) - 1`` fractional bits: for ``a, b != 0``,
    ``ka = floor(log2 a)`` and ``xa = (a - 2**ka) << (F - ka)`` (the mantissa, exact
    since ``ka <= F``), likewise for ``b``; ``s = xa + xb``, ``k = ka + kb``. If
    ``s < 2**F`` the product is ``((2**F + s) << k) >> F``, else ``(s << (k + 1)) >> F``
    (floor). A zero operand gives 0. Hardware: a leading-one detector and a normalizing
    shift per operand, one ``F+1``-bit adder, one variable shift.

    The result never exceeds the exact product (``(1+xa)(1+xb) >= 1+xa+xb``, and
    ``>= 2(xa+xb)`` when ``xa+xb >= 1`` because ``(1-xa)(1-xb) >= 0``; the floor only
    lowers it), and it is exact when either operand is a power of two.

    Sign: sign-magnitude (:class:`~appmult.hdl.SignMagnitudeMultiplier`): ``|a|`` and
    ``|b|`` through the unsigned core, negated when the signs differ. Because the core
    never overestimates, its result is at most ``|a| |b| <= 2**(wp-2)`` for signed operands
    (``< 2**wp`` unsigned), so it always fits.

    Args:
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.
    """

    family = "mitchell"
    DESCRIPTION = "Mitchell logarithmic multiplier (1962), never overestimates; sign-magnitude when signed"
    PARAMS = ()

    @property
    def frac_bits(self) -> int:
        """``F``: fractional bits of the mantissas, ``max(width_a, width_b) - 1``."""
        return max(self.width_a, self.width_b) - 1

    # -- numpy ----------------------------------------------------------------------------
    def core_model(self, a_mag: np.ndarray, b_mag: np.ndarray) -> np.ndarray:
        f = self.frac_bits
        ka = leading_one_np(a_mag, self.width_a)
        kb = leading_one_np(b_mag, self.width_b)
        xa = (a_mag - (1 << ka)) << (f - ka)
        xb = (b_mag - (1 << kb)) << (f - kb)
        s = xa + xb
        k = ka + kb
        prod = np.where(s < (1 << f), ((1 << f) + s) << k, s << (k + 1)) >> f
        return np.where((a_mag == 0) | (b_mag == 0), 0, prod)

    # -- hardware -------------------------------------------------------------------------
    def _log(self, x: Value, width: int) -> tuple[Value, Value]:
        """Characteristic ``floor(log2 x)`` and ``F``-bit mantissa of ``x`` (0 and 0 for 0)."""
        f = self.frac_bits
        char = leading_one(x, list(range(width)))
        # The normalizing shift F - t comes straight from the encoder (no subtractor).
        norm = x << leading_one(x, [f - t for t in range(width)])
        return char, norm[:f]

    def core(self, m: Module, a_mag: Value, b_mag: Value) -> Value:
        f, wp = self.frac_bits, self.width_p
        ka, xa = self._log(a_mag, self.width_a)
        kb, xb = self._log(b_mag, self.width_b)
        s = (xa + xb)[:f + 1]
        k = ka + kb
        # s < 2**F: mantissa 1.s; otherwise the sum carried into the integer bit and the
        # antilog is 2 * s (one extra left shift), as in Mitchell's paper.
        mant = Mux(s[f], Cat(Const(0, 1), s), Cat(s[:f], Const(1, 1), Const(0, 1)))
        prod = (mant << k)[f:]
        zero = (a_mag == 0) | (b_mag == 0)
        return Mux(zero, Const(0, wp), prod[:wp])
