"""Broken-array multiplier (BAM), Mahdiani et al. 2010."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidTypeError
from ._base import Param, PartialProductMultiplier
from .registry import register_family

__all__ = ["BrokenArrayMultiplier"]


@register_family
class BrokenArrayMultiplier(PartialProductMultiplier):
    """Broken-array multiplier: an array multiplier with carry-save cells removed.

    H. R. Mahdiani, A. Ahmadi, S. M. Fakhraie, C. Lucas, "Bio-Inspired Imprecise
    Computational Blocks for Efficient VLSI Implementation of Soft-Computing
    Applications", IEEE Trans. Circuits and Systems I, 57(4):850-862, 2010.

    Two break lines remove cells from the array. The horizontal break level ``hbl``
    removes the ``hbl`` least significant partial-product rows; the vertical break level
    ``vbl`` removes every cell left of column ``vbl`` (the ``vbl`` least significant
    columns). Bit ``a_i & b_j`` (column ``i + j``) is kept iff ``j >= hbl`` and
    ``i + j >= vbl``; the kept bits are summed exactly. ``hbl = vbl = 0`` is exact;
    ``hbl = 0`` is a truncated multiplier, ``vbl = 0`` a perforated one.

    Signed operands use the Baugh--Wooley array, so every dropped bit takes its true two's
    complement weight with it (the product is the signed sum of the kept bits).

    Args:
        hbl: number of least significant partial-product rows removed, ``0 .. width_b - 1``.
        vbl: number of least significant columns removed, ``0 .. width_a + width_b - 1``.
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``hbl`` or ``vbl`` is not an integer in range.
    """

    family = "broken_array"
    DESCRIPTION = "broken-array multiplier: `hbl` low rows and `vbl` low columns removed (Mahdiani 2010)"
    PARAMS = (
        Param("hbl", "int", 0, "horizontal break level: least significant pp rows removed"),
        Param("vbl", "int", 0, "vertical break level: least significant columns removed"),
    )

    def __init__(self, *, hbl: int = 0, vbl: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        top_h, top_v = self.width_b - 1, self.width_p - 1
        if not isinstance(hbl, int) or isinstance(hbl, bool) or not 0 <= hbl <= top_h:
            raise InvalidTypeError(f"Broken-array hbl (rows removed) must be an integer in 0..{top_h}, not {hbl!r}")
        if not isinstance(vbl, int) or isinstance(vbl, bool) or not 0 <= vbl <= top_v:
            raise InvalidTypeError(f"Broken-array vbl (columns removed) must be an integer in 0..{top_v}, not {vbl!r}")
        self._hbl = hbl
        self._vbl = vbl

    @property
    def hbl(self) -> int:
        """Horizontal break level: least significant partial-product rows removed."""
        return self._hbl

    @property
    def vbl(self) -> int:
        """Vertical break level: least significant columns removed."""
        return self._vbl

    def keep(self, i: int, j: int) -> bool:
        return j >= self._hbl and i + j >= self._vbl
