"""Tests written for surviving mutants of :mod:`appmult.nn.shuffle_gather` (mutmut, the byte-shuffle drivers).

The layers' byte-shuffle paths against independent references: numpy brute-force sums of
``table[x, w]`` and the zero-point cross terms in int64; the planes cache by the identity
of what it returns (a hit returns the planes it made, a write or an eviction makes new
ones; at most 32 tables, the oldest dropped first); the span limit of the 16-bit planes;
an int8 table; activations of another float dtype; ``lo_x = 1``; the conv's choice of
layout (batch-inner for a batch of a multiple of 64 or 256 or more, unfolded otherwise);
a start value outside int32 that the final value brings back (the documented int32 wrap).
Each test's docstring names the mutants it was written for.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from appmult.nn import byte_shuffle
from appmult.nn import kernels as K
from appmult.nn import shuffle_gather as SG
from appmult.nn import offset_tables as OT
from conftest import exact as msg

pytestmark = [pytest.mark.skipif(not byte_shuffle.available(), reason="needs numba and an AVX-512 VBMI CPU"),
              pytest.mark.usefixtures("one_torch_thread", "shuffle_always")]

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def forward_ref(a: np.ndarray, b: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``out[n, j, i] = sum_k table[a[n, k, i], b[j, k]]`` in int64 (one group)."""
    t = table.astype(np.int64)
    return t[a[:, None, :, :], b[None, :, :, None]].sum(2)


def conv_ref(q: torch.Tensor, lo_x: int, iw: np.ndarray, lo_w: int, table: np.ndarray, kernel_size, padding,
             stride, dilation, zx: int, zw, pad_value: int) -> np.ndarray:
    """``sum_k T[x - lo_x, w] - x Zw_j - Zx (w + lo_w) + Zx Zw_j`` over each receptive field, int64.

    ``iw``: ``(Co, C*kh*kw)`` weight indices in :func:`torch.nn.functional.unfold` order."""
    n, _, h, w = q.shape
    kh, kw = kernel_size
    qp = torch.nn.functional.pad(q.to(torch.float64), (padding[1],) * 2 + (padding[0],) * 2, value=float(pad_value))
    x = torch.nn.functional.unfold(qp, (kh, kw), dilation=dilation, stride=stride).to(torch.int64).numpy()  # (N, K, L)
    t = table.astype(np.int64)
    co = iw.shape[0]
    zwv = np.broadcast_to(np.asarray(0 if zw is None else zw, np.int64).reshape(-1), (co,))
    out = np.zeros((n, co, x.shape[2]), np.int64)
    for j in range(co):
        wj = iw[j].astype(np.int64)[None, :, None]
        out[:, j, :] = (t[x - lo_x, wj] - x * zwv[j] - zx * (wj + lo_w) + zx * zwv[j]).sum(1)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return out.reshape(n, co, ho, -1)


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty planes cache for the test (the module's own is put back afterwards)."""
    cache = collections.OrderedDict()
    monkeypatch.setattr(OT, "_cache", cache)
    return cache


# -- table_planes: the cache ------------------------------------------------------------------------


def test_table_planes_are_made_once_per_table_and_version(fresh_cache):
    """A second call on the same, unchanged table returns the planes the first made (the
    cache hit); a write to the table makes new ones. Mutants: ``x_table_planes`` 1 (no
    look-up), 2 and 3 (the key ``None`` / ``id(None)``), 29 (``None`` stored), 30 (stored
    under ``id(None)``)."""
    rng = np.random.default_rng(1)
    table = torch.from_numpy(rng.integers(-500, 3000, (256, 256))).to(torch.int32)
    first, lo = SG.table_planes(table, 10)
    assert lo == int(table.min())
    again, lo2 = SG.table_planes(table, 10)
    assert again is first and lo2 == lo
    assert SG.table_planes(table, 7)[0] is first  # kg changes the overflow check, not the planes
    table += 1
    after, lo3 = SG.table_planes(table, 10)
    assert after is not first and lo3 == lo + 1
    np.testing.assert_array_equal(after, first)  # (table + 1) - (min + 1): the same offsets
    assert SG.table_planes(table, 10)[0] is after


def test_table_planes_cache_holds_32_tables_and_drops_the_oldest(fresh_cache):
    """Up to ``offset_tables.CACHE_SIZE`` (32) tables stay cached; the 33rd drops the first one
    cached (not the newest). Mutants: ``x_table_planes`` 31 (``>=``: only 31 kept), 33
    (``popitem(last=True)``: drops the table just cached)."""
    assert OT.CACHE_SIZE == 32
    tables = [torch.full((4, 4), i, dtype=torch.int32) + torch.arange(16, dtype=torch.int32).view(4, 4)
              for i in range(33)]  # kept alive: no id is reused
    made = [SG.table_planes(t, 3)[0] for t in tables[:32]]
    assert len(fresh_cache) == 32
    assert all(SG.table_planes(t, 3)[0] is p for t, p in zip(tables[:32], made))  # all 32 still cached
    newest = SG.table_planes(tables[32], 3)[0]
    assert len(fresh_cache) == 32
    assert SG.table_planes(tables[32], 3)[0] is newest                           # the newest is kept
    assert all(SG.table_planes(t, 3)[0] is p for t, p in zip(tables[1:32], made[1:]))
    assert SG.table_planes(tables[0], 3)[0] is not made[0]                      # the oldest was dropped


# -- table_planes: the span of the 16-bit planes ------------------------------------------------------


@pytest.mark.parametrize("lo, hi, fits", [
    (-70000, 0, False), (-1, (1 << 16) - 1, False), (-40000, 30000, False), (0, (1 << 16) - 1, True),
    (-30000, 35535, True),
])
def test_table_planes_refuse_a_span_of_2_16_or_more(fresh_cache, lo, hi, fits):
    """Planes only where ``max - min < 2**16``, whatever the sign of the entries (a table of
    negative entries spanning more than that must take the scalar loops, with exact sums).
    Mutant: ``x_table_planes`` 15 (``hi + lo``)."""
    rng = np.random.default_rng(hi - lo)
    t = rng.integers(lo, hi + 1, (256, 256))
    t[0, 0], t[255, 255] = lo, hi
    table = torch.from_numpy(t).to(torch.int32)
    got = SG.table_planes(table, 5)
    assert (got is not None) == fits
    a = rng.integers(0, 256, (2, 5, 64))
    a[0, :, 0], a[1, :, 0] = 0, 255
    b = rng.integers(0, 256, (3, 5))
    b[0], b[1] = 0, 255
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), table, 1, torch.int32)
    np.testing.assert_array_equal(out.numpy(), forward_ref(a, b, t))


def test_int8_table_offsets_do_not_wrap(fresh_cache):
    """An int8 table spanning ``-128 .. 127`` (an integer table: :func:`K.gather_conv_zp`
    takes any): the offsets ``entry - min`` reach 255, beyond int8, and must not wrap.
    Mutant: ``x_table_planes`` 24 (``table - min`` in the table's own dtype)."""
    rng = np.random.default_rng(24)
    t = rng.integers(-128, 128, (256, 256))
    t[0, 0], t[255, 255] = -128, 127
    table = torch.from_numpy(t).to(torch.int8)
    planes, lo = SG.table_planes(table, 6)
    assert lo == -128
    full = (t.T + 128).astype(np.int64)  # [w, x] offsets, 0 .. 255: low bytes only
    np.testing.assert_array_equal(planes[:, :256], full)
    assert not planes[:, 256:].any()
    q = torch.from_numpy(rng.integers(0, 256, (3, 1, 4, 5))).to(torch.float32)
    q[0, 0, 0, :2] = torch.tensor([0.0, 255.0])
    iw = rng.integers(0, 256, (4, 6))
    iw[0, :2] = [0, 255]
    got = K.gather_conv_zp(q, 0, torch.from_numpy(iw), 0, table, 1, (2, 3), (0, 0), (1, 1), (1, 1), 0, None)
    assert got is not None
    ref = conv_ref(q, 0, iw, 0, t, (2, 3), (0, 0), (1, 1), (1, 1), 0, None, 0)
    np.testing.assert_array_equal(got.numpy(), ref)


# -- linear_zp ---------------------------------------------------------------------------------------


def linear_ref(q: np.ndarray, lo_x: int, iw: np.ndarray, lo_w: int, table: np.ndarray, zx: int, zw) -> np.ndarray:
    """``acc[m, j] = sum_k T[x - lo_x, w] - x Zw_j - Zx (w + lo_w) + Zx Zw_j`` in int64."""
    x = q.astype(np.int64)
    t = table.astype(np.int64)
    zwv = np.broadcast_to(np.asarray(zw, np.int64).reshape(-1), (iw.shape[0],))
    w = iw.astype(np.int64)
    return (t[x[:, None, :] - lo_x, w[None, :, :]] - x[:, None, :] * zwv[None, :, None]
            - zx * (w[None, :, :] + lo_w) + zx * zwv[None, :, None]).sum(2)


def test_linear_zp_activation_values_from_one():
    """``lo_x = 1`` (activation values ``1 .. NA``): the indices are ``value - 1``; only
    ``lo_x = 0`` may skip the subtraction. Mutant: ``x_linear_zp`` 17 (skips it for
    ``lo_x == 1``)."""
    rng = np.random.default_rng(17)
    na, nb, k, n, m = 200, 256, 40, 5, 3
    table = rng.integers(-3000, 3000, (na, nb))
    iw = rng.integers(0, nb, (n, k))
    zw = rng.integers(-3, 4, n)
    q = rng.integers(1, na + 1, (m, k))
    q[0, :2] = [1, na]
    prep = K.gather_linear_prep(torch.from_numpy(iw), 0, torch.from_numpy(table).to(torch.int32), 1, 2, zw)
    assert prep is not None
    got = K.gather_linear_zp(torch.from_numpy(q).to(torch.float32), 1, prep)
    np.testing.assert_array_equal(got.numpy(), linear_ref(q, 1, iw, 0, table, 2, zw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_zp_row_sums_exact_for_half_activations(dtype):
    """Activations in a 16-bit float dtype (integer values up to 255 are exact there, the
    layer's ``_gather_linear_zp`` takes any float dtype): the ``Zw`` term's row sums
    (~38,000, far past 16-bit float precision) are summed exactly. Mutants: ``x_linear_zp`` 31
    (``dtype=None``), 33 (no dtype: the row sum in the activations' dtype)."""
    rng = np.random.default_rng(31)
    k, n, m = 300, 4, 6
    table = rng.integers(0, 5000, (256, 256))
    iw = rng.integers(0, 256, (n, k))
    zw = np.array([1, -2, 3, 0])
    q = rng.integers(0, 256, (m, k))
    prep = K.gather_linear_prep(torch.from_numpy(iw), 0, torch.from_numpy(table).to(torch.int32), 0, 5, zw)
    assert prep is not None
    got = K.gather_linear_zp(torch.from_numpy(q).to(dtype), 0, prep)
    np.testing.assert_array_equal(got.numpy(), linear_ref(q, 0, iw, 0, table, 5, zw))


def test_linear_zp_row_sums_outside_int32_wrap_back():
    """Activation values near ``2**20`` (a zero point there): the constant ``K base + K Zx Zw``
    and the rows' sums of values lie outside int32, the final values inside it; every term
    wraps in int32 like the kernel's sums (the docstring's promise), so the result is exact.
    Mutants: ``x_linear_zp`` 28 and 29 (the row sums through float64: a sum outside int32
    is cast to ``INT32_MIN`` instead of wrapping)."""
    rng = np.random.default_rng(28)
    k, m, lo_x = 2560, 5, 1 << 20
    zx = lo_x + 128
    table = rng.integers(-700, 700, (256, 1))       # [x, w]: one weight value, 0 (lo_w = 0)
    base = int(table.min())
    t16 = (table.T - base).astype(np.uint16)        # [w, x]
    bi = np.zeros((4, k), np.uint8)
    zwv = np.array([1, -1, 2, 0], np.int64)
    const = k * base + k * zx * zwv                 # K base - Zx sum_k value(w) + K Zx Zw_j
    q = rng.integers(lo_x, lo_x + 256, (m, k))
    assert (q.sum(1) > I32_MAX).all() and (np.abs(const[:3]) > I32_MAX).all()
    got = SG.linear_zp(torch.from_numpy(q).to(torch.float32), lo_x, bi, const, zwv, byte_shuffle.planes(t16))
    ref = linear_ref(q, lo_x, bi, 0, table, zx, zwv)
    assert (np.abs(ref) <= I32_MAX).all()
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), ref)


# -- conv_zp -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch_inner", [
    (1, False), (3, False), (63, False), (64, True), (65, False), (128, True), (255, False), (256, True),
    (257, True), (300, True),
])
def test_conv_zp_takes_the_documented_layout(monkeypatch, n, batch_inner):
    """The batch-inner layout (receptive fields read in place, no unfold) for a batch of a
    multiple of 64 images or of 256 or more, the unfolded one otherwise; both exact (the
    result's strides follow the layout). Mutants: ``x_conv_zp`` 14 (never batch-inner), 15
    (``and``), 16 (``n / 64 == 0``), 17 (``!=``), 18 (``n % 64 == 1``), 20 (``n >= 4 / 64``),
    21 (``n >= 5 * 64``)."""
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(SG, name, wrapped)
    spy("batch_inner_fields", SG.batch_inner_fields)
    spy("unfold_uint8_kp", SG.unfold_uint8_kp)
    rng = np.random.default_rng(n)
    c, h, w, co = 2, 4, 3, 3
    table = rng.integers(-20000, 20000, (256, 256))
    q = torch.from_numpy(rng.integers(0, 256, (n, c, h, w))).to(torch.float32)
    iw = rng.integers(0, 256, (co, c * 2 * 2))
    zw = np.array([1, 0, -2])
    got = K.gather_conv_zp(q, 0, torch.from_numpy(iw), 0, torch.from_numpy(table).to(torch.int32), 1, (2, 2),
                           (1, 0), (1, 1), (1, 1), 3, zw)
    assert calls == (["batch_inner_fields"] if batch_inner else ["unfold_uint8_kp"])
    np.testing.assert_array_equal(got.numpy(), conv_ref(q, 0, iw, 0, table, (2, 2), (1, 0), (1, 1), (1, 1), 3, zw, 3))


@pytest.mark.parametrize("n", [2, 64])
def test_conv_zp_start_value_outside_int32_wraps_back(fresh_cache, n):
    """The start value ``K base + K Zx Zw - Zx sum_k value(w)`` may lie outside int32 where
    the final value does not ("all terms wrap in int32 like the kernel's sums"): here
    ``-2**31 - 2048`` (Zx = 1, weights of value ``2**20 + 2``, K = 2048), brought back into
    int32 by the table sums. Mutant: ``x_conv_zp`` 81 (the weight sums in float64: a start
    value outside int32 is cast to ``INT32_MIN``)."""
    rng = np.random.default_rng(81)
    kg, lo_w, zx = 2048, (1 << 20) + 2, 1
    t = np.repeat(np.arange(1, 257, dtype=np.int64)[:, None], 256, 1)   # T[x, w] = x + 1: min 1
    table = torch.from_numpy(t).to(torch.int32)
    shuffle = SG.table_planes(table, kg)
    assert shuffle is not None and shuffle[1] == 1
    q = torch.from_numpy(rng.integers(128, 256, (n, kg, 1, 1))).to(torch.float32)
    b = torch.zeros((2, kg), dtype=torch.int64)
    b[1, :5] = 1  # same table column: value(w) = lo_w + 1 for five steps
    zwv = np.zeros(2, np.int64)
    start = kg * 1 - zx * (kg * lo_w + np.array([0, 5]))
    assert (start < I32_MIN).all()
    got = SG.conv_zp(q, 0, 256, b, lo_w, shuffle, (1, 1), (0, 0), (1, 1), (1, 1), zx, zwv, 0)
    ref = conv_ref(q, 0, b.numpy(), lo_w, t, (1, 1), (0, 0), (1, 1), (1, 1), zx, zwv, 0)
    assert (ref >= I32_MIN).all() and (ref <= I32_MAX).all()
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), ref)


# -- table_planes: the bound on kg offset entries ------------------------------------------------------


@pytest.mark.parametrize("lo", [1, -1])
def test_table_planes_refuse_kg_offset_sums_from_2_31(fresh_cache, lo):
    """``kg`` offset entries of span ``max - min`` must sum below ``2**31`` (the int32
    accumulators, as :func:`K._table16`): a span of ``2**15`` gives planes for
    ``kg = 2**16 - 1`` and ``None`` from ``kg = 2**16`` (also between ``2**31`` and
    ``2**32``); the span is ``max - min`` whatever the entries' sign (from 1 and from -1).
    Mutants: ``x_table_planes`` 6 (``hi + lo``), 7 (``>``), 9 (``2 << 31``), 10 (``1 << 32``)."""
    span = 1 << 15
    t = np.array([[lo, lo + span], [lo + 5, lo + 7]], np.int64)
    table = torch.from_numpy(t).to(torch.int32)
    got = SG.table_planes(table, (1 << 16) - 1)
    assert got is not None
    planes, base = got
    assert base == lo
    np.testing.assert_array_equal(planes, byte_shuffle.planes((t.T - lo).astype(np.uint16)))
    assert SG.table_planes(table, 1 << 16) is None          # (2**16) * 2**15 = 2**31
    assert SG.table_planes(table, (1 << 17) - 1) is None    # below 2**32
    assert SG.table_planes(table, 1 << 17) is None


# -- bmm: attention's batched products ----------------------------------------------------------------


def bmm_ref(ia: np.ndarray, ib: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``acc[b, m, n] = sum_k table[ia[b, m, k], ib[b, k, n]]`` in int64."""
    return table.astype(np.int64)[ia[:, :, :, None], ib[:, None, :, :]].sum(2)


def bmm_operands(rng, shape, bsz=2, m=3, k=5, n=7):
    """Random in-range indices ``(B, M, K)`` and ``(B, K, N)`` for a table of ``shape``."""
    ia = rng.integers(0, min(shape[0], 256), (bsz, m, k))
    ib = rng.integers(0, min(shape[1], 256), (bsz, k, n))
    ia[0, 0, 0], ib[0, 0, 0] = min(shape[0], 256) - 1, min(shape[1], 256) - 1
    return torch.from_numpy(ia), torch.from_numpy(ib)


@pytest.mark.parametrize("shape, lo, hi, m", [
    ((256, 256), -3000, 40000, 3), ((256, 256), 5, 60000, 70), ((256, 200), -65535, 0, 17), ((200, 256), 0, 9, 1),
])
def test_bmm_matches_brute_force(fresh_cache, shape, lo, hi, m):
    """Each item's own second operand, full 256-row/-column tables (and smaller ones), a
    negative minimum (the start value ``wrap32(K lo)``), ``M`` padded to 64: the exact int32
    sums. Mutants: ``x_bmm`` 3 to 8 (the device test inverted or misspelt: ``None`` on the
    CPU), 9 (``None`` wherever the kernel is available), 17 (``rows >= 256``), 20
    (``columns >= 256``), 26 (no offset tables), 29 (``ot is not None``), 38 (bound ``1 >> 31``)."""
    rng = np.random.default_rng(hi - lo + m)
    t = rng.integers(lo, hi + 1, shape)
    t[0, 0], t[-1, -1] = lo, hi
    table = torch.from_numpy(t).to(torch.int32)
    ia, ib = bmm_operands(rng, shape, m=m, k=40)
    got = SG.bmm(ia, ib, table)
    assert got is not None and got.dtype == torch.int32 and got.shape == (2, m, 7)
    np.testing.assert_array_equal(got.numpy(), bmm_ref(ia.numpy(), ib.numpy(), t))


@pytest.mark.parametrize("where", ["a", "b", "both"])
def test_bmm_none_off_the_cpu(where):
    """An operand off the CPU (here on the ``meta`` device): ``None`` (the caller's other
    path), not an exception. Mutants: ``x_bmm`` 1 (``ib`` off the CPU only with the kernel
    unavailable), 2 (``None`` only with both operands off the CPU)."""
    rng = np.random.default_rng(2)
    table = torch.from_numpy(rng.integers(-50, 50, (256, 256))).to(torch.int32)
    ia, ib = bmm_operands(rng, (256, 256))
    if where in ("a", "both"):
        ia = ia.to("meta")
    if where in ("b", "both"):
        ib = ib.to("meta")
    assert SG.bmm(ia, ib, table) is None


def test_bmm_none_where_the_kernel_is_unavailable(monkeypatch):
    """CPU operands but no byte-shuffle kernel: ``None``. Mutant: ``x_bmm`` 1 (the
    availability test joined to ``ib``'s device by ``and``)."""
    rng = np.random.default_rng(1)
    table = torch.from_numpy(rng.integers(-50, 50, (256, 256))).to(torch.int32)
    ia, ib = bmm_operands(rng, (256, 256))
    monkeypatch.setattr(byte_shuffle, "available", lambda: False)
    assert SG.bmm(ia, ib, table) is None


@pytest.mark.parametrize("shape", [(257, 256), (256, 257), (257, 257)])
def test_bmm_none_for_tables_over_8_bits(fresh_cache, shape):
    """A table of 257 rows or columns (indices here all below 256): ``None``. Mutants:
    ``x_bmm`` 14 (the column test joined to the look-up count by ``and``), 15 (``None`` only
    where both exceed 256), 16 (the columns tested twice), 18 (``rows > 257``), 21
    (``columns > 257``)."""
    rng = np.random.default_rng(shape[0] + 2 * shape[1])
    table = torch.from_numpy(rng.integers(-50, 50, shape)).to(torch.int32)
    ia, ib = bmm_operands(rng, shape)
    assert SG.bmm(ia, ib, table) is None


def test_bmm_none_for_a_table_spanning_2_16(fresh_cache):
    """A table whose entries span ``2**16`` values: ``None`` (no 16-bit offsets); one short of
    that: exact. Mutant: ``x_bmm`` 28 (``ot is None and ...``: reads ``ot.lo`` of ``None``)."""
    rng = np.random.default_rng(28)
    for span, fits in ((1 << 16, False), ((1 << 16) - 1, True)):
        t = rng.integers(-100, 100, (256, 256))
        t[3, 4], t[5, 6] = -1000, -1000 + span
        table = torch.from_numpy(t).to(torch.int32)
        ia, ib = bmm_operands(rng, (256, 256))
        got = SG.bmm(ia, ib, table)
        assert (got is not None) == fits
        if fits:
            np.testing.assert_array_equal(got.numpy(), bmm_ref(ia.numpy(), ib.numpy(), t))


@pytest.mark.parametrize("sign", [1, -1])
def test_bmm_none_from_k_max_entry_2_31(fresh_cache, sign):
    """``K * max|entry| >= 2**31`` (a sum that could leave int32): ``None`` exactly at the
    bound (``K = 2048``, ``max|entry| = 2**20``; for positive entries the mutant's sums wrap),
    exact one below it (``2**20 - 1``: totals up to ``2**31 - 2048``). Mutants: ``x_bmm`` 30
    (``K / max``), 37 (``>``), 39 (``2 << 31``), 40 (``1 << 32``)."""
    rng = np.random.default_rng(30)
    k = 2048
    for top, fits in ((1 << 20, False), ((1 << 20) - 1, True)):
        t = sign * rng.integers(top - 1000, top + 1, (256, 256))
        t[:8, :] = sign * top  # rows 0 .. 7 at the extreme: all-extreme sums reach the bound
        table = torch.from_numpy(t).to(torch.int32)
        ia = torch.from_numpy(rng.integers(0, 256, (2, 3, k)))
        ia[:, 0, :] = torch.from_numpy(rng.integers(0, 8, (2, k)))
        ib = torch.from_numpy(rng.integers(0, 256, (2, k, 2)))
        assert k * top == (1 << 31) if not fits else k * top < (1 << 31)
        got = SG.bmm(ia, ib, table)
        assert (got is not None) == fits
        if fits:
            ref = bmm_ref(ia.numpy(), ib.numpy(), t)
            assert np.abs(ref).max() > (1 << 31) - 4096
            np.testing.assert_array_equal(got.numpy(), ref)


def test_bmm_none_below_min_lookups(monkeypatch, fresh_cache):
    """``B M K N`` look-ups: exact from ``MIN_LOOKUPS`` on (here ``2*3*5*7 = 210``), ``None``
    one below it. Mutants: ``x_bmm`` 14 (the threshold only with a table over 256 columns), 22
    (``B M K / N``), 23 (``B M / K N``), 24 (``B / M K N``), 25 (``<=``)."""
    rng = np.random.default_rng(25)
    t = rng.integers(-3000, 3000, (256, 256))
    table = torch.from_numpy(t).to(torch.int32)
    ia, ib = bmm_operands(rng, (256, 256), bsz=2, m=3, k=5, n=7)
    monkeypatch.setattr(byte_shuffle, "MIN_LOOKUPS", 210)
    got = SG.bmm(ia, ib, table)
    assert got is not None
    np.testing.assert_array_equal(got.numpy(), bmm_ref(ia.numpy(), ib.numpy(), t))
    monkeypatch.setattr(byte_shuffle, "MIN_LOOKUPS", 211)
    assert SG.bmm(ia, ib, table) is None


def test_bmm_checks_its_indices_only_where_it_runs(monkeypatch):
    """An index outside the table is an IndexError where the kernel would run (a uint8 cast
    would wrap it); where ``bmm`` declines it returns ``None`` without checking (the torch
    gather that then runs checks its own: no extra pass or host sync on that path)."""
    table = torch.arange(256 * 256, dtype=torch.int32).reshape(256, 256) % 1000
    ia = torch.zeros((2, 3, 4), dtype=torch.int64)
    ib = torch.zeros((2, 4, 5), dtype=torch.int64)
    ia[1, 2, 3] = 256
    with pytest.raises(IndexError, match=msg("Activation indices outside the table's 256 rows: values in [0, 256]")):
        SG.bmm(ia, ib, table)
    ia[1, 2, 3], ib[0, 0, 0] = 0, -1
    with pytest.raises(IndexError, match=msg("Weight indices outside the table's 256 columns: values in [-1, 0]")):
        SG.bmm(ia, ib, table)
    monkeypatch.setattr(byte_shuffle, "MIN_LOOKUPS", 10 ** 9)
    assert SG.bmm(ia, ib, table) is None


def test_batch_inner_layout_checks_the_activations():
    """The batch-inner layout checks its activations itself, like the unfolds (the conv's
    driver no longer checks them a second time)."""
    from appmult.nn import gather_layouts as GL
    q = torch.full((64, 1, 3, 3), 7.0)
    q[5, 0, 1, 1] = 300.0
    with pytest.raises(IndexError, match=msg("Quantized activations outside the LUT's range [0, 255]")):
        GL.batch_inner_fields(q, 0, 256, 0, (1, 1), (0, 0), (1, 1), (1, 1))
    with pytest.raises(IndexError, match=msg("Padding value 256 outside the LUT's range")):
        GL.batch_inner_fields(torch.zeros((64, 1, 3, 3)), 0, 256, 256, (1, 1), (1, 1), (1, 1), (1, 1))


def test_an_empty_table_has_no_offset_tables():
    """No entries, no 16-bit form: ``None`` (the byte shuffle steps aside and the callers'
    own checks report the bad input), not aminmax's error on an empty tensor."""
    assert OT.offset_tables(torch.zeros((0, 0), dtype=torch.int32)) is None
    assert SG.table_planes(torch.zeros((256, 0), dtype=torch.int32), 3) is None
