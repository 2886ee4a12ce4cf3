"""Write your own approximate multiplier, export it as Verilog, and check it exhaustively.

The circuit here clears the ``drop`` least significant bits of both operands and
multiplies the rest exactly (a cheaper multiplier: those partial-product rows and
columns are constant zero). Everything a family needs is on this page: ports from
:class:`appmult.hdl.Multiplier`, a parameter, ``elaborate`` (the circuit) and ``_model``
(numpy on operand codes, what the circuit is checked against).

Run: ``python examples/custom_multiplier.py`` (writes ``droplsb_6x6.v`` here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from amaranth.hdl import Cat, Const, Module

from appmult.codes import codes_to_values
from appmult.hdl import Multiplier, Param, export_verilog, from_spec, register_family
from appmult.flows import characterize
from appmult.sim import synthesize


@register_family
class DropLsbMultiplier(Multiplier):
    """Exact product of the operands with their ``drop`` low bits cleared.

    Signed operands stay two's complement: clearing low bits rounds each value down
    (toward minus infinity), so the most negative code is unchanged.

    Args:
        drop: low bits cleared in each operand, ``0 .. min(width_a, width_b) - 1``.
        **kwargs: widths and ``signed``, as for :class:`appmult.hdl.Multiplier`.

    Raises:
        TypeError: ``drop`` is not an integer in range.
    """

    family = "droplsb"
    DESCRIPTION = "example: the `drop` low bits of both operands cleared, then an exact multiply"
    PARAMS = (Param("drop", "int", 1, "low bits cleared in each operand"),)

    def __init__(self, *, drop: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        top = min(self.width_a, self.width_b) - 1
        if not isinstance(drop, int) or isinstance(drop, bool) or not 0 <= drop <= top:
            raise TypeError(f"Dropped bit count must be an integer in 0..{top}, not {drop!r}")
        self._drop = drop

    @property
    def drop(self) -> int:
        return self._drop

    def _cleared(self, x):
        cleared = Cat(Const(0, self._drop), x[self._drop:])
        return cleared.as_signed() if self.signed else cleared

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(self._cleared(self.a) * self._cleared(self.b))
        return m

    def _model(self, a_codes, b_codes):
        mask = ~((1 << self._drop) - 1)
        a = codes_to_values(a_codes & mask, self.width_a, self.signed)
        b = codes_to_values(b_codes & mask, self.width_b, self.signed)
        return a * b


def main() -> int:
    mult = from_spec("droplsb:width=6,signed=true,drop=1")  # registered, so specs work too
    print(f"built {mult!r}")

    path = Path("droplsb_6x6.v")
    path.write_text(export_verilog(mult, name="droplsb_6x6"))
    print(f"wrote {path} (module droplsb_6x6)")

    # Every product the circuit computes (Yosys gate netlist, bit-parallel): table[a_code, b_code].
    table = synthesize(mult).exhaustive()
    a, b = np.meshgrid(np.arange(1 << mult.width_a), np.arange(1 << mult.width_b), indexing="ij")
    model = mult.model(a, b)
    exact = codes_to_values(a, 6, True) * codes_to_values(b, 6, True)
    mismatches = int((table != model).sum())
    print(f"gate netlist: {table.size} pairs, {mismatches} differ from the model")

    # The same circuit as a LUT file, ready for appmult.nn layers and appmult verify.
    char = characterize(mult, progress=False)
    print(f"characterized: MRE {char.metrics['mre_pct']:.2f}%, "
          f"transistors {char.cost['relative']['transistors']:.2f}x exact")
    err = model - exact
    print(f"error vs exact: mean {err.mean():+.2f}, max |e| {np.abs(err).max()}, "
          f"{100 * (err != 0).mean():.1f}% of pairs")
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
