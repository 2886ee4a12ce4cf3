"""The linear layer's fused gather kernel (:func:`appmult.nn.kernels.gather_linear_prep` and
:func:`appmult.nn.kernels.gather_linear_zp`) called directly, mostly at inputs the layers
never pass (mutation-testing gaps of session 8): operands not on the CPU, tables of 257 rows
or columns, weight zero points as a column or in uint8, signed weights with an activation
zero point, a shifted activation range on the scalar loop (``APPMULT_NO_BYTE_SHUFFLE=1``),
float16 and bfloat16 activations, the int32 result, offset sums past int32 beside a huge
zero point, and a huge activation zero point whose cross terms cancel. Reference: the
brute-force int64 sum of ``table[x, w] - value(x) Zw_j - Zx value(w) + Zx Zw_j``, on both
gather paths where a result is computed (the ``gather_path`` fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import kernels as K

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def brute(table: np.ndarray, xv: np.ndarray, lo_x: int, wi: np.ndarray, lo_w: int, zx: int,
          zw: np.ndarray) -> np.ndarray:
    """``(M, N)`` int64: ``sum_k table[x - lo_x, w] - x Zw_j - Zx (w + lo_w) + Zx Zw_j`` (``xv``:
    activation values, ``wi``: weight indices, ``zw``: one per output)."""
    t = np.asarray(table, np.int64)
    x = np.asarray(xv, np.int64)[:, None, :]            # (M, 1, K)
    w = np.asarray(wi, np.int64)[None, :, :]            # (1, N, K)
    z = np.asarray(zw, np.int64).reshape(1, -1, 1)      # (1, N, 1)
    return (t[x - lo_x, w] - x * z - zx * (w + lo_w) + zx * z).sum(2)


def run_linear(table, xv, lo_x, wi, lo_w, zx, zw) -> torch.Tensor:
    """``gather_linear_zp`` of float32 activation values ``xv`` through a fresh prep."""
    prep = K.gather_linear_prep(torch.from_numpy(np.asarray(wi, np.int64)), lo_w,
                                torch.from_numpy(np.asarray(table, np.int64)), lo_x, zx, zw)
    assert prep is not None
    return K.gather_linear_zp(torch.from_numpy(np.asarray(xv, np.float32)), lo_x, prep)


@needs_numba
@pytest.mark.parametrize("meta", ["weights", "table"])
def test_linear_prep_declines_operands_not_on_the_cpu(meta):
    """Weight indices or table on the ``meta`` device (not the CPU; the other on the CPU):
    ``None``, the documented "not on the CPU" fallback, instead of failing in the CPU code
    (mutants ``x_gather_linear_prep__mutmut_4`` / ``_5``: only the table's or only the
    weights' device checked)."""
    b = torch.zeros((2, 3), dtype=torch.uint8)
    table = torch.zeros((256, 256), dtype=torch.int64)
    if meta == "weights":
        b = b.to("meta")
    else:
        table = table.to("meta")
    assert K.gather_linear_prep(b, 0, table, 0, 0, None) is None


@needs_numba
@pytest.mark.parametrize("shape", [(257, 4), (4, 257)])
def test_linear_prep_declines_a_table_of_257_rows_or_columns(shape):
    """A table one past 8 bits on either side (weight indices within its columns): ``None``
    (the uint8 kernels and their 256 x 256 byte planes cannot take it) (mutants
    ``x_gather_linear_prep__mutmut_10`` / ``_12``: refused only above 257, then the byte
    planes raise ``ValueError``)."""
    table = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(shape)
    b = torch.tensor([[0, shape[1] - 1, 1]])
    assert K.gather_linear_prep(b, 0, table, 0, 2, np.array([1])) is None


@needs_numba
def test_linear_zp_per_output_zero_points_as_a_column(gather_path):
    """Weight zero points given as an ``(N, 1)`` column (one per output, the layout of a
    per-channel quantizer's zero point): the brute-force sum (mutant
    ``x_gather_linear_prep__mutmut_35``: ``reshape(None)`` keeps the column, which does not
    broadcast to ``(N,)``)."""
    rng = np.random.default_rng(81)
    m, k, n = 4, 9, 5
    table = rng.integers(-300, 3000, (16, 16))
    xv, wi = rng.integers(0, 16, (m, k)), rng.integers(0, 16, (n, k))
    zw = rng.integers(1, 16, (n, 1))
    got = run_linear(table, xv, 0, wi, 0, 3, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, 0, 3, zw))


@needs_numba
def test_linear_zp_uint8_weight_zero_points(gather_path):
    """Weight zero points as a uint8 array (8-bit unsigned quantization's own dtype), with
    ``K Zx Zw`` past 255: the brute-force sum (mutants ``x_gather_linear_prep__mutmut_37`` /
    ``_39``: the zero points kept in uint8, so ``K Zx Zw`` and ``-Zw`` wrap modulo 256)."""
    rng = np.random.default_rng(82)
    m, k, n = 3, 8, 4
    table = rng.integers(0, 5000, (256, 256))
    xv, wi = rng.integers(0, 256, (m, k)), rng.integers(0, 256, (n, k))
    zw = np.array([200, 7, 255, 128], np.uint8)
    got = run_linear(table, xv, 0, wi, 0, 5, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, 0, 5, zw))


@needs_numba
def test_linear_zp_signed_weights_with_an_activation_zero_point(gather_path):
    """Unsigned 4-bit activations with ``Zx = 3`` against signed 4-bit weights (``lo_w = -8``):
    the cross term ``-Zx sum_k value(w)`` uses the weights' values, not their indices (mutant
    ``x_gather_linear_prep__mutmut_55``: ``sum_k index - K lo_w``)."""
    rng = np.random.default_rng(83)
    m, k, n = 3, 7, 4
    table = rng.integers(-2000, 2000, (16, 16))
    xv, wi = rng.integers(0, 16, (m, k)), rng.integers(0, 16, (n, k))
    zw = rng.integers(-8, 8, n)
    got = run_linear(table, xv, 0, wi, -8, 3, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, -8, 3, zw))


@needs_numba
@pytest.mark.parametrize("zx", [0, 1 << 47])
def test_linear_prep_declines_offset_sums_past_int32_whatever_the_zero_point(zx):
    """A table spanning 65,535 over K = 65,536 (``K * span`` past int32): ``None``, for a
    zero activation zero point and for one whose ``K Zx`` is past int64 (mutants
    ``x_gather_linear_prep__mutmut_47`` / ``_52``: the 16-bit table built against int64's
    limit, so the cross terms are computed before the refusal, raising ``OverflowError``)."""
    table = torch.tensor([[0, 65535], [1, 2]], dtype=torch.int64)
    b = torch.zeros((1, 1 << 16), dtype=torch.int64)
    assert K.gather_linear_prep(b, 0, table, 0, zx, np.array([0])) is None


@needs_numba
def test_linear_zp_huge_activation_zero_point_whose_cross_terms_cancel(gather_path):
    """``Zx = 2**53 + 4`` with every weight value equal to its zero point (1), K = 1: the
    cross terms ``-Zx sum value(w) + K Zx Zw`` cancel exactly, the bound holds, and the result
    is ``table[x, 1] - x`` exactly (mutant ``x_gather_linear_prep__mutmut_57``: the weight
    sums in float64, so ``base - Zx`` rounds and the constant is off by one)."""
    table = np.arange(3, 19).reshape(4, 4)   # minimum 3: ``3 - (2**53 + 4)`` is not a float64
    xv = np.array([[0], [1], [2], [3]])
    wi, zw, zx = np.array([[1]]), np.array([1]), (1 << 53) + 4
    got = run_linear(table, xv, 0, wi, 0, zx, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, 0, zx, zw))
    np.testing.assert_array_equal(got.numpy()[:, 0], table[:, 1] - np.arange(4))


@needs_numba
@pytest.mark.parametrize("lo_x", [1, -128])
def test_linear_zp_shifted_activation_range(lo_x, gather_path):
    """Activations whose smallest value is ``lo_x`` (1, or -128 for signed 8-bit), with
    per-output ``Zw`` and ``Zx``: the indices are ``value - lo_x`` and the row sums of values
    add ``K lo_x`` (mutants ``x_gather_linear_zp__mutmut_20`` .. ``_23``: the scalar path's
    indices not shifted for ``lo_x`` 1 or any, or shifted by ``+lo_x``; ``_32``: the row sums
    ``- K lo_x``)."""
    rng = np.random.default_rng(abs(lo_x))
    na = 20 if lo_x == 1 else 256
    m, k, n = 5, 11, 3
    table = rng.integers(-1000, 30000, (na, 16))
    xv, wi = rng.integers(lo_x, lo_x + na, (m, k)), rng.integers(0, 16, (n, k))
    xv[0, 0], xv[1, 1] = lo_x, lo_x + na - 1
    zw = np.array([3, -2, 5])
    got = run_linear(table, xv, lo_x, wi, 0, 4, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, lo_x, wi, 0, 4, zw))


@needs_numba
def test_linear_zp_returns_int32(gather_path):
    """The accumulators are int32, as documented, on either path (mutants
    ``x_gather_linear_zp__mutmut_26`` / ``_28``: the scalar path's output array in float64)."""
    rng = np.random.default_rng(85)
    table = rng.integers(0, 1000, (16, 16))
    xv, wi = rng.integers(0, 16, (3, 6)), rng.integers(0, 16, (4, 6))
    zw = np.array([0, 1, 2, 3])
    got = run_linear(table, xv, 0, wi, 0, 2, zw)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, 0, 2, zw))


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_zp_half_precision_activations(dtype, gather_path):
    """float16 and bfloat16 activation codes (signed 8-bit, exact in either type): the
    brute-force sum on either path (mutant ``x_gather_linear_zp__mutmut_18``: the scalar
    path's indices kept in the activations' float type, which numba does not take for
    float16 and numpy not for bfloat16)."""
    rng = np.random.default_rng(86)
    table = rng.integers(0, 1000, (256, 16))
    xv, wi = rng.integers(-128, 128, (4, 6)), rng.integers(0, 16, (3, 6))
    zw = np.array([1, 2, 3])
    prep = K.gather_linear_prep(torch.from_numpy(wi), 0, torch.from_numpy(table), -128, 2, zw)
    got = K.gather_linear_zp(torch.from_numpy(xv).to(dtype), -128, prep)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, -128, wi, 0, 2, zw))


@needs_numba
def test_linear_prep_declines_zero_points_whose_int64_products_would_wrap(gather_path):
    """A bug the mutation review found: the constants were int64 numpy products, so
    ``Zx = 2**62`` times a weight sum of 4 wrapped to 0, the bound passed and the layer
    returned 120 instead of about -1.8e19. In Python integers the bound sees the true
    constant and the fused path declines (the caller takes the plain path)."""
    table = torch.arange(64, dtype=torch.int64).reshape(8, 8) + 100
    w = torch.tensor([[4]])
    assert K.gather_linear_prep(w, 0, table, 0, 1 << 62, np.zeros(1, np.int64)) is None
    assert K.gather_linear_prep(w, 0, table, 0, 0, np.full(1, 1 << 62, np.int64)) is None


# Second review (session 8, after the prep took the cached byte planes and Python-integer
# constants): the names below are mutmut's numbers on that code.

@needs_numba
def test_linear_prep_without_the_byte_shuffle_makes_no_byte_planes(monkeypatch):
    """With ``APPMULT_NO_BYTE_SHUFFLE=1`` the prep takes the uint16 table and the call the
    scalar loops: the byte-shuffle planes (128 KB per table, the kernel's only) are never
    made, and the result is the brute-force sum (mutant ``x_gather_linear_prep__mutmut_47``:
    the planes taken whether or not the byte shuffle is available, the uint16 table left to
    the call)."""
    from appmult.nn import byte_shuffle

    def no_planes(t16):
        raise AssertionError("byte planes made with the byte shuffle switched off")

    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    monkeypatch.setattr(byte_shuffle, "planes", no_planes)
    rng = np.random.default_rng(91)
    table = rng.integers(-500, 4000, (16, 16))
    xv, wi = rng.integers(0, 16, (3, 10)), rng.integers(0, 16, (4, 10))
    zw = np.array([2, 0, 5, 1])
    got = run_linear(table, xv, 0, wi, 0, 3, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, 0, 3, zw))


@needs_numba
@pytest.mark.parametrize(("k", "c"), [(1, (1 << 31) - 1), (1 << 16, (1 << 15) - 1)])
def test_linear_prep_takes_a_constant_table_up_to_the_int32_bound(k, c, gather_path):
    """A constant table (every entry ``c``, offset entries all 0) with ``K c`` just below
    ``2**31``: the fused path applies and returns ``K c`` exactly (mutant
    ``x_gather_linear_prep__mutmut_69``: the largest offset entry taken as at least 1, so the
    bound counts ``K`` more and the prep declines)."""
    table = np.full((16, 16), c, np.int64)
    rng = np.random.default_rng(92)
    xv, wi = rng.integers(0, 16, (2, k)), rng.integers(0, 16, (2, k))
    got = run_linear(table, xv, 0, wi, 0, 0, None)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), np.full((2, 2), k * c))


@needs_numba
def test_linear_prep_weight_values_past_2_53_whose_cross_terms_cancel(gather_path):
    """Weight values of ``2**53 + 3`` (``lo_w = 2**53 + 1``) equal to their zero point, with
    ``Zx = 1`` and one activation value (0, a one-row table: the bound's ``Zw`` term is 0):
    the cross terms cancel and the result is the table entry exactly (mutant
    ``x_gather_linear_prep__mutmut_73``: the weight sums in float64, where ``2**53 + 3``
    rounds to ``2**53 + 2``, so the constant is off by one)."""
    table = np.array([[3, 10, 17, 24]])
    lo_w = (1 << 53) + 1
    xv, wi, zw = np.array([[0]]), np.array([[2]]), np.array([lo_w + 2])
    got = run_linear(table, xv, 0, wi, lo_w, 1, zw)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 0, wi, lo_w, 1, zw))
    np.testing.assert_array_equal(got.numpy(), [[17]])


@needs_numba
def test_linear_prep_declines_offset_sums_past_int32_whatever_the_weight_range(gather_path):
    """A table spanning 65,535 over K = 65,536 (``K * span`` past int32) with ``lo_w = 2**47``
    (``K lo_w`` past int64): ``None`` on either path, before any weight sum (mutants
    ``x_gather_linear_prep__mutmut_59`` / ``_64``: the uint16 table built against int64's
    limit, so the int64 weight sums are computed first and raise ``OverflowError``)."""
    table = torch.tensor([[0, 65535], [1, 2]], dtype=torch.int64)
    b = torch.zeros((1, 1 << 16), dtype=torch.int64)
    assert K.gather_linear_prep(b, 1 << 47, table, 0, 0, np.array([0])) is None


@needs_numba
def test_linear_prep_of_no_outputs_at_the_largest_reduction(gather_path):
    """No outputs (``N = 0``) over K = 2**31 - 1 on a 2 x 2 table spanning 1 (activation values
    0 and 1): the bound is exactly ``K = 2**31 - 1``, so the prep applies and the call gives
    the empty ``(0, 0)`` int32 accumulator; one more step (K = 2**31) and it declines
    (mutants ``x_gather_linear_prep__mutmut_110``: no constants counted as 1, bound 2**31;
    ``_119``: no zero points counted as 1, ``+ K * 1``)."""
    table = torch.tensor([[0, 1], [1, 0]])
    k = (1 << 31) - 1
    prep = K.gather_linear_prep(torch.zeros((0, k), dtype=torch.int64), 0, table, 0, 0, None)
    assert prep is not None
    got = K.gather_linear_zp(torch.zeros((0, k)), 0, prep)
    assert got.shape == (0, 0) and got.dtype == torch.int32
    assert K.gather_linear_prep(torch.zeros((0, k + 1), dtype=torch.int64), 0, table, 0, 0, None) is None


def test_linear_prep_declines_weight_ranges_whose_int64_sums_would_wrap(gather_path):
    """A bug the second mutation review found: the weight sums ``sum_k value(w) = sum index +
    K lo_w`` were int64 numpy, so ``lo_w = 2**63 - 1`` wrapped and a one-row table (whose
    ``Zw`` bound term is 0) gave 7 instead of ``7 - 2**64``. In Python integers the bound
    sees the true constant and the fused path declines."""
    table = torch.tensor([[5, 7]], dtype=torch.int64)
    w = torch.tensor([[1]])
    assert K.gather_linear_prep(w, (1 << 63) - 1, table, 0, 1, np.array([-(1 << 63)], np.int64)) is None


@pytest.mark.numba
def test_linear_prep_is_a_snapshot_of_the_table_for_both_paths(gather_path, monkeypatch):
    """The prep holds both 16-bit forms of the table as it was: a product computed after an
    in-place write to the table gives the same integers on both paths (before, the scalar
    path rebuilt its table at call time and the byte shuffle kept the prep's planes)."""
    rng = np.random.default_rng(21)
    table = torch.from_numpy(rng.integers(0, 1000, (256, 256)))
    w = torch.from_numpy(rng.integers(0, 256, (4, 8)))
    q = torch.from_numpy(rng.integers(0, 256, (3, 8))).to(torch.float32)
    prep = K.gather_linear_prep(w, 0, table, 0, 0, None)
    ref = table.numpy()[q.numpy().astype(np.int64)[:, None, :], w.numpy()[None, :, :]].sum(2)
    table.mul_(3)
    np.testing.assert_array_equal(K.gather_linear_zp(q, 0, prep).numpy(), ref)


# Third review (session 8, after the prep took both cached 16-bit tables): mutmut's numbers on
# that code.

@needs_numba
def test_linear_zp_of_an_empty_reduction(gather_path):
    """``K = 0`` (a linear layer without inputs), with zero points on both sides: every
    accumulator is the empty sum, 0, on both paths (mutant ``x_gather_linear_zp__mutmut_9``:
    ``m / k * nout`` chooses the path, a ``ZeroDivisionError`` where the byte shuffle has its
    planes)."""
    table = np.arange(256, dtype=np.int64).reshape(16, 16) + 7
    wi = np.zeros((3, 0), np.int64)
    xv = np.zeros((4, 0), np.int64)
    zw = np.array([1, 0, 4])
    got = run_linear(table, xv, 1, wi, -2, 5, zw)
    assert got.dtype == torch.int32 and got.shape == (4, 3)
    np.testing.assert_array_equal(got.numpy(), brute(table, xv, 1, wi, -2, 5, zw))
