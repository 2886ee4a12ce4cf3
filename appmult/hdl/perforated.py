"""Perforated multiplier: whole partial-product rows (bits of operand ``b``) are omitted."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidTypeError, InvalidValueError
from ._base import Param, PartialProductMultiplier
from .registry import register_family

__all__ = ["PerforatedMultiplier"]


@register_family
class PerforatedMultiplier(PartialProductMultiplier):
    """Array multiplier that omits the partial-product rows ``a * b_j`` for ``j`` in ``rows``.

    The product is ``a * b'`` where ``b'`` is ``b`` with the listed bits' contributions
    removed: for unsigned operands, ``b`` with those bits cleared. Signed operands use the
    Baugh--Wooley array, so each omitted row takes its true two's complement weight with it.
    Omitting the sign row ``width_b - 1`` of a signed ``b`` is allowed: it removes the
    ``-2**(width_b - 1) * b_sign`` term, so ``b`` acts as its ``width_b - 1`` low bits read
    as an unsigned number (a negative ``b`` becomes ``b + 2**(width_b - 1)``) while ``a``
    keeps its sign.

    Args:
        rows: distinct row indices in ``0 .. width_b - 1`` (a list or tuple; empty is exact).
            Stored as a sorted tuple.
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``rows`` is not a list/tuple, or an entry is not an integer in range.
        ValueError: a row is listed twice.
    """

    family = "perforated"
    DESCRIPTION = "partial-product rows (bits of b) listed in `rows` omitted (Baugh-Wooley when signed)"
    PARAMS = (
        Param("rows", "ints", None, "rows j (bits of b) omitted, e.g. [0,1] (required)"),
    )

    def __init__(self, *, rows: list[int] | tuple[int, ...] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(rows, (list, tuple)):
            raise InvalidTypeError(f"Perforated rows must be a list of integers, not {rows!r}")
        top = self.width_b - 1
        for row in rows:
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row <= top:
                raise InvalidTypeError(f"Perforated row must be an integer in 0..{top}, not {row!r}")
        if len(set(rows)) != len(rows):
            raise InvalidValueError(f"Perforated rows must be distinct, not {list(rows)!r}")
        # Sorted, so that equal multipliers have equal specs.
        self._rows = tuple(sorted(rows))

    @property
    def rows(self) -> tuple[int, ...]:
        """Omitted partial-product rows, ascending."""
        return self._rows

    def keep(self, i: int, j: int) -> bool:
        return j not in self._rows
