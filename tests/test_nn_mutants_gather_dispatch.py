"""Tests written for surviving mutants of :func:`appmult.nn.kernels.gather_forward` and
:func:`appmult.nn.kernels.gather_conv_zp` since they dispatch to the byte-shuffle kernel
(:mod:`appmult.nn.shuffle_gather`) where the CPU has AVX-512 VBMI.

Each test runs on both CPU gather paths (the ``gather_path`` fixture: the scalar numba loops
and the byte shuffle) and checks one behaviour against an independent reference: numpy
brute-force sums of ``table[a, b]`` in python ints, or the documented ``None`` with which
the fused conv declines an input (the caller falls back). Its docstring names the mutants
it was written for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import byte_shuffle as BS
from appmult.nn import kernels as K
from appmult.nn import shuffle_gather as SG
from test_nn_mutants_gather import conv_zp_ref as gather_conv_zp_ref

pytestmark = pytest.mark.usefixtures("one_torch_thread", "gather_path")

I32_MAX = (1 << 31) - 1


def forward_ref(a: np.ndarray, b: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``out[n, j, i] = sum_k table[a[n, k, i], b[j, k]]`` (one group) in python ints."""
    nbatch, _, length = a.shape
    nout, kg = b.shape
    t = table.astype(object)
    out = np.zeros((nbatch, nout, length), dtype=object)
    for j in range(nout):
        for k in range(kg):
            out[:, j, :] += t[a[:, k, :], b[j, k]]
    return out


def conv_zp_ref(q: np.ndarray, lo_x: int, b: np.ndarray, lo_w: int, table: np.ndarray, kernel_size,
                zx: int, zw, pad_value: int, padding=(0, 0)) -> np.ndarray:
    """Brute force of ``gather_conv_zp`` (one group, stride 1, dilation 1) in python ints:
    ``sum_k table[x, w] - value(x) Zw_j - Zx value(w) + Zx Zw_j`` over each receptive field
    (:func:`test_nn_mutants_gather.conv_zp_ref`)."""
    return gather_conv_zp_ref(q, lo_x, b, lo_w, table, 1, kernel_size, padding, zx, zw, pad_value)


def conv_zp(q: np.ndarray, lo_x: int, b: np.ndarray, lo_w: int, table: np.ndarray, kernel_size, zx: int, zw,
            **kw):
    """``gather_conv_zp`` (one group, stride 1, dilation 1, no padding) on numpy operands."""
    return K.gather_conv_zp(torch.from_numpy(q.astype(np.float32)), lo_x, torch.from_numpy(b), lo_w,
                            torch.from_numpy(table), 1, kernel_size, (0, 0), (1, 1), (1, 1), zx, zw, **kw)


def assert_exact(out: torch.Tensor | None, ref: np.ndarray) -> None:
    assert out is not None
    assert out.shape == ref.shape
    assert out.numpy().astype(np.int64).astype(object).tolist() == ref.tolist()


# -- gather_forward ------------------------------------------------------------------------------

@pytest.mark.parametrize("na, nb", [(257, 3), (3, 257)])
def test_gather_forward_int32_tables_of_257_rows_or_columns(na, nb):
    """A one-group int32 gather on a table with 257 rows (or columns) is exact, index 256
    included: such a table has no byte planes (8-bit indices), so the byte shuffle must not
    be tried. (Mutants: ``gather_forward`` 52 54 -- the byte shuffle's size tests moved to
    ``<= 257``, which raise from :func:`byte_shuffle.planes`.)"""
    rng = np.random.default_rng(52)
    table = rng.integers(-1000, 1000, size=(na, nb))
    a = rng.integers(0, na, size=(2, 5, 3))
    b = rng.integers(0, nb, size=(4, 5))
    a[0, 0, 0], b[0, 0] = na - 1, nb - 1
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), 1,
                           torch.int32)
    assert out.dtype == torch.int32
    assert_exact(out, forward_ref(a, b, table))


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64])
def test_gather_forward_no_positions(out_dtype):
    """Activations with no positions (``L = 0``) give an empty ``(nb, nout, 0)`` accumulator,
    not a division by zero in the choice between the scalar kernels. (Mutant:
    ``gather_forward`` 76 -- ``nbatch / length`` for ``nbatch * length``.)"""
    table = torch.arange(16, dtype=torch.int32).reshape(4, 4)
    a = torch.zeros((2, 3, 0), dtype=torch.int64)
    b = torch.zeros((5, 3), dtype=torch.int64)
    out = K.gather_forward(a, b, table, 1, out_dtype)
    assert out.dtype == out_dtype and out.shape == (2, 5, 0)


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64])
def test_gather_forward_no_output_channels(out_dtype):
    """No weight rows (``nout = 0``) with few positions give an empty ``(nb, 0, L)``
    accumulator, not a division by zero in the weight-row kernel's tile size. (Mutant:
    ``gather_forward`` 113 -- ``nbatch / nout`` for ``nbatch * nout``.)"""
    table = torch.arange(16, dtype=torch.int32).reshape(4, 4)
    a = torch.ones((1, 3, 2), dtype=torch.int64)
    b = torch.zeros((0, 3), dtype=torch.int64)
    assert a.shape[0] * a.shape[2] < K.ROWS_MIN_POSITIONS * table.shape[0]  # the weight-row kernel's case
    out = K.gather_forward(a, b, table, 1, out_dtype)
    assert out.dtype == out_dtype and out.shape == (1, 0, 2)


# -- gather_conv_zp: when it declines ----------------------------------------------------------------

@pytest.mark.parametrize("off_cpu", ["q", "b", "table"])
def test_gather_conv_zp_declines_operands_off_the_cpu(off_cpu):
    """The fused conv runs the CPU kernels only: any operand on another device gives ``None``
    (the caller's device path), not an error from reading it on the host. ``meta`` stands in
    for CUDA here (it has no data). (Mutants: ``gather_conv_zp`` 7 8 9 -- one operand left
    out of the device test.)"""
    ops = {"q": torch.ones((1, 1, 5, 5)), "b": torch.tensor([[1, 2, 3, 0]]),
           "table": torch.arange(16, dtype=torch.int64).reshape(4, 4)}
    ops[off_cpu] = ops[off_cpu].to("meta")
    assert K.gather_conv_zp(ops["q"], 0, ops["b"], 0, ops["table"], 1, (2, 2), (0, 0), (1, 1), (1, 1), 1,
                            None) is None


@pytest.mark.parametrize("h, w", [(1, 5), (5, 1)])
def test_gather_conv_zp_declines_an_empty_output_map(h, w):
    """A kernel taller (or wider) than the input leaves no output rows (or columns): ``None``
    (the caller's conv reports it), on the byte-shuffle path too, which has no positions
    test of its own to fall back on. (Mutants: ``gather_conv_zp`` 43 -- ``ho <= 0 and wo <=
    0``; 50 52 -- ``ho < 0``, ``wo < 0``.)"""
    table = np.arange(16, dtype=np.int64).reshape(4, 4)
    q = np.ones((1, 1, h, w))
    b = np.array([[1, 2, 3, 0]])
    assert conv_zp(q, 0, b, 0, table, (2, 2), 1, None) is None


@pytest.mark.numba
@pytest.mark.parametrize("h, w", [(2, 9), (9, 2)])
def test_gather_conv_zp_one_output_row_or_column(h, w):
    """An output map one row (or one column) high is computed, exactly. (Mutants:
    ``gather_conv_zp`` 51 53 -- ``ho <= 1``, ``wo <= 1`` declined.)"""
    rng = np.random.default_rng(51)
    table = rng.integers(-300, 300, size=(4, 4))
    q = rng.integers(-1, 3, size=(1, 1, h, w))
    b = rng.integers(0, 4, size=(2, 4))
    zw = np.array([2, -3])
    out = conv_zp(q, -1, b, -2, table, (2, 2), 1, zw)
    assert_exact(out, conv_zp_ref(q, -1, b, -2, table, (2, 2), 1, zw, 1))


@pytest.mark.numba
def test_gather_conv_zp_row_kernel_takes_the_threshold_positions():
    """The row kernel declines *fewer* than ``ROWS_MIN_POSITIONS * NA`` positions: exactly
    that many are computed, exactly. (Mutant: ``gather_conv_zp`` 69 -- ``<=`` for ``<``.)"""
    rng = np.random.default_rng(69)
    na = 4
    table = rng.integers(-300, 300, size=(na, 3))
    q = rng.integers(0, na, size=(K.ROWS_MIN_POSITIONS * na, 2, 1, 1))
    b = rng.integers(0, 3, size=(3, 2))
    zw = np.array([1, 0, 4])
    out = conv_zp(q, 0, b, -1, table, (1, 1), 2, zw)
    assert_exact(out, conv_zp_ref(q, 0, b, -1, table, (1, 1), 2, zw, 2))


# Sums exactly at int32's limit: (na, nb, lo_x, lo_w, zx, zw, pad value, weight indices), an all-zero
# table and Kg = 1, so the bound |T| + vx_max Zw + Zx vw_max + Zx Zw is exactly 2**31 - 1.
TIGHT_CASES = {
    # value(x) Zw with x in {0, 1}: vx_max = 1, Zw = 2**31 - 1
    "x_zw": (2, 2, 0, 0, 0, np.array([I32_MAX]), 0, [[1], [0]]),
    # Zx value(w) with w in {0, 1}: vw_max = 1, Zx = 2**31 - 1, no weight zero points
    "zx_w": (2, 2, 0, 0, I32_MAX, None, 0, [[1], [0]]),
}


@pytest.mark.numba
@pytest.mark.parametrize("case", TIGHT_CASES)
def test_gather_conv_zp_takes_sums_just_inside_int32(case):
    """Where the bound of every folded sum is exactly ``2**31 - 1`` the fused int32 path still
    runs and is exact (the bound is tight: its terms are the largest activation and weight
    values, the largest |table entry| and |zero point|, nothing more). (Mutants:
    ``gather_conv_zp`` 100 101 -- ``vx_max`` from ``lo_x + na + 1`` or ``lo_x - na - 1``;
    110 111 -- the same for ``vw_max``; 117 -- ``max|Zw|`` at least 1; 126 -- ``max|T|`` at
    least 1.)"""
    na, nb, lo_x, lo_w, zx, zw, pad, bidx = TIGHT_CASES[case]
    table = np.zeros((na, nb), dtype=np.int64)
    q = np.tile(np.array([0, 1]), 8).reshape(1, 1, 4, 4) + lo_x
    b = np.array(bidx)
    ref = conv_zp_ref(q, lo_x, b, lo_w, table, (1, 1), zx, zw, pad)
    assert min(ref.reshape(-1)) == -I32_MAX  # the sums reach the bound
    out = conv_zp(q, lo_x, b, lo_w, table, (1, 1), zx, zw, pad_value=pad)
    assert_exact(out, ref)


# -- gather_conv_zp: the weight zero points as given ------------------------------------------------

@pytest.mark.numba
def test_gather_conv_zp_per_channel_zero_points_shaped_like_the_weight():
    """Per-channel zero points shaped ``(Co, 1, 1, 1)`` (torch's broadcast shape against a
    weight) are flattened to one per output channel. (Mutant: ``gather_conv_zp`` 84 --
    ``reshape(None)`` keeps the 4-D shape, which does not broadcast to ``(Co,)``.)"""
    rng = np.random.default_rng(84)
    table = rng.integers(-300, 300, size=(4, 4))
    q = rng.integers(0, 4, size=(2, 2, 3, 4))
    b = rng.integers(0, 4, size=(3, 8))
    zw = np.array([3, 0, 5]).reshape(3, 1, 1, 1)
    out = conv_zp(q, 0, b, -1, table, (2, 2), 2, zw)
    assert_exact(out, conv_zp_ref(q, 0, b, -1, table, (2, 2), 2, zw, 2))


@pytest.mark.numba
def test_gather_conv_zp_uint8_zero_points():
    """Zero points given as uint8 (an unsigned 8-bit quantizer's type) are taken as int64:
    ``-Zw`` and ``K Zx Zw`` must not wrap modulo 256. (Mutants: ``gather_conv_zp`` 86 88 --
    ``np.asarray(zw)`` in its own dtype.)"""
    rng = np.random.default_rng(86)
    table = rng.integers(-300, 300, size=(4, 4))
    q = rng.integers(0, 4, size=(2, 2, 3, 4))
    b = rng.integers(0, 4, size=(2, 8))
    zw = np.array([200, 3], dtype=np.uint8)
    out = conv_zp(q, 0, b, 0, table, (2, 2), 3, zw)
    assert_exact(out, conv_zp_ref(q, 0, b, 0, table, (2, 2), 3, zw, 3))


def test_gather_forward_int32_offset_outside_int32_with_totals_inside(gather_path):
    """A bug the mutation review found: ``Kg * min(table)`` below ``-2**31`` raised
    OverflowError on the int32 paths although every total fits int32 (the offset is added
    back modulo ``2**32``, like the sums). Both paths now give the brute-force totals."""
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    kg = 31000
    table = torch.full((4, 4), -5000, dtype=torch.int32)
    table[3, 3] = -70000
    a = torch.zeros((1, kg, 64), dtype=torch.uint8)
    a[0, :7, 5] = 3
    b = torch.zeros((2, kg), dtype=torch.uint8)
    b[1, :] = 3
    got = K.gather_forward(a, b, table, 1, torch.int32)
    ref = table.numpy().astype(np.int64)[a.numpy()[:, None, :, :], b.numpy()[None, :, :, None]].sum(2)
    assert ref.min() >= -(1 << 31)
    np.testing.assert_array_equal(got.numpy(), ref)


# -- round 2: which kernel runs, and the bounds at their edges ---------------------------------------

def spy(monkeypatch, module, names: tuple[str, ...]) -> list[str]:
    """Record the calls of ``module.<name>`` for each name (the real function still runs)."""
    calls: list[str] = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    return calls


# (batch, K, L, output channels, values the table spans, byte shuffle): batch * L * K * nout look-ups
FORWARD_SHUFFLE_CASES = {
    "at_min_lookups": (1, 256, 64, 16, 1000, True),        # 64 * 256 * 16 = 2**18, K longer than L
    "below_min_lookups": (1, 255, 64, 16, 1000, False),    # 2**18 - 1,024
    "long_rows": (1, 8, 40000, 1, 60000, True),            # L * 59,999 >= 2**31, K * 59,999 is not
}


@pytest.mark.parametrize("case", FORWARD_SHUFFLE_CASES)
def test_gather_forward_byte_shuffle_from_min_lookups(case, gather_path, monkeypatch):
    """The one-group int32 gather takes the byte shuffle from exactly ``MIN_LOOKUPS`` look-ups
    (``batch * L * K * nout``, K the reduction length), not below, and its int32 bound on the
    offset table reads ``K`` entries per sum, not ``L``; exact either way. (Mutants:
    ``gather_forward`` 59 -- ``a.shape[2]`` (L) for K in the look-ups; 60 -- ``>`` for ``>=``;
    66 -- ``table_planes(table, L)``, which declines a wide table for long rows.)"""
    monkeypatch.setattr(BS, "MIN_LOOKUPS", 1 << 18)  # the module's value (the fixture sets 0)
    calls = spy(monkeypatch, SG, ("forward",))
    nbatch, kk, length, nout, span, shuffle = FORWARD_SHUFFLE_CASES[case]
    rng = np.random.default_rng(59)
    lo = -(span // 2)
    table = rng.integers(lo, lo + span, size=(4, 4))
    table[0, 0], table[3, 3] = lo, lo + span - 1
    a = rng.integers(0, 4, size=(nbatch, kk, length))
    b = rng.integers(0, 4, size=(nout, kk))
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), 1,
                           torch.int32)
    assert calls == (["forward"] if shuffle and gather_path == "byte_shuffle" else [])
    assert_exact(out, forward_ref(a, b, table))


@pytest.mark.parametrize("delta, kernel", [(-1, "forward"), (0, "rows")])
def test_gather_forward_row_kernel_from_rows_min_positions(delta, kernel, monkeypatch):
    """Fewer than ``ROWS_MIN_POSITIONS * NA`` positions (a linear layer's few rows) take the
    weight-row kernel (``loops.forward``), exactly that many the row kernel (``loops.rows``);
    exact either way. int64 accumulators: no byte shuffle on either path. (Mutants:
    ``gather_forward`` 83 -- ``<=`` for ``<``; 84 -- ``ROWS_MIN_POSITIONS / NA``.)"""
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    calls = spy(monkeypatch, K.loops, ("forward", "rows"))
    rng = np.random.default_rng(83)
    na = 4
    table = rng.integers(-1000, 1000, size=(na, 5))
    a = rng.integers(0, na, size=(1, 6, K.ROWS_MIN_POSITIONS * na + delta))
    b = rng.integers(0, 5, size=(3, 6))
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table), 1, torch.int64)
    assert calls == [kernel]
    assert_exact(out, forward_ref(a, b, table))


@pytest.mark.parametrize("groups", [1, 2])
def test_gather_forward_few_positions_int32_offset_outside_int32(groups):
    """The weight-row kernel (few positions) adds ``Kg * min(table)`` back modulo ``2**32``
    too: with ``Kg * min`` below ``-2**31`` and every total inside int32 it gives the
    brute-force totals, not an OverflowError (two groups: no byte shuffle on either path;
    one group: the scalar path's). (Mutant: ``gather_forward`` 145 -- ``Kg * min`` not
    wrapped.)"""
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    kg, length = 31000, 3
    table = np.full((4, 4), -5000, dtype=np.int64)
    table[3, 3] = -70000
    assert kg * (-70000) < -(1 << 31) and kg * (70000 - 5000) < 1 << 31  # the 16-bit table, its offset past int32
    a = np.zeros((1, groups * kg, length), dtype=np.int64)
    a[0, :7, 1] = 3
    b = np.zeros((2, kg), dtype=np.int64)
    b[1, :] = 3
    assert a.shape[0] * length < K.ROWS_MIN_POSITIONS * table.shape[0]  # the weight-row kernel's case
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), groups,
                           torch.int32)
    ng = 2 // groups
    ref = np.concatenate([table[a[:, None, g * kg:(g + 1) * kg, :], b[g * ng:(g + 1) * ng, :, None]].sum(2)
                          for g in range(groups)], axis=1)
    assert ref.min() >= -(1 << 31)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.numba
def test_gather_linear_offset_table_of_entries_near_int32(monkeypatch):
    """A table of entries near ``1.5e9`` spanning 1,000 values (``min + max`` past ``2**31``,
    ``max - min`` far below): with ``K = 1`` every sum fits int32, so the fused linear runs
    on the 16-bit offset table and is exact -- after a scalar prep, and after a byte-shuffle
    prep whose product is too small for the byte shuffle (the zp call makes the 16-bit table
    then). (Mutant: ``_table16`` 16 -- ``hi + lo`` for ``hi - lo``: declines the table, so
    the scalar prep returns ``None`` and the small product's zp call fails.)"""
    monkeypatch.setattr(BS, "MIN_LOOKUPS", 1 << 18)  # the module's value (the fixture sets 0)
    rng = np.random.default_rng(16)
    lo = 1_500_000_000
    table = lo + rng.integers(0, 1000, size=(4, 4))
    table[0, 0], table[3, 3] = lo, lo + 999
    iw = rng.integers(0, 4, size=(2, 1))
    qx = rng.integers(0, 4, size=(3, 1))
    prep = K.gather_linear_prep(torch.from_numpy(iw), 0, torch.from_numpy(table), 0, 0, None)
    assert prep is not None
    out = K.gather_linear_zp(torch.from_numpy(qx).to(torch.float32), 0, prep)
    assert out.dtype == torch.int32
    assert out.numpy().tolist() == table[qx[:, 0][:, None], iw[:, 0][None, :]].tolist()


@pytest.mark.numba
@pytest.mark.parametrize("nout, shuffle", [(64, True), (63, False)])
def test_gather_conv_zp_byte_shuffle_from_min_lookups(nout, shuffle, gather_path, monkeypatch):
    """The fused conv takes the byte shuffle from exactly ``MIN_LOOKUPS`` look-ups
    (``N * Ho * Wo * Kg * Co``, here with ``Kg = 16``), not below; exact either way.
    (Mutant: ``gather_conv_zp`` 62 -- ``/ Kg`` for ``* Kg`` in the look-ups.)"""
    monkeypatch.setattr(BS, "MIN_LOOKUPS", 1 << 18)  # the module's value (the fixture sets 0)
    calls = spy(monkeypatch, SG, ("conv_zp",))
    rng = np.random.default_rng(62)
    table = rng.integers(-300, 300, size=(4, 4))
    q = rng.integers(-1, 3, size=(1, 16, 16, 16))  # 256 positions, Kg = 16: 4,096 x Co look-ups
    b = rng.integers(0, 4, size=(nout, 16))
    zw = rng.integers(-3, 4, size=nout)
    out = conv_zp(q, -1, b, -2, table, (1, 1), 1, zw)
    assert calls == (["conv_zp"] if shuffle and gather_path == "byte_shuffle" else [])
    assert_exact(out, conv_zp_ref(q, -1, b, -2, table, (1, 1), 1, zw, 1))


@pytest.mark.numba
def test_gather_conv_zp_no_output_channels():
    """A conv with no output channels has no weight zero points, whose largest ``|Zw|`` is
    then 0: a table entry of ``2**31 - 2`` with ``Kg = 1`` is inside the bound, and the fused
    conv returns the empty ``(N, 0, Ho, Wo)`` accumulator. (Mutant: ``gather_conv_zp`` 130 --
    ``max(..., default=1)``: adds ``vx_max + |Zx|`` to the bound and declines.)"""
    table = np.zeros((4, 4), dtype=np.int64)
    table[1, 2] = (1 << 31) - 2
    q = np.random.default_rng(130).integers(0, 4, size=(2, 1, 3, 3))
    b = np.zeros((0, 1), dtype=np.int64)
    out = conv_zp(q, 0, b, 0, table, (1, 1), 0, None)
    assert out is not None
    assert out.shape == (2, 0, 3, 3) and out.dtype == torch.int32
