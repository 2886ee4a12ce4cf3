"""Tests written for surviving mutants of ``fused._int8_value_prep`` (mutmut, session 7's code).

``_int8_value_prep`` prepares the exact product's int8 GEMM straight from the weight codes
(a training step's path, no fold). Its reference is the general path: ``_int8_linear_prep``
of ``_folded_lowrank_weights(..., split_k=True)``. Where that prep has one digit plane the
direct one must be the same tuple; where it is ``False`` or needs more planes the direct
one must be ``None`` (the caller then decides on the fold). Checked at the bounds of every
condition: the reduction length, the plane limit, operand widths of 9 bits, per-output
weight spans of 255/256, the constant's ``2**51`` bound, and ``k Zw`` above ``2**24``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import LutTables
from appmult.nn import fused as FU


def exact_tables(width_x: int, width_w: int, signed: bool = False) -> LutTables:
    """The exact product of ``width_x``- by ``width_w``-bit operands (``v_is_value``)."""
    def vals(w):
        v = np.arange(1 << w)
        return np.where(v < 1 << (w - 1), v, v - (1 << w)) if signed else v
    lut = LutFile(vals(width_x)[:, None] * vals(width_w)[None, :], width_a=width_x, width_b=width_w, signed=signed)
    tabs = LutTables(lut, kernel="lowrank")
    assert tabs.v_is_value
    return tabs


def fold_prep(qw, zx, zw, tabs):
    """The general path's prep: the fold's, or ``False``."""
    n, k = qw.shape
    fold = FU._folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, tabs, split_k=True)
    return False if fold is None else FU._int8_linear_prep(fold, tabs)


def check_against_the_fold(qw, zx, zw, tabs):
    """The direct prep applies exactly where the fold's has one plane (else ``None``) and
    then gives the fold's accumulators, equal to the brute-force sum ``sum_k (x - Zx)(w -
    Zw)`` (no zero points when signed), on random activation codes, with the numba epilogue
    and with the torch one; returns ``(direct, fold's prep)``."""
    direct = FU._int8_value_prep(qw, zx, zw, tabs)
    ref = fold_prep(qw, zx, zw, tabs)
    if ref is False or ref[-1] != 1:
        assert direct is None
        return direct, ref
    assert direct is not None and direct[-1] == 1 and direct[0].dtype == torch.int8
    n, k = qw.shape
    gen = torch.Generator().manual_seed(k)
    qx = torch.randint(tabs.lo_x, tabs.lo_x + tabs.prod.shape[0], (5, k), generator=gen).float()
    shift = (0.0, torch.zeros(n, 1, dtype=torch.float64)) if tabs.signed else \
        (float(zx), zw.double().reshape(-1, 1).expand(n, 1))
    want = ((qx.double() - shift[0]) @ (qw.double() - shift[1]).t()).float()
    for numba_on in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not numba_on:
                mp.setenv("APPMULT_NO_NUMBA", "1")
            for prep in (direct, ref):
                assert torch.equal(FU._int8_linear_acc(qx, prep, tabs), want)
    return direct, ref


def codes(n, k, lo, hi, seed):
    """``(n, k)`` float32 weight codes, row ``j`` spanning exactly ``[lo[j], hi[j]]``."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    q = lo.reshape(-1, 1) + torch.floor(torch.rand(n, k, generator=gen) * (hi - lo + 1).reshape(-1, 1))
    q[:, 0], q[:, 1] = lo, hi
    return q


def test_value_prep_at_the_reduction_length_bounds(monkeypatch):
    """``2 <= K <= INT8_GEMM_MAX_K``: both ends take the direct prep (the fold's tuple), one
    past the end does not (the limit lowered to keep the test small; both preps read it)."""
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_K", 300)
    tabs = exact_tables(8, 8)
    zx, zw = torch.tensor(37.0), torch.tensor([[12.0], [200.0]])
    for k in (2, 3, FU.INT8_GEMM_MAX_K, FU.INT8_GEMM_MAX_K + 1):
        qw = codes(2, k, [0, 40], [255, 250], seed=k)
        direct, ref = check_against_the_fold(qw, zx, zw, tabs)
        assert (direct is not None) == (k <= FU.INT8_GEMM_MAX_K), k


def test_value_prep_follows_the_plane_limit_and_int_mm(monkeypatch):
    """One digit plane is all the direct prep needs: it applies with ``INT8_GEMM_MAX_PLANES``
    1 and not with 0, nor without ``torch._int_mm``."""
    tabs = exact_tables(8, 8)
    qw, zx, zw = codes(3, 50, [0, 3, 9], [255, 99, 200], seed=1), torch.tensor(5.0), torch.tensor(17.0)
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", 1)
    assert check_against_the_fold(qw, zx, zw, tabs)[0] is not None
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", 0)
    assert check_against_the_fold(qw, zx, zw, tabs)[0] is None
    monkeypatch.undo()
    assert check_against_the_fold(qw, zx, zw, tabs)[0] is not None
    monkeypatch.delattr(torch, "_int_mm")
    assert FU._int8_value_prep(qw, zx, zw, tabs) is None


@pytest.mark.parametrize("width_x, width_w, signed", [(8, 9, False), (9, 8, False), (9, 8, True)])
def test_value_prep_with_nine_bit_operands(width_x, width_w, signed):
    """9-bit activations (``U`` spans 511: no int8 factors) never take it; 9-bit weights take
    it exactly where every output's weights span at most 255 (one plane), whatever the
    outputs' offsets from each other; an output spanning 256 or more needs two planes."""
    tabs = exact_tables(width_x, width_w, signed)
    lo_w, hi_w = tabs.lo_w, tabs.lo_w + tabs.prod.shape[1] - 1
    zx = torch.tensor(0.0 if signed else 21.0)
    zw = torch.zeros(()) if signed else torch.tensor([[3.0], [200.0], [150.0]])
    k = 40
    spans = {"offset rows": ([lo_w, hi_w - 200, lo_w + 100], [lo_w + 200, hi_w, lo_w + 300]),
             "one row spans 256": ([lo_w, lo_w, hi_w - 10], [lo_w + 255, lo_w + 256, hi_w]),
             "one row spans 300": ([lo_w, lo_w + 50, lo_w], [lo_w + 100, lo_w + 350, lo_w + 255])}
    gen = torch.Generator().manual_seed(width_x)
    lo_x = tabs.lo_x
    qx = (lo_x + torch.randint(0, tabs.prod.shape[0], (4, k), generator=gen)).float()
    for name, (lo, hi) in spans.items():
        lo = [max(lo_w, min(v, hi_w)) for v in lo]
        hi = [max(lo_w, min(v, hi_w)) for v in hi]
        qw = codes(3, k, lo, hi, seed=len(name))
        direct, ref = check_against_the_fold(qw, zx, zw, tabs)
        one_plane = width_x == 8 and max(h - l for l, h in zip(lo, hi)) <= 255
        assert (direct is not None) == one_plane, name
        if direct is not None:  # and its accumulator is the exact one
            x, w = qx.double(), qw.double()
            want = (x - float(zx)) @ (w - zw.double().reshape(-1, 1)).t()
            got = FU._int8_linear_acc(qx, direct, tabs)
            assert torch.equal(got, want.float())


@pytest.mark.parametrize("per_channel", [True, False])
def test_value_prep_shifts_row_sums_by_k_zw_exactly(per_channel):
    """``sum_k (w - Zw) = sum_k w - K Zw`` with ``K Zw`` an odd integer above ``2**24``
    (float32 zero points, as the quantizers make them): exact, as in the fold."""
    tabs = exact_tables(8, 8)
    k = 70001                                    # 70001 * 255 = 17,850,255 > 2**24, odd
    qw = codes(2, k, [0, 1], [255, 250], seed=3)
    zw = torch.tensor([[255.0], [253.0]]) if per_channel else torch.tensor(255.0)
    assert zw.dtype == torch.float32
    direct, ref = check_against_the_fold(qw, torch.tensor(9.0), zw, tabs)
    assert direct is not None
    want = qw.double().sum(1) - k * zw.double().reshape(-1)      # sum_k (w - Zw), exact
    assert torch.equal(direct[1], -9.0 * want + direct[3] * want)


@pytest.mark.parametrize("row_sum, applies", [(1900, True), (2047, True), (2048, False), (4000, False)])
def test_value_prep_at_the_constant_bound(row_sum, applies):
    """The constant ``C = -Zx sum_k (w - Zw)`` must stay below ``2**51`` (as in the fold's
    prep): with ``Zx = 2**40`` (a zero point ``approx_linear`` accepts), row sums around
    ``2**11`` put ``|C|`` on either side of the bound, ``2**51`` itself excluded."""
    tabs = exact_tables(8, 8)
    k = 16
    qw = torch.full((2, k), float(row_sum // k))
    qw[0, : row_sum % k] += 1                                     # row 0 sums to row_sum
    assert int(qw[0].sum()) == row_sum and int(qw[1].sum()) <= row_sum
    zx = torch.tensor(float(2 ** 40))
    direct, ref = check_against_the_fold(qw, zx, torch.tensor(0.0), tabs)
    assert (direct is not None) == applies


def test_value_prep_makes_int8_weights_from_in_range_differences_only(monkeypatch):
    """The int8 weights are ``w - (lo_w + 128)`` (an 8-bit weight side; else ``w - (min_j w +
    128)``), every difference in ``[-128, 127]``
    (what ``_shifted_int8_rows`` requires: converting anything else to int8 is undefined
    behaviour, which happens to wrap on x86 and would hide an offset off by 256)."""
    seen = []
    real = FU._shifted_int8_rows

    def spy(q, off):
        d = q.double() - off.double().reshape(-1, 1)
        seen.append((float(d.min()), float(d.max())))
        return real(q, off)

    monkeypatch.setattr(FU, "_shifted_int8_rows", spy)
    tabs = exact_tables(8, 8)
    qw = codes(3, 64, [0, 10, 100], [255, 20, 101], seed=5)
    direct, ref = check_against_the_fold(qw, torch.tensor(4.0), torch.tensor([[0.0], [7.0], [255.0]]), tabs)
    assert direct is not None and seen
    for lo, hi in seen:
        assert -128 <= lo and hi <= 127
