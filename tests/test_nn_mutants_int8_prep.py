"""The int8 GEMM's cheap weight-side preparations (issue 12) at their bounds.

``fused._int8_one_plane_prep`` (a fold of one digit plane in float32 passes) must give the
tuple of the general ``_int8_linear_prep`` wherever it applies -- and it is what lets a
training step (no weight-side cache) take the int8 GEMM for a one-plane LUT other than the
exact product (which ``_int8_value_prep`` takes first). ``fused._exact_row_sums`` and
``fused._shifted_int8_rows`` serve ``_int8_value_prep`` and the fold. References: numpy
int64 sums, the general prep (``_int8_one_plane_prep`` patched out), the float path.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn.tables import LutTables
from test_nn_int8_gemm import make_layer, trains_alike_through_the_int8_gemm, truncated


def even_weight_table() -> np.ndarray:
    """8x8 multiplier with the weight rounded up to even (saturating at 255): rank 1,
    ``U = value(x)`` (so the fold exists) but ``V != value(w)`` (no ``_int8_value_prep``);
    ``V`` spans 0..255, one digit plane."""
    v = np.arange(256)
    return v[:, None] * np.minimum(v + (v & 1), 255)[None, :]


def same_tuple(a, b):
    assert a is not None and a is not False and b is not None and b is not False
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def general_prep(fold, tabs, monkeypatch):
    """``_int8_linear_prep`` without its one-plane shortcut."""
    with monkeypatch.context() as m:
        m.setattr(FU, "_int8_one_plane_prep", lambda *a: None)
        return FU._int8_linear_prep(fold, tabs)


def test_one_plane_fold_trains_through_the_int8_gemm(monkeypatch):
    """A trainable weight over a one-plane LUT that is not the exact product: the training
    step prepares the fold's int8 weights (``U`` spans exactly 255, every output's folded
    weights span exactly 255, all outputs together more), runs the int8 GEMM and gives the
    float path's outputs and gradients."""
    def make():
        layer, x = make_layer(even_weight_table(), 300, 5, seed=8)
        with torch.no_grad():  # other zero points per output
            layer.weight += torch.linspace(-0.04, 0.04, 5).reshape(5, 1)
            qw, _, zw = layer.weight_quant(layer.weight)
            _, _, zx = layer.act_quant(x)
            fold = FU._folded_lowrank_weights(qw.reshape(5, 300, 1, 1), zx, zw, layer.lut, split_k=True)
        w = fold[0].reshape(5, -1)
        assert float(layer.lut.u.max() - layer.lut.u.min()) == 255 and not layer.lut.v_is_value
        assert torch.all(w.amax(1) - w.amin(1) == 255) and float(w.max() - w.min()) > 300
        return layer, x
    trains_alike_through_the_int8_gemm(make, monkeypatch)


@pytest.mark.parametrize("k, max_planes", [(2, 3), (FU.INT8_GEMM_MAX_K, 3), (40, 1)])
def test_training_weight_side_takes_one_plane_folds_at_the_bounds(k, max_planes, monkeypatch):
    """The training step's weight side (no cache) at ``K r = 2``, ``K r = INT8_GEMM_MAX_K``
    and with one digit plane allowed: the one-plane prep applies, with the general prep's
    tuple."""
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", max_planes)
    tabs = LutTables(LutFile(even_weight_table(), width_a=8, width_b=8, signed=False), kernel="lowrank")
    gen = torch.Generator().manual_seed(k)
    n = 3
    qw = torch.randint(0, 256, (n, k), generator=gen).float()
    qw[:, 0], qw[:, 1] = 0.0, 255.0
    zw, zx = torch.tensor([[0.0], [77.0], [200.0]]), torch.tensor(3.0)
    fold, i8 = FN._lowrank_linear_sides(qw, zx, zw, tabs, None)
    assert fold is not None and i8 is not False
    same_tuple(i8, general_prep(fold, tabs, monkeypatch))


def test_no_one_plane_prep_without_int_mm(monkeypatch):
    """Without ``torch._int_mm`` neither prep applies: the training step keeps the fold's
    float path."""
    tabs = LutTables(LutFile(even_weight_table(), width_a=8, width_b=8, signed=False), kernel="lowrank")
    qw = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5)).float()
    zw, zx = torch.tensor([[10.0], [90.0]]), torch.tensor(4.0)
    assert FN._lowrank_linear_sides(qw, zx, zw, tabs, None)[1] is not False
    monkeypatch.delattr(torch, "_int_mm")
    fold, i8 = FN._lowrank_linear_sides(qw, zx, zw, tabs, None)
    assert fold is not None and i8 is False
    assert FU._int8_linear_prep(fold, tabs) is False


def _one_plane_case(tabs, w_int: np.ndarray, const: np.ndarray, monkeypatch):
    w = torch.from_numpy(w_int.astype(np.float32))
    c = torch.from_numpy(const.astype(np.float64))
    quick = FU._int8_one_plane_prep(w, c, tabs)
    same_tuple(quick, general_prep((w, c), tabs, monkeypatch))
    ox = int(tabs.u.min()) + 128
    want_c = const.astype(np.int64) + ox * w_int.astype(np.int64).sum(1)
    np.testing.assert_array_equal(quick[1].numpy(), want_c.astype(np.float64))
    assert quick[3] == ox and quick[-1] == 1


def test_one_plane_prep_long_rows_sum_exactly(monkeypatch):
    """``K r = 70,000`` weights of 254-255 (the exact product's fold of high codes): row
    sums past ``2**24``, odd, so a float32 sum would round."""
    tabs = LutTables(LutFile(truncated(0), width_a=8, width_b=8, signed=False))
    w = np.full((2, 70_000), 255, np.int64)
    w[:, 5] = 254
    w[1, 7] = 0
    _one_plane_case(tabs, w, -3 * w.sum(1), monkeypatch)


def test_one_plane_prep_with_an_odd_activation_offset(monkeypatch):
    """Synthetic factors with ``min U = 5`` (offset ``Ox = 133``) and weights near 16,000:
    ``Ox sum_c W`` past ``2**24`` and odd."""
    rng = np.random.default_rng(1)
    u = torch.from_numpy(rng.integers(5, 261, (40, 1)).astype(np.float64))
    u[0, 0], u[1, 0] = 5, 260
    tabs = types.SimpleNamespace(u=u, u_is_value=False, lo_x=0)
    w = 16_000 - rng.integers(0, 255, (3, 1000))
    w[:, -1] -= (w.sum(1) + 1) % 2            # odd row sums
    const = rng.integers(-(1 << 40), 1 << 40, 3)
    _one_plane_case(tabs, w, const, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_row_sums_where_float32_would_round_and_in_half_precision(dtype):
    """Codes in the layer's dtype: float32 rows of 65,900 codes of 254-255 (within
    ``K * 254 < 2**24 <= K * 255``, odd sums past ``2**24``); bfloat16/float16 codes, whose
    own sums round from 256 on."""
    t = LutTables(LutFile(truncated(0), width_a=8, width_b=8, signed=False))
    if dtype == torch.float32:
        q = torch.full((2, 65_900), 255.0)
        q[:, 3] = 254.0
    else:
        q = torch.randint(0, 256, (3, 300), generator=torch.Generator().manual_seed(2)).to(dtype)
    want = q.double().numpy().astype(np.int64).sum(1)
    got = FU._exact_row_sums(q, FU._code_bound(t))
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float64))


def test_shifted_int8_rows_without_numba_and_strided(monkeypatch):
    """int8 rows without numba installed (``int8_loops`` then defines only ``AVAILABLE``),
    with numba switched off, and for a strided ``q``."""
    gen = torch.Generator().manual_seed(3)
    off = torch.randint(-300, 300, (6,), generator=gen).float()
    q = off.reshape(6, 1) + torch.randint(-128, 128, (6, 40), generator=gen).float()
    q[0, 0], q[1, 1] = off[0] - 128, off[1] + 127
    want = (q.long() - off.long().reshape(6, 1)).to(torch.int8)

    def check(qq, expect):
        got = FU._shifted_int8_rows(qq, off)
        assert got.dtype == torch.int8 and torch.equal(got, expect)

    check(q[:, ::2], want[:, ::2])
    with monkeypatch.context() as m:
        m.setenv("APPMULT_NO_NUMBA", "1")
        check(q, want)
    with monkeypatch.context() as m:
        m.setattr(FU, "loops", types.SimpleNamespace(AVAILABLE=False))
        m.setattr(FU.K.loops, "AVAILABLE", False)
        check(q, want)
