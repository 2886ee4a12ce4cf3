"""The fused low-rank conv path on wide layers: the float32 bound from the weights themselves,
and convolutions cut along their input channels where even that bound is too high.

``_folded_lowrank_weights`` returns the folded weights only where every partial sum of the
folded convolution stays below ``2**24``. The worst case over all weights (``K`` times the
largest product) rejected every 3x3 conv with 64 or more input channels (``K = 576``:
ResNet-20's third stage), which then took the unfused LUT path -- exact, but a third of
ResNet-20's training step. These layers' actual weights bound their sums far lower
(``sum_k |U|max |W_k| + |C|``), and that bound now decides. The references are numpy (one
look-up per product from the layer's own quantized operands, the zero-point cross terms,
int64 sums, then the layer's float32 dequantization) and the unfused path of the same layer.

Wider still (``K = 128 * 3 * 3`` and up: ResNet-18, VGG), the convolution is cut into equal
runs of input channels, one grouped convolution whose groups are each exact in float32,
added in float64 (``_channel_runs``, ``_chunked_lowrank_conv``, ``fold_loops.add_runs``):
exact where the unfused float32 path may round, so the reference there is the brute force
alone.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn import kernels as K
from appmult.nn.tables import LutTables
from test_nn_split_k import truncated


def brute_conv_acc(table: np.ndarray, qx: torch.Tensor, zx: float, qw: torch.Tensor, zw: torch.Tensor,
                   padding: int, signed: bool, stride: int = 1, dilation: int = 1) -> np.ndarray:
    """``sum LUT[x, w] - x Zw - Zx w + Zx Zw`` over each receptive field of ``qx`` padded with
    ``Zx`` (no cross terms when signed), int64 ``(N, Co, Ho, Wo)``; codes index the table."""
    n, _, h, w = qx.shape
    co, _, kh, kw = qw.shape
    xp = F.pad(qx, (padding,) * 4, value=zx)
    cols = F.unfold(xp.double(), (kh, kw), dilation=dilation, stride=stride).numpy().astype(np.int64)  # (N, K, L)
    wk = qw.reshape(co, -1).double().numpy().astype(np.int64)                 # (Co, K)
    size = table.shape[0]
    lut = table[cols[:, None, :, :] % size, wk[None, :, :, None] % size].sum(2)   # (N, Co, L)
    if not signed:
        zwc = zw.reshape(1, co, 1).double().numpy().astype(np.int64)
        k = cols.shape[1]
        lut = lut - cols.sum(1, keepdims=True) * zwc - int(zx) * wk.sum(1).reshape(1, co, 1) + k * int(zx) * zwc
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return lut.reshape(n, co, ho, wo)


def wide_layer(table: np.ndarray, cin: int, cout: int, seed: int, signed: bool = False, shift: float = 0.0,
               stride: int = 1, dilation: int = 1, groups: int = 1):
    torch.manual_seed(seed)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    ref = nn.Conv2d(cin, cout, 3, padding=1, stride=stride, dilation=dilation, groups=groups)
    layer = ApproxConv2d.from_float(ref, ApproxConfig(lut, kernel="lowrank"))
    x = torch.relu(torch.randn(2, cin, 5, 5)) + shift   # shift < 0: negative inputs, Zx > 0
    layer.eval()
    layer(x)
    layer.act_quant.observing = False
    return layer, x


def expected_output(layer: ApproxConv2d, x: torch.Tensor, table: np.ndarray, signed: bool) -> torch.Tensor:
    """The layer's output from the brute-force accumulator: ``f32(acc) * (sx sw) + bias``."""
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        acc = brute_conv_acc(table, qx, float(zx), qw, zw, 1, signed, layer.stride[0], layer.dilation[0])
        ft = np.float64 if layer.weight.dtype == torch.float64 else np.float32
        scale = (sx * sw.reshape(1, -1, 1, 1)).numpy().astype(ft)
        bias = layer.bias.detach().reshape(1, -1, 1, 1).numpy().astype(ft)
    return torch.from_numpy(acc.astype(ft) * scale + bias)


@contextlib.contextmanager
def fused_lowrank(on: bool | None):
    """The fused low-rank switch (``functional._FUSED_LOWRANK``; ``False``: the unfused
    path, the reference) set for a block."""
    prev = FN._FUSED_LOWRANK
    FN._FUSED_LOWRANK = on
    try:
        yield
    finally:
        FN._FUSED_LOWRANK = prev


def signed_exact() -> np.ndarray:
    v = np.where(np.arange(256) < 128, np.arange(256), np.arange(256) - 256)
    return v[:, None] * v[None, :]


@pytest.mark.parametrize("columns", [0, 4])            # rank 1 (exact product) and a rank-5 LUT
@pytest.mark.parametrize("shift", [0.0, -0.4])          # ReLU inputs (Zx = 0), and Zx > 0
def test_wide_conv_takes_the_fold_and_is_bit_exact(columns, shift):
    table = truncated(columns)
    layer, x = wide_layer(table, 64, 6, seed=columns, shift=shift)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        assert qw.shape[1] * 9 * 255 * 255 >= K.FP32_EXACT_LIMIT   # the worst case rejects it
        assert FU._folded_lowrank_weights(qw, zx, zw, layer.lut) is not None
        y = layer(x)
        with fused_lowrank(False):
            y_plain = layer(x)
    assert torch.equal(y, expected_output(layer, x, table, False))
    assert torch.equal(y, y_plain)


def test_wide_signed_conv_takes_the_fold_and_is_bit_exact():
    table = signed_exact()
    layer, x = wide_layer(table, 128, 5, seed=3, signed=True, shift=-0.3)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        assert qw.shape[1] * 9 * 128 * 128 >= K.FP32_EXACT_LIMIT   # the worst case rejects it
        assert FU._folded_lowrank_weights(qw, zx, zw, layer.lut) is not None
        y = layer(x)
    assert torch.equal(y, expected_output(layer, x, table, True))


def test_wide_conv_trains_through_the_fold():
    """The training forward of a wide conv takes the fused path and returns the same bits
    as the brute force; its gradients reach the weights and the input."""
    table = truncated(0)
    layer, x = wide_layer(table, 64, 4, seed=7)
    layer.train()
    layer.act_quant.observing = False
    xg = x.clone().requires_grad_(True)
    calls = []
    orig = FU._rank1_shifted_conv

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append(out is not None)
        return out
    FN._rank1_shifted_conv = spy
    try:
        y = layer(xg)
    finally:
        FN._rank1_shifted_conv = orig
    assert calls == [True]
    assert torch.equal(y.detach(), expected_output(layer, x, table, False))
    y.square().sum().backward()
    assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
    assert xg.grad is not None and bool(xg.grad.abs().sum() > 0)


def lowrank_tables(table: np.ndarray) -> LutTables:
    return LutTables(LutFile(table, width_a=8, width_b=8, signed=False), grad="ste", kernel="lowrank")


def test_weights_whose_own_bound_reaches_two_to_the_24_are_refused():
    """Every weight code at its channel's extremes (0 or 255, Zw about 128): the bound
    ``576 * 255 * ~128`` is above ``2**24`` -- no fold, the unfused path stays exact."""
    tabs = lowrank_tables(truncated(0))
    g = torch.Generator().manual_seed(0)
    qw = (torch.randint(0, 2, (4, 64, 3, 3), generator=g) * 255).float()
    zw = torch.full((4, 1, 1, 1), 128.0)
    assert FU._folded_lowrank_weights(qw, torch.tensor(0.0), zw, tabs) is None
    # the same weights one code from Zw: far below the limit, folded
    near = zw + (qw > 0).float() * 2 - 1
    assert FU._folded_lowrank_weights(near, torch.tensor(0.0), zw, tabs) is not None


def test_bound_is_strict_at_two_to_the_24():
    """``_within_fp32`` accepts a bound of ``2**24 - 1`` and refuses ``2**24``: the constant
    counts, every rank's ``|U|max`` multiplies its own weights."""
    tabs = lowrank_tables(truncated(4))
    ua = torch.as_tensor(tabs._u_absmax, dtype=torch.float64)
    r = ua.numel()
    assert r > 1
    wv = torch.zeros(2, 1, 1, 1, r)
    wv[:, 0, 0, 0, 0] = 1.0
    wv[1, 0, 0, 0, r - 1] = -3.0                      # a negative weight counts by its size
    base = (ua[0] + 3 * ua[r - 1]).item()
    limit = float(K.FP32_EXACT_LIMIT)
    below = torch.tensor([0.0, limit - 1 - base], dtype=torch.float64)
    assert FU._within_fp32(FU._channel_sums(wv, float(wv.abs().max())), below, tabs)
    assert not FU._within_fp32(FU._channel_sums(wv, float(wv.abs().max())), below + torch.tensor([0.0, 1.0], dtype=torch.float64), tabs)
    assert not FU._within_fp32(FU._channel_sums(wv, float(wv.abs().max())), -(below + torch.tensor([0.0, 1.0], dtype=torch.float64)), tabs)


@pytest.mark.parametrize("columns", [0, 4])            # rank 1 (U = value(x)) and the mapped rank-5 path
@pytest.mark.parametrize("shift,stride,dilation", [(0.0, 1, 1), (-0.4, 2, 1), (-0.2, 1, 2)])
def test_conv_cut_into_channel_runs_is_bit_exact(columns, shift, stride, dilation):
    table = truncated(columns)
    layer, x = wide_layer(table, 256, 4, seed=11 + columns, shift=shift, stride=stride, dilation=dilation)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        fold = FU._folded_lowrank_weights(qw, zx, zw, layer.lut, chunks=True)
        assert fold is not None and len(fold) == 3 and fold[2] >= 2   # cut into runs
        assert FU._folded_lowrank_weights(qw, zx, zw, layer.lut) is None     # one conv would not be exact
        y = layer(x)
    assert torch.equal(y, expected_output(layer, x, table, False))


def test_float64_layer_cut_into_runs_keeps_the_exact_accumulator():
    """A float64 layer's accumulator from the runs is the exact integer (no float32 rounding)."""
    table = truncated(0)
    layer, x = wide_layer(table, 256, 3, seed=5, shift=-0.3)
    layer.double()
    x = x.double()
    layer.act_quant.observing = True
    with torch.no_grad():
        layer(x)
    layer.act_quant.observing = False
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        assert len(FU._folded_lowrank_weights(qw, zx, zw, layer.lut, chunks=True)) == 3
        y = layer(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, expected_output(layer, x, table, False))


def test_conv_cut_into_runs_trains():
    """Training forward through the runs gives the brute force's bits; gradients reach the
    weight and the input."""
    table = truncated(0)
    layer, x = wide_layer(table, 256, 3, seed=2)
    layer.train()
    layer.act_quant.observing = False
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert torch.equal(y.detach(), expected_output(layer, x, table, False))
    y.square().sum().backward()
    assert bool(layer.weight.grad.abs().sum() > 0) and bool(xg.grad.abs().sum() > 0)


def test_grouped_conv_beyond_the_bound_takes_the_unfused_path():
    layer, x = wide_layer(truncated(0), 512, 4, seed=0, groups=2)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        assert len(FU._folded_lowrank_weights(qw, zx, zw, layer.lut, chunks=True)) == 3
        y = layer(x)
        with fused_lowrank(False):
            y_plain = layer(x)
    assert torch.equal(y, y_plain)


def test_channel_runs_are_the_fewest_equal_runs_within_the_limit():
    """Each of the ``G`` equal runs keeps its bound below ``2**24`` for every output, and no
    divisor below ``G`` would (unsigned 8-bit codes: ``|U| <= 255`` and ``|x - Zx| <= 255``
    whatever ``Zx``)."""
    tabs = lowrank_tables(truncated(0))
    g = torch.Generator().manual_seed(1)
    wv = torch.randint(-200, 201, (3, 48, 3, 3, 1), generator=g).float()
    const = torch.zeros(3, dtype=torch.float64)
    per = (wv.abs().double() * 255.0).sum((2, 3, 4))                 # (Co, 48)
    limit = K.FP32_EXACT_LIMIT
    for zx in (0.0, 200.0):
        runs = FU._channel_runs(FU._channel_sums(wv, float(wv.abs().max())), const, tabs, zx)
        assert runs is not None and 48 % runs == 0
        assert float(per.reshape(3, runs, -1).sum(2).max()) < limit
        for fewer in range(2, runs):
            if 48 % fewer == 0:
                assert float(per.reshape(3, fewer, -1).sum(2).max()) >= limit


def test_no_runs_where_one_channel_alone_reaches_the_limit():
    tabs = lowrank_tables(truncated(0))
    wv = torch.zeros(2, 4, 3, 3, 1)
    wv[1, 1] = 7311.0                                  # one channel's bound 9 * 255 * 7311 >= 2**24
    assert FU._channel_runs(FU._channel_sums(wv, float(wv.abs().max())), torch.zeros(2, dtype=torch.float64), tabs, 0.0) is None
    wv[1, 1] = 7310.0                                  # 16,776,450 < 2**24
    wv[1, 2] = 7310.0                                  # two such channels: two runs of two
    assert FU._channel_runs(FU._channel_sums(wv, float(wv.abs().max())), torch.zeros(2, dtype=torch.float64), tabs, 0.0) == 2
    wv[1, 0] = 1.0                                     # channels 0 and 1 together break it: four runs
    assert FU._channel_runs(FU._channel_sums(wv, float(wv.abs().max())), torch.zeros(2, dtype=torch.float64), tabs, 0.0) == 4


def test_runs_are_added_with_and_without_numba(monkeypatch):
    """``fold_loops.add_runs`` and the torch fallback give the same bits (float32 layer)."""
    table = truncated(0)
    layer, x = wide_layer(table, 256, 4, seed=9, shift=-0.3)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        fold = FU._folded_lowrank_weights(qw, zx, zw, layer.lut, chunks=True)
        a = FU._chunked_lowrank_conv(qx, zx, layer.lut, fold, (1, 1), (1, 1), (1, 1), torch.float32)
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
        b = FU._chunked_lowrank_conv(qx, zx, layer.lut, fold, (1, 1), (1, 1), (1, 1), torch.float32)
        c = FU._chunked_lowrank_conv(qx, zx, layer.lut, fold, (1, 1), (1, 1), (1, 1), torch.float64)
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(a, c.to(torch.float32))
    acc = brute_conv_acc(table, qx, float(zx), qw, zw, 1, False)
    assert np.array_equal(c.numpy(), acc.astype(np.float64))


@pytest.mark.parametrize("cin", [64, 256])             # folded by the weights' bound; cut into runs
@pytest.mark.parametrize("grad", ["ste", "lut2d"])
def test_wide_conv_gradients_match_the_unfused_path(cin, grad):
    """The fused path's training step (forward bits and the gradients of the input and the
    weight) against the unfused LUT path of the same layer: the same gradient formulas, so
    equal up to float32 summation order."""
    table = truncated(0)
    torch.manual_seed(cin)
    lut = LutFile(table, width_a=8, width_b=8, signed=False)
    ref = nn.Conv2d(cin, 3, 3, padding=1)
    layer = ApproxConv2d.from_float(ref, ApproxConfig(lut, kernel="lowrank", grad=grad,
                                                      compute_missing_gradients=True))
    x = torch.relu(torch.randn(2, cin, 5, 5)) - 0.2
    layer.train()
    layer(x)
    layer.act_quant.observing = False
    results = []
    for fused in (None, False):
        with fused_lowrank(fused):
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), xg.grad, layer.weight.grad.clone()))
    (y1, gx1, gw1), (y0, gx0, gw0) = results
    assert torch.equal(y1, y0)
    assert bool(gx1.abs().sum() > 0) and bool(gw1.abs().sum() > 0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6 * float(gx0.abs().max()))
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-6 * float(gw0.abs().max()))
