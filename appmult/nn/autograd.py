"""The autograd functions of LUT-exact products: forward through the kernels, LUT backward.

Forward. Every output accumulates ``sum_k LUT[qx_k, qw_k]`` over its receptive field,
computed by one of the kernels of :mod:`appmult.nn.kernels` on the tables of
:class:`~appmult.nn.tables.LutTables` (low-rank GEMMs/convs on operands mapped through the
integer factors, or the gather kernels); see :mod:`appmult.nn.functional` for when each
is exact.

Backward, with ``y_j = sum_k f(qx_k, qw_kj)``:
``dL/dqx_k = sum_j dL/dy_j df/da(qx_k, qw_kj)`` and
``dL/dqw_kj = sum_batch dL/dy_j df/db(qx_k, qw_kj)``:

* ``ste``: ``df/da = value(b)``, ``df/db = value(a)`` -- two ordinary GEMMs/convs;
* ``lut1d``: ``df/da ~ g_a(b)``, ``df/db ~ g_b(a)`` -- two ordinary GEMMs/convs on weights
  (resp. activations) mapped through the compact tables;
* ``lut2d``: full tables, through a (float) low-rank factorization of each gradient table
  (r GEMMs/convs) or the gather kernels.

With zero points (the ``...ZpFn`` functions, whose forward is a fused accumulator of
:mod:`appmult.nn.fused`), the gradients of the cross terms ``- qx Zw - Zx qw`` are
included. Gradients then flow through the quantizers' clipped straight-through
estimators. Every function here takes integer-valued float tensors and returns float
accumulators; the functional API in :mod:`appmult.nn.functional` wraps them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from . import exact_conv
from . import kernels as K
from .tables import GradMode, Kernel, LutTables, _idx, _idx32, _map_channels, _small_idx, _unfold_idx, lookup_rows


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` (a no-op context when it is not enabled), and on
    CUDA TF32 off for cuDNN convolutions and matmuls.

    The LUT sums are integer sums that float32 (or float64) holds exactly; autocast would run
    their convolutions and GEMMs in float16/bfloat16 and round them, and TF32 (on by default
    for cuDNN convolutions on Ampere and later) rounds float32 operands to 10 mantissa bits,
    so a low-rank factor above 2**11 would round. So the approximate layers, the functional
    API and the backward passes here compute with autocast and TF32 off, like the ops
    autocast itself keeps in float32. (TF32 is a process-wide switch: it is off for other
    threads' CUDA work while the block runs.) The convolutions whose sums must be exact go
    through :func:`appmult.nn.exact_conv.conv2d`, not cuDNN, whose Winograd and FFT
    algorithms round even without TF32.
    """
    if device_type == "cuda":
        return _cuda_full_float32()
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _cuda_full_float32():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    prev = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        if torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = prev


def _backward_without_autocast(backward):
    """Decorate an autograd ``backward`` to run with autocast off (autocast applies in
    backward when ``.backward()`` is called inside an autocast region)."""
    @functools.wraps(backward)
    def wrapper(ctx, grad):
        with _autocast_off(grad.device.type):
            return backward(ctx, grad)
    return wrapper

# ------------------------------------------------------------------------------------------
# Linear
# ------------------------------------------------------------------------------------------


def _linear_forward(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, exact: bool) -> torch.Tensor:
    # int32 indices (embedding takes them; a row gather, much faster than advanced indexing)
    ix, iw = _idx32(qx, tabs.lo_x), _idx32(qw, tabs.lo_w)
    m, k = ix.shape
    dtype = torch.float64 if exact else torch.float32
    if tabs.kernel is Kernel.LOWRANK and (not exact or k * tabs.bound < K.FP64_EXACT_LIMIT):
        r = tabs.u.shape[1]  # explicit sizes: an empty batch has no -1 to infer
        xu = lookup_rows(ix, tabs.u.to(dtype)).reshape(m, k * r)
        wv = lookup_rows(iw, tabs.v.to(dtype)).reshape(iw.shape[0], k * r)
        acc = xu @ wv.t()
        return torch.round(acc) if exact else acc
    out_dt = torch.int32 if k * tabs.max_abs < (1 << 31) else torch.int64
    a = _small_idx(ix, tabs.prod.shape[0]).t().unsqueeze(0)
    acc = K.gather_forward(a, _small_idx(iw, tabs.prod.shape[1]), tabs.prod, 1, out_dt)[0].t()
    return acc.to(device=qx.device, dtype=dtype)


def _cast(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient in ``dtype`` (``None``, the gradient of an input that needs none, stays ``None``)."""
    return None if g is None else g.to(dtype)


def _linear_backward(grad: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, zx=None, zw=None,
                     need: tuple[bool, bool] = (True, True)):
    """``(d/dqx, d/dqw)`` of ``sum LUT[qx, qw]`` (with the cross terms where ``zx``/``zw`` are
    given); a side whose ``need`` is false is ``None``, not computed (a first layer's input, a
    frozen weight: autograd's ``ctx.needs_input_grad``)."""
    dt = grad.dtype
    nx, nw = need
    if zx is not None:
        # with the cross terms -qx Zw - Zx qw (see _conv_backward)
        n = qw.shape[0]
        zwc = zw.detach().to(dt).reshape(n, 1) if zw.numel() > 1 else zw.detach().to(dt).reshape(())
        zxs = zx.detach().to(dt).reshape(())
        if tabs.grad is GradMode.STE:
            return (grad @ (qw.detach().to(dt) - zwc) if nx else None,
                    grad.t() @ (qx.detach().to(dt) - zxs) if nw else None)
        gx, gw = _linear_backward(grad, qx, qw, tabs, need=need)
        if nx:
            gx = gx - (grad @ torch.ones((n, 1), dtype=dt, device=grad.device).mul(zwc)).expand_as(gx)
        if nw:
            gw = gw - zxs * grad.sum(0).reshape(n, 1)
        return gx, gw
    if tabs.grad is GradMode.STE:
        return grad @ qw.detach().to(dt) if nx else None, grad.t() @ qx.detach().to(dt) if nw else None
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    if tabs.gx1 is not None:
        gx = grad @ tabs.gx1.to(dt)[iw] if nx else None
        gw = grad.t() @ tabs.gw1.to(dt)[ix] if nw else None
        return gx, gw
    m, k = ix.shape
    n = iw.shape[0]
    gx = gw = None
    if tabs.grad_kernel is Kernel.LOWRANK:
        ra, rb = tabs.gx_p.shape[1], tabs.gw_p.shape[1]
        if nx:
            t = (grad @ tabs.gx_q.to(dt)[iw].reshape(n, k * ra)).reshape(m, k, ra)
            gx = (t * tabs.gx_p.to(dt)[ix]).sum(-1)
        if nw:
            t2 = (grad.t() @ tabs.gw_p.to(dt)[ix].reshape(m, k * rb)).reshape(n, k, rb)
            gw = (t2 * tabs.gw_q.to(dt)[iw]).sum(-1)
        return gx, gw
    a = _small_idx(ix, tabs.prod.shape[0]).t().unsqueeze(0)
    b = _small_idx(iw, tabs.prod.shape[1])
    g = grad.t().unsqueeze(0)
    if nx:
        gx = K.gather_grad_a(a, b, tabs.gx2, g, 1)[0].t().to(device=grad.device, dtype=dt)
    if nw:
        gw = K.gather_grad_b(a, b, tabs.gw2, g, 1).to(device=grad.device, dtype=dt)
    return gx, gw


class _LutLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, exact: bool) -> torch.Tensor:
        ctx.save_for_backward(qx, qw)
        ctx.tabs = tabs
        return _linear_forward(qx, qw, tabs, exact)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad: torch.Tensor):
        qx, qw = ctx.saved_tensors
        gx, gw = _linear_backward(grad.contiguous(), qx, qw, ctx.tabs, need=ctx.needs_input_grad[:2])
        return _cast(gx, qx.dtype), _cast(gw, qw.dtype), None, None


def _linear_zp_backward(ctx, grad):
    """LUT backward of a linear accumulator with zero-point cross terms (both linear Functions)."""
    qx, qw, zx, zw = ctx.saved_tensors
    zargs = (None, None) if ctx.tabs.signed else (zx, zw)
    gx, gw = _linear_backward(grad.contiguous(), qx, qw, ctx.tabs, *zargs, need=ctx.needs_input_grad[:2])
    return _cast(gx, qx.dtype), _cast(gw, qw.dtype), None, None, None, None, None, None


class _LowRankLinearZpFn(torch.autograd.Function):
    """The whole integer accumulator ``sum LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` of a linear
    layer as one float32 ``addmm(C, U[qx], (V - c Zw)[qw].T)`` (weights, bias and the chunk
    length ``kc`` from :func:`appmult.nn.fused._folded_lowrank_weights` with ``split_k``):
    where that sum can exceed ``2**24`` (``C`` is then float64), one exact float32 GEMM per
    chunk of ``kc`` inputs, the chunks and ``C`` added in float64."""

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, wv, const, kc):
        m, k = qx.shape
        if tabs.u_is_value and qx.dtype == torch.float32:
            xu = qx.detach()  # rank 1 with U = value(x): the mapped operand is qx itself
        else:
            xu = lookup_rows(_idx32(qx, tabs.lo_x), tabs.u_f32)
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs = tabs
        xu = xu.reshape(m, wv.shape[1])
        if const.dtype == torch.float32:  # no split: the whole sum, bias included, is exact in float32
            return torch.addmm(const, xu, wv.t())
        r = wv.shape[1] // k
        acc = const.reshape(1, -1).expand(m, -1).clone()  # float64
        for c0 in range(0, k, kc):
            c1 = min(k, c0 + kc)
            acc += xu[:, c0 * r:c1 * r] @ wv[:, c0 * r:c1 * r].t()  # exact float32 partial sums
        return acc.to(torch.float32)

    backward = staticmethod(_backward_without_autocast(_linear_zp_backward))


class _AccLinearZpFn(torch.autograd.Function):
    """A linear accumulator (LUT sum plus cross terms) that a fused path of
    :mod:`appmult.nn.fused` computed without autograd (the numba weight-row gather), returned
    as ``dtype`` with the LUT's backward attached."""

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, acc, dtype):
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs = tabs
        if acc.dtype == dtype and acc.is_contiguous():
            return acc  # (the int8 GEMM's epilogue: a new row-major float32 tensor already)
        # one pass into a row-major result (the gather kernel's accumulator is a transposed view)
        return torch.empty(acc.shape, dtype=dtype, device=acc.device).copy_(acc)

    backward = staticmethod(_backward_without_autocast(_linear_zp_backward))


# ------------------------------------------------------------------------------------------
# Conv2d (input already padded with the activation zero point)
# ------------------------------------------------------------------------------------------

def _conv_forward(qx, qw, tabs: LutTables, stride, dilation, groups, exact: bool) -> torch.Tensor:
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    k = qw[0].numel()
    dtype = torch.float64 if exact else torch.float32
    if tabs.kernel is Kernel.LOWRANK and (not exact or k * tabs.bound < K.FP64_EXACT_LIMIT):
        xu = _map_channels(tabs.u, ix, dtype)
        wv = _map_channels(tabs.v, iw, dtype)
        acc = exact_conv.conv2d(xu, wv, None, stride, 0, dilation, groups)
        return torch.round(acc) if exact else acc
    n = qx.shape[0]
    kh, kw = qw.shape[2:]
    a = _unfold_idx(_small_idx(ix, tabs.prod.shape[0]), (kh, kw), stride, dilation)
    ho = (qx.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (qx.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out_dt = torch.int32 if k * tabs.max_abs < (1 << 31) else torch.int64
    acc = K.gather_forward(a, _small_idx(iw, tabs.prod.shape[1]).reshape(qw.shape[0], -1), tabs.prod, groups, out_dt)
    return acc.reshape(n, qw.shape[0], ho, wo).to(device=qx.device, dtype=dtype)


def _zero_point_input_term(grad, zwr, x_shape, kernel, stride, dilation, groups):
    """``conv2d_input`` of the weight whose entries of output channel ``o`` all equal
    ``Zw[o]`` (the input gradient of ``- qx Zw``): each group's ``sum_o Zw[o] grad[:, o]``
    spread over the receptive fields by a one-channel transposed convolution, the same for
    every input channel of the group -- one channel per group instead of ``C x Co``."""
    n, c, hp, wp = x_shape
    co = grad.shape[1]
    s = (grad * zwr.reshape(1, co, 1, 1) if zwr.dim() else grad * zwr)
    s = s.reshape(n, groups, co // groups, *grad.shape[2:]).sum(2)
    ones = torch.ones((groups, 1, *kernel), dtype=grad.dtype, device=grad.device)
    t = torch.nn.grad.conv2d_input((n, groups, hp, wp), ones, s, stride, 0, dilation, groups)
    return t.unsqueeze(2).expand(n, groups, c // groups, hp, wp).reshape(n, c, hp, wp)


def _conv_backward(grad, qx, qw, tabs: LutTables, stride, dilation, groups, zx=None, zw=None,
                   need: tuple[bool, bool] = (True, True)):
    """Gradients of ``sum LUT[qx, qw]`` w.r.t. the (padded) ``qx`` and ``qw``; a side whose
    ``need`` is false is ``None``, not computed (see :func:`_linear_backward`).

    With zero points ``zx``/``zw`` (tensors), the gradients of the cross terms
    ``- qx Zw - Zx qw`` are included: for the 1-D grad tables they fold into the mapped
    operands of the two convolutions (``g_a(w) - Zw``, ``g_b(x) - Zx``), otherwise they are
    subtracted.
    """
    dt = grad.dtype
    nx, nw = need
    cin_g = qw.shape[1]
    co = qw.shape[0]
    zp = zx is not None
    if zp:
        zwr = zw.detach().to(dt).reshape(co, 1, 1, 1) if zw.numel() > 1 else zw.detach().to(dt).reshape(())
        zxs = zx.detach().to(dt).reshape(())
    if tabs.grad is GradMode.STE:
        # The STE tables are the operand values: the mapped operands are qw and qx themselves
        # (no index conversion or gather over the activations).
        wmap = qw.detach().to(dt) - zwr if zp else qw.detach().to(dt)
        xmap = qx.detach().to(dt) - zxs if zp else qx.detach().to(dt)
        return _mapped_conv_grads(grad, wmap, xmap, qx.shape, qw.shape, stride, dilation, groups, need)
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    if tabs.gx1 is not None:
        wmap = xmap = None
        if nx:
            wmap = tabs.gx1.to(dt)[iw] - zwr if zp else tabs.gx1.to(dt)[iw]
        if nw:
            # shift the 2**w-entry table, not the gathered activations
            xmap = (tabs.gw1.to(dt) - zxs if zp else tabs.gw1.to(dt))[ix]
        return _mapped_conv_grads(grad, wmap, xmap, qx.shape, qw.shape, stride, dilation, groups, need)
    if zp:
        gx, gw = _conv_backward(grad, qx, qw, tabs, stride, dilation, groups, need=need)
        if nx:
            gx = gx - _zero_point_input_term(grad, zwr, qx.shape, qw.shape[2:], stride, dilation, groups)
        if nw:
            gw = gw - zxs * grad.sum((0, 2, 3)).reshape(co, 1, 1, 1)
        return gx, gw
    n, c, hp, wp = qx.shape
    co, _, kh, kw = qw.shape
    gx = gw = None
    if tabs.grad_kernel is Kernel.LOWRANK:
        ra, rb = tabs.gx_p.shape[1], tabs.gw_p.shape[1]
        if nx:
            t = torch.nn.grad.conv2d_input((n, c * ra, hp, wp), _map_channels(tabs.gx_q, iw, dt), grad,
                                           stride, 0, dilation, groups)
            gx = (t.reshape(n, c, ra, hp, wp) * _map_channels(tabs.gx_p, ix, dt).reshape(n, c, ra, hp, wp)).sum(2)
        if nw:
            xmap = _map_channels(tabs.gw_p, ix, dt)
            t2 = torch.nn.grad.conv2d_weight(_nchw(xmap), (co, cin_g * rb, kh, kw), grad, stride, 0, dilation,
                                             groups)
            gw = (t2.reshape(co, cin_g, rb, kh, kw)
                  * _map_channels(tabs.gw_q, iw, dt).reshape(co, cin_g, rb, kh, kw)).sum(2)
        return gx, gw
    a = _unfold_idx(_small_idx(ix, tabs.prod.shape[0]), (kh, kw), stride, dilation)
    b = _small_idx(iw, tabs.prod.shape[1]).reshape(co, -1)
    g = grad.reshape(n, co, -1)
    if nx:
        cols = K.gather_grad_a(a, b, tabs.gx2, g, groups).to(device=grad.device, dtype=dt)
        gx = K.fold(cols, (hp, wp), (kh, kw), stride, dilation)
    if nw:
        gw = K.gather_grad_b(a, b, tabs.gw2, g, groups).reshape(qw.shape).to(device=grad.device, dtype=dt)
    return gx, gw


def _mapped_conv_grads(grad, wmap, xmap, x_shape, w_shape, stride, dilation, groups, need):
    """``(conv2d_input(wmap), conv2d_weight(xmap))`` of ``grad``, each only where ``need`` says
    (``None`` otherwise): the backward of a conv whose operands are mapped one by one."""
    gx = torch.nn.grad.conv2d_input(x_shape, wmap, grad, stride, 0, dilation, groups) if need[0] else None
    gw = torch.nn.grad.conv2d_weight(_nchw(xmap), w_shape, grad, stride, 0, dilation, groups) if need[1] else None
    return gx, gw


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous NCHW tensor for a weight gradient: torch 2.13's oneDNN weight
    gradient of a channels-last input writes out of bounds for some geometries (a 1x1
    kernel, stride (2, 1), a padded row the stride skips, batch 67: heap corruption, then a
    crash; a channels-last ``grad`` as well does not avoid it) -- of an NCHW one it does not
    (``tests/test_nn_conv_weight_grad_layouts.py``). A no-op for the NCHW maps."""
    return x.contiguous()


class _LutConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qx, qw, tabs: LutTables, stride, dilation, groups: int, exact: bool) -> torch.Tensor:
        ctx.save_for_backward(qx, qw)
        ctx.tabs, ctx.geom = tabs, (stride, dilation, groups)
        return _conv_forward(qx, qw, tabs, stride, dilation, groups, exact)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        qx, qw = ctx.saved_tensors
        gx, gw = _conv_backward(grad.contiguous(), qx, qw, ctx.tabs, *ctx.geom, need=ctx.needs_input_grad[:2])
        return _cast(gx, qx.dtype), _cast(gw, qw.dtype), None, None, None, None, None


def _zp_conv_backward(ctx, grad):
    """Gradients of a fused conv accumulator (LUT sum plus cross terms) w.r.t. unpadded qx, qw."""
    qx, qw, zx, zw = ctx.saved_tensors
    return _zp_conv_grads(grad, qx, qw, zx, zw, ctx.tabs, ctx.geom, ctx.needs_input_grad[:2])


def _zp_conv_grads(grad, qx, qw, zx, zw, tabs: LutTables, geom, need: tuple[bool, bool]):
    """:func:`_zp_conv_backward` from its operands: ``(d/dqx, d/dqw)`` of the accumulator of
    the unpadded ``qx`` with geometry ``geom`` (``(padding, stride, dilation, groups)``), each
    only where ``need`` asks (else ``None``)."""
    (ph, pw), stride, dilation, groups = geom
    zargs = (None, None) if tabs.signed else (zx, zw)
    if tabs.grad is GradMode.STE and not (tabs.signed and float(zx) != 0.0):
        # (a signed LUT has no cross terms: its padding, Zx, is 0 after no shift only when Zx = 0)
        gx, gw = _ste_conv_backward(grad.contiguous(), qx, qw, (ph, pw), stride, dilation, groups, *zargs,
                                    need=need)
        return _cast(gx, qx.dtype), _cast(gw, qw.dtype)
    qxp = F.pad(qx, (pw, pw, ph, ph), value=float(zx)) if (ph or pw) else qx
    gx, gw = _conv_backward(grad.contiguous(), qxp, qw, tabs, stride, dilation, groups, *zargs, need=need)
    if gx is not None and (ph or pw):
        gx = gx[:, :, ph:ph + qx.shape[2], pw:pw + qx.shape[3]]
    return _cast(gx, qx.dtype), _cast(gw, qw.dtype)


def _ste_conv_backward(grad, qx, qw, padding, stride, dilation, groups, zx=None, zw=None,
                       need: tuple[bool, bool] = (True, True)):
    """The STE gradients of a padded conv accumulator (with the cross terms' where ``zx``/``zw``
    are given) w.r.t. the unpadded ``qx`` and ``qw``, by one ``convolution_backward`` call.

    ``d/dqx = conv_input(qw - Zw)`` and ``d/dqw = conv_weight(qx_padded - Zx)``; the padded
    positions hold ``Zx``, i.e. 0 after the shift, so the convolution pads by itself: no
    padded copy of ``qx``, no slice of a padded gradient (whose strides made the quantizer's
    backward take its torch path), and the two gradients in one call, as torch's own conv --
    or only the one ``need`` asks for (the other ``None``; the operand it alone uses then
    only gives its shape, unshifted).
    """
    dt = grad.dtype
    wmap, xmap = qw.detach().to(dt), qx.detach().to(dt)
    if zx is not None:
        co = qw.shape[0]
        if need[0]:
            wmap = wmap - (zw.detach().to(dt).reshape(co, 1, 1, 1) if zw.numel() > 1
                           else zw.detach().to(dt).reshape(()))
        if need[1] and float(zx) != 0.0:  # ReLU inputs: Zx = 0, qx as is
            xmap = xmap - zx.detach().to(dt).reshape(())
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, _nchw(xmap) if need[1] else xmap, wmap, None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [bool(need[0]), bool(need[1]), False])
    return gx, gw


class _LowRankConvZpFn(torch.autograd.Function):
    """The whole integer accumulator ``sum LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` of a
    padded conv as one float32 low-rank convolution (weights and bias from
    :func:`appmult.nn.fused._folded_lowrank_weights`).

    Forward: activation indices (int32) are padded with the zero point's index, mapped
    through ``U`` straight into a channels-last tensor, and convolved with the folded
    weights and bias. Backward: the LUT's grad rule plus the cross terms' gradients.
    """

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, wv, const, padding, stride, dilation, groups):
        ph, pw = padding
        zidx = int(round(float(zx))) - tabs.lo_x
        # int32 indices padded with the zero point's index (a numba value -> U-row pass was
        # measured slower than torch's embedding here), mapped straight to channels-last.
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs, ctx.geom = tabs, (padding, stride, dilation, groups)
        if tabs.u_is_value:
            # rank 1 with U = value(x) (e.g. the exact product): the mapped operand is qx itself
            q = qx.detach().to(torch.float32)
            xu = F.pad(q, (pw, pw, ph, ph), value=float(zidx + tabs.lo_x)) if (ph or pw) else q
        else:
            idx = _idx32(qx, tabs.lo_x)
            if ph or pw:
                idx = F.pad(idx, (pw, pw, ph, ph), value=zidx)
            xu = _map_channels(tabs.u_f32, idx, torch.float32)
        return exact_conv.conv2d(xu, wv, const, stride, 0, dilation, groups)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        gx, gw = _zp_conv_backward(ctx, grad)
        return gx, gw, None, None, None, None, None, None, None, None, None


class _AccConvZpFn(torch.autograd.Function):
    """A conv accumulator (LUT sum plus cross terms) that a fused path of
    :mod:`appmult.nn.fused` computed without autograd -- the numba row kernel or the rank-1
    shifted convolution -- returned as ``dtype`` with the LUT's backward attached."""

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, acc, dtype, padding, stride, dilation, groups):
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs, ctx.geom = tabs, (padding, stride, dilation, groups)
        return acc.to(dtype)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        gx, gw = _zp_conv_backward(ctx, grad)
        return gx, gw, None, None, None, None, None, None, None, None, None
