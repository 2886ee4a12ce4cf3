"""Operand codes: the raw bit patterns that the RTL sees on its pins.

A ``width``-bit operand is carried as an integer code ``0 .. 2**width - 1``; for
a signed operand that is two's complement. Products are held as signed Python /
numpy integer *values* (the output bit pattern interpreted with the multiplier's
signedness). This module depends on numpy only: both the hardware half and the
learning half use it.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidTypeError, InvalidValueError

__all__ = [
    "check_codes",
    "code_range",
    "codes_by_value",
    "codes_to_values",
    "value_range",
    "values_to_codes",
    "wrap_value",
]


def _check_width(width: int) -> None:
    if not isinstance(width, (int, np.integer)) or isinstance(width, bool) or not 1 <= width <= 62:
        raise InvalidTypeError(f"Width must be an integer in 1..62, not {width!r}")


def value_range(width: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest value of a ``width``-bit operand (inclusive)."""
    _check_width(width)
    if signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def code_range(width: int) -> tuple[int, int]:
    """Smallest and largest code of a ``width``-bit operand (inclusive)."""
    _check_width(width)
    return 0, (1 << width) - 1


def codes_to_values(codes, width: int, signed: bool) -> np.ndarray:
    """Interpret raw bit patterns as values (two's complement when ``signed``).

    Args:
        codes: integer array-like of codes in ``0 .. 2**width - 1``.
        width: operand width in bits.
        signed: two's complement interpretation.

    Returns:
        int64 array of values.

    Raises:
        ValueError: a code is out of range.
    """
    c = check_codes(codes, width)
    if signed:
        return np.where(c >= (1 << (width - 1)), c - (1 << width), c)
    return c


def values_to_codes(values, width: int, signed: bool) -> np.ndarray:
    """Bit patterns of values (two's complement when ``signed``).

    Raises:
        ValueError: a value does not fit in ``width`` bits with that signedness.
    """
    v = np.asarray(values)
    if v.dtype.kind not in "iub":
        raise InvalidTypeError(f"Values must be integers, not {v.dtype}")
    v = v.astype(np.int64)
    lo, hi = value_range(width, signed)
    if v.size and (v.min() < lo or v.max() > hi):
        bad = v[(v < lo) | (v > hi)].flat[0]
        raise InvalidValueError(
            f"Value {int(bad)} does not fit a {width}-bit {'signed' if signed else 'unsigned'} "
            f"operand ({lo}..{hi})"
        )
    return v & ((1 << width) - 1)


def check_codes(codes, width: int) -> np.ndarray:
    """Validate codes and return them as an int64 array.

    Raises:
        TypeError: not an integer array.
        ValueError: a code is outside ``0 .. 2**width - 1``.
    """
    _check_width(width)
    c = np.asarray(codes)
    if c.dtype.kind not in "iub":
        raise InvalidTypeError(f"Operand codes must be integers, not {c.dtype}")
    c = c.astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= (1 << width)):
        bad = c[(c < 0) | (c >= (1 << width))].flat[0]
        raise InvalidValueError(f"Operand code {int(bad)} is out of range for a {width}-bit operand (0..{(1 << width) - 1})")
    return c


def wrap_value(values, width: int, signed: bool) -> np.ndarray:
    """Wrap integers to ``width`` bits, as an assignment to a ``width``-bit port does."""
    _check_width(width)
    v = np.asarray(values, dtype=np.int64) & ((1 << width) - 1)
    if signed:
        v = np.where(v >= (1 << (width - 1)), v - (1 << width), v)
    return v


def codes_by_value(width: int, signed: bool) -> np.ndarray:
    """All codes sorted by the value they represent (value order, not bit-pattern order).

    For unsigned operands this is ``arange(2**width)``; for signed it starts at
    the code of the most negative value. Gradient LUTs smooth along this order.
    """
    lo, hi = value_range(width, signed)
    return values_to_codes(np.arange(lo, hi + 1), width, signed)
