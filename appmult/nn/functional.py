"""The functional API of LUT-exact products: linear, conv2d and matmul.

Two levels:

* :func:`lut_linear` / :func:`lut_conv2d`: raw accumulators ``sum LUT[qx, qw]`` of
  integer-valued operands, with the LUT's backward rule (see :mod:`appmult.nn.autograd`).
* :func:`approx_linear` / :func:`approx_conv2d`: what a quantized layer computes -- the
  accumulator with the zero-point cross terms, dequantized -- taking the fused fast paths
  of :mod:`appmult.nn.fused` where they are bit-exact; :func:`approx_matmul` for two
  activations (e.g. attention scores), quantized on the fly.

Tables come from :class:`~appmult.nn.tables.LutTables` (operand roles and indexing are
described there).

Precision. Every output accumulates ``sum_k LUT[qx_k, qw_k]`` over its receptive field:

* ``exact=True`` (or :meth:`~appmult.nn.ApproxLinear.int_forward`): float64 low-rank
  (exact while ``K * S < 2**53``) or int32/int64 gather -- bit for bit the LUT sum.
* default (training): low-rank in float32, which is *also exact* whenever
  ``K * S < 2**24`` (``S`` = largest ``sum_r |U V|`` of one product, e.g. 16384 for the
  exact signed 8x8 product, so every K < 1024); the gather path is always exact (int32).
  Where ``K * S >= 2**24`` the float32 low-rank sum may round: each of the ``n = K*r``
  additions errs by at most ``2**-24`` times the running sum, so
  ``|error| <= n * 2**-24 * K * S`` (the classical dot-product bound). For an unsigned 8x8
  truncated LUT (S ~ 65216) and K = 400 (r = 5) that is at most ~0.3% of the largest
  possible accumulator, and in practice (random-order errors) about ``sqrt(n)`` times
  smaller: ~1 unit, against the multiplier's own accumulated error of MAE * K (a 4-column
  truncation has MAE ~ 8, so ~3200 per output). ``ApproxConfig(exact_accumulate=True)``
  removes the question. The fused low-rank paths do not round: a linear reduction too
  long for one exact float32 GEMM is split into chunks that are each exact in float32 and
  added in float64 (:func:`appmult.nn.fused._folded_lowrank_weights` with ``split_k``); a
  convolution is bounded by its folded weights' own sums and, beyond that, cut into runs
  of input channels the same way (``chunks``; ungrouped convolutions); the rounding above
  remains possible on the unfused paths (LUTs whose factors do not carry ``value(x)``,
  grouped convolutions beyond the bound).

Gradients flow through the LUT's backward rule, the zero-point cross terms (ordinary
torch ops, or folded into the fused functions' backward) and the quantizers' clipped
straight-through estimators.

Switches. Setting ``APPMULT_NO_FUSED_LOWRANK`` or ``APPMULT_NO_FUSED_GATHER`` to a
non-empty value turns the fused low-rank (resp. gather) path off, to measure or bisect
against the plain path; they are read at each call. (The layers' inference shortcut
around this module, :mod:`appmult.nn.eval_plan`, has ``APPMULT_NO_EVAL_PLAN``; the
layers' one-node training steps, :mod:`appmult.nn.train_plan`, ``APPMULT_NO_TRAIN_PLAN``.)
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidValueError
from ..lut_gen.lutfile import LutFile
from . import exact_conv
from . import kernels as K
from . import quant_loops, switches
from .autograd import (_AccConvZpFn, _AccLinearZpFn, _autocast_off, _LowRankConvZpFn, _LowRankLinearZpFn,
                       _LutConv2dFn, _LutLinearFn)
from .config import load_lut
from .fused import (_chunked_lowrank_conv, _folded_lowrank_weights, _gather_conv_zp, _gather_linear_prep, _gather_linear_zp,
                    _int8_linear_acc, _int8_linear_out, _int8_linear_prep, _int8_mapped_prep, _int8_one_plane_prep, _int8_value_prep, _int8_unfolded_prep, _rank1_mapped_conv, _value_rank1_prep, _rank1_mapped_prep, _rank1_prep, _rank1_shifted_conv)
from .quant import ActivationQuantizer, check_finite
from .tables import GradMode, Kernel, LutTables

__all__ = [
    "approx_conv2d",
    "approx_linear",
    "approx_matmul",
    "lut_conv2d",
    "lut_linear",
]

#: Fused low-rank path on (``True``), off (``False``) or as the environment says at each call
#: (``None``: off when ``APPMULT_NO_FUSED_LOWRANK`` is set to a non-empty value).
_FUSED_LOWRANK: bool | None = None
#: Fused numba gather conv (cross terms folded into its rows) and linear (weight-row kernel,
#: accumulators initialized with the cross terms); CPU, 8-bit tables: as above, with
#: ``APPMULT_NO_FUSED_GATHER``.
_FUSED_GATHER: bool | None = None
#: The folded low-rank linear layer as one exact int8 GEMM where its factors fit int8
#: (CPU; :func:`appmult.nn.fused._int8_linear_prep`): as above, with ``APPMULT_NO_INT8_GEMM``.
_INT8_GEMM: bool | None = None


def _fused_on(override: bool | None, env: str) -> bool:
    """A fused-path switch: the module-level override, else the environment, read now."""
    if override is not None:
        return bool(override)
    return not switches.is_set(env)


# ------------------------------------------------------------------------------------------
# Raw LUT accumulators
# ------------------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _probes(tabs: LutTables | None) -> bool:
    """Whether this call should take the automatic choice's probe (an ``auto`` table with more
    than one kernel, not already inside a forced kernel, probing on)."""
    return tabs is not None and len(tabs.auto_candidates) > 1 and K.forced(tabs) is None and K.probe_enabled()


def _with_auto_kernel(tabs: LutTables, key: tuple, ref: torch.Tensor, run):
    """``run()`` with the kernel :func:`~appmult.nn.kernels.probe_choice` picked for ``key``
    (timing each candidate on these operands, without autograd, the first time)."""
    key = _probe_key(tabs, key, ref)
    choice = K.probe_cached(key)  # (every forward after the first: no candidates built)
    if choice is None:
        def forced(kernel):
            def go():
                with K.forced_kernel(tabs, kernel), torch.no_grad():
                    run()
            return go

        choice = K.probe_choice(key, {c: forced(c) for c in tabs.auto_candidates}, ref.device)
    with K.forced_kernel(tabs, choice):
        return run()


def _probe_key(tabs: LutTables, key: tuple, ref: torch.Tensor) -> tuple:
    """The automatic choice's cache key: a call's ``key`` with what else the cost depends on."""
    return key + (tabs.sha256, tabs.activation_operand, tabs.grad.value, tabs.auto_candidates, str(ref.device),
                  ref.dtype)


def _linear_key(qx_shape, qw_shape, zw_shape, exact: bool, cached: bool) -> tuple:
    """The automatic choice's key of a linear call (before :func:`_probe_key`)."""
    return ("linear", tuple(qx_shape), tuple(qw_shape), tuple(zw_shape), exact, cached)


def _conv_key(qx_shape, qw_shape, zw_shape, stride, padding, dilation, groups, exact: bool, cached: bool) -> tuple:
    """The automatic choice's key of a convolution (before :func:`_probe_key`)."""
    return ("conv2d", tuple(qx_shape), tuple(qw_shape), tuple(zw_shape), _pair(stride), _pair(padding),
            _pair(dilation), int(groups), exact, cached)


def _probed_kernel(tabs: LutTables, key: tuple, ref: torch.Tensor) -> Kernel | None:
    """The kernel the automatic choice picked for a call of ``key`` (:func:`_linear_key`,
    :func:`_conv_key`) on operands like ``ref``, or ``None`` where it has not been probed."""
    choice = K.probe_cached(_probe_key(tabs, key, ref))
    return None if choice is None else Kernel(choice)


def lut_linear(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, *, exact: bool = False) -> torch.Tensor:
    """``acc[m, n] = sum_k LUT[qx[m, k], qw[n, k]]`` with the LUT's backward rule.

    Args:
        qx: integer-valued activations ``(M, K)`` (float dtype), in the LUT's value range.
        qw: integer-valued weights ``(N, K)`` (torch ``Linear`` layout).
        tabs: the LUT tables.
        exact: accumulate exactly (float64 / integer); otherwise float32 (see module notes).

    Returns:
        ``(M, N)`` accumulators (float32, or float64 when ``exact``), integer-valued.

    Raises:
        InvalidValueError: an operand outside the LUT's value range (or NaN).
    """
    _check_codes(qx, qw, tabs, "lut_linear")
    with _autocast_off(qx.device.type):
        if _probes(tabs):
            return _with_auto_kernel(tabs, ("lut_linear", tuple(qx.shape), tuple(qw.shape), exact), qx,
                                     lambda: _LutLinearFn.apply(qx, qw, tabs, exact))
        return _LutLinearFn.apply(qx, qw, tabs, exact)


def lut_conv2d(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, *, stride=1, dilation=1, groups: int = 1,
               exact: bool = False) -> torch.Tensor:
    """``acc[n, j, p] = sum LUT[qx, qw]`` over each receptive field (no padding: pad ``qx`` first).

    Args:
        qx: integer-valued activations ``(N, C, H, W)``, already padded with the zero point.
        qw: integer-valued weights ``(Co, C/groups, kh, kw)``.
        tabs: the LUT tables.
        stride: conv stride.
        dilation: conv dilation.
        groups: conv groups.
        exact: accumulate exactly (float64 / integer).

    Returns:
        ``(N, Co, Ho, Wo)`` accumulators, integer-valued.

    Raises:
        InvalidValueError: an operand outside the LUT's value range (or NaN).
    """
    _check_codes(qx, qw, tabs, "lut_conv2d")
    geom = (_pair(stride), _pair(dilation), int(groups))
    with _autocast_off(qx.device.type):
        if _probes(tabs):
            return _with_auto_kernel(tabs, ("lut_conv2d", tuple(qx.shape), tuple(qw.shape), geom, exact), qx,
                                     lambda: _LutConv2dFn.apply(qx, qw, tabs, *geom, exact))
        return _LutConv2dFn.apply(qx, qw, tabs, *geom, exact)


# ------------------------------------------------------------------------------------------
# Quantized layers' arithmetic (shared by the modules and the functional API)
# ------------------------------------------------------------------------------------------

def _check_codes(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, what: str) -> None:
    """Refuse operands outside the LUT's value range (NaN included) before they become indices.

    The functional API takes operands from the caller; the layers' own operands are in range
    by construction (finite inputs and weights, clamped by the quantizers), so they skip this.
    """
    for q, lo, n, role in ((qx, tabs.lo_x, tabs.prod.shape[0], "activations"),
                           (qw, tabs.lo_w, tabs.prod.shape[1], "weights")):
        if q.numel() == 0:
            continue
        qd = q.detach()
        fraction = (qd - torch.round(qd)).abs().amax() if qd.is_floating_point() else qd.new_zeros(())
        mn, mx, frac = torch.stack([*torch.aminmax(qd), fraction]).tolist()  # one host sync
        if not (mn >= lo and mx <= lo + n - 1):  # also false for NaN
            raise InvalidValueError(f"{what}: quantized {role} must be integers in [{lo}, {lo + n - 1}] (the LUT's "
                                    f"operand range), got values in [{mn:g}, {mx:g}]")
        if frac != 0:  # (a value of 1.5 used to be truncated to the index of 1)
            raise InvalidValueError(f"{what}: quantized {role} must be integers in [{lo}, {lo + n - 1}] (the LUT's "
                                    f"operand range), got non-integer values (fractional part up to {frac:g})")


def _check_quantization(sx, zx, sw, zw, outputs: int, what: str) -> None:
    """Refuse activation scales and zero points of more than one value, and weight scales
    and zero points of neither one value nor one per output: broadcasting would otherwise
    turn them into extra outputs (an ``(M, 2)`` result for one output and two zero
    points) or mix outputs silently."""
    for t, name, per_output in ((sx, "activation scale", False), (zx, "activation zero point", False),
                                (sw, "weight scale", True), (zw, "weight zero point", True)):
        n = torch.as_tensor(t).numel()
        if n != 1 and not (per_output and n == outputs):
            allowed = f"one value or one per output ({outputs})" if per_output else "one value"
            raise InvalidValueError(f"{what}: the {name} must hold {allowed}, got {n} values")


def _check_padding_code(zx, tabs: LutTables, what: str) -> None:
    """Refuse an activation zero point that is not an activation code of the LUT where
    padding inserts it as one (every path indexes the LUT at ``Zx`` for padded positions;
    outside the codes the fused paths would compute a number where the plain one raises)."""
    z = float(zx)
    lo, hi = tabs.lo_x, tabs.lo_x + tabs.prod.shape[0] - 1
    if not (lo <= z <= hi and z == round(z)):  # also false for NaN (compared first: round(NaN) raises)
        raise InvalidValueError(f"{what}: padding inserts the activation zero point as a code, so it must be an "
                                f"integer in [{lo}, {hi}] (the LUT's operand range), got {z:g}")


def _check_symmetric(zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables, what: str) -> None:
    """Refuse zero points with a signed LUT: its products are of signed codes, quantized
    symmetrically, and no cross terms are computed for it -- non-zero zero points would be
    dropped silently."""
    if tabs.signed and (bool(torch.as_tensor(zx).ne(0).any()) or bool(torch.as_tensor(zw).ne(0).any())):
        raise InvalidValueError(f"{what}: a signed LUT takes symmetrically quantized operands (zero points 0), "
                                f"got activation zero point {torch.as_tensor(zx).detach().flatten()[:4].tolist()} "
                                f"and weight zero points {torch.as_tensor(zw).detach().flatten()[:4].tolist()}; "
                                f"quantize symmetrically or use an unsigned LUT")


def _cached(cache: dict | None, key, make):
    """``make()``, memoized in ``cache`` (a layer's weight-side cache, cleared when its weight
    or its LUT tables change; ``None``: no caching). Keys hold the LUT tables object itself,
    not its ``id``: a key holding it keeps the id from being reused by other tables (with
    ``id(tabs)``, tables swapped into a layer at a freed object's address got the old LUT's
    fold: wrong outputs, no error)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _broadcasts_into(t: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``t`` broadcasts to ``target``'s shape without enlarging it (an in-place
    operand); ``torch.broadcast_shapes`` in plain Python, several times faster."""
    if t.dim() > target.dim():
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(t.shape), reversed(target.shape)))


def _dequantize(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.Tensor:
    """``scale * acc + bias`` (same operations, same order), in place on the fresh accumulator
    where autograd allows it: each new full-size tensor costs page faults on first touch.
    A convolution's float32 accumulator on the CPU takes one numba pass for both."""
    if _dequantize_channels(acc, scale, bias):
        return acc.to(dtype)
    if acc.requires_grad or scale.requires_grad or scale.dtype != acc.dtype or not _broadcasts_into(scale, acc):
        y = scale * acc
    else:
        y = acc.mul_(scale)
    if bias is not None:
        # y is new here (never a leaf, and mul's backward does not need it): add in place --
        # but not a bias that needs a gradient into a y that does not (a frozen weight and an
        # input without grad): y may be the accumulator a custom Function returned as is,
        # which autograd treats as a view made without grad and refuses to modify so
        if not _broadcasts_into(bias, y) or y.dtype != torch.promote_types(y.dtype, bias.dtype) \
                or (bias.requires_grad and not y.requires_grad and torch.is_grad_enabled()):
            y = y + bias
        else:
            y.add_(bias)
    return y.to(dtype)


def _dequantize_channels(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``acc * scale + bias`` in place by :func:`~appmult.nn.quant_loops.dequantize_channels`
    where it applies -- a contiguous float32 ``(N, C, ...)`` CPU accumulator, float32 scale
    and bias of one value or one per channel (``(1, C, 1, ...)``), nothing that autograd
    must see -- and whether it did (the same bits as ``mul_`` then ``add_``)."""
    if acc.dim() < 3 or acc.device.type != "cpu" or acc.dtype != torch.float32 or not acc.is_contiguous() \
            or not (quant_loops.AVAILABLE and K.numba_available()):
        return False
    if torch.is_grad_enabled() and (acc.requires_grad or scale.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    channels = acc.shape[1]
    sides = [scale] if bias is None else [scale, bias]
    if not all(t.dtype == torch.float32 and t.device == acc.device and _one_per_channel(t, acc) for t in sides):
        return False
    per_channel = [t.detach().reshape(-1).expand(channels).contiguous().numpy() for t in sides]
    quant_loops.dequantize_channels(acc.detach().reshape(acc.shape[0], channels, -1).numpy(), per_channel[0],
                                    per_channel[1] if bias is not None else _NO_BIAS)
    return True


def _one_per_channel(t: torch.Tensor, acc: torch.Tensor) -> bool:
    """Whether ``t`` broadcasts into ``acc`` as one value, or one per index of dim 1."""
    lead = acc.dim() - t.dim()  # broadcasting aligns the last dims
    if lead < 0:
        return False
    if t.numel() == 1:
        return True
    axis = 1 - lead  # acc's dim 1 in t
    return axis >= 0 and t.numel() == acc.shape[1] == t.shape[axis]


#: The empty bias of :func:`~appmult.nn.quant_loops.dequantize_channels` (adds nothing).
_NO_BIAS = np.empty(0, np.float32)


def approx_linear(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  zw: torch.Tensor, bias: torch.Tensor | None, tabs: LutTables | None, *,
                  exact: bool = False, cache: dict | None = None) -> torch.Tensor:
    """Dequantized linear output from quantized operands.

    ``y = sx * sw * sum_k (AM(qx, qw) - qx*zw - zx*qw + zx*zw) + bias``; with ``tabs=None``
    the exact product replaces ``AM`` (exact-multiplication mode).

    Args:
        qx: ``(M, K)`` integer-valued activations.
        sx: activation scale (scalar).
        zx: activation zero point (scalar).
        qw: ``(N, K)`` integer-valued weights.
        sw: weight scale, per tensor or ``(N, 1)`` per channel.
        zw: weight zero point, per tensor or ``(N, 1)`` per channel.
        bias: optional ``(N,)``.
        tabs: LUT tables, or ``None`` for exact multiplication.
        exact: exact accumulation.
        cache: optional dict for weight-side tables derived from ``qw``/``zw`` (and ``zx``);
            the caller must pass a fresh one whenever the weights change.

    Returns:
        ``(M, N)`` output in ``qx``'s dtype (computed in float32 or wider: float16/bfloat16
        sums would round).

    Raises:
        InvalidValueError: an operand outside the LUT's value range (or NaN); non-zero
            zero points with a signed LUT (its operands are quantized symmetrically); an
            activation scale or zero point of more than one value, a weight scale or zero
            point of neither one value nor one per output.
    """
    _check_quantization(sx, zx, sw, zw, qw.shape[0], "approx_linear")
    if tabs is not None:
        _check_codes(qx, qw, tabs, "approx_linear")
        _check_symmetric(zx, zw, tabs, "approx_linear")
    with _autocast_off(qx.device.type):
        return _approx_linear(qx, sx, zx, qw, sw, zw, bias, tabs, exact=exact, cache=cache)


def _approx_linear(qx, sx, zx, qw, sw, zw, bias, tabs: LutTables | None, *, exact: bool = False,
                   cache: dict | None = None, sides: tuple | None = None) -> torch.Tensor:
    """:func:`approx_linear` without the operand check (the layers' operands are in range by
    construction) and with autocast already off. ``sides``: what :func:`_lowrank_linear_sides`
    gave for these operands, where the caller made it already (used where the low-rank
    kernel runs)."""
    if _probes(tabs):
        # cached or not: with the weight side cached (inference) other kernels are fastest
        key = _linear_key(qx.shape, qw.shape, zw.shape, exact, cache is not None)
        return _with_auto_kernel(tabs, key, qx, lambda: _approx_linear(qx, sx, zx, qw, sw, zw, bias, tabs,
                                                                        exact=exact, cache=cache, sides=sides))
    dt = torch.float64 if exact else torch.promote_types(qx.dtype, torch.float32)
    zwr = zw.reshape(1, -1) if zw.dim() else zw
    swr = sw.reshape(1, -1) if sw.dim() else sw
    fold, i8 = None, False
    if tabs is not None and not exact and tabs.kernel is Kernel.LOWRANK and qx.dim() == 2 \
            and _fused_on(_FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK"):
        fold, i8 = sides if sides is not None else _lowrank_linear_sides(qw, zx, zw, tabs, cache)
    gacc = None
    if tabs is not None and fold is None and tabs.kernel is Kernel.GATHER and qx.dim() == 2 \
            and qx.device.type == "cpu" and _fused_on(_FUSED_GATHER, "APPMULT_NO_FUSED_GATHER"):
        prep = _cached(cache, ("glin", tabs, float(zx)), lambda: _gather_linear_prep(qw, zx, zw, tabs))
        gacc = _gather_linear_zp(qx, prep, tabs)
    scale, bias_dt = (sx * swr).to(dt), None if bias is None else bias.to(dt)
    if i8 is not False and dt == torch.float32:  # inference: GEMM epilogue and dequantization in one pass
        y = _int8_linear_out(qx, i8, tabs, scale, bias_dt, weight=qw)
        if y is not None:
            return y.to(qx.dtype)
    if i8 is not False:  # the same integers by one int8 GEMM, with the LUT's backward
        acc = _AccLinearZpFn.apply(qx, qw, zx, zw, tabs, _int8_linear_acc(qx, i8, tabs), dt)
    elif fold is not None:
        acc = _LowRankLinearZpFn.apply(qx, qw, zx, zw, tabs, fold[0].reshape(qw.shape[0], -1), fold[1],
                                       fold[2]).to(dt)
    elif gacc is not None:
        acc = _AccLinearZpFn.apply(qx, qw, zx, zw, tabs, gacc, dt)
    elif tabs is None:
        acc = (qx.to(dt) - zx) @ (qw.to(dt) - zw).t()
    else:
        acc = lut_linear(qx, qw, tabs, exact=exact).to(dt)
        if not tabs.signed:
            k = qx.shape[1]
            acc = acc - qx.to(dt).sum(1, keepdim=True) * zwr - zx * qw.to(dt).sum(1).reshape(1, -1) + k * zx * zwr
    return _dequantize(acc, scale, bias_dt, qx.dtype)


def _int8_codes_prep(qw, zx, zw, tabs: LutTables):
    """The int8 GEMM's preparation made straight from the weight codes in a few passes (the
    exact product's; else, with no fold -- DRUM: ``U`` is no multiple of ``value(x)`` --, the
    looked-up weights'), or ``None`` where neither applies."""
    i8 = _int8_value_prep(qw, zx, zw, tabs)
    if i8 is None and not tabs.signed and tabs.value_coef is None:
        i8 = _int8_mapped_prep(qw, zx, zw, tabs)
    return i8


def _lowrank_linear_sides(qw, zx, zw, tabs: LutTables, cache: dict | None):
    """``(fold, i8)``: the weight side of the fused low-rank linear path -- the folded
    weights (:func:`~appmult.nn.fused._folded_lowrank_weights`, or ``None``) and the int8
    GEMM's preparation (``False`` where it does not run).

    The int8 GEMM (exact, faster) runs where its weight side is cached: for the fold, or for
    the LUT's ``V[w]`` where there is none. Preparing it in general costs more than one
    float GEMM, so uncached (training steps, the kernel probe's first calls) only where it
    is a few float32 passes: the exact product's, straight from the weight codes (then no
    fold is made), or a fold of one digit plane.
    """
    n, k = qw.shape
    int8 = _fused_on(_INT8_GEMM, "APPMULT_NO_INT8_GEMM")
    if cache is None and int8:
        i8 = _int8_codes_prep(qw, zx, zw, tabs)
        if i8 is not None:
            return None, i8
    fold = _cached(cache, ("fold", tabs, float(zx)),
                   lambda: _folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, tabs, split_k=True))
    if not int8:
        return fold, False
    if cache is None:
        return fold, False if fold is None else _int8_one_plane_prep(fold[0].reshape(n, -1), fold[1], tabs) or False
    if fold is not None:
        return fold, _cached(cache, ("fold_i8", tabs, float(zx)), lambda: _int8_linear_prep(fold, tabs))
    return None, _cached(cache, ("lin_i8", tabs, float(zx)), lambda: _int8_unfolded_prep(qw, zx, zw, tabs))


def approx_conv2d(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  zw: torch.Tensor, bias: torch.Tensor | None, tabs: LutTables | None, *, stride=1,
                  padding=0, dilation=1, groups: int = 1, exact: bool = False, cache: dict | None = None
                  ) -> torch.Tensor:
    """Dequantized conv2d output from quantized operands (see :func:`approx_linear`).

    Padding inserts the activation zero point (a code), not a literal 0: a padded position
    contributes ``LUT[Zx, qw]`` like any other, as it does in the hardware.

    Returns:
        ``(N, Co, Ho, Wo)`` output in ``qx``'s dtype (computed in float32 or wider).

    Raises:
        InvalidValueError: an operand outside the LUT's value range (or NaN); non-zero
            zero points with a signed LUT; scales and zero points of the wrong size (as in
            :func:`approx_linear`); with padding, an activation zero point that is not an
            integer in the LUT's activation range (padding inserts it as a code).
    """
    _check_quantization(sx, zx, sw, zw, qw.shape[0], "approx_conv2d")
    if tabs is not None:
        _check_codes(qx, qw, tabs, "approx_conv2d")
        _check_symmetric(zx, zw, tabs, "approx_conv2d")
        if any(_pair(padding)):
            _check_padding_code(zx, tabs, "approx_conv2d")
    with _autocast_off(qx.device.type):
        return _approx_conv2d(qx, sx, zx, qw, sw, zw, bias, tabs, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, exact=exact, cache=cache)


def _approx_conv2d(qx, sx, zx, qw, sw, zw, bias, tabs: LutTables | None, *, stride=1, padding=0, dilation=1,
                   groups: int = 1, exact: bool = False, cache: dict | None = None) -> torch.Tensor:
    """:func:`approx_conv2d` without the operand check and with autocast already off."""
    if _probes(tabs):
        key = _conv_key(qx.shape, qw.shape, zw.shape, stride, padding, dilation, groups, exact, cache is not None)
        return _with_auto_kernel(tabs, key, qx, lambda: _approx_conv2d(
            qx, sx, zx, qw, sw, zw, bias, tabs, stride=stride, padding=padding, dilation=dilation, groups=groups,
            exact=exact, cache=cache))
    dt = torch.float64 if exact else torch.promote_types(qx.dtype, torch.float32)
    ph, pw = _pair(padding)
    st, dil = _pair(stride), _pair(dilation)
    co = qw.shape[0]
    zwr = zw.reshape(1, co, 1, 1) if zw.dim() else zw
    swr = sw.reshape(1, co, 1, 1) if sw.dim() else sw
    b = None if bias is None else bias.to(dt).reshape(1, co, 1, 1)
    if tabs is not None:
        acc = _fused_conv_acc(qx, qw, zx, zw, tabs, ((ph, pw), st, dil, groups), dt, exact, cache)
        if acc is not None:
            return _dequantize(acc, (sx * swr).to(dt), b, qx.dtype)
    if ph or pw:
        qx = F.pad(qx, (pw, pw, ph, ph), value=float(zx))
    if tabs is None:
        acc = exact_conv.conv2d(qx.to(dt) - zx, qw.to(dt) - zw, None, st, 0, dil, groups)
    else:
        acc = lut_conv2d(qx, qw, tabs, stride=st, dilation=dil, groups=groups, exact=exact).to(dt)
        if not tabs.signed:
            cg, kh, kw = qw.shape[1:]
            ones = torch.ones((groups, cg, kh, kw), dtype=dt, device=qx.device)
            sum_x = exact_conv.conv2d(qx.to(dt), ones, None, st, 0, dil, groups).repeat_interleave(co // groups, dim=1)
            sum_w = qw.to(dt).sum((1, 2, 3)).reshape(1, co, 1, 1)
            acc = acc - sum_x * zwr - zx * sum_w + (cg * kh * kw) * zx * zwr
    return _dequantize(acc, (sx * swr).to(dt), b, qx.dtype)


def _fused_conv_acc(qx, qw, zx, zw, tabs: LutTables, geom, dt: torch.dtype, exact: bool, cache: dict | None):
    """The whole conv accumulator (LUT sum and cross terms) in ``dt`` by a fused path of
    :mod:`appmult.nn.fused`, or ``None`` where none applies (the caller takes the plain path)."""
    padding, stride, dilation, groups = geom
    if tabs.kernel is Kernel.LOWRANK and not exact and _fused_on(_FUSED_LOWRANK, "APPMULT_NO_FUSED_LOWRANK"):
        if cache is None and (r1 := _value_rank1_prep(qw, zx, zw, tabs)) is not None:
            # a training step's exact product: the shifted conv's weights straight from the codes
            y = _rank1_shifted_conv(qx, zx, None, None, tabs, padding, stride, dilation, groups, r1)
            if y is not None:
                return _with_conv_backward(qx, qw, zx, zw, tabs, y, dt, geom)
        fold = _cached(cache, ("fold", tabs, float(zx)),
                       lambda: _folded_lowrank_weights(qw, zx, zw, tabs, chunks=True))
        if fold is not None and len(fold) == 3:  # too long for one exact float32 conv: cut in runs
            if groups != 1:
                return None
            acc = _chunked_lowrank_conv(qx, zx, tabs, fold, padding, stride, dilation, dt)
            return _with_conv_backward(qx, qw, zx, zw, tabs, acc, dt, geom)
        if fold is not None and tabs.u_is_value:
            wv, const = fold
            r1 = _cached(cache, ("rank1", tabs, float(zx)), lambda: _rank1_prep(zx, wv, const, tabs))
            y = _rank1_shifted_conv(qx, zx, wv, const, tabs, padding, stride, dilation, groups, r1)
            if y is not None:
                return _with_conv_backward(qx, qw, zx, zw, tabs, y, dt, geom)
        m1 = _cached(cache, ("rank1map", tabs, float(zx)), lambda: _rank1_mapped_prep(qw, zx, zw, tabs))
        if m1 is not False:
            acc = _rank1_mapped_conv(qx, zx, m1, tabs, padding, stride, dilation, groups, dt)
            if acc is not None:
                return _with_conv_backward(qx, qw, zx, zw, tabs, acc, dt, geom)
        if fold is not None:
            wv, const = fold
            return _LowRankConvZpFn.apply(qx, qw, zx, zw, tabs, wv, const, *geom).to(dt)
    if tabs.kernel is Kernel.GATHER and _fused_on(_FUSED_GATHER, "APPMULT_NO_FUSED_GATHER"):
        acc = _gather_conv_zp(qx, qw, zx, zw, tabs, padding, stride, dilation, groups, dt)
        if acc is not None:
            return _with_conv_backward(qx, qw, zx, zw, tabs, acc, dt, geom)
    return None


def _with_conv_backward(qx, qw, zx, zw, tabs: LutTables, acc: torch.Tensor, dt: torch.dtype, geom) -> torch.Tensor:
    """A fused path's conv accumulator as ``dt``, with the LUT's backward attached where a
    gradient can reach ``qx`` or ``qw`` (else no autograd node: ~20 us a call saved)."""
    if torch.is_grad_enabled() and (qx.requires_grad or qw.requires_grad):
        return _AccConvZpFn.apply(qx, qw, zx, zw, tabs, acc, dt, *geom)
    return acc.to(dt)


# ------------------------------------------------------------------------------------------
# Activation x activation
# ------------------------------------------------------------------------------------------

#: Most LutTables :func:`approx_matmul` keeps (each holds the product, its factors and the
#: gradient tables: a few MB for 8x8 operands); the least recently used is dropped first.
_TABLES_MAX = 8
_tables_lru: collections.OrderedDict[tuple, LutTables] = collections.OrderedDict()
_tables_lock = threading.Lock()


def _tables_for(lut: LutFile | str | os.PathLike, grad: str, kernel: str, device: torch.device) -> LutTables:
    """The LutTables of ``lut`` on ``device``, memoized by LUT content hash, grad, kernel and device."""
    if not isinstance(lut, LutFile):
        lut = load_lut(lut)
    key = (lut.sha256, GradMode(grad), Kernel(kernel), str(device))
    with _tables_lock:
        tabs = _tables_lru.get(key)
        if tabs is not None:
            _tables_lru.move_to_end(key)
            return tabs
    tabs = LutTables(lut, grad=grad, kernel=kernel).to(device)
    with _tables_lock:
        _tables_lru[key] = tabs
        while len(_tables_lru) > _TABLES_MAX:
            _tables_lru.popitem(last=False)
    return tabs


def approx_matmul(a: torch.Tensor, b: torch.Tensor, lut: LutFile | str | os.PathLike, *,
                  grad: str = "ste", kernel: str = "auto", exact: bool = False) -> torch.Tensor:
    """``a @ b`` with every scalar product through the LUT (e.g. attention scores).

    Both operands are quantized per tensor from their own current range (dynamic
    quantization, straight-through gradients); ``a`` goes to the LUT's operand ``a``.

    Args:
        a: ``(..., M, K)`` float tensor.
        b: ``(..., K, N)`` float tensor (batch dimensions broadcast like :func:`torch.matmul`).
        lut: a LUT file or its path.
        grad: backward mode (``ste``, ``lut2d``, ``lut1d``).
        kernel: ``auto``, ``lowrank`` or ``gather``.
        exact: exact accumulation.

    Returns:
        ``(..., M, N)`` tensor of the operands' promoted dtype (computed in float32 or wider).

    Raises:
        ValueError: NaN/Inf inputs or mismatched shapes.
    """
    if a.shape[-1] != b.shape[-2]:
        raise InvalidValueError(f"approx_matmul shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    ct = torch.promote_types(out_dtype, torch.float32)
    with _autocast_off(a.device.type):
        a, b = a.to(ct), b.to(ct)
        check_finite(a, "approx_matmul")
        check_finite(b, "approx_matmul")
        tabs = _tables_for(lut, grad, kernel, a.device)
        qa_ = ActivationQuantizer(tabs.width_x, tabs.signed, "minmax").to(a.device)
        qb_ = ActivationQuantizer(tabs.width_w, tabs.signed, "minmax").to(a.device)
        qa, sa, za = qa_(a)
        qb, sb, zb = qb_(b)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        qa = qa.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        qb = qb.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        outs = [_approx_linear(qa[i], sa, za, qb[i].t(), sb, zb, None, tabs, exact=exact)
                for i in range(qa.shape[0])]
        y = torch.stack(outs) if outs else qa.new_zeros((0, a.shape[-2], b.shape[-1]))
        return y.reshape(*batch, a.shape[-2], b.shape[-1]).to(out_dtype)
