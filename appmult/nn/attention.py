"""Approximate attention: the products QK^T and AV through a LUT, softmax and scaling in float.

:class:`LutAttention` is ``torch.nn.functional.scaled_dot_product_attention`` with both
matrix products computed as an approximate multiplier array would compute them:

* the operands of each product (Q and K, then the attention probabilities P and V) are
  quantized per tensor from their own current range (dynamic quantization, as
  :func:`~appmult.nn.approx_matmul` does: a matrix of activations times a matrix of
  activations has no trained range to observe); Q and P go to the LUT's activation
  operand, K and V to the other one;
* every output accumulates ``sum_k LUT[qa_k, qb_k]`` (with the zero-point cross terms of
  an unsigned LUT, exactly), then is dequantized; the ``1/sqrt(E)`` scale, the masks and
  the softmax are float operations, as they are in an accelerator whose multipliers alone
  are approximate;
* masked keys are *skipped* in AV (a causal or padded position's product is not
  accumulated), so a mask means the same as in float attention even for a multiplier with
  ``LUT[0, b] != 0``; a fully masked query row gives zeros (not NaN). Masked means a bool
  mask's False, a float mask's ``-inf``, or a float mask's most negative finite value
  (``torch.finfo(dtype).min``, what Hugging Face models use for ``-inf``); any other finite
  value, however negative (e.g. ``-1e9``), only lowers the score: the key takes part with its
  probability (0 after rounding), whose products the multiplier computes like any other;
* backward: STE (exact-product gradients), LUT-1D or LUT-2D tables, as in the layers.

:class:`ApproxMultiheadAttention` replaces ``torch.nn.MultiheadAttention`` (``from_float``
reuses its trained weights); :func:`lut_sdpa` routes the
``torch.nn.functional.scaled_dot_product_attention`` calls of a block of code through a
:class:`LutAttention`, and :func:`approximate_` uses it (through forward hooks) for modules
that call that function. ``ApproxConfig.parts`` selects what is approximate.

Size: about 730 lines, over the project's ~600: the LUT attention function, the
multi-head module and the SDPA routing share the quantization and mask helpers; the
multi-head module is the natural next split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InvalidTypeError, InvalidValueError
from . import kernels as K
from . import shuffle_gather
from .autograd import _autocast_off, _backward_without_autocast, _cast
from .config import ApproxConfig
from .functional import _check_codes
from .layers import ApproxLinear
from .quant import _fake_quant, _scale_zero_point, check_finite, quant_range
from .tables import Kernel, LutTables, _idx

__all__ = [
    "ApproxMultiheadAttention",
    "AttentionOperands",
    "LutAttention",
    "attention_modules",
    "lut_bmm",
    "lut_sdpa",
]


# ------------------------------------------------------------------------------------------
# Batched LUT product with an optional per-(row, k) keep mask
# ------------------------------------------------------------------------------------------

#: Most elements of one gathered ``(b, M, K, N)`` block in the gather paths (memory bound).
_GATHER_BLOCK = 1 << 22


def _blocks(b: int, per_item: int) -> Iterator[tuple[int, int]]:
    step = max(1, _GATHER_BLOCK // max(1, per_item))
    for s in range(0, b, step):
        yield s, min(b, s + step)


def _bmm_forward(qa, qb, keep, tabs: LutTables, exact: bool) -> torch.Tensor:
    """``acc[b, m, n] = sum_k keep[b, m, k] * LUT[qa[b, m, k], qb[b, k, n]]``."""
    ia, ib = _idx(qa, tabs.lo_x), _idx(qb, tabs.lo_w)
    bsz, m, k = ia.shape
    n = ib.shape[-1]
    dtype = torch.float64 if exact else torch.float32
    if tabs.kernel is Kernel.LOWRANK and (not exact or k * tabs.bound < K.FP64_EXACT_LIMIT):
        r = tabs.u.shape[1]
        ua = F.embedding(ia, tabs.u.to(dtype))                        # (B, M, K, r)
        if keep is not None:
            ua = ua * keep.to(dtype).unsqueeze(-1)
        vb = F.embedding(ib, tabs.v.to(dtype)).permute(0, 1, 3, 2)     # (B, K, r, N)
        acc = ua.reshape(bsz, m, k * r) @ vb.reshape(bsz, k * r, n)
        return torch.round(acc) if exact else acc
    if keep is None:
        acc = shuffle_gather.bmm(ia, ib, tabs.prod)  # CPU, 8-bit tables: one batched kernel call
        if acc is not None:
            return acc.to(dtype)
    out = torch.empty((bsz, m, n), dtype=torch.int64, device=qa.device)
    prod = tabs.prod
    for s, e in _blocks(bsz, m * k * n):
        p = prod[ia[s:e, :, :, None], ib[s:e, None, :, :]]             # (b, M, K, N)
        if keep is not None:
            p = p * keep[s:e, :, :, None].to(p.dtype)
        out[s:e] = p.sum(2, dtype=torch.int64)
    return out.to(dtype)


#: Fewest look-ups of a masked product for which its activation-side LUT-2D gradient comes from
#: the gradient gathers (below, the torch gather's one pass for both sides is faster:
#: 128x17x16x17 masked 2.8 vs 3.3 ms; 128x65x32x65: 156 vs 57 ms).
MASKED_SPLIT_MIN_LOOKUPS = 1 << 21


def _bmm_backward(grad, qa, qb, keep, tabs: LutTables, need: tuple[bool, bool] = (True, True)):
    """``(d/dqa, d/dqb)`` of ``sum_k keep * LUT[qa, qb]``; a side whose ``need`` is false is
    ``None``, not computed."""
    dt = grad.dtype
    ia, ib = _idx(qa, tabs.lo_x), _idx(qb, tabs.lo_w)
    kf = None if keep is None else keep.to(dt)
    ga = gb = None
    if tabs.gx1 is not None:
        # STE (the tables are the operand values) and LUT-1D: d/da depends on b only, d/db on a.
        if need[0]:
            ga = grad @ tabs.gx1.to(dt)[ib].transpose(-1, -2)            # (B, M, K)
            ga = ga if kf is None else ga * kf
        if need[1]:
            amap = tabs.gw1.to(dt)[ia]
            amap = amap if kf is None else amap * kf
            gb = amap.transpose(-1, -2) @ grad                           # (B, K, N)
        return ga, gb
    gathers = dt == torch.float32  # (their sums are float32: a float64 product keeps the torch gather)
    if kf is None and gathers:
        return _bmm_gather_grads(grad, ia, ib, tabs, need)
    # Masked: d/db sums over m, so the mask stays inside -- a torch gather of (b, M, K, N)
    # blocks; d/da does not (the mask depends on (m, k), not on the summed n): for large
    # products the unmasked sums of the gradient gathers times the mask (the same values)
    bsz, m, k = ia.shape
    split = gathers and qa.numel() * ib.shape[-1] >= MASKED_SPLIT_MIN_LOOKUPS
    looped = need[0] and not split
    if need[0]:
        ga = _bmm_gather_grads(grad, ia, ib, tabs, (True, False))[0] * kf if split \
            else torch.empty(qa.shape, dtype=dt, device=grad.device)
    if need[1]:
        gb = torch.empty(qb.shape, dtype=dt, device=grad.device)
    if not (looped or need[1]):
        return ga, gb
    gx2, gw2 = tabs.gx2.to(dt), tabs.gw2.to(dt)
    for s, e in _blocks(bsz, m * k * ib.shape[-1]):
        pair = (ia[s:e, :, :, None], ib[s:e, None, :, :])
        g = grad[s:e, :, None, :]                                        # (b, M, 1, N)
        if kf is not None:
            g = g * kf[s:e, :, :, None]                                  # (b, M, K, N)
        if looped:
            ga[s:e] = (gx2[pair] * g).sum(-1)
        if need[1]:
            gb[s:e] = (gw2[pair] * g).sum(1)
    return ga, gb


def _bmm_gather_grads(grad, ia, ib, tabs: LutTables, need: tuple[bool, bool]):
    """``(d/dqa, d/dqb)`` of the unmasked products by the layers' gradient gathers
    (:func:`appmult.nn.kernels.gather_grad_a`/``_b``: byte shuffles, numba or torch), all items
    in one call each, each item a group: the activation side ``ia`` as ``(1, B*K, M)``, the
    weight side ``ib`` as ``(B*N, K)``, ``grad`` as ``(1, B*N, M)`` (laid out once for both);
    a side whose ``need`` is false is ``None``."""
    bsz, m, k = ia.shape
    n = ib.shape[-1]
    a = ia.transpose(1, 2).reshape(1, bsz * k, m)
    b = ib.transpose(1, 2).reshape(bsz * n, k)
    g = grad.transpose(1, 2).reshape(1, bsz * n, m)
    ga = gb = None
    if need[0]:
        ga = K.gather_grad_a(a, b, tabs.gx2, g, bsz)[0].reshape(bsz, k, m).transpose(1, 2)
        ga = ga.to(device=grad.device, dtype=grad.dtype)
    if need[1]:
        gb = K.gather_grad_b(a, b, tabs.gw2, g, bsz).reshape(bsz, n, k).transpose(1, 2)
        gb = gb.to(device=grad.device, dtype=grad.dtype)
    return ga, gb


def lut_bmm(qa: torch.Tensor, qb: torch.Tensor, tabs: LutTables, *, keep: torch.Tensor | None = None,
            exact: bool = False) -> torch.Tensor:
    """``acc[b, m, n] = sum_k keep[b, m, k] * LUT[qa[b, m, k], qb[b, k, n]]``, with the LUT's backward.

    Args:
        qa: integer-valued ``(B, M, K)`` operands of the LUT's activation side.
        qb: integer-valued ``(B, K, N)`` operands of the other side.
        tabs: the LUT tables (their grad mode is the backward).
        keep: optional bool ``(B, M, K)``: products to accumulate (``None``: all).
        exact: accumulate exactly (float64 / integers).

    Returns:
        ``(B, M, N)`` accumulators (float32, or float64 when ``exact``), integer-valued.

    Raises:
        InvalidValueError: an operand outside the LUT's value range (or NaN), or bad shapes.
    """
    for t, name in ((qa, "qa"), (qb, "qb"), (keep, "keep")):
        if not isinstance(t, torch.Tensor) and not (name == "keep" and t is None):
            raise InvalidTypeError(f"lut_bmm {name} must be a torch.Tensor{' or None' if name == 'keep' else ''}, "
                                   f"not {type(t).__name__}")
    if keep is not None and keep.dtype != torch.bool:  # (an int or float keep was multiplied in)
        raise InvalidTypeError(f"lut_bmm keep must be a bool tensor (True: accumulate), not {keep.dtype}")
    if qa.dim() != 3 or qb.dim() != 3 or qa.shape[0] != qb.shape[0] or qa.shape[2] != qb.shape[1] \
            or (keep is not None and keep.shape != qa.shape):
        raise InvalidValueError(f"lut_bmm needs (B, M, K) and (B, K, N) operands (and keep like the first), got "
                                f"{tuple(qa.shape)} and {tuple(qb.shape)}")
    _check_codes(qa, qb.transpose(-1, -2), tabs, "lut_bmm")
    with _autocast_off(qa.device.type):
        return _LutBmmFn.apply(qa, qb, keep, tabs, exact)


class _LutBmmFn(torch.autograd.Function):
    """Batched ``sum_k keep * LUT[qa, qb]`` of integer-valued operands; the LUT's backward."""

    @staticmethod
    def forward(ctx, qa, qb, keep, tabs: LutTables, exact: bool):
        ctx.save_for_backward(qa, qb, keep)
        ctx.tabs = tabs
        return _bmm_forward(qa, qb, keep, tabs, exact)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        qa, qb, keep = ctx.saved_tensors
        ga, gb = _bmm_backward(grad.contiguous(), qa, qb, keep, ctx.tabs, ctx.needs_input_grad[:2])
        return _cast(ga, qa.dtype), _cast(gb, qb.dtype), None, None, None


def _dynamic_quant(x: torch.Tensor, width: int, signed: bool, what: str):
    """Per-tensor quantization from ``x``'s own range (the quantizers' min-max formulas).

    Raises:
        InvalidValueError: a scale that is not finite (``what`` names the operand): a range
            wider than the float type holds, or probabilities from scores that overflowed.
    """
    lo, hi = torch.aminmax(x.detach())
    s, z = _scale_zero_point(lo, hi, width, signed)
    if not bool(torch.isfinite(torch.stack([lo, hi, s.reshape(())])).all()):  # (NaN outputs, NaN codes as indices)
        if what == "probabilities":
            raise InvalidValueError("LutAttention: the attention scores are not finite (+inf or NaN): the "
                                    "query and key values, the scale or the mask overflow float arithmetic")
        raise InvalidValueError(f"LutAttention: the {what} range [{float(lo):g}, {float(hi):g}] is too wide to "
                                f"quantize (its scale is not finite in {x.dtype})")
    qmin, qmax = quant_range(width, signed)
    return _fake_quant(x, s, z, qmin, qmax), s, z


# ------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------

def _mask_terms(attn_mask, is_causal: bool, l: int, s: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(keep, bias)`` from an SDPA-style mask: ``keep`` a bool mask (True: take part) or
    ``None``; ``bias`` a float mask to add or ``None``."""
    keep = bias = None
    if is_causal:
        keep = torch.ones((l, s), dtype=torch.bool, device=device).tril()
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise InvalidTypeError(f"LutAttention attn_mask must be a torch.Tensor or None, not "
                                   f"{type(attn_mask).__name__}")
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        elif attn_mask.is_floating_point():
            bias = attn_mask
        else:
            raise InvalidTypeError(f"LutAttention attn_mask must be a bool or float tensor, not {attn_mask.dtype}")
    return keep, bias


# ------------------------------------------------------------------------------------------
# The attention products
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class AttentionOperands:
    """What the two products of one attention call multiply (integer values in float tensors).

    ``q``/``k`` and ``p``/``v`` are the quantized operands of QK^T and AV with their scales
    and zero points; shapes are ``(B, L, E)``, ``(B, S, E)``, ``(B, L, S)``, ``(B, S, Ev)``
    with the batch dimensions flattened into ``B``. ``keep`` ``(B, L, S)`` marks the keys
    each query attends to (``None``: all): the products of AV that are accumulated.
    """

    q: torch.Tensor
    scale_q: torch.Tensor
    zero_q: torch.Tensor
    k: torch.Tensor
    scale_k: torch.Tensor
    zero_k: torch.Tensor
    p: torch.Tensor
    scale_p: torch.Tensor
    zero_p: torch.Tensor
    v: torch.Tensor
    scale_v: torch.Tensor
    zero_v: torch.Tensor
    keep: torch.Tensor | None


class LutAttention(nn.Module):
    """Scaled dot-product attention whose products QK^T and AV go through a LUT.

    Call it like ``torch.nn.functional.scaled_dot_product_attention`` (boolean masks: True
    takes part; float masks are added to the scores). Submodule ``lut`` holds the tables as
    buffers. ``exact_multiplication`` multiplies exactly at the same quantization.

    Args:
        config: the approximation (LUT, grad mode, kernel, accumulation).

    Raises:
        InvalidTypeError: ``config`` is not an :class:`ApproxConfig`.
    """

    def __init__(self, config: ApproxConfig):
        super().__init__()
        if not isinstance(config, ApproxConfig):
            raise InvalidTypeError(f"LutAttention needs an ApproxConfig, not {type(config).__name__}")
        self.config = config
        self.lut = LutTables(config.load(), grad=config.grad, kernel=config.kernel,
                             activation_operand=config.activation_operand,
                             compute_missing_gradients=config.compute_missing_gradients,
                             half_window=config.half_window)
        #: Multiply exactly (same quantization) instead of through the LUT; see ``exact_``.
        self.exact_multiplication = False
        #: Number of attention calls computed (lets a caller check that a module's calls were routed here).
        self.calls = 0

    def _product(self, qa, za, qb, zb, keep, dt) -> torch.Tensor:
        """Integer accumulator (zero-point cross terms included) of ``(qa - za) @ (qb - zb)``
        through the LUT, over the kept ``k`` only."""
        exact = self.config.exact_accumulate
        dt = torch.float64 if exact else dt
        if self.exact_multiplication:
            a = (qa.to(dt) - za)
            if keep is not None:
                a = a * keep.to(dt)
            return a @ (qb.to(dt) - zb)
        tabs = self.lut
        acc = _LutBmmFn.apply(qa, qb, keep, tabs, exact).to(dt)
        if not tabs.signed:
            qa_, qb_ = qa.to(dt), qb.to(dt)
            if keep is None:
                sum_a, sum_b, count = qa_.sum(-1, keepdim=True), qb_.sum(-2, keepdim=True), qa.shape[-1]
            else:
                kf = keep.to(dt)
                sum_a, sum_b, count = (qa_ * kf).sum(-1, keepdim=True), kf @ qb_, kf.sum(-1, keepdim=True)
            acc = acc - sum_a * zb - za * sum_b + count * za * zb
        return acc

    def _prepare(self, q, k, v):
        for t, what in ((q, "query"), (k, "key"), (v, "value")):
            if not isinstance(t, torch.Tensor):
                raise InvalidTypeError(f"LutAttention {what} must be a torch.Tensor, not {type(t).__name__}")
            if t.dim() < 2:
                raise InvalidValueError(f"LutAttention {what} must have at least 2 dimensions (..., length, "
                                        f"features), got shape {tuple(t.shape)}")
        if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
            raise InvalidValueError(f"LutAttention shapes do not match: query {tuple(q.shape)}, key {tuple(k.shape)}, "
                                    f"value {tuple(v.shape)}")
        ct = torch.promote_types(torch.promote_types(q.dtype, torch.float32), torch.promote_types(k.dtype, v.dtype))
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        for t in (q, k, v):
            check_finite(t, "LutAttention")
        return q, k, v, ct

    def _run(self, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
             enable_gqa: bool = False):
        """``(out, probabilities, operands)``; ``out`` is ``(*batch, L, Ev)``."""
        out_dtype = q.dtype
        q, k, v, ct = self._prepare(q, k, v)
        if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        l, e = q.shape[-2:]
        s, ev = k.shape[-2], v.shape[-1]
        try:
            batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        except RuntimeError:
            raise InvalidValueError(f"LutAttention batch dimensions do not broadcast: query {tuple(q.shape)}, "
                                    f"key {tuple(k.shape)}, value {tuple(v.shape)}") from None
        keep, bias = _mask_terms(attn_mask, is_causal, l, s, q.device)
        if bias is not None:  # finfo.min: the libraries' -inf (see the module docstring)
            bias = bias.masked_fill(bias == torch.finfo(bias.dtype).min, float("-inf"))
        tabs = self.lut
        qq, sq, zq = _dynamic_quant(q, tabs.width_x, tabs.signed, "query")
        qk, sk, zk = _dynamic_quant(k, tabs.width_w, tabs.signed, "key")
        qq3 = qq.expand(*batch, l, e).reshape(-1, l, e)
        qk3 = qk.expand(*batch, s, e).reshape(-1, s, e)
        acc = self._product(qq3, zq, qk3.transpose(-1, -2), zk, None, ct)
        sc = (1.0 / math.sqrt(e)) if scale is None else float(scale)
        scores = ((sq * sk) * acc).to(ct).reshape(*batch, l, s) * sc
        if bias is not None:
            scores = scores + bias.to(ct)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        taken = None
        if keep is not None or bias is not None:
            taken = scores != float("-inf")
            rows = taken.any(-1, keepdim=True)
            # A fully masked row attends to nothing: zeros, not the NaN of softmax(-inf...).
            scores = scores.masked_fill(~rows, 0.0)
        p = torch.softmax(scores, dim=-1)
        if taken is not None:
            p = p.masked_fill(~taken, 0.0)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p, training=True)
        qp, sp, zp = _dynamic_quant(p, tabs.width_x, tabs.signed, "probabilities")
        qv, sv, zv = _dynamic_quant(v, tabs.width_w, tabs.signed, "value")
        qv3 = qv.expand(*batch, s, ev).reshape(-1, s, ev)
        keep3 = None if taken is None else taken.expand(*batch, l, s).reshape(-1, l, s)
        acc2 = self._product(qp.reshape(-1, l, s), zp, qv3, zv, keep3, ct)
        out = ((sp * sv) * acc2).to(ct).reshape(*batch, l, ev)
        ops = AttentionOperands(qq3, sq, zq, qk3, sk, zk, qp.reshape(-1, l, s), sp, zp, qv3, sv, zv, keep3)
        self.calls += 1
        return out.to(out_dtype), p, ops

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        """Attention output ``(..., L, Ev)`` (arguments as
        ``torch.nn.functional.scaled_dot_product_attention``)."""
        with _autocast_off(query.device.type if isinstance(query, torch.Tensor) else "cpu"):
            return self._run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]

    @torch.no_grad()
    def operands(self, query, key, value, attn_mask=None, is_causal: bool = False, scale=None
                 ) -> AttentionOperands:
        """The quantized operands of both products (no dropout, no gradient).

        Returns:
            :class:`AttentionOperands`; :meth:`int_scores` and :meth:`int_context` sum them.
        """
        with _autocast_off(query.device.type):
            return self._run(query, key, value, attn_mask, 0.0, is_causal, scale)[2]

    @torch.no_grad()
    def int_scores(self, ops: AttentionOperands) -> torch.Tensor:
        """Raw integer accumulators of QK^T, ``sum_e LUT[q, k]`` (int64 ``(B, L, S)``, bit-exact).

        No zero-point cross terms, scales or masks: what a MAC array built from the
        multiplier accumulates for each score.
        """
        return _bmm_forward(ops.q, ops.k.transpose(-1, -2), None, self.lut, True).to(torch.int64)

    @torch.no_grad()
    def int_context(self, ops: AttentionOperands) -> torch.Tensor:
        """Raw integer accumulators of AV over the kept keys, ``sum_s LUT[p, v]`` (int64 ``(B, L, Ev)``)."""
        return _bmm_forward(ops.p, ops.v, ops.keep, self.lut, True).to(torch.int64)

    def extra_repr(self) -> str:
        mode = "exact multiplication" if self.exact_multiplication else self.lut.describe()
        acc = "exact" if self.config.exact_accumulate else "fp32"
        return f"{mode}, accumulate={acc}, operands=dynamic per tensor"


def _float_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """Float attention with :class:`LutAttention`'s mask semantics; ``(out, probabilities)``."""
    l, e = q.shape[-2:]
    s = k.shape[-2]
    keep, bias = _mask_terms(attn_mask, is_causal, l, s, q.device)
    sc = (1.0 / math.sqrt(e)) if scale is None else float(scale)
    scores = (q @ k.transpose(-1, -2)) * sc
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    taken = None
    if keep is not None or bias is not None:
        taken = scores != float("-inf")
        scores = scores.masked_fill(~taken.any(-1, keepdim=True), 0.0)
    p = torch.softmax(scores, dim=-1)
    if taken is not None:
        p = p.masked_fill(~taken, 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ v, p


# ------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ------------------------------------------------------------------------------------------

class ApproxMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with approximate projections and/or attention products.

    Not a subclass of ``nn.MultiheadAttention``: its packed ``in_proj_weight`` becomes
    three projection layers (``q_proj``, ``k_proj``, ``v_proj``: ``ApproxLinear`` when
    ``"projections"`` is in ``config.parts``, else ``nn.Linear``), so each is quantized and
    multiplied like every other approximate layer; ``attention`` is a :class:`LutAttention`
    (``None`` when ``"attention"`` is not in ``config.parts``: float attention). Same
    forward signature and mask conventions as ``nn.MultiheadAttention`` (boolean masks:
    True means *not allowed*). ``add_bias_kv`` and ``add_zero_attn`` are not supported.

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first: as
            ``nn.MultiheadAttention``.
        config: the approximation.
        device, dtype: parameter device and dtype.
    """

    #: ``nn.TransformerEncoderLayer``'s inference fast path reads the packed float weights
    #: (it would bypass the LUT); a ``None`` ``in_proj_bias`` is one of its exit conditions.
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, *,
                 config: ApproxConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ApproxConfig):
            raise InvalidTypeError(f"ApproxMultiheadAttention needs an ApproxConfig, not {type(config).__name__}")
        if embed_dim % num_heads:
            raise InvalidValueError(f"ApproxMultiheadAttention embed_dim {embed_dim} is not divisible by "
                                    f"num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.config = float(dropout), bool(batch_first), config
        kw = dict(device=device, dtype=dtype)

        def linear(n_in: int, n_out: int) -> nn.Module:
            if "projections" in config.parts:
                return ApproxLinear(n_in, n_out, bias, config=config, **kw)
            return nn.Linear(n_in, n_out, bias, **kw)

        self.q_proj = linear(embed_dim, embed_dim)
        self.k_proj = linear(self.kdim, embed_dim)
        self.v_proj = linear(self.vdim, embed_dim)
        self.out_proj = linear(embed_dim, embed_dim)
        self.attention = LutAttention(config) if "attention" in config.parts else None
        if self.attention is not None and device is not None:
            self.attention.to(device)

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, config: ApproxConfig) -> "ApproxMultiheadAttention":
        """An approximate copy of a trained ``nn.MultiheadAttention`` (weights and biases copied).

        Raises:
            InvalidTypeError: not an ``nn.MultiheadAttention``.
            ConfigError: ``add_bias_kv`` or ``add_zero_attn`` (not supported).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise InvalidTypeError(f"ApproxMultiheadAttention.from_float needs an nn.MultiheadAttention, not "
                                   f"{type(module).__name__}")
        reason = _mha_unsupported(module)
        if reason:
            raise ConfigError(f"ApproxMultiheadAttention.from_float: {reason}")
        w = module.out_proj.weight
        new = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                  module.kdim, module.vdim, module.batch_first, config=config, device=w.device, dtype=w.dtype)
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            ws = module.in_proj_weight.split(e, 0)
        else:
            ws = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        bs = module.in_proj_bias.split(e, 0) if module.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for lin, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
                lin.weight.copy_(wt)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.train(module.training)
        return new

    def _sdpa_mask(self, key_padding_mask, attn_mask, n: int, l: int, s: int, dtype):
        """nn.MultiheadAttention's masks (True: not allowed; float: added) as one SDPA-style mask."""
        allowed = additive = None
        h = self.num_heads
        if attn_mask is not None:
            m = attn_mask.reshape(n, h, l, s) if attn_mask.dim() == 3 else attn_mask.reshape(1, 1, l, s)
            if m.dtype == torch.bool:
                allowed = ~m
            else:
                additive = m.to(dtype)
        if key_padding_mask is not None:
            m = key_padding_mask.reshape(n, 1, 1, s)
            if m.dtype == torch.bool:
                allowed = ~m if allowed is None else allowed & ~m
            else:
                additive = m.to(dtype) if additive is None else additive + m.to(dtype)
        if additive is None:
            return allowed
        return additive if allowed is None else additive.masked_fill(~allowed, float("-inf"))

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> None:
        """nn.MultiheadAttention's shape and dtype rules, before any reshape (a mask or key of a
        wrong but same-sized shape used to be reinterpreted element by element)."""
        what = "ApproxMultiheadAttention"
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            if not isinstance(t, torch.Tensor):
                raise InvalidTypeError(f"{what} {name} must be a torch.Tensor, not {type(t).__name__}")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise InvalidValueError(f"{what} needs query, key and value all 3-D (batched) or all 2-D (unbatched), "
                                    f"got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
        for t, name, e in ((query, "query", self.embed_dim), (key, "key", self.kdim), (value, "value", self.vdim)):
            if t.shape[-1] != e:
                raise InvalidValueError(f"{what} {name} has {t.shape[-1]} features, expected {e}: shape "
                                        f"{tuple(t.shape)}")
        batched = query.dim() == 3
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        if key.shape[:-1] != value.shape[:-1] or (batched and key.shape[self._batch_dim] != query.shape[self._batch_dim]):
            raise InvalidValueError(f"{what} query, key and value do not match (each {layout if batched else '(L, E)'}"
                                    f", key and value of one length): {tuple(query.shape)}, {tuple(key.shape)}, "
                                    f"{tuple(value.shape)}")
        n = query.shape[self._batch_dim] if batched else 1
        l, s = query.shape[-3 + (self.batch_first or not batched)] if batched else query.shape[0], \
            key.shape[self._length_dim] if batched else key.shape[0]
        if key_padding_mask is not None:
            want = (n, s) if batched else (s,)
            self._check_mask(key_padding_mask, "key_padding_mask", [want])
        if attn_mask is not None:
            self._check_mask(attn_mask, "attn_mask", [(l, s), (n * self.num_heads, l, s)])

    @property
    def _batch_dim(self) -> int:
        return 0 if self.batch_first else 1

    @property
    def _length_dim(self) -> int:
        return 1 if self.batch_first else 0

    @staticmethod
    def _check_mask(mask, name: str, shapes: list[tuple[int, ...]]) -> None:
        what = "ApproxMultiheadAttention"
        if not isinstance(mask, torch.Tensor):
            raise InvalidTypeError(f"{what} {name} must be a torch.Tensor or None, not {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():  # (integer masks were added as +1)
            raise InvalidTypeError(f"{what} {name} must be a bool or float tensor, not {mask.dtype}")
        if tuple(mask.shape) not in shapes:
            raise InvalidValueError(f"{what} {name} must have shape {' or '.join(map(str, shapes))}, got "
                                    f"{tuple(mask.shape)}")

    def _heads(self, query, key, value, key_padding_mask, attn_mask):
        """Projected ``(N, H, L, D)`` heads and the SDPA-style mask; ``unbatched``."""
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, l, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim

        def heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.reshape(n, length, h, d).transpose(1, 2)

        q, k, v = heads(self.q_proj(query), l), heads(self.k_proj(key), s), heads(self.v_proj(value), s)
        return q, k, v, self._sdpa_mask(key_padding_mask, attn_mask, n, l, s, q.dtype), unbatched

    @torch.no_grad()
    def operands(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal: bool = False
                 ) -> AttentionOperands:
        """The quantized operands of QK^T and AV (heads flattened into the batch: ``B = N * H``).

        Raises:
            InvalidValueError: the attention products are not approximate (``config.parts``).
        """
        if self.attention is None:
            raise InvalidValueError("ApproxMultiheadAttention.operands needs 'attention' in ApproxConfig.parts")
        q, k, v, mask, _ = self._heads(query, key, value, key_padding_mask, attn_mask)
        return self.attention.operands(q, k, v, mask, is_causal)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """As ``nn.MultiheadAttention.forward``: ``(output, weights or None)``."""
        q, k, v, mask, unbatched = self._heads(query, key, value, key_padding_mask, attn_mask)
        n, _, l, _ = q.shape
        p_drop = self.dropout if self.training else 0.0
        if self.attention is not None:
            with _autocast_off(q.device.type):
                out, p, _ = self.attention._run(q, k, v, mask, p_drop, is_causal)
        else:
            out, p = _float_attention(q, k, v, mask, p_drop, is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, l, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        w = p.mean(1) if average_attn_weights else p
        return out, (w.squeeze(0) if unbatched else w)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"parts={'+'.join(self.config.parts)}")


def _mha_unsupported(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None:
        return "add_bias_kv is not supported"
    if module.add_zero_attn:
        return "add_zero_attn is not supported"
    return None


# ------------------------------------------------------------------------------------------
# Routing torch.nn.functional.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------

_route = threading.local()
_route_lock = threading.Lock()
_route_users = 0
_original_sdpa = None


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    stack = getattr(_route, "stack", None)
    if not stack:
        # another thread routes its calls; this one keeps torch's function
        return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    return stack[-1](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def lut_sdpa(attention: LutAttention) -> Iterator[LutAttention]:
    """Context manager: ``torch.nn.functional.scaled_dot_product_attention`` calls made in this
    thread inside the block are computed by ``attention``.

    Calls that look the function up on ``torch.nn.functional`` at call time are routed
    (``F.scaled_dot_product_attention(...)``, and ``nn.MultiheadAttention``'s own call);
    a name bound earlier with ``from torch.nn.functional import scaled_dot_product_attention``
    is not. Other threads keep torch's function. Nested blocks route to the innermost.

    Raises:
        InvalidTypeError: ``attention`` is not a :class:`LutAttention`.
    """
    global _route_users, _original_sdpa
    if not isinstance(attention, LutAttention):
        raise InvalidTypeError(f"lut_sdpa needs a LutAttention, not {type(attention).__name__}")
    with _route_lock:
        if _route_users == 0:
            _original_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed_sdpa
        _route_users += 1
    stack = _route.__dict__.setdefault("stack", [])
    stack.append(attention)
    try:
        yield attention
    finally:
        stack.pop()
        with _route_lock:
            _route_users -= 1
            if _route_users == 0:
                F.scaled_dot_product_attention = _original_sdpa


#: Name of the :class:`LutAttention` child that :func:`approximate_` adds to a module calling SDPA.
SDPA_CHILD = "sdpa_lut"


def _enter_route(module: nn.Module, args) -> None:
    cm = lut_sdpa(module._modules[SDPA_CHILD])
    module.__dict__.setdefault("_sdpa_routes", []).append((cm, module._modules[SDPA_CHILD].calls))
    cm.__enter__()


def _leave_route(module: nn.Module, args, output) -> None:
    cm, calls = module.__dict__["_sdpa_routes"].pop()
    cm.__exit__(None, None, None)
    if output is not None and module._modules[SDPA_CHILD].calls == calls:
        raise InvalidValueError(
            f"{type(module).__name__} made no call to torch.nn.functional.scaled_dot_product_attention that "
            f"appmult could route through the LUT (a name imported with 'from torch.nn.functional import "
            f"scaled_dot_product_attention' is bound before routing): call F.scaled_dot_product_attention")


def _calls_sdpa(module: nn.Module) -> bool:
    return _forward_calls_sdpa(type(module))


@functools.lru_cache(maxsize=None)
def _forward_calls_sdpa(cls: type) -> bool:
    """Whether ``cls.forward``'s source names scaled_dot_product_attention (no source: no)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in src


def _route_sdpa(module: nn.Module, config: ApproxConfig) -> None:
    module.add_module(SDPA_CHILD, LutAttention(config))
    p = next(module.parameters(), None)
    if p is not None:
        module._modules[SDPA_CHILD].to(p.device)
    module.register_forward_pre_hook(_enter_route)
    module.register_forward_hook(_leave_route, always_call=True)


def _is_attention(module: nn.Module) -> bool:
    """Whether ``approximate_`` treats ``module`` as an attention module."""
    return isinstance(module, (nn.MultiheadAttention, ApproxMultiheadAttention, LutAttention)) \
        or SDPA_CHILD in module._modules or _calls_sdpa(module) or "attention" in type(module).__name__.lower()


def _attention_conversion(module: nn.Module, config: ApproxConfig, name: str) -> Callable[[], nn.Module] | None:
    """How to convert an attention module: a function that does it and returns the module to
    put in its place (``module`` itself where converted in place), or ``None`` when
    ``module`` is not an attention module. Every check runs here, before anything changes.

    Raises:
        ConfigError: an attention module whose products cannot be approximated.
    """
    if isinstance(module, (ApproxMultiheadAttention, LutAttention)) or SDPA_CHILD in module._modules:
        return lambda: module  # already converted
    parts = config.parts
    cls = type(module).__name__
    where = f"approximate_: cannot approximate the attention of {name or '<root>'!r} ({cls}): "
    hint = "; leave its attention exact with ApproxConfig(parts=('projections', 'mlp')) or skip it with filter_fn"
    if type(module) is nn.MultiheadAttention:
        if "attention" not in parts and "projections" not in parts:
            return lambda: module
        reason = _mha_unsupported(module)
        if reason:  # (its projections too: they live in the packed module, which stays float)
            raise ConfigError(where + reason + " (its projections cannot be approximated either); leave the "
                              "whole module exact with ApproxConfig(parts=('mlp',)) or skip it with filter_fn")
        new = ApproxMultiheadAttention.from_float(module, config)  # (the float module is not changed)
        return lambda: new
    sdpa = _calls_sdpa(module)
    if not sdpa and not isinstance(module, nn.MultiheadAttention) and "attention" not in cls.lower():
        return None
    if "attention" in parts and not sdpa:
        raise ConfigError(where + "it is neither a torch.nn.MultiheadAttention nor a module whose forward calls "
                          "torch.nn.functional.scaled_dot_product_attention" + hint)

    def in_place() -> nn.Module:
        if "projections" in parts:
            _convert_projections(module, config)
        if "attention" in parts:
            _route_sdpa(module, config)
        return module
    return in_place


def _convert_projections(module: nn.Module, config: ApproxConfig) -> None:
    """Every ``nn.Linear`` below an attention module becomes an ``ApproxLinear`` (in place)."""
    for child_name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, child_name, ApproxLinear.from_float(child, config))
        elif not isinstance(child, (LutAttention, ApproxLinear)):
            _convert_projections(child, config)


def attention_modules(model: nn.Module) -> Iterator[tuple[str, LutAttention]]:
    """``(name, module)`` for every :class:`LutAttention` of ``model`` (the approximate attention products)."""
    for name, m in model.named_modules():
        if isinstance(m, LutAttention):
            yield name, m
