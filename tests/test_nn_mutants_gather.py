"""Tests written for surviving mutants of the gather drivers in :mod:`appmult.nn.kernels`.

Each test checks one behaviour against an independent reference (numpy brute-force sums of
``table[a, b]`` in int64, exact error messages, the documented ``None`` of a fused path that
would overflow int32); its docstring names the mutants it was written for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import kernels as K
from conftest import exact as msg

pytestmark = pytest.mark.usefixtures("one_torch_thread", "gather_path")

I32_MAX = (1 << 31) - 1


def forward_ref(a: np.ndarray, b: np.ndarray, table: np.ndarray, groups: int = 1) -> np.ndarray:
    """``out[n, j, i] = sum_k table[a[n, g*Kg+k, i], b[j, k]]`` in int64 (python ints per entry)."""
    nbatch, _, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    t = table.astype(object)
    out = np.zeros((nbatch, nout, length), dtype=object)
    for j in range(nout):
        g = j // ng
        for k in range(kg):
            out[:, j, :] += t[a[:, g * kg + k, :], b[j, k]]
    return out


def as_exact(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(object)


# -- _check_indices ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_gather_forward_refuses_non_integer_indices(dtype):
    """Float or bool index tensors are a TypeError even when every value lies in range (a bool
    or float tensor would otherwise be cast silently). (Mutants: ``_check_indices`` 1, 2 --
    ``or`` turned into ``and`` between the dtype tests.)"""
    table = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    a = torch.ones((1, 3, 2), dtype=dtype)
    b = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(TypeError, match=msg(f"Activation indices must be an integer tensor, not {dtype}")):
        K.gather_forward(a, b, table, 1, torch.int32)
    with pytest.raises(TypeError, match=msg(f"Weight indices must be an integer tensor, not {dtype}")):
        K.gather_forward(b.new_zeros((1, 3, 2)), torch.ones((2, 3), dtype=dtype), table, 1, torch.int32)


def test_gather_forward_checks_wide_integer_indices_of_a_256_entry_table():
    """Only *uint8* indices into a table of 256 or more entries are in range by their type:
    an int64 index 256 into 256 rows (or columns) must raise, not wrap to 0 in the uint8
    conversion; the message names the operand and the table's side exactly. (Mutants:
    ``_check_indices`` 5 6 -- the check skipped for any dtype once ``n >= 256``;
    ``gather_forward`` 7 11 12 13 16 20 21 22 -- the ``what`` names of the two checks.)"""
    table = torch.arange(256 * 4, dtype=torch.int32).reshape(256, 4)
    a = torch.zeros((1, 2, 3), dtype=torch.int64)
    a[0, 1, 2] = 256
    b = torch.zeros((2, 2), dtype=torch.int64)
    with pytest.raises(IndexError, match=msg("Activation indices outside the table's 256 rows: values in [0, 256]")):
        K.gather_forward(a, b, table, 1, torch.int32)
    tw = torch.arange(4 * 256, dtype=torch.int32).reshape(4, 256)
    b[1, 0] = 256
    with pytest.raises(IndexError, match=msg("Weight indices outside the table's 256 columns: values in [0, 256]")):
        K.gather_forward(torch.zeros((1, 2, 3), dtype=torch.int64), b, tw, 1, torch.int32)


# -- _idx_dtype ----------------------------------------------------------------------------------

@pytest.mark.parametrize("nbatch, length", [(1, 2), (3, 200)])  # weight-row kernel, row kernel
def test_gather_forward_table_of_257_rows_keeps_index_256(nbatch, length):
    """With 257 rows index 256 is valid and must select the last row (a uint8 copy of the
    indices would wrap it to row 0). (Mutant: ``_idx_dtype`` 4 -- uint8 up to 257 entries.)"""
    rng = np.random.default_rng(1)
    table = rng.integers(-1000, 1000, size=(257, 5))
    table[256] = 100_000  # the last row stands out
    a = rng.integers(0, 257, size=(nbatch, 3, length))
    a[..., 0] = 256
    b = rng.integers(0, 5, size=(4, 3))
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), 1,
                           torch.int32)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(as_exact(out), forward_ref(a, b, table))


# -- _use_numba: the APPMULT_NO_NUMBA switch -----------------------------------------------------

def test_no_numba_switch_keeps_the_compiled_loops_off(monkeypatch):
    """With ``APPMULT_NO_NUMBA`` set, ``gather_forward`` must take the torch path on the CPU
    too (the compiled loops are never called) and still give the exact sums. (Mutants:
    ``_use_numba`` 1 -- ``or`` instead of ``and``; ``gather_forward`` 23 -- the branch
    inverted.)"""
    def boom(*args, **kwargs):
        raise AssertionError("a compiled loop ran under APPMULT_NO_NUMBA")

    for name in ("forward", "rows", "expand", "expand_zp", "grad_a", "grad_b"):
        monkeypatch.setattr(K.loops, name, boom)
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    rng = np.random.default_rng(2)
    table = rng.integers(-50, 50, size=(8, 8))
    for nbatch, length in ((1, 3), (4, 20)):
        a = rng.integers(0, 8, size=(nbatch, 6, length))
        b = rng.integers(0, 8, size=(4, 3))
        out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table), 2, torch.int64)
        np.testing.assert_array_equal(as_exact(out), forward_ref(a, b, table, groups=2))


# -- int64 accumulators with entries above 2**53 --------------------------------------------------

BIG = (1 << 60) + 1  # not a float64


def big_table(na: int, nb: int, rng) -> np.ndarray:
    """int64 entries ``2**60 + 1 + small`` spanning fewer than 2**16 values (so the weight-row
    kernel takes the offset uint16 table and adds ``Kg * min`` back)."""
    return BIG + rng.integers(0, 1000, size=(na, nb))


def test_gather_forward_few_positions_int64_is_exact_above_2_53():
    """The weight-row kernel's int64 accumulators and its ``Kg * min`` offset stay integers:
    3 * (2**60 + 1 + ...) is exact in int64, not in float64. (Mutants: ``gather_forward``
    57 59 -- float64 accumulators; 112 -- the offset's ``Kg`` as a float.)"""
    rng = np.random.default_rng(3)
    table = big_table(4, 4, rng)
    a = rng.integers(0, 4, size=(1, 3, 2))
    b = rng.integers(0, 4, size=(3, 3))
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table), 1, torch.int64)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(as_exact(out), forward_ref(a, b, table))


@pytest.mark.parametrize("expand_bytes", [None, "two_channels"])
def test_gather_forward_row_kernel_int64_is_exact_above_2_53(monkeypatch, expand_bytes):
    """The row kernel's expanded table ``e`` and its per-block accumulators keep the
    accumulator dtype: int64 entries above 2**53 are not floats. With ``_EXPAND_BYTES`` for
    two channels, 3 output channels make a full block and a partial one. (Mutants:
    ``_rows_accumulate`` 47 49 -- ``e`` as float64; 110 112 -- the partial block's ``e``;
    121 123 -- the block accumulators.)"""
    rng = np.random.default_rng(4)
    na, kg = 4, 2
    table = big_table(na, 4, rng)
    if expand_bytes:
        monkeypatch.setattr(K, "_EXPAND_BYTES", 2 * kg * na * 8)
    a = rng.integers(0, na, size=(2, kg, 12))
    b = rng.integers(0, 4, size=(3, kg))
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table), 1, torch.int64)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(as_exact(out), forward_ref(a, b, table))


def test_gather_forward_row_kernel_single_output_channel(monkeypatch):
    """One output channel (``Ng = 1``, one group): the row kernel's expanded block must be one
    channel wide; a wider block would add its uninitialised second column to the next
    position's accumulator. Freed arrays of the wider block's size are filled with 1000 first,
    so that memory is not zero by chance. (Mutant: ``_rows_accumulate`` 12 -- at least two
    channels per block.)"""
    rng = np.random.default_rng(5)
    kg, na = 2, 4
    table = rng.integers(-9, 9, size=(na, 3))
    a = rng.integers(0, na, size=(1, kg, 41))
    b = rng.integers(0, 3, size=(1, kg))
    ref = forward_ref(a, b, table)
    at, bt, tt = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32)
    for _ in range(3):
        junk = [np.full(kg * na * 2, 1000, np.int32) for _ in range(8)]
        del junk
        out = K.gather_forward(at, bt, tt, 1, torch.int32)
        np.testing.assert_array_equal(as_exact(out), ref)


# -- _table16: the offset uint16 table ------------------------------------------------------------

@pytest.mark.parametrize("values", [(0, 65536), (-7, -7)], ids=["span_2_16", "constant"])
def test_gather_forward_few_positions_table_spans(values):
    """A table spanning exactly 2**16 values cannot be offset into uint16 (65536 would wrap
    to 0); a constant table (span 0) can, with every offset 0. (Mutants: ``_table16`` 16 --
    ``>`` at 2**16; 20 -- ``Kg / span``, a ZeroDivisionError for a constant table.)"""
    rng = np.random.default_rng(6)
    table = rng.choice(np.array(values), size=(4, 4))
    table[0, 0], table[1, 1] = values
    a = rng.integers(0, 4, size=(1, 5, 2))
    a[0, :, 0] = [0, 1, 0, 1, 2]
    b = rng.integers(0, 4, size=(2, 5))
    b[0] = [0, 1, 0, 1, 3]
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), 1,
                           torch.int32)
    np.testing.assert_array_equal(as_exact(out), forward_ref(a, b, table))


@pytest.mark.parametrize("lo, hi, kg", [(-60000, 5000, 40000), (-40000, -7232, 65536)],
                         ids=["span_times_k_over_2_31", "span_times_k_at_2_31"])
def test_gather_forward_uint16_offset_refused_when_k_min_leaves_int32(lo, hi, kg):
    """int32 accumulators whose true sums fit (every look-up hits ``hi``), but where
    ``Kg * (hi - lo) >= 2**31`` (the second case exactly 2**31): the offset table must be
    refused, since ``Kg * lo`` itself does not fit int32. (Mutants: ``_table16`` 5 8 9 10
    21 22 -- the int32 limit moved or the span mistaken; ``gather_forward`` 62 -- no
    accumulator dtype, 68 -- the length for ``Kg``.)"""
    table = np.array([[lo, lo], [hi, hi]])
    a = np.ones((1, kg, 1), dtype=np.int64)
    b = np.zeros((1, kg), dtype=np.int64)
    out = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table).to(torch.int32), 1,
                           torch.int32)
    assert out.dtype == torch.int32
    assert out.reshape(-1).tolist() == [kg * hi]


# -- gather_conv_zp ------------------------------------------------------------------------------

def conv_zp_ref(q: np.ndarray, lo_x: int, b: np.ndarray, lo_w: int, table: np.ndarray, groups: int,
                kernel_size, padding, zx: int, zw, pad_value: int) -> np.ndarray:
    """Brute force of ``gather_conv_zp`` (stride 1, dilation 1) in python ints."""
    n, c, h, w = q.shape
    kh, kw = kernel_size
    ph, pw = padding
    qp = np.full((n, c, h + 2 * ph, w + 2 * pw), pad_value, dtype=np.int64)
    qp[:, :, ph:ph + h, pw:pw + w] = q
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    nout = b.shape[0]
    cg = c // groups
    ng = nout // groups
    zwv = np.zeros(nout, np.int64) if zw is None else np.broadcast_to(np.asarray(zw, np.int64).reshape(-1), (nout,))
    out = np.zeros((n, nout, ho, wo), dtype=object)
    for j in range(nout):
        g = j // ng
        bj = b[j].reshape(cg, kh, kw)
        for ci in range(cg):
            for dy in range(kh):
                for dx in range(kw):
                    x = qp[:, g * cg + ci, dy:dy + ho, dx:dx + wo]          # values
                    wv = int(bj[ci, dy, dx])
                    t = table[x - lo_x, wv].astype(object)
                    out[:, j] += t - x.astype(object) * int(zwv[j]) - zx * (wv + lo_w) + zx * int(zwv[j])
    return out


@pytest.mark.numba
def test_gather_conv_zp_exact_and_in_the_requested_dtype():
    """The fused conv accumulator with zero points equals the brute-force sum, converted to the
    requested ``out_dtype``. (Mutant: ``gather_conv_zp`` 204 -- the result left in int32.)"""
    rng = np.random.default_rng(7)
    na, nb = 16, 8
    table = rng.integers(-300, 300, size=(na, nb))
    q = rng.integers(0, na, size=(2, 2, 5, 6)).astype(np.float32)
    b = rng.integers(0, nb, size=(3, 2 * 2 * 2))
    zw = np.array([3, 0, 5])
    out = K.gather_conv_zp(torch.from_numpy(q), 0, torch.from_numpy(b), -4, torch.from_numpy(table), 1, (2, 2),
                           (1, 0), (1, 1), (1, 1), 6, zw, torch.float64)
    assert out is not None and out.dtype == torch.float64
    ref = conv_zp_ref(q.astype(np.int64), 0, b, -4, table, 1, (2, 2), (1, 0), 6, zw, 6)
    np.testing.assert_array_equal(out.numpy().astype(np.int64).astype(object), ref)


@pytest.mark.numba
def test_gather_conv_zp_weight_index_message():
    """A weight index outside the table raises with the operand and side named exactly.
    (Mutants: ``gather_conv_zp`` 128 132 133 134 -- the ``what`` of the weight check.)"""
    table = torch.zeros((4, 4), dtype=torch.int64)
    q = torch.zeros((1, 1, 4, 4))
    b = torch.tensor([[0], [4]])
    with pytest.raises(IndexError, match=msg("Weight indices outside the table's 4 columns: values in [0, 4]")):
        K.gather_conv_zp(q, 0, b, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None)


@pytest.mark.parametrize("na, nb", [(257, 4), (4, 257)])
def test_gather_conv_zp_declines_tables_over_8_bits(na, nb):
    """Tables with more than 256 rows or columns are declined (``None``): the row kernel takes
    uint8 indices, so index 256 would wrap to 0. (Mutants: ``gather_conv_zp`` 44 45 52 54 --
    the size tests combined with ``and`` or moved to 257.)"""
    table = torch.arange(na * nb, dtype=torch.int64).reshape(na, nb) % 1000
    q = torch.full((1, 1, 23, 23), float(na - 1))
    b = torch.tensor([[nb - 1]])
    assert K.gather_conv_zp(q, 0, b, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None) is None


def test_gather_conv_zp_declines_other_inputs_than_4d_float32():
    """Only 4-D float32 activations take the fused path; others get ``None`` (the caller falls
    back), not an exception. (Mutants: ``gather_conv_zp`` 1 2 -- the guard's ``or``s.)"""
    table = torch.arange(16, dtype=torch.int64).reshape(4, 4)
    b = torch.tensor([[1]])
    args = (0, b, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None)
    assert K.gather_conv_zp(torch.ones((1, 1, 5, 5), dtype=torch.float64), *args) is None
    assert K.gather_conv_zp(torch.ones((1, 5, 5)), *args) is None


# Overflow cases: (na, nb, table value, activation value, weight index, zx, zw, channels).
# Each makes every folded term reach int32's limit or beyond; the original bound refuses
# each case, a smaller bound lets the int32 kernel wrap.
BOUND_CASES = {
    # -T - value(x) Zw with x = 255: |T| + 255 Zw = 2**31 + 50 (vx_max term)
    "x_zw": (256, 4, -((1 << 31) - 25450), 255, 0, 0, [100], 1),
    # -T - Zx value(w) with w = 3: |T| + 3 Zx = 2**31 + 50 (vw_max term)
    "zx_w": (256, 4, -((1 << 31) - 250), 7, 3, 100, None, 1),
    # T + Zx Zw with x = w = 0: 2**31 + 10 (the Zx Zw term)
    "zx_zw": (256, 2, (1 << 31) - 39990, 0, 0, 200, [200], 1),
    # two look-ups of 2**30: exactly 2**31
    "at_limit": (4, 4, 1 << 30, 1, 1, 0, None, 2),
}


@pytest.mark.parametrize("case", BOUND_CASES)
def test_gather_conv_zp_declines_sums_past_int32(case):
    """Where a folded sum can reach 2**31 the fused int32 path is declined (``None``), and the
    case really does leave int32 (checked against the brute-force sum). (Mutants:
    ``gather_conv_zp`` 91 101 108 109 110 117 -- a term of the bound made smaller; 121 122 124
    125 -- the comparison with 2**31.)"""
    na, nb, t, x, w, zx, zw, c = BOUND_CASES[case]
    table = np.full((na, nb), t, dtype=np.int64)
    q = np.full((1, c, 23, 23), x, dtype=np.int64)
    b = np.full((1, c), w, dtype=np.int64)
    ref = conv_zp_ref(q, 0, b, 0, table, 1, (1, 1), (0, 0), zx, zw, zx)
    assert max(abs(v) for v in ref.reshape(-1)) > I32_MAX or ref.reshape(-1)[0] >= 1 << 31
    out = K.gather_conv_zp(torch.from_numpy(q).float(), 0, torch.from_numpy(b), 0, torch.from_numpy(table), 1,
                           (1, 1), (0, 0), (1, 1), (1, 1), zx, None if zw is None else np.array(zw))
    assert out is None


@pytest.mark.numba
def test_gather_conv_zp_no_output_channels():
    """A conv with no output channels (``nn.Conv2d(c, 0, k)`` is valid) gives an empty
    accumulator, not an error from the bound's ``max`` over no weight zero points.
    (Mutant: ``gather_conv_zp`` 104 -- ``max(initial=None)`` of an empty array.)"""
    table = torch.arange(16, dtype=torch.int64).reshape(4, 4)
    q = torch.ones((2, 1, 4, 5))
    b = torch.zeros((0, 4), dtype=torch.int64)
    out = K.gather_conv_zp(q, 0, b, 0, table, 1, (2, 2), (0, 0), (1, 1), (1, 1), 1, np.zeros(0, np.int64))
    assert out is not None and out.shape == (2, 0, 3, 4)


def test_gather_conv_zp_int32_table_with_its_most_negative_entry():
    """The bound takes ``|T|`` in int64: an int32 table holding ``-2**31`` has ``|T| = 2**31``
    (int32's own ``abs`` wraps it to ``-2**31``, a bound of 0), so two look-ups of it are
    declined rather than wrapped. (Mutant: ``gather_conv_zp`` 114 -- ``abs`` in the table's
    dtype.)"""
    table = torch.full((4, 4), -(1 << 31), dtype=torch.int32)
    q = torch.ones((1, 2, 3, 3))
    b = torch.zeros((1, 2), dtype=torch.int64)
    assert K.gather_conv_zp(q, 0, b, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None) is None
