"""LUT backward rules (STE, LUT-1D, LUT-2D) against brute-force float64 loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import (ApproxConfig, ApproxConv2d, ApproxLinear, Kernel, LutTables, lut_conv2d,
                        lut_linear)
from test_nn_luts import codes, exact, mitchell_like, random_lut, truncated, values


def lut_with_grads(p, w, signed, low_rank_grads: bool, seed=0) -> LutFile:
    """A LUT holding arbitrary gradient tables: random (gather backward) or rank 3 (low-rank)."""
    rng = np.random.default_rng(seed)
    n = 1 << w
    if low_rank_grads:
        ga = rng.normal(size=(n, 3)) @ rng.normal(size=(3, n))
        gb = rng.normal(size=(n, 2)) @ rng.normal(size=(2, n))
    else:
        ga, gb = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    return LutFile(p, width_a=w, width_b=w, signed=signed,
                   gradients={"lut2d": (ga, gb), "lut1d": (rng.normal(size=n), rng.normal(size=n))})


def grad_fns(lut: LutFile, mode: str):
    """(d f/d a, d f/d b) as functions of code arrays, straight from the file's tables."""
    w, s = lut.width_a, lut.signed
    if mode == "ste":
        v = values(w, s).astype(np.float64)
        return (lambda a, b: v[b]), (lambda a, b: v[a])
    ga, gb = (t.astype(np.float64) for t in lut.gradient(mode))
    if mode == "lut1d":
        return (lambda a, b: ga[b]), (lambda a, b: gb[a])
    return (lambda a, b: ga[a, b]), (lambda a, b: gb[a, b])


def brute_linear_grads(lut, mode, qx, qw, g):
    da, db = grad_fns(lut, mode)
    w = lut.width_a
    cx, cw = codes(qx, w), codes(qw, w)
    m, k = qx.shape
    n = qw.shape[0]
    gx = np.zeros((m, k))
    gw = np.zeros((n, k))
    for i in range(m):
        for j in range(n):
            gx[i] += g[i, j] * da(cx[i], cw[j])
            gw[j] += g[i, j] * db(cx[i], cw[j])
    return gx, gw


def brute_conv_grads(lut, mode, qx, qw, g, stride, dilation, groups):
    """qx already padded; loops over every product of every output."""
    da, db = grad_fns(lut, mode)
    w = lut.width_a
    n, c, h, wd = qx.shape
    co, cg, kh, kw = qw.shape
    ho, wo = g.shape[2:]
    gx = np.zeros(qx.shape)
    gw = np.zeros(qw.shape)
    ng = co // groups
    for b in range(n):
        for j in range(co):
            gi = j // ng
            for oh in range(ho):
                for ow in range(wo):
                    rows = oh * stride + np.arange(kh) * dilation
                    cols = ow * stride + np.arange(kw) * dilation
                    patch = qx[b, gi * cg:(gi + 1) * cg][:, rows][:, :, cols]
                    ca, cb = codes(patch, w), codes(qw[j], w)
                    gx[b, gi * cg:(gi + 1) * cg][:, rows[:, None], cols[None, :]] += g[b, j, oh, ow] * da(ca, cb)
                    gw[j] += g[b, j, oh, ow] * db(ca, cb)
    return gx, gw


CASES = [  # (table, width, signed, low-rank gradient tables)
    (truncated(6, 3), 6, False, True),
    (mitchell_like(6, True), 6, True, False),
    (random_lut(4, 3), 4, True, True),
    (exact(4, False), 4, False, False),
]


def _rand_q(shape, w, signed, rng):
    lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if signed else (0, (1 << w) - 1)
    return rng.integers(lo, hi + 1, shape)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["ste", "lut1d", "lut2d"])
@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_linear_backward_matches_brute_force(case, mode, kernel):
    p, w, s, lowg = CASES[case]
    lut = lut_with_grads(p, w, s, lowg, seed=case)
    if kernel == "lowrank" and LutTables(lut).rank is None:
        with pytest.raises(ValueError, match=r"has no exact integer factorization of rank <= 32"):
            LutTables(lut, grad=mode, kernel=kernel)
        return
    tabs = LutTables(lut, grad=mode, kernel=kernel)
    if mode == "lut2d" and w == 6:  # 4-bit tables (16x16) always factor below rank 32
        assert tabs.grad_kernel is (Kernel.LOWRANK if lowg else Kernel.GATHER)
    rng = np.random.default_rng(case)
    qx = torch.tensor(_rand_q((5, 11), w, s, rng), dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(_rand_q((4, 11), w, s, rng), dtype=torch.float64, requires_grad=True)
    g = torch.from_numpy(rng.normal(size=(5, 4)))
    acc = lut_linear(qx, qw, tabs, exact=True)
    gx, gw = torch.autograd.grad(acc, (qx, qw), g)
    rx, rw = brute_linear_grads(lut, mode, qx.detach().long().numpy(), qw.detach().long().numpy(), g.numpy())
    np.testing.assert_allclose(gx.numpy(), rx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), rw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["ste", "lut1d", "lut2d"])
@pytest.mark.parametrize("geom", [(1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_conv_backward_matches_brute_force(case, mode, geom):
    stride, dilation, groups = geom
    p, w, s, lowg = CASES[case]
    lut = lut_with_grads(p, w, s, lowg, seed=case)
    tabs = LutTables(lut, grad=mode)
    rng = np.random.default_rng(10 + case)
    qx = torch.tensor(_rand_q((2, 4, 7, 7), w, s, rng), dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(_rand_q((4, 4 // groups, 3, 3), w, s, rng), dtype=torch.float64, requires_grad=True)
    acc = lut_conv2d(qx, qw, tabs, stride=stride, dilation=dilation, groups=groups, exact=True)
    g = torch.from_numpy(rng.normal(size=acc.shape))
    gx, gw = torch.autograd.grad(acc, (qx, qw), g)
    rx, rw = brute_conv_grads(lut, mode, qx.detach().long().numpy(), qw.detach().long().numpy(), g.numpy(),
                              stride, dilation, groups)
    np.testing.assert_allclose(gx.numpy(), rx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), rw, rtol=1e-5, atol=1e-4)


def _fake_quant_reference(layer, x):
    """A plain fake-quantized layer: dequantize with the same quantizers, exact float op."""
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    xd, wd = (qx - zx) * sx, (qw - zw) * sw
    if isinstance(layer, torch.nn.Conv2d):
        return torch.nn.functional.conv2d(xd, wd, layer.bias, layer.stride, layer.padding, layer.dilation,
                                          layer.groups)
    return torch.nn.functional.linear(xd, wd, layer.bias)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_ste_with_exact_lut_equals_fake_quant_layer(signed, kind, kernel):
    """Exact multiplier + STE == a fake-quantized float layer, outputs and gradients."""
    lut = LutFile(exact(6, signed), width_a=6, width_b=6, signed=signed)
    cfg = ApproxConfig(lut, grad="ste", kernel=kernel, exact_accumulate=True)
    torch.manual_seed(0)
    if kind == "conv":
        layer = ApproxConv2d(4, 6, 3, padding=1, stride=2, groups=2, config=cfg).double().eval()
        x = (torch.rand(2, 4, 7, 7, dtype=torch.float64) * 2 - 0.4)
    else:
        layer = ApproxLinear(10, 3, config=cfg).double().eval()
        x = torch.rand(4, 10, dtype=torch.float64) * 2 - 0.4
    x.requires_grad_(True)
    layer(x.detach())  # initialize the observer
    y = layer(x)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), gy)
    x2 = x.detach().requires_grad_(True)
    y2 = _fake_quant_reference(layer, x2)
    gx2, gw2 = torch.autograd.grad(y2, (x2, layer.weight), gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)


def test_training_step_changes_weights_and_bias():
    lut = lut_with_grads(mitchell_like(6, False), 6, False, False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(ApproxConv2d(3, 4, 3, padding=1, config=ApproxConfig(lut, grad="lut2d")),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                ApproxLinear(4 * 25, 2, config=ApproxConfig(lut, grad="lut1d")))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 3, 5, 5)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,)))
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lut2d_kernels_agree():
    """Low-rank and gather LUT-2D backward give the same gradients for low-rank tables."""
    lut = lut_with_grads(truncated(6, 3), 6, False, True)
    rng = np.random.default_rng(0)
    qx = torch.tensor(_rand_q((2, 3, 6, 6), 6, False, rng), dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(_rand_q((4, 3, 3, 3), 6, False, rng), dtype=torch.float32, requires_grad=True)
    outs = []
    for force_gather in (False, True):
        tabs = LutTables(lut, grad="lut2d")
        if force_gather:
            tabs.grad_kernel = Kernel.GATHER
        acc = lut_conv2d(qx, qw, tabs)
        outs.append(torch.autograd.grad(acc, (qx, qw), torch.ones_like(acc)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
