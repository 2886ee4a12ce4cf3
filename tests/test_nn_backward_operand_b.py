"""LUT-2D and LUT-1D backward when activations feed the LUT's operand ``b``.

With ``activation_operand="b"`` the product of activation ``x`` and weight ``w`` is
``LUT[w, x]`` (index ``[a_code, b_code]``), so

* LUT-2D: ``d/dx = grad_b[w, x]`` and ``d/dw = grad_a[w, x]``;
* LUT-1D: ``d/dx = grad_b[w]`` (one value per code of ``a``) and ``d/dw = grad_a[x]``
  (one value per code of ``b``).

The tables here are random (or random of rank 3, for the low-rank backward kernel), with
``grad_a`` and ``grad_b`` unrelated, so a layer that forgot to swap them -- or to
transpose them -- computes visibly different gradients. References are float64 loops
over every product, written from the formulas above and nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.codes import codes_to_values, values_to_codes
from appmult.lut_gen import LutFile
from appmult.nn import Kernel, LutTables, lut_conv2d, lut_linear


def _table(wa: int, wb: int, signed: bool, seed: int) -> np.ndarray:
    """A non-commutative product table of rank 2 (int64), indexed ``[a_code, b_code]``: the
    exact product plus ``(a mod 4) * (b >> 1)``, so both forward kernels apply."""
    va = codes_to_values(np.arange(1 << wa), wa, signed).astype(np.int64)
    vb = codes_to_values(np.arange(1 << wb), wb, signed).astype(np.int64)
    return np.outer(va, vb) + np.outer(va & 3, (vb >> 1) * (1 + seed % 2))


def lut_b(wa: int, wb: int, signed: bool, low_rank_grads: bool, seed: int) -> LutFile:
    rng = np.random.default_rng(100 + seed)
    na, nb = 1 << wa, 1 << wb
    if low_rank_grads:
        ga = rng.normal(size=(na, 3)) @ rng.normal(size=(3, nb))
        gb = rng.normal(size=(na, 2)) @ rng.normal(size=(2, nb))
    else:
        ga, gb = rng.normal(size=(na, nb)), rng.normal(size=(na, nb))
    # LUT-1D: grad_a holds one value per code of b, grad_b one per code of a.
    g1 = (rng.normal(size=nb), rng.normal(size=na))
    return LutFile(_table(wa, wb, signed, seed), width_a=wa, width_b=wb, signed=signed,
                   gradients={"lut2d": (ga, gb), "lut1d": g1})


def _rand_values(shape, width: int, signed: bool, rng) -> np.ndarray:
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    v = rng.integers(lo, hi + 1, shape)
    v.reshape(-1)[:2] = (lo, hi)  # the range ends (the most negative code included) always occur
    return v


def _partials(lut: LutFile, mode: str):
    """``(d/dx, d/dw)`` as functions of (activation codes, weight codes) for operand ``b``."""
    ga, gb = (np.asarray(t, np.float64) for t in lut.gradient(mode))
    if mode == "lut2d":
        return (lambda cx, cw: gb[cw, cx]), (lambda cx, cw: ga[cw, cx])
    return (lambda cx, cw: gb[cw]), (lambda cx, cw: ga[cx])


def brute_linear(lut: LutFile, mode: str, qx: np.ndarray, qw: np.ndarray, g: np.ndarray):
    """Forward accumulators and gradients of ``y[m, n] = sum_k LUT[qw[n, k], qx[m, k]]``."""
    cx = values_to_codes(qx, lut.width_b, lut.signed)
    cw = values_to_codes(qw, lut.width_a, lut.signed)
    dx, dw = _partials(lut, mode)
    m, n = qx.shape[0], qw.shape[0]
    acc = np.zeros((m, n), np.int64)
    gx, gw = np.zeros(qx.shape), np.zeros(qw.shape)
    for i in range(m):
        for j in range(n):
            acc[i, j] = lut.product[cw[j], cx[i]].sum()
            gx[i] += g[i, j] * dx(cx[i], cw[j])
            gw[j] += g[i, j] * dw(cx[i], cw[j])
    return acc, gx, gw


def brute_conv(lut: LutFile, mode: str, qx: np.ndarray, qw: np.ndarray, g: np.ndarray, stride: int, groups: int):
    """Conv (``qx`` already padded) accumulators and gradients, one receptive field at a time."""
    cx = values_to_codes(qx, lut.width_b, lut.signed)
    cw = values_to_codes(qw, lut.width_a, lut.signed)
    dx, dw = _partials(lut, mode)
    n, _, _, _ = qx.shape
    co, cg, kh, kw = qw.shape
    ho, wo = g.shape[2:]
    per_group = co // groups
    acc = np.zeros(g.shape, np.int64)
    gx, gw = np.zeros(qx.shape), np.zeros(qw.shape)
    for b in range(n):
        for j in range(co):
            ch = slice((j // per_group) * cg, (j // per_group + 1) * cg)
            for oh in range(ho):
                for ow in range(wo):
                    rs, cs = slice(oh * stride, oh * stride + kh), slice(ow * stride, ow * stride + kw)
                    px = cx[b, ch, rs, cs]
                    acc[b, j, oh, ow] = lut.product[cw[j], px].sum()
                    gx[b, ch, rs, cs] += g[b, j, oh, ow] * dx(px, cw[j])
                    gw[j] += g[b, j, oh, ow] * dw(px, cw[j])
    return acc, gx, gw


# (width_a, width_b, signed, low-rank gradient tables): equal widths, where a missing swap
# goes silently through, and unequal widths.
CASES = [
    (5, 5, False, False),
    (5, 5, True, False),
    (5, 5, False, True),
    (4, 4, True, True),
    (5, 6, True, False),
    (5, 3, False, True),
]


def _tables(case: int, mode: str, kernel: str) -> tuple[LutFile, LutTables]:
    wa, wb, signed, lowg = CASES[case]
    lut = lut_b(wa, wb, signed, lowg, seed=case)
    tabs = LutTables(lut, grad=mode, kernel=kernel, activation_operand="b")
    assert (tabs.width_x, tabs.width_w) == (wb, wa)
    return lut, tabs


def test_cases_exercise_both_lut2d_backward_kernels():
    """The cases below reach the low-rank and the gather LUT-2D backward (gather: random
    5-bit tables under the gather forward kernel)."""
    kinds = {_tables(case, "lut2d", kernel)[1].grad_kernel
             for case in range(len(CASES)) for kernel in ("gather", "lowrank")}
    assert kinds == {Kernel.LOWRANK, Kernel.GATHER}


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["lut2d", "lut1d"])
@pytest.mark.parametrize("kernel", ["gather", "lowrank"])
def test_linear_operand_b_backward_matches_brute_force(case, mode, kernel):
    lut, tabs = _tables(case, mode, kernel)
    rng = np.random.default_rng(case)
    qx_np = _rand_values((5, 9), lut.width_b, lut.signed, rng)
    qw_np = _rand_values((4, 9), lut.width_a, lut.signed, rng)
    g_np = rng.normal(size=(5, 4))
    qx = torch.tensor(qx_np, dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(qw_np, dtype=torch.float64, requires_grad=True)
    acc = lut_linear(qx, qw, tabs, exact=True)
    gx, gw = torch.autograd.grad(acc, (qx, qw), torch.from_numpy(g_np))
    want_acc, want_gx, want_gw = brute_linear(lut, mode, qx_np, qw_np, g_np)
    assert acc.detach().to(torch.int64).numpy().tolist() == want_acc.tolist()
    np.testing.assert_allclose(gx.numpy(), want_gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), want_gw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["lut2d", "lut1d"])
@pytest.mark.parametrize("kernel", ["gather", "lowrank"])
@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 2)])
def test_conv_operand_b_backward_matches_brute_force(case, mode, kernel, stride, groups):
    lut, tabs = _tables(case, mode, kernel)
    rng = np.random.default_rng(20 + case)
    qx_np = _rand_values((2, 4, 6, 6), lut.width_b, lut.signed, rng)
    qw_np = _rand_values((4, 4 // groups, 3, 3), lut.width_a, lut.signed, rng)
    qx = torch.tensor(qx_np, dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(qw_np, dtype=torch.float64, requires_grad=True)
    acc = lut_conv2d(qx, qw, tabs, stride=stride, groups=groups, exact=True)
    g_np = rng.normal(size=tuple(acc.shape))
    gx, gw = torch.autograd.grad(acc, (qx, qw), torch.from_numpy(g_np))
    want_acc, want_gx, want_gw = brute_conv(lut, mode, qx_np, qw_np, g_np, stride, groups)
    assert acc.detach().to(torch.int64).numpy().tolist() == want_acc.tolist()
    np.testing.assert_allclose(gx.numpy(), want_gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), want_gw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["lut2d", "lut1d"])
def test_float32_training_path_operand_b(mode):
    """The float32 (training) path of the same kernels agrees with the brute force too."""
    lut, tabs = _tables(0, mode, "gather")
    rng = np.random.default_rng(7)
    qx_np = _rand_values((6, 8), lut.width_b, lut.signed, rng)
    qw_np = _rand_values((3, 8), lut.width_a, lut.signed, rng)
    g_np = rng.normal(size=(6, 3))
    qx = torch.tensor(qx_np, dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(qw_np, dtype=torch.float32, requires_grad=True)
    acc = lut_linear(qx, qw, tabs)
    gx, gw = torch.autograd.grad(acc, (qx, qw), torch.from_numpy(g_np).float())
    _, want_gx, want_gw = brute_linear(lut, mode, qx_np, qw_np, g_np)
    np.testing.assert_allclose(gx.numpy(), want_gx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gw.numpy(), want_gw, rtol=1e-4, atol=1e-3)
