"""Leading-one detection (priority encoding), in hardware and in numpy.

Shared by the logarithmic and dynamic-range families (DRUM, Mitchell), which both start
by finding the position of an operand's most significant 1.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Const, Mux, Value

__all__ = ["leading_one", "leading_one_np"]


def leading_one(x: Value, values: list[int]) -> Value:
    """Priority encoder: ``values[t]`` for the highest set bit ``t`` of ``x``, else ``values[0]``.

    Returning a per-position constant (rather than ``t`` itself) lets a caller get
    ``t``, ``F - t`` or ``max(0, t - k + 1)`` directly, without a subtractor after the encoder.

    Args:
        x: the operand (``len(values)`` bits are examined, from bit 0 up).
        values: non-negative constant for each leading-one position.

    Returns:
        An unsigned value wide enough for ``max(values)``.
    """
    width = max(max(values), 1).bit_length()
    result: Value = Const(values[0], width)
    # Later (more significant) bits take priority: they wrap the earlier Muxes.
    for t in range(1, len(values)):
        result = Mux(x[t], Const(values[t], width), result)
    return result


def leading_one_np(x: np.ndarray, width: int) -> np.ndarray:
    """Position of the highest set bit of each element of ``x`` (0 for 0), integer-only.

    Args:
        x: non-negative int64 array below ``2**width``.
        width: number of bits to examine.

    Returns:
        int64 array ``floor(log2(x))`` (0 where ``x == 0``).
    """
    t = np.zeros(np.shape(x), dtype=np.int64)
    for i in range(1, width):
        t += (x >> i) != 0
    return t
