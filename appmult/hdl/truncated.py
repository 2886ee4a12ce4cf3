"""Truncated multiplier: the partial-product bits of the least significant columns are dropped."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidTypeError
from ._base import Param, PartialProductMultiplier
from .registry import register_family

__all__ = ["TruncatedMultiplier"]


@register_family
class TruncatedMultiplier(PartialProductMultiplier):
    """Array multiplier without the partial-product bits of the ``columns`` lowest columns.

    Bit ``a_i & b_j`` (column ``i + j``) is kept iff ``i + j >= columns``. Signed operands
    use the Baugh--Wooley array of :class:`PartialProductMultiplier`; a dropped bit takes
    its sign (and its share of the Baugh--Wooley constant) with it, so the product is the
    signed sum of the kept bits with their true two's complement weights.

    With ``compensate=True`` a constant is added: the expected value of the dropped bits
    when every operand bit is an independent fair coin (so each ``a_i & b_j`` is 1 with
    probability 1/4), i.e. ``round(sum(sign(i, j) * 2**(i + j) / 4))`` over the dropped
    bits, where ``sign`` is -1 for the Baugh--Wooley negative-weight bits (exactly one
    factor is a sign bit) and +1 otherwise. The sum is always ``n + 1/4`` for an integer
    ``n`` (column 0 holds a single positive bit), so rounding to nearest is unambiguous;
    it is done with exact integer arithmetic (``floor(x + 1/2)``).

    Args:
        columns: number of least significant columns dropped, ``0 .. width_a + width_b - 1``
            (0 is exact; the maximum drops every bit).
        compensate: add the expected value of the dropped bits.
        **kwargs: widths and ``signed``, as for :class:`~appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``columns`` is not an integer in range, or ``compensate`` is not a bool.
    """

    family = "truncated"
    DESCRIPTION = ("partial-product bits in the `columns` lowest columns dropped, optional "
                   "expected-value compensation (Baugh-Wooley when signed)")
    PARAMS = (
        Param("columns", "int", None, "number of least significant pp columns dropped (required)"),
        Param("compensate", "bool", False, "add the rounded expected value of the dropped bits"),
    )

    def __init__(self, *, columns: int | None = None, compensate: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        top = self.width_p - 1
        if not isinstance(columns, int) or isinstance(columns, bool) or not 0 <= columns <= top:
            raise InvalidTypeError(f"Truncated column count must be an integer in 0..{top}, not {columns!r}")
        if not isinstance(compensate, bool):
            raise InvalidTypeError(f"Truncated compensate must be a bool, not {compensate!r}")
        self._columns = columns
        self._compensate = compensate

    @property
    def columns(self) -> int:
        """Number of least significant partial-product columns dropped."""
        return self._columns

    @property
    def compensate(self) -> bool:
        """Whether the expected value of the dropped bits is added back."""
        return self._compensate

    def keep(self, i: int, j: int) -> bool:
        return i + j >= self._columns

    def compensation(self) -> int:
        """Rounded expected value of the dropped bits (0 without ``compensate``).

        Returns:
            ``floor(E + 1/2)`` with ``E`` the expected signed sum of the dropped bits.
        """
        if not self._compensate:
            return 0
        # Four times the expectation is an integer: each bit has probability 1/4.
        four_e = sum(self.pp_sign(i, j) << (i + j)
                     for j in range(self.width_b) for i in range(self.width_a) if not self.keep(i, j))
        return (four_e + 2) >> 2
