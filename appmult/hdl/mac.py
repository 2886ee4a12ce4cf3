"""MAC / dot-product unit: N lanes of one approximate multiplier, an adder tree, an accumulator.

This is what an accelerator built on an approximate multiplier computes for one output of
a layer, so it is what :mod:`appmult.tb` checks against sums of LUT entries.

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

Overflow: the accumulator is ``acc_width`` bits and wraps modulo ``2**acc_width`` (two's
complement when signed), exactly like an integer register -- no saturation. To avoid it
for a sum of ``K`` products (``K`` = lanes x beats between clears), size the accumulator
with :func:`required_acc_width`, which uses the LUT's actual minimum and maximum product;
the generic bound is ``width_p + ceil(log2(K))``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from amaranth.hdl import Module, Mux, Signal, Value, signed as sshape, unsigned as ushape
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..codes import check_codes, wrap_value
from ._base import Multiplier

__all__ = ["MAX_ACC_WIDTH", "MacUnit", "mac_reference", "required_acc_width"]

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
            ceil(log2(lanes)))``. Sums wrap modulo ``2**acc_width``.
        factory: optional callable returning one lane's multiplier; each result must have
            the template's widths, signedness and spec.

    Raises:
        TypeError: ``multiplier`` is not a Multiplier, ``lanes`` or ``acc_width`` is not an
            integer in range, or ``factory`` is not callable or returns a non-Multiplier.
        ValueError: a factory-made lane differs from the template.
    """

    def __init__(self, multiplier: Multiplier, *, lanes: int, acc_width: int | None = None,
                 factory: Callable[[], Multiplier] | None = None):
        # Like a Multiplier, a MAC object is also a parameter record (widths, latency,
        # required_acc_width); building one without elaborating it is normal.
        self._MustUse__silence = True
        if not isinstance(multiplier, Multiplier):
            raise TypeError(f"MacUnit needs a Multiplier, not {multiplier!r}")
        if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= _MAX_LANES:
            raise TypeError(f"MAC lane count must be an integer in 1..{_MAX_LANES}, not {lanes!r}")
        tree_width = multiplier.width_p + _ceil_log2(lanes)
        if acc_width is None:
            acc_width = max(32, tree_width)
        if not isinstance(acc_width, int) or isinstance(acc_width, bool) or not 1 <= acc_width <= MAX_ACC_WIDTH:
            raise TypeError(f"MAC accumulator width must be an integer in 1..{MAX_ACC_WIDTH}, not {acc_width!r}")
        if factory is not None and not callable(factory):
            raise TypeError(f"MAC lane factory must be callable, not {factory!r}")
        self._mult = multiplier
        self._lanes = lanes
        self._acc_width = acc_width
        self._tree_width = tree_width
        self._factory = factory if factory is not None else _lane_factory(multiplier)
        if factory is not None:
            self._check_lane(factory())
        shape = sshape if multiplier.signed else ushape
        super().__init__({
            "a": In(lanes * multiplier.width_a),
            "b": In(lanes * multiplier.width_b),
            "valid_in": In(1),
            "clear": In(1),
            "acc": Out(shape(acc_width)),
            "valid_out": Out(1),
        })

    def _check_lane(self, lane) -> Multiplier:
        if not isinstance(lane, Multiplier):
            raise TypeError(f"MAC lane factory must return a Multiplier, not {lane!r}")
        if lane.spec != self._mult.spec:
            raise ValueError(f"MAC lane factory made {lane.spec}, but the template is {self._mult.spec}")
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
    def latency(self) -> int:
        """Clock edges from sampling a beat to ``acc``/``valid_out`` showing it: 2."""
        return 2

    def __repr__(self) -> str:
        return f"<MacUnit {self._lanes} x {self._mult.spec}, acc {self._acc_width} bits>"

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
        return m


def _product_range(source) -> tuple[int, int]:
    from ..lut_gen.lutfile import LutFile
    if isinstance(source, Multiplier):
        # The circuit's LUT, never the Python model (that is what the hardware computes).
        from ..tb.runner import circuit_lut
        source = circuit_lut(source)
    if isinstance(source, LutFile):
        table = source.product
    else:
        raise TypeError(f"required_acc_width needs a LutFile or a Multiplier, not {source!r}")
    return int(table.min()), int(table.max())


def required_acc_width(lut_or_multiplier, fan_in: int) -> int:
    """Smallest accumulator width that holds any sum of ``fan_in`` products without overflow.

    Uses the LUT's actual product range ``[lo, hi]``: a sum of ``K`` products lies in
    ``[K*min(lo, 0), K*max(hi, 0)]``. Signed multipliers need a two's complement width
    holding both ends; unsigned ones ``ceil(log2(K*hi + 1))`` bits. Approximate
    multipliers that never reach the exact extremes can need a bit less than the generic
    ``width_p + ceil(log2(K))``; ones that exceed them, more.

    Args:
        lut_or_multiplier: a :class:`~appmult.lut_gen.LutFile`, or a multiplier whose
            circuit is characterized to get one.
        fan_in: number of products summed between clears (lanes x beats), >= 1.

    Returns:
        The width in bits (at least 1).

    Raises:
        TypeError: ``fan_in`` is not a positive integer, or the first argument is neither
            a LutFile nor a Multiplier.
    """
    if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in < 1:
        raise TypeError(f"Fan-in must be a positive integer, not {fan_in!r}")
    signed = lut_or_multiplier.signed
    lo, hi = _product_range(lut_or_multiplier)
    low, high = fan_in * min(lo, 0), fan_in * max(hi, 0)
    if not signed:
        return max(1, high.bit_length())
    # W bits hold -2**(W-1) .. 2**(W-1) - 1.
    return 1 + max(high.bit_length(), (-low - 1).bit_length() if low < 0 else 0)


def mac_reference(product, a_codes, b_codes, *, valid, clear, acc_width: int, signed: bool) -> np.ndarray:
    """Accumulator after each beat, as :class:`MacUnit` computes it from a product LUT.

    Args:
        product: the LUT's product table ``[a_code, b_code]``.
        a_codes: ``(beats, lanes)`` operand codes of ``a``.
        b_codes: ``(beats, lanes)`` operand codes of ``b``.
        valid: ``(beats,)`` booleans, ``valid_in`` per beat.
        clear: ``(beats,)`` booleans, ``clear`` per beat (clear first, then add).
        acc_width: accumulator width; sums wrap modulo ``2**acc_width``.
        signed: two's complement accumulator.

    Returns:
        int64 array ``(beats,)``: ``acc`` after each beat (unchanged on idle beats).
    """
    table = np.asarray(product, dtype=np.int64)
    a = check_codes(a_codes, int(table.shape[0]).bit_length() - 1)
    b = check_codes(b_codes, int(table.shape[1]).bit_length() - 1)
    beat_sums = table[a, b].sum(axis=1)
    valid = np.asarray(valid, dtype=bool)
    clear = np.asarray(clear, dtype=bool)
    out = np.empty(len(beat_sums), dtype=np.int64)
    acc = 0
    mask = (1 << acc_width) - 1
    for k, s in enumerate(beat_sums):
        if clear[k]:
            acc = 0
        if valid[k]:
            acc = (acc + int(s)) & mask
        out[k] = acc
    return wrap_value(out, acc_width, signed)
