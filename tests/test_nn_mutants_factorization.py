"""Tests written for surviving mutants (mutmut) of the factorizations, the kernel choice
(:mod:`appmult.nn.kernels`) and the fused folds (:mod:`appmult.nn.fused`).

Each test checks behaviour against an independent reference: exact integer sums in int64
(``sum_k LUT[x, w] - x Zw - Zx w + Zx Zw`` by brute force), float32 rounding of that exact
value where the fused path promises one rounding, hand-derived bounds and chunk lengths, and
the documented values of the environment switches. Its docstring says which mutants it kills.
Operands are integer-valued (already quantized) and the scales are 1, so a layer's output is
its integer accumulator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import LutTables, approx_conv2d, approx_linear
from appmult.nn import fused as FU
from appmult.nn import kernels as K

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE = torch.tensor(1.0)
L24 = 1 << 24


def value_lut(t: np.ndarray, width_a: int, width_b: int, signed: bool) -> LutFile:
    """A LUT from a table indexed by operand *values* in increasing order (``t[i, j]``: the
    ``i``-th smallest activation value times the ``j``-th smallest weight value)."""
    va = np.arange(1 << width_a) - ((1 << (width_a - 1)) if signed else 0)
    vb = np.arange(1 << width_b) - ((1 << (width_b - 1)) if signed else 0)
    prod = np.zeros_like(t)
    prod[np.ix_(va & ((1 << width_a) - 1), vb & ((1 << width_b) - 1))] = t
    return LutFile(prod, width_a=width_a, width_b=width_b, signed=signed)


def linear_ref(t: np.ndarray, lo_x: int, lo_w: int, qx, qw, zx: int, zw: int) -> np.ndarray:
    """``acc[m, j] = sum_k t[x_mk, w_jk] - x Zw - Zx w + Zx Zw`` in int64 (values, not codes)."""
    x = np.asarray(qx, np.int64)
    w = np.asarray(qw, np.int64)
    lut = t[(x - lo_x)[:, None, :], (w - lo_w)[None, :, :]]                     # (M, N, K)
    return (lut - x[:, None, :] * zw - zx * w[None, :, :] + zx * zw).sum(-1)


def f32(v) -> np.ndarray:
    """The float32 rounding of exact integers (one rounding, to nearest even)."""
    return np.asarray(v, np.int64).astype(np.float64).astype(np.float32)


# -- kernel choice and switches --------------------------------------------------------------

def test_choose_kernel_rank_boundary(monkeypatch):
    """Rank ``AUTO_MAX_RANK`` (10) itself goes to the low-rank kernel, 11 and ``None`` to the
    gather; on a CPU whose gather runs by byte shuffles the limit is ``AUTO_MAX_RANK_SHUFFLE``
    (2), on any other device still 10. (Mutant: ``rank < AUTO_MAX_RANK``.)"""
    assert K.AUTO_MAX_RANK == 10 and K.AUTO_MAX_RANK_SHUFFLE == 2
    for shuffles in (False, True):
        monkeypatch.setattr(K.byte_shuffle, "available", lambda: shuffles)
        cpu_limit = 2 if shuffles else 10
        for device in ("cpu", torch.device("cpu"), "cuda", torch.device("meta")):
            limit = cpu_limit if torch.device(device).type == "cpu" else 10
            assert K.choose_kernel(limit, device) == "lowrank"
            assert K.choose_kernel(1, device) == "lowrank"
            assert K.choose_kernel(limit + 1, device) == "gather"
            assert K.choose_kernel(None, device) == "gather"
        assert K.choose_kernel(cpu_limit) == "lowrank" and K.choose_kernel(cpu_limit + 1) == "gather"


def test_numba_switch(monkeypatch):
    """``APPMULT_NO_NUMBA`` set to a non-empty value turns the numba kernels off, and without
    numba they are off whatever the environment. (Mutants: ``or`` for ``and``, the variable's
    name changed.)"""
    monkeypatch.setattr(K.loops, "AVAILABLE", True)
    monkeypatch.delenv("APPMULT_NO_NUMBA", raising=False)
    assert K.numba_available() is True
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert K.numba_available() is False
    monkeypatch.setattr(K.loops, "AVAILABLE", False)
    monkeypatch.delenv("APPMULT_NO_NUMBA", raising=False)
    assert K.numba_available() is False


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("", False)])
def test_probe_switch(monkeypatch, value, on):
    """``APPMULT_KERNEL_PROBE`` unset or ``1``: probing on; ``0`` or empty: off.
    (Mutant: the empty string no longer counts as off.)"""
    if value is None:
        monkeypatch.delenv("APPMULT_KERNEL_PROBE", raising=False)
    else:
        monkeypatch.setenv("APPMULT_KERNEL_PROBE", value)
    assert K.probe_enabled() is on


# -- exact integer factorization -------------------------------------------------------------

VA8 = np.arange(8)
E_A = np.array([2, -2, -3, -1, -1, 2, 0, -3])
E_B = np.array([-1, 1, 2, 2, 3, -2, 3, -3])
#: the exact product plus a rank-1 error: both candidates have rank 2, the exact-plus-error
#: one the smaller bound (58 against the echelon basis' 125)
EE_TABLE = np.outer(VA8, VA8) + np.outer(E_A, E_B)
EE_BOUND = int((np.abs(np.outer(VA8, VA8)) + np.abs(np.outer(E_A, E_B))).max())


def _check_exact_plus_error(f):
    assert f is not None and f.rank == 2
    assert np.array_equal(f.u @ f.v.T, EE_TABLE)
    assert np.array_equal(f.u[:, 0], VA8) and np.array_equal(f.v[:, 0], VA8)
    # one reduction step adds at most |a b| + |e_a g_b| (rank-1 error: |u1 v1| = |error|)
    assert f.bound == EE_BOUND == 58


def test_integer_factorization_prefers_exact_plus_error():
    """With the operand values given, the exact product plus the error's factorization wins
    when its partial-sum bound is smaller at the same rank. (Mutants: the error candidate
    dropped, built from ``table + outer``, verified against ``None``, or appended only when
    its verification fails.)"""
    direct = K.integer_factorization(EE_TABLE)
    assert direct.rank == 2 and direct.bound > EE_BOUND   # what the direct basis alone gives
    _check_exact_plus_error(K.integer_factorization(EE_TABLE, values_a=VA8, values_b=VA8))


def test_cached_factorization_passes_operand_values():
    """The memoized factorization passes both operand value vectors through.
    (Mutants: ``np.ascontiguousarray(np.int64)`` instead of the values.)"""
    _check_exact_plus_error(K.cached_integer_factorization("h2-exact-plus-error", EE_TABLE, VA8, VA8))


def test_cached_factorization_default_max_rank_is_32():
    """The LUT tables' factorization (default ``max_rank``) refuses rank 33 and takes rank 32.
    (Mutant: default 33.)"""
    t33 = np.eye(33, dtype=np.int64)
    v = np.arange(33)
    assert K.cached_integer_factorization("h2-eye33", t33, v, v) is None
    f = K.cached_integer_factorization("h2-eye32", t33[:32, :32], v[:32], v[:32])
    assert f is not None and f.rank == 32 and np.array_equal(f.u @ f.v.T, t33[:32, :32])


def test_echelon_basis_has_positive_pivots():
    """The direct factorization's rows ``V.T`` are an echelon basis with positive pivots (the
    sign the LUT tables' rank-1 normalization expects), here ``[1, 2]`` with ``U = [-2, -1]``.
    (Mutant: the negative pivot's row no longer negated.)"""
    t = np.array([[-2, -4], [-1, -2]])
    f = K.integer_factorization(t)
    assert f.rank == 1 and np.array_equal(f.u @ f.v.T, t)
    assert np.array_equal(f.v[:, 0], [1, 2]) and np.array_equal(f.u[:, 0], [-2, -1])


def test_float_factorization_tolerance_is_inclusive():
    """``rel_tol`` is the largest *allowed* relative error: ``diag(1, 0.5)`` at rank 1 is off
    by exactly 0.5, accepted with ``rel_tol=0.5``; an exact rank-1 table is accepted with
    ``rel_tol=0``. (Mutant: ``<`` for ``<=``.)"""
    p, q = K.float_factorization(np.diag([1.0, 0.5]), rel_tol=0.5)
    assert p.shape == (2, 1) and q.shape == (2, 1)
    assert np.abs(p @ q.T - np.diag([1.0, 0.5])).max() == 0.5
    p, q = K.float_factorization(np.array([[2.0]]), rel_tol=0.0)
    assert p @ q.T == 2.0


# -- fused low-rank fold: exactness bounds ---------------------------------------------------

V8 = np.arange(256)
EXACT8 = np.outer(V8, V8)


def _lowrank(t, width_a, width_b, signed=False):
    return LutTables(value_lut(t, width_a, width_b, signed), kernel="lowrank")


def test_fold_splits_when_the_bias_breaks_the_float32_limit():
    """``K * step + |C|`` decides the float32 limit: here ``K * step == |C| == 16 841 475``
    (odd, above 2**24), so the fold must split (float64 ``C``); the exact accumulator
    16 764 975 is below 2**24 and comes out exactly. (Mutant: ``K * step - |C|``, which keeps
    ``C`` in float32 and is off by one.)"""
    tabs = _lowrank(EXACT8, 8, 8)
    k = 259
    qx = torch.zeros(1, k)
    qx[0, :150] = 2.0                                   # even products: the sum stays exact
    qw = torch.zeros(3, k)
    y = approx_linear(qx, ONE, torch.tensor(255.0), qw, ONE, torch.tensor(255.0), None, tabs)
    ref = linear_ref(EXACT8, 0, 0, qx.numpy(), qw.numpy(), 255, 255)
    assert ref[0, 0] == 255 * (255 * k - 300) == 16764975
    assert np.array_equal(y.numpy(), f32(ref))


def _signed_row_lut(row):
    """Signed 2-bit LUT whose only non-zero row is activation value 1: rank 1, ``U`` the
    indicator of ``x == 1``, ``V`` the row (weight values -2, -1, 0, 1)."""
    t = np.zeros((4, 4), np.int64)
    t[3] = row
    return t


def test_fold_chunk_length_keeps_each_chunk_exact():
    """Split reduction: ``step = 172 961`` (``97 * step == 2**24 + 1``), so chunks hold
    ``kc = (2**24 - 1) // step = 96`` inputs and the sum ``97 * 172 961 - 1 == 2**24`` is exact;
    the documented float64 start ``C`` and ``kc`` come back from the fold. (Mutants: ``kc``
    from ``2**24 + 1``, i.e. 97, whose chunk sum rounds; ``C`` created without a dtype, float32,
    which the linear function takes for the unsplit path.)"""
    row = np.array([172961, -1, 0, 0])
    t = _signed_row_lut(row)
    tabs = _lowrank(t, 2, 2, signed=True)
    k = 98
    qx = torch.ones(1, k)
    qw = torch.full((2, k), -2.0)
    qw[:, 97] = -1.0
    zero = torch.tensor(0.0)
    fold = FU._folded_lowrank_weights(qw.reshape(2, k, 1, 1), zero, zero, tabs, split_k=True)
    assert fold is not None
    wv, bias, kc = fold
    assert kc == (L24 - 1) // 172961 == 96
    assert bias.dtype == torch.float64 and torch.equal(bias, torch.zeros(2, dtype=torch.float64))
    y = approx_linear(qx, ONE, zero, qw, ONE, zero, None, tabs)
    ref = linear_ref(t, -2, -2, qx.numpy(), qw.numpy(), 0, 0)
    assert ref[0, 0] == L24
    assert np.array_equal(y.numpy(), f32(ref))


@pytest.mark.parametrize("big", [20_000_000, 30_000_000])
def test_fold_refuses_a_step_beyond_one_chunk(big):
    """A single reduction step of ``2**24 <= step < 2**25`` cannot be a float32-exact chunk:
    the fold refuses (the plain path computes it exactly). (Mutants: ``step / 2`` and ``and``
    for ``or`` in that guard: ``kc == 0`` and the chunk loop raises.)"""
    t = _signed_row_lut(np.array([big, 0, 0, 3]))
    tabs = _lowrank(t, 2, 2, signed=True)
    qx = torch.ones(1, 3)
    qw = torch.tensor([[-2.0, -2.0, -2.0], [1.0, -2.0, 0.0]])
    zero = torch.tensor(0.0)
    assert FU._folded_lowrank_weights(qw.reshape(2, 3, 1, 1), zero, zero, tabs, split_k=True) is None
    y = approx_linear(qx, ONE, zero, qw, ONE, zero, None, tabs)
    assert np.array_equal(y.numpy(), f32(linear_ref(t, -2, -2, qx.numpy(), qw.numpy(), 0, 0)))


def test_fold_takes_the_exact_split_path_near_the_step_limit():
    """``step = 5 592 406`` (``3 * step >= 2**24 > 2 * step``): the fold splits into exact
    chunks of 2 and rounds once, giving the exact 16 777 215; the plain path would round the
    LUT sum 16 777 221 first and subtract ``sum_x * Zw`` after (16 777 214). (Mutant: the guard
    ``3 * step``, which sends this layer to the plain path.)"""
    v = np.array([5592408, 5592405, 0, 0])
    t = np.outer([0, 1], v)                          # unsigned: x in {0, 1}, U = value(x)
    tabs = _lowrank(t, 1, 2)
    assert tabs.u_is_value
    qx = torch.ones(1, 3)
    qw = torch.tensor([[0.0, 0.0, 1.0]])
    zw = torch.tensor(2.0)
    zero = torch.tensor(0.0)
    y = approx_linear(qx, ONE, zero, qw, ONE, zw, None, tabs)
    ref = linear_ref(t, 0, 0, qx.numpy(), qw.numpy(), 0, 2)
    assert ref[0, 0] == 16777215
    assert np.array_equal(y.numpy(), f32(ref))


def test_fold_bound_of_shifted_negative_factor_entries():
    """``LUT = x (w - 3)`` (``V`` from -3 to 252, ``c = 1``) with ``Zw = 255``: the folded
    weights ``V - Zw`` reach ``|-3 - 255| = 258``, so ``step = 255 * 258`` and chunks hold 255
    inputs. 261 products of -64 515 in one chunk would sum to an odd value above 2**24 and
    round; the exact accumulator -16 773 165 is below 2**24. (Mutant: ``|V_min + shift|``, a
    bound of ``255 * 252`` and chunks of 261.)"""
    t = np.outer(V8, V8 - 3)
    tabs = _lowrank(t, 8, 8)
    assert tabs.u_is_value and tabs.value_coef == (1,)
    k = 262
    qx = torch.full((1, k), 255.0)
    qx[0, -1] = 0.0
    qw = torch.full((1, k), 5.0)
    qw[0, -1] = 255.0
    y = approx_linear(qx, ONE, torch.tensor(1.0), qw, ONE, torch.tensor(255.0), None, tabs)
    ref = linear_ref(t, 0, 0, qx.numpy(), qw.numpy(), 1, 255)
    assert ref[0, 0] == 261 * -64515 + 65250 == -16773165
    assert np.array_equal(y.numpy(), f32(ref))


def test_fold_float64_weights_when_values_and_shift_reach_2_24():
    """``V = [2**24 + 1, 2**24 + 3]`` (not float32 numbers) and ``Zw = 2**24 + 2``: the folded
    weights ``V - Zw = -1, +1`` are computed in float64 and stored as float32, so the rank-1
    conv gives the exact accumulator. (Mutants: the float32 branch chosen by
    ``vmax - shift``, which rounds ``V`` first (weights -2, +2); the final ``.to(None)``, which
    leaves float64 weights for a float32 convolution.)"""
    v = np.array([L24 + 1, L24 + 3])
    t = np.outer([0, 1], v)
    tabs = _lowrank(t, 1, 1)
    assert tabs.u_is_value
    rng = np.random.default_rng(0)
    qx = torch.from_numpy(rng.integers(0, 2, size=(1, 1, 4, 4)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(0, 2, size=(2, 1, 2, 2)).astype(np.float32))
    zw = float(L24 + 2)
    y = approx_conv2d(qx, ONE, torch.tensor(0.0), qw, ONE, torch.tensor(zw), None, tabs)
    x = qx.double().numpy()
    w = qw.double().numpy()
    ref = np.zeros((1, 2, 3, 3))
    for j in range(2):
        for i in range(3):
            for jj in range(3):
                xs = x[0, 0, i:i + 2, jj:jj + 2]
                ref[0, j, i, jj] = (xs * (v[w[j, 0].astype(int)] - zw)).sum()   # x V[w] - x Zw
    assert np.array_equal(y.double().numpy(), ref)


# -- zero points that need the plain path ----------------------------------------------------

def _conv_ref(t, qx, qw, zx, zw):
    """``sum_k t[x, w] - x Zw - Zx w + Zx Zw`` per output position (no padding, stride 1)."""
    x = qx.double().numpy().astype(np.int64)
    w = qw.double().numpy().astype(np.int64)
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    out = np.zeros((n, co, h - kh + 1, wd - kw + 1))
    for b in range(n):
        for j in range(co):
            for i in range(h - kh + 1):
                for jj in range(wd - kw + 1):
                    xs = x[b, :, i:i + kh, jj:jj + kw]
                    out[b, j, i, jj] = (t[xs, w[j]] - xs * zw - zx * w[j] + zx * zw).sum()
    return out


def _gather4():
    t = np.random.default_rng(3).integers(-200, 201, size=(16, 16))
    return t, LutTables(value_lut(t, 4, 4, False), kernel="gather")


def _conv_operands():
    rng = np.random.default_rng(4)
    qx = torch.from_numpy(rng.integers(0, 16, size=(1, 2, 8, 8)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(0, 16, size=(3, 2, 3, 3)).astype(np.float32))
    return qx, qw


def test_gather_conv_non_integer_activation_zero_point():
    """A non-integer activation zero point (integer weight zero point) is not folded into the
    integer gather rows: the plain path applies it as is. (Mutant: ``and`` for ``or`` in the
    integer check, which rounds ``Zx = 2.5`` to 2.)"""
    if not K.numba_available():
        pytest.skip("numba gather kernels not available")
    t, tabs = _gather4()
    qx, qw = _conv_operands()
    y = approx_conv2d(qx, ONE, torch.tensor(2.5), qw, ONE, torch.tensor(3.0), None, tabs)
    assert np.array_equal(y.double().numpy(), _conv_ref(t, qx, qw, 2.5, 3.0))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize("learnt", ["zx", "zw"])
def test_zero_point_gradients_skip_the_fused_paths(learnt):
    """A zero point that requires a gradient gets it (the fused paths return none for zero
    points, so they must not apply): ``d sum(y) / d Zx = sum (K Zw - sum_k w)`` and
    ``d sum(y) / d Zw = sum (K Zx - sum_k x)`` over outputs. (Mutants: ``and`` for ``or`` in
    the guards of the low-rank fold and of the fused gather conv.)"""
    zx0, zw0 = 3.0, 5.0
    zx = torch.tensor(zx0, requires_grad=learnt == "zx")
    zw = torch.tensor(zw0, requires_grad=learnt == "zw")
    # low-rank linear (exact 8-bit product, rank 1)
    lin = _lowrank(EXACT8, 8, 8)
    rng = np.random.default_rng(5)
    qx = torch.from_numpy(rng.integers(0, 256, size=(4, 6)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(0, 256, size=(3, 6)).astype(np.float32))
    y = approx_linear(qx, ONE, zx, qw, ONE, zw, None, lin)
    assert np.array_equal(y.detach().numpy(), f32(linear_ref(EXACT8, 0, 0, qx.numpy(), qw.numpy(), 3, 5)))
    y.sum().backward()
    k, m, n = 6, 4, 3
    want = m * (n * k * zw0 - qw.double().sum()) if learnt == "zx" else n * (m * k * zx0 - qx.double().sum())
    got = (zx if learnt == "zx" else zw).grad
    assert got is not None and float(got) == float(want)
    # gather conv (numba row kernel when available)
    t, tabs = _gather4()
    cx, cw = _conv_operands()
    zx.grad = zw.grad = None
    y = approx_conv2d(cx, ONE, zx, cw, ONE, zw, None, tabs)
    assert np.array_equal(y.detach().double().numpy(), _conv_ref(t, cx, cw, 3, 5))
    y.sum().backward()
    npos, kk, co = 36, 18, 3
    if learnt == "zx":
        want = npos * (co * kk * zw0 - cw.double().sum())
    else:
        xs = torch.nn.functional.unfold(cx.double(), 3).sum()       # every x of every receptive field
        want = co * (npos * kk * zx0 - xs)
    got = (zx if learnt == "zx" else zw).grad
    assert got is not None and float(got) == float(want)


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_bfloat16_zero_points(kernel):
    """Zero points held in bfloat16 (e.g. a model cast with ``.bfloat16()``; integer values, so
    exact) work on the fused paths with float32 operands: the folds convert them to float64 /
    int64 before numpy sees them. (Mutants: the conversion dropped -- ``.to(None)`` -- in the
    low-rank fold, the gather linear prep and the gather conv: numpy has no bfloat16.)"""
    t = np.outer(np.arange(16), np.arange(16) - 1)        # rank 1, U = value(x): the fold applies
    tabs = LutTables(value_lut(t, 4, 4, False), kernel=kernel)
    assert kernel == "gather" or tabs.value_coef == (1,)
    bf = torch.bfloat16
    zx, zw = torch.tensor(2.0, dtype=bf), torch.tensor(3.0, dtype=bf)
    rng = np.random.default_rng(6)
    qx = torch.from_numpy(rng.integers(0, 16, (2, 5)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(0, 16, (3, 5)).astype(np.float32))
    y = approx_linear(qx, ONE, zx, qw, ONE, zw, None, tabs)
    assert np.array_equal(y.numpy(), f32(linear_ref(t, 0, 0, qx.numpy(), qw.numpy(), 2, 3)))
    cx, cw = _conv_operands()
    y = approx_conv2d(cx, ONE, zx, cw, ONE, zw, None, tabs)
    assert np.array_equal(y.double().numpy(), _conv_ref(t, cx, cw, 2, 3))
