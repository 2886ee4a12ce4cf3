"""The STE backward of the fused conv accumulators without a padded copy (issue 12, rank-1 fwd+bwd).

``autograd._ste_conv_backward`` computes ``d/dqx`` and ``d/dqw`` of ``sum (qx_p - Zx)(qw - Zw)``
over the zero-point-padded input by one ``convolution_backward`` call on the unpadded
operands, the shift making the padding 0. Reference: torch autograd through a float64
convolution of the explicitly padded input with the cross terms written out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.lut_gen import LutFile
from appmult.nn import autograd as AG
from appmult.nn import functional as FN
from appmult.nn.tables import LutTables
from test_nn_luts import exact, random_lut

GEOMS = [  # (padding, stride, dilation, groups)
    ((1, 1), (1, 1), (1, 1), 1), ((1, 2), (2, 1), (1, 1), 1), ((0, 0), (1, 1), (2, 2), 1),
    ((2, 1), (2, 2), (1, 2), 2), ((0, 1), (1, 1), (1, 1), 3),
]


def reference(cx, cw, zx, zw, geom):
    """Float64 autograd of the accumulator ``sum (x_p - Zx)(w - Zw)`` with ``x_p`` padded by ``Zx``."""
    padding, stride, dilation, groups = geom
    rx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    ph, pw = padding
    xp = F.pad(rx, (pw, pw, ph, ph), value=zx)
    zwt = torch.as_tensor(zw, dtype=torch.float64).reshape(-1, 1, 1, 1)
    acc = F.conv2d(xp - zx, rw - zwt, None, stride, 0, dilation, groups)
    return rx, rw, acc


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("zx", [0.0, 37.0])
@pytest.mark.parametrize("table, kernel", [("exact", "lowrank"), ("exact", "gather"), ("random", "gather")])
def test_unsigned_fused_conv_ste_gradients(geom, zx, table, kernel, monkeypatch):
    padding, stride, dilation, groups = geom
    rng = np.random.default_rng(hash((geom, zx, table)) % 2**32)
    cin, cout = 3 * groups, 2 * groups
    cx = rng.integers(0, 256, (2, cin, 7, 6)).astype(np.float32)
    cw = rng.integers(0, 256, (cout, cin // groups, 3, 2)).astype(np.float32)
    zw = rng.integers(0, 256, cout).astype(np.float32)  # per output channel
    lut = exact(8, False) if table == "exact" else random_lut(8, 3)
    tabs = LutTables(LutFile(lut, width_a=8, width_b=8, signed=False), kernel=kernel, grad="ste")
    calls, fused = [], []
    real, real_fused = AG._ste_conv_backward, FN._with_conv_backward
    monkeypatch.setattr(AG, "_ste_conv_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(FN, "_with_conv_backward", lambda *a, **k: fused.append(1) or real_fused(*a, **k))
    qx = torch.tensor(cx, requires_grad=True)
    qw = torch.tensor(cw, requires_grad=True)
    one = torch.tensor(1.0)
    y = FN._approx_conv2d(qx, one, torch.tensor(zx), qw, one, torch.tensor(zw).reshape(-1, 1, 1, 1), None, tabs,
                          stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert fused or kernel == "gather"  # (the fused gather declines some geometries: plain path)
    rx, rw, acc = reference(cx, cw, zx, zw, geom)
    if table == "exact":  # the accumulator itself is the exact product's
        np.testing.assert_array_equal(y.detach().numpy(), acc.detach().numpy().astype(np.float32))
    g = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
    y.backward(g.float())
    acc.backward(g)
    assert calls == fused
    assert qx.grad.shape == qx.shape and qw.grad.shape == qw.shape
    scale = float(np.abs(cw).max() + 256) * g.abs().sum().item() / g.numel()
    np.testing.assert_allclose(qx.grad.numpy(), rx.grad.numpy(), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(qw.grad.numpy(), rw.grad.numpy(), rtol=1e-5, atol=1e-3 * scale)


@pytest.mark.parametrize("zx, takes_it", [(0.0, True), (3.0, False)])
def test_signed_lut_takes_it_only_when_the_padding_is_zero(zx, takes_it, monkeypatch):
    """A signed LUT has no cross terms: the padded value ``Zx`` stays as it is, so only
    ``Zx = 0`` may let the convolution pad with zeros (the other case keeps the padded copy;
    both equal the reference)."""
    rng = np.random.default_rng(7)
    cx = rng.integers(-8, 8, (2, 3, 5, 6)).astype(np.float32)
    cw = rng.integers(-8, 8, (4, 3, 3, 3)).astype(np.float32)
    v = np.arange(-8, 8)
    tabs = LutTables(LutFile(np.outer(v, v), width_a=4, width_b=4, signed=True), kernel="lowrank", grad="ste")
    calls = []
    real = AG._ste_conv_backward
    monkeypatch.setattr(AG, "_ste_conv_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    qx = torch.tensor(cx, requires_grad=True)
    qw = torch.tensor(cw, requires_grad=True)
    one = torch.tensor(1.0)
    y = FN._approx_conv2d(qx, one, torch.tensor(zx), qw, one, torch.tensor(0.0), None, tabs, padding=1)
    rx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(F.pad(rx, (1, 1, 1, 1), value=zx), rw)
    g = torch.from_numpy(rng.standard_normal(tuple(ref.shape)))
    y.backward(g.float())
    ref.backward(g)
    assert calls == ([1] if takes_it else [])
    np.testing.assert_allclose(qx.grad.numpy(), rx.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(qw.grad.numpy(), rw.grad.numpy(), rtol=1e-5, atol=1e-4)
