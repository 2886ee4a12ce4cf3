"""Training steps of the approximate layers on their fused rank-1 paths as one autograd node.

A training step through the general path is a chain of small pieces: the weight's and the
activation's fake quantization (each an autograd node carrying the straight-through
gradient), the fused accumulator (the linear layer's int8 GEMM with its weight side, a
convolution's rank-1 convolution; an autograd node carrying the LUT's backward), then the
dequantization (a multiply and a bias add, two more nodes). Each piece is a few tensors and
Python calls; together about 0.35 ms of a linear layer's forward and 0.15 ms of its
backward whatever its size (measured on this 2-core machine at 4 x 16 -> 16: 358 + 175 us
against 16 + 48 for ``nn.Linear``), a third of a 512 -> 512 layer's whole step; a small
convolution's about as much.

:func:`linear_forward` and :func:`conv_forward` compute the same things once, without
autograd in between: the weight's codes and mask (:func:`~appmult.nn.quant._fused_channel_quant`),
the activation's (the observer updated as the general path does), then the accumulator by
the general path's own functions -- for the linear layer the int8 weight side
(:func:`~appmult.nn.functional._lowrank_linear_sides`) and the GEMM with its epilogue, scale
and bias in one numba pass; for a convolution :func:`~appmult.nn.functional._fused_conv_acc`
and one dequantizing pass -- and return them as one node (:class:`_LinearStepFn`,
:class:`_ConvStepFn`) whose backward runs the general path's backward operations in the
same order, autocast off as there: ``grad * scale``, the LUT's backward, the
straight-through masks, the bias's sum. So the same bits, forward and backward;
``tests/test_nn_train_plan.py`` compares the two. For the linear layer with the exact
product or a looked-up weight factor (DRUM) even the codes, masks and int8 sides take only
two numba passes (:func:`_int8_step_codes`): what was left of its fixed cost was mostly the
tensors and calls between a dozen small pieces.

They apply where the general path would take the same kernels: the CPU, float32, numba,
per-channel weights whose gradient is wanted, a rank-1 LUT on the low-rank kernel (for
``kernel="auto"``, once its probe picked ``lowrank`` for this shape), no correction, no
exact accumulation. Everywhere else they return ``None`` before anything has changed, and
the caller takes the general path; where the fused accumulator turns out not to apply after
the observer was updated, the general path continues from the codes already made.
"""

from __future__ import annotations

import numpy as np
import torch

from . import functional as FN
from . import fused as _fused
from . import int8_loops as _int8_loops
from . import kernels as K
from . import quant as Q
from . import quant_loops as _quant_loops
from .autograd import _backward_without_autocast, _linear_backward, _zp_conv_grads
from .config import WeightScheme
from .functional import _pair
from .fused import _int8_epilogue
from .tables import GradMode, Kernel

__all__ = ["ENABLED", "conv_forward", "linear_forward"]

#: Whether layers use the one-node training step: ``None`` follows the environment
#: (``APPMULT_NO_TRAIN_PLAN`` set to a non-empty value turns it off, read at each call),
#: ``True``/``False`` overrides it.
ENABLED: bool | None = None


def linear_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s ``(M, N)`` training output for the ``(M, K)``, non-empty ``x`` as one
    autograd node, or ``None`` where that does not apply (then nothing has changed)."""
    w, bias = layer._weight_bias()
    tabs = _tables(layer, x, w, bias, 2)
    # (the key _approx_linear probes under: per-channel Zw, no weight cache)
    if tabs is None or not _takes_lowrank(tabs, x, lambda: FN._linear_key(x.shape, w.shape, (w.shape[0], 1),
                                                                           False, False)):
        return None
    kind = _int8_step_kind(x, w, tabs)
    made = None if kind is None else _int8_step_codes(layer, x, w, tabs, kind)
    if made is not None:
        act, weight, prep, a, centered = made
        scale = act[2] * weight[2].reshape(1, -1)
        return _LinearStepFn.apply(x, w, bias, act, weight, tabs, prep, scale, (a, centered))
    codes = _codes(layer, x, w)
    if codes is None:
        return None
    act, weight = codes
    sides = FN._lowrank_linear_sides(weight[0], act[3], weight[3], tabs, None)
    prep = sides[1]
    if prep is False:  # no int8 weight side: the general path from these codes and this weight side
        return FN._approx_linear(*_ste_nodes(layer, x, act, w, weight), bias, tabs, sides=sides)
    scale = act[2] * weight[2].reshape(1, -1)
    return _LinearStepFn.apply(x, w, bias, act, weight, tabs, prep, scale, (None, False))


def conv_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s training output for the 4-D, non-empty ``x`` as one autograd node (the
    accumulator by the general path's fused rank-1 convolution), or ``None`` where that does
    not apply (then nothing has changed)."""
    w, bias = layer._weight_bias()
    tabs = _tables(layer, x, w, bias, 4)
    if tabs is None:
        return None
    stride, padding, dilation, groups = _pair(layer.stride), layer._padding(), _pair(layer.dilation), layer.groups
    if not _takes_lowrank(tabs, x, lambda: FN._conv_key(x.shape, w.shape, (w.shape[0], 1, 1, 1), stride, padding,
                                                        dilation, groups, False, False)):
        return None
    codes = _codes(layer, x, w)
    if codes is None:
        return None
    act, weight = codes
    geom = (padding, stride, dilation, groups)
    acc = FN._fused_conv_acc(act[0], weight[0], act[3], weight[3], tabs, geom, torch.float32, False, None)
    if acc is None:  # no fused accumulator: the general path from these codes
        return FN._approx_conv2d(*_ste_nodes(layer, x, act, w, weight), bias, tabs, stride=stride, padding=padding,
                                 dilation=dilation, groups=groups)
    scale = act[2] * weight[2].reshape(1, -1, 1, 1)
    return _ConvStepFn.apply(x, w, bias, act, weight, tabs, [acc], scale, geom)


def _tables(layer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dims: int):
    """The layer's LUT tables where the one-node step may apply to ``x`` with the weight
    ``w`` and bias ``b`` (``dims``: 2 for a linear layer, 4 for a convolution; cheap checks,
    the module's dicts read directly), else ``None``. The kernel is :func:`_takes_lowrank`'s
    to check."""
    mods = layer._modules
    tabs = mods["lut"]
    if not (torch.is_grad_enabled() and w.requires_grad) or x.device.type != "cpu" or w.device.type != "cpu" \
            or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() != dims or not x.is_contiguous() \
            or w.dim() != dims or (b is not None and (b.dtype != torch.float32 or b.device.type != "cpu")):
        return None
    if layer.correction is not None or layer.exact_multiplication or layer.config.exact_accumulate \
            or mods["weight_quant"].scheme is not WeightScheme.PER_CHANNEL:
        return None
    if not (K.numba_available() and FN._fused_on(ENABLED, "APPMULT_NO_TRAIN_PLAN")
            and FN._fused_on(FN._FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK")
            and (dims == 4 or FN._fused_on(FN._INT8_GEMM, "APPMULT_NO_INT8_GEMM"))):
        return None
    return tabs if tabs.rank == 1 else None  # (higher ranks: no one-plane int8 side, no fused rank-1 conv)


def _takes_lowrank(tabs, x: torch.Tensor, key) -> bool:
    """Whether the general path would run the low-rank kernel: the configured one, or for an
    ``auto`` table the one its probe picked for the call of ``key()`` (not probed yet: no)."""
    if FN._probes(tabs):
        return FN._probed_kernel(tabs, key(), x) is Kernel.LOWRANK
    return tabs.kernel is Kernel.LOWRANK


def _codes(layer, x: torch.Tensor, w: torch.Tensor):
    """``(act, weight)``: the activation's ``(q, inside, scale, zero_point)`` (the observer
    updated) and the weight ``w``'s; the weight's first, so a refused weight changes no
    observer. ``None`` (nothing changed) where the weight's numba pass does not run."""
    name = type(layer).__name__
    wcodes = Q._fused_channel_quant(w, layer._modules["weight_quant"], mask=True)
    if wcodes is None:
        return None
    qw, inside_w, sw, zw, finite = wcodes
    if not finite:
        raise Q._non_finite_weight(name)
    layer._check_weight_scale(sw, torch.float32)
    act = layer._modules["act_quant"].codes(x, name)  # the observer updates here
    return act, (qw, inside_w, sw, zw)


#: The steps :func:`_int8_step_codes` makes: the exact product's (``U``, ``V`` the values) and
#: a LUT whose weight factor ``V`` is a look-up (DRUM).
VALUE, MAPPED = "value", "mapped"

_NO_VTAB = np.empty(0, np.int32)


def _int8_step_kind(x: torch.Tensor, w: torch.Tensor, tabs) -> str | None:
    """Which step :func:`_int8_step_codes` makes for this call (:data:`VALUE`, :data:`MAPPED`),
    or ``None``: where the general path's int8 weight side would be
    :func:`~appmult.nn.fused._int8_value_prep_8bit`'s or
    :func:`~appmult.nn.fused._int8_mapped_prep`'s -- 8-bit weight codes (one int8 offset
    holds them), an activation factor spanning at most 255 integers (the exact product's:
    8-bit activation codes), one digit plane (the rank-1 table, CPU float32 operands and
    numba checked by :func:`_tables`). The row constants stay far below float64's exact
    range for any ``K`` the int8 GEMM takes (``|const| <= 255 * 255 * K``), so no bound is
    checked."""
    k = x.shape[1]
    if not (tabs.prod.shape[1] <= 256 and hasattr(torch, "_int_mm") and _fused.INT8_GEMM_MAX_PLANES >= 1
            and 2 <= k <= _fused.INT8_GEMM_MAX_K and w.is_contiguous()):
        return None
    umin, umax = _fused._factor_range(tabs)
    if umax - umin > 255:
        return None
    if tabs.v_is_value:
        return VALUE
    if not tabs.signed and tabs.value_coef is None and tabs.u.shape[1] == 1 and _fused._v_int32(tabs) is not None:
        return MAPPED
    return None


def _int8_step_codes(layer, x: torch.Tensor, w: torch.Tensor, tabs, kind: str):
    """``(act, weight, prep, a, centered)`` of a training step by two numba passes: the codes
    and masks of :func:`_codes`, the int8 GEMM's weight side ``prep`` of
    :func:`~appmult.nn.fused._int8_value_prep_8bit` (``kind`` :data:`VALUE`) or
    :func:`~appmult.nn.fused._int8_mapped_prep` (:data:`MAPPED`) and the activation side
    ``a`` of :func:`~appmult.nn.fused._int8_linear_dots` -- the same values, without two
    dozen small tensors and calls between them (each a few microseconds in a step whose
    layer may take less than the float layer's 0.1 ms). ``None`` (nothing changed) where a
    weight row's looked-up values span more than one int8 plane. The weight first
    (:func:`_weight_step`): a refused weight changes no observer; then the activation's
    (:meth:`~appmult.nn.quant.ActivationQuantizer.step_codes`). ``centered`` (the exact
    product with an unsigned LUT and the straight-through backward): the returned codes
    are the backward's operands, codes minus zero points (see :class:`_LinearStepFn`)."""
    mapped = kind == MAPPED
    centered = not mapped and tabs.grad is GradMode.STE and not tabs.signed
    made = _weight_step(layer, w, tabs, mapped, centered)
    if made is None:
        return None
    weight, b, sums, ow = made
    ox = int(_fused._factor_range(tabs)[0]) + 128
    u8 = _fused._u8_table(tabs, ox) if mapped else None
    a = torch.empty(x.shape, dtype=torch.int8)
    act = layer._modules["act_quant"].step_codes(
        x, type(layer).__name__, (a.numpy(), ox, Q._NO_TABLE if u8 is None else u8.numpy().reshape(-1),
                                  int(tabs.lo_x), centered))
    if act is None:  # (an observer range that is not float32 on the CPU: nothing has changed)
        return None
    zwv = weight[3].numpy().reshape(-1)
    c = np.empty(b.shape[0])
    _int8_loops.step_constants(sums, b.shape[1], zwv, float(act[3]), tabs.signed, float(ox), float(tabs.lo_w),
                               mapped, c, ow)
    zw_row = torch.from_numpy(zwv.astype(np.float64)) if mapped else None   # (mapped: unsigned)
    prep = (b, torch.from_numpy(c), torch.from_numpy(ow), ox, u8, zw_row, 1)
    return act, weight, prep, a, centered


def _weight_step(layer, w: torch.Tensor, tabs, mapped: bool, centered: bool):
    """``((qw, inside_w, sw, zw), b, sums, ow)`` of :func:`appmult.nn.int8_loops.weight_step`
    for ``w`` (``sums``, ``ow``: its row sums and offsets, for
    :func:`~appmult.nn.int8_loops.step_constants`), or ``None`` where a row of looked-up
    weights spans more than one int8 plane. A non-finite or too wide weight raises the
    general path's errors."""
    name = type(layer).__name__
    n, k = w.shape
    wq = layer._modules["weight_quant"]
    qw, inside_w = torch.empty((n, k), dtype=torch.float32), torch.empty((n, k), dtype=torch.bool)
    sw, zw = torch.empty((n, 1), dtype=torch.float32), torch.empty((n, 1), dtype=torch.float32)
    b = torch.empty((n, k), dtype=torch.int8)
    sums, ow = np.empty((n, 2), np.int64), np.empty(n)
    tops, wide, bad = _int8_loops.weight_step(
        w.detach().numpy(), wq.qmin, wq.qmax, wq.signed, float(tabs.lo_w) + 128.0,
        _fused._v_int32(tabs) if mapped else _NO_VTAB, int(tabs.lo_w), centered, sw.numpy().reshape(-1),
        zw.numpy().reshape(-1), qw.numpy(), inside_w.numpy(), b.numpy(), sums, ow)
    if tops >= _quant_loops.NON_FINITE:
        raise Q._non_finite_weight(name)
    if wide:
        layer._check_weight_scale(sw, torch.float32)
    return None if bad else ((qw, inside_w, sw, zw), b, sums, ow)


def _ste_nodes(layer, x: torch.Tensor, act, w: torch.Tensor, weight) -> tuple:
    """``(qx, sx, zx, qw, sw, zw)`` for the general path, the codes carried by straight-through nodes."""
    aq, wq = layer._modules["act_quant"], layer._modules["weight_quant"]
    qx, inside_x, sx, zx = act
    qw, inside_w, sw, zw = weight
    qxt = Q._FakeQuantSTE.apply(x, sx, zx, aq.qmin, aq.qmax, None, (qx, inside_x))
    qwt = Q._FakeQuantSTE.apply(w, sw, zw, wq.qmin, wq.qmax, None, (qw, inside_w))
    return qxt, sx, zx, qwt, sw, zw


def _straight_through(ctx, gx, gw, inside_x, sx, inside_w, sw):
    """The two straight-through estimators of a step's backward (``None`` where not needed)."""
    nx, nw = ctx.needs_input_grad[:2]
    return (Q._ste_backward(gx, inside_x, sx) if nx else None, Q._ste_backward(gw, inside_w, sw) if nw else None)


class _LinearStepFn(torch.autograd.Function):
    """The linear layer's training step from its codes: forward by the int8 GEMM and one
    epilogue pass (``f32(acc) * scale + bias``), backward as the general path's nodes
    (dequantization, LUT backward, straight-through estimators, bias). ``side``: ``(a,
    centered)``, the int8 activation side where already made, and whether ``act``'s and
    ``weight``'s codes are centered (minus their zero points: then the backward's
    straight-through products take them as they are, ``grad @ (qw - Zw)`` and
    ``grad.t() @ (qx - Zx)`` as :func:`~appmult.nn.autograd._linear_backward`)."""

    @staticmethod
    def forward(ctx, x, w, bias, act, weight, tabs, prep, scale, side):
        qx, inside_x, sx, zx = act
        qw, inside_w, sw, zw = weight
        a, ctx.centered = side
        ctx.save_for_backward(qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale)
        ctx.tabs = tabs
        return _int8_epilogue(qx, prep, tabs, scale, None if bias is None else bias.detach(), a)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        gacc = (grad * scale).contiguous()
        if ctx.centered:  # qx, qw: codes minus zero points, the straight-through products' operands
            gx, gw = gacc @ qw if nx else None, gacc.t() @ qx if nw else None
        else:
            zargs = (None, None) if ctx.tabs.signed else (zx, zw)
            gx, gw = _linear_backward(gacc, qx, qw, ctx.tabs, *zargs, need=(nx, nw))
        if ctx.centered and not torch.is_grad_enabled():
            # the products' outputs are float32 CPU and contiguous, the scales' layouts known:
            # _ste_backward's numba pass without its checks (~3 us a pass), as _int8_epilogue
            # is _int8_linear_out's
            gx = None if gx is None else Q._ste_rows(gx, inside_x, sx, 1)
            gw = None if gw is None else Q._ste_rows(gw, inside_w, sw, qw.shape[0])
        else:
            gx, gw = _straight_through(ctx, gx, gw, inside_x, sx, inside_w, sw)
        gb = grad.sum_to_size(grad.shape[-1]) if nb else None
        return gx, gw, gb, None, None, None, None, None, None


class _ConvStepFn(torch.autograd.Function):
    """The convolution's training step from its codes and the fused accumulator (``box``:
    a one-element list, so that autograd does not take it for an input): forward by one
    dequantizing pass in place, backward as the general path's nodes (dequantization, the
    fused accumulator's LUT backward, straight-through estimators, bias)."""

    @staticmethod
    def forward(ctx, x, w, bias, act, weight, tabs, box, scale, geom):
        qx, inside_x, sx, zx = act
        qw, inside_w, sw, zw = weight
        ctx.save_for_backward(qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale)
        ctx.tabs, ctx.geom = tabs, geom
        acc = box.pop()
        return FN._dequantize(acc, scale, None if bias is None else bias.detach().reshape(1, -1, 1, 1), acc.dtype)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad):
        qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        gx, gw = _zp_conv_grads(grad * scale, qx, qw, zx, zw, ctx.tabs, ctx.geom, (nx, nw))
        gx, gw = _straight_through(ctx, gx, gw, inside_x, sx, inside_w, sw)
        gb = grad.sum_to_size(1, grad.shape[1], 1, 1).reshape(-1) if nb else None
        return gx, gw, gb, None, None, None, None, None, None
