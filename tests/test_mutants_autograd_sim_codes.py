"""Tests written for surviving mutants of ``appmult.nn.autograd`` (mutmut).

Every test checks the conv/linear LUT accumulators or their gradients against an
independent reference: numpy brute-force sums of ``LUT[x, w]`` (int64, or float64 where
every partial sum is exact) and brute-force gradient sums of the grad rule's tables
(``value(w) - Zw`` for the STE, the stored LUT-2D tables otherwise). Operands are
unsigned codes (value = index), so no code mapping is needed in the references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import Kernel, LutTables, approx_conv2d, lut_conv2d, lut_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unsigned_lut(table: np.ndarray, width_a: int, width_b: int, **kw) -> LutFile:
    return LutFile(np.asarray(table, np.int64), width_a=width_a, width_b=width_b, signed=False, **kw)


def conv_sum_ref(p: np.ndarray, qx: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """``sum p[x, w]`` over each receptive field (stride 1, no padding, one group), int64."""
    n, c, h, wd = qx.shape
    co, _, kh, kw = qw.shape
    out = np.zeros((n, co, h - kh + 1, wd - kw + 1), np.int64)
    for b in range(n):
        for j in range(co):
            for i in range(out.shape[2]):
                for q in range(out.shape[3]):
                    out[b, j, i, q] = p[qx[b, :, i:i + kh, q:q + kw], qw[j]].sum()
    return out


def conv_grads_ref(qx: np.ndarray, qw: np.ndarray, g: np.ndarray, dx, dw):
    """Brute-force ``(dL/dx, dL/dw)`` of ``y[b, j, i, q] = sum f(x, w)`` over each receptive
    field (stride 1, no padding): ``dx(x, w, j)``/``dw(x, w, j)`` give ``df/dx``/``df/dw``
    of one product of output channel ``j``. float64."""
    n, c, h, wd = qx.shape
    co, _, kh, kw = qw.shape
    gx = np.zeros(qx.shape, np.float64)
    gw = np.zeros(qw.shape, np.float64)
    for b in range(n):
        for j in range(co):
            for i in range(h - kh + 1):
                for q in range(wd - kw + 1):
                    for ci in range(c):
                        for u in range(kh):
                            for v in range(kw):
                                x, w = qx[b, ci, i + u, q + v], qw[j, ci, u, v]
                                gx[b, ci, i + u, q + v] += g[b, j, i, q] * dx(x, w, j)
                                gw[j, ci, u, v] += g[b, j, i, q] * dw(x, w, j)
    return gx, gw


def t(a: np.ndarray, dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(a, np.float64), dtype=dtype, requires_grad=grad)


# -- _conv_forward: the accumulator type of the gather kernel -----------------------------------

def test_conv_gather_sum_of_exactly_2_to_31_is_not_wrapped():
    """Two products of ``2**30`` (``k * max_abs == 2**31`` exactly, an int32 table) sum to
    ``2**31``: the gather kernel must accumulate in int64 (mutants: int32 with ``<=``, with
    the limit ``2 << 31``/``1 << 32``, ``k / max_abs``, always int32, or the table's own
    int32 type as the accumulator -- each wraps the sum to ``-2**31``)."""
    p = np.array([[1 << 30, (1 << 30) - 1], [(1 << 30) - 2, 7]])
    tabs = LutTables(unsigned_lut(p, 1, 1), kernel="gather")
    assert tabs.prod.dtype == torch.int32
    qx = np.array([[[[0, 0, 1, 0, 1]]]])       # (1, 1, 1, 5)
    qw = np.array([[[[0, 0]]], [[[1, 0]]]])     # (2, 1, 1, 2): k = 2
    ref = conv_sum_ref(p, qx, qw)
    assert ref.max() == 1 << 31
    for exact in (False, True):
        y = lut_conv2d(t(qx), t(qw), tabs, exact=exact)
        assert y.dtype == (torch.float64 if exact else torch.float32)
        np.testing.assert_array_equal(y.numpy(), ref.astype(np.float64 if exact else np.float32))


# -- _conv_forward / _linear_forward: exact mode past the float64 limit ---------------------------

def huge_rank1_lut() -> tuple[np.ndarray, LutTables]:
    """A 1-bit LUT ``outer(u, v)`` with ``u, v`` near ``2**25``: rank 1, integer factors
    below ``2**31``, but ``bound`` near ``2**50`` -- ``k * bound >= 2**53`` from ``k = 8``.
    """
    u = np.array([(1 << 25) + 1, (1 << 25) + 3])
    v = np.array([(1 << 25) + 5, (1 << 25) + 7])
    p = np.outer(u, v)
    tabs = LutTables(unsigned_lut(p, 1, 1), kernel="lowrank")
    assert tabs.kernel is Kernel.LOWRANK and tabs.rank == 1 and tabs.bound >= 1 << 50
    return p, tabs


def test_conv_exact_lowrank_beyond_float64_limit_is_the_exact_sum_rounded_once():
    """With ``exact=True`` and ``k * bound >= 2**53`` the low-rank float64 convolution would
    round its partial sums: the integer kernel runs instead, and each output is the exact
    int64 sum rounded once to float64 (mutants: the low-rank path whenever ``exact``, or
    with ``k / bound`` as the test)."""
    p, tabs = huge_rank1_lut()
    rng = np.random.default_rng(5)
    qx = rng.integers(0, 2, size=(3, 4, 6, 6))
    qw = rng.integers(0, 2, size=(5, 4, 4, 4))   # k = 64: sums near 2**56
    ref = conv_sum_ref(p, qx, qw)
    assert 64 * tabs.bound >= 1 << 53 and ref.max() >= 1 << 55
    y = lut_conv2d(t(qx, torch.float64), t(qw, torch.float64), tabs, exact=True)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float64))


def test_linear_exact_lowrank_beyond_float64_limit_is_the_exact_sum_rounded_once():
    """The linear counterpart (mutant of ``_linear_forward``: the low-rank path whenever
    ``exact``)."""
    p, tabs = huge_rank1_lut()
    rng = np.random.default_rng(6)
    qx = rng.integers(0, 2, size=(7, 64))
    qw = rng.integers(0, 2, size=(5, 64))
    ref = p[qx[:, None, :], qw[None, :, :]].sum(-1)
    assert ref.max() >= 1 << 55
    y = lut_linear(t(qx, torch.float64), t(qw, torch.float64), tabs, exact=True)
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float64))


def test_conv_exact_with_the_zero_table():
    """The all-zero LUT factors with ``bound == 0``: exact mode gives zeros (mutant:
    ``k / bound`` divides by zero)."""
    tabs = LutTables(unsigned_lut(np.zeros((4, 4)), 2, 2), kernel="lowrank")
    assert tabs.bound == 0
    y = lut_conv2d(torch.ones(1, 2, 3, 3), torch.full((2, 2, 2, 2), 3.0), tabs, exact=True)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), np.zeros((1, 2, 2, 2)))


# -- _conv_forward: result type without exact ---------------------------------------------------

@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_conv_default_accumulator_is_float32(kernel):
    """Without ``exact`` the accumulators are float32, as for ``lut_linear``, on both
    kernels (mutant: float64 whatever ``exact``)."""
    p = np.outer(np.arange(8), np.arange(8)) + np.arange(8)[None, :]
    tabs = LutTables(unsigned_lut(p, 3, 3), kernel=kernel)
    rng = np.random.default_rng(1)
    qx, qw = rng.integers(0, 8, size=(2, 3, 4, 4)), rng.integers(0, 8, size=(2, 3, 2, 2))
    y = lut_conv2d(t(qx), t(qw), tabs)
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), conv_sum_ref(p, qx, qw).astype(np.float32))
    assert lut_conv2d(t(qx), t(qw), tabs, exact=True).dtype == torch.float64


# -- _conv_forward / _conv_backward: non-square LUTs on the gather kernels ----------------------

def wide_x_lut():
    """9-bit activations x 4-bit weights: 512 rows (int32 indices), 16 columns (uint8
    would do). Random LUT-2D gradient tables of rank 16 > ``AUTO_MAX_RANK``: the gather
    gradient kernels."""
    rng = np.random.default_rng(9)
    p = np.outer(np.arange(512), np.arange(16)) + 3 * (np.arange(512) % 5)[:, None]
    ga = rng.uniform(-2, 2, size=(512, 16)).astype(np.float32)
    gb = rng.uniform(-2, 2, size=(512, 16)).astype(np.float32)
    lut = unsigned_lut(p, 9, 4, gradients={"lut2d": (ga, gb)})
    tabs = LutTables(lut, grad="lut2d", kernel="gather")
    assert tabs.kernel is Kernel.GATHER and tabs.grad_kernel is Kernel.GATHER
    return p, ga.astype(np.float64), gb.astype(np.float64), tabs


def test_conv_gather_activation_indices_above_255_on_a_narrow_weight_axis():
    """Activation values 256..511 index the LUT's rows as int32 in the forward and in the
    LUT-2D gather backward (mutants: the index type chosen by the weight axis' 16 columns,
    uint8, which wraps them to 0..255)."""
    p, ga, gb, tabs = wide_x_lut()
    rng = np.random.default_rng(10)
    qx = rng.integers(0, 512, size=(1, 2, 4, 4))
    qx[0, 0, 0, 0] = 511
    qw = rng.integers(0, 16, size=(2, 2, 2, 2))
    g = rng.integers(-3, 4, size=(1, 2, 3, 3)).astype(np.float64)
    x, w = t(qx, grad=True), t(qw, grad=True)
    y = lut_conv2d(x, w, tabs)
    np.testing.assert_array_equal(y.detach().numpy(), conv_sum_ref(p, qx, qw).astype(np.float32))
    y.backward(t(g))
    gx, gw = conv_grads_ref(qx, qw, g, lambda a, b, j: ga[a, b], lambda a, b, j: gb[a, b])
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.grad.numpy(), gw, rtol=1e-5, atol=1e-5)


def test_conv_lut2d_gather_gradient_folds_overlapping_columns_in_float64():
    """float64 gradients: the gather kernel's float32 columns (here single products, exact)
    are converted to float64 before ``fold`` adds the up to 9 overlapping ones, so each
    input gradient is the exact float64 sum of the table entries (mutants: no dtype in
    that conversion -- ``fold`` sums in float32 and rounds)."""
    rng = np.random.default_rng(11)
    ga = rng.uniform(-1, 1, size=(16, 16)).astype(np.float32)
    gb = rng.uniform(-1, 1, size=(16, 16)).astype(np.float32)
    lut = unsigned_lut(np.outer(np.arange(16), np.arange(16)), 4, 4, gradients={"lut2d": (ga, gb)})
    tabs = LutTables(lut, grad="lut2d", kernel="gather")
    assert tabs.grad_kernel is Kernel.GATHER
    qx = rng.integers(0, 16, size=(1, 1, 6, 6))
    qw = rng.integers(0, 16, size=(1, 1, 3, 3))
    x, w = t(qx, torch.float64, grad=True), t(qw, torch.float64, grad=True)
    y = lut_conv2d(x, w, tabs, exact=True)
    y.backward(torch.ones_like(y))
    gx, _ = conv_grads_ref(qx, qw, np.ones((1, 1, 4, 4)), lambda a, b, j: float(ga[a, b]),
                           lambda a, b, j: float(gb[a, b]))
    assert x.grad.dtype == torch.float64
    # the data discriminates: float32 sums of these columns round
    assert (gx.astype(np.float32).astype(np.float64) != gx).any()
    np.testing.assert_array_equal(x.grad.numpy(), gx)


# -- _conv_backward with zero points (approx_conv2d's fused accumulators) ----------------------

ZP_P = np.outer(np.arange(8), np.arange(8)) + (np.arange(8)[:, None] * 3 + np.arange(8)[None, :]) % 7


def zp_case(seed: int):
    rng = np.random.default_rng(seed)
    qx = rng.integers(0, 8, size=(1, 2, 5, 5))   # 16 output positions: the fused gather applies
    qw = rng.integers(0, 8, size=(2, 2, 2, 2))
    g = rng.integers(-3, 4, size=(1, 2, 4, 4)).astype(np.float64)
    return qx, qw, g


def run_approx_conv(qx, qw, g, zx, zw, tabs, exact=False):
    x, w = t(qx, grad=True), t(qw, grad=True)
    one = torch.tensor(1.0)
    y = approx_conv2d(x, one, zx, w, one, zw, None, tabs, exact=exact)
    y.backward(t(g, y.dtype))
    return y, x.grad, w.grad


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("zw", [torch.tensor(3.0), torch.tensor([2.0, 5.0]),
                                torch.tensor([2.0, 5.0], dtype=torch.float64)],
                         ids=["per_tensor", "per_channel", "per_channel_float64"])
def test_approx_conv2d_ste_gradients_with_zero_points(zw, exact):
    """STE gradients of the whole accumulator ``sum LUT[x, w] - x Zw - Zx w + Zx Zw``:
    ``dL/dx = sum G (w - Zw)``, ``dL/dw = sum G (x - Zx)``, per-tensor or per-channel
    ``Zw`` (a float64 one too), float32 or float64 (``exact``) gradients (mutants: the
    per-tensor zero point reshaped per channel, a per-channel one of two channels taken as
    a scalar, ``reshape(None)``, the per-channel zero point or the STE's mapped operands
    not converted to the gradient's dtype)."""
    qx, qw, g = zp_case(3)
    tabs = LutTables(unsigned_lut(ZP_P, 3, 3), kernel="gather")
    zx = torch.tensor(2.0)
    y, gx, gw = run_approx_conv(qx, qw, g, zx, zw, tabs, exact=exact)
    zwv = np.broadcast_to(zw.double().numpy().reshape(-1), (2,))
    acc = conv_sum_ref(ZP_P, qx, qw)
    sum_x = conv_sum_ref(np.outer(np.arange(8), np.ones(8, np.int64)), qx, qw)   # sum of x per field
    zwb = zwv[None, :, None, None]
    ref_y = acc - sum_x * zwb - 2 * qw.sum((1, 2, 3))[None, :, None, None] + 8 * 2 * zwb   # k = 8, Zx = 2
    np.testing.assert_array_equal(y.detach().double().numpy(), ref_y)
    rx, rw = conv_grads_ref(qx, qw, g, lambda a, b, j: b - zwv[j], lambda a, b, j: a - 2.0)
    np.testing.assert_array_equal(gx.double().numpy(), rx)
    np.testing.assert_array_equal(gw.double().numpy(), rw)


@pytest.mark.parametrize("exact", [False, True])
def test_approx_conv2d_lut2d_gradients_with_a_per_tensor_zero_point(exact):
    """LUT-2D gradients with zero points: ``dL/dx = sum G (ga[x, w] - Zw)``, ``dL/dw =
    sum G (gb[x, w] - Zx)``, float32 or float64 (``exact``) gradients (mutants: the map of
    ``Zw`` built in the weights' dtype -- float32 next to float64 gradients). The 8x8
    gradient tables go through their float low-rank factors: equal up to float32 rounding."""
    qx, qw, g = zp_case(4)
    rng = np.random.default_rng(12)
    ga = rng.uniform(-2, 2, size=(8, 8))
    gb = rng.uniform(-2, 2, size=(8, 8))
    tabs = LutTables(unsigned_lut(ZP_P, 3, 3, gradients={"lut2d": (ga, gb)}), grad="lut2d", kernel="gather")
    zx, zw = torch.tensor(1.0), torch.tensor(4.0)
    _, gx, gw = run_approx_conv(qx, qw, g, zx, zw, tabs, exact=exact)
    rx, rw = conv_grads_ref(qx, qw, g, lambda a, b, j: ga[a, b] - 4.0, lambda a, b, j: gb[a, b] - 1.0)
    np.testing.assert_allclose(gx.double().numpy(), rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw.double().numpy(), rw, rtol=1e-5, atol=1e-5)
