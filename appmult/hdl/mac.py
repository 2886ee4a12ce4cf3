"""MAC / dot-product unit: N lanes of one approximate multiplier, an adder tree, an accumulator.

This is what an accelerator built on an approximate multiplier computes for one output of
a layer, so it is what :mod:`appmult.tb` checks against sums of LUT entries
(:func:`appmult.reference.mac_reference`).

Ports (``N = lanes``; lane ``i`` of a packed bus sits in bits ``[i*w +: w]``):

* ``a``: ``N * width_a`` bits in, ``b``: ``N * width_b`` bits in -- operand codes per lane;
* ``valid_in``: the operands are a beat to accumulate;
* ``clear``: start a new sum;
* ``acc``: ``acc_width`` bits out, signed when the multiplier is signed;
* ``valid_out``: ``acc`` has just absorbed a beat (high for one cycle per valid beat);
* ``clk``, ``rst`` (synchronous, clears the accumulator and the pipeline) from the ``sync``
  domain.

Timing, latency 2: operands, ``valid_in`` and ``clear`` sampled at clock edge ``t`` are
multiplied and summed by the adder tree into a pipeline register at edge ``t``; at edge
``t + 1`` the accumulator is updated and ``valid_out`` follows ``valid_in`` -- both visible
after edge ``t + 1``. ``clear`` travels down the pipeline with its beat, so it takes effect
in order with the data around it:

* ``clear`` and ``valid_in``: ``acc = products of this beat`` (clear first, then add);
* ``clear`` alone: ``acc = 0`` (``valid_out`` stays low);
* ``valid_in`` alone: ``acc = acc + products of this beat``;
* neither: ``acc`` holds.

Optional control-variate correction (``correction=True``; see :mod:`appmult.reference`
for the arithmetic). Extra ports:

* ``alpha_fx``: ``alpha_width`` bits in, signed: the output channel's ``alpha_bar`` with
  ``alpha_frac_bits`` (``F``) fractional bits;
* ``beta``: ``acc_width`` bits in, signed: the channel's integer offset ``B``;
* ``xsum``: ``sum_width`` bits out (signed when the multiplier is): a second accumulator
  that sums the lanes' ``a`` operand values (the activations) with the same pipeline,
  ``clear`` and ``valid_in`` behaviour as ``acc``;
* ``corrected``: ``acc_width + 1`` bits out, signed:
  ``acc - (((alpha_fx * xsum + 2**(F-1)) >>> F) + beta)`` (no rounding term when
  ``F = 0``), wrapped to ``acc_width + 1`` bits.

``alpha_fx`` and ``beta`` are plain inputs, not registers: the controller holds them
steady for the output channel being computed (they only matter when ``corrected`` is read,
at the end of the sum), and ``corrected`` follows ``acc``, ``xsum``, ``alpha_fx`` and
``beta`` combinationally -- one multiplier and two adders per MAC, used once per output.

Overflow: the accumulator is ``acc_width`` bits and wraps modulo ``2**acc_width`` (two's
complement when signed), exactly like an integer register -- no saturation. An
accumulator narrower than one product warns (``UserWarning``). To avoid it
for a sum of ``K`` products (``K`` = lanes x beats between clears), size the accumulator
with :func:`appmult.reference.required_acc_width`, which uses the LUT's actual minimum and maximum product;
the generic bound is ``width_p + ceil(log2(K))``.
"""

from __future__ import annotations

import warnings
from typing import Callable

from amaranth.hdl import Module, Mux, Signal, Value, signed as sshape, unsigned as ushape
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..errors import InvalidTypeError, InvalidValueError
from ..reference import MAX_FRAC_BITS
from ._base import Multiplier

__all__ = ["MAX_ACC_WIDTH", "MacUnit"]

#: Widest accumulator supported (the numpy reference sums in int64).
MAX_ACC_WIDTH = 62
_MAX_LANES = 1024


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def _lane_factory(multiplier: Multiplier) -> Callable[[], Multiplier]:
    """A callable building a fresh, equal multiplier (each lane is its own instance)."""
    from .registry import FAMILIES, from_spec
    if FAMILIES.get(multiplier.family) is type(multiplier):
        spec = multiplier.spec
        return lambda: from_spec(spec)
    cls, kwargs = type(multiplier), dict(width_a=multiplier.width_a, width_b=multiplier.width_b,
                                         signed=multiplier.signed, **multiplier.params)
    return lambda: cls(**kwargs)


class MacUnit(wiring.Component):
    """Multiply-accumulate over ``lanes`` copies of a multiplier (see the module docstring).

    Args:
        multiplier: the multiplier each lane instantiates (a template; every lane is a new
            instance with the same family and parameters).
        lanes: number of parallel multipliers, 1..1024.
        acc_width: accumulator width in bits, 1..62; default ``max(32, width_p +
            ceil(log2(lanes)))``. Sums wrap modulo ``2**acc_width``. Narrower than one
            product (``width_p`` bits) is allowed, with a ``UserWarning``:
            the unit then computes the exact sum modulo ``2**acc_width`` -- the same
            arithmetic as any wrap, so it is legitimate for modular sums and for exercising
            wrap-around in a few beats, but a layer's dot product almost never wants it.
        factory: optional callable returning one lane's multiplier; each result must have
            the template's widths, signedness and spec.
        correction: add the control-variate correction (``xsum`` accumulator, ``alpha_fx``
            and ``beta`` inputs, ``corrected`` output; see the module docstring).
        alpha_frac_bits: fractional bits ``F`` of ``alpha_fx``, 0..24.
        alpha_width: width of ``alpha_fx``, 2..40; default ``width_b + F + 2`` (holds any
            ``|alpha| < 2**width_b``).
        sum_width: width of ``xsum``, 1..62; default ``max(width_a + 1, acc_width - width_b)``
            (as many activations as ``acc`` holds products of ``width_b``-bit weights).

    Raises:
        TypeError: ``multiplier`` is not a Multiplier, ``lanes`` or ``acc_width`` is not an
            integer in range, or ``factory`` is not callable or returns a non-Multiplier;
            ``correction`` is not a bool, or a correction width is not an integer in range.
        ValueError: correction widths given without ``correction=True``.
        ValueError: a factory-made lane differs from the template.

    Warns:
        UserWarning: ``acc_width`` is narrower than one product.
    """

    def __init__(self, multiplier: Multiplier, *, lanes: int, acc_width: int | None = None,
                 factory: Callable[[], Multiplier] | None = None, correction: bool = False,
                 alpha_frac_bits: int = 8, alpha_width: int | None = None, sum_width: int | None = None):
        # Like a Multiplier, a MAC object is also a parameter record (widths, latency,
        # required_acc_width); building one without elaborating it is normal.
        self._MustUse__silence = True
        if not isinstance(multiplier, Multiplier):
            raise InvalidTypeError(f"MacUnit needs a Multiplier, not {multiplier!r}")
        if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= _MAX_LANES:
            raise InvalidTypeError(f"MAC lane count must be an integer in 1..{_MAX_LANES}, not {lanes!r}")
        tree_width = multiplier.width_p + _ceil_log2(lanes)
        if acc_width is None:
            acc_width = max(32, tree_width)
        if not isinstance(acc_width, int) or isinstance(acc_width, bool) or not 1 <= acc_width <= MAX_ACC_WIDTH:
            raise InvalidTypeError(f"MAC accumulator width must be an integer in 1..{MAX_ACC_WIDTH}, not {acc_width!r}")
        if acc_width < multiplier.width_p:
            # Legitimate (modular arithmetic; tests that exercise wrap-around in a few beats),
            # but for a layer's dot product almost certainly a slip: say it where it is made.
            warnings.warn(f"MAC accumulator width {acc_width} is narrower than one {multiplier.width_p}-bit product "
                          f"of {multiplier.spec}: it keeps products and sums modulo 2**{acc_width}",
                          UserWarning, stacklevel=2)
        if factory is not None and not callable(factory):
            raise InvalidTypeError(f"MAC lane factory must be callable, not {factory!r}")
        self._mult = multiplier
        self._lanes = lanes
        self._acc_width = acc_width
        self._tree_width = tree_width
        self._factory = factory if factory is not None else _lane_factory(multiplier)
        if factory is not None:
            self._check_lane(factory())
        shape = sshape if multiplier.signed else ushape
        ports = {
            "a": In(lanes * multiplier.width_a),
            "b": In(lanes * multiplier.width_b),
            "valid_in": In(1),
            "clear": In(1),
            "acc": Out(shape(acc_width)),
            "valid_out": Out(1),
        }
        self._correction = self._check_correction(correction, alpha_frac_bits, alpha_width, sum_width)
        if self._correction is not None:
            _, aw, sw = self._correction
            ports.update(alpha_fx=In(sshape(aw)), beta=In(sshape(acc_width)), xsum=Out(shape(sw)),
                         corrected=Out(sshape(acc_width + 1)))
        super().__init__(ports)

    def _check_correction(self, correction, frac_bits, alpha_width, sum_width) -> tuple[int, int, int] | None:
        if not isinstance(correction, bool):
            raise InvalidTypeError(f"MAC correction must be a bool, not {correction!r}")
        if not correction:
            if alpha_width is not None or sum_width is not None:
                raise InvalidValueError("MAC alpha_width and sum_width need correction=True")
            return None
        if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 0 <= frac_bits <= MAX_FRAC_BITS:
            raise InvalidTypeError(f"MAC alpha fractional bits must be an integer in 0..{MAX_FRAC_BITS}, not {frac_bits!r}")
        mult = self._mult
        if alpha_width is None:
            alpha_width = mult.width_b + frac_bits + 2
        if not isinstance(alpha_width, int) or isinstance(alpha_width, bool) or not 2 <= alpha_width <= 40:
            raise InvalidTypeError(f"MAC alpha width must be an integer in 2..40, not {alpha_width!r}")
        if sum_width is None:
            sum_width = max(mult.width_a + 1, self._acc_width - mult.width_b)
        if not isinstance(sum_width, int) or isinstance(sum_width, bool) or not 1 <= sum_width <= MAX_ACC_WIDTH:
            raise InvalidTypeError(f"MAC sum width must be an integer in 1..{MAX_ACC_WIDTH}, not {sum_width!r}")
        return frac_bits, alpha_width, sum_width

    def _check_lane(self, lane) -> Multiplier:
        if not isinstance(lane, Multiplier):
            raise InvalidTypeError(f"MAC lane factory must return a Multiplier, not {lane!r}")
        if lane.spec != self._mult.spec:
            raise InvalidValueError(f"MAC lane factory made {lane.spec}, but the template is {self._mult.spec}")
        return lane

    @property
    def multiplier(self) -> Multiplier:
        """The template multiplier (its spec and widths; lanes are separate instances)."""
        return self._mult

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def acc_width(self) -> int:
        return self._acc_width

    @property
    def signed(self) -> bool:
        return self._mult.signed

    @property
    def correction(self) -> bool:
        """Whether the control-variate correction hardware is present."""
        return self._correction is not None

    @property
    def alpha_frac_bits(self) -> int | None:
        """Fractional bits ``F`` of ``alpha_fx`` (``None`` without correction)."""
        return None if self._correction is None else self._correction[0]

    @property
    def alpha_width(self) -> int | None:
        """Width of the ``alpha_fx`` port (``None`` without correction)."""
        return None if self._correction is None else self._correction[1]

    @property
    def sum_width(self) -> int | None:
        """Width of the ``xsum`` activation accumulator (``None`` without correction)."""
        return None if self._correction is None else self._correction[2]

    @property
    def latency(self) -> int:
        """Clock edges from sampling a beat to ``acc``/``valid_out`` showing it: 2."""
        return 2

    def __repr__(self) -> str:
        corr = "" if self._correction is None else \
            f", correction alpha {self.alpha_width} bits (F={self.alpha_frac_bits}), xsum {self.sum_width} bits"
        return f"<MacUnit {self._lanes} x {self._mult.spec}, acc {self._acc_width} bits{corr}>"

    def elaborate(self, platform):
        m = Module()
        mult = self._mult
        wa, wb = mult.width_a, mult.width_b
        products: list[Value] = []
        for i in range(self._lanes):
            lane = self._check_lane(self._factory())
            m.submodules[f"lane{i}"] = lane
            m.d.comb += [lane.a.eq(self.a[i * wa:(i + 1) * wa]), lane.b.eq(self.b[i * wb:(i + 1) * wb])]
            products.append(lane.p)

        # Balanced adder tree; Amaranth widens each sum, so it is exact at every level.
        level = products
        while len(level) > 1:
            level = [level[k] + level[k + 1] if k + 1 < len(level) else level[k]
                     for k in range(0, len(level), 2)]
        shape = sshape if self.signed else ushape
        # Bits above the accumulator width would be wrapped away anyway: don't register them.
        sum_q = Signal(shape(min(self._tree_width, self._acc_width)))
        valid_q = Signal()
        clear_q = Signal()
        m.d.sync += [sum_q.eq(level[0]), valid_q.eq(self.valid_in), clear_q.eq(self.clear)]

        m.d.sync += self.valid_out.eq(valid_q)
        with m.If(clear_q):
            m.d.sync += self.acc.eq(Mux(valid_q, sum_q, 0))
        with m.Elif(valid_q):
            m.d.sync += self.acc.eq(self.acc + sum_q)  # truncated to acc_width: wraps mod 2**W
        if self._correction is not None:
            self._elaborate_correction(m, valid_q, clear_q)
        return m

    def _elaborate_correction(self, m: Module, valid_q: Signal, clear_q: Signal) -> None:
        frac, _, sw = self._correction
        wa = self._mult.width_a
        shape = sshape if self.signed else ushape
        # The activations' sum rides the same pipeline as the products' sum.
        acts = [self.a[i * wa:(i + 1) * wa] for i in range(self._lanes)]
        if self.signed:
            acts = [v.as_signed() for v in acts]
        level: list[Value] = acts
        while len(level) > 1:
            level = [level[k] + level[k + 1] if k + 1 < len(level) else level[k]
                     for k in range(0, len(level), 2)]
        xs_q = Signal(shape(min(wa + _ceil_log2(self._lanes), sw)))
        m.d.sync += xs_q.eq(level[0])
        with m.If(clear_q):
            m.d.sync += self.xsum.eq(Mux(valid_q, xs_q, 0))
        with m.Elif(valid_q):
            m.d.sync += self.xsum.eq(self.xsum + xs_q)
        scaled = self.alpha_fx * self.xsum
        if frac:
            scaled = (scaled + (1 << (frac - 1))) >> frac  # arithmetic shift: floor, i.e. round half up
        m.d.comb += self.corrected.eq(self.acc - (scaled + self.beta))
