"""Hardware proof on a trained layer: its accumulators, recomputed by the RTL MAC unit.

:func:`verify_layer_rtl` takes an :class:`~appmult.nn.ApproxConv2d` (or
:class:`~appmult.nn.ApproxLinear`) and real inputs, and checks that the exported Verilog
of a MAC unit built from the layer's multiplier computes the same integer accumulators
as the layer's :meth:`int_forward` -- the sums the network was trained and evaluated
with -- for a few output positions:

1. The chosen outputs' operand codes come from the layer itself
   (:meth:`~appmult.nn.ApproxConv2d.operands`: its quantizers with observers frozen,
   padding with the activation zero point's code, one row of ``K = Cin/groups * kh * kw``
   code pairs per output, ``K = in_features`` for a linear layer) -- the same quantize and
   padding code as ``int_forward``. As a guard, the sum of LUT entries over each row must
   equal ``int_forward`` there before anything is simulated.
2. Each chosen output's ``K`` pairs are cut into beats of ``lanes`` pairs, the first beat
   with ``clear``, and driven through :func:`appmult.tb.run_mac` on a
   :class:`appmult.hdl.MacUnit` of ``from_spec(lut.metadata["spec"])`` with an
   accumulator wide enough for any sum of the LUT's entries
   (:func:`~appmult.reference.required_acc_width`) and of the circuit's product port
   (:func:`~appmult.reference.port_acc_width`): no wrap-around, even where the circuit
   computes something other than the LUT (sized by the LUT alone, a wrong circuit's sum
   could wrap to the right value).
3. The accumulator after each output's last beat is compared with ``int_forward``.

Filling the last beat. The MAC has no per-lane enable, so when ``lanes`` does not divide
``K`` the unused lanes of the last beat still multiply something. They get a *fill pair*
of codes whose LUT product is 0 -- ``(0, 0)`` when the multiplier maps it to 0, else the
first zero entry of the LUT. Only a LUT without any zero entry (a multiplier with a
constant bias) needs a non-zero fill: then the known ``fill_pairs * LUT[fill]`` is added
to the expected value and reported. This keeps the MAC unchanged (no test-only port) and
the comparison exact.

A flow: here the torch layers meet :mod:`appmult.hdl` and :mod:`appmult.tb`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InvalidTypeError, InvalidValueError, UserError
from ..hdl import MAX_ACC_WIDTH, MacUnit, Multiplier, from_spec
from ..nn import ApproxConv2d, ApproxLinear
from ..reference import port_acc_width, required_acc_width
from ..tb import check_simulator, run_mac

__all__ = ["LayerRtlResult", "PositionCheck", "RtlCheckError", "verify_layer_rtl"]


class RtlCheckError(UserError, ValueError):
    """The layer cannot be checked against RTL (no circuit behind its LUT, widths differ, ...)."""


@dataclasses.dataclass(frozen=True)
class PositionCheck:
    """One output position checked in RTL.

    Attributes:
        position: ``(n, cout, y, x)`` for a conv layer, ``(row, out)`` for a linear one.
        expected: the layer's ``int_forward`` value there (plus the fill pairs' known
            products, which are 0 unless the LUT has no zero entry).
        actual: the RTL accumulator after the position's last beat.
        padded_operands: activations of this receptive field that are padding (zero-point code).
    """

    position: tuple[int, ...]
    expected: int
    actual: int
    padded_operands: int

    @property
    def matched(self) -> bool:
        """The RTL accumulator equals the expected value."""
        return self.expected == self.actual

    def __str__(self) -> str:
        where = ", ".join(map(str, self.position))
        pad = f", {self.padded_operands} padded operands" if self.padded_operands else ""
        return f"position ({where}){pad}: int_forward {self.expected}, RTL {self.actual}"


@dataclasses.dataclass(frozen=True)
class LayerRtlResult:
    """Outcome of :func:`verify_layer_rtl`.

    Attributes:
        passed: every checked position's RTL accumulator equals ``int_forward``.
        layer: the layer's class name.
        spec: the multiplier spec the MAC was built from.
        lut_id: the layer's LUT id.
        fan_in: products per output (``K``).
        lanes: MAC lanes.
        beats: beats per output (``ceil(K / lanes)``).
        fill_pairs: unused lanes in each output's last beat.
        fill_codes: the ``(a, b)`` code pair driven into them.
        fill_product: ``LUT[fill_codes]`` (0 unless the LUT has no zero entry).
        acc_width: accumulator width of the simulated MAC.
        checks: one :class:`PositionCheck` per position, in drive order.
        simulator: ``"icarus"`` or ``"verilator"``.
        seconds: wall time of the whole check (quantization, build and simulation).
    """

    passed: bool
    layer: str
    spec: str
    lut_id: str
    fan_in: int
    lanes: int
    beats: int
    fill_pairs: int
    fill_codes: tuple[int, int]
    fill_product: int
    acc_width: int
    checks: tuple[PositionCheck, ...]
    simulator: str
    seconds: float

    @property
    def mismatches(self) -> tuple[PositionCheck, ...]:
        """The positions whose RTL accumulator differs, in drive order."""
        return tuple(c for c in self.checks if not c.matched)

    def summary(self) -> str:
        """One line, e.g. ``RTL check: 8 positions, 25 products each, all equal (...)``."""
        n = len(self.checks)
        verdict = ("all equal" if self.passed else
                   f"{len(self.mismatches)} of {n} differ")
        return (f"RTL check: {n} positions, {self.fan_in} products each, {verdict} "
                f"({self.layer}, {self.spec}, {self.lanes} lanes x {self.beats} beats, "
                f"{self.acc_width}-bit accumulator, {self.simulator}, {self.seconds:.1f} s)")

    def report(self) -> str:
        """The summary and each mismatching position."""
        return "\n".join([self.summary(), *(f"  {c}" for c in self.mismatches)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``results.json``)."""
        d = dataclasses.asdict(self)
        d["checks"] = [dict(dataclasses.asdict(c), position=list(c.position), matched=c.matched)
                       for c in self.checks]
        d["fill_codes"] = list(self.fill_codes)
        d["mismatch_count"] = len(self.mismatches)
        d["summary"] = self.summary()
        return d


# -- positions and beats -------------------------------------------------------------------

def _positions(out_shape: tuple[int, ...], positions: int | Sequence[Sequence[int]], seed: int
               ) -> list[tuple[int, ...]]:
    """Explicit positions validated, or ``positions`` of them: both corners first, then seeded random."""
    total = math.prod(out_shape)
    if isinstance(positions, bool):
        raise InvalidTypeError(f"positions must be a count or a list of index tuples, not {positions!r}")
    if isinstance(positions, int):
        if positions < 1:
            raise InvalidValueError(f"positions must be at least 1, not {positions}")
        # The first corner sees the most padding (top-left border of the first image and
        # channel); the last corner the bottom-right border of the last image and channel.
        chosen = [tuple(0 for _ in out_shape), tuple(s - 1 for s in out_shape)]
        rng = np.random.default_rng(seed)
        count = min(positions, total)
        seen: set[tuple[int, ...]] = set()
        picked: list[tuple[int, ...]] = []
        for p in chosen + [tuple(int(v) for v in np.unravel_index(i, out_shape))
                           for i in rng.permutation(total)[: count + 2]]:
            if p not in seen:
                seen.add(p)
                picked.append(p)
            if len(picked) == count:
                break
        return picked
    out = []
    for p in positions:
        pos = tuple(int(v) for v in p)
        if len(pos) != len(out_shape) or any(not 0 <= v < s for v, s in zip(pos, out_shape)):
            raise InvalidValueError(f"Position {tuple(p)} is outside the layer's output of shape {out_shape}")
        out.append(pos)
    if not out:
        raise InvalidValueError("positions is empty")
    return out


def _fill_pair(product: np.ndarray) -> tuple[int, int]:
    """Codes whose LUT product is 0, preferring ``(0, 0)``; else the smallest |product|."""
    if product[0, 0] == 0:
        return 0, 0
    zeros = np.argwhere(product == 0)
    if len(zeros):
        return int(zeros[0, 0]), int(zeros[0, 1])
    i = int(np.argmin(np.abs(product)))
    return int(i // product.shape[1]), int(i % product.shape[1])


def kind_mismatch(multiplier: Multiplier, lut) -> tuple[str, str] | None:
    """``("8x8 signed", "8x8 unsigned")``-style texts of a circuit and a LUT whose widths or
    signedness differ; ``None`` when they agree."""
    have = (multiplier.width_a, multiplier.width_b, multiplier.signed)
    want = (lut.width_a, lut.width_b, lut.signed)
    if have == want:
        return None
    return tuple(f"{t[0]}x{t[1]} {'signed' if t[2] else 'unsigned'}" for t in (have, want))


def verify_layer_rtl(layer: ApproxConv2d | ApproxLinear, x: torch.Tensor, *,
                     positions: int | Sequence[Sequence[int]] = 8, lanes: int = 8, sim: str = "icarus",
                     build_dir=None, multiplier=None, seed: int = 0) -> LayerRtlResult:
    """Check that the RTL MAC computes a trained layer's integer accumulators (see the module docstring).

    Args:
        layer: an :class:`ApproxConv2d` or :class:`ApproxLinear` whose LUT was characterized
            from a circuit (its metadata holds the multiplier ``spec``).
        x: a real input batch of the layer.
        positions: how many output positions to check (the first and last corner, then
            seeded random ones), or explicit ``(n, cout, y, x)`` / ``(row, out)`` tuples.
        lanes: MAC lanes (products per beat).
        sim: ``"icarus"`` or ``"verilator"``.
        build_dir: where to build and keep the simulation files; default a temporary directory.
        multiplier: build the MAC from this :class:`appmult.hdl.Multiplier` instead of the
            LUT's spec (to check a candidate circuit, or to prove a wrong one is caught).
        seed: seed of the random positions.

    Returns:
        A :class:`LayerRtlResult`; ``passed`` is False when any position differs.

    Raises:
        TypeError: not an approximate layer, or ``positions`` of the wrong type.
        RtlCheckError: the LUT has no circuit spec, the multiplier's widths or signedness
            differ from the LUT's, or (a guard) the layer's operand codes do not reproduce
            its ``int_forward``.
        ValueError: bad ``positions`` or ``lanes``.
        appmult.tb.SimulatorNotFound: the simulator is not installed.
        appmult.tb.SimulationError: the MAC did not build or simulate.
    """
    t0 = time.perf_counter()
    if not isinstance(layer, (ApproxConv2d, ApproxLinear)):
        raise InvalidTypeError(f"verify_layer_rtl needs an ApproxConv2d or ApproxLinear, not {type(layer).__name__}")
    if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
        raise InvalidValueError(f"lanes must be a positive integer, not {lanes!r}")
    lut = layer.lut.lut_file
    spec = lut.metadata.get("spec")
    if multiplier is None:
        if not spec:
            raise RtlCheckError(f"LUT {lut.lut_id} has no 'spec' in its metadata: it was not characterized "
                                f"from a circuit, so there is no RTL to check the layer against (pass "
                                f"multiplier=... to name one)")
        multiplier = from_spec(spec)
    elif not isinstance(multiplier, Multiplier):
        raise InvalidTypeError(f"multiplier must be an appmult.hdl Multiplier, not {multiplier!r}")
    differ = kind_mismatch(multiplier, lut)
    if differ:
        raise RtlCheckError(f"Multiplier {multiplier.spec} is {differ[0]} but the layer's LUT {lut.lut_id} "
                            f"is {differ[1]}")

    check_simulator(sim)

    reference = layer.int_forward(x).detach().cpu().numpy().astype(np.int64)
    if isinstance(layer, ApproxLinear):
        reference = reference.reshape(-1, layer.out_features)  # operands() flattens the leading dims
    chosen = _positions(reference.shape, positions, seed)
    ops = layer.operands(x, positions=chosen)
    op_a, op_b = ops.a.cpu().numpy(), ops.b.cpu().numpy()
    padded = ops.padded.cpu().numpy()
    product = lut.product.astype(np.int64)
    expected = np.array([reference[pos] for pos in chosen], dtype=np.int64)
    # True by construction (operands() and int_forward share the quantize and padding code);
    # kept because a wrong row here would make the whole RTL comparison meaningless.
    if not np.array_equal(product[op_a, op_b].sum(-1), expected):
        raise RtlCheckError(f"The operand codes of {type(layer).__name__} do not reproduce its int_forward: "
                            f"operands() and int_forward disagree")

    k = ops.fan_in
    beats = -(-k // lanes)
    fill = beats * lanes - k
    fa, fb = _fill_pair(product)
    fill_product = int(product[fa, fb])
    # Never narrower than one product: no wrap-around, whatever the LUT's range.
    acc_width = max(required_acc_width(lut, beats * lanes), multiplier.width_p,
                    port_acc_width(multiplier.width_p, multiplier.signed, beats * lanes))
    if acc_width > MAX_ACC_WIDTH:
        raise RtlCheckError(f"A sum of {beats * lanes} products needs a {acc_width}-bit accumulator; the MAC "
                            f"supports at most {MAX_ACC_WIDTH}")
    a_beats, b_beats = [], []
    for a_codes, b_codes in zip(op_a, op_b):
        a_row = np.concatenate([a_codes, np.full(fill, fa, dtype=np.int64)])
        b_row = np.concatenate([b_codes, np.full(fill, fb, dtype=np.int64)])
        a_beats.append(a_row.reshape(beats, lanes))
        b_beats.append(b_row.reshape(beats, lanes))
    clear = np.zeros(beats * len(chosen), dtype=bool)
    clear[::beats] = True  # each position's first beat starts a new sum
    stimulus = {"a": np.concatenate(a_beats), "b": np.concatenate(b_beats),
                "valid": np.ones(beats * len(chosen), dtype=bool), "clear": clear}
    mac = MacUnit(multiplier, lanes=lanes, acc_width=acc_width)
    acc = run_mac(mac, stimulus, sim=sim, build_dir=build_dir)
    finals = acc[beats - 1::beats]
    checks = tuple(PositionCheck(position=pos, expected=int(ref) + fill * fill_product,
                                 actual=int(v), padded_operands=int(pad))
                   for pos, ref, v, pad in zip(chosen, expected, finals, padded))
    return LayerRtlResult(passed=all(c.matched for c in checks), layer=type(layer).__name__,
                          spec=multiplier.spec, lut_id=lut.lut_id, fan_in=k, lanes=lanes, beats=beats,
                          fill_pairs=fill, fill_codes=(fa, fb), fill_product=fill_product, acc_width=acc_width,
                          checks=checks, simulator=sim, seconds=time.perf_counter() - t0)
