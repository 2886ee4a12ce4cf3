"""Fused fast paths: a quantized layer's whole integer accumulator in one pass.

A quantized layer computes ``sum_k LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` over each
receptive field of ``qx`` padded with the activation zero point. The plain path (in
:mod:`appmult.nn.functional`) pads, runs the LUT kernel and adds the cross terms as
separate tensors; the paths here fold the cross terms and the padding into one kernel:

* low-rank LUTs: the cross terms fold into the low-rank weights and a bias
  (:func:`_folded_lowrank_weights`), so one float32 convolution (or ``addmm``) yields the
  accumulator; for a rank-1 LUT with ``U = value(x)`` that convolution runs on ``qx - Zx``
  itself, zero-padded by the convolution (:func:`_rank1_shifted_conv`);
* gather LUTs: the numba row kernel with the cross terms folded into its expanded rows
  (:func:`_gather_conv_zp`); for linear layers the numba weight-row kernel on a 16-bit
  table, its accumulators initialized with the cross terms (:func:`_gather_linear_zp`).

Each helper returns ``None`` (``False`` for :func:`_rank1_prep`) where its path would
not be bit-exact or does not apply -- non-integer zero points, zero points with
gradients, float32 partial sums that could reach ``2**24`` -- and the caller takes the
plain path. The autograd functions that carry these accumulators are in
:mod:`appmult.nn.autograd`; the switches that turn the paths off are in
:mod:`appmult.nn.functional`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels as K
from .tables import LutTables, _idx, _idx32


def _folded_lowrank_weights(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables, *,
                            split_k: bool = False):
    """Low-rank weights with the zero-point cross terms folded in, or ``None``.

    ``sum_k LUT[x, w] - x Zw - Zx w + Zx Zw = sum_k sum_r U[x, r] (V[w, r] - c_r Zw) + C_j``
    with ``U c = value(x)`` and ``C_j = -Zx sum_k (w_jk - Zw_j)``: one convolution with
    bias ``C`` yields the whole integer accumulator. Returned only when every partial sum
    of that convolution is an integer below ``2**24`` (so float32 is exact whatever the
    summation order); otherwise the caller takes the unfused path.

    With ``split_k`` (the linear layer), a reduction too long for one exact float32 GEMM is
    cut into chunks of ``kc`` inputs whose partial sums stay below ``2**24``: each chunk's
    float32 GEMM is exact, and the chunks and ``C`` are added in float64 (exact below
    ``2**53``).

    Returns:
        ``(weights (Co, Cg*r, kh, kw) float32 channels-last, bias (Co,) float32)`` -- with
        ``split_k``, ``(weights, bias, kc)``: a float32 bias where one float32 GEMM plus
        the bias is exact (``kc == Cg*kh*kw``), else a float64 one, the chunked sum's start
        (``kc`` may then equal ``Cg*kh*kw`` too) -- or ``None``.
    """
    if tabs.u is None or (not tabs.signed and tabs.value_coef is None):
        return None
    if zx.requires_grad or zw.requires_grad:
        return None
    co, cg, kh, kw = qw.shape
    k = cg * kh * kw
    r = tabs.u.shape[1]
    zwv = zw.detach().to(torch.float64).reshape(-1).cpu().numpy()
    zwv = np.full(co, zwv[0]) if zwv.size == 1 else zwv
    zxf = float(zx)
    if zwv.size != co or zxf != round(zxf) or not np.array_equal(zwv, np.round(zwv)):
        return None  # integer zero points only (what the quantizers produce)
    coef = np.zeros(r) if tabs.signed else np.asarray(tabs.value_coef, np.float64)
    shift = coef[None, :] * zwv[:, None]                                   # (Co, r)
    vabs = np.maximum(np.abs(tabs._v_max[None] - shift), np.abs(tabs._v_min[None] - shift))
    step = (vabs * tabs._u_absmax[None]).sum(1)                           # (Co,) bound of one k
    q64 = qw.detach().to(torch.float64).reshape(co, k)
    zw_t = torch.as_tensor(np.ascontiguousarray(zwv), dtype=torch.float64, device=qw.device)
    # exact in float64; signed LUTs carry no cross terms (as in the unfused path)
    const = torch.zeros(co, dtype=torch.float64, device=qw.device) if tabs.signed else \
        -zxf * (q64 - zw_t[:, None]).sum(1)
    kc, split = k, False
    if float((k * step).max()) + float(const.abs().max()) >= K.FP32_EXACT_LIMIT:
        if not split_k or float(step.max()) * 2 >= K.FP32_EXACT_LIMIT \
                or float(const.abs().max()) + float((k * step).max()) >= K.FP64_EXACT_LIMIT:
            return None
        # kc * step < 2**24, 2 <= kc <= k; kc == k when C alone breaks the limit: one
        # exact float32 GEMM, C added in float64 all the same
        kc, split = min(k, int((K.FP32_EXACT_LIMIT - 1) // float(step.max()))), True
    vmax = max(float(np.abs(tabs._v_max).max()), float(np.abs(tabs._v_min).max()))
    if vmax + float(np.abs(shift).max(initial=0.0)) < K.FP32_EXACT_LIMIT:
        # every value and shift is an integer below 2**24: float32 is exact; shift only the
        # columns with c_r != 0 (usually just the exact-product column)
        wv = F.embedding(_idx32(qw, tabs.lo_w), tabs.v_f32)                # (Co, Cg, kh, kw, r) f32
        zw32 = zw_t.to(torch.float32).reshape(co, 1, 1, 1)
        for rr in np.nonzero(coef)[0]:
            wv[..., int(rr)] -= float(coef[rr]) * zw32
    else:
        wv = F.embedding(_idx32(qw, tabs.lo_w), tabs.v)                    # float64
        wv = wv - torch.as_tensor(coef, dtype=torch.float64, device=qw.device) * zw_t.reshape(co, 1, 1, 1, 1)
    wv = wv.permute(0, 1, 4, 2, 3).reshape(co, cg * r, kh, kw).to(torch.float32)
    if split_k:
        # the bias of one float32 addmm, or the float64 start of the chunked sum
        return wv.contiguous(memory_format=torch.channels_last), const if split else const.to(torch.float32), kc
    return wv.contiguous(memory_format=torch.channels_last), const.to(torch.float32)


def _rank1_shifted_conv(qx, zx, wv, const, tabs: LutTables, padding, stride, dilation, groups, prep=None):
    """Rank-1 ``U = value(x)`` accumulator as an ordinary zero-padded conv of ``qx - Zx``, or ``None``.

    ``sum_k qx_k wv_k + C = sum_k (qx_k - Zx) wv_k + (C + Zx sum_k wv_k)``; padded positions
    hold ``Zx``, i.e. 0 after the shift, so the convolution pads by itself (no padded copy)
    in the activations' own layout (no layout conversion inside oneDNN), and with
    ``Zx = 0`` (ReLU inputs, symmetric layers) ``qx`` is used as is. Taken only when every
    partial sum is an integer below ``2**24`` (float32 exact in any order). Computed on
    detached operands: the caller attaches the LUT's backward.
    """
    q = qx.detach()
    if q.dtype != torch.float32 or q.dim() != 4:
        return None
    prep = _rank1_prep(zx, wv, const, tabs) if prep is None else prep
    if prep is False:
        return None
    wc, bias = prep
    zxf = float(zx)
    xs = q if zxf == 0.0 else q - zxf
    return F.conv2d(xs, wc, bias, stride, padding, dilation, groups)


def _rank1_prep(zx, wv, const, tabs: LutTables):
    """Weights and bias of :func:`_rank1_shifted_conv` (``False`` when not exact in float32)."""
    zxf = float(zx)
    wc = wv.contiguous()
    w64 = wc.to(torch.float64)
    bias = const.to(torch.float64) + zxf * w64.sum((1, 2, 3))
    xmax = max(abs(tabs.lo_x - zxf), abs(tabs.lo_x + tabs.prod.shape[0] - 1 - zxf))
    if float((w64.abs().sum((1, 2, 3)) * xmax + bias.abs()).max()) >= K.FP32_EXACT_LIMIT:
        return False
    return wc, bias.to(torch.float32)


def _gather_conv_zp(qx, qw, zx, zw, tabs: LutTables, padding, stride, dilation, groups, out_dtype=torch.int32):
    """Accumulator with cross terms from the numba row kernel (int32, returned as ``out_dtype``),
    or ``None`` (not applicable: see :func:`appmult.nn.kernels.gather_conv_zp`)."""
    if zx.requires_grad or zw.requires_grad or qx.dtype != torch.float32:
        return None
    co = qw.shape[0]
    zxf = float(zx)
    if zxf != round(zxf) or not torch.equal(zw.detach(), torch.round(zw.detach())):
        return None  # integer zero points only (what the quantizers produce)
    zpad = int(round(zxf))  # padding inserts the activation zero point, signed or not
    if tabs.signed:
        zxi, zwv = 0, None  # no cross terms for signed LUTs (as in the unfused path)
    else:
        zxi = zpad
        zwv = zw.detach().reshape(-1).to(torch.int64).cpu().numpy()
        if zwv.size not in (1, co):
            return None
    iw = _idx(qw, tabs.lo_w).reshape(co, -1)
    return K.gather_conv_zp(qx.detach(), tabs.lo_x, iw, tabs.lo_w, tabs.prod, groups, tuple(qw.shape[2:]),
                            padding, stride, dilation, zxi, zwv, out_dtype, pad_value=zpad)


def _gather_linear_prep(qw, zx, zw, tabs: LutTables):
    """Weight side of :func:`_gather_linear_zp` (cacheable per weight and ``zx``), or ``False``."""
    if zx.requires_grad or zw.requires_grad:
        return False
    zxf = float(zx)
    if zxf != round(zxf) or not torch.equal(zw.detach(), torch.round(zw.detach())):
        return False  # integer zero points only (what the quantizers produce)
    n = qw.shape[0]
    if tabs.signed:
        zxi, zwv = 0, None  # no cross terms for signed LUTs (as in the unfused path)
    else:
        zxi = int(round(zxf))
        zwv = zw.detach().reshape(-1).to(torch.int64).cpu().numpy()
        if zwv.size not in (1, n):
            return False
    prep = K.gather_linear_prep(_idx(qw, tabs.lo_w), tabs.lo_w, tabs.prod, tabs.lo_x, zxi, zwv)
    return False if prep is None else prep


def _gather_linear_zp(qx, prep, tabs: LutTables):
    """``(M, N)`` int32 accumulator with cross terms from the numba weight-row kernel, or
    ``None`` (``prep`` is ``False``: see :func:`appmult.nn.kernels.gather_linear_prep`)."""
    if prep is False or qx.dim() != 2 or qx.device.type != "cpu" or not qx.dtype.is_floating_point:
        return None
    return K.gather_linear_zp(qx, tabs.lo_x, prep)
