"""The MAC unit's clocked protocol, driven from cocotb (in-simulator side only).

Shared by :mod:`appmult.tb.mac_tests` and :mod:`appmult.tb.mac_correction_tests`: reset,
then one operand beat per clock edge with ``valid_in``/``clear``, and idle cycles at the
end so the last beats come out of the pipeline. Imports cocotb, so only test modules
running inside a simulator import it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cocotb.triggers import Timer


async def _edge(dut) -> None:
    dut.clk.value = 0
    await Timer(1, "ns")
    dut.clk.value = 1
    await Timer(1, "ns")


async def run_beats(dut, a_words: Sequence[int], b_words: Sequence[int], valid, clear, *, latency: int,
                    sample: Callable[[Any], Any], extra_ports: Sequence[str] = (),
                    before_edge: Callable[[int], None] | None = None) -> list[Any]:
    """Reset the MAC, drive every beat, and sample the outputs after each clock edge.

    Beat ``k`` is taken at edge ``k`` and shows after edge ``k + latency - 1``, so the
    returned list has ``len(a_words) + latency - 1`` samples and beat ``k``'s outputs are
    at index ``k + latency - 1``.

    Args:
        dut: the cocotb handle of the MAC.
        a_words, b_words: packed lane operands per beat.
        valid, clear: per-beat control bits.
        latency: clock edges from a beat to its accumulator.
        sample: reads the outputs of interest from ``dut`` after an edge.
        extra_ports: further inputs held at 0 during reset (e.g. the correction's).
        before_edge: called with the cycle index before each edge, to set extra inputs.

    Returns:
        One sample per cycle.
    """
    dut.clk.value = 0
    dut.rst.value = 1
    for port in ("valid_in", "clear", "a", "b", *extra_ports):
        getattr(dut, port).value = 0
    await Timer(1, "ns")
    dut.clk.value = 1
    await Timer(1, "ns")
    dut.rst.value = 0
    n = len(a_words)
    samples = []
    for k in range(n + latency - 1):
        beat = k < n
        dut.a.value = a_words[k] if beat else 0
        dut.b.value = b_words[k] if beat else 0
        dut.valid_in.value = int(valid[k]) if beat else 0
        dut.clear.value = int(clear[k]) if beat else 0
        if before_edge is not None:
            before_edge(k)
        await _edge(dut)
        samples.append(sample(dut))
    return samples


def read_int(value, signed: bool) -> int | None:
    """A sampled port value as an integer (``None`` when it holds X or Z).

    A 1-bit port reads as a ``Logic``, wider ones as a ``LogicArray``; a signed 1-bit
    port holds -1 or 0.
    """
    if not value.is_resolvable:
        return None
    if hasattr(value, "to_unsigned"):
        return value.to_signed() if signed else value.to_unsigned()
    bit = int(value)
    return -bit if signed else bit
