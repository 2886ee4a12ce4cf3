"""Gaps the session-9 mutation run found in the new gradient and quantization paths.

Each test names the mutants it kills; each was seen to fail with its mutant planted by hand
and to pass without it.

* ``kernels.fold`` must run its numba loop wherever it applies (mutants that send every call
  to ``F.fold`` give the same bits, only slower), and a column count that does not match
  the geometry must raise, as ``F.fold`` does, not be folded under another geometry.
* The STE conv backward's shift by ``Zx`` must happen for ``Zx = 1`` too; a signed LUT keeps
  no cross terms (``Zw`` ignored) also where ``Zx = 0`` lets the convolution pad by itself.
* A quantizing task whose inputs are all Inf or NaN must be reported (the OR of their
  exponent fields is exactly the threshold).
* ``offset_tables.float_planes`` converts a float64 table to float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import functional as FN
from appmult.nn import kernels as K
from appmult.nn import offset_tables as OT
from appmult.nn import quant as Q
from appmult.nn import quant_loops as QL
from appmult.nn.tables import LutTables
from test_nn_lut2d_conv_backward import FOLDS

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


@needs_numba
@pytest.mark.parametrize("n, c, size, kernel, stride, dilation", FOLDS)
def test_fold_runs_the_numba_loop_wherever_it_applies(n, c, size, kernel, stride, dilation, monkeypatch):
    """(kernels.x_fold mutants 5-12, 14-40: conditions and output sizes that route to F.fold.)"""
    (hp, wp), (kh, kw), (sh, sw), (dh, dw) = size, kernel, stride, dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    cols = torch.randn(n, c * kh * kw, ho * wo, generator=torch.Generator().manual_seed(7))
    calls = []
    real = K.loops.fold
    monkeypatch.setattr(K.loops, "fold", lambda *a: calls.append(a[2:]) or real(*a))
    got = K.fold(cols, size, kernel, stride, dilation)
    assert calls == [(kh, kw, sh, sw, dh, dw, wo)]
    assert got.dtype == torch.float32
    assert torch.equal(got, F.fold(cols, size, kernel, dilation=dilation, padding=0, stride=stride))


@pytest.mark.parametrize("what", ["padding", "dilation", "stride"])
def test_fold_refuses_columns_of_another_geometry(what):
    """Columns that would fit padding 1, dilation 1 or stride 1 but not the geometry asked:
    an error, not a fold under the other geometry (kernels.x_fold mutants of the error call)."""
    if what == "padding":      # 9x9, 3x3, padding 1 -> 81 columns; padding 0 -> 49
        cols, stride, dilation = torch.randn(1, 9, 81), (1, 1), (1, 1)
    elif what == "dilation":   # dilation 2 -> 25 columns; dilation 1 -> 49
        cols, stride, dilation = torch.randn(1, 9, 49), (1, 1), (2, 2)
    else:                      # stride 2 -> 16 columns; stride 1 -> 49
        cols, stride, dilation = torch.randn(1, 9, 49), (2, 2), (1, 1)
    with pytest.raises(RuntimeError):
        K.fold(cols, (9, 9), (3, 3), stride, dilation)


@pytest.mark.parametrize("zx", [1.0, 2.0])
def test_ste_conv_backward_shifts_by_every_nonzero_zx(zx):
    """(autograd.x__ste_conv_backward mutant 30: ``zx != 1.0``.) Unsigned exact product,
    padding, Zx = 1 and 2: the weight gradient is that of the padded conv of ``qx - Zx``."""
    rng = np.random.default_rng(int(zx))
    cx = rng.integers(0, 16, (2, 2, 5, 5)).astype(np.float32)
    cw = rng.integers(0, 16, (3, 2, 3, 3)).astype(np.float32)
    v = np.arange(16)
    tabs = LutTables(LutFile(np.outer(v, v), width_a=4, width_b=4, signed=False), kernel="lowrank", grad="ste")
    qx = torch.tensor(cx, requires_grad=True)
    qw = torch.tensor(cw, requires_grad=True)
    one = torch.tensor(1.0)
    y = FN._approx_conv2d(qx, one, torch.tensor(zx), qw, one, torch.tensor(3.0), None, tabs, padding=1)
    rx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(F.pad(rx, (1, 1, 1, 1), value=zx) - zx, rw - 3.0)
    g = torch.from_numpy(rng.standard_normal(tuple(ref.shape)))
    y.backward(g.float())
    ref.backward(g)
    np.testing.assert_allclose(qw.grad.numpy(), rw.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(qx.grad.numpy(), rx.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_signed_lut_ignores_zw_on_the_zero_padding_path():
    """(autograd.x__zp_conv_backward mutant 11: cross terms for a signed LUT.) Internal entry,
    signed exact product, Zx = 0, Zw = -2: no cross terms, so the gradients are those of the
    plain conv of the zero-padded codes."""
    rng = np.random.default_rng(11)
    cx = rng.integers(-8, 8, (2, 3, 5, 6)).astype(np.float32)
    cw = rng.integers(-8, 8, (4, 3, 3, 3)).astype(np.float32)
    v = np.arange(-8, 8)
    tabs = LutTables(LutFile(np.outer(v, v), width_a=4, width_b=4, signed=True), kernel="lowrank", grad="ste")
    qx = torch.tensor(cx, requires_grad=True)
    qw = torch.tensor(cw, requires_grad=True)
    one = torch.tensor(1.0)
    y = FN._approx_conv2d(qx, one, torch.tensor(0.0), qw, one, torch.tensor(-2.0), None, tabs, padding=1)
    rx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(rx, rw, padding=1)
    g = torch.from_numpy(rng.standard_normal(tuple(ref.shape)))
    y.backward(g.float())
    ref.backward(g)
    np.testing.assert_allclose(qx.grad.numpy(), rx.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(qw.grad.numpy(), rw.grad.numpy(), rtol=1e-5, atol=1e-4)


@needs_numba
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_block_of_only_non_finite_inputs_is_reported(bad):
    """(quant.x__fused_fake_quant mutant 67: ``tops <= NON_FINITE``.) Every input of the task
    non-finite: the OR of (exponent + 1) is exactly 2**31."""
    s, z = torch.tensor(0.1), torch.tensor(0.0)
    for n in (1, 17, QL.BLOCK):
        x = torch.full((n,), bad)
        assert Q._fused_fake_quant(x, s, z, 0, 255, mask=False)[2] is False
        with pytest.raises(InvalidValueError, match="^L input contains NaN or Inf"):
            Q._fake_quant_nograd(x, s, z, 0, 255, "L")


def test_float_planes_take_a_float64_table():
    """(offset_tables.x_float_planes mutant 11: no conversion to float32.)"""
    t = torch.randn(8, 5, dtype=torch.float64)
    pl = OT.float_planes(t)
    back = pl.reshape(5, 4, 256).transpose(0, 2, 1).copy().view(np.float32)[:, :8, 0]
    assert np.array_equal(back, t.t().float().numpy())


@pytest.mark.parametrize("case", ["channels", "rows 0", "columns 0"])
def test_fold_refuses_what_f_fold_refuses(case):
    """A column count not divisible by the kernel's size, and empty columns where the kernel
    leaves no output rows or columns: F.fold's error, not a silent fold (kernels.x_fold
    mutants 3, 47, 48, 50)."""
    if case == "channels":
        cols, size = torch.randn(1, 10, 49), (9, 9)
    elif case == "rows 0":
        cols, size = torch.randn(1, 9, 0), (2, 5)
    else:
        cols, size = torch.randn(1, 9, 0), (5, 2)
    with pytest.raises(RuntimeError):
        F.fold(cols, size, (3, 3))
    with pytest.raises(RuntimeError):
        K.fold(cols, size, (3, 3), (1, 1), (1, 1))


def test_fold_takes_unbatched_columns_like_f_fold():
    """(kernels.x_fold mutant 4: a 2-D input sent to the numba loop; 81 positions, a multiple
    of the kernel's 9, so no other test of the shape steps aside first.)"""
    cols = torch.randn(2 * 9, 81)
    assert torch.equal(K.fold(cols, (11, 11), (3, 3), (1, 1), (1, 1)), F.fold(cols, (11, 11), (3, 3)))
