"""Fused fast paths: a quantized layer's whole integer accumulator in one pass.

A quantized layer computes ``sum_k LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` over each
receptive field of ``qx`` padded with the activation zero point. The plain path (in
:mod:`appmult.nn.functional`) pads, runs the LUT kernel and adds the cross terms as
separate tensors; the paths here fold the cross terms and the padding into one kernel:

* low-rank LUTs: the cross terms fold into the low-rank weights and a bias
  (:func:`_folded_lowrank_weights`), so one float32 convolution (or ``addmm``) yields the
  accumulator; for a rank-1 LUT with ``U = value(x)`` that convolution runs on ``qx - Zx``
  itself, zero-padded by the convolution (:func:`_rank1_shifted_conv`); for a rank-1 LUT
  whose ``U`` is a look-up (DRUM), which has no fold, on ``U[x] - U[Zx]`` with the
  ``-Zw_j S`` cross term from the activations' window sums (:func:`_rank1_mapped_conv`);
* linear layers over low-rank LUTs with small integer factors (on the CPU): the same
  accumulator as one exact int8 GEMM (``torch._int_mm``, int32 sums) over base-256 digit
  planes of the folded weights (:func:`_int8_linear_prep`), also where no fold exists
  (:func:`_int8_unfolded_prep`: the ``-Zw sum x`` cross term is added per call);
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

from . import exact_conv, fold_loops
from . import quant_loops
from . import int8_loops as loops
from . import kernels as K
from .tables import LutTables, _idx, _idx32, _map_channels, lookup_rows


def _integer_zero_points(zx: torch.Tensor, zw: torch.Tensor, n: int) -> tuple[float, np.ndarray] | None:
    """``(Zx, Zw per output)`` -- a float and ``n`` float64 values (a copy) -- where both are
    integers and ``zw`` holds one value or ``n``; ``None`` otherwise (the fused paths take
    integer zero points only, what the quantizers produce)."""
    z = zw.detach()
    if z.device.type == "cpu" and z.dtype == torch.float32:
        zwv = z.numpy().reshape(-1).astype(np.float64)  # (a new array: one call instead of four)
    else:
        zwv = z.to(torch.float64).reshape(-1).cpu().numpy().copy()
    zxf = float(zx)
    # (np.rint: the same integers as np.round's, a plain ufunc: 2 us instead of 5 for 512)
    if zwv.size not in (1, n) or zxf != round(zxf) or not np.array_equal(zwv, np.rint(zwv)):
        return None
    return zxf, (np.full(n, zwv[0]) if zwv.size == 1 else zwv)


def _folded_lowrank_weights(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables, *,
                            split_k: bool = False, chunks: bool = False):
    """Low-rank weights with the zero-point cross terms folded in, or ``None``.

    ``sum_k LUT[x, w] - x Zw - Zx w + Zx Zw = sum_k sum_r U[x, r] (V[w, r] - c_r Zw) + C_j``
    with ``U c = value(x)`` and ``C_j = -Zx sum_k (w_jk - Zw_j)``: one convolution with
    bias ``C`` yields the whole integer accumulator. Returned only when every partial sum
    of that convolution is an integer below ``2**24`` (so float32 is exact whatever the
    summation order) -- by the worst case over all weights, or else (a conv too long for
    it, e.g. ``K = 64 * 3 * 3``) by these weights' own bound (:func:`_within_fp32`);
    otherwise the caller takes the unfused path.

    With ``split_k`` (the linear layer), a reduction too long for one exact float32 GEMM is
    cut into chunks of ``kc`` inputs whose partial sums stay below ``2**24``: each chunk's
    float32 GEMM is exact, and the chunks and ``C`` are added in float64 (exact below
    ``2**53``). With ``chunks`` (a convolution), one too long for one exact float32
    convolution even by its weights' own bound is cut along its input channels the same way
    (:func:`_channel_runs`; :func:`_chunked_lowrank_conv` runs it).

    Returns:
        ``(weights (Co, Cg*r, kh, kw) float32 channels-last, bias (Co,) float32)`` -- with
        ``split_k``, ``(weights, bias, kc)``: a float32 bias where one float32 GEMM plus
        the bias is exact (``kc == Cg*kh*kw``), else a float64 one, the chunked sum's start
        (``kc`` may then equal ``Cg*kh*kw`` too); with ``chunks``, where the convolution is
        cut, ``(weights (G Co, Cg*r/G, kh, kw) float32 -- the runs as groups --,
        bias (Co,) float64, G)`` -- or ``None``.
    """
    if tabs.u is None or (not tabs.signed and tabs.value_coef is None):
        return None
    if zx.requires_grad or zw.requires_grad:
        return None
    co, cg, kh, kw = qw.shape
    k = cg * kh * kw
    r = tabs.u.shape[1]
    zp = _integer_zero_points(zx, zw, co)
    if zp is None:
        return None
    zxf, zwv = zp
    coef = np.zeros(r) if tabs.signed else np.asarray(tabs.value_coef, np.float64)
    shift = coef[None, :] * zwv[:, None]                                   # (Co, r)
    vabs = np.maximum(np.abs(tabs._v_max[None] - shift), np.abs(tabs._v_min[None] - shift))
    step = (vabs * tabs._u_absmax[None]).sum(1)                           # (Co,) bound of one k
    zw_t = torch.as_tensor(np.ascontiguousarray(zwv), dtype=torch.float64, device=qw.device)
    # exact in float64 (integer sums; sum_k (w - Zw) as sum_k w - k Zw: no float64 copy of
    # the weights); signed LUTs carry no cross terms (as in the unfused path)
    const = torch.zeros(co, dtype=torch.float64, device=qw.device) if tabs.signed else \
        -zxf * (_exact_row_sums(qw.detach().reshape(co, k), _code_bound(tabs)) - k * zw_t)
    kc, split, by_weights = k, False, False
    if float((k * step).max()) + float(const.abs().max()) >= K.FP32_EXACT_LIMIT:
        if not split_k:
            by_weights = True  # decided below on these weights' own bound
        elif float(step.max()) * 2 >= K.FP32_EXACT_LIMIT \
                or float(const.abs().max()) + float((k * step).max()) >= K.FP64_EXACT_LIMIT:
            return None
        else:
            # kc * step < 2**24, 2 <= kc <= k; kc == k when C alone breaks the limit: one
            # exact float32 GEMM, C added in float64 all the same
            kc, split = min(k, int((K.FP32_EXACT_LIMIT - 1) // float(step.max()))), True
    vmax = max(float(np.abs(tabs._v_max).max()), float(np.abs(tabs._v_min).max()))
    wmax = vmax + float(np.abs(shift).max(initial=0.0))                  # bound of |wv| below
    small = wmax < K.FP32_EXACT_LIMIT
    if by_weights and not small:
        return None
    if small:
        # every value and shift is an integer below 2**24: float32 is exact; shift only the
        # columns with c_r != 0 (usually just the exact-product column)
        zw32 = zw_t.to(torch.float32).reshape(co, 1, 1, 1)
        if tabs.v_is_value:  # V[w] = value(w): the weights themselves, shifted (no look-up)
            wv = (qw.detach().to(torch.float32) - float(coef[0]) * zw32).unsqueeze(-1)  # (Co, Cg, kh, kw, 1)
        else:
            wv = lookup_rows(_idx32(qw, tabs.lo_w), tabs.v_f32)            # (Co, Cg, kh, kw, r) f32
            for rr in np.nonzero(coef)[0]:
                wv[..., int(rr)] -= float(coef[rr]) * zw32
    else:
        wv = lookup_rows(_idx32(qw, tabs.lo_w), tabs.v)                    # float64
        wv = wv - torch.as_tensor(coef, dtype=torch.float64, device=qw.device) * zw_t.reshape(co, 1, 1, 1, 1)
    runs = None
    per = _channel_sums(wv, wmax) if by_weights else None
    if by_weights and not _within_fp32(per, const, tabs):
        runs = _channel_runs(per, const, tabs, zxf) if chunks else None
        if runs is None:
            return None
    wv = wv.permute(0, 1, 4, 2, 3).reshape(co, cg * r, kh, kw).to(torch.float32)
    if runs is not None:
        # the runs as the groups of one convolution: (G Co, Cg r / G, kh, kw)
        # (contiguous, not channels-last: the grouped output then keeps the input's layout)
        wv = wv.reshape(co, runs, cg * r // runs, kh, kw).transpose(0, 1).reshape(runs * co, -1, kh, kw)
        return wv.contiguous(), const, runs
    if split_k:
        # the bias of one float32 addmm, or the float64 start of the chunked sum
        return wv.contiguous(memory_format=torch.channels_last), const if split else const.to(torch.float32), kc
    return wv.contiguous(memory_format=torch.channels_last), const.to(torch.float32)


def _channel_sums(wv: torch.Tensor, bound: float) -> torch.Tensor:
    """``sum_(kh, kw) |wv|`` of folded weights ``(Co, Cg, kh, kw, r)`` (integers of magnitude at
    most ``bound``, known from the LUT's factors), ``(Co, Cg, r)`` float64 -- exact: in float32
    where ``kh kw`` such values stay below ``2**24`` (no float64 copy of the weights), else in
    float64."""
    w = wv.detach()
    if w.dtype == torch.float32 and bound * w.shape[2] * w.shape[3] < K.FP32_EXACT_LIMIT:
        return w.abs().sum((2, 3)).to(torch.float64)
    return w.to(torch.float64).abs().sum((2, 3))


def _within_fp32(per: torch.Tensor, const: torch.Tensor, tabs: LutTables) -> bool:
    """Whether every partial sum of the folded convolution stays below ``2**24`` for weights
    whose :func:`_channel_sums` are ``per`` ``(Co, Cg, r)``: each output's
    ``sum_k,r |U_r|max |wv_kr| + |C|`` bounds every partial sum in any order -- the
    worst case over all weights (``K`` times the largest product) rejects most layers with
    ``K`` above a few hundred, whose actual weights rarely come near it."""
    ua = torch.as_tensor(tabs._u_absmax, dtype=torch.float64, device=per.device)
    bound = (per * ua).sum((1, 2)) + const.abs()
    return float(bound.max()) < K.FP32_EXACT_LIMIT


def _channel_runs(per: torch.Tensor, const: torch.Tensor, tabs: LutTables, zx: float) -> int | None:
    """The fewest equal runs ``G`` (a divisor of the ``Cg*r`` mapped input channels: channel
    ``c``, rank ``rr`` -> ``c r + rr``; at least 2) whose convolutions each keep every partial
    sum below ``2**24`` for weights whose :func:`_channel_sums` are ``per`` ``(Co, Cg, r)``:
    the bound of :func:`_within_fp32` per output and run, with ``|x - Zx|`` as well as ``|U|``
    for a rank-1 ``U = value(x)`` (:func:`_chunked_lowrank_conv` convolves ``x - Zx`` there).
    ``None`` where one channel alone reaches the limit, or the whole sum and ``C`` could
    reach ``2**53`` (float64, where the runs are added, would round)."""
    co, cg, r = per.shape
    ua = np.array(tabs._u_absmax, np.float64)
    if tabs.u_is_value:
        ua = np.maximum(ua, _activation_distance(tabs, zx))
    m = cg * r
    per = (per * torch.as_tensor(ua, dtype=torch.float64, device=per.device)).reshape(co, m).cpu().numpy()
    if float(per.sum(1).max()) + float(const.abs().max()) >= K.FP64_EXACT_LIMIT \
            or float(per.max()) >= K.FP32_EXACT_LIMIT:
        return None
    for runs in range(2, m + 1):
        if m % runs == 0 and float(per.reshape(co, runs, m // runs).sum(2).max()) < K.FP32_EXACT_LIMIT:
            return runs
    return None  # m == 1: not reached (one channel alone is below the limit)


def _chunked_lowrank_conv(qx: torch.Tensor, zx: torch.Tensor, tabs: LutTables, fold, padding, stride,
                          dilation, dtype: torch.dtype) -> torch.Tensor:
    """The accumulator (``dtype``) of an ungrouped low-rank conv cut into ``G`` equal runs
    of its mapped input channels (``fold`` from :func:`_folded_lowrank_weights` with
    ``chunks``): one grouped float32 convolution gives each run's partial sums (exact),
    added with the constant in float64 (exact) and rounded once to ``dtype``
    (:func:`appmult.nn.fold_loops.add_runs` for float32 on the CPU). For a rank-1
    ``U = value(x)`` it convolves ``qx - Zx``, zero-padded by the convolution
    (:func:`_rank1_shifted_conv`'s shortcut); otherwise ``U`` of the indices padded with the
    zero point's, channels-last, as :class:`~appmult.nn.autograd._LowRankConvZpFn`.
    Computed on detached operands: the caller attaches the LUT's backward."""
    wg, const, runs = fold
    zxf = float(zx)
    co = wg.shape[0] // runs
    if tabs.u_is_value:
        q = qx.detach().to(torch.float32)
        xs = q if zxf == 0.0 else q - zxf
        pad = padding
        bias = const
        if zxf != 0.0:
            # + Zx sum_k wv_jk: each group's row sum in float32 is exact (its sum of |wv| is
            # below 2**24 / |U|max, _channel_runs), the groups added in float64
            bias = const + zxf * wg.sum((1, 2, 3)).to(torch.float64).reshape(runs, co).sum(0)
    else:
        ph, pw = padding
        idx = _idx32(qx, tabs.lo_x)
        if ph or pw:
            idx = F.pad(idx, (pw, pw, ph, ph), value=int(round(zxf)) - tabs.lo_x)
        xs = _map_channels(tabs.u_f32, idx, torch.float32)
        pad = (0, 0)
        bias = const
    y = exact_conv.conv2d(xs, wg, None, stride, pad, dilation, runs).contiguous()
    n, _, ho, wo = y.shape
    if dtype == torch.float32 and y.device.type == "cpu" and fold_loops.AVAILABLE and K.numba_available():
        out = torch.empty((n, co, ho, wo), dtype=torch.float32)
        fold_loops.add_runs(y.reshape(n, runs, co, ho * wo).numpy(), bias.to(torch.float64).contiguous().numpy(),
                            out.reshape(n, co, ho * wo).numpy())
        return out
    acc = y.reshape(n, runs, co, ho, wo).to(torch.float64).sum(1)
    return acc.add_(bias.to(acc.device).reshape(1, co, 1, 1)).to(dtype)


def _exact_row_sums(q: torch.Tensor, bound: float) -> torch.Tensor:
    """float64 row sums of the integer-valued ``q`` ``(Co, K)`` whose values are at most
    ``bound`` in magnitude, exact: summed in float32 where every partial sum stays below
    ``2**24`` (no float64 copy of the weights: a new full-size tensor costs page faults on
    first touch), else in float64."""
    if q.dtype == torch.float32 and q.shape[1] * bound < K.FP32_EXACT_LIMIT:
        return q.sum(1).to(torch.float64)
    return q.sum(1, dtype=torch.float64)


def _code_bound(tabs: LutTables) -> int:
    """The largest magnitude of a weight code's value."""
    return max(abs(tabs.lo_w), abs(tabs.lo_w + tabs.prod.shape[1] - 1))


def _activation_distance(tabs: LutTables, zx: float) -> float:
    """The largest ``|x - Zx|`` over the activation codes' values (``Zx = 0``: the largest
    magnitude)."""
    return max(abs(tabs.lo_x - zx), abs(tabs.lo_x + tabs.prod.shape[0] - 1 - zx))


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
    return exact_conv.conv2d(xs, wc, bias, stride, padding, dilation, groups)


def _value_rank1_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """:func:`_rank1_prep` of :func:`_folded_lowrank_weights` for the exact product
    (``LutTables.v_is_value``), straight from the weight codes by one numba pass
    (:func:`appmult.nn.fold_loops.value_fold_rows`: ``w - Zw``, the bias and the bounds
    from exact integer row sums) -- the same weights, bias and exactness decisions as the
    two general functions (every quantity an integer below ``2**53``), without their few
    dozen small torch ops (this runs every training step). ``None`` where the general
    functions decide (no numba, not float32 on the CPU, not 8-bit weight codes, a fold that
    would need channel runs, a rank-1 convolution not exact in float32)."""
    if not tabs.v_is_value or qw.dim() != 4 or qw.dtype != torch.float32 or qw.device.type != "cpu" \
            or zx.requires_grad or zw.requires_grad or zx.dim() != 0 or zw.device.type != "cpu" \
            or zw.dtype not in (torch.float32, torch.float64) or tabs.prod.shape[1] > 256 \
            or not (fold_loops.AVAILABLE and K.numba_available()):
        return None
    co = qw.shape[0]
    k = qw[0].numel()
    zp = _integer_zero_points(zx, zw, co)
    if zp is None:
        return None
    zxf, zwv = zp
    wc = torch.empty(qw.shape, dtype=torch.float32)
    bias = torch.empty(co, dtype=torch.float32)
    fig = np.empty(4)
    fold_loops.value_fold_rows(qw.detach().contiguous().numpy().reshape(co, k), zwv, zxf,
                               0.0 if tabs.signed else float(tabs.value_coef[0]), bool(tabs.signed),
                               float(tabs._v_min[0]), float(tabs._v_max[0]), float(tabs._u_absmax[0]),
                               float(_activation_distance(tabs, zxf)), wc.numpy().reshape(co, k), bias.numpy(), fig)
    if fig[0] + fig[1] >= K.FP32_EXACT_LIMIT and fig[2] >= K.FP32_EXACT_LIMIT:
        return None  # the general fold cuts this convolution into runs
    if fig[3] >= K.FP32_EXACT_LIMIT:
        return None  # not exact in float32 (the general path decides)
    return wc, bias


def _rank1_prep(zx, wv, const, tabs: LutTables):
    """Weights and bias of :func:`_rank1_shifted_conv` (``False`` when not exact in float32)."""
    zxf = float(zx)
    wc = wv.contiguous()
    w64 = wc.to(torch.float64)
    bias = const.to(torch.float64) + zxf * w64.sum((1, 2, 3))
    xmax = _activation_distance(tabs, zxf)
    if float((w64.abs().sum((1, 2, 3)) * xmax + bias.abs()).max()) >= K.FP32_EXACT_LIMIT:
        return False
    return wc, bias.to(torch.float32)


def _rank1_mapped_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """Weight side of :func:`_rank1_mapped_conv` (cacheable per weight and ``Zx``), or ``False``.

    For a rank-1 LUT ``U[x] V[w]`` whose ``U`` is not ``value(x)`` (DRUM, leading-one
    truncations of the activation): with ``a_k = U[x_k] - U[Zx]`` and ``b_k = x_k - Zx``
    (both 0 where the padding holds ``Zx``), ``sum_k LUT[x_k, w_jk] - Zw_j sum_k x_k -
    Zx sum_k w_jk + K Zx Zw_j = conv(a, V[w])_j + C_j - Zw_j S`` with ``C_j = U[Zx]
    sum_k V[w_jk] - Zx sum_k w_jk`` and ``S`` the sum of ``b`` over the receptive field,
    one per group of input channels (signed LUTs carry no cross terms: ``C_j = U[Zx]
    sum_k V[w_jk]``, no ``S``). Both zero-pad by themselves. ``_folded_lowrank_weights``
    has no fold for such a LUT (``value(x)`` is not a multiple of ``U``: no ``U c =
    value(x)``), which left it to the unfused path's look-ups and cross-term passes.

    Returns:
        ``(V[w] (Co, Cg, kh, kw) float32, C (Co,) float32, U - U[Zx] by activation code
        offset (float32), -Zw (Co,) float32 or None where no ``S`` term is needed)``;
        ``False`` where it does not apply (not rank 1, ``U`` is ``value(x)`` -- the fold's
        shortcut --, zero points with gradients or not integer codes of the table) or is
        not exact in float32: the main convolution's partial sums could reach ``2**24``
        (``sum_k |V[w_jk]| max|U - U[Zx]| + |C_j|``, these weights' own bound), or
        ``Zw_j S`` could (``K max|x - Zx| max|Zw|``; below it the product is exact and
        ``main - Zw_j S`` rounds once, as the integer accumulator's conversion does), or a
        group's sum of codes could (``Cg max|x|``: :func:`_group_sums` sums before it shifts).
    """
    if tabs.u is None or tabs.u.shape[1] != 1 or tabs.u_is_value or zx.requires_grad or zw.requires_grad:
        return False
    fast = _numba_mapped_prep(qw, zx, zw, tabs)
    if fast is not None:
        return fast
    co, cg, kh, kw = qw.shape
    zxf = float(zx)
    zi = int(round(zxf)) - tabs.lo_x
    zwv = zw.detach().to(torch.float64).reshape(-1).expand(co)
    if zxf != round(zxf) or not 0 <= zi < tabs.u.shape[0] or not torch.equal(zwv, torch.round(zwv)):
        return False
    u = tabs.u[:, 0]
    ushift = u - u[zi]
    vw = tabs.v[:, 0][_idx(qw, tabs.lo_w)]                                   # (Co, Cg, kh, kw) float64
    const = float(u[zi]) * vw.sum((1, 2, 3))
    if not tabs.signed:
        const = const - zxf * qw.detach().to(torch.float64).sum((1, 2, 3))
    bound = vw.abs().sum((1, 2, 3)) * float(ushift.abs().max()) + const.abs()
    if float(bound.max()) >= K.FP32_EXACT_LIMIT or float(vw.abs().max()) >= K.FP32_EXACT_LIMIT:
        return False
    nzw = None
    if not tabs.signed and bool((zwv != 0).any()):
        if not _s_term_exact(tabs, zxf, float(zwv.abs().max()), cg, cg * kh * kw):
            return False
        nzw = (-zwv).to(torch.float32).contiguous()
    return vw.to(torch.float32).contiguous(), const.to(torch.float32), ushift.to(torch.float32).contiguous(), nzw


def _s_term_exact(tabs: LutTables, zxf: float, zw_max: float, cg: int, k: int) -> bool:
    """Whether the mapped conv's ``- Zw_j S`` term is exact in float32 (both preps decide
    by it): ``Zw_j S`` below ``2**24`` (``K max|x - Zx| max|Zw|``; below it the product is
    exact), and each group's sum of the codes themselves (``Cg max|x|``: :func:`_group_sums`
    sums before it shifts)."""
    return k * _activation_distance(tabs, zxf) * zw_max < K.FP32_EXACT_LIMIT \
        and cg * _activation_distance(tabs, 0.0) < K.FP32_EXACT_LIMIT


def _numba_mapped_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """:func:`_rank1_mapped_prep` by one numba pass over the weight codes
    (:func:`appmult.nn.fold_loops.mapped_fold_rows`: the look-ups, the bias and the bound
    from exact float64 sums of integers) -- the same tensors and decisions, without the
    torch path's two dozen small ops (this runs every training step: 120-475 us of a LeNet
    DRUM step by the torch path; in-process A/B of the step 1.65-1.67 -> 1.60-1.62x the
    float step). ``None`` where the torch path decides (no numba, not 4-D float32 codes on
    the CPU, zero points that are not integers or not one per output, a code outside the
    table)."""
    if qw.dim() != 4 or qw.dtype != torch.float32 or qw.device.type != "cpu" or zx.dim() != 0 \
            or zw.device.type != "cpu" or zw.dtype not in (torch.float32, torch.float64) \
            or tabs.u.device.type != "cpu" or not (fold_loops.AVAILABLE and K.numba_available()):
        return None
    co, cg, kh, kw = qw.shape
    zp = _integer_zero_points(zx, zw, co)
    if zp is None:
        return None
    zxf, zwv = zp
    zi = int(round(zxf)) - tabs.lo_x
    u = tabs.u.numpy()[:, 0]
    if not 0 <= zi < u.shape[0]:
        return False
    ushift = u - u[zi]
    k = cg * kh * kw
    vw = torch.empty(qw.shape, dtype=torch.float32)
    const = torch.empty(co, dtype=torch.float32)
    fig = np.empty(3)
    fold_loops.mapped_fold_rows(qw.detach().contiguous().numpy().reshape(co, k), float(tabs.lo_w),
                                np.ascontiguousarray(tabs.v.numpy()[:, 0]), float(u[zi]), zxf, bool(tabs.signed),
                                float(np.abs(ushift).max()), vw.numpy().reshape(co, k), const.numpy(), fig)
    if fig[2]:
        return None   # a code outside the table: the torch path's indexing decides
    if fig[0] >= K.FP32_EXACT_LIMIT or fig[1] >= K.FP32_EXACT_LIMIT:
        return False
    nzw = None
    if not tabs.signed and bool((zwv != 0).any()):
        if not _s_term_exact(tabs, zxf, float(np.abs(zwv).max()), cg, k):
            return False
        nzw = torch.from_numpy((-zwv).astype(np.float32))
    return vw, const, torch.from_numpy(ushift.astype(np.float32)), nzw


def _rank1_mapped_conv(qx: torch.Tensor, zx: torch.Tensor, prep, tabs: LutTables, padding, stride, dilation,
                       groups, dtype: torch.dtype) -> torch.Tensor | None:
    """The accumulator (``dtype``) of a rank-1 LUT conv by :func:`_rank1_mapped_prep`'s
    identity: ``U[x] - U[Zx]`` by one look-up pass, the main convolution, and where the
    weights have zero points ``- Zw_j S`` added in place (``S``: :func:`_group_sums`, then
    :func:`_window_sums`).
    ``None`` for inputs other than 4-D float32. Computed on detached operands: the caller
    attaches the LUT's backward."""
    q = qx.detach()
    if q.dtype != torch.float32 or q.dim() != 4:
        return None
    vw, const, ushift, nzw = prep
    if nzw is not None and _numba_mapped(q, vw):
        return _numba_mapped_conv(q, float(zx), prep, tabs, padding, stride, dilation, groups).to(dtype)
    main = exact_conv.conv2d(_mapped_codes(q, ushift, tabs.lo_x), vw, const, stride, padding, dilation, groups)
    if nzw is not None:
        co = vw.shape[0]
        s = _window_sums(_group_sums(q, float(zx), groups), vw.shape[2:], padding, stride, dilation)
        n, _, ho, wo = main.shape
        main.view(n, groups, co // groups, ho, wo).addcmul_(s.unsqueeze(2), nzw.reshape(1, groups, co // groups, 1, 1))
    return main.to(dtype)


#: No scale and no bias: :func:`appmult.nn.quant_loops.dequantize_channels_zw` adds the term only.
_NO_SCALE = np.empty(0, np.float32)


def _numba_mapped(q: torch.Tensor, vw: torch.Tensor) -> bool:
    """Whether :func:`_numba_mapped_conv` runs: contiguous CPU float32 codes and weights, numba on."""
    return q.device.type == "cpu" and vw.device.type == "cpu" and q.is_contiguous() and quant_loops.AVAILABLE \
        and K.numba_available()


def _numba_mapped_conv(q: torch.Tensor, zx: float, prep, tabs: LutTables, padding, stride, dilation,
                       groups: int) -> torch.Tensor:
    """:func:`_rank1_mapped_conv` with its ``- Zw_j S`` term by two numba passes: the
    look-ups and the zero-padded group sums in one (``quant_loops.map_codes_sums``), the
    window sums added to the convolution in place in the other (``dequantize_channels_zw``
    with no scale) -- the same integers as :func:`_group_sums`, :func:`_window_sums` and
    ``addcmul_``, whose reduction, depthwise convolution and pass took 100 + 250 + 35 us of
    a LeNet training step (in-process A/B of the step: 1.74-1.88 -> 1.64-1.76x the float
    step)."""
    vw, const, ushift, nzw = prep
    n, c, h, w = q.shape
    (ph, pw), (sh, sw), (dh, dw) = (exact_conv._pair(v) for v in (padding, stride, dilation))
    a = torch.empty_like(q)
    sums = torch.empty((n, groups, h + 2 * ph, w + 2 * pw), dtype=torch.float32)
    quant_loops.map_codes_sums(q.numpy(), ushift.numpy(), tabs.lo_x, np.float32(zx), a.numpy(), sums.numpy())
    main = exact_conv.conv2d(a, vw, const, stride, padding, dilation, groups).contiguous()
    kh, kw = vw.shape[2:]
    geom = np.array([kh, kw, sh, sw, dh, dw], np.int64)
    quant_loops.dequantize_channels_zw(main.numpy(), sums.numpy(), geom, nzw.numpy(), _NO_SCALE, _NO_SCALE)
    return main


def _group_sums(q: torch.Tensor, zx: float, groups: int) -> torch.Tensor:
    """``sum (x - Zx)`` over each group's input channels, ``(N, G, H, W)`` float32 (exact:
    integers below ``Cg 2**8``)."""
    n, c, h, w = q.shape
    sums = q.reshape(n, groups, c // groups, h, w).sum(2)
    if zx != 0.0:
        sums.sub_((c // groups) * zx)   # sum (x - Zx) = sum x - Cg Zx: integers, exact
    return sums


def _window_sums(sums: torch.Tensor, kernel, padding, stride, dilation) -> torch.Tensor:
    """The ``(N, G, H, W)`` maps ``sums`` summed over each output's window, ``(N, G, Ho,
    Wo)``: a box filter of the ``N G`` maps as one depthwise convolution (oneDNN's
    convolution to one output channel took 110-150 us for a LeNet batch, the depthwise one
    80; a numba box filter 135-180). Exact: every partial sum is an integer below ``2**24``
    (``K 2**8``)."""
    n, g, h, w = sums.shape
    kh, kw = kernel
    ones = torch.ones((n * g, 1, kh, kw), dtype=sums.dtype, device=sums.device)
    s = exact_conv.conv2d(sums.reshape(1, n * g, h, w), ones, None, stride, padding, dilation, n * g)
    return s.reshape(n, g, s.shape[2], s.shape[3])


def _mapped_codes(q: torch.Tensor, table: torch.Tensor, lo: int) -> torch.Tensor:
    """``table[q - lo]`` for the integer-valued float32 codes ``q`` (one numba pass on the
    CPU, else an int32 index and a look-up: 35 + 100 us for a LeNet batch)."""
    if q.device.type == "cpu" and q.is_contiguous() and quant_loops.AVAILABLE and K.numba_available():
        out = torch.empty_like(q)
        quant_loops.map_codes(q.reshape(-1).numpy(), table.numpy(), lo, out.reshape(-1).numpy())
        return out
    return lookup_rows(_idx32(q, lo), table.reshape(-1, 1)).reshape(q.shape)


def _gather_conv_zp(qx, qw, zx, zw, tabs: LutTables, padding, stride, dilation, groups, out_dtype=torch.int32):
    """Accumulator with cross terms from the numba row kernel (int32, returned as ``out_dtype``),
    or ``None`` (not applicable: see :func:`appmult.nn.kernels.gather_conv_zp`)."""
    if zx.requires_grad or zw.requires_grad or qx.dtype != torch.float32 or qx.device.type != "cpu":
        return None  # (off the CPU before reading the zero points: no device-to-host copies)
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
    if zx.requires_grad or zw.requires_grad or qw.device.type != "cpu":
        return False  # (off the CPU before reading the zero points: no device-to-host copies)
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


#: Largest reduction length of an int8 GEMM whose int32 sums cannot overflow:
#: ``n * 128 * 128 < 2**31``.
INT8_GEMM_MAX_K = (1 << 31) // (128 * 128) - 1
#: Most base-256 digit planes of the folded weights the int8 path splits them into.
INT8_GEMM_MAX_PLANES = 3


def _signed_digits(w: torch.Tensor, planes: int) -> list[torch.Tensor]:
    """Base-256 digits ``d_p`` in ``[-128, 127]`` of the int64 ``w``: ``w = sum_p 256**p d_p``."""
    digits = []
    for _ in range(planes):
        d = torch.remainder(w + 128, 256) - 128
        digits.append(d)
        w = torch.div(w - d, 256, rounding_mode="floor")
    if torch.any(w != 0):
        raise AssertionError("the digit planes do not hold the folded weights")  # a bug, not bad input
    return digits


def _int8_unfolded_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """:func:`_int8_linear_prep` for a low-rank LUT whose factors cannot carry ``value(x)``
    (no fold): the weights are ``V[w]`` unchanged, ``C_j = -Zx sum_k (w_jk - Zw_j)`` and the
    cross term ``-Zw_j sum_k x_k`` is added per call. ``False`` where it does not apply."""
    if tabs.u is None or zx.requires_grad or zw.requires_grad or qw.device.type != "cpu":
        return False  # (the int8 GEMM runs on the CPU only)
    n, k = qw.shape
    zp = _integer_zero_points(zx, zw, n)
    if zp is None:
        return False
    zxf, zwv = zp[0], torch.from_numpy(zp[1])
    w = lookup_rows(_idx32(qw, tabs.lo_w), tabs.v).reshape(n, k * tabs.u.shape[1])     # float64
    if tabs.signed:  # no cross terms for signed LUTs (as in the unfused path)
        return _int8_linear_prep((w, torch.zeros(n, dtype=torch.float64)), tabs)
    const = -zxf * (qw.detach().to(torch.float64) - zwv.reshape(n, 1)).sum(1)
    prep = _int8_linear_prep((w, const), tabs)
    return prep if prep is False else prep[:5] + (zwv, prep[6])


def _int8_linear_prep(fold, tabs: LutTables):
    """Weight side of :func:`_int8_linear_acc` for a folded low-rank linear layer, or ``False``.

    With ``U = a + Ox`` (``a`` in ``[-128, 127]``) and the folded weights ``W = V - c Zw``
    written per output as ``W_j = Ow_j + sum_p 256**p B_pj`` (signed base-256 digits ``B``):
    ``sum_c U[x_c] W_jc = sum_p 256**p (a . B_pj) + Ow_j sum_c a_c + Ox sum_c W_jc``, ``c``
    over the ``K r`` mapped inputs. The dot products are one int8 GEMM (``torch._int_mm``,
    exact int32 sums) over the planes stacked as outputs; the rest is added in float64
    (exact: every term is an integer below ``2**53``). Applies on the CPU where every
    value of ``U`` spans at most 256 consecutive integers, the weights need at most
    ``INT8_GEMM_MAX_PLANES`` digit planes and ``2 <= K r <= INT8_GEMM_MAX_K``.

    Returns:
        ``(B (P N, K r) int8, per-output constant (N,) float64 incl. the fold's bias,
        Ow (N,) float64, Ox, U - Ox as an int8 table or None where U = value(x), None
        (:func:`_int8_unfolded_prep`: the ``Zw`` of the per-call cross term), P)``, or
        ``False``.
    """
    wv, const = fold[0], fold[1]
    n = wv.shape[0]
    quick = _int8_one_plane_prep(wv.reshape(n, -1), const, tabs)
    if quick is not None:
        return quick
    w = wv.reshape(n, -1).to(torch.float64)
    kr = w.shape[1]
    # kr >= 2: torch 2.13's CPU _int_mm returns wrong sums for a reduction of length 1
    if w.device.type != "cpu" or not hasattr(torch, "_int_mm") or not 2 <= kr <= INT8_GEMM_MAX_K or w.numel() == 0 \
            or float(const.abs().max()) >= K.FP64_EXACT_LIMIT / 4:
        return False
    u = tabs.u
    umin, umax = _factor_range(tabs)
    if umax - umin > 255:
        return False
    ox = int(umin) + 128
    wmin = w.min(1).values
    span = float((w.max(1).values - wmin).max())
    planes = 1  # P digit planes hold [-128 S, 127 S], S = 1 + 256 + ... + 256**(P-1)
    while planes <= INT8_GEMM_MAX_PLANES and span > 255 * (256 ** planes - 1) // 255:
        planes += 1
    if planes > INT8_GEMM_MAX_PLANES:
        return False
    ow = wmin + 128 * ((256 ** planes - 1) // 255)
    digits = _signed_digits((w - ow.reshape(n, 1)).to(torch.int64), planes)
    b = torch.cat(digits).to(torch.int8).contiguous()                     # (P N, K r)
    c = const.to(torch.float64) + ox * w.sum(1)
    u8 = None if tabs.u_is_value else (u - ox).to(torch.int8)
    return b, c, ow, ox, u8, None, planes


def _int8_linear_dots(qx: torch.Tensor, prep, tabs: LutTables, a: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, dots)``: the int8 activation factors ``U[x] - Ox`` ``(M, K r)`` (``a`` where
    given: made with the codes) and the int8 GEMM's exact int32 dot products with every
    digit plane ``(M, P N)``."""
    b, ox, u8 = prep[0], prep[3], prep[4]
    if a is None:
        a = (qx.detach() - ox).to(torch.int8) if u8 is None else \
            lookup_rows(_idx32(qx, tabs.lo_x), u8).reshape(qx.shape[0], -1)   # (u8 None: U = value(x))
    return a, torch._int_mm(a, b.t())


def _int8_one_plane_prep(w: torch.Tensor, const: torch.Tensor, tabs: LutTables):
    """:func:`_int8_linear_prep`'s result where the folded weights are float32 with every
    output's span below 256 (one digit plane: the exact product's fold), computed in a few
    float32 passes instead of float64 digit arithmetic -- cheap enough for a training step.
    ``None`` where it does not apply (the general prep decides)."""
    u = tabs.u
    kr = w.shape[1]
    if w.dtype != torch.float32 or w.device.type != "cpu" or not hasattr(torch, "_int_mm") or u is None \
            or INT8_GEMM_MAX_PLANES < 1 or not 2 <= kr <= INT8_GEMM_MAX_K or w.numel() == 0 or float(const.abs().max()) >= K.FP64_EXACT_LIMIT / 4:
        return None
    umin, umax = _factor_range(tabs)
    wmin, wmax = w.amin(1), w.amax(1)
    if umax - umin > 255 or float((wmax - wmin).max()) > 255:
        return None
    ox = int(umin) + 128
    ow = wmin.to(torch.float64) + 128
    b = _shifted_int8_rows(w, wmin + 128)                  # integers in [-128, 127]: exact
    wsum = _exact_row_sums(w, float(torch.maximum(wmax.abs(), wmin.abs()).max()))
    c = const.to(torch.float64) + ox * wsum
    u8 = None if tabs.u_is_value else (u - ox).to(torch.int8)
    return b, c, ow, ox, u8, None, 1


def _shifted_int8_rows(q: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``int8(q - off[:, None])`` for float32 ``q`` whose every difference is an integer in
    ``[-128, 127]``: by numba without a full-size float32 temporary where it can."""
    if loops.AVAILABLE and K.numba_available() and q.is_contiguous() and off.dtype == torch.float32:
        out = torch.empty(q.shape, dtype=torch.int8)
        loops.shifted_rows(q.numpy(), off.contiguous().numpy(), out.numpy())
        return out
    return (q - off.reshape(-1, 1)).to(torch.int8)


def _int8_value_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """:func:`_int8_linear_prep` of the fold, for a LUT whose factors are ``value(x)`` and
    ``value(w)`` (the exact product: ``LutTables.v_is_value``), straight from the weight
    codes: the folded weights are ``w - Zw`` (``w`` for a signed LUT), so the digits are
    ``w - min_j(w) - 128`` and the constants come from row sums -- one new full-size tensor
    instead of the fold's and the preparation's (each new one costs page faults: this runs
    every training step). ``None`` where it does not apply (the general path decides)."""
    if not tabs.v_is_value or qw.dim() != 2 or qw.dtype != torch.float32 or qw.device.type != "cpu" \
            or zx.requires_grad or zw.requires_grad or INT8_GEMM_MAX_PLANES < 1 or not hasattr(torch, "_int_mm"):
        return None
    n, k = qw.shape
    if not 2 <= k <= INT8_GEMM_MAX_K:
        return None
    umin, umax = _factor_range(tabs)
    if umax - umin > 255:
        return None
    zp = _integer_zero_points(zx, zw, n)
    if zp is None:
        return None
    if tabs.prod.shape[1] <= 256 and zw.device.type == "cpu" and zw.dtype in (torch.float32, torch.float64) \
            and zx.dim() == 0 and loops.AVAILABLE and K.numba_available():
        return _int8_value_prep_8bit(qw, *zp, tabs, umin)
    zxf, zwv = zp[0], torch.from_numpy(zp[1])
    q = qw.detach()
    if tabs.prod.shape[1] <= 256:
        # every code of an 8-bit weight side lies in [lo_w, lo_w + 255]: one offset for all
        # rows (no pass for their ranges; the layers' and approx_linear's codes are checked)
        qmin = torch.full((n,), float(tabs.lo_w), dtype=torch.float32)
    else:
        qmin, qmax = q.amin(1), q.amax(1)
        if float((qmax - qmin).max()) > 255:
            return None
    shift = torch.zeros(n, dtype=torch.float64) if tabs.signed else zwv            # folded weights w - shift
    wsum = _exact_row_sums(q, _code_bound(tabs)) - k * shift                       # sum_k (w - shift), exact
    const = torch.zeros(n, dtype=torch.float64) if tabs.signed else -zxf * wsum
    if float(const.abs().max()) >= K.FP64_EXACT_LIMIT / 4:
        return None
    ox = int(umin) + 128
    b = _shifted_int8_rows(q, qmin + 128)                  # integers in [-128, 127]: exact
    ow = qmin.to(torch.float64) - shift + 128
    return b, const + ox * wsum, ow, ox, None, None, 1


def _int8_value_prep_8bit(qw: torch.Tensor, zxf: float, zwv: np.ndarray, tabs: LutTables, umin: float):
    """:func:`_int8_value_prep` of 8-bit weight codes (one offset for every row, ``lo_w +
    128``) by one numba pass over the codes (:func:`appmult.nn.int8_loops.value_rows`: the
    int8 digits, the exact row sums and the row constants) -- the same integers as the
    torch expressions, without their two dozen scalar and small ops (each a few
    microseconds: this runs every training step). ``zxf``, ``zwv``: from
    :func:`_integer_zero_points`."""
    n, k = qw.shape
    b = torch.empty((n, k), dtype=torch.int8)
    c = np.empty(n, np.float64)
    ow = np.empty(n, np.float64)
    ox = int(umin) + 128
    top = loops.value_rows(qw.detach().contiguous().numpy(), np.float32(float(tabs.lo_w) + 128.0), zwv, zxf,
                           bool(tabs.signed), float(ox), float(tabs.lo_w), b.numpy(), c, ow)
    if top >= K.FP64_EXACT_LIMIT / 4:
        return None
    return b, torch.from_numpy(c), torch.from_numpy(ow), ox, None, None, 1


def _int8_mapped_prep(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """:func:`_int8_unfolded_prep` of a rank-1 LUT ``U[x] V[w]`` whose ``V`` is a look-up
    (DRUM) and whose looked-up weights span at most 256 integers per row (one digit plane),
    by one numba pass over the 8-bit weight codes (:func:`appmult.nn.int8_loops.mapped_rows`)
    -- the same integers as the general preparation, cheap enough for every training step
    (which otherwise took the unfused look-up path). ``None`` where it does not apply."""
    if tabs.u is None or tabs.u.shape[1] != 1 or tabs.v_is_value or qw.dim() != 2 or qw.dtype != torch.float32 \
            or qw.device.type != "cpu" or zx.requires_grad or zw.requires_grad or zx.dim() != 0 \
            or zw.device.type != "cpu" or zw.dtype not in (torch.float32, torch.float64) \
            or tabs.prod.shape[1] > 256 or INT8_GEMM_MAX_PLANES < 1 or not hasattr(torch, "_int_mm") \
            or not (loops.AVAILABLE and K.numba_available()):
        return None
    n, k = qw.shape
    umin, umax = _factor_range(tabs)
    if not 2 <= k <= INT8_GEMM_MAX_K or umax - umin > 255:
        return None
    zp = _integer_zero_points(zx, zw, n)
    if zp is None:
        return None
    vtab = _v_int32(tabs)
    if vtab is None:
        return None
    zxf, zwv = zp
    b = torch.empty((n, k), dtype=torch.int8)
    c, ow = np.empty(n), np.empty(n)
    ox = int(umin) + 128
    bad, top = loops.mapped_rows(qw.detach().contiguous().numpy(), int(tabs.lo_w), vtab, zwv,
                                 zxf, bool(tabs.signed), float(ox), b.numpy(), c, ow)
    if bad or top >= K.FP64_EXACT_LIMIT / 4:
        return None
    u8 = _u8_table(tabs, ox)
    return b, torch.from_numpy(c), torch.from_numpy(ow), ox, u8, None if tabs.signed else torch.from_numpy(zwv), 1


def _v_int32(tabs: LutTables) -> np.ndarray | None:
    """The weight factor ``V`` (one column) as int32 for :func:`appmult.nn.int8_loops.mapped_rows`,
    kept with the tables while their ``V`` is the same tensor; ``None`` where a value is no
    integer or reaches ``2**30`` in magnitude (then the caller declines)."""
    v = tabs.v
    kept = tabs.__dict__.get("_v32_kept")
    if kept is None or kept[0] is not v:
        flat = v.detach().reshape(-1).cpu().to(torch.float64).numpy()
        ok = bool(np.all(np.rint(flat) == flat) and np.all(np.abs(flat) < 2.0 ** 30))
        kept = (v, flat.astype(np.int32) if ok else None)
        tabs.__dict__["_v32_kept"] = kept
    return kept[1]


def _factor_range(tabs: LutTables) -> tuple[float, float]:
    """The smallest and largest activation factor ``U`` (the int8 GEMM's offset), kept with
    the tables while their ``U`` is the same tensor (two host reads saved per training step;
    a ``U`` replaced, e.g. by ``.to()``, is read again)."""
    u = tabs.u
    kept = tabs.__dict__.get("_u_range_kept")
    if kept is None or kept[0] is not u:
        kept = (u, float(u.min()), float(u.max()))
        tabs.__dict__["_u_range_kept"] = kept
    return kept[1], kept[2]


def _u8_table(tabs: LutTables, ox: int) -> torch.Tensor:
    """``U - Ox`` as an int8 table (the activation side of the int8 GEMM), kept with the
    tables while their ``U`` is the same tensor."""
    kept = tabs.__dict__.get("_u8_kept")
    if kept is None or kept[0] is not tabs.u or kept[1] != ox:
        kept = (tabs.u, ox, (tabs.u - ox).to(torch.int8))
        tabs.__dict__["_u8_kept"] = kept
    return kept[2]


def _int8_linear_acc(qx: torch.Tensor, prep, tabs: LutTables) -> torch.Tensor:
    """``(M, N)`` float32 accumulator (LUT sum and cross terms, exact integers rounded once
    to float32) by one int8 GEMM (:func:`_int8_linear_prep`); its epilogue by the numba pass
    of :func:`_int8_linear_out` with a unit scale (``x * 1`` is exact: the same bits) where
    that runs, else by torch passes."""
    if loops.AVAILABLE and K.numba_available() and qx.device.type == "cpu" and qx.dtype == torch.float32:
        return _int8_epilogue(qx.detach(), prep, tabs, torch.ones(1), None)
    _, c, ow, _, _, zw_row, planes = prep
    m = qx.shape[0]
    a, dots = _int8_linear_dots(qx, prep, tabs)
    n = c.shape[0]
    acc = dots[:, :n].to(torch.float64)
    for p in range(1, planes):
        acc += dots[:, p * n:(p + 1) * n].to(torch.float64) * float(256 ** p)
    acc += a.sum(1, dtype=torch.int64).to(torch.float64).reshape(m, 1) * ow.reshape(1, n)
    acc += c.reshape(1, n)
    if zw_row is not None:  # -Zw_j sum_k x_k (x: the activation values, i.e. unsigned codes)
        acc -= qx.detach().to(torch.float64).sum(1, keepdim=True) * zw_row.reshape(1, n)
    return acc.to(torch.float32)


def _int8_linear_out(qx: torch.Tensor, prep, tabs: LutTables, scale: torch.Tensor, bias: torch.Tensor | None,
                     *, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer's float32 output ``f32(acc) * scale + bias`` of :func:`_int8_linear_acc`'s
    accumulator, its epilogue and the dequantization in one numba pass
    (:func:`appmult.nn.int8_loops.epilogue`, the same bits), or ``None`` where that does not
    apply: a gradient to carry (to ``qx``, the scale, the bias or the ``weight`` codes the
    prep was made from: the result has no autograd node), no numba, a float64 layer, a scale
    or bias that is not one float32 value or one per output."""
    n = prep[1].shape[0]
    scale = scale.reshape(-1)
    if not (loops.AVAILABLE and K.numba_available()) or qx.device.type != "cpu" or qx.dtype != torch.float32 \
            or scale.dtype != torch.float32 \
            or scale.numel() not in (1, n) or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != n)):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qx, weight, scale, bias)):
        return None
    return _int8_epilogue(qx, prep, tabs, scale, bias)


def _int8_epilogue(qx: torch.Tensor, prep, tabs: LutTables, scale: torch.Tensor, bias: torch.Tensor | None,
                   a: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_int8_linear_out`'s GEMM and numba epilogue without its checks (float32 CPU
    operands, ``scale`` one value or one per output, ``bias`` ``None`` or one per output;
    ``a``: the int8 activation side where already made)."""
    _, c, ow, _, _, zw_row, planes = prep
    n = c.shape[0]
    scale = scale.detach().reshape(-1)
    a, dots = _int8_linear_dots(qx, prep, tabs, a)
    out = torch.empty((qx.shape[0], n), dtype=torch.float32)
    loops.epilogue(dots.numpy(), planes, a.numpy(), ow.numpy(), c.numpy(),
                   _NO_CODES if zw_row is None else qx.detach().numpy(),
                   _NO_F64 if zw_row is None else zw_row.numpy(),
                   (scale if scale.numel() == n else scale.expand(n)).contiguous().numpy(),
                   _NO_F32 if bias is None else bias.detach().reshape(-1).contiguous().numpy(),
                   max(1, min(qx.shape[0], 2 * loops.num_threads())), out.numpy())
    return out


#: The empty arguments of :func:`appmult.nn.int8_loops.epilogue` (no zero-point term, no bias).
_NO_CODES = np.empty((0, 0), np.float32)
_NO_F64 = np.empty(0, np.float64)
_NO_F32 = np.empty(0, np.float32)
