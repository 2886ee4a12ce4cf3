"""The folded low-rank linear layer as one exact int8 GEMM (issue 12).

``fused._int8_linear_prep`` writes the folded weights as base-256 digit planes and the
activation factors as int8 around an offset, so ``torch._int_mm`` (exact int32 sums)
computes the whole accumulator. The references are numpy (one look-up per product from
the layer's own quantized operands, the zero-point cross terms, int64 sums) and the float
path of the same layer (``functional._INT8_GEMM = False``), which must agree bit for bit.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from test_nn_split_k import truncated as truncated_unsigned


def truncated(columns: int, signed: bool = False) -> np.ndarray:
    """8x8 array multiplier without the partial-product columns ``< columns`` (signed:
    the exact product of two's-complement operands, indexed by codes)."""
    if signed:
        v = np.where(np.arange(256) < 128, np.arange(256), np.arange(256) - 256)
        return v[:, None] * v[None, :]
    return truncated_unsigned(columns)


def brute_acc(table, qx, zx, qw, zw, signed):
    """``sum_k LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` (no cross terms when signed), int64."""
    cx, cw = qx.astype(np.int64), qw.astype(np.int64)
    lut = table[cx[:, None, :] % 256, cw[None, :, :] % 256].sum(-1)  # values -> codes
    if signed:
        return lut
    zwc = zw.reshape(1, -1).astype(np.int64)
    k = cx.shape[1]
    return lut - cx.sum(1, keepdims=True) * zwc - int(zx) * cw.sum(1)[None, :] + k * int(zx) * zwc


def make_layer(table, k, n, seed, signed=False):
    torch.manual_seed(seed)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    ref = nn.Linear(k, n)
    layer = ApproxLinear.from_float(ref, ApproxConfig(lut, kernel="lowrank"))  # per-channel Zw
    x = torch.randn(20, k) + 0.3     # negative values too: Zx > 0 when unsigned
    layer.eval()
    layer(x)                         # calibrate, then freeze the observer
    layer.act_quant.observing = False
    return layer, x


@contextlib.contextmanager
def int8_gemm(on: bool):
    """The int8-GEMM switch (``functional._INT8_GEMM``) set for a block."""
    prev = FN._INT8_GEMM
    FN._INT8_GEMM = on
    try:
        yield
    finally:
        FN._INT8_GEMM = prev


def forward(layer, x, int8: bool):
    with int8_gemm(int8), torch.no_grad():
        return layer(x)


def quantized_case(columns, signed, k, n):
    """A calibrated ``k -> n`` layer over ``truncated(columns, signed)``, its quantized
    operands and its split-k fold (``None`` where the LUT has none)."""
    table = truncated(columns, signed)
    layer, x = make_layer(table, k, n, seed=k + columns, signed=signed)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
        fold = FU._folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, layer.lut, split_k=True)
    return table, layer, x, (qx, sx, zx, qw, sw, zw), fold


def spy_int8(monkeypatch) -> list:
    """A list that grows by one each time a layer takes the int8 GEMM (the accumulator for
    autograd, or the fused inference epilogue: both run ``_int8_linear_dots``)."""
    calls = []
    real = FU._int8_linear_dots
    monkeypatch.setattr(FU, "_int8_linear_dots", lambda *a: calls.append(1) or real(*a))
    return calls


def both_paths(layer, x, monkeypatch):
    """The layer's eval output with the int8 GEMM and without, checking that the first takes
    it and the second not."""
    calls = spy_int8(monkeypatch)
    y8 = forward(layer, x, True)
    assert calls, "the int8 path was not taken"
    calls.clear()
    yf = forward(layer, x, False)
    assert not calls
    return y8, yf


CASES = [  # (columns, signed, k): rank 1, 3, 5, 7 unsigned (1-2 digit planes), signed exact
    (0, False, 100), (0, False, 600), (2, False, 1100), (4, False, 300), (6, False, 600), (0, True, 500),
]


@pytest.mark.parametrize("columns, signed, k", CASES)
def test_int8_accumulator_equals_brute_force_and_the_float_path(columns, signed, k, monkeypatch):
    n = 7
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(columns, signed, k, n)
    assert fold is not None
    prep = FU._int8_linear_prep(fold, layer.lut)
    assert prep is not False
    acc = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy(), signed)
    got = FU._int8_linear_acc(qx, prep, layer.lut)
    assert got.dtype == torch.float32
    # the exact integer, rounded once to float32
    np.testing.assert_array_equal(got.double().numpy(), acc.astype(np.float32).astype(np.float64))
    # the layer takes the int8 path, and its output equals the float path's bit for bit
    y8, yf = both_paths(layer, x, monkeypatch)
    assert torch.equal(y8, yf)


def test_planes_follow_the_weight_span():
    """Rank 1 (|V - c Zw| < 256 per output): one plane; rank 7 (V up to 2**13): two."""
    spans = {}
    for columns in (0, 6):
        layer, x = make_layer(truncated(columns), 64, 5, seed=columns)
        with torch.no_grad():
            qw, sw, zw = layer.weight_quant(layer.weight)
            qx, sx, zx = layer.act_quant(x)
            fold = FU._folded_lowrank_weights(qw.reshape(5, 64, 1, 1), zx, zw, layer.lut, split_k=True)
        spans[columns] = FU._int8_linear_prep(fold, layer.lut)[-1]
    assert spans == {0: 1, 6: 2}


def test_signed_digits_rebuild_every_value():
    gen = torch.Generator().manual_seed(0)
    limit = 127 * (1 + 256 + 65536)
    w = torch.randint(-limit, limit + 1, (4000,), generator=gen, dtype=torch.int64)
    w = torch.cat([w, torch.tensor([limit, -limit, 0, 127, -128, 128, -129, 32767, -32768])])
    digits = FU._signed_digits(w, 3)
    for d in digits:
        assert int(d.min()) >= -128 and int(d.max()) <= 127
    assert torch.equal(sum(d * 256 ** p for p, d in enumerate(digits)), w)
    with pytest.raises(AssertionError, match="digit planes"):
        FU._signed_digits(torch.tensor([limit + 1]), 3)


def _fold_of(table, k=32, n=3, seed=0, signed=False):
    layer, x = make_layer(table, k, n, seed=seed, signed=signed)
    with torch.no_grad():
        qw, sw, zw = layer.weight_quant(layer.weight)
        qx, sx, zx = layer.act_quant(x)
        return layer, FU._folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, layer.lut, split_k=True)


def test_no_int8_path_where_it_would_not_be_exact(monkeypatch):
    layer, fold = _fold_of(truncated(0))
    assert FU._int8_linear_prep(fold, layer.lut) is not False
    # a reduction whose int32 sums could overflow
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_K", 31)
    assert FU._int8_linear_prep(fold, layer.lut) is False
    monkeypatch.undo()
    # weights that need more digit planes than allowed
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", 0)
    assert FU._int8_linear_prep(fold, layer.lut) is False
    monkeypatch.undo()
    # activation factors spanning more than 256 integers
    big = (fold[0] * 1.0, fold[1], fold[2])
    u = layer.lut.u
    # one value below the range: a span of 256 (also where umax + umin stays below 256)
    layer.lut.u = torch.cat([u, u.new_full((1, u.shape[1]), float(u.min()) - 1)])
    try:
        assert FU._int8_linear_prep(big, layer.lut) is False
    finally:
        layer.lut.u = u
    # not on the CPU
    assert FU._int8_linear_prep((fold[0].to("meta"), fold[1], fold[2]), layer.lut) is False


def test_int8_path_trains_like_the_float_path(monkeypatch):
    """Only the forward's sums change: outputs and gradients equal the float path's. The
    int8 path runs where the weight side is cached (a frozen weight: the input's gradient
    flows through it); a weight that trains takes the float path (preparing the int8
    weights every step would cost more than it saves)."""
    table = truncated(4)
    calls = spy_int8(monkeypatch)
    for frozen in (True, False):
        outs = []
        for int8 in (True, False):
            layer, x = make_layer(table, 300, 5, seed=3)
            layer.train()
            layer.act_quant.observing = False
            layer.weight.requires_grad_(not frozen)
            xg = x.clone().requires_grad_(True)
            calls.clear()
            with int8_gemm(int8):
                y = layer(xg)
                y.square().sum().backward()
            assert bool(calls) == (int8 and frozen)
            outs.append((y.detach(), xg.grad.clone()) + (() if frozen else (layer.weight.grad.clone(),)))
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def test_int8_path_switch_from_the_environment(monkeypatch):
    layer, x = make_layer(truncated(0), 64, 5, seed=5)
    calls = spy_int8(monkeypatch)
    monkeypatch.setenv("APPMULT_NO_INT8_GEMM", "1")
    with torch.no_grad():
        y_off = layer(x)
    assert not calls
    monkeypatch.delenv("APPMULT_NO_INT8_GEMM")
    with torch.no_grad():
        y_on = layer(x)
    assert calls and torch.equal(y_on, y_off)


@pytest.mark.parametrize("columns, signed, k", [(8, False, 100), (8, False, 700), (10, False, 300)])
def test_unfolded_lowrank_lut_takes_the_int8_path_exactly(columns, signed, k, monkeypatch):
    """A low-rank LUT whose factors cannot carry ``value(x)`` (no fold; 8 truncated
    columns and more): the weights are ``V[w]`` and the ``-Zw sum x`` cross term is added per call;
    the accumulator equals brute force, and where the plain float32 path is exact (every
    partial sum below ``2**24``) the layer's output equals it bit for bit."""
    n = 6
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(columns, signed, k, n)
    assert fold is None
    assert float(zx) > 0 and (zw != 0).any()  # both cross terms live
    prep = FU._int8_unfolded_prep(qw, zx, zw, layer.lut)
    assert prep is not False
    acc = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy(), signed)
    got = FU._int8_linear_acc(qx, prep, layer.lut)
    np.testing.assert_array_equal(got.double().numpy(), acc.astype(np.float32).astype(np.float64))
    y8, yf = both_paths(layer, x, monkeypatch)
    if np.abs(table).max() * k < 2 ** 24:
        assert torch.equal(y8, yf)
    else:  # the plain path's float32 LUT sum may round; the int8 one is exact
        scale = float(sx) * sw.double().numpy().reshape(1, -1)
        want = scale * acc + layer.bias.detach().double().numpy()
        np.testing.assert_allclose(y8.double().numpy(), want, rtol=0,
                                   atol=float(np.min(scale)) * 0.25 + 1e-6 * np.abs(want).max())


def test_unfolded_prep_declines_what_it_cannot_do_exactly():
    layer, x = make_layer(truncated(8), 40, 3, seed=9)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
    assert FU._int8_unfolded_prep(qw, zx, zw, layer.lut) is not False
    assert FU._int8_unfolded_prep(qw, zx + 0.5, zw, layer.lut) is False            # non-integer Zx
    assert FU._int8_unfolded_prep(qw, zx, zw + 0.25, layer.lut) is False           # non-integer Zw
    assert FU._int8_unfolded_prep(qw, zx.clone().requires_grad_(True), zw, layer.lut) is False
    assert FU._int8_unfolded_prep(qw, zx, zw.reshape(-1)[:2], layer.lut) is False  # zero points of 2 of 3


def test_torch_int_mm_is_exact_where_the_int8_path_uses_it():
    """The path relies on ``torch._int_mm`` returning exact int32 sums on the CPU for every
    reduction length from 2 (it returns wrong sums for length 1 in torch 2.13, so the path
    declines a single mapped input), including the largest magnitudes."""
    gen = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 2, 3), (5, 3, 1), (17, 7, 9), (128, 1024, 96), (3, FU.INT8_GEMM_MAX_K, 2)]:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        a[0], b[0] = -128, -128  # the largest |sum|: k * 2**14
        assert torch.equal(torch._int_mm(a, b.t()).long(), a.long() @ b.long().t()), (m, k, n)


def test_a_single_mapped_input_declines_the_int8_path():
    layer, x = make_layer(truncated(0), 1, 4, seed=11)  # K r = 1
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
        fold = FU._folded_lowrank_weights(qw.reshape(4, 1, 1, 1), zx, zw, layer.lut, split_k=True)
    assert FU._int8_linear_prep(fold, layer.lut) is False
    layer2, _ = make_layer(truncated(0), 2, 4, seed=11)
    with torch.no_grad():
        qw2, _, zw2 = layer2.weight_quant(layer2.weight)
        fold2 = FU._folded_lowrank_weights(qw2.reshape(4, 2, 1, 1), zx, zw2, layer2.lut, split_k=True)
    assert FU._int8_linear_prep(fold2, layer2.lut) is not False


@pytest.mark.parametrize("span, planes", [(255, 1), (256, 2), (60000, 2), (65535, 2), (65536, 3), (16_000_000, 3)])
def test_synthetic_folds_of_every_plane_count_are_exact(span, planes):
    """The prep and the GEMM on synthetic factors: per-output weight spans at the digit-plane
    boundaries (255|256, 65535|65536: ``P`` planes hold ``255 (1 + 256 + ...)``), activation
    factors spanning 256 values around an offset, a large bias; against int64 numpy."""
    import types

    rng = np.random.default_rng(span)
    n, k, r, m = 5, 700, 2, 9
    umin = int(rng.integers(-300, 300))
    u = torch.from_numpy(rng.integers(umin, umin + 256, (40, r)).astype(np.float64))
    u[0, 0], u[1, 1] = umin, umin + 255
    tabs = types.SimpleNamespace(u=u, u_is_value=False, lo_x=0)
    lo = rng.integers(-(1 << 20), 1 << 20, (n, 1))
    w = lo + rng.integers(0, span + 1, (n, k * r))
    w[:, 0], w[:, 1] = lo[:, 0], lo[:, 0] + span        # every row spans exactly `span`
    const = rng.integers(-(1 << 40), 1 << 40, n).astype(np.float64)
    # float32 weights as the fold makes them where they fit (their row sums do not: 2**30)
    wdt = np.float32 if np.abs(w).max() < 2 ** 24 else np.float64
    prep = FU._int8_linear_prep((torch.from_numpy(w.astype(wdt)), torch.from_numpy(const)), tabs)
    assert prep is not False and prep[-1] == planes
    qx = torch.from_numpy(rng.integers(0, 40, (m, k)).astype(np.float32))
    ux = u.numpy().astype(np.int64)[qx.numpy().astype(np.int64)].reshape(m, k * r)
    want = ux @ w.T + const.astype(np.int64)[None, :]
    got = FU._int8_linear_acc(qx, prep, tabs)
    np.testing.assert_array_equal(got.double().numpy(), want.astype(np.float32).astype(np.float64))


def _unfolded_layer(seed=13, k=48, n=5):
    layer, x = make_layer(truncated(8), k, n, seed=seed)
    return layer, x


def test_unfolded_int8_path_follows_both_switches(monkeypatch):
    """The no-fold int8 path is part of the fused low-rank path: off with it (module switch
    or ``APPMULT_NO_FUSED_LOWRANK``) and with ``APPMULT_NO_INT8_GEMM``; same output either way
    here (every partial sum below ``2**24``)."""
    layer, x = _unfolded_layer()
    calls = spy_int8(monkeypatch)
    with torch.no_grad():
        y_on = layer(x)
    assert calls
    for env in ("APPMULT_NO_FUSED_LOWRANK", "APPMULT_NO_INT8_GEMM"):
        calls.clear()
        monkeypatch.setenv(env, "1")
        with torch.no_grad():
            assert torch.equal(layer(x), y_on)
        assert not calls, env
        monkeypatch.delenv(env)
    calls.clear()
    monkeypatch.setattr(FN, "_FUSED_LOWRANK", False)
    with torch.no_grad():
        assert torch.equal(layer(x), y_on)
    assert not calls


def test_int8_weight_side_is_prepared_once_per_weight(monkeypatch):
    """The weight side (digit planes, constants) is cached with the layer's weight: two eval
    forwards prepare it once, for the folded and the unfolded path."""
    for table, name in ((truncated(0), "_int8_linear_prep"), (truncated(8), "_int8_unfolded_prep")):
        layer, x = make_layer(table, 48, 5, seed=21)
        count = []
        real = getattr(FU, name)
        monkeypatch.setattr(f"appmult.nn.functional.{name}", lambda *a, real=real: count.append(1) or real(*a))
        with torch.no_grad():
            y1 = layer(x)
            y2 = layer(x)
        assert torch.equal(y1, y2) and len(count) == 1, name


def test_unfolded_int8_path_trains_like_the_plain_path(monkeypatch):
    """With a frozen weight (cached weight side) the no-fold int8 path's output equals the
    plain path's and the input's gradient agrees (its backward carries the zero-point cross
    terms: both zero points live here)."""
    calls = spy_int8(monkeypatch)
    outs = []
    for int8 in (True, False):
        layer, x = _unfolded_layer(seed=17)
        layer.train()
        layer.act_quant.observing = False
        layer.weight.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        calls.clear()
        with int8_gemm(int8):
            y = layer(xg)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        assert bool(calls) == int8
        outs.append((y.detach(), xg.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    # the backward adds the cross terms' gradients in another order than the plain path
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_unfolded_prep_declines_cleanly_when_the_weights_need_too_many_planes(monkeypatch):
    layer, x = _unfolded_layer()
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", 1)  # truncated(8)'s V needs 2
    assert FU._int8_unfolded_prep(qw, zx, zw, layer.lut) is False


def test_float64_layer_on_both_paths():
    """A float64 layer (the float path maps ``qx`` itself for ``U = value(x)``) gives the same
    output with and without the int8 GEMM."""
    layer, x = make_layer(truncated(0), 64, 5, seed=23)
    layer.double()
    x = x.double()
    ys = []
    for int8 in (True, False):
        ys.append(forward(layer, x, int8))
    assert ys[0].dtype == torch.float64 and torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("signed, k", [(False, 100), (False, 600), (True, 300)])
def test_one_plane_prep_equals_the_general_prep(signed, k, monkeypatch):
    """The exact product's fold (one digit plane) prepared in float32 passes: the same
    tuple as the float64 digit arithmetic."""
    table, layer, x, ops, fold = quantized_case(0, signed, k, 7)
    quick = FU._int8_linear_prep(fold, layer.lut)
    monkeypatch.setattr(FU, "_int8_one_plane_prep", lambda *a: None)
    general = FU._int8_linear_prep(fold, layer.lut)
    assert quick[-1] == general[-1] == 1 and quick[3] == general[3]
    for a, b in zip(quick, general):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b


def trains_alike_through_the_int8_gemm(make, monkeypatch):
    """One training step of the layer ``make()`` returns (with its input), with the int8
    GEMM and without: the first takes it, and outputs and every gradient are equal."""
    calls = spy_int8(monkeypatch)
    outs = []
    for int8 in (True, False):
        layer, x = make()
        layer.train()
        layer.act_quant.observing = False
        xg = x.clone().requires_grad_(True)
        calls.clear()
        with int8_gemm(int8):
            y = layer(xg)
            y.square().sum().backward()
        assert bool(calls) == int8
        outs.append((y.detach(), xg.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_exact_product_trains_through_the_int8_gemm(monkeypatch):
    """A trainable weight over the exact product: the training step's forward runs the int8
    GEMM (its one-plane preparation is cheap), with the float path's outputs and gradients."""
    trains_alike_through_the_int8_gemm(lambda: make_layer(truncated(0), 300, 5, seed=8), monkeypatch)


@pytest.mark.parametrize("signed, k, scheme", [(False, 100, "per_channel"), (False, 700, "per_tensor"),
                                               (True, 300, "per_channel")])
def test_value_prep_equals_the_prep_of_the_fold(signed, k, scheme):
    """The exact product's int8 weights straight from the codes (a training step's path, no
    fold; one offset for every row of an 8-bit weight side instead of each row's minimum):
    the same accumulators as preparing the fold, equal to the brute-force sum, with the
    numba epilogue and with the torch one."""
    torch.manual_seed(k)
    table = truncated(0, signed)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    layer = ApproxLinear.from_float(nn.Linear(k, 6), ApproxConfig(lut, kernel="lowrank", weight_scheme=scheme))
    x = torch.randn(9, k) + 0.3
    layer(x)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
        fold = FU._folded_lowrank_weights(qw.reshape(6, k, 1, 1), zx, zw, layer.lut, split_k=True)
    direct = FU._int8_value_prep(qw, zx, zw, layer.lut)
    via_fold = FU._int8_linear_prep(fold, layer.lut)
    assert direct is not None and via_fold is not False
    assert direct[0].dtype == torch.int8 and direct[-1] == via_fold[-1] == 1  # one digit plane each
    want = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.reshape(-1).numpy(), signed).astype(np.float32)
    for numba_on in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not numba_on:
                mp.setenv("APPMULT_NO_NUMBA", "1")
            for prep in (direct, via_fold):
                np.testing.assert_array_equal(FU._int8_linear_acc(qx, prep, layer.lut).numpy(), want)


def test_value_prep_only_for_the_exact_product():
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(4, False, 64, 5)
    assert FU._int8_value_prep(qw, zx, zw, layer.lut) is None                      # rank 3
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(0, False, 64, 5)
    assert FU._int8_value_prep(qw, zx, zw, layer.lut) is not None
    assert FU._int8_value_prep(qw, zx + 0.5, zw, layer.lut) is None                # non-integer Zx
    assert FU._int8_value_prep(qw, zx, zw + 0.25, layer.lut) is None               # non-integer Zw
    assert FU._int8_value_prep(qw[:, :1], zx, zw, layer.lut) is None               # K r = 1
    assert FU._int8_value_prep(qw.double(), zx, zw, layer.lut) is None


def test_shifted_int8_rows_with_and_without_numba(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    off = torch.randint(-300, 300, (7,), generator=gen).float()
    q = off.reshape(7, 1) + torch.randint(-128, 128, (7, 33), generator=gen).float()
    q[0, 0], q[1, 1] = off[0] - 128, off[1] + 127          # both ends of int8
    want = (q.long() - off.long().reshape(7, 1)).to(torch.int8)
    assert torch.equal(FU._shifted_int8_rows(q, off), want)
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert torch.equal(FU._shifted_int8_rows(q, off), want)
