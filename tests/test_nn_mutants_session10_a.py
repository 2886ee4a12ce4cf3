"""Mutation review, session 10 (needed gradients): the LUT conv backward in float64 and with
per-channel weight zero points, and the autograd Functions passing on which sides are needed.

* ``autograd._conv_backward`` with the gradient in float64 (``exact=True``: the fused gather
  accumulator and ``lut_conv2d`` return float64) while the LUT-1D/STE tables and the codes are
  float32, and in float32 (the fused low-rank conv) while float64 operands bring float64 zero
  points; and a per-channel weight zero point of exactly two output channels. Reference: the
  gradients summed brute-force in float64 from the gradient tables themselves
  (``d/dqx = sum g (GX[x, w] - Zw)``, ``d/dqw = sum g (GW[x, w] - Zx)`` over the unfolded,
  zero-point-padded input).
* ``_linear_zp_backward`` and ``_zp_conv_backward`` (both branches) hand autograd's
  ``needs_input_grad`` on: the side no one asked for comes back ``None``, not computed
  (seen through ``autograd._cast``, which every backward return passes through).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.nn import autograd as AG
from appmult.nn import functional as FN
from appmult.nn.tables import LutTables
from test_nn_needed_gradients import NEEDS, grads, tables

ONE = torch.tensor(1.0)


def full_tables(tabs: LutTables) -> tuple[torch.Tensor, torch.Tensor]:
    """``(GX, GW)``: ``d/dqx`` and ``d/dqw`` of one product, float64, indexed ``[x, w]`` by value offsets."""
    if tabs.gx2 is not None:
        return tabs.gx2.double(), tabs.gw2.double()
    nx, nw = tabs.gw1.shape[0], tabs.gx1.shape[0]  # LUT-1D or STE: one value per operand
    return tabs.gx1.double()[None, :].expand(nx, nw), tabs.gw1.double()[:, None].expand(nx, nw)


def conv_reference(tabs: LutTables, qx, qw, zx: float, zw: torch.Tensor, g, padding=(0, 0)):
    """Float64 ``(d/dqx, d/dqw)`` of ``g . acc``, ``acc = sum LUT[x_p, w] - x_p Zw - Zx w`` over
    ``x`` padded with ``Zx`` (stride and dilation 1, one group), by brute-force sums."""
    gx2, gw2 = full_tables(tabs)
    (n, _, h, w), (co, _, kh, kw), (ph, pw) = qx.shape, qw.shape, padding
    xp = F.pad(qx.detach().double(), (pw, pw, ph, ph), value=zx)
    a = F.unfold(xp - tabs.lo_x, (kh, kw)).long()[:, None]                # (n, 1, CK, L)
    b = (qw.detach().double() - tabs.lo_w).reshape(1, co, -1, 1).long()   # (1, co, CK, 1)
    zwb = zw.double().reshape(1, co, 1, 1) if zw.numel() > 1 else zw.double().reshape(())
    gl = g.double().reshape(n, co, 1, -1)                                 # (n, co, 1, L)
    cols = (gl * (gx2[a, b] - zwb)).sum(1)
    gx = F.fold(cols, (h + 2 * ph, w + 2 * pw), (kh, kw))[:, :, ph:ph + h, pw:pw + w]
    gw = (gl * (gw2[a, b] - zx)).sum((0, 3)).reshape(qw.shape)
    return gx, gw


def operands(seed: int, dtype, co: int, per_channel: bool):
    rng = np.random.default_rng(seed)
    qx = torch.from_numpy(rng.integers(0, 256, (2, 3, 6, 5)).astype(np.float64)).to(dtype)
    qw = torch.from_numpy(rng.integers(0, 256, (co, 3, 3, 2)).astype(np.float64)).to(dtype)
    zw = torch.from_numpy(rng.integers(0, 256, (co, 1, 1, 1) if per_channel else ()).astype(np.float64))
    return qx.requires_grad_(), qw.requires_grad_(), zw.to(dtype)


def assert_grads(got, want):
    for gt, wt in zip(got, want):
        assert gt is not None and gt.shape == wt.shape
        torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-5 * float(wt.abs().max()))


def backward_with(y: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    y.backward(g)
    return g


CONV_CASES = [  # (table, grad, kernel, exact, operand dtype, output channels, per-channel Zw)
    # float64 gradient, float32 tables and codes: the fused gather accumulator (exact)
    ("truncated", "lut1d", "gather", True, torch.float32, 4, False),
    ("truncated", "lut1d", "gather", True, torch.float32, 3, True),
    ("random", "lut2d", "gather", True, torch.float32, 4, False),
    # float32 gradient (the fused low-rank conv), float64 operands and zero points
    ("truncated", "lut1d", "lowrank", False, torch.float64, 4, True),
    ("truncated", "lut2d", "lowrank", False, torch.float64, 3, True),
    ("truncated", "lut2d", "lowrank", False, torch.float64, 4, False),
    # a per-channel Zw of two elements (not a scalar)
    ("truncated", "lut1d", "lowrank", False, torch.float32, 2, True),
    ("random", "lut2d", "gather", False, torch.float32, 2, True),
    ("truncated", "lut2d", "lowrank", False, torch.float32, 2, True),
]


@pytest.mark.parametrize("table, grad, kernel, exact, dtype, co, per_channel", CONV_CASES)
@pytest.mark.parametrize("padding", [(0, 0), (1, 2)])
def test_zero_point_conv_gradients_against_the_tables(table, grad, kernel, exact, dtype, co, per_channel,
                                                      padding):
    tabs = tables(table, grad, kernel)
    qx, qw, zw = operands(co + 10 * padding[1], dtype, co, per_channel)
    zx = 19.0
    y = FN._approx_conv2d(qx, ONE.to(dtype), torch.tensor(zx, dtype=dtype), qw, ONE.to(dtype), zw, None, tabs,
                          padding=padding, exact=exact)
    g = backward_with(y, co)
    assert_grads((qx.grad, qw.grad), conv_reference(tabs, qx, qw, zx, zw, g, padding))


@pytest.mark.parametrize("table, grad, kernel", [("exact", "ste", "lowrank"), ("random", "ste", "gather"),
                                                 ("truncated", "lut1d", "gather")])
@pytest.mark.parametrize("exact, dtype", [(True, torch.float32), (False, torch.float64)])
def test_lut_conv2d_gradients_across_dtypes(table, grad, kernel, exact, dtype):
    """``lut_conv2d`` (no zero points): a float64 gradient with float32 codes (``exact``), or
    float64 codes with the float32 accumulator's gradient."""
    tabs = tables(table, grad, kernel)
    qx, qw, _ = operands(7, dtype, 4, False)
    y = FN.lut_conv2d(qx, qw, tabs, exact=exact)
    assert y.dtype == (torch.float64 if exact else torch.float32)
    g = backward_with(y, 8)
    assert_grads((qx.grad, qw.grad), conv_reference(tabs, qx, qw, 0.0, torch.tensor(0.0), g))


def linear_fn(tabs):
    zw = torch.arange(5, dtype=torch.float32).reshape(5, 1) * 7 + 3
    return lambda qx, qw: FN._approx_linear(qx, ONE, torch.tensor(29.0), qw, ONE, zw, None, tabs)


def conv_fn(tabs):
    zw = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1) * 11 + 5
    return lambda qx, qw: FN._approx_conv2d(qx, ONE, torch.tensor(17.0), qw, ONE, zw, None, tabs, padding=(1, 1))


SIDES = [  # (layer, table, grad, kernel): the zero-point Functions' backward paths
    ("linear", "exact", "ste", "lowrank"), ("linear", "truncated", "lut2d", "lowrank"),
    ("linear", "random", "lut2d", "gather"),
    ("conv", "exact", "ste", "lowrank"), ("conv", "random", "ste", "gather"),
    ("conv", "truncated", "lut1d", "gather"), ("conv", "random", "lut2d", "gather"),
]


@pytest.mark.parametrize("layer, table, grad, kernel", SIDES)
def test_the_zero_point_backward_computes_only_the_needed_side(layer, table, grad, kernel, monkeypatch):
    tabs = tables(table, grad, kernel)
    rng = np.random.default_rng(11)
    if layer == "linear":
        fn, shapes = linear_fn(tabs), ((6, 20), (5, 20))
    else:
        fn, shapes = conv_fn(tabs), ((2, 3, 6, 5), (4, 3, 3, 2))
    ops = [rng.integers(0, 256, s).astype(np.float32) for s in shapes]
    returned = []
    real = AG._cast
    monkeypatch.setattr(AG, "_cast", lambda g, dt: returned.append(g is not None) or real(g, dt))
    for need in NEEDS:
        returned.clear()
        got = grads(fn, ops, need)
        assert [g is not None for g in got] == list(need)
        assert returned == list(need)  # (gx, gw) as the backward returned them
