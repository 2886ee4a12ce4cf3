"""The multiplier base class and the two structural skeletons the families share.

* :class:`Multiplier` -- ports ``a`` (width_a), ``b`` (width_b), ``p`` (width_a + width_b),
  parameter validation, the spec string, and the numpy reference ``model`` on raw codes.
* :class:`PartialProductMultiplier` -- an array of partial-product bits ``a_i & b_j`` in
  column ``i + j``. Signed operands use the (modified) Baugh--Wooley form: the bits with
  exactly one sign-bit factor have negative weight and are added inverted, with a constant
  correction. Families that drop bits (truncation, perforation, broken array) only say
  which bits they keep.
* :class:`SignMagnitudeMultiplier` -- for families defined on magnitudes (DRUM, Mitchell,
  ...): ``|a|`` and ``|b|`` go through an unsigned core and the product is negated when the
  signs differ. ``|-2**(w-1)| = 2**(w-1)`` still fits in ``w`` unsigned bits, so the most
  negative code is handled exactly like every other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed as sshape, unsigned as ushape
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..codes import check_codes, codes_to_values, wrap_value
from ..errors import InvalidTypeError, InvalidValueError

__all__ = [
    "MAX_WIDTH",
    "MIN_WIDTH",
    "Multiplier",
    "Param",
    "PartialProductMultiplier",
    "SignMagnitudeMultiplier",
]

MIN_WIDTH = 2
MAX_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class Param:
    """A family parameter, as the registry, the spec parser and ``appmult list`` see it.

    Attributes:
        name: keyword argument name.
        kind: ``"int"``, ``"bool"``, ``"float"`` or ``"ints"`` (a list of integers,
            written ``[0,2]`` in a spec).
        default: value used when the spec omits it.
        help: one line for ``appmult list``.
    """

    name: str
    kind: str
    default: Any
    help: str


def _check_width(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_WIDTH <= value <= MAX_WIDTH:
        raise InvalidTypeError(f"Operand width {name} must be an integer in {MIN_WIDTH}..{MAX_WIDTH}, not {value!r}")
    return value


class Multiplier(wiring.Component):
    """Base class of every multiplier: ports ``a``, ``b`` in and ``p`` out.

    Operands and product are raw bit patterns on the pins; with ``signed=True`` they are
    two's complement (the port shapes are signed). Subclasses implement
    :meth:`elaborate` (the circuit) and :meth:`_model` (a vectorised numpy reference on
    codes, used to test the circuit, never to produce LUTs).

    Args:
        width_a: width of operand ``a`` in bits (2..16).
        width_b: width of operand ``b`` in bits (2..16).
        width: shorthand setting both widths.
        signed: two's complement operands and product.

    Raises:
        TypeError: a width is not an integer in 2..16, or ``signed`` is not a bool.
        ValueError: ``width`` given together with a different ``width_a``/``width_b``,
            or no width given.
    """

    #: Registry name used in spec strings (``truncated:width=8,...``).
    family: ClassVar[str] = "custom"
    #: Family parameters beyond widths and signedness.
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    #: One line describing the family and how it handles sign.
    DESCRIPTION: ClassVar[str] = ""
    #: Widths and signedness come from a file a parameter names (``netlist:path=...``):
    #: a spec needs no width, and parameter sweeps over families leave the family out.
    FILE_BACKED: ClassVar[bool] = False

    def __init__(self, *, width_a: int | None = None, width_b: int | None = None,
                 width: int | None = None, signed: bool = False):
        # A multiplier object is also a parameter record (model, spec, LUT metadata): being
        # built and never elaborated is normal, so Amaranth's UnusedElaboratable is noise.
        # Set first: a constructor that raises must not leave a warning behind either.
        self._MustUse__silence = True
        if width is not None:
            _check_width("width", width)
            for name, value in (("width_a", width_a), ("width_b", width_b)):
                if value is not None and value != width:
                    raise InvalidValueError(f"Give either width or {name}, not both with different values "
                                     f"(width={width}, {name}={value})")
            width_a = width_b = width
        if width_a is None or width_b is None:
            raise InvalidValueError("Operand widths are required: give width=N, or width_a=N and width_b=M")
        self._width_a = _check_width("width_a", width_a)
        self._width_b = _check_width("width_b", width_b)
        if not isinstance(signed, bool):
            raise InvalidTypeError(f"signed must be a bool, not {signed!r}")
        self._signed = signed
        shape = sshape if signed else ushape
        super().__init__({
            "a": In(shape(self._width_a)),
            "b": In(shape(self._width_b)),
            "p": Out(shape(self.width_p)),
        })

    # -- read-only properties -------------------------------------------------------------
    @property
    def width_a(self) -> int:
        return self._width_a

    @property
    def width_b(self) -> int:
        return self._width_b

    @property
    def width_p(self) -> int:
        """Output width: ``width_a + width_b``."""
        return self._width_a + self._width_b

    @property
    def signed(self) -> bool:
        return self._signed

    @property
    def params(self) -> dict[str, Any]:
        """Family parameters (excluding widths and signedness), as passed to the constructor."""
        return {p.name: getattr(self, p.name) for p in self.PARAMS}

    @property
    def spec(self) -> str:
        """Spec string that :func:`appmult.hdl.from_spec` turns back into an equal multiplier."""
        from .registry import format_spec
        return format_spec(self)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: family, widths, signedness and parameters."""
        return {"family": self.family, "width_a": self.width_a, "width_b": self.width_b,
                "signed": self.signed, "params": self.params}

    def __repr__(self) -> str:
        try:
            return f"<{type(self).__name__} {self.spec}>"
        except AttributeError:  # half-built (constructor raised)
            return f"<{type(self).__name__} (incomplete)>"

    # -- numpy reference -------------------------------------------------------------------
    def model(self, a_codes, b_codes) -> np.ndarray:
        """Vectorised reference: product values for operand codes (broadcasting).

        Args:
            a_codes: codes of operand ``a`` (``0 .. 2**width_a - 1``).
            b_codes: codes of operand ``b``.

        Returns:
            int64 array of product values (signed when the multiplier is signed), wrapped
            to ``width_p`` bits exactly as the output port wraps.

        Raises:
            ValueError: a code is out of range.
        """
        a = check_codes(a_codes, self.width_a)
        b = check_codes(b_codes, self.width_b)
        a, b = np.broadcast_arrays(a, b)
        return wrap_value(self._model(a, b), self.width_p, self.signed)

    def _model(self, a_codes: np.ndarray, b_codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no numpy model")

    def elaborate(self, platform):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement elaborate()")


class PartialProductMultiplier(Multiplier):
    """Array of partial-product bits, summed exactly; subclasses choose which bits to keep.

    Bit ``(i, j)`` is ``a_i & b_j`` with weight ``2**(i+j)``. For signed operands the
    Baugh--Wooley signs apply: weight is negative when exactly one of ``i``, ``j`` is the
    operand's sign bit. A negative bit ``x`` is built as ``~x`` plus a constant
    ``-2**(i+j)`` (modified Baugh--Wooley), so the array has only positive bits and one
    constant row.

    Subclasses override :meth:`keep` and optionally :meth:`compensation` (a constant added
    to the sum, e.g. the expected value of dropped bits).
    """

    def keep(self, i: int, j: int) -> bool:
        """Whether partial-product bit ``a_i & b_j`` is present."""
        return True

    def compensation(self) -> int:
        """Constant added to the product (before wrapping to the output width)."""
        return 0

    def pp_sign(self, i: int, j: int) -> int:
        """+1 or -1: the Baugh--Wooley sign of bit ``(i, j)``."""
        if not self.signed:
            return 1
        sa = i == self.width_a - 1
        sb = j == self.width_b - 1
        return -1 if sa != sb else 1

    def kept_bits(self) -> list[tuple[int, int]]:
        return [(i, j) for j in range(self.width_b) for i in range(self.width_a) if self.keep(i, j)]

    def _constant(self) -> int:
        # Modified Baugh-Wooley: -x*2^c == (~x)*2^c - 2^c.
        c = self.compensation()
        for i, j in self.kept_bits():
            if self.pp_sign(i, j) < 0:
                c -= 1 << (i + j)
        return c

    def elaborate(self, platform):
        m = Module()
        wp = self.width_p
        a = self.a.as_unsigned()
        b = self.b.as_unsigned()
        rows: list[Value] = []
        for j in range(self.width_b):
            bits = []
            for i in range(self.width_a):
                if not self.keep(i, j):
                    bits.append(Const(0, 1))
                    continue
                bit = a[i] & b[j]
                bits.append(~bit if self.pp_sign(i, j) < 0 else bit)
            if any(self.keep(i, j) for i in range(self.width_a)):
                rows.append(Cat(*bits).as_unsigned() << j)
        constant = self._constant() % (1 << wp)
        total = Const(constant, wp)
        for row in rows:
            total = (total + row)[:wp]
        m.d.comb += self.p.eq(total)
        return m

    def _model(self, a_codes, b_codes):
        acc = np.full(a_codes.shape, self._constant(), dtype=np.int64)
        for i, j in self.kept_bits():
            bit = ((a_codes >> i) & 1) & ((b_codes >> j) & 1)
            if self.pp_sign(i, j) < 0:
                bit = 1 - bit
            acc += bit << (i + j)
        return acc


class SignMagnitudeMultiplier(Multiplier):
    """Unsigned core on magnitudes; for signed operands the product is negated when signs differ.

    Subclasses implement :meth:`core` (Amaranth: unsigned magnitudes of ``width_a`` and
    ``width_b`` bits in, an unsigned product value out) and :meth:`core_model` (numpy,
    int64 magnitudes in, int64 product out). The core's result must stay below
    ``2**(width_p - 1)`` for signed multipliers (true for approximations within a factor
    of two of the exact magnitude product, which is at most ``2**(width_p - 2)``).
    """

    def core(self, m: Module, a_mag: Value, b_mag: Value) -> Value:  # pragma: no cover - abstract
        raise NotImplementedError

    def core_model(self, a_mag: np.ndarray, b_mag: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def elaborate(self, platform):
        m = Module()
        wa, wb, wp = self.width_a, self.width_b, self.width_p
        if not self.signed:
            m.d.comb += self.p.eq(self.core(m, self.a, self.b))
            return m
        a_neg = self.a[wa - 1]
        b_neg = self.b[wb - 1]
        a_mag = Signal(wa)
        b_mag = Signal(wb)
        # Two's-complement negation of a wa-bit pattern, kept at wa bits: |-2^(wa-1)| = 2^(wa-1).
        m.d.comb += [
            a_mag.eq(Mux(a_neg, (-self.a.as_unsigned())[:wa], self.a.as_unsigned())),
            b_mag.eq(Mux(b_neg, (-self.b.as_unsigned())[:wb], self.b.as_unsigned())),
        ]
        mag = Signal(wp)
        m.d.comb += mag.eq(self.core(m, a_mag, b_mag))
        m.d.comb += self.p.eq(Mux(a_neg ^ b_neg, (-mag)[:wp], mag))
        return m

    def _model(self, a_codes, b_codes):
        if not self.signed:
            return self.core_model(a_codes, b_codes)
        a = codes_to_values(a_codes, self.width_a, True)
        b = codes_to_values(b_codes, self.width_b, True)
        mag = self.core_model(np.abs(a), np.abs(b))
        return np.where((a < 0) != (b < 0), -mag, mag)
