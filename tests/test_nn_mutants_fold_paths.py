"""Paths of the fused low-rank layers that other tests no longer reach (mutation-testing
gaps of session 7): the fold of the exact product with the int8 GEMM off (training steps
now prepare its int8 weights straight from the codes), float64 layers (their fused paths
mix a float32 accumulator into a float64 backward), the plain signed path of a float64
layer, the no-fold int8 path of a rank-1 LUT that is not ``value(x)``, and the general int8
preparation at its shortest reduction. References: int64 numpy sums, the fake-quantized
float layer, the float64 formula.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear, LutTables, approx_conv2d, approx_linear
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from test_nn_split_k import brute_acc, truncated


def test_fold_keeps_a_float64_bias_where_the_cross_term_pushes_past_two_to_the_24(monkeypatch):
    """``k * step`` alone above ``2**24`` and ``|C|`` large: the fold splits (float64 ``C``)
    and the float path (int8 GEMM off) gives the exact integers, rounded once to float32."""
    monkeypatch.setattr(FN, "_INT8_GEMM", False)
    table = truncated(0)
    tabs = LutTables(LutFile(table, width_a=8, width_b=8, signed=False), kernel="lowrank")
    k, zx = 300, 40.0
    rng = np.random.default_rng(1)
    qx = (255 - rng.integers(0, 4, (4, k))).astype(np.float32)   # dot products near 2**24.2
    qw = (255 - rng.integers(0, 4, (3, k))).astype(np.float32)
    fold = FU._folded_lowrank_weights(torch.from_numpy(qw).reshape(3, k, 1, 1), torch.tensor(zx),
                                      torch.tensor(0.0), tabs, split_k=True)
    assert fold[1].dtype == torch.float64
    one = torch.tensor(1.0)
    y = approx_linear(torch.from_numpy(qx), one, torch.tensor(zx), torch.from_numpy(qw), one,
                      torch.tensor(0.0), None, tabs)
    want = brute_acc(table, qx, zx, qw, np.zeros(3))
    assert np.abs(want).max() < 2 ** 24
    np.testing.assert_array_equal(y.numpy().astype(np.float64), want.astype(np.float32).astype(np.float64))


def _float64_layer_grads(columns: int, monkeypatch):
    """A float64 8-bit layer over ``truncated(columns)`` (per-channel ``Zw``, STE), one
    training step's gradients, the fake-quantized float layer's, and whether the int8
    GEMM ran."""
    torch.manual_seed(5)
    lut = LutFile(truncated(columns), width_a=8, width_b=8, signed=False)
    layer = ApproxLinear.from_float(nn.Linear(40, 5), ApproxConfig(lut, kernel="lowrank", grad="ste")).double()
    x = torch.randn(6, 40, dtype=torch.float64) + 0.3
    layer.eval()
    layer(x)
    layer.act_quant.observing = False
    layer.train()
    calls = []
    real = FU._int8_linear_dots
    monkeypatch.setattr(FU, "_int8_linear_dots", lambda *a: calls.append(1) or real(*a))
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
    got = torch.autograd.grad(y, (xg, layer.weight), gy)
    x2 = x.clone().requires_grad_(True)
    qx, sx, zx = layer.act_quant(x2)
    qw, sw, zw = layer.weight_quant(layer.weight)
    assert zw.numel() > 1 and zw.dtype == torch.float64
    y2 = nn.functional.linear((qx - zx) * sx, (qw - zw) * sw, layer.bias)
    ref = torch.autograd.grad(y2, (x2, layer.weight), gy)
    return got, ref, bool(calls)


def test_float64_layer_trains_through_the_int8_gemm_in_float64(monkeypatch):
    """The exact product (int8 GEMM, a float64 accumulator for autograd): STE gradients equal
    the fake-quantized float64 layer's to float64 precision."""
    got, ref, int8 = _float64_layer_grads(0, monkeypatch)
    assert int8
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_float64_layer_trains_through_the_fold(monkeypatch):
    """A rank-5 LUT (fold, float32 accumulator, float64 operands and zero points): the backward
    runs in the gradient's dtype and gives the fake-quantized layer's STE gradients."""
    got, ref, int8 = _float64_layer_grads(4, monkeypatch)
    assert not int8
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _signed_inexact_lut():
    v = np.where(np.arange(64) < 32, np.arange(64), np.arange(64) - 64)
    return v, v[:, None] * v[None, :] + (v[:, None] & 3)


def test_float64_signed_plain_path_scales_in_float64(monkeypatch):
    """A signed LUT on the plain (unfused) path with float64 operands and one scale each:
    ``sx sw acc`` in float64, as the formula (a float32 accumulator times a 0-dim float64
    scale would stay float32)."""
    monkeypatch.setattr(FN, "_FUSED_GATHER", False)
    v, table = _signed_inexact_lut()
    tabs = LutTables(LutFile(table, width_a=6, width_b=6, signed=True), kernel="gather")
    rng = np.random.default_rng(0)
    sx, sw = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    z = torch.tensor(0.0, dtype=torch.float64)
    scale = float(sx * sw)
    qx = rng.integers(-32, 32, (3, 10))
    qw = rng.integers(-32, 32, (4, 10))
    y = approx_linear(torch.from_numpy(qx).double(), sx, z, torch.from_numpy(qw).double(), sw, z, None, tabs)
    acc = table[qx[:, None, :] % 64, qw[None, :, :] % 64].sum(-1)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), scale * acc.astype(np.float64))
    qx4 = rng.integers(-32, 32, (2, 3, 5, 5))
    qw4 = rng.integers(-32, 32, (4, 3, 3, 3))
    y4 = approx_conv2d(torch.from_numpy(qx4).double(), sx, z, torch.from_numpy(qw4).double(), sw, z, None, tabs)
    acc4 = np.zeros((2, 4, 3, 3), np.int64)
    for i in range(3):
        for j in range(3):
            acc4[:, :, i, j] = table[qx4[:, None, :, i:i + 3, j:j + 3] % 64, qw4[None] % 64].sum((2, 3, 4))
    assert y4.dtype == torch.float64
    np.testing.assert_array_equal(y4.numpy(), scale * acc4.astype(np.float64))


def test_unfolded_int8_cross_term_of_a_long_rank1_reduction_is_exact():
    """A multiplier that drops the activation's LSB: rank 1 with ``U != value(x)`` (no fold),
    so the int8 path adds ``-Zw sum_k x_k`` per call; with 70,000 inputs that sum passes
    ``2**24`` and must still be exact (against int64 numpy)."""
    a = np.arange(256)
    table = (a[:, None] & ~1) * a[None, :]
    tabs = LutTables(LutFile(table, width_a=8, width_b=8, signed=False), kernel="lowrank")
    assert tabs.rank == 1 and tabs.value_coef is None
    k, n, m = 70_000, 2, 2
    rng = np.random.default_rng(0)
    qx = np.full((m, k), 255.0, np.float32)
    qx[:, :5] = rng.integers(0, 256, (m, 5))
    qx[0, 7] = 254
    qw = np.zeros((n, k), np.float32)
    qw[:, :3] = rng.integers(0, 256, (n, 3))
    zx, zw = 255.0, np.array([3.0, 200.0])
    prep = FU._int8_unfolded_prep(torch.from_numpy(qw), torch.tensor(zx), torch.from_numpy(zw).float(), tabs)
    assert prep is not False
    got = FU._int8_linear_acc(torch.from_numpy(qx), prep, tabs)
    cx, cw, zwi = qx.astype(np.int64), qw.astype(np.int64), zw.astype(np.int64)[None, :]
    lut = np.stack([table[cx[i][None, :], cw].sum(-1) for i in range(m)])
    want = lut - cx.sum(1, keepdims=True) * zwi - int(zx) * cw.sum(1)[None, :] + k * int(zx) * zwi
    assert cx.sum(1).max() > 2 ** 24 and np.abs(want).max() < 2 ** 24
    np.testing.assert_array_equal(got.double().numpy(), want.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("k, r", [(1, 2), (2, 1)])
def test_general_int8_prep_takes_two_mapped_inputs(k, r):
    """``K r = 2`` (the shortest reduction ``torch._int_mm`` sums right) through the general
    prep (float64 weights spanning two digit planes): exact, against int64 numpy."""
    rng = np.random.default_rng(k)
    n, m = 4, 6
    u = torch.from_numpy(rng.integers(-20, 200, (30, r)).astype(np.float64))
    tabs = types.SimpleNamespace(u=u, u_is_value=False, lo_x=0)
    w = rng.integers(-5000, 5000, (n, k * r))
    const = rng.integers(-(1 << 30), 1 << 30, n).astype(np.float64)
    prep = FU._int8_linear_prep((torch.from_numpy(w.astype(np.float64)), torch.from_numpy(const)), tabs)
    assert prep is not False and prep[-1] == 2
    qx = torch.from_numpy(rng.integers(0, 30, (m, k)).astype(np.float32))
    ux = u.numpy().astype(np.int64)[qx.numpy().astype(np.int64)].reshape(m, k * r)
    want = ux @ w.T + const.astype(np.int64)[None, :]
    got = FU._int8_linear_acc(qx, prep, tabs)
    np.testing.assert_array_equal(got.double().numpy(), want.astype(np.float32).astype(np.float64))
