"""Amaranth's own Python simulator as an independent reference backend.

Slow (a few thousand vectors per second) but shares nothing with the Yosys flow or
the bit-parallel evaluator, so agreement between the two is a real cross-check.
"""

from __future__ import annotations

import numpy as np

from ..codes import check_codes, codes_to_values, wrap_value
from ..errors import InvalidTypeError

__all__ = ["simulate_amaranth"]


def simulate_amaranth(multiplier, a_codes, b_codes) -> np.ndarray:
    """Simulate a multiplier in ``amaranth.sim`` on operand pairs, in one simulator run.

    Args:
        multiplier: a :class:`appmult.hdl.Multiplier`, or any combinational
            ``wiring.Component`` with ports ``a``, ``b`` in and ``p`` out.
        a_codes: codes of operand ``a``.
        b_codes: codes of operand ``b``; broadcast against ``a_codes``.

    Returns:
        int64 array of product values (signed interpretation for a signed ``p``),
        of the broadcast shape.

    Raises:
        TypeError: not a component with ports ``a``, ``b``, ``p``; codes not integers.
        ValueError: a code is out of range.
    """
    from amaranth.hdl import Shape
    from amaranth.lib import wiring
    from amaranth.sim import Simulator

    if not isinstance(multiplier, wiring.Component):
        raise InvalidTypeError(f"simulate_amaranth takes an Amaranth wiring.Component, not {multiplier!r}")
    members = multiplier.signature.members
    if not all(n in members for n in ("a", "b", "p")):
        raise InvalidTypeError(f"{multiplier!r} has no ports a, b, p")
    sa, sb, sp = (Shape.cast(members[n].shape) for n in ("a", "b", "p"))
    a = check_codes(a_codes, sa.width)
    b = check_codes(b_codes, sb.width)
    a, b = np.broadcast_arrays(a, b)
    shape = a.shape
    # Signed ports take values, not bit patterns.
    av = codes_to_values(a.reshape(-1), sa.width, sa.signed).tolist()
    bv = codes_to_values(b.reshape(-1), sb.width, sb.signed).tolist()
    result: list[int] = []

    async def testbench(ctx):
        for x, y in zip(av, bv):
            ctx.set(multiplier.a, x)
            ctx.set(multiplier.b, y)
            result.append(ctx.get(multiplier.p))

    sim = Simulator(multiplier)
    sim.add_testbench(testbench)
    sim.run()
    # ctx.get already honours the port's signedness; wrap_value normalises defensively.
    return wrap_value(np.array(result, dtype=np.int64), sp.width, sp.signed).reshape(shape)
