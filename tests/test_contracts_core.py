"""Contracts of the operand codes and the bit-parallel evaluator, pinned where mutation
testing (``make mutate``, tests/README.md) found them unchecked.

References are written from the definitions (two's complement by hand, Python integers),
not from the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from appmult.codes import (check_codes, code_range, codes_by_value, codes_to_values, value_range,
                           values_to_codes, wrap_value)


def _twos(code: int, width: int) -> int:
    return code - (1 << width) if code >> (width - 1) else code


@pytest.mark.parametrize("width", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("signed", [False, True])
def test_codes_and_values_by_definition(width, signed):
    codes = np.arange(1 << width)
    want = [_twos(int(c), width) if signed else int(c) for c in codes]
    values = codes_to_values(codes, width, signed)
    assert values.dtype == np.int64 and values.tolist() == want
    assert values_to_codes(np.array(want), width, signed).tolist() == codes.tolist()
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    assert value_range(width, signed) == (lo, hi) and code_range(width) == (0, (1 << width) - 1)
    order = codes_by_value(width, signed)
    assert [want[int(c)] for c in order] == list(range(lo, hi + 1))   # every value once, ascending


@pytest.mark.parametrize("signed", [False, True])
def test_range_ends_are_accepted_and_one_past_refused(signed):
    w = 6
    lo, hi = value_range(w, signed)
    assert values_to_codes([lo, hi], w, signed).tolist() == [lo & 63, hi & 63]
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=f"^Value {bad} does not fit a 6-bit "):
            values_to_codes([0, bad], w, signed)
    assert check_codes([0, 63], w).tolist() == [0, 63]
    for bad in (-1, 64):
        with pytest.raises(ValueError, match=f"^Operand code {bad} is out of range for a 6-bit operand"):
            check_codes([5, bad], w)


@pytest.mark.parametrize("signed", [False, True])
def test_wrap_value_is_assignment_to_a_port(signed):
    w = 5
    ints = np.arange(-100, 101)
    want = [(_twos(int(v) & 31, w) if signed else int(v) & 31) for v in ints]
    assert wrap_value(ints, w, signed).tolist() == want
