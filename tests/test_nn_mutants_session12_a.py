"""Mutation review, session 12 (a): the rank-1 mapped path (DRUM-like LUTs) and its caller.

``fused._rank1_mapped_prep`` / ``_rank1_mapped_conv`` / ``_group_sums`` / ``_window_sums`` /
``_mapped_codes`` and the mapped branch of ``functional._fused_conv_acc``. References: the
numpy brute force of the accumulator (``test_nn_wide_conv_fold.brute_conv_acc``: one look-up
per product, cross terms, int64), read through ``approx_conv2d`` with unit scales and no
bias (its output is then the float32 accumulator); a plain convolution and a plain
look-up; the documented exactness bounds of the prep, recomputed here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.lut_gen import LutFile
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn.tables import LutTables
from test_nn_rank1_mapped_conv import drum
from test_nn_wide_conv_fold import brute_conv_acc

ONE = torch.tensor(1.0)


def tables(table: np.ndarray, width_w: int = 8) -> LutTables:
    return LutTables(LutFile(table, width_a=8, width_b=width_w, signed=False), kernel="lowrank")


def operands(seed: int, n: int = 2, cin: int = 4, cout: int = 5, k: int = 3, h: int = 7):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(0, 256, (n, cin, h, h), generator=g).float()
    qw = torch.randint(0, 256, (cout, cin, k, k), generator=g).float()
    return qx, qw


def acc(qx, qw, zx: float, zw, tabs, cache=None):
    """The float32 accumulator, as ``approx_conv2d`` returns it with unit scales and no bias."""
    return FN.approx_conv2d(qx, ONE, torch.tensor(float(zx)), qw, ONE, zw, None, tabs, cache=cache)


def want(table, qx, qw, zx: float, zw):
    zwv = zw.reshape(-1).expand(qw.shape[0])
    return torch.from_numpy(brute_conv_acc(table, qx, float(zx), qw, zwv, 0, False).astype(np.float32))


@pytest.mark.parametrize("zx, zw", [(1.0, torch.tensor([3.0, 0.0, 7.0, 1.0, 2.0])),   # Zx = 1
                                    (5.0, torch.tensor(1.0)),                         # every Zw = 1
                                    (0.0, torch.tensor([2.0, 0.0, 0.0, 1.0, 9.0]))])
def test_mapped_accumulator_with_weight_zero_points_is_the_brute_force(zx, zw):
    """The ``- Zw_j S`` term (window sums of ``x - Zx``) for any ``Zx``, any non-zero ``Zw``
    (also all ones), both through ``approx_conv2d`` and from ``_rank1_mapped_conv`` itself."""
    table = drum()
    tabs = tables(table)
    qx, qw = operands(1)
    ref = want(table, qx, qw, zx, zw)
    assert torch.equal(acc(qx, qw, zx, zw, tabs), ref)
    prep = FU._rank1_mapped_prep(qw, torch.tensor(zx), zw, tabs)
    assert prep is not False and prep[3] is not None
    got = FU._rank1_mapped_conv(qx, torch.tensor(zx), prep, tabs, (0, 0), (1, 1), (1, 1), 1, torch.float32)
    assert got is not None and torch.equal(got, ref)


def test_activation_zero_point_outside_the_table_takes_the_plain_path():
    """Without padding ``approx_conv2d`` takes a ``Zx`` past the last activation code (no
    code is looked up for it); the mapped prep refuses it (no ``U[Zx]``) and the plain path
    gives the brute force."""
    table = drum()
    tabs = tables(table)
    qx, qw = operands(2)
    zw = torch.tensor(4.0)
    assert FU._rank1_mapped_prep(qw, torch.tensor(256.0), zw, tabs) is False
    assert torch.equal(acc(qx, qw, 256.0, zw, tabs), want(table, qx, qw, 256.0, zw))


def test_cached_mapped_prep_is_kept_once_per_lut_and_activation_zero_point(monkeypatch):
    """A weight-side cache holds one mapped prep per (LUT, ``Zx``): a repeated call reuses
    it, another ``Zx`` or another LUT with the same weights gets its own."""
    calls = []
    real = FN._rank1_mapped_prep
    monkeypatch.setattr(FN, "_rank1_mapped_prep", lambda *a: calls.append(1) or real(*a))
    t4, t3 = drum(k=4), drum(k=3)
    tabs4, tabs3 = tables(t4), tables(t3)
    qx, qw = operands(3)
    zw = torch.tensor([1.0, 4.0, 0.0, 2.0, 3.0])
    cache = {}
    for table, tabs, zx in [(t4, tabs4, 3.0), (t4, tabs4, 3.0), (t4, tabs4, 9.0), (t3, tabs3, 9.0)]:
        assert torch.equal(acc(qx, qw, zx, zw, tabs, cache), want(table, qx, qw, zx, zw))
    assert len(calls) == 3


def test_constant_term_is_exact_where_zx_times_the_weight_sum_is_not_a_float32():
    """``C_j = U[Zx] sum V[w] - Zx sum w`` in float64: here (a LUT that ignores the
    activation, ``U = 1``, ``V = 255 w``, ``Zx = 255``) both products are near ``2**24``
    and odd, their difference 0; the accumulator is 0."""
    table = np.outer(np.ones(256, np.int64), 255 * np.arange(256))
    tabs = tables(table)
    qx = torch.randint(0, 256, (1, 29, 3, 3), generator=torch.Generator().manual_seed(4)).float()
    qw = torch.full((1, 29, 3, 3), 255.0)            # sum w = 66555: 255 * 66555 is odd, above 2**24
    zw = torch.tensor(0.0)
    assert FU._rank1_mapped_prep(qw, torch.tensor(255.0), zw, tabs) is not False   # the mapped path runs
    assert torch.equal(acc(qx, qw, 255.0, zw, tabs), want(table, qx, qw, 255.0, zw))


def test_main_bound_counts_the_constant_term():
    """The main convolution is taken only while ``sum_k |V[w]| max|U - U[Zx]| + |C_j|``
    stays below ``2**24``. DRUM(4), ``Zx = 128`` (``U[Zx] = 144``, ``max|U - U[Zx]| = 144``)
    and weights 128 (``V = 144``): per input ``144 * 144 + (144 * 144 - 128 * 128) = 25088``,
    so 668 inputs are taken and 669 refused."""
    tabs = tables(drum())
    zx, zw = torch.tensor(128.0), torch.zeros(2)
    assert FU._rank1_mapped_prep(torch.full((2, 668, 1, 1), 128.0), zx, zw, tabs) is not False
    assert FU._rank1_mapped_prep(torch.full((2, 669, 1, 1), 128.0), zx, zw, tabs) is False


def test_zw_term_bound_uses_the_activation_codes_distance_from_zx():
    """``K max|x - Zx| max|Zw|`` with ``x`` over the activation codes (0-255), not the
    weight codes: an 8-bit x 4-bit LUT, ``K = 488 * 9``, ``max|Zw| = 15``. ``Zx = 0``:
    ``4392 * 255 * 15 >= 2**24``, refused; ``Zx = 100``: ``4392 * 155 * 15`` below, taken."""
    table = np.outer(drum()[:, 1], np.arange(16))   # U = DRUM(4) of x, V = w
    tabs = tables(table, width_w=4)
    qw = torch.zeros(2, 488, 3, 3)
    zw = torch.tensor([15.0, 1.0])
    assert FU._rank1_mapped_prep(qw, torch.tensor(0.0), zw, tabs) is False
    prep = FU._rank1_mapped_prep(qw, torch.tensor(100.0), zw, tabs)
    assert prep is not False and prep[3] is not None


def test_mapped_codes_of_a_channels_last_tensor():
    """A non-contiguous (channels-last) code tensor is looked up like any other, and a
    channels-last input gives the brute-force accumulator."""
    table = drum()
    tabs = tables(table)
    qx, qw = operands(5)
    cl = qx.to(memory_format=torch.channels_last)
    lut = torch.arange(256, dtype=torch.float32) * 3 - 100
    assert torch.equal(FU._mapped_codes(cl, lut, 0), lut[qx.long()])
    zw = torch.tensor([1.0, 4.0, 0.0, 2.0, 3.0])
    assert torch.equal(acc(cl, qw, 6.0, zw, tabs), want(table, qx, qw, 6.0, zw))


def test_window_sums_keep_the_sums_dtype_and_device_against_torch_defaults():
    """The box filter's ones are made in the sums' dtype on their device, whatever torch's
    defaults (shown on a CPU with a float64 default dtype and the ``meta`` default device)."""
    q = torch.randint(0, 256, (2, 6, 8, 7), generator=torch.Generator().manual_seed(6)).float()
    sums = FU._group_sums(q, 3.0, 2)
    ref = F.conv2d(q - 3.0, torch.ones(2, 3, 3, 2), None, (2, 1), (1, 1), (1, 2), 2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            got = FU._window_sums(sums, (3, 2), (1, 1), (2, 1), (1, 2))
    finally:
        torch.set_default_dtype(previous)
    assert got.device == sums.device and got.dtype == torch.float32 and torch.equal(got, ref)
