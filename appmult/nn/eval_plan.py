"""A convolution's inference forward on the rank-1 path as three calls, its set-up kept.

An eval forward of :class:`~appmult.nn.layers.ApproxConv2d` whose LUT's activation factor
is the activation's own value (rank 1: the exact product, DRUM-like tables) is one
quantizing pass, one float32 convolution with folded weights and one dequantizing pass.
Done through the general path (quantizer, weight cache, functional dispatch, fused
kernels, dequantization) each call also re-derives a dozen small things from tensors --
the activation scale, the per-channel output scale and bias, the numpy views the numba
passes take, the dispatch's switches -- about 170 us of Python and small torch ops a
call on this 2-core machine: 2.2x the float layer for a batch of one, 1.3-1.6x for a
batch of 128 (``benchmarks/bench_nn.py``).

:func:`conv_forward` keeps them in a :class:`ConvPlan`, stored with the layer's weight
cache (so dropped with it whenever the weight changes) under a key of everything else it
was derived from: the activation range, the LUT tables, the geometry, the bias's values.
It applies only where the general path would take the fused rank-1 convolution and the
numba passes, without anything autograd must see; everywhere else it returns ``None``
and the caller takes the general path. The arithmetic is the general path's, operation
for operation (the same numba quantization, the same folded weights and convolution, the
same dequantization), so the same bits; ``tests/test_nn_eval_plan.py`` compares the two.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import functional as FN
from . import kernels as K
from . import quant_loops as loops
from .fused import _folded_lowrank_weights, _rank1_prep
from .quant import _non_finite
from .tables import Kernel

__all__ = ["ENABLED", "ConvPlan", "conv_forward"]

#: Whether layers use their plans: ``None`` follows the environment (``APPMULT_NO_EVAL_PLAN``
#: set to a non-empty value turns them off, read at each call), ``True``/``False`` overrides it.
ENABLED: bool | None = None
#: The weight-cache entry holding ``(key, plan or None)``.
_ENTRY = "eval_plan"
#: The empty mask array of :func:`~appmult.nn.quant_loops.fake_quant` (no mask wanted).
_NO_MASK = np.empty((0, 0), np.bool_)


class ConvPlan(NamedTuple):
    """What a rank-1 eval forward needs besides the input, derived once."""

    #: The activation scale and zero point as :func:`~appmult.nn.quant_loops.fake_quant` takes them.
    act_scale: np.ndarray
    act_zero: np.ndarray
    qmin: int
    qmax: int
    #: ``float(Zx)``: the convolution runs on ``qx - Zx`` (``qx`` itself when 0).
    zx: float
    #: The folded rank-1 weights and the convolution's bias (:func:`~appmult.nn.fused._rank1_prep`).
    weight: torch.Tensor
    conv_bias: torch.Tensor
    #: ``sx * sw`` and the layer's bias, one per output channel (float32; empty: no bias).
    out_scale: np.ndarray
    out_bias: np.ndarray


def conv_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output for the 4-D, non-empty ``x`` by its kept :class:`ConvPlan`, or
    ``None`` where the plan does not apply (then nothing has changed)."""
    if not _applies(layer, x):
        return None
    (qw, sw, zw), tables = layer._quantized_weight()  # the weight checked as the general path does
    if tables is None:
        return None
    aq, buffers = layer._modules["act_quant"], layer._modules["act_quant"]._buffers
    key = (buffers["min_val"].item(), buffers["max_val"].item(), aq.width, aq.signed, id(layer._modules["lut"]))
    entry = tables.get(_ENTRY)
    if entry is None or entry[0] != key or not _same_bias(entry[1], layer.bias):
        entry = (key, _plan(layer, qw, sw, zw, tables))
        tables[_ENTRY] = entry
    plan = entry[1]
    if plan is None:
        return None
    return _run(layer, plan, x)


def _applies(layer, x: torch.Tensor) -> bool:
    """Whether the general path would run the fused rank-1 convolution and the numba passes
    on ``x`` with nothing autograd must see (cheap checks, the module's dicts read directly:
    each ``nn.Module`` attribute lookup costs about a microsecond; the rest is in :func:`_plan`)."""
    params, mods = layer._parameters, layer._modules
    w, b, aq, tabs = params["weight"], params["bias"], mods["act_quant"], mods["lut"]
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or not x.is_contiguous():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    if layer.correction is not None or layer.exact_multiplication or layer.config.exact_accumulate or not tabs.u_is_value:
        return False
    updating = aq.training if aq.observing is None else aq.observing
    if updating or not aq._buffers["initialized"].item():
        return False
    return tabs.kernel is Kernel.LOWRANK and K.numba_available() \
        and FN._fused_on(FN._FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK") and FN._fused_on(ENABLED, "APPMULT_NO_EVAL_PLAN")


def _same_bias(plan: ConvPlan | None, bias: torch.Tensor | None) -> bool:
    """Whether ``bias`` holds the bits the plan was made with (written through ``.data`` its
    version counter does not change: compared, a few hundred bytes at most)."""
    if plan is None:
        return True
    if bias is None:
        return plan.out_bias.size == 0
    return plan.out_bias.size == bias.numel() and plan.out_bias.tobytes() == bias.detach().numpy().tobytes()


def _plan(layer, qw, sw, zw, tables: dict) -> ConvPlan | None:
    """The plan from the general path's own pieces (shared cache entries), or ``None``."""
    tabs = layer.lut
    sx, zx = layer.act_quant._kept_scale_zero_point()
    if sx.dtype != torch.float32 or zx.dtype != torch.float32 or sw.dtype != torch.float32:
        return None
    zxf = float(zx)
    fold = FN._cached(tables, ("fold", id(tabs), zxf), lambda: _folded_lowrank_weights(qw, zx, zw, tabs, chunks=True))
    if fold is None or len(fold) == 3:  # no fold, or runs of channels: not the rank-1 convolution
        return None
    wv, const = fold
    r1 = FN._cached(tables, ("rank1", id(tabs), zxf), lambda: _rank1_prep(zx, wv, const, tabs))
    if r1 is False:
        return None
    co = qw.shape[0]
    scale = (sx * (sw.reshape(1, co, 1, 1) if sw.dim() else sw)).to(torch.float32)
    bias = layer.bias
    return ConvPlan(
        act_scale=sx.detach().reshape(1).numpy().copy(), act_zero=zx.detach().reshape(1).numpy().copy(),
        qmin=layer.act_quant.qmin, qmax=layer.act_quant.qmax, zx=zxf, weight=r1[0], conv_bias=r1[1],
        out_scale=scale.detach().reshape(-1).expand(co).contiguous().numpy().copy(),
        out_bias=np.empty(0, np.float32) if bias is None else bias.detach().to(torch.float32).reshape(-1).numpy().copy())


def _run(layer, plan: ConvPlan, x: torch.Tensor) -> torch.Tensor:
    """Quantize (refusing NaN/Inf as the quantizer does), convolve, dequantize."""
    q = torch.empty_like(x)
    tops = loops.fake_quant(x.detach().reshape(1, -1).numpy(), plan.act_scale, plan.act_zero, plan.qmin, plan.qmax,
                            q.reshape(1, -1).numpy(), _NO_MASK)
    if tops >= loops.NON_FINITE:
        raise _non_finite(type(layer).__name__)
    xs = q if plan.zx == 0.0 else q - plan.zx
    y = F.conv2d(xs, plan.weight, plan.conv_bias, layer.stride, layer._padding(), layer.dilation, layer.groups)
    y = y.contiguous()  # (it is: the input is; a no-op)
    loops.dequantize_channels(y.reshape(y.shape[0], y.shape[1], -1).numpy(), plan.out_scale, plan.out_bias)
    return y
