"""Hardware proof on approximate attention: one QK^T entry, recomputed by the RTL MAC unit.

:func:`verify_attention_rtl` takes a :class:`~appmult.nn.LutAttention` and the query and
key it multiplies, and checks that the exported Verilog of a MAC unit built from its
multiplier accumulates, for the score entries asked for, the same integer
``sum_e LUT[q_e, k_e]`` as the attention's :meth:`~appmult.nn.LutAttention.int_scores`:
the operand codes come from the attention's own quantization
(:meth:`~appmult.nn.LutAttention.operands`), query codes on the LUT's activation operand.
Beats, the fill pair of a partial last beat and the accumulator width are those of
:func:`appmult.flows.rtlcheck.verify_layer_rtl`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..codes import values_to_codes
from ..errors import InvalidTypeError, InvalidValueError
from ..hdl import MacUnit, Multiplier, from_spec
from ..nn import LutAttention
from ..reference import port_acc_width, required_acc_width
from ..tb import check_simulator, run_mac
from .rtlcheck import RtlCheckError, _fill_pair

__all__ = ["AttentionRtlResult", "verify_attention_rtl"]


@dataclasses.dataclass(frozen=True)
class AttentionRtlResult:
    """Outcome of :func:`verify_attention_rtl`: per entry ``(b, i, j)``, expected and RTL accumulators."""

    passed: bool
    entries: tuple[tuple[int, int, int], ...]
    expected: tuple[int, ...]
    actual: tuple[int, ...]
    spec: str
    lanes: int
    acc_width: int


def verify_attention_rtl(attention: LutAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         *, entries: Sequence[Sequence[int]] = ((0, 0, 0),), lanes: int = 4, sim: str = "icarus",
                         build_dir=None, multiplier: Multiplier | None = None) -> AttentionRtlResult:
    """Check that the RTL MAC computes QK^T entries of an approximate attention.

    Args:
        attention: the attention whose LUT was characterized from a circuit (metadata ``spec``).
        query, key, value: its inputs (batch dimensions are flattened into ``b``).
        entries: ``(b, i, j)`` score entries to check (query row ``i``, key row ``j``).
        lanes: MAC lanes (products per beat).
        sim: ``"icarus"`` or ``"verilator"``.
        build_dir: where to build the simulation; default a temporary directory.
        multiplier: build the MAC from this multiplier instead of the LUT's spec.

    Returns:
        An :class:`AttentionRtlResult`.

    Raises:
        InvalidTypeError: not a :class:`LutAttention`.
        InvalidValueError: an entry outside the scores, or bad ``lanes``.
        RtlCheckError: no circuit spec, or a multiplier of other widths or signedness.
    """
    if not isinstance(attention, LutAttention):
        raise InvalidTypeError(f"verify_attention_rtl needs a LutAttention, not {type(attention).__name__}")
    if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
        raise InvalidValueError(f"lanes must be a positive integer, not {lanes!r}")
    lut = attention.lut.lut_file
    if multiplier is None:
        spec = lut.metadata.get("spec")
        if not spec:
            raise RtlCheckError(f"LUT {lut.lut_id} has no 'spec' in its metadata: there is no RTL to check the "
                                f"attention against (pass multiplier=... to name one)")
        multiplier = from_spec(spec)
    if (multiplier.width_a, multiplier.width_b, multiplier.signed) != (lut.width_a, lut.width_b, lut.signed):
        raise RtlCheckError(f"Multiplier {multiplier.spec} does not match the widths and signedness of LUT "
                            f"{lut.lut_id}")
    check_simulator(sim)
    ops = attention.operands(query, key, value)
    scores = attention.int_scores(ops).cpu().numpy()
    entries = tuple(tuple(int(i) for i in e) for e in entries)
    for e in entries:
        if len(e) != 3 or not all(0 <= i < n for i, n in zip(e, scores.shape)):
            raise InvalidValueError(f"Entry {e} is outside the scores of shape {scores.shape}")
    tabs = attention.lut
    qv, kv = ops.q.cpu().numpy().astype(np.int64), ops.k.cpu().numpy().astype(np.int64)
    width = qv.shape[-1]
    beats = -(-width // lanes)
    fill = beats * lanes - width
    product = lut.product.astype(np.int64)
    fa, fb = _fill_pair(product)
    acc_width = max(required_acc_width(lut, beats * lanes), multiplier.width_p,
                    port_acc_width(multiplier.width_p, multiplier.signed, beats * lanes))
    a_rows, b_rows = [], []
    for b, i, j in entries:
        qc = values_to_codes(qv[b, i], tabs.width_x, tabs.signed)
        kc = values_to_codes(kv[b, j], tabs.width_w, tabs.signed)
        a, w = (qc, kc) if tabs.activation_operand == "a" else (kc, qc)
        a_rows.append(np.concatenate([a, np.full(fill, fa)]).reshape(beats, lanes))
        b_rows.append(np.concatenate([w, np.full(fill, fb)]).reshape(beats, lanes))
    clear = np.zeros(beats * len(entries), dtype=bool)
    clear[::beats] = True
    stimulus = {"a": np.concatenate(a_rows), "b": np.concatenate(b_rows),
                "valid": np.ones(len(clear), dtype=bool), "clear": clear}
    acc = run_mac(MacUnit(multiplier, lanes=lanes, acc_width=acc_width), stimulus, sim=sim, build_dir=build_dir)
    expected = tuple(int(scores[e]) + fill * int(product[fa, fb]) for e in entries)
    actual = tuple(int(v) for v in acc[beats - 1::beats])
    return AttentionRtlResult(passed=expected == actual, entries=entries, expected=expected, actual=actual,
                              spec=multiplier.spec, lanes=lanes, acc_width=acc_width)
