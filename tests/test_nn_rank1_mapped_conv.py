"""Rank-1 LUT convolutions whose activation factor is a look-up (DRUM-like): the mapped path.

``LUT[x, w] = U[x] V[w]`` with ``U`` not the activation's value has no fold of the
zero-point cross terms (``value(x)`` is not a multiple of ``U``), so such layers took the
unfused path (or the gather kernel under ``auto``): 3-5x the float layer. The mapped path
(``fused._rank1_mapped_prep``, ``_rank1_mapped_conv``) convolves ``U[x] - U[Zx]`` with
``V[w]`` and adds ``- Zw_j S`` (``S``: the window sums of ``x - Zx``). References: the
numpy brute force (one look-up per product, cross terms, int64) with the layer's float32
dequantization; the unfused path of the same layer for gradients; the torch fallbacks of
the numba passes, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, eval_plan
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn import quant_loops as L
from test_nn_eval_plan import brute, bits, general, make, planned
from test_nn_wide_conv_fold import brute_conv_acc

#: The numba passes run (numba installed, APPMULT_NO_NUMBA not set): the tests of them skip otherwise.
needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def drum(width: int = 8, k: int = 4, signed: bool = False) -> np.ndarray:
    """DRUM(k) by value: the k bits from the leading one, the lowest set (unbiased),
    magnitudes for signed operands; the table is indexed by code."""
    def approx(a):
        a = int(a)
        if a < (1 << k):
            return a
        t = a.bit_length() - k
        return ((a >> t) | 1) << t
    if signed:
        v = np.where(np.arange(1 << width) < (1 << (width - 1)), np.arange(1 << width),
                     np.arange(1 << width) - (1 << width))
        d = np.array([np.sign(a) * approx(abs(a)) for a in v])
    else:
        d = np.array([approx(a) for a in range(1 << width)])
    return np.outer(d, d)


def test_drum_tables_are_rank1_lookups():
    for signed in (False, True):
        layer, _ = make(drum(signed=signed), signed=signed)
        assert layer.lut.rank == 1 and not layer.lut.u_is_value
        assert layer.lut.value_coef is None   # no fold of the cross terms: the case this path is for


CASES = {
    "unsigned, Zx > 0": dict(shift=-0.3),
    "unsigned, Zx = 0, padding 2, stride 2": dict(padding=2, stride=2),
    "grouped, dilation 2": dict(groups=2, dilation=2, padding=1, shift=-0.2),
    "per-tensor weights": dict(scheme="per_tensor", shift=-0.1),
    "signed (no cross terms)": dict(signed=True, shift=-0.5),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("numba", [pytest.param(True, marks=needs_numba), False])
def test_layer_output_is_the_brute_force(name, numba, monkeypatch):
    case = dict(CASES[name])
    signed = case.get("signed", False)
    table = drum(signed=signed)
    layer, x = make(table, **case)
    if not numba:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")   # torch look-up and window sums (the CUDA path)
    want = brute(layer, x, table, signed, layer._padding()[0])
    assert torch.equal(bits(general(layer, x)), bits(want))
    y, ran = planned(layer, x)
    assert ran == numba and torch.equal(bits(y), bits(want))


def test_general_path_takes_the_mapped_convolution(monkeypatch):
    layer, x = make(drum(), shift=-0.3)
    calls = []
    real = FU._rank1_mapped_conv
    monkeypatch.setattr(FN, "_rank1_mapped_conv", lambda *a: calls.append(1) or real(*a))
    general(layer, x)
    assert calls
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
    assert FU._rank1_mapped_prep(qw, zx, zw, layer.lut)[3] is not None   # the S term is in play


@pytest.mark.parametrize("grad", ["ste", "lut2d"])
def test_training_step_matches_the_unfused_path(grad, monkeypatch):
    """Forward bits and the gradients of the input and the weight: the mapped accumulator
    with the LUT's backward attached, against the unfused path (fused paths off)."""
    torch.manual_seed(5)
    lut = LutFile(drum(), width_a=8, width_b=8, signed=False)
    ref = nn.Conv2d(3, 5, 3, padding=1)
    x0 = torch.relu(torch.randn(2, 3, 7, 7)) - 0.2
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(FN, "_FUSED_LOWRANK", fused)
        layer = ApproxConv2d.from_float(ref, ApproxConfig(lut, kernel="lowrank", grad=grad,
                                                          compute_missing_gradients=True)).train()
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, layer.weight.grad))
    (y1, gx1, gw1), (y2, gx2, gw2) = outs
    assert torch.equal(bits(y1), bits(y2))
    # the two backwards sum in other orders: float32 rounding, scaled to each gradient's size
    assert torch.allclose(gx1, gx2, rtol=1e-5, atol=1e-5 * float(gx2.abs().max()))
    assert torch.allclose(gw1, gw2, rtol=1e-5, atol=1e-5 * float(gw2.abs().max()))


def test_prep_refuses_what_it_cannot_do_exactly():
    layer, x = make(drum(), shift=-0.3)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
    tabs = layer.lut
    assert FU._rank1_mapped_prep(qw, zx, zw, tabs) is not False
    assert FU._rank1_mapped_prep(qw, zx + 0.5, zw, tabs) is False                       # not an integer code
    assert FU._rank1_mapped_prep(qw, torch.tensor(-1.0), zw, tabs) is False             # outside the table
    assert FU._rank1_mapped_prep(qw, zx, zw + 0.25, tabs) is False                      # Zw not an integer
    assert FU._rank1_mapped_prep(qw, zx.clone().requires_grad_(True), zw, tabs) is False
    wide = torch.full((2, 300, 3, 3), 255.0)   # sum |V| max|U - U[Zx]| far above 2**24 (Zw = 0: no S term)
    assert FU._rank1_mapped_prep(wide, zx, torch.zeros(2), tabs) is False
    assert FU._rank1_mapped_prep(wide[:, :20], zx, torch.zeros(2), tabs) is not False   # 20 x 9 x 248 x 248: below
    exact, _ = make(np.outer(np.arange(256), np.arange(256)))
    assert FU._rank1_mapped_prep(qw, zx, zw, exact.lut) is False                         # U = value: the fold's


def test_zw_term_bound_keeps_the_product_exact():
    """``K max|x - Zx| max|Zw|`` at or above ``2**24``: refused (the ``Zw_j S`` product
    could round); just below: taken."""
    layer, _ = make(drum(), cin=64, cout=2, k=3, shift=-0.3)
    tabs = layer.lut
    zx = torch.tensor(0.0)
    qw = torch.zeros(2, 64, 3, 3)
    k, bmax = 64 * 9, 255
    over = torch.tensor([float(2 ** 24 // (k * bmax) + 1), 1.0])
    under = torch.tensor([float((2 ** 24 - 1) // (k * bmax)), 1.0])
    assert FU._rank1_mapped_prep(qw, zx, over, tabs) is False
    assert FU._rank1_mapped_prep(qw, zx, under, tabs) is not False


def test_window_sums_and_group_sums_against_a_convolution():
    torch.manual_seed(7)
    q = torch.randint(0, 256, (3, 6, 11, 9)).float()
    for zx, groups, kernel, padding, stride, dilation in [(0.0, 1, (5, 5), (0, 0), (1, 1), (1, 1)),
                                                          (3.0, 2, (3, 3), (1, 1), (2, 2), (1, 1)),
                                                          (7.0, 3, (3, 2), (2, 1), (1, 2), (2, 1))]:
        sums = FU._group_sums(q, zx, groups)
        want_sums = (q - zx).reshape(3, groups, 6 // groups, 11, 9).sum(2)
        assert torch.equal(sums, want_sums)
        ones = torch.ones(groups, 6 // groups, *kernel)
        want = F.conv2d(q - zx, ones, None, stride, padding, dilation, groups)
        assert torch.equal(FU._window_sums(sums, kernel, padding, stride, dilation), want)


@needs_numba
def test_map_codes_never_reads_outside_the_table():
    table = torch.arange(10, 20, dtype=torch.float32)
    q = torch.tensor([0.0, 3.0, 9.0, -4.0, 25.0, float("nan")])
    got = FU._mapped_codes(q.reshape(1, 1, 2, 3), table, 0).reshape(-1)
    assert got[:3].tolist() == [10.0, 13.0, 19.0]
    assert got[3] == 10.0 and got[4] == 19.0 and got[5] in (10.0, 19.0)   # clamped: never outside
    q2 = torch.tensor([-128.0, 0.0, 127.0]).reshape(1, 1, 1, 3)
    t2 = torch.arange(256, dtype=torch.float32) * 2
    assert FU._mapped_codes(q2, t2, -128).reshape(-1).tolist() == [0.0, 256.0, 510.0]


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
def test_quantize_map_matches_fake_quant_then_a_lookup():
    torch.manual_seed(8)
    x = torch.randn(2, 4, 5, 6) * 3
    scale, zp = np.array([0.05], np.float32), np.array([7.0], np.float32)
    table = (np.arange(256, dtype=np.float32) * 3 - 11)
    q = torch.empty_like(x)
    L.fake_quant(x.reshape(1, -1).numpy(), scale, zp, 0, 255, q.reshape(1, -1).numpy(), np.empty((0, 0), np.bool_))
    for groups, pad in ((1, (0, 0)), (2, (1, 2))):
        a = torch.empty_like(x)
        sums = torch.full((2, groups, 5 + 2 * pad[0], 6 + 2 * pad[1]), 99.0)
        tops = L.quantize_map(x.numpy(), scale, zp, 0, 255, table, groups, np.float32(7.0), a.numpy(), sums.numpy())
        assert tops < L.NON_FINITE
        assert torch.equal(a, torch.from_numpy(table)[q.long()])
        want = F.pad((q - 7.0).reshape(2, groups, 4 // groups, 5, 6).sum(2), (pad[1], pad[1], pad[0], pad[0]))
        assert torch.equal(sums, want)
    xb = x.clone()
    xb[1, 2, 3, 4] = float("inf")
    a = torch.empty_like(x)
    assert L.quantize_map(xb.numpy(), scale, zp, 0, 255, table, 1, np.float32(7.0), a.numpy(),
                          np.empty((0, 0, 0, 0), np.float32)) >= L.NON_FINITE


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
def test_quantize_map_signed_codes_nan_and_three_groups():
    """A signed code range (offsets from ``qmin = -128``), NaN (read as ``qmin``; the word
    flags it), three groups of two channels and an asymmetric padding: against fake_quant
    and a look-up in torch."""
    torch.manual_seed(12)
    x = torch.randn(3, 6, 7, 5) * 4
    x[0, 1, 2, 3] = float("nan")
    scale, zp = np.array([0.03], np.float32), np.array([-5.0], np.float32)
    table = (np.arange(256, dtype=np.float32) * -2 + 77)
    q = torch.empty_like(x)
    L.fake_quant(x.reshape(1, -1).numpy(), scale, zp, -128, 127, q.reshape(1, -1).numpy(), np.empty((0, 0), np.bool_))
    codes = torch.where(q.isnan(), torch.tensor(-128.0), q)
    a = torch.full_like(x, 5.0)
    sums = torch.full((3, 3, 7 + 2, 5 + 6), 99.0)
    tops = L.quantize_map(x.numpy(), scale, zp, -128, 127, table, 3, np.float32(-5.0), a.numpy(), sums.numpy())
    assert tops >= L.NON_FINITE
    assert torch.equal(a, torch.from_numpy(table)[(codes + 128).long()])
    want = F.pad((codes + 5.0).reshape(3, 3, 2, 7, 5).sum(2), (3, 3, 1, 1))
    assert torch.equal(bits(sums), bits(want))


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("kernel, stride, dilation, groups, bias", [
    ((5, 5), (1, 1), (1, 1), 1, True), ((3, 3), (2, 2), (1, 1), 2, False), ((3, 2), (1, 2), (2, 1), 3, True),
    ((1, 1), (3, 1), (1, 1), 1, True), ((2, 4), (2, 3), (3, 2), 2, False)])
def test_dequantize_channels_zw_against_torch(kernel, stride, dilation, groups, bias):
    """``(acc + nzw_j S) * scale_j + bias_j``, ``S`` the window sums of the (zero-bordered)
    maps, against a convolution with ones and torch's float32 ops (integer sums: exact)."""
    torch.manual_seed(13)
    n, hp, wp, per = 3, 12, 13, 2
    maps = torch.zeros(n, groups, hp, wp)
    maps[:, :, 1:-1, 2:-2] = torch.randint(-300, 300, (n, groups, hp - 2, wp - 4)).float()
    ones = torch.ones(groups, 1, *kernel)
    s = F.conv2d(maps, ones, None, stride, 0, dilation, groups)
    co = groups * per
    acc = torch.randint(-5000, 5000, (n, co) + tuple(s.shape[2:])).float()
    nzw = -torch.randint(0, 140, (co,)).float()
    scale = torch.rand(co) * 0.01
    b = torch.randn(co) if bias else torch.empty(0)
    win = s.repeat_interleave(per, dim=1)
    want = (acc + nzw.reshape(1, -1, 1, 1) * win) * scale.reshape(1, -1, 1, 1)
    if bias:
        want = want + b.reshape(1, -1, 1, 1)
    geom = np.array([*kernel, *stride, *dilation], np.int64)
    got = acc.clone()
    L.dequantize_channels_zw(got.numpy(), maps.numpy(), geom, nzw.numpy(), scale.numpy(), b.numpy())
    assert torch.equal(bits(got), bits(want))


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
def test_map_codes_sums_against_map_codes_and_torch_sums():
    """The training path's look-ups and padded group sums of the codes, against
    ``map_codes`` and a torch reduction padded by ``F.pad`` (out-of-range and NaN codes
    read the table's ends, as ``map_codes`` reads them)."""
    torch.manual_seed(14)
    q = torch.randint(-3, 260, (3, 6, 5, 7)).float()
    q[1, 2, 3, 4] = float("nan")
    table = torch.arange(256, dtype=torch.float32) * 3 - 100
    for groups, (ph, pw), zx in ((1, (0, 0), 0.0), (2, (1, 2), 7.0), (3, (2, 0), -4.0)):
        a = torch.full_like(q, 5.0)
        sums = torch.full((3, groups, 5 + 2 * ph, 7 + 2 * pw), 99.0)
        L.map_codes_sums(q.numpy(), table.numpy(), 0, np.float32(zx), a.numpy(), sums.numpy())
        want_a = torch.empty_like(q)
        L.map_codes(q.reshape(-1).numpy(), table.numpy(), 0, want_a.reshape(-1).numpy())
        assert torch.equal(bits(a), bits(want_a))
        want = F.pad((q - zx).reshape(3, groups, 6 // groups, 5, 7).sum(2), (pw, pw, ph, ph))
        assert torch.equal(bits(sums), bits(want))


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("kernel, stride, dilation, groups", [
    ((5, 5), (1, 1), (1, 1), 1), ((3, 3), (2, 2), (1, 1), 2), ((3, 2), (1, 2), (2, 1), 3), ((2, 4), (2, 3), (3, 2), 2)])
def test_window_term_alone_against_addcmul(kernel, stride, dilation, groups):
    torch.manual_seed(15)
    n, hp, wp, per = 2, 12, 13, 3
    maps = torch.zeros(n, groups, hp, wp)
    maps[:, :, 2:-1, 1:-3] = torch.randint(-400, 400, (n, groups, hp - 3, wp - 4)).float()
    s = F.conv2d(maps, torch.ones(groups, 1, *kernel), None, stride, 0, dilation, groups)
    co = groups * per
    acc = torch.randint(-9000, 9000, (n, co) + tuple(s.shape[2:])).float()
    nzw = -torch.randint(0, 200, (co,)).float()
    want = acc.clone()
    want.view(n, groups, per, *s.shape[2:]).addcmul_(s.unsqueeze(2), nzw.reshape(1, groups, per, 1, 1))
    geom = np.array([*kernel, *stride, *dilation], np.int64)
    got = acc.clone()
    none = np.empty(0, np.float32)   # no scale, no bias: the term added only (the training path)
    L.dequantize_channels_zw(got.numpy(), maps.numpy(), geom, nzw.numpy(), none, none)
    assert torch.equal(bits(got), bits(want))


@needs_numba
@pytest.mark.parametrize("name", ["unsigned, Zx > 0", "unsigned, Zx = 0, padding 2, stride 2", "grouped, dilation 2",
                                  "per-tensor weights"])
def test_numba_mapped_conv_is_the_torch_path(name, monkeypatch):
    """The training path's mapped accumulator by the numba passes against the torch passes
    it replaces (look-up, group sums, depthwise window sums, addcmul_), bit for bit."""
    case = dict(CASES[name])
    layer, x = make(drum(), **case)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
    tabs = layer.lut
    prep = FU._rank1_mapped_prep(qw, zx, zw, tabs)
    assert prep is not False and prep[3] is not None
    geom = (layer._padding(), layer.stride, layer.dilation, layer.groups)
    calls = []
    real = FU._numba_mapped_conv
    monkeypatch.setattr(FU, "_numba_mapped_conv", lambda *a: calls.append(1) or real(*a))
    got = FU._rank1_mapped_conv(qx, zx, prep, tabs, *geom, torch.float32)
    assert calls
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    want = FU._rank1_mapped_conv(qx, zx, prep, tabs, *geom, torch.float32)
    assert len(calls) == 1 and torch.equal(bits(got), bits(want))


def _torch_mapped_prep(qw, zx, zw, tabs, monkeypatch):
    """``_rank1_mapped_prep`` by its torch path (the numba prep declined)."""
    with monkeypatch.context() as mp:
        mp.setattr(FU, "_numba_mapped_prep", lambda *a: None)
        return FU._rank1_mapped_prep(qw, zx, zw, tabs)


def _same_prep(got, want):
    if want is False or got is False:
        return got is want
    for g, w in zip(got, want):
        if (g is None) != (w is None):
            return False
        if g is not None and not (g.dtype == w.dtype and g.shape == w.shape and torch.equal(bits(g), bits(w))):
            return False
    return len(got) == len(want)


@needs_numba
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("zx", [0.0, 5.0, 131.0, -3.0])
@pytest.mark.parametrize("zw_kind", ["per channel", "per tensor", "zero", "with -0.0 codes"])
def test_numba_mapped_prep_is_the_torch_prep(signed, zx, zw_kind, monkeypatch):
    """Every tensor of the weight side (bits, dtype, shape) and every decision, against the
    torch path, for signed and unsigned DRUM, several activation zero points (one outside
    the table: refused by both) and weight zero points of each kind."""
    table = drum(signed=signed)
    layer, _ = make(table, signed=signed, cin=3, cout=5, k=3)
    tabs = layer.lut
    g = torch.Generator().manual_seed(16)
    lo, hi = (-128, 127) if signed else (0, 255)
    qw = torch.randint(lo, hi + 1, (5, 3, 3, 3), generator=g).float()
    zw = {"per channel": torch.randint(-4, 140, (5,), generator=g).float(), "per tensor": torch.tensor([77.0]),
          "zero": torch.zeros(5), "with -0.0 codes": torch.tensor([0.0, 3.0, 0.0, 9.0, 1.0])}[zw_kind]
    if zw_kind == "with -0.0 codes":
        qw[1, 0] = -0.0
        qw[2] = -0.0
    zxt = torch.tensor(float(lo) + zx if signed else zx)
    calls = []
    real = FU._numba_mapped_prep
    monkeypatch.setattr(FU, "_numba_mapped_prep", lambda *a: (calls.append(1), real(*a))[1])
    got = FU._rank1_mapped_prep(qw, zxt, zw, tabs)
    assert calls and real(qw, zxt, zw, tabs) is not None   # decided by the numba prep, not left to torch
    monkeypatch.setattr(FU, "_numba_mapped_prep", real)
    assert _same_prep(got, _torch_mapped_prep(qw, zxt, zw, tabs, monkeypatch))


@needs_numba
def test_numba_mapped_prep_declines_and_refuses_as_the_torch_prep(monkeypatch):
    """The bounds (main convolution, ``Zw S``, a group's code sum), codes outside the table
    (left to the torch path: its indexing wraps a negative offset, raises for NaN and too
    large ones) and zero points that are not integers."""
    layer, _ = make(drum(), cin=64, cout=2, k=3, shift=-0.3)
    tabs = layer.lut
    zx = torch.tensor(0.0)
    k, bmax = 64 * 9, 255
    cases = [
        (torch.zeros(2, 64, 3, 3), torch.tensor([float(2 ** 24 // (k * bmax) + 1), 1.0])),   # Zw S over
        (torch.zeros(2, 64, 3, 3), torch.tensor([float((2 ** 24 - 1) // (k * bmax)), 1.0])),  # just under
        (torch.full((2, 64, 3, 3), 255.0), torch.zeros(2)),      # sum |V| max|U - U[Zx]| over 2**24
        (torch.full((2, 20, 3, 3), 255.0), torch.zeros(2)),      # under
        (torch.full((2, 64, 3, 3), 3.0), torch.tensor([1.5, 2.0])),   # Zw not an integer
    ]
    for qw, zw in cases:
        assert _same_prep(FU._rank1_mapped_prep(qw, zx, zw, tabs), _torch_mapped_prep(qw, zx, zw, tabs, monkeypatch))
    # Zx = 255, codes 255 (U = V = 240): sum |V| max|U - U[Zx]| = 57600 K, |C| = 7425 K; with
    # K = 270 the sum alone stays below 2**24 and the bound with |C| does not
    for cg, want in ((30, False), (28, True)):
        qw, zx255 = torch.full((2, cg, 3, 3), 255.0), torch.tensor(255.0)
        got = FU._rank1_mapped_prep(qw, zx255, torch.zeros(2), tabs)
        assert (got is not False) == want and _same_prep(got, _torch_mapped_prep(qw, zx255, torch.zeros(2), tabs,
                                                                                   monkeypatch))
    assert FU._numba_mapped_prep(torch.zeros(2, 64, 3, 3), torch.tensor(0.5), torch.zeros(2), tabs) is None
    assert FU._rank1_mapped_prep(torch.zeros(2, 64, 3, 3), torch.tensor(0.5), torch.zeros(2), tabs) is False
    assert FU._rank1_mapped_prep(torch.zeros(2, 64, 3, 3), torch.tensor(256.0), torch.zeros(2), tabs) is False
    big = torch.zeros(1, 70001, 1, 1)
    one, _ = make(drum(), cin=1, cout=1, k=1)
    assert FU._rank1_mapped_prep(big, torch.tensor(128.0), torch.tensor([1.0]), one.lut) is False
    assert FU._rank1_mapped_prep(big[:, :65793], torch.tensor(128.0), torch.tensor([1.0]), one.lut) is not False
    qw = torch.full((2, 64, 3, 3), 4.0)
    qw[1, 3, 1, 1] = -1.0            # offset -1: the torch path's index wraps to the last entry
    assert FU._numba_mapped_prep(qw, zx, torch.zeros(2), tabs) is None
    assert _same_prep(FU._rank1_mapped_prep(qw, zx, torch.zeros(2), tabs),
                      _torch_mapped_prep(qw, zx, torch.zeros(2), tabs, monkeypatch))
    for bad in (256.0, float("nan")):
        qw[1, 3, 1, 1] = bad
        assert FU._numba_mapped_prep(qw, zx, torch.zeros(2), tabs) is None
        with pytest.raises((IndexError, RuntimeError)):
            FU._rank1_mapped_prep(qw, zx, torch.zeros(2), tabs)


@needs_numba
def test_numba_mapped_prep_steps_aside_for_each_guard(monkeypatch):
    """Each condition alone sends the weight side to the torch path (``None``): weights not
    4-D, not float32 or not on the CPU, a zero point ``Zx`` that is not 0-dimensional, ``Zw``
    not on the CPU or of another dtype, tables not on the CPU, numba switched off."""
    import types
    layer, _ = make(drum(), cin=3, cout=4, k=3, shift=-0.3)
    tabs = layer.lut
    qw = torch.randint(0, 256, (4, 3, 3, 3), generator=torch.Generator().manual_seed(17)).float()
    zx, zw = torch.tensor(9.0), torch.tensor([3.0, 0.0, 7.0, 1.0])
    assert FU._numba_mapped_prep(qw, zx, zw, tabs) not in (None, False)
    meta_tabs = types.SimpleNamespace(u=torch.empty(256, 1, device="meta"))
    for args in [(qw[0], zx, zw, tabs), (qw.double(), zx, zw, tabs), (qw.to("meta"), zx, zw, tabs),
                 (qw, zx.reshape(1), zw, tabs), (qw, zx, zw.to("meta"), tabs), (qw, zx, zw.half(), tabs),
                 (qw, zx, zw.to(torch.int64), tabs), (qw, zx, zw, meta_tabs)]:
        assert FU._numba_mapped_prep(*args) is None
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert FU._numba_mapped_prep(qw, zx, zw, tabs) is None


@needs_numba
def test_numba_mapped_prep_makes_float32_under_a_float64_default_dtype(monkeypatch):
    """``torch.set_default_dtype(torch.float64)`` changes nothing: the weights, bias and
    tables are float32, the bits of the torch path's, and the training accumulator too."""
    layer, x = make(drum(), cin=3, cout=4, k=3, shift=-0.3)
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
    tabs = layer.lut
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = FU._rank1_mapped_prep(qw, zx, zw, tabs)
        assert all(t is None or t.dtype == torch.float32 for t in got)
        assert _same_prep(got, _torch_mapped_prep(qw, zx, zw, tabs, monkeypatch))
        geom = (layer._padding(), layer.stride, layer.dilation, layer.groups)
        acc = FU._rank1_mapped_conv(qx, zx, got, tabs, *geom, torch.float32)
    finally:
        torch.set_default_dtype(prev)
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert torch.equal(bits(acc), bits(FU._rank1_mapped_conv(qx, zx, got, tabs, *geom, torch.float32)))


def test_torch_mapped_prep_refuses_at_each_bound(monkeypatch):
    """The torch path (what CUDA and ``APPMULT_NO_NUMBA`` run) at the edges the numba path
    also decides: ``Zx`` one past the table, the code-sum bound at 65,793 / 65,794 channels
    (``65,794 x 255 >= 2**24 > 65,794 x 254``), and the ``Zw S`` bound exactly at ``2**24``
    (``K = 128`` 1x1 channels, ``Zx = 128``: ``128 x 128 x 1024``) -- each against the numba
    path where it runs."""
    one, _ = make(drum(), cin=1, cout=1, k=1)
    tabs = one.lut
    assert _torch_mapped_prep(torch.zeros(2, 4, 1, 1), torch.tensor(256.0), torch.zeros(2), tabs, monkeypatch) is False
    for c, want in ((65793, True), (65794, False)):
        qw = torch.zeros(1, c, 1, 1)
        got = _torch_mapped_prep(qw, torch.tensor(128.0), torch.tensor([1.0]), tabs, monkeypatch)
        assert (got is not False) == want
        if FU.K.numba_available():
            assert _same_prep(FU._rank1_mapped_prep(qw, torch.tensor(128.0), torch.tensor([1.0]), tabs), got)
    for zw0, want in ((1023.0, True), (1024.0, False)):
        qw, zw = torch.zeros(2, 128, 1, 1), torch.tensor([zw0, 1.0])
        got = _torch_mapped_prep(qw, torch.tensor(128.0), zw, tabs, monkeypatch)
        assert (got is not False) == want
        if FU.K.numba_available():
            assert _same_prep(FU._rank1_mapped_prep(qw, torch.tensor(128.0), zw, tabs), got)


def test_mapped_prep_bounds_at_exactly_two_to_the_24(monkeypatch):
    """A LUT that ignores the activation (``U = 1``, so ``max|U - U[Zx]| = 0``) with weight
    factors ``V[1] = V[2] = 2**23``, ``V[3] = 5``, ``V[255] = 2**24``: codes (1, 2) at ``Zx = 0``
    give the bound ``|C| = 2**24`` exactly, code 255 at ``Zx = 255`` a ``max|V|`` of exactly
    ``2**24`` under a smaller bound -- both refused by both paths; codes (1, 3) are taken."""
    v = np.zeros(256, np.int64)
    v[1] = v[2] = 1 << 23
    v[3], v[255] = 5, 1 << 24
    layer, _ = make(np.tile(v, (256, 1)), cin=1, cout=1, k=1)
    tabs = layer.lut
    assert tabs.rank == 1 and not tabs.u_is_value and float(tabs.u.abs().max()) == 1.0
    for codes, zx, taken in (([1.0, 2.0], 0.0, False), ([255.0], 255.0, False), ([1.0, 3.0], 0.0, True)):
        qw, zxt = torch.tensor(codes).reshape(1, -1, 1, 1), torch.tensor(zx)
        want = _torch_mapped_prep(qw, zxt, torch.zeros(1), tabs, monkeypatch)
        assert (want is not False) == taken
        if FU.K.numba_available():
            assert _same_prep(FU._rank1_mapped_prep(qw, zxt, torch.zeros(1), tabs), want)


@pytest.mark.skipif(not L.AVAILABLE, reason="numba not installed")
def test_mapped_kernels_refuse_inconsistent_shapes():
    """The kernels index without bounds checks, so each refuses operands whose shapes do
    not fit together (a ValueError, not a write outside an array)."""
    f32 = np.float32
    x, table = np.zeros((2, 4, 5, 6), f32), np.zeros(256, f32)
    one, zero = np.ones(1, f32), np.zeros(1, f32)
    good_sums = np.zeros((2, 2, 7, 8), f32)
    assert L.quantize_map(x, one, zero, 0, 255, table, 2, f32(0), np.empty_like(x), good_sums) < L.NON_FINITE
    for a, tab, groups, sums in [(np.zeros((2, 4, 5, 5), f32), table, 2, good_sums),     # output shape
                                 (np.empty_like(x), table[:255], 2, good_sums),          # table too short
                                 (np.empty_like(x), table, 3, np.zeros((2, 3, 7, 8), f32)),  # 4 % 3
                                 (np.empty_like(x), table, 2, np.zeros((2, 2, 3, 8), f32)),  # maps too small
                                 (np.empty_like(x), table, 2, np.zeros((1, 2, 7, 8), f32)),  # batch
                                 (np.empty_like(x), table, 2, np.zeros((2, 1, 7, 8), f32))]:  # groups
        with pytest.raises(ValueError, match="quantize_map"):
            L.quantize_map(x, one, zero, 0, 255, tab, groups, f32(0), a, sums)
    L.map_codes_sums(x, table, 0, f32(0), np.empty_like(x), good_sums)
    for out, sums in [(np.zeros((2, 4, 5, 5), f32), good_sums), (np.empty_like(x), np.zeros((2, 2, 7, 5), f32)),
                      (np.empty_like(x), np.zeros((2, 3, 7, 8), f32)), (np.empty_like(x), np.zeros((3, 2, 7, 8), f32))]:
        with pytest.raises(ValueError, match="map_codes_sums"):
            L.map_codes_sums(x, table, 0, f32(0), out, sums)
    geom = np.array([3, 3, 1, 1, 1, 1], np.int64)
    acc, nzw, sc = np.zeros((2, 4, 5, 6), f32), np.ones(4, f32), np.ones(4, f32)
    L.dequantize_channels_zw(acc, good_sums, geom, nzw, sc, sc)
    none = np.empty(0, f32)
    L.dequantize_channels_zw(acc, good_sums, geom, nzw, none, none)
    bad = [(np.zeros((2, 4, 5, 5), f32), good_sums, geom, nzw, sc, sc),                  # Wo of another geometry
           (acc, np.zeros((2, 2, 6, 8), f32), geom, nzw, sc, sc),                        # Hp
           (acc, np.zeros((1, 2, 7, 8), f32), geom, nzw, sc, sc),                        # batch
           (acc, np.zeros((2, 3, 7, 8), f32), geom, nzw, sc, sc),                        # 4 % 3 groups
           (acc, good_sums, np.array([3, 3, 0, 1, 1, 1], np.int64), nzw, sc, sc),        # stride 0
           (acc, good_sums, np.array([3, 3, 1, 1, 1], np.int64), nzw, sc, sc),           # five numbers
           (acc, good_sums, geom, nzw[:3], sc, sc), (acc, good_sums, geom, nzw, sc[:3], sc),
           (acc, good_sums, geom, nzw, sc, sc[:3]), (acc, good_sums, geom, nzw, none, sc)]
    for args in bad:
        with pytest.raises(ValueError, match="dequantize_channels_zw"):
            L.dequantize_channels_zw(*args)


@needs_numba
def test_eval_plan_is_off_for_the_mapped_path_where_numba_is(monkeypatch):
    """The plan needs the numba passes; with the plan switch off the general path gives the same bits."""
    table = drum()
    layer, x = make(table, shift=-0.3, padding=1)
    y, ran = planned(layer, x)
    monkeypatch.setattr(eval_plan, "ENABLED", False)
    y2, ran2 = planned(layer, x)
    assert ran and not ran2 and torch.equal(bits(y), bits(y2))


def test_group_of_very_many_channels_is_refused_where_its_code_sum_could_round():
    """The channel sums are taken over the codes before ``Cg Zx`` is subtracted: with
    ``Cg max|x| >= 2**24`` (70,001 channels of codes near 255, ``Zx = 128``, ``Zw = 1``:
    ``K max|x - Zx| |Zw|`` alone stays below) the sum ``sum x`` could round -- refused
    (found by the mutation review: the mapped path gave -8714984 where the exact sum is
    -8714985)."""
    torch.manual_seed(9)
    table = drum()
    layer, _ = make(table, cin=1, cout=1, k=1)
    tabs = layer.lut
    c = 70001
    qx = torch.randint(250, 256, (1, c, 1, 1)).float()
    qw = torch.zeros(1, c, 1, 1)
    zx, zw = torch.tensor(128.0), torch.tensor([1.0])
    assert FU._rank1_mapped_prep(qw, zx, zw, tabs) is False
    assert FU._rank1_mapped_prep(qw[:, :65793], zx, zw, tabs) is not False   # 65793 x 255 = 2**24 - 1
    assert FU._rank1_mapped_prep(qw[:, :65794], zx, zw, tabs) is False       # 65794 x 255 >= 2**24 (x 254: below)
    one = torch.tensor(1.0)
    # (the float32 plain path it falls back to may round such sums, as documented; the
    # exact accumulation gives the integer)
    y = FN.approx_conv2d(qx.double(), one.double(), zx.double(), qw.double(), one.double(), zw.double(), None, tabs,
                         exact=True)
    want = brute_conv_acc(table, qx, 128.0, qw, zw, 0, False)
    assert torch.equal(y, torch.from_numpy(want.astype(np.float64)))
