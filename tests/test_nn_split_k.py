"""The fused low-rank linear path with a split reduction (issue 12).

An 8-bit unsigned LUT's products reach 255 * 255, so a linear layer with more than 258
inputs can exceed ``2**24`` in a float32 GEMM: ``_folded_lowrank_weights(split_k=True)``
then cuts the reduction into chunks whose float32 GEMMs are exact and adds them in
float64. The reference is numpy: one look-up per product from the layer's own quantized
operands, the zero-point cross terms, int64 sums. Also the float32 bound of the rank-1
conv shortcut on non-square LUTs (a survivor of mutation testing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear
from appmult.nn import fused as FU


def truncated(columns: int) -> np.ndarray:
    """Unsigned 8x8 array multiplier without the partial-product columns ``< columns``."""
    a = np.arange(256)[:, None]
    b = np.arange(256)[None, :]
    p = np.zeros((256, 256), np.int64)
    for i in range(8):
        for j in range(8):
            if i + j >= columns:
                p += (((a >> i) & 1) * ((b >> j) & 1)) << (i + j)
    return p


def brute_acc(table: np.ndarray, qx: np.ndarray, zx: float, qw: np.ndarray, zw: np.ndarray) -> np.ndarray:
    """``sum_k LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` per output, int64 (unsigned codes = values)."""
    cx, cw = qx.astype(np.int64), qw.astype(np.int64)
    lut = table[cx[:, None, :], cw[None, :, :]].sum(-1)
    zwc = zw.reshape(1, -1).astype(np.int64)
    zxi = int(zx)
    k = cx.shape[1]
    return lut - cx.sum(1, keepdims=True) * zwc - zxi * cw.sum(1)[None, :] + k * zxi * zwc


def layer_for(table: np.ndarray, k: int, n: int, seed: int) -> tuple[ApproxLinear, torch.Tensor]:
    torch.manual_seed(seed)
    lut = LutFile(table, width_a=8, width_b=8, signed=False)
    ref = nn.Linear(k, n)
    layer = ApproxLinear.from_float(ref, ApproxConfig(lut, kernel="lowrank"))
    x = torch.randn(6, k) + 0.3   # negative values too: Zx > 0
    layer.eval()
    layer(x)                      # calibrate, then freeze the observer
    layer.act_quant.observing = False
    return layer, x


@pytest.mark.parametrize("columns", [0, 4])       # rank 1 (exact product) and rank 5
@pytest.mark.parametrize("k", [600, 1100])
def test_split_reduction_is_bit_exact(columns, k):
    table = truncated(columns)
    layer, x = layer_for(table, k, 9, seed=k + columns)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
        fold = FU._folded_lowrank_weights(qw.reshape(9, k, 1, 1), zx, zw, layer.lut, split_k=True)
        assert fold is not None
        kc = fold[2]
        assert 2 <= kc < k                   # the reduction is split
        assert float(zx) > 0 and (zw > 0).all()
        y = layer(x).double().numpy()
    acc = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy())
    assert np.abs(acc).max() < 2 ** 24     # float32 holds the accumulator itself exactly
    scale = float(sx) * sw.double().numpy().reshape(1, -1)
    want = scale * acc + layer.bias.detach().double().numpy()
    # exact accumulators, then a float32 scale and bias: far below one accumulator unit
    np.testing.assert_allclose(y, want, rtol=0, atol=float(np.min(scale)) * 0.25 + 1e-6 * np.abs(want).max())


def split_fold(k: int, n: int, seed: int):
    """``_folded_lowrank_weights(split_k=True)`` of a ``k``-input layer over the exact product."""
    layer, x = layer_for(truncated(0), k, n, seed=seed)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
        return FU._folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, layer.lut, split_k=True)


def test_split_chunks_keep_every_partial_sum_below_two_to_the_24():
    wv, const, kc = split_fold(700, 4, seed=1)
    # the largest |partial sum| of one chunk: kc products of the largest |U| and |V - c Zw|
    vmax = float(wv.abs().max())
    assert kc * 255 * vmax < 2 ** 24
    assert (kc + 1) * 255 * vmax >= 2 ** 24 - 255 * vmax  # not needlessly short
    assert const.dtype == torch.float64  # the chunks are added in float64


def test_short_reductions_are_not_split():
    wv, const, kc = split_fold(200, 4, seed=2)
    assert kc == 200
    assert const.dtype == torch.float32  # the bias of one float32 addmm


def test_split_path_trains_like_the_unfused_path():
    """Same gradients as the plain (unfused) path: the split changes only the forward's sums."""
    table = truncated(0)
    grads = []
    for fused in (True, False):
        layer, x = layer_for(table, 600, 5, seed=3)
        layer.train()
        layer.act_quant.observing = False
        xg = x.clone().requires_grad_(True)
        from appmult.nn import functional as FN
        prev = FN._FUSED_LOWRANK
        FN._FUSED_LOWRANK = fused
        try:
            layer(xg).square().sum().backward()
        finally:
            FN._FUSED_LOWRANK = prev
        grads.append((xg.grad.clone(), layer.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width_a, width_b", [(4, 8), (8, 4)])
def test_rank1_conv_float32_bound_uses_the_activation_range(width_a, width_b):
    """The rank-1 conv shortcut runs in float32 only while ``sum |w| * max|x - Zx| + |C|``
    stays below ``2**24``; ``max|x - Zx|`` is over the *activation* operand's values, which
    for a non-square LUT is not the weight operand's range."""
    from appmult.nn.tables import LutTables

    a = np.arange(1 << width_a)[:, None]
    b = np.arange(1 << width_b)[None, :]
    tabs = LutTables(LutFile(a * b, width_a=width_a, width_b=width_b, signed=False))
    xmax = (1 << width_a) - 1                        # Zx = 0: the largest activation value
    limit = 2 ** 24
    below = torch.full((1, 1, 1, 1), float((limit - 1) // xmax))        # xmax * w < 2**24
    above = torch.full((1, 1, 1, 1), float(limit // xmax + 1))          # xmax * w > 2**24
    zero = torch.zeros(1)
    assert FU._rank1_prep(torch.tensor(0.0), below, zero, tabs) is not False
    assert FU._rank1_prep(torch.tensor(0.0), above, zero, tabs) is False
    # the constant term counts as well
    c = torch.full((1,), float(limit))
    assert FU._rank1_prep(torch.tensor(0.0), below, c, tabs) is False


@pytest.mark.parametrize("k,zx", [(257, 2.0), (258, 1.0), (258, 3.0), (300, 255.0)])
def test_split_reduction_when_the_cross_term_alone_breaks_the_float32_limit(k, zx):
    # Just above 258 inputs (or with a large Zx) |C| can push the bound past 2**24 while
    # one chunk would hold every input: the fold then keeps a float64 C and the forward
    # must add it in float64 (it once handed a float64 bias to a float32 addmm: a crash).
    from appmult.nn import LutTables, approx_linear
    table = truncated(0)
    tabs = LutTables(LutFile(table, width_a=8, width_b=8, signed=False), kernel="lowrank")
    rng = np.random.default_rng(k)
    qx = rng.integers(0, 256, (3, k)).astype(np.float32)
    qw = np.full((2, k), 255.0, np.float32)
    qw[1, ::3] = rng.integers(0, 256, qw[1, ::3].shape)
    one = torch.tensor(1.0)
    y = approx_linear(torch.from_numpy(qx), one, torch.tensor(zx), torch.from_numpy(qw), one,
                      torch.tensor(0.0), None, tabs)
    want = brute_acc(table, qx, zx, qw, np.zeros(2))
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy().astype(np.float64), want.astype(np.float32).astype(np.float64))
