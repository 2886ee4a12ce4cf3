"""Edges of the low-rank fold (``fused._folded_lowrank_weights``) that the wide-conv tests do
not reach (mutation-testing gaps of session 11):

* non-integer zero points: the fold's exactness rests on integer weights, shifts and
  constants, so it is refused (``None``, the caller takes the unfused path) when either zero
  point is not an integer -- the activation's alone, the weight's alone (per tensor or one
  channel of a per-channel ``Zw``) -- and kept when both are;
* a LUT factor value of ``2**24 - 1`` (the largest integer magnitude the float32 fold takes;
  here with no zero-point shift): a conv too long for one exact float32 conv is still cut
  into runs of input channels (exact), not left to the unfused path, which may round;
* an empty reduction (``K = 0``): the fold of a linear layer with no inputs is empty weights
  and a zero constant, and ``approx_linear`` returns the bias, as the unfused path does (an
  empty sum is 0). The bound of the weights' own sums (``_channel_sums``) is read only for
  a layer the worst case rejects, never for this one.

References: the documented return values, the unfused path
(``functional._FUSED_LOWRANK = False``), a numpy brute force (``brute_conv_acc``), and the
exact sum (0 for ``K = 0``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import LutTables, approx_conv2d, approx_linear
from appmult.nn import fused as FU
from appmult.nn import kernels as K
from test_nn_split_k import truncated
from test_nn_wide_conv_fold import brute_conv_acc, fused_lowrank, lowrank_tables


def _codes(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float()


@pytest.mark.parametrize("columns", [0, 4])            # rank 1 (U = value(x)) and a rank-5 LUT
def test_fold_refuses_non_integer_zero_points(columns):
    tabs = lowrank_tables(truncated(columns))
    qw = _codes((3, 2, 3, 3), seed=columns)
    zw_int = torch.tensor([[[[3.0]]], [[[100.0]]], [[[0.0]]]])
    # both integer: folded (a small layer, far below 2**24)
    fold = FU._folded_lowrank_weights(qw, torch.tensor(2.0), zw_int, tabs)
    assert fold is not None and len(fold) == 2
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.0), torch.tensor(7.0), tabs) is not None
    # the activation's zero point alone non-integer
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.5), zw_int, tabs) is None
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.5), torch.tensor(7.0), tabs) is None
    # the weight's alone: per tensor, and one channel of a per-channel Zw
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.0), torch.tensor(7.5), tabs) is None
    zw_one = zw_int.clone()
    zw_one[1] = 100.25
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.0), zw_one, tabs) is None
    # the same for the conv's chunks and the linear layer's split_k forms
    assert FU._folded_lowrank_weights(qw, torch.tensor(2.5), zw_int, tabs, chunks=True) is None
    assert FU._folded_lowrank_weights(qw.reshape(3, -1, 1, 1), torch.tensor(2.0), zw_one, tabs,
                                      split_k=True) is None


@pytest.mark.parametrize("columns", [0, 4])
def test_empty_reduction_folds_to_nothing_and_returns_the_bias(columns):
    tabs = lowrank_tables(truncated(columns))
    zx, zw = torch.tensor(3.0), torch.tensor(5.0)
    fold = FU._folded_lowrank_weights(torch.zeros(2, 0, 1, 1), zx, zw, tabs, split_k=True)
    assert fold is not None
    wv, const, kc = fold
    assert wv.shape == (2, 0, 1, 1) and kc == 0
    assert const.dtype == torch.float32 and torch.equal(const, torch.zeros(2))
    one = torch.tensor(1.0)
    bias = torch.tensor([1.5, -2.0])
    qx, qw = torch.zeros(3, 0), torch.zeros(2, 0)
    want = bias.expand(3, 2)
    for cache in (None, {}):
        y = approx_linear(qx, one, zx, qw, one, zw, bias, tabs, cache=cache)
        assert y.shape == (3, 2) and torch.equal(y, want)
    with fused_lowrank(False):
        assert torch.equal(approx_linear(qx, one, zx, qw, one, zw, bias, tabs), want)


def test_factor_value_just_below_two_to_the_24_still_folds_and_cuts_into_runs():
    """``LUT[x, w] = x f(w)`` (8-bit ``x``, 4-bit ``w``) with ``f(15) = 2**24 - 1``: rank 1,
    ``U = value(x)``, the largest ``|V|`` is ``2**24 - 1`` -- still an exact float32 value, so
    the fold stands. With ``Zw = 0`` (no shift) and weights that avoid code 15, the weights'
    own bound (``255 * sum |w|``) passes ``2**24``: the conv is cut into runs, and its
    accumulator (above ``2**24``, rounded once to float32) is the brute force's."""
    f = np.arange(16, dtype=np.int64)
    f[15] = K.FP32_EXACT_LIMIT - 1
    table = np.arange(256, dtype=np.int64)[:, None] * f[None, :]
    tabs = LutTables(LutFile(table, width_a=8, width_b=4, signed=False), grad="ste", kernel="lowrank")
    assert tabs.u_is_value and max(abs(float(tabs._v_max.max())), abs(float(tabs._v_min.min()))) == 2 ** 24 - 1
    g = torch.Generator().manual_seed(0)
    cg = 528                                                # K = 4752, 255 * 14 * K > 2**24
    qw = torch.full((2, cg, 3, 3), 14.0)
    qw[1] = torch.randint(12, 15, (cg, 3, 3), generator=g).float()
    qx = torch.full((1, cg, 3, 3), 255.0)
    qx[0, ::7] = 253.0
    zx, zw, one = torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0)
    fold = FU._folded_lowrank_weights(qw, zx, zw, tabs, chunks=True)
    assert fold is not None and len(fold) == 3 and fold[2] >= 2       # cut into runs
    assert FU._folded_lowrank_weights(qw, zx, zw, tabs) is None          # one conv would not be exact
    y = approx_conv2d(qx, one, zx, qw, one, zw, None, tabs)
    acc = brute_conv_acc(table, qx, 0.0, qw, torch.zeros(2), 0, False)
    assert acc.max() >= 2 ** 24
    assert torch.equal(y, torch.from_numpy(acc.astype(np.float32)))
