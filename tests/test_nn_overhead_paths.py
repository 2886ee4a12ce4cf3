"""Brute-force checks of the overhead-reduction paths outside the kernels.

Fused no-grad quantizer against the reference formula, the rank-1 shifted convolution
(zero-padded conv of ``qx - Zx``), the cheap finite check and the in-place dequantization.
No timing asserts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import functional as FN
from appmult.nn import quant as Q
from test_nn_kernels_perf_paths import FUSED_GEOMS, _brute_conv_general, _conv_int
from test_nn_luts import exact


def _reference_quant(x, s, z, qmin, qmax):
    return torch.clamp(torch.round(x / s + z), qmin, qmax)


@pytest.mark.parametrize("width, signed", [(8, True), (8, False), (4, True), (6, False), (3, True)])
def test_fused_quantizer_matches_formula(width, signed):
    qmin, qmax = Q.quant_range(width, signed)
    rng = np.random.default_rng(width)
    for trial in range(20):
        lo, hi = sorted(rng.normal(size=2) * rng.choice([1e-3, 1.0, 50.0]))
        if signed and trial % 3 == 0:
            lo, hi = -abs(lo), abs(lo)  # symmetric range: -max|x| must give the most negative code
        x = torch.from_numpy(rng.uniform(lo * 1.3, hi * 1.3, 4000).astype(np.float32))
        x = torch.cat([x, torch.tensor([lo, hi, 0.0, -0.0], dtype=torch.float32)])
        s, z = Q._scale_zero_point(torch.tensor(lo), torch.tensor(hi), width, signed)
        # values that land exactly on .5 ties and on the range ends
        ties = (torch.arange(qmin - 2, qmax + 3, dtype=torch.float32) + 0.5 - z) * s
        x = torch.cat([x, ties, (torch.arange(qmin, qmax + 1, dtype=torch.float32) - z) * s])
        ref = _reference_quant(x, s, z, qmin, qmax)
        got = Q._fake_quant_nograd(x, s, z, qmin, qmax)
        assert torch.equal(got, ref) and got.dtype == ref.dtype
        assert torch.equal(torch.signbit(got), torch.signbit(ref))
        if signed and trial % 3 == 0:
            assert float(got.min()) == qmin  # the most negative code is reached
        with torch.no_grad():
            xg = x.clone().requires_grad_(True)
            assert torch.equal(Q._fake_quant(xg, s, z, qmin, qmax), ref)
        # with a gradient: the STE function, same values, clipped STE gradient
        xg = x.clone().requires_grad_(True)
        q = Q._fake_quant(xg, s, z, qmin, qmax)
        assert q.requires_grad and torch.equal(q.detach(), ref)
        q.sum().backward()
        t = x / s + z
        inside = (t >= qmin - 0.5) & (t <= qmax + 0.5)
        assert torch.equal(xg.grad, torch.ones_like(x) * inside / s)


def test_fused_quantizer_in_layers_matches_formula():
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    layer = ApproxLinear(7, 3, config=ApproxConfig(lut))
    x = torch.randn(5, 7)
    layer.eval()
    layer(x)
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
    assert float(zx) != 0.0
    assert torch.equal(qx, _reference_quant(x, sx, zx, 0, 255))
    assert torch.equal(qw, _reference_quant(layer.weight.detach(), sw, zw, 0, 255))


def _rank1_layer(signed, geom, seed):
    g = FUSED_GEOMS[geom]
    lut = LutFile(exact(8, signed), width_a=8, width_b=8, signed=signed)
    torch.manual_seed(seed)
    base = torch.nn.Conv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
                           dilation=g["dilation"], groups=g["groups"])
    return ApproxConv2d.from_float(base, ApproxConfig(lut, kernel="lowrank")), g


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("geom", range(len(FUSED_GEOMS)))
@pytest.mark.parametrize("offset", [0.0, -0.5, -0.2])
def test_rank1_shifted_conv_is_bit_exact(signed, geom, offset):
    """The zero-padded conv of ``qx - Zx`` == brute-force accumulator with padding ``Zx``.

    (The signed exact product factors as ``U = -value(x)``; the tables negate both factors.)
    """
    layer, g = _rank1_layer(signed, geom, geom)
    layer.eval()
    assert layer.lut.u_is_value
    x = torch.rand(3, g["cin"], g["size"], g["size"]) * 2 + offset
    if offset == 0.0:
        x = torch.relu(x - 0.5)  # min 0 -> Zx = 0 (qx used as is)
    layer(x)
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    if not signed:
        assert (float(zx) == 0.0) == (offset == 0.0)
    else:
        assert float(zx) == 0.0  # symmetric
    st, pd, dl = (FN._pair(g[k]) for k in ("stride", "padding", "dilation"))
    wv, const = FN._folded_lowrank_weights(qw, zx, zw, layer.lut)
    assert FN._rank1_shifted_conv(qx, zx, wv, const, layer.lut, pd, st, dl, g["groups"]) is not None
    with torch.no_grad():
        y = layer(x)
    # (x - Zx)(w - Zw) is the whole accumulator of the exact product with cross terms
    qxn, qwn = qx.detach().numpy().astype(np.int64), qw.detach().numpy().astype(np.int64)
    xp = np.pad(qxn, ((0, 0), (0, 0), (pd[0], pd[0]), (pd[1], pd[1])), constant_values=int(zx))
    zwn = zw.detach().numpy().astype(np.int64).reshape(-1, 1, 1, 1) if not signed else 0
    acc = _conv_int(xp - (0 if signed else int(zx)), qwn - zwn, st, dl, g["groups"])
    p = exact(8, signed)
    lo = -128 if signed else 0
    acc_lut = _brute_conv_general(p, 8, xp, qwn, st, dl, g["groups"])
    if signed:  # no cross terms for signed LUTs
        assert np.array_equal(acc, acc_lut)
    co = qw.shape[0]
    swr = sw.reshape(1, co, 1, 1) if sw.dim() else sw
    ref = (sx * swr).to(torch.float32) * torch.from_numpy(acc).to(torch.float32) + layer.bias.detach().reshape(1, co, 1, 1)
    assert torch.equal(y, ref), lo
    # the same values as the padded-copy path it replaces
    import unittest.mock as um
    with um.patch.object(FN, "_rank1_shifted_conv", lambda *a, **k: None), torch.no_grad():
        assert torch.equal(layer(x), y)


def test_rank1_shifted_conv_refuses_inexact_sums():
    layer, g = _rank1_layer(False, 0, 0)
    layer.eval()
    x = torch.rand(2, g["cin"], g["size"], g["size"]) - 0.5
    layer(x)
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    wv, const = FN._folded_lowrank_weights(qw, zx, zw, layer.lut)
    big = wv * float(1 << 20)
    assert FN._rank1_shifted_conv(qx, zx, big, const, layer.lut, (1, 1), (1, 1), (1, 1), 1) is None


def test_finite_check_cheap_path():
    Q.check_finite(torch.full((1000,), 3e38), "X")  # the sum overflows, min/max are finite: accepted
    Q.check_finite(torch.empty(0), "X")
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.rand(4, 5)
        x[2, 3] = bad
        with pytest.raises(ValueError, match="X input contains NaN or Inf"):
            Q.check_finite(x, "X")
    x = torch.full((10,), 3e38)
    x[0] = float("-inf")
    with pytest.raises(ValueError, match="X input contains NaN or Inf"):
        Q.check_finite(x, "X")


def test_dequantize_in_place_matches_out_of_place():
    torch.manual_seed(0)
    acc = torch.randint(-1000, 1000, (4, 3, 5, 5)).float()
    scale = torch.rand(1, 3, 1, 1)
    bias = torch.randn(1, 3, 1, 1)
    ref = scale * acc + bias
    got = FN._dequantize(acc.clone(), scale, bias, torch.float32)
    assert torch.equal(got, ref)
    # broadcasting that would change the shape is not done in place
    small = torch.randint(-5, 5, (1, 3, 1, 1)).float()
    big_scale = torch.rand(4, 3, 5, 5)
    assert torch.equal(FN._dequantize(small.clone(), big_scale, None, torch.float32), big_scale * small)
    # an accumulator with a gradient: out of place, gradients as before
    a = acc.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    y = FN._dequantize(a, scale, b, torch.float32)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert torch.equal(a.grad, scale.expand_as(acc)) and torch.equal(b.grad, torch.full_like(bias, 100.0))


# ------------------------------------------------------------------------------------------
# Weight-side cache (no-grad forwards)
# ------------------------------------------------------------------------------------------

from test_nn_luts import random_lut, truncated  # noqa: E402

CACHE_LUTS = {"exact8u": (exact(8, False), 8, False), "trunc8u": (truncated(8, 4), 8, False),
              "trunc6s": (truncated(6, 3, signed=True), 6, True), "random6u": (random_lut(6, 2), 6, False)}


def _fresh_output(layer, x):
    """The output without any cache: computed with a gradient flowing to the weight."""
    with torch.enable_grad():
        return layer(x).detach()


def _cache_layers(name):
    p, w, s = CACHE_LUTS[name]
    cfg = ApproxConfig(LutFile(p, width_a=w, width_b=w, signed=s))
    torch.manual_seed(1)
    conv = ApproxConv2d.from_float(torch.nn.Conv2d(4, 6, 3, padding=1), cfg)
    lin = ApproxLinear.from_float(torch.nn.Linear(12, 5), cfg)
    return [(conv, torch.rand(2, 4, 7, 7) - 0.3), (lin, torch.rand(6, 12) - 0.3)]


@pytest.mark.parametrize("name", list(CACHE_LUTS))
def test_weight_cache_sees_every_weight_update(name):
    for layer, x in _cache_layers(name):
        layer.eval()
        layer(x)
        with torch.no_grad():
            y0 = layer(x)
            assert layer._weight_cache() is not None  # cached
            assert torch.equal(layer(x), y0)  # a cache hit gives the same output
        assert torch.equal(_fresh_output(layer, x), y0)
        updates = [
            lambda w: w.add_(0.05),                                     # in place (version bump)
            lambda w: w.data.copy_(torch.randn_like(w) * 0.2),          # through .data (no bump)
            lambda w: w.data.mul_(-1.0),
            lambda w: setattr(layer.weight, "data", torch.randn_like(w)),  # new storage
        ]
        for upd in updates:
            with torch.no_grad():
                before = layer(x)
                upd(layer.weight)
                after = layer(x)
            ref = _fresh_output(layer, x)
            assert torch.equal(after, ref)
            assert not torch.equal(after, before)
        # load_state_dict and an optimizer step
        sd = layer.state_dict()
        sd["weight"] = sd["weight"].clone() * 0.5
        layer.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(layer(x), _fresh_output(layer, x))
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer.train()
        layer(x).square().sum().backward()
        opt.step()
        layer.eval()
        with torch.no_grad():
            assert torch.equal(layer(x), _fresh_output(layer, x))


def test_weight_cache_follows_zero_point_mode_and_scheme():
    layer, x = _cache_layers("trunc8u")[0]
    layer.eval()
    layer(x)
    with torch.no_grad():
        y0 = layer(x)
        # the activation zero point changes (observer update in training mode): new folded tables
        zx0 = float(layer.act_quant.scale_zero_point()[1])
        layer.train()
        layer(x * 3 - 1)
        layer.eval()
        assert float(layer.act_quant.scale_zero_point()[1]) != zx0
        assert torch.equal(layer(x * 3 - 1), _fresh_output(layer, x * 3 - 1))
        layer.exact_multiplication = True
        ye = layer(x)
        assert torch.equal(ye, _fresh_output(layer, x))
        layer.exact_multiplication = False
        layer.weight_quant.scheme = Q.WeightScheme.PER_TENSOR
        yt = layer(x)
        assert torch.equal(yt, _fresh_output(layer, x))
        assert not torch.equal(yt, y0)


def test_weight_cache_not_used_with_weight_gradients():
    layer, x = _cache_layers("trunc8u")[0]
    layer.train()
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer._weight_cache() is None
    # a frozen weight may use the cache even with gradients enabled (input gradients only)
    layer.weight.requires_grad_(False)
    layer.eval()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert layer._weight_cache() is not None and xg.grad is not None


def test_rank1_linear_uses_qx_directly_and_is_bit_exact():
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    torch.manual_seed(3)
    layer = ApproxLinear.from_float(torch.nn.Linear(37, 9), ApproxConfig(lut, kernel="lowrank"))
    assert layer.lut.u_is_value
    x = torch.rand(11, 37) * 2 - 0.6
    layer.eval()
    layer(x)
    with torch.no_grad():
        y = layer(x)
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    assert float(zx) != 0.0
    acc = (qx.detach().numpy().astype(np.int64) - int(zx)) @ (qw.detach().numpy().astype(np.int64)
                                                              - zw.detach().numpy().astype(np.int64)).T
    ref = (sx * sw.reshape(1, -1)) * torch.from_numpy(acc).to(torch.float32) + layer.bias.detach()
    assert torch.equal(y, ref)
    # with gradients (STE backward unchanged)
    layer.train()
    layer.act_quant.observing = False
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    assert xg.grad is not None and layer.weight.grad is not None
