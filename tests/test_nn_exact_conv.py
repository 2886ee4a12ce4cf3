"""The columns + GEMM convolution CUDA runs for exact sums (:mod:`appmult.nn.exact_conv`),
checked on the CPU against ``F.conv2d`` (whose CPU sums of integer-valued operands are
exact) and a numpy brute force; its dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.nn import exact_conv as EC
from test_nn_kernels_perf_paths import _conv_int

# (N, C, H, W, Co, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 4, 7, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 9, 8, 4, (2, 3), (2, 1), (1, 2), (2, 1), 2),
    (1, 3, 5, 5, 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),   # depthwise 1x1
    (2, 8, 10, 10, 8, (3, 3), (2, 2), (2, 2), (2, 2), 8),  # depthwise, strided, dilated
    (2, 2, 4, 4, 5, (4, 4), (1, 1), (0, 0), (1, 1), 1),   # one output position
    (2, 4, 5, 6, 2, (3, 2), (1, 3), (0, 2), (1, 2), 2),   # width padding only; every argument distinct
]


@pytest.fixture
def columns_only(monkeypatch):
    """``F.conv2d`` unavailable to :mod:`appmult.nn.exact_conv`: the columns form must compute
    the result itself (a fallback to torch would pass every comparison with torch)."""
    class NoConv:
        def __getattr__(self, name):
            if name == "conv2d":
                raise AssertionError("exact_conv fell back to F.conv2d")
            return getattr(F, name)
    monkeypatch.setattr(EC, "F", NoConv())


def _operands(geom, dtype, seed=0):
    n, c, h, w, co, k, _, _, _, g = geom
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=gen).to(dtype)
    wt = torch.randint(-128, 128, (co, c // g, *k), generator=gen).to(dtype)
    b = torch.randint(-1000, 1000, (co,), generator=gen).to(dtype)
    return x, wt, b


def _brute(x, w, b, stride, padding, dilation, groups):
    """int64 sums over the zero-padded input (``test_nn_kernels_perf_paths._conv_int``), plus the bias."""
    (ph, pw) = padding
    xp = np.pad(x.numpy().astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = _conv_int(xp, w.numpy().astype(np.int64), stride, dilation, groups)
    return out + (0 if b is None else b.numpy().astype(np.int64).reshape(1, -1, 1, 1))


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_columns_conv_equals_brute_force_and_torch(geom, dtype, with_bias, columns_only):
    x, w, b = _operands(geom, dtype)
    b = b if with_bias else None
    s, p, d, g = geom[6:]
    out = EC.columns_conv2d(x, w, b, s, p, d, g)
    assert out.dtype == dtype
    assert np.array_equal(out.numpy().astype(np.int64), _brute(x, w, b, s, p, d, g))
    assert torch.equal(out, F.conv2d(x, w, b, s, p, d, g))


@pytest.mark.parametrize("geom", GEOMETRIES[:2])
def test_columns_conv_in_chunks_of_the_batch(monkeypatch, geom, columns_only):
    x, w, b = _operands(geom, torch.float32, seed=1)
    s, p, d, g = geom[6:]
    want = _brute(x, w, b, s, p, d, g)
    monkeypatch.setattr(EC, "COLS_BYTES", 1)  # one batch item per chunk
    assert np.array_equal(EC.columns_conv2d(x, w, b, s, p, d, g).numpy().astype(np.int64), want)
    monkeypatch.setattr(EC, "COLS_BYTES", 2 * 4 * 9 * 7 * 6 * 4)  # two items per chunk, then one
    x3 = torch.cat([x, x[:1]]) if geom is GEOMETRIES[0] else x
    assert np.array_equal(EC.columns_conv2d(x3, w, b, s, p, d, g).numpy().astype(np.int64), _brute(x3, w, b, s, p, d, g))


def test_columns_conv_scalar_arguments_and_a_non_contiguous_input(columns_only):
    x, w, b = _operands(GEOMETRIES[0], torch.float32, seed=2)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    assert torch.equal(EC.columns_conv2d(xt, w, b, 1, 1, 1, 1), F.conv2d(x, w, b, 1, 1, 1, 1))
    assert torch.equal(EC.columns_conv2d(x[:, :, 1:, :], w, None, 2, 0, 1, 1), F.conv2d(x[:, :, 1:, :], w, None, 2))
    assert torch.equal(EC.columns_conv2d(x[1:], w, b, [2, 1], [1, 2], [2, 1]), F.conv2d(x[1:], w, b, (2, 1), (1, 2), (2, 1)))


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
    """Torch's own results and errors, its arguments passed in order (stride, padding and
    dilation all different, so a dropped or swapped one shows)."""
    x, w, b = _operands(GEOMETRIES[0], torch.float32)
    geo = ((2, 1), (1, 2), (1, 2))
    assert torch.equal(EC.columns_conv2d(x[0], w, b, *geo), F.conv2d(x[0], w, b, *geo))  # unbatched
    assert torch.equal(EC.columns_conv2d(x, w, b, 1, "same", (2, 1)), F.conv2d(x, w, b, 1, "same", (2, 1)))
    assert EC.columns_conv2d(x[:0], w, b, *geo).shape == F.conv2d(x[:0], w, b, *geo).shape
    with pytest.raises(RuntimeError, match="expected input"):
        EC.columns_conv2d(x[:, :3], w, b, 1, 1)  # torch's own error for a channel mismatch
    with pytest.raises(RuntimeError, match="should be the same|same dtype"):
        EC.columns_conv2d(x, w.double(), None, 1, 1)  # torch's own dtype error
    for small in (x[:, :, :1, :], x[:, :, :, :1], x[:, :, :1, :1]):  # the kernel taller, wider, both
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            EC.columns_conv2d(small, w, b)
    xg = torch.randint(0, 9, (1, 6, 5, 5)).float()
    wg = torch.randint(-3, 4, (4, 3, 3, 3)).float()
    with pytest.raises(RuntimeError):
        EC.columns_conv2d(xg, wg, None, 1, 1, 1, 4)  # 6 channels in 4 groups: torch's error


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
    matmul = torch.backends.cuda.matmul
    prev = matmul.allow_tf32
    matmul.allow_tf32 = True  # the caller's setting: the GEMM must turn TF32 off itself
    try:
        out = EC.conv2d(x.cuda(), w.cuda(), b.cuda(), s, p, d, g).cpu()
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = prev
    assert calls and np.array_equal(out.numpy().astype(np.int64), _brute(x, w, b, s, p, d, g))


# -- gaps found by mutation testing (session 13) ------------------------------------------------

def test_columns_conv_default_arguments_are_torch_defaults(columns_only):
    x, w, b = _operands(GEOMETRIES[0], torch.float32, seed=6)
    with_torch = F.conv2d(x, w)  # columns_only patches exact_conv's F only
    assert torch.equal(EC.columns_conv2d(x, w), with_torch)
    assert np.array_equal(with_torch.numpy().astype(np.int64), _brute(x, w, None, (1, 1), (0, 0), (1, 1), 1))


def test_unbatched_grouped_input_goes_to_torch_with_its_groups():
    x, w, b = _operands(GEOMETRIES[1], torch.float32, seed=7)  # groups 2
    s, p, d, g = GEOMETRIES[1][6:]
    assert torch.equal(EC.columns_conv2d(x[0], w, b, s, p, d, g), F.conv2d(x[0], w, b, s, p, d, g))


def test_non_positive_groups_are_torch_errors():
    x, w, _ = _operands(GEOMETRIES[0], torch.float32)
    with pytest.raises(RuntimeError, match="non-positive groups"):
        EC.columns_conv2d(x, w, None, 1, 1, 1, 0)


@pytest.mark.parametrize("h,w_", [(2, 6), (6, 2), (2, 2)])  # one output row/column short: ho or wo = 0
def test_outputs_of_size_zero_are_torch_errors_not_empty_results(h, w_):
    x = torch.ones((1, 4, h, w_))
    w = torch.ones((6, 4, 3, 3))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        EC.columns_conv2d(x, w)


def test_too_small_for_the_dilated_or_grouped_kernel_is_torch_error():
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        EC.columns_conv2d(torch.ones((1, 4, 4, 4)), torch.ones((6, 4, 3, 3)), None, 1, 0, 2)  # 5x5 dilated
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        EC.columns_conv2d(torch.ones((1, 4, 2, 2)), torch.ones((6, 2, 3, 3)), None, 1, 0, 1, 2)  # grouped
