"""The columns + GEMM convolution CUDA runs for exact sums (:mod:`appmult.nn.exact_conv`),
checked on the CPU against ``F.conv2d`` (whose CPU sums of integer-valued operands are
exact) and a numpy brute force; its dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.nn import exact_conv as EC

# (N, C, H, W, Co, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 4, 7, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 9, 8, 4, (2, 3), (2, 1), (1, 2), (2, 1), 2),
    (1, 3, 5, 5, 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),   # depthwise 1x1
    (2, 8, 10, 10, 8, (3, 3), (2, 2), (2, 2), (2, 2), 8),  # depthwise, strided, dilated
    (2, 2, 4, 4, 5, (4, 4), (1, 1), (0, 0), (1, 1), 1),   # one output position
]


def _operands(geom, dtype, seed=0):
    n, c, h, w, co, k, _, _, _, g = geom
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=gen).to(dtype)
    wt = torch.randint(-128, 128, (co, c // g, *k), generator=gen).to(dtype)
    b = torch.randint(-1000, 1000, (co,), generator=gen).to(dtype)
    return x, wt, b


def _brute(x, w, b, stride, padding, dilation, groups):
    x, w = x.numpy().astype(np.int64), w.numpy().astype(np.int64)
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, co, ho, wo), np.int64)
    ng = co // groups
    for j in range(co):
        g = j // ng
        for i in range(ho):
            for jj in range(wo):
                patch = xp[:, g * cg:(g + 1) * cg, i * sh:i * sh + dh * (kh - 1) + 1:dh, jj * sw:jj * sw + dw * (kw - 1) + 1:dw]
                out[:, j, i, jj] = (patch * w[j]).sum((1, 2, 3))
    return out + (0 if b is None else b.numpy().astype(np.int64).reshape(1, co, 1, 1))


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_columns_conv_equals_brute_force_and_torch(geom, dtype, with_bias):
    x, w, b = _operands(geom, dtype)
    b = b if with_bias else None
    s, p, d, g = geom[6:]
    out = EC.columns_conv2d(x, w, b, s, p, d, g)
    assert out.dtype == dtype
    assert np.array_equal(out.numpy().astype(np.int64), _brute(x, w, b, s, p, d, g))
    assert torch.equal(out, F.conv2d(x, w, b, s, p, d, g))


@pytest.mark.parametrize("geom", GEOMETRIES[:2])
def test_columns_conv_in_chunks_of_the_batch(monkeypatch, geom):
    x, w, b = _operands(geom, torch.float32, seed=1)
    s, p, d, g = geom[6:]
    want = EC.columns_conv2d(x, w, b, s, p, d, g)
    monkeypatch.setattr(EC, "COLS_BYTES", 1)  # one batch item per chunk
    assert torch.equal(EC.columns_conv2d(x, w, b, s, p, d, g), want)


def test_columns_conv_scalar_arguments_and_a_non_contiguous_input():
    x, w, b = _operands(GEOMETRIES[0], torch.float32, seed=2)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    assert torch.equal(EC.columns_conv2d(xt, w, b, 1, 1, 1, 1), F.conv2d(x, w, b, 1, 1, 1, 1))
    assert torch.equal(EC.columns_conv2d(x[:, :, 1:, :], w, None, 2, 0, 1, 1), F.conv2d(x[:, :, 1:, :], w, None, 2))


def test_columns_conv_gradients_equal_torch():
    x, w, b = _operands(GEOMETRIES[1], torch.float64, seed=3)
    s, p, d, g = GEOMETRIES[1][6:]
    grads = []
    for fn in (EC.columns_conv2d, F.conv2d):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        r = torch.randn((3, 4, 5, 10), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        y = fn(xs, ws, bs, s, p, d, g)
        assert y.shape == r.shape
        (y * r).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-9)


def test_what_it_does_not_take_goes_to_torch():
    x, w, b = _operands(GEOMETRIES[0], torch.float32)
    assert torch.equal(EC.columns_conv2d(x[0], w, b, 1, 1), F.conv2d(x[0], w, b, 1, 1))  # unbatched
    assert torch.equal(EC.columns_conv2d(x, w, b, 1, "same"), F.conv2d(x, w, b, 1, "same"))
    assert EC.columns_conv2d(x[:0], w, b, 1, 1).shape == (0, 6, 7, 6)
    with pytest.raises(RuntimeError, match="expected input"):
        EC.columns_conv2d(x[:, :3], w, b, 1, 1)  # torch's own error for a channel mismatch
    with pytest.raises(RuntimeError):
        EC.columns_conv2d(x[:, :, :1, :1], w, b)  # kernel larger than the input: torch's error


def test_conv2d_takes_torch_on_the_cpu(monkeypatch):
    x, w, b = _operands(GEOMETRIES[0], torch.float32)
    monkeypatch.setattr(EC, "columns_conv2d", lambda *a, **k: pytest.fail("columns form on the CPU"))
    assert torch.equal(EC.conv2d(x, w, b, 1, 1), F.conv2d(x, w, b, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("geom", GEOMETRIES)
def test_conv2d_on_cuda_is_exact_and_uses_columns(monkeypatch, geom):
    x, w, b = _operands(geom, torch.float32, seed=5)
    x = x * 64  # sums near 2**24: a rounding algorithm would show
    s, p, d, g = geom[6:]
    calls = []
    orig = EC.columns_conv2d
    monkeypatch.setattr(EC, "columns_conv2d", lambda *a: calls.append(1) or orig(*a))
    out = EC.conv2d(x.cuda(), w.cuda(), b.cuda(), s, p, d, g).cpu()
    assert calls and np.array_equal(out.numpy().astype(np.int64), _brute(x, w, b, s, p, d, g))
