"""Training forwards of :class:`~appmult.nn.layers.ApproxLinear` on the int8 path as one autograd node.

A training step of the linear layer through the general path is a chain of small pieces:
the weight's and the activation's fake quantization (each an autograd node carrying the
straight-through gradient), the int8 GEMM's weight side, the GEMM and its epilogue (an
autograd node carrying the LUT's backward), then the dequantization (a multiply and a
bias add, two more nodes). Each piece is a few tensors and Python calls; together about
0.35 ms of the forward and 0.15 ms of the backward whatever the layer's size (measured on
this 2-core machine at 4 x 16 -> 16: 358 + 175 us against 16 + 48 for ``nn.Linear``), a
third of a 512 -> 512 layer's whole step.

:func:`linear_forward` computes the same things once, without autograd in between: the
weight's codes and mask (:func:`~appmult.nn.quant._fused_channel_quant`), the
activation's (the observer updated as the general path does), the int8 weight side
(:func:`~appmult.nn.fused._int8_value_prep` or :func:`~appmult.nn.fused._int8_mapped_prep`)
and the GEMM with its epilogue, scale and bias in one numba pass -- and returns them as
one node (:class:`_LinearStepFn`) whose backward runs the general path's backward
operations in the same order: ``grad * scale``, the LUT's backward
(:func:`~appmult.nn.autograd._linear_backward`), the straight-through masks, the bias's
sum. So the same bits, forward and backward; ``tests/test_nn_train_plan.py`` compares the
two.

It applies where the general path would take the same kernels: the CPU, float32, numba,
per-channel weights whose gradient is wanted, a low-rank LUT whose int8 weight side can be
made from the codes (the exact product's and DRUM's rank 1; for ``kernel="auto"``, once its
probe picked ``lowrank`` for this shape), no correction, no exact accumulation. Everywhere
else it returns ``None`` before anything has changed, and the caller takes the general path;
where the int8 weight side turns out not to apply after the observer was updated, the general
path continues from the codes already made.
"""

from __future__ import annotations

import torch

from . import functional as FN
from . import kernels as K
from . import quant as Q
from .autograd import _linear_backward
from .config import WeightScheme
from .fused import _int8_epilogue
from .tables import Kernel

__all__ = ["ENABLED", "linear_forward"]

#: Whether layers use the one-node training step: ``None`` follows the environment
#: (``APPMULT_NO_TRAIN_PLAN`` set to a non-empty value turns it off, read at each call),
#: ``True``/``False`` overrides it.
ENABLED: bool | None = None


def linear_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s ``(M, N)`` training output for the ``(M, K)``, non-empty ``x`` as one
    autograd node, or ``None`` where that does not apply (then nothing has changed)."""
    tabs = _tables(layer, x)
    if tabs is None:
        return None
    w, bias = layer._weight_bias()
    wq, aq = layer._modules["weight_quant"], layer._modules["act_quant"]
    name = type(layer).__name__
    wcodes = Q._fused_channel_quant(w, wq, mask=True)
    if wcodes is None:
        return None
    qw, inside_w, sw, zw, finite = wcodes
    if not finite:
        raise Q._non_finite_weight(name)
    layer._check_weight_scale(sw, torch.float32)
    qx, inside_x, sx, zx = aq.codes(x, name)  # the observer updates here
    sides = FN._lowrank_linear_sides(qw, zx, zw, tabs, None)
    prep = sides[1]
    if prep is False:  # no int8 weight side: the general path from these codes and this weight side
        qxt = Q._FakeQuantSTE.apply(x, sx, zx, aq.qmin, aq.qmax, None, (qx, inside_x))
        qwt = Q._FakeQuantSTE.apply(w, sw, zw, wq.qmin, wq.qmax, None, (qw, inside_w))
        return FN._approx_linear(qxt, sx, zx, qwt, sw, zw, bias, tabs, sides=sides)
    scale = sx * sw.reshape(1, -1)
    return _LinearStepFn.apply(x, w, bias, (qx, inside_x, sx, zx), (qw, inside_w, sw, zw), tabs, prep, scale)


def _tables(layer, x: torch.Tensor):
    """The layer's LUT tables where the one-node step applies to ``x`` (cheap checks first,
    the module's dicts read directly), else ``None``."""
    mods = layer._modules
    (w, b), tabs = layer._weight_bias(), mods["lut"]
    if not (torch.is_grad_enabled() and w.requires_grad) or x.device.type != "cpu" or w.device.type != "cpu" \
            or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() \
            or w.dim() != 2 or (b is not None and (b.dtype != torch.float32 or b.device.type != "cpu")):
        return None
    if layer.correction is not None or layer.exact_multiplication or layer.config.exact_accumulate \
            or mods["weight_quant"].scheme is not WeightScheme.PER_CHANNEL:
        return None
    if not (K.numba_available() and FN._fused_on(ENABLED, "APPMULT_NO_TRAIN_PLAN")
            and FN._fused_on(FN._FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK")
            and FN._fused_on(FN._INT8_GEMM, "APPMULT_NO_INT8_GEMM")):
        return None
    if tabs.rank != 1:
        return None  # (higher ranks: no one-plane int8 weight side, as a rule)
    kernel = tabs.kernel
    if FN._probes(tabs):
        kernel = FN._probed_linear_kernel(tabs, x, w)
    return tabs if kernel is Kernel.LOWRANK else None


class _LinearStepFn(torch.autograd.Function):
    """The linear layer's training step from its codes: forward by the int8 GEMM and one
    epilogue pass (``f32(acc) * scale + bias``), backward as the general path's nodes
    (dequantization, LUT backward, straight-through estimators, bias)."""

    @staticmethod
    def forward(ctx, x, w, bias, act, weight, tabs, prep, scale):
        qx, inside_x, sx, zx = act
        qw, inside_w, sw, zw = weight
        ctx.save_for_backward(qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale)
        ctx.tabs = tabs
        return _int8_epilogue(qx, prep, tabs, scale, None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx, grad):
        qx, qw, zx, zw, inside_x, inside_w, sx, sw, scale = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        gacc = grad * scale
        zargs = (None, None) if ctx.tabs.signed else (zx, zw)
        gx, gw = _linear_backward(gacc.contiguous(), qx, qw, ctx.tabs, *zargs, need=(nx, nw))
        gx = Q._ste_backward(gx, inside_x, sx) if nx else None
        gw = Q._ste_backward(gw, inside_w, sw) if nw else None
        gb = grad.sum_to_size(grad.shape[-1]) if nb else None
        return gx, gw, gb, None, None, None, None, None
