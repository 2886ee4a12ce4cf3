"""Shortcuts of the training step's weight side (issue 12): each must give the bits of the
general code it skips.

* ``LutTables.v_is_value``: a rank-1 LUT whose factors are ``value(x)`` and ``value(w)``
  (the exact product) folds its weights without a table look-up;
* ``fused._exact_row_sums``: row sums in float32 where that is exact (the weight codes' bound: ``_code_bound``);
* the per-channel weight range by ``amin``/``amax``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear, ApproxConv2d, WeightQuantizer
from appmult.nn import fused as FU
from appmult.nn.tables import LutTables
from test_nn_int8_gemm import truncated


def signed_exact(width=8):
    v = np.where(np.arange(1 << width) < (1 << (width - 1)), np.arange(1 << width), np.arange(1 << width) - (1 << width))
    return v[:, None] * v[None, :]


def tables(table, signed=False):
    return LutTables(LutFile(table, width_a=8, width_b=8, signed=signed))


def test_v_is_value_only_for_the_exact_product():
    assert tables(truncated(0)).v_is_value
    assert tables(signed_exact(), signed=True).v_is_value
    assert not tables(truncated(4)).v_is_value             # rank > 1
    scaled = truncated(0) * 3                               # rank 1, U = value(x), V = 3 value(w)
    t = tables(scaled)
    assert t.rank == 1 and t.u_is_value and not t.v_is_value


def _fold(layer, x, shape):
    with torch.no_grad():
        qw, sw, zw = layer.weight_quant(layer.weight)
        qx, sx, zx = layer.act_quant(x)
        return FU._folded_lowrank_weights(qw.reshape(shape), zx, zw, layer.lut, split_k=len(shape) == 4 and shape[2:] == (1, 1))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("signed", [False, True])
def test_fold_without_look_up_equals_the_look_up(kind, signed):
    table = signed_exact() if signed else truncated(0)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    torch.manual_seed(3)
    if kind == "linear":
        layer = ApproxLinear.from_float(torch.nn.Linear(40, 6), ApproxConfig(lut, kernel="lowrank"))
        x, shape = torch.randn(5, 40) + 0.3, (6, 40, 1, 1)
    else:
        layer = ApproxConv2d.from_float(torch.nn.Conv2d(3, 4, 3), ApproxConfig(lut, kernel="lowrank"))
        x, shape = torch.randn(2, 3, 7, 7) + 0.3, (4, 3, 3, 3)
    layer(x)
    assert layer.lut.v_is_value
    fast = _fold(layer, x, shape)
    layer.lut.v_is_value = False                            # the general path: V[w] by look-up
    slow = _fold(layer, x, shape)
    assert fast is not None and len(fast) == len(slow)
    for a, b in zip(fast, slow):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
        else:
            assert a == b


def test_fold_does_not_write_into_the_quantized_weights():
    torch.manual_seed(4)
    lut = LutFile(truncated(0), width_a=8, width_b=8, signed=False)
    layer = ApproxLinear.from_float(torch.nn.Linear(16, 3), ApproxConfig(lut, kernel="lowrank"))
    x = torch.randn(4, 16) + 0.5
    layer(x)
    with torch.no_grad():
        qw, sw, zw = layer.weight_quant(layer.weight)
        qx, sx, zx = layer.act_quant(x)
        assert (zw != 0).any()
        before = qw.clone()
        FU._folded_lowrank_weights(qw.reshape(3, 16, 1, 1), zx, zw, layer.lut)
    assert torch.equal(qw, before)


@pytest.mark.parametrize("k, big", [(300, False), (70_000, False), (70_000, True)])
def test_exact_row_sums(k, big):
    """Float32 below ``2**24`` partial sums, float64 beyond (here: 70,000 codes of 255)."""
    t = tables(truncated(0))
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(0, 256, (3, k), generator=gen).float()
    if big:
        q[:] = 255.0
    want = q.double().numpy().astype(np.int64).sum(1)
    got = FU._exact_row_sums(q, FU._code_bound(t))
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy().astype(np.int64), want)


def test_per_channel_range_with_nan_and_infinities():
    w = torch.randn(4, 9)
    w[1, 3] = float("nan")
    w[2, 0] = float("inf")
    s, z = WeightQuantizer(8, False).scale_zero_point(w)
    lo = torch.stack([r.min() for r in w])
    hi = torch.stack([r.max() for r in w])
    from appmult.nn.quant import _scale_zero_point
    s2, z2 = _scale_zero_point(lo, hi, 8, False)
    assert torch.equal(s.reshape(-1).isnan(), s2.isnan()) and torch.equal(s.reshape(-1).nan_to_num(), s2.nan_to_num())
    assert torch.equal(z.reshape(-1).nan_to_num(), z2.nan_to_num())
