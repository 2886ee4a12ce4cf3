"""Verilog export of multipliers (combinational or with a registered output)."""

from __future__ import annotations

import re

from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..errors import InvalidTypeError, InvalidValueError
from ._base import Multiplier

__all__ = ["RegisteredMultiplier", "export_verilog"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")


class RegisteredMultiplier(wiring.Component):
    """A multiplier with its output registered on ``clk`` (synchronous reset ``rst`` to 0).

    Ports: ``a``, ``b`` in; ``p`` out, one cycle after the operands. Exported with ``clk``
    and ``rst``.

    Args:
        multiplier: the combinational multiplier to wrap.
    """

    def __init__(self, multiplier: Multiplier):
        if not isinstance(multiplier, Multiplier):
            raise InvalidTypeError(f"RegisteredMultiplier wraps a Multiplier, not {multiplier!r}")
        self._mult = multiplier
        sig = multiplier.signature.members
        super().__init__({"a": In(sig["a"].shape), "b": In(sig["b"].shape), "p": Out(sig["p"].shape)})

    @property
    def multiplier(self) -> Multiplier:
        return self._mult

    @property
    def latency(self) -> int:
        """Clock cycles from operands to product."""
        return 1

    def elaborate(self, platform):
        m = Module()
        m.submodules.mult = mult = self._mult
        m.d.comb += [mult.a.eq(self.a), mult.b.eq(self.b)]
        m.d.sync += self.p.eq(mult.p)
        return m


def export_verilog(component: wiring.Component, *, name: str = "appmult_mul",
                   registered: bool = False) -> str:
    """Verilog source of a multiplier (or any appmult component) as one top module.

    Args:
        component: a :class:`Multiplier` or other ``wiring.Component`` (e.g. a MAC unit).
        name: top module name (a Verilog identifier).
        registered: wrap a multiplier in :class:`RegisteredMultiplier` (adds ``clk``, ``rst``).

    Returns:
        Verilog text. Ports are named as in the component's signature.

    Raises:
        TypeError: not a component.
        ValueError: ``name`` is not a Verilog identifier.
    """
    if not isinstance(component, wiring.Component):
        raise InvalidTypeError(f"export_verilog takes an Amaranth wiring.Component, not {component!r}")
    if not isinstance(name, str) or not _IDENT.match(name):
        raise InvalidValueError(f"Module name must be a Verilog identifier, not {name!r}")
    if registered:
        if not isinstance(component, Multiplier):
            raise InvalidTypeError("registered=True applies to a Multiplier; other components define their own timing")
        component = RegisteredMultiplier(component)
    return verilog.convert(component, name=name, emit_src=False)
