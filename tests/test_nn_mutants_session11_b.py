"""Mutation review (session 11, b): convolutions cut into runs of input channels.

Covers ``fused._channel_runs`` (the fewest equal runs of the mapped input channels whose
float32 partial sums stay below ``2**24``; ``None`` where one channel alone reaches that or the
whole sum and the constant could reach ``2**53``), ``fused._chunked_lowrank_conv`` (one grouped
float32 convolution of the runs, added with the constant in float64 and rounded once) and its
caller ``functional._fused_conv_acc``.

The layer-level tests call :func:`appmult.nn.functional.approx_conv2d` on quantized operands
chosen so that the convolution must be cut (high activation and weight codes: every
accumulator above ``2**24``, where one float32 convolution -- the unfused path too -- rounds),
with unit scales, so the output is the integer accumulator itself; the reference is a numpy
brute force (one look-up per product, int64 sums, the zero-point cross terms). Float64 operands
must give the exact integer, float32 ones its single rounding. They cover the rank-1
``U = value(x)`` branch (with zero points 0, 1 and an odd one whose ``Zx sum w`` float32 would
round), the mapped rank > 1 branch with symmetric and one-sided padding and a nonzero zero
point, a signed rank-2 LUT (the padding index of the zero point is not 0 there), and the numba
and torch ways of adding the runs.

``_channel_runs`` is checked directly against its documented return values: the number of runs
from a brute-force bound of ``|U|`` and ``|x - Zx|`` over every activation code (zero points
inside and outside the code range, a LUT whose two operands differ in width), the strict
``2**24`` bound of a run, and the ``2**53`` bound of the whole sum with the constant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.lut_gen import LutFile
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn import kernels as K
from appmult.nn.tables import LutTables
from test_nn_split_k import truncated

LIMIT32 = float(K.FP32_EXACT_LIMIT)
LIMIT64 = float(K.FP64_EXACT_LIMIT)


def tables(table: np.ndarray, width_a: int = 8, width_b: int = 8, signed: bool = False) -> LutTables:
    return LutTables(LutFile(table, width_a=width_a, width_b=width_b, signed=signed), grad="ste", kernel="lowrank")


def signed_values() -> np.ndarray:
    return np.where(np.arange(256) < 128, np.arange(256), np.arange(256) - 256)


def signed_rank2() -> np.ndarray:
    """A signed LUT of rank 2 (the exact product plus a small separable term): mapped ``U``."""
    v = signed_values()
    return v[:, None] * v[None, :] + (v[:, None] & 3) * (v[None, :] & 3)


def brute(table: np.ndarray, qx: torch.Tensor, zx: float, qw: torch.Tensor, zw: torch.Tensor, padding,
          signed: bool = False, stride: int = 1, dilation: int = 1) -> np.ndarray:
    """``sum LUT[x, w] - x Zw - Zx w + Zx Zw`` over each receptive field of ``qx`` padded with
    ``Zx`` (``padding = (ph, pw)``; no cross terms when signed), int64 ``(N, Co, Ho, Wo)``;
    a value ``v`` indexes the table at ``v mod size``."""
    ph, pw = padding
    co, _, kh, kw = qw.shape
    xp = F.pad(qx.double(), (pw, pw, ph, ph), value=zx)
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride).numpy().astype(np.int64)   # (N, K, L)
    wk = qw.reshape(co, -1).double().numpy().astype(np.int64)
    size = table.shape[0]
    acc = table[cols[:, None, :, :] % size, wk[None, :, :, None] % table.shape[1]].sum(2)        # (N, Co, L)
    if not signed:
        zwc = zw.reshape(1, co, 1).double().numpy().astype(np.int64)
        k = cols.shape[1]
        acc = acc - cols.sum(1, keepdims=True) * zwc - int(zx) * wk.sum(1).reshape(1, co, 1) + k * int(zx) * zwc
    ho = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    wo = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    return acc.reshape(qx.shape[0], co, ho, wo)


def high_codes(shape, lo: int, hi: int, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def conv_acc(tabs, qx, zx, qw, zw, padding, **kw):
    """``approx_conv2d`` with unit scales and no bias: the accumulator in the operands' dtype."""
    dt = qx.dtype
    return FN.approx_conv2d(qx, torch.ones((), dtype=dt), torch.tensor(zx, dtype=dt), qw,
                            torch.ones(qw.shape[0], dtype=dt), zw, None, tabs, padding=padding, **kw)


def assert_cut(qw, zx, zw, tabs):
    """The precondition of every layer test here: the fold is cut into runs."""
    fold = FU._folded_lowrank_weights(qw, torch.tensor(zx, dtype=qw.dtype), zw.reshape(-1, 1, 1, 1), tabs,
                                      chunks=True)
    assert fold is not None and len(fold) == 3 and fold[2] >= 2


def _value_case(numba, monkeypatch, seeds, dtype):
    """The exact product's tables and high codes ``(1, 64, 4, 4)`` and ``(3, 64, 3, 3)`` (a
    convolution cut in runs), numba off where asked."""
    if not numba:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    table = truncated(0)
    qx = high_codes((1, 64, 4, 4), 180, 256, seeds[0], dtype)
    qw = high_codes((3, 64, 3, 3), 180, 256, seeds[1], dtype)
    return table, tables(table), qx, qw


@pytest.mark.parametrize("zx", [0.0, 1.0, 201.0])      # Zx = 0: qx as is; 1; odd: Zx sum w above 2**24
@pytest.mark.parametrize("numba", [True, False])
def test_value_branch_float64_accumulator_is_the_exact_integer(zx, numba, monkeypatch):
    """Rank 1 ``U = value(x)``, padding 1, float64 operands: every accumulator is above
    ``2**24`` (float32 spacing 2 or more) and comes back as the exact integer."""
    table, tabs, qx, qw = _value_case(numba, monkeypatch, (1, 2), torch.float64)
    zw = torch.tensor([0.0, 3.0, 7.0], dtype=torch.float64)
    assert tabs.u_is_value
    assert_cut(qw, zx, zw, tabs)
    ref = brute(table, qx, zx, qw, zw, (1, 1))
    if zx == 201.0:  # Zx sum_k (w - Zw) is not a float32 value for some output
        zs = zx * (qw - zw.reshape(3, 1, 1, 1)).sum((1, 2, 3))
        assert bool((zs.to(torch.float32).double() != zs).any())
    else:            # most accumulators above 2**24: float32 spacing 2 or more
        assert (np.abs(ref) > 2 ** 24).mean() > 0.5
    y = conv_acc(tabs, qx, zx, qw, zw, 1)
    assert y.dtype == torch.float64
    assert np.array_equal(y.numpy(), ref.astype(np.float64))


@pytest.mark.parametrize("numba", [True, False])
def test_value_branch_float32_accumulator_is_rounded_once(numba, monkeypatch):
    """The float32 output of the runs is the exact accumulator rounded once to float32 --
    by ``fold_loops.add_runs`` and by the torch fallback alike."""
    table, tabs, qx, qw = _value_case(numba, monkeypatch, (3, 4), torch.float32)
    zw = torch.tensor([0.0, 5.0, 2.0])
    assert_cut(qw, 77.0, zw, tabs)
    ref = brute(table, qx, 77.0, qw, zw, (1, 1))
    y = conv_acc(tabs, qx, 77.0, qw, zw, 1)
    assert y.dtype == torch.float32
    assert np.array_equal(y.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("padding", [(1, 1), (1, 0), (0, 1), (0, 0)])
def test_mapped_branch_with_padding_and_zero_point(padding):
    """Rank 5 (a truncated multiplier: ``U`` mapped, not ``value(x)``), a nonzero ``Zx``, padding
    on both sides or one: the padded positions hold ``Zx``'s row of ``U``."""
    table = truncated(4)
    tabs = tables(table)
    qx = high_codes((1, 64, 4, 3), 150, 256, 5, torch.float64)
    qw = high_codes((2, 64, 3, 3), 150, 256, 6, torch.float64)
    zw = torch.tensor([4.0, 9.0], dtype=torch.float64)
    zx = 37.0
    assert not tabs.u_is_value and tabs.u.shape[1] > 1
    assert_cut(qw, zx, zw, tabs)
    ref = brute(table, qx, zx, qw, zw, padding)
    y = conv_acc(tabs, qx, zx, qw, zw, padding)
    assert tuple(y.shape) == ref.shape
    assert np.array_equal(y.numpy(), ref.astype(np.float64))


def test_signed_mapped_branch_pads_with_the_index_of_zero():
    """A signed rank-2 LUT (``lo_x = -128``): padding inserts the value 0, at index 128."""
    table = signed_rank2()
    tabs = tables(table, signed=True)
    qx = high_codes((1, 256, 3, 3), -128, 128, 7, torch.float64)
    sign = high_codes((2, 256, 3, 3), 0, 2, 8, torch.float64) * 2 - 1
    qw = torch.where(sign > 0, high_codes((2, 256, 3, 3), 100, 128, 9, torch.float64),
                     -high_codes((2, 256, 3, 3), 100, 129, 10, torch.float64))   # far from 0: runs needed
    zw = torch.zeros(2, dtype=torch.float64)
    assert not tabs.u_is_value and tabs.lo_x == -128
    assert_cut(qw, 0.0, zw, tabs)
    ref = brute(table, qx, 0.0, qw, zw, (1, 1), signed=True)
    y = conv_acc(tabs, qx, 0.0, qw, zw, 1)
    assert np.array_equal(y.numpy(), ref.astype(np.float64))


def test_runs_backward_matches_the_unfused_path():
    """Gradients through the runs (STE, ``Zx`` and ``Zw`` nonzero, padding): the fused path
    attaches the LUT's backward with the layer's zero points -- the unfused path's gradients
    (the same formulas: equal up to float32 summation order)."""
    table = truncated(0)
    tabs = tables(table)
    qx0 = high_codes((1, 64, 4, 4), 180, 256, 11, torch.float64)
    qw0 = high_codes((2, 64, 3, 3), 180, 256, 12, torch.float64)
    zw = torch.tensor([6.0, 11.0], dtype=torch.float64)
    zx = 37.0
    assert_cut(qw0, zx, zw, tabs)
    grads = []
    for fused in (None, False):
        prev = FN._FUSED_LOWRANK
        FN._FUSED_LOWRANK = fused
        try:
            qx, qw = qx0.clone().requires_grad_(True), qw0.clone().requires_grad_(True)
            y = conv_acc(tabs, qx, zx, qw, zw, 1)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        finally:
            FN._FUSED_LOWRANK = prev
        grads.append((y.detach(), qx.grad, qw.grad))
    (y1, gx1, gw1), (y0, gx0, gw0) = grads
    assert np.array_equal(y1.numpy(), brute(table, qx0, zx, qw0, zw, (1, 1)).astype(np.float64))
    assert bool(gx1.abs().sum() > 0) and bool(gw1.abs().sum() > 0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6 * float(gx0.abs().max()))
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-6 * float(gw0.abs().max()))


# ------------------------------------------------------------------------------------------
# _channel_runs: documented return values
# ------------------------------------------------------------------------------------------

def fewest_runs(per: np.ndarray, scale: np.ndarray) -> int | None:
    """Reference: the fewest ``G >= 2`` dividing ``Cg r`` whose runs' bounds (``per`` times the
    rank's scale, summed over the run) are all below ``2**24``."""
    co, cg, r = per.shape
    m = cg * r
    b = (per * scale[None, None, :]).reshape(co, m)
    for g in range(2, m + 1):
        if m % g == 0 and b.reshape(co, g, m // g).sum(2).max() < LIMIT32:
            return g
    return None


def value_scale(tabs: LutTables, zx: float) -> np.ndarray:
    """``max(|U|, |x - Zx|)`` over every activation code, for a rank-1 ``U = value(x)``."""
    x = tabs.lo_x + np.arange(tabs.prod.shape[0], dtype=np.float64)
    return np.array([max(np.abs(x).max(), np.abs(x - zx).max())])


@pytest.mark.parametrize("zx", [0.0, 200.0, 255.0, -1.0, 256.0, -40.0])
def test_channel_runs_count_x_minus_zx(zx):
    """``|x - Zx|`` counts beside ``|U|`` (the runs convolve ``x - Zx``): ``Zx`` inside the code
    range leaves the bound at 255, outside it raises the bound (``approx_conv2d`` takes any
    integer ``Zx``); 32800 per channel: two channels a run fit under 255 and not under 256."""
    tabs = tables(truncated(0))
    per = np.full((2, 4, 1), 32800.0)
    scale = value_scale(tabs, zx)
    want = fewest_runs(per, scale)
    got = FU._channel_runs(torch.from_numpy(per), torch.zeros(2, dtype=torch.float64), tabs, zx)
    assert got == want
    assert got == (2 if scale[0] <= 255 else 4)


@pytest.mark.parametrize("zx", [0.0, 9.0])
def test_channel_runs_narrow_activations(zx):
    """A 4-bit x 8-bit LUT: the activations span 16 codes, so ``|x - Zx| <= 15`` (not the
    weights' 255): eight channels of 20000 fit in two runs."""
    a = np.arange(16)[:, None] * np.arange(256)[None, :]
    tabs = tables(a, width_a=4, width_b=8)
    assert tabs.u_is_value and tabs.prod.shape == (16, 256)
    per = np.full((1, 8, 1), 20000.0)
    assert fewest_runs(per, value_scale(tabs, zx)) == 2
    assert FU._channel_runs(torch.from_numpy(per), torch.zeros(1, dtype=torch.float64), tabs, zx) == 2


def test_channel_runs_wide_activations_below_zero_point():
    """An 8-bit x 4-bit LUT with ``Zx = -10``: ``|x - Zx|`` reaches 265 (the activations' 256
    codes, not the weights' 16)."""
    a = np.arange(256)[:, None] * np.arange(16)[None, :]
    tabs = tables(a, width_a=8, width_b=4)
    per = np.full((1, 4, 1), 31700.0)               # 2 * 31700 * 255 < 2**24 <= 2 * 31700 * 265
    assert fewest_runs(per, value_scale(tabs, -10.0)) == 4
    assert FU._channel_runs(torch.from_numpy(per), torch.zeros(1, dtype=torch.float64), tabs, -10.0) == 4


def test_channel_runs_bound_is_strict_at_two_to_the_24():
    """A signed rank-1 LUT (``|U| <= 128``): runs of two channels of ``2**16`` reach exactly
    ``2**24`` -- refused -- so four runs; one below, two."""
    v = signed_values()
    tabs = tables(v[:, None] * v[None, :], signed=True)
    per = torch.full((1, 4, 1), 2.0 ** 16, dtype=torch.float64)
    const = torch.zeros(1, dtype=torch.float64)
    assert FU._channel_runs(per, const, tabs, 0.0) == 4
    assert FU._channel_runs(per - 1.0 / 128, const, tabs, 0.0) == 2


def test_channel_runs_refuse_a_sum_that_could_reach_two_to_the_53():
    """The whole bound plus ``|C|`` must stay below ``2**53`` (float64 adds the runs): at
    ``2**53`` no runs, one below it runs; the largest ``|C|`` counts by its size, per output."""
    tabs = tables(truncated(0))
    per = torch.ones(2, 4, 1, dtype=torch.float64)
    s = 4 * 255.0                                      # each output's whole bound
    for c, want in ((LIMIT64 - s, None), (LIMIT64 - s - 1, 2), (-(LIMIT64 - s), None), (LIMIT64, None),
                    (-LIMIT64, None)):
        const = torch.tensor([0.0, c], dtype=torch.float64)
        assert FU._channel_runs(per, const, tabs, 0.0) == want, c
    # per output: the largest row sum and the largest |C| (not the sum over the outputs)
    const = torch.tensor([LIMIT64 - s - 1, 0.0], dtype=torch.float64)
    assert FU._channel_runs(per, const, tabs, 0.0) == 2
