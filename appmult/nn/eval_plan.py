"""Inference forwards on the fused low-rank paths as three calls, their set-up kept.

An eval forward of :class:`~appmult.nn.layers.ApproxConv2d` whose LUT's activation factor
is the activation's own value (rank 1: the exact product, weight-side approximations) is
one quantizing pass, one float32 convolution with folded weights and one dequantizing
pass; one of :class:`~appmult.nn.layers.ApproxLinear` with a low-rank LUT whose factors
fit int8 is one quantizing pass, one int8 GEMM and one epilogue pass. Done through the
general path (quantizer, weight cache, functional dispatch, fused kernels,
dequantization), each call also re-derives a dozen small things from tensors -- the
activation scale, the per-channel output scale and bias, the numpy views the numba passes
take, the dispatch's switches -- about 170 us of Python and small torch ops a call on
this 2-core machine: a LeNet conv took 2.2-3.4x the float layer for a batch of one where
its three passes take 1.15x (``benchmarks/README.md``).

:func:`conv_forward` and :func:`linear_forward` keep them in a plan stored with the
layer's weight cache (so dropped with it whenever the weight changes) under a key of
everything else it was derived from: the activation range (its values), the LUT tables
and the bias's bits. A plan applies only where the general path would take the same
kernels with nothing autograd must see; everywhere else they return ``None`` and the
caller takes the general path. The arithmetic is the general path's, operation for
operation (the same numba quantization, folded weights, convolution or int8 GEMM, and
dequantization), so the same bits; ``tests/test_nn_eval_plan.py`` compares the two.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import functional as FN
from . import kernels as K
from . import quant_loops as loops
from .fused import _folded_lowrank_weights, _int8_epilogue, _rank1_mapped_prep, _rank1_prep
from .quant import _non_finite
from .tables import Kernel

__all__ = ["ENABLED", "ActQuant", "ConvPlan", "LinearPlan", "conv_forward", "linear_forward"]

#: Whether layers use their plans: ``None`` follows the environment (``APPMULT_NO_EVAL_PLAN``
#: set to a non-empty value turns them off, read at each call), ``True``/``False`` overrides it.
ENABLED: bool | None = None
#: The weight-cache entry holding ``(key, plan or None)``.
_ENTRY = "eval_plan"
#: The empty mask array of :func:`~appmult.nn.quant_loops.fake_quant` (no mask wanted).
_NO_MASK = np.empty((0, 0), np.bool_)
#: The empty sums array of :func:`~appmult.nn.quant_loops.quantize_map` (no cross term).
_NO_SUMS = np.empty((0, 0, 0, 0), np.float32)


class ActQuant(NamedTuple):
    """The frozen activation quantization as :func:`~appmult.nn.quant_loops.fake_quant` takes it."""

    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int


class ConvPlan(NamedTuple):
    """What a rank-1 convolution's eval forward needs besides the input, derived once."""

    act: ActQuant
    #: The convolution's input per activation code (``U - U[Zx]``, float32, indexed by
    #: ``code - qmin``) for one numba pass from ``x``; ``None``: the codes themselves (``U =
    #: value(x)`` and ``Zx = 0``).
    table: np.ndarray | None
    #: The folded or mapped weights and the convolution's bias
    #: (:func:`~appmult.nn.fused._rank1_prep`, :func:`~appmult.nn.fused._rank1_mapped_prep`).
    weight: torch.Tensor
    conv_bias: torch.Tensor
    #: ``-Zw`` per output channel (float32) where the ``- Zw_j S`` cross term is added
    #: (:func:`~appmult.nn.fused._rank1_mapped_conv`), else ``None``.
    nzw: np.ndarray | None
    #: ``sx * sw`` one per output channel (float32).
    out_scale: np.ndarray
    #: The layer's bias as the plan uses it and compares it (float32; empty: none).
    bias: np.ndarray


class LinearPlan(NamedTuple):
    """What a low-rank linear layer's eval forward needs besides the input, derived once."""

    act: ActQuant
    #: The int8 GEMM's weight side (:func:`~appmult.nn.functional._lowrank_linear_sides`).
    prep: tuple
    #: ``sx * sw`` (one value or one per output) and the bias, float32 tensors for the epilogue.
    out_scale: torch.Tensor
    out_bias: torch.Tensor | None
    #: The layer's bias as compared (float32; empty: none).
    bias: np.ndarray


def conv_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output for the 4-D, non-empty ``x`` by its kept :class:`ConvPlan`, or
    ``None`` where the plan does not apply (then nothing has changed)."""
    if not (_applies(layer, x) and layer._modules["lut"].rank == 1):
        return None
    plan = _kept(layer, _conv_plan)
    if plan is None:
        return None
    stride, padding, dilation, groups = layer.stride, layer._padding(), layer.dilation, layer.groups
    sums = None
    if plan.table is None:
        xs = _quantized(layer, plan.act, x)
    else:
        xs, sums = _quantized_mapped(layer, plan, x, groups)
    y = F.conv2d(xs, plan.weight, plan.conv_bias, stride, padding, dilation, groups)
    y = y.contiguous()  # (it is: the input is; a no-op)
    if sums is None:
        loops.dequantize_channels(y.reshape(y.shape[0], y.shape[1], -1).numpy(), plan.out_scale, plan.bias)
    else:
        kh, kw = plan.weight.shape[2:]
        geom = np.array([kh, kw, stride[0], stride[1], dilation[0], dilation[1]], np.int64)
        loops.dequantize_channels_zw(y.numpy(), sums.numpy(), geom, plan.nzw, plan.out_scale, plan.bias)
    return y


def linear_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s ``(M, N)`` output for the ``(M, K)``, non-empty ``x`` by its kept
    :class:`LinearPlan`, or ``None`` where the plan does not apply (nothing has changed)."""
    if not (_applies(layer, x) and FN._fused_on(FN._INT8_GEMM, "APPMULT_NO_INT8_GEMM")):
        return None  # (checked here, not only by the prep: a plan made without it would stay None)
    plan = _kept(layer, _linear_plan)
    if plan is None:
        return None
    return _int8_epilogue(_quantized(layer, plan.act, x), plan.prep, layer._modules["lut"], plan.out_scale,
                          plan.out_bias)


def _applies(layer, x: torch.Tensor) -> bool:
    """Whether the general path would run a fused low-rank kernel and the numba passes on
    ``x`` with nothing autograd must see (cheap checks, the module's dicts read directly:
    each ``nn.Module`` attribute lookup costs about a microsecond; the rest is decided when
    the plan is made)."""
    mods = layer._modules
    (w, b), aq, tabs = layer._weight_bias(), mods["act_quant"], mods["lut"]
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 \
            or not x.is_contiguous():
        return False  # (an input on another device than the weight: the general path's torch error)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    if layer.correction is not None or layer.exact_multiplication or layer.config.exact_accumulate:
        return False
    updating = aq.training if aq.observing is None else aq.observing
    if updating or not aq._buffers["initialized"].item():
        return False
    return tabs.kernel is Kernel.LOWRANK and K.numba_available() \
        and FN._fused_on(FN._FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK") and FN._fused_on(ENABLED, "APPMULT_NO_EVAL_PLAN")


def _kept(layer, make):
    """The layer's plan (``None``: none applies), made by ``make(layer, qw, sw, zw, tables)``
    where the weight cache holds none for the current activation range, tables and bias."""
    (qw, sw, zw), tables = layer._quantized_weight()  # the weight checked as the general path does
    if tables is None:
        return None
    aq = layer._modules["act_quant"]
    buffers = aq._buffers
    # the tables themselves, not their id: a plan holding them keeps their id from being reused
    key = (buffers["min_val"].item(), buffers["max_val"].item(), aq.width, aq.signed, layer._modules["lut"])
    entry = tables.get(_ENTRY)
    if entry is None or entry[0] != key or not _same_bias(entry[1], layer._weight_bias()[1]):
        entry = (key, make(layer, qw, sw, zw, tables))
        tables[_ENTRY] = entry
    return entry[1]


def _same_bias(plan: ConvPlan | LinearPlan | None, bias: torch.Tensor | None) -> bool:
    """Whether ``bias`` holds the bits the plan was made with (written through ``.data`` its
    version counter does not change: compared, a few kilobytes at most)."""
    if plan is None:
        return True
    if bias is None:
        return plan.bias.size == 0
    return plan.bias.size == bias.numel() and plan.bias.tobytes() == bias.detach().numpy().tobytes()


def _act_quant(layer) -> tuple[ActQuant, torch.Tensor, torch.Tensor] | None:
    """``(ActQuant, sx, zx)`` of the frozen activation quantizer, or ``None`` where its
    scale or zero point is not float32 (the numba pass's)."""
    aq = layer._modules["act_quant"]
    sx, zx = aq._kept_scale_zero_point()
    if sx.dtype != torch.float32 or zx.dtype != torch.float32:
        return None
    act = ActQuant(sx.detach().reshape(1).numpy().copy(), zx.detach().reshape(1).numpy().copy(), aq.qmin, aq.qmax)
    return act, sx, zx


def _bias_bits(layer) -> np.ndarray:
    bias = layer._weight_bias()[1]
    return np.empty(0, np.float32) if bias is None else bias.detach().to(torch.float32).reshape(-1).numpy().copy()


def _conv_plan(layer, qw, sw, zw, tables: dict) -> ConvPlan | None:
    """The convolution's plan from the general path's own pieces (shared cache entries), or
    ``None``: the fused rank-1 convolution of ``qx - Zx`` where the LUT's ``U`` is the
    activation's value and the fold applies, else the mapped one where its prep does."""
    tabs, aqz = layer._modules["lut"], _act_quant(layer)
    if aqz is None:
        return None
    act, sx, zx = aqz
    zxf = float(zx)
    if tabs.u_is_value:
        fold = FN._cached(tables, ("fold", tabs, zxf),
                          lambda: _folded_lowrank_weights(qw, zx, zw, tabs, chunks=True))
        if fold is None or len(fold) == 3:  # no fold, or runs of channels: not the rank-1 convolution
            return None
        wv, const = fold
        r1 = FN._cached(tables, ("rank1", tabs, zxf), lambda: _rank1_prep(zx, wv, const, tabs))
        if r1 is False:
            return None
        weight, conv_bias, nzw = r1[0], r1[1], None
        table = None if zxf == 0.0 else np.arange(act.qmin, act.qmax + 1, dtype=np.float32) - np.float32(zxf)
    else:
        m1 = FN._cached(tables, ("rank1map", tabs, zxf), lambda: _rank1_mapped_prep(qw, zx, zw, tabs))
        if m1 is False or not tabs.lo_x <= act.qmin <= act.qmax < tabs.lo_x + m1[2].numel():
            return None
        weight, conv_bias, ushift, nz = m1
        table = ushift[act.qmin - tabs.lo_x:act.qmax - tabs.lo_x + 1].numpy().copy()
        nzw = None if nz is None else nz.numpy().copy()
    co = qw.shape[0]
    scale = (sx * (sw.reshape(1, co, 1, 1) if sw.dim() else sw)).to(torch.float32)
    return ConvPlan(act=act, table=table, weight=weight, conv_bias=conv_bias, nzw=nzw,
                    out_scale=scale.detach().reshape(-1).expand(co).contiguous().numpy().copy(),
                    bias=_bias_bits(layer))


def _linear_plan(layer, qw, sw, zw, tables: dict) -> LinearPlan | None:
    """The linear layer's plan from the general path's own pieces (shared cache entries), or
    ``None`` where :func:`~appmult.nn.fused._int8_linear_out` would not run."""
    tabs, aqz = layer._modules["lut"], _act_quant(layer)
    if aqz is None:
        return None
    act, sx, zx = aqz
    _, prep = FN._lowrank_linear_sides(qw, zx, zw, tabs, tables)
    if prep is False:
        return None
    n = prep[1].shape[0]
    scale = (sx * (sw.reshape(1, -1) if sw.dim() else sw)).to(torch.float32).detach().reshape(-1)
    bias = _bias_bits(layer)
    if scale.numel() not in (1, n) or bias.size not in (0, n):
        return None
    return LinearPlan(act=act, prep=prep, out_scale=scale, out_bias=torch.from_numpy(bias) if bias.size else None,
                      bias=bias)


def _quantized_mapped(layer, plan: ConvPlan, x: torch.Tensor, groups: int):
    """``(table[codes of x], sums or None)`` by one numba pass (refusing NaN/Inf as the
    quantizer does): the convolution's input and, where the plan adds ``- Zw_j S``, the
    channel sums of ``x - Zx`` per group, zero-padded as the convolution pads ``(N, G, H +
    2 ph, W + 2 pw)``."""
    n, c, h, w = x.shape
    a = torch.empty_like(x)
    sums = None
    if plan.nzw is not None:
        ph, pw = layer._padding()
        sums = torch.empty((n, groups, h + 2 * ph, w + 2 * pw), dtype=torch.float32)
    act = plan.act
    tops = loops.quantize_map(x.detach().numpy(), act.scale, act.zero, act.qmin, act.qmax, plan.table, groups,
                              np.float32(act.zero[0]), a.numpy(), _NO_SUMS if sums is None else sums.numpy())
    if tops >= loops.NON_FINITE:
        raise _non_finite(type(layer).__name__)
    return a, sums


def _quantized(layer, act: ActQuant, x: torch.Tensor) -> torch.Tensor:
    """``x``'s codes by the numba pass (refusing NaN/Inf as the quantizer does)."""
    q = torch.empty_like(x)
    tops = loops.fake_quant(x.detach().reshape(1, -1).numpy(), act.scale, act.zero, act.qmin, act.qmax,
                            q.reshape(1, -1).numpy(), _NO_MASK)
    if tops >= loops.NON_FINITE:
        raise _non_finite(type(layer).__name__)
    return q
