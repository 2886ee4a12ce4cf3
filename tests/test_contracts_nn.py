"""Contracts of the quantizers, LUT tables and kernels, pinned where mutation testing
(``make mutate``, tests/README.md) found them unchecked.

References are independent: plain loops and numpy written from the definitions in
DESIGN.md and the module docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import quant_range


@pytest.mark.parametrize("width", [2, 4, 8])
def test_quant_range_by_definition(width):
    assert quant_range(width, True) == (-(1 << (width - 1)), (1 << (width - 1)) - 1)
    assert quant_range(width, False) == (0, (1 << width) - 1)
