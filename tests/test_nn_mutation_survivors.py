"""Tests written for mutants of appmult.nn that survived mutation testing (mutmut).

Each group covers one function; every test checks behaviour against an independent
reference (numpy brute-force sums of ``LUT[qa, qb]``, exact messages, the exact product),
and its docstring says which behaviour the surviving mutants broke. Operands are built on
the quantization grid (integer codes times a scale the quantizer recovers exactly), so the
references need no rounding model except where rounding is the point of the test.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch
from torch import nn

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import (GradMode, Kernel, LutMismatchError, LutTables, MissingGradientError, approx_conv2d,
                        approx_linear, approx_matmul)
from appmult.nn import autograd as AG
from appmult.nn import functional as FN
from appmult.nn import kernels as K
from conftest import exact as msg
from test_nn_forward import brute_conv
from test_nn_luts import codes, exact, mitchell_like, random_lut, values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def signed_lut(table: np.ndarray, width: int, **kw) -> LutFile:
    return LutFile(table, width_a=width, width_b=width, signed=True, **kw)


def on_grid(c: np.ndarray, step: float) -> torch.Tensor:
    """Signed float32 operands ``c * step``: with ``-2**(w-1)`` among the codes, per-tensor
    symmetric quantization recovers ``step`` as the scale and ``c`` as the codes exactly."""
    return torch.from_numpy(c.astype(np.float64) * step).float()


def signed_codes(rng, shape, width: int) -> np.ndarray:
    c = rng.integers(-(1 << (width - 1)), 1 << (width - 1), size=shape)
    c.flat[0] = -(1 << (width - 1))  # the range's end: scale = amax / 2**(w-1) = step
    return c


def matmul_ref(p: np.ndarray, width: int, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """``sum_k LUT[code(a_mk), code(b_kn)]``, batch dimensions broadcast by numpy."""
    return p[codes(ca, width)[..., :, :, None], codes(cb, width)[..., None, :, :]].sum(-2)


@pytest.fixture
def fresh_tables_cache(monkeypatch):
    """An empty approx_matmul table cache for this test only."""
    monkeypatch.setattr(FN, "_tables_lru", collections.OrderedDict())


# -- approx_matmul ---------------------------------------------------------------------------

MITCHELL6S = mitchell_like(6, True)


@pytest.mark.parametrize("shape_a, shape_b", [
    ((2, 3, 5), (5, 4)),          # only a batched
    ((3, 5), (2, 5, 4)),          # only b batched
    ((2, 3, 5), (2, 1, 5, 4)),    # b's batch broadcasts against a's
    ((2, 1, 3, 5), (3, 5, 4)),
])
def test_approx_matmul_broadcasts_batch_dimensions(shape_a, shape_b, fresh_tables_cache):
    """Batch dimensions broadcast like torch.matmul; each output is the LUT sum of its row of
    ``a`` and column of ``b``, and a signed LUT quantizes both operands symmetrically.
    (Mutants: the batch shape from one operand only or the wrong slice of a shape, ``b``
    expanded over the wrong dimensions, the quantizers built unsigned.)"""
    rng = np.random.default_rng(0)
    ca, cb = signed_codes(rng, shape_a, 6), signed_codes(rng, shape_b, 6)
    lut = signed_lut(MITCHELL6S, 6)
    y = approx_matmul(on_grid(ca, 1 / 8), on_grid(cb, 1 / 4), lut)
    ref = matmul_ref(MITCHELL6S, 6, ca, cb) / 32
    assert y.shape == torch.Size(np.broadcast_shapes(shape_a[:-2], shape_b[:-2]) + (shape_a[-2], shape_b[-1]))
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("shape_a, shape_b", [((0, 3, 5), (0, 5, 4)), ((3, 5), (0, 5, 4)), ((0, 3, 5), (5, 4))])
def test_approx_matmul_empty_batch(shape_a, shape_b, fresh_tables_cache):
    """An empty batch gives an empty ``(0, M, N)`` result instead of failing (mutants: the
    empty case stacked, or shaped from dimensions a 2-D operand lacks)."""
    y = approx_matmul(torch.rand(shape_a), torch.rand(shape_b), signed_lut(MITCHELL6S, 6))
    assert y.shape == (0, 3, 4) and y.dtype == torch.float32


def test_approx_matmul_half_inputs_quantize_in_float32(fresh_tables_cache):
    """float16 operands are quantized in float32 (``x / s`` in float16 would round to other
    codes) and the result comes back as float16 (mutants: no float32 copy, no final cast)."""
    rng = np.random.default_rng(28)
    a = torch.from_numpy(rng.standard_normal((64, 1))).half()
    b = torch.from_numpy(rng.standard_normal((1, 64))).half()

    def quantize(x: torch.Tensor) -> tuple[np.ndarray, np.float32]:
        x32 = x.float().numpy()
        s = np.float32(np.abs(x32).max()) / np.float32(32)
        return np.clip(np.rint(x32 / s), -32, 31).astype(np.int64), s

    (qa, sa), (qb, sb) = quantize(a), quantize(b)
    # the data discriminates: float16 division would give other codes, in both operands
    for x, q, s in ((a, qa, sa), (b, qb, sb)):
        assert (torch.clamp(torch.round(x / torch.tensor(s)), -32, 31) != torch.from_numpy(q)).any()
    p = exact(6, True)
    y = approx_matmul(a, b, signed_lut(p, 6))
    assert y.dtype == torch.float16
    ref = matmul_ref(p, 6, qa, qb) * (np.float64(sa) * np.float64(sb))
    np.testing.assert_allclose(y.float().numpy(), ref, rtol=2e-3, atol=0)


@pytest.mark.parametrize("operand", ["a", "b"])
def test_approx_matmul_refuses_non_finite(operand, fresh_tables_cache):
    """NaN or Inf in either operand is refused with the function's name in the message."""
    ops = {"a": torch.rand(2, 3), "b": torch.rand(3, 2)}
    ops[operand][1, 1] = float("nan") if operand == "a" else float("inf")
    with pytest.raises(InvalidValueError, match=msg(
            "approx_matmul input contains NaN or Inf; approximate layers quantize their inputs and cannot "
            "represent non-finite values")):
        approx_matmul(ops["a"], ops["b"], signed_lut(MITCHELL6S, 6))


def big_sum_case():
    """A high-rank 8-bit LUT with entries 8000..16000 and K = 1500: int32 sums just above
    2**24, where float32 holds only even integers. Scales 3/128 and 1/128: the product
    3/2**14 is not a power of two, so scaling a rounded sum rounds again."""
    rng = np.random.default_rng(0)
    p = rng.integers(8000, 16001, size=(256, 256))
    ca, cb = signed_codes(rng, (4, 1500), 8), signed_codes(rng, (1500, 4), 8)
    acc = matmul_ref(p, 8, ca, cb)
    scale = np.float32(3 / 128) * np.float32(1 / 128)
    exact_y = (acc * np.float64(scale)).astype(np.float32)            # one rounding
    float32_y = np.float32(acc.astype(np.float32) * scale)            # sum rounded to float32, then scaled
    assert acc.min() > (1 << 24) and (exact_y != float32_y).any()     # the data discriminates
    return signed_lut(p, 8), on_grid(ca, 3 / 128), on_grid(cb, 1 / 128), exact_y, float32_y


def test_approx_matmul_exact_accumulation(fresh_tables_cache):
    """``exact=True`` reaches every batch element's product: the result is the exact LUT sum
    scaled with one rounding (mutant: ``exact`` not passed on)."""
    lut, a, b, exact_y, _ = big_sum_case()
    np.testing.assert_array_equal(approx_matmul(a, b, lut, exact=True).numpy(), exact_y)


def test_approx_matmul_default_is_the_float32_path(fresh_tables_cache):
    """The default is the float32 training path of the module notes (the int32 sum converted
    to float32, then scaled); pins the default ``exact=False`` (mutant: default ``True``)."""
    lut, a, b, _, float32_y = big_sum_case()
    np.testing.assert_array_equal(approx_matmul(a, b, lut).numpy(), float32_y)


def test_approx_matmul_two_luts_in_turn(fresh_tables_cache):
    """Each LUT computes with its own tables when several are used in turn (mutant: one
    cache key for every LUT)."""
    rng = np.random.default_rng(2)
    ca, cb = signed_codes(rng, (3, 7), 6), signed_codes(rng, (7, 2), 6)
    for p in (MITCHELL6S, random_lut(6, 4), MITCHELL6S):
        y = approx_matmul(on_grid(ca, 1 / 8), on_grid(cb, 1 / 8), signed_lut(p, 6))
        np.testing.assert_array_equal(y.numpy(), (matmul_ref(p, 6, ca, cb) / 64).astype(np.float32))


# -- _tables_for (approx_matmul's table cache) ------------------------------------------------

def test_tables_for_memoizes(fresh_tables_cache):
    """The same LUT, grad mode, kernel and device give the same LutTables object (mutants:
    nothing looked up, or nothing stored)."""
    lut = signed_lut(MITCHELL6S, 6)
    first = FN._tables_for(lut, "ste", "auto", CPU)
    assert FN._tables_for(lut, "ste", "auto", CPU) is first
    assert torch.equal(first.table, torch.tensor(lut.product))


def test_tables_for_builds_the_requested_grad_and_kernel(fresh_tables_cache):
    """The cached tables have the grad mode and kernel asked for (mutants: built with the
    defaults, ``ste`` and ``auto``). The exact product has rank 1, so ``auto`` would pick
    the low-rank kernel."""
    p = exact(6, True)
    lut = signed_lut(p, 6, gradients={"lut1d": (values(6, True), values(6, True))})
    tabs = FN._tables_for(lut, "lut1d", "gather", CPU)
    assert tabs.grad is GradMode.LUT1D and tabs.kernel is Kernel.GATHER
    auto = FN._tables_for(lut, "ste", "auto", CPU)
    assert auto.grad is GradMode.STE and auto.kernel is Kernel.LOWRANK


def test_tables_for_keeps_the_most_recent_tables(fresh_tables_cache):
    """The cache holds ``_TABLES_MAX`` tables; one more drops the least recently used
    (mutant: one fewer kept)."""
    luts = [signed_lut(random_lut(4, seed), 4) for seed in range(FN._TABLES_MAX + 1)]
    first = [FN._tables_for(lut, "ste", "gather", CPU) for lut in luts[:-1]]
    assert list(FN._tables_lru.values()) == first
    FN._tables_for(luts[-1], "ste", "gather", CPU)
    assert len(FN._tables_lru) == FN._TABLES_MAX
    assert first[0] not in FN._tables_lru.values() and first[1] in FN._tables_lru.values()


# -- approx_conv2d ----------------------------------------------------------------------------

def conv_operands(rng, n=2, cin=4, cout=4, size=6, k=3, groups=1):
    qx = signed_codes(rng, (n, cin, size, size), 6)
    qw = signed_codes(rng, (cout, cin // groups, k, k), 6)
    return qx, qw


def conv_args(qx, qw, tabs, bias=None):
    zero = torch.zeros(())
    return (torch.from_numpy(qx).float(), torch.tensor(0.5), zero, torch.from_numpy(qw).float(), torch.tensor(0.25),
            zero, bias, tabs)


def test_approx_conv2d_defaults_are_stride1_unpadded_undilated():
    """Without geometry arguments: stride 1, no padding, dilation 1 (mutants: other defaults)."""
    qx, qw = conv_operands(np.random.default_rng(0))
    y = approx_conv2d(*conv_args(qx, qw, LutTables(signed_lut(MITCHELL6S, 6))))
    ref = brute_conv(MITCHELL6S, 6, qx, 0, qw, 1, 0, 1, 1) * 0.125
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def test_approx_conv2d_passes_geometry_bias_and_lut():
    """Stride, padding, dilation, groups, bias and the LUT all reach the computation (mutants:
    one of them dropped, or ``None`` in place of the bias or the LUT)."""
    qx, qw = conv_operands(np.random.default_rng(1), size=7, groups=2)
    bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
    y = approx_conv2d(*conv_args(qx, qw, LutTables(signed_lut(MITCHELL6S, 6)), bias), stride=2, padding=1,
                      dilation=2, groups=2)
    ref = brute_conv(MITCHELL6S, 6, qx, 0, qw, 2, 1, 2, 2) * 0.125 + bias.numpy().reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def test_approx_conv2d_without_tables_multiplies_exactly():
    """``tabs=None`` is exact multiplication, with nothing to check the codes against
    (mutant: the code check run on ``None``)."""
    qx, qw = conv_operands(np.random.default_rng(2))
    y = approx_conv2d(*conv_args(qx, qw, None), padding=1)
    ref = brute_conv(exact(6, True), 6, qx, 0, qw, 1, 1, 1, 1) * 0.125
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def test_approx_conv2d_refuses_codes_outside_the_lut():
    """Activations outside the LUT's range are refused, naming approx_conv2d (mutants: another
    name in the message)."""
    qx, qw = conv_operands(np.random.default_rng(3))
    qx[0, 0, 0, 1] = 40
    with pytest.raises(InvalidValueError, match=msg(
            "approx_conv2d: quantized activations must be integers in [-32, 31] (the LUT's operand range), "
            "got values in [-32, 40]")):
        approx_conv2d(*conv_args(qx, qw, LutTables(signed_lut(MITCHELL6S, 6))))


def big_conv_case():
    """As :func:`big_sum_case`, for one 3x3 position over 192 channels (K = 1728)."""
    rng = np.random.default_rng(0)
    p = rng.integers(8000, 16001, size=(256, 256))
    qx = signed_codes(rng, (1, 192, 3, 3), 8)
    qw = signed_codes(rng, (8, 192, 3, 3), 8)
    acc = brute_conv(p, 8, qx, 0, qw, 1, 0, 1, 1)
    scale = np.float32(3 / 128) * np.float32(1 / 128)
    exact_y = (acc * np.float64(scale)).astype(np.float32)
    float32_y = np.float32(acc.astype(np.float32) * scale)
    assert acc.min() > (1 << 24) and (exact_y != float32_y).any()  # the data discriminates
    zero = torch.zeros(())
    args = (torch.from_numpy(qx).float(), torch.tensor(3 / 128), zero, torch.from_numpy(qw).float(),
            torch.tensor(1 / 128), zero, None, LutTables(signed_lut(p, 8)))
    return args, exact_y, float32_y


def test_approx_conv2d_exact_accumulation():
    """``exact=True`` reaches the computation: the exact LUT sum, scaled with one rounding
    (mutants: ``exact`` not passed on)."""
    args, exact_y, _ = big_conv_case()
    np.testing.assert_array_equal(approx_conv2d(*args, exact=True).numpy(), exact_y)


def test_approx_conv2d_default_is_the_float32_path():
    """The default is the float32 training path (int32 sum converted to float32, then scaled);
    pins the default ``exact=False`` (mutant: default ``True``)."""
    args, _, float32_y = big_conv_case()
    np.testing.assert_array_equal(approx_conv2d(*args).numpy(), float32_y)


def test_approx_conv2d_fills_the_callers_cache():
    """The weight-side tables of the fused low-rank path go into the caller's ``cache``, and a
    second call with it gives the same brute-force result (mutant: the cache not passed on)."""
    p = exact(6, False)
    rng = np.random.default_rng(4)
    qx = rng.integers(0, 64, (2, 3, 6, 6))
    qw = rng.integers(0, 64, (4, 3, 3, 3))
    tabs = LutTables(LutFile(p, width_a=6, width_b=6, signed=False))
    cache: dict = {}
    ref = (brute_conv(p, 6, qx, 0, qw, 1, 1, 1, 1) * 0.125).astype(np.float32)
    for _ in range(2):
        y = approx_conv2d(*conv_args(qx, qw, tabs), padding=1, cache=cache)
        np.testing.assert_array_equal(y.numpy(), ref)
        assert cache


# -- LutTables.describe -----------------------------------------------------------------------

def test_describe_without_metadata_high_rank_ste():
    """No spec or family: ``custom``; no integer factorization of rank <= 32 (a random
    table has full rank): ``rank>32``; STE has no gradient kernel to name."""
    p = random_lut(6, 7)
    assert np.linalg.matrix_rank(p.astype(float)) > 32
    lut = LutFile(p, width_a=6, width_b=6, signed=False)
    assert LutTables(lut).describe() == (
        f"lut={lut.lut_id} (custom, 6x6 unsigned), act=operand a, kernel=gather (rank>32), grad=ste")


def test_describe_family_rank_and_gradient_kernel():
    """The family names the LUT when there is no spec; the exact product has rank 1; rank-1
    LUT-2D gradient tables get the low-rank gradient kernel, named after the grad mode."""
    v = values(6, True).astype(np.float32)
    grads = {"lut2d": (np.tile(v, (64, 1)), np.tile(v[:, None], (1, 64)))}  # rank 1 each
    lut = signed_lut(exact(6, True), 6, gradients=grads, metadata={"family": "exact"})
    assert LutTables(lut, grad="lut2d", activation_operand="b").describe() == (
        f"lut={lut.lut_id} (exact, 6x6 signed), act=operand b, kernel=lowrank (rank=1), grad=lut2d/lowrank")


def test_describe_spec_before_family():
    lut = signed_lut(exact(6, True), 6, metadata={"spec": "exact6s", "family": "exact"})
    assert LutTables(lut).describe() == (
        f"lut={lut.lut_id} (exact6s, 6x6 signed), act=operand a, kernel=lowrank (rank=1), grad=ste")


# -- _missing_gradients -----------------------------------------------------------------------

def test_missing_gradients_lists_what_the_lut_has():
    full = np.zeros((64, 64), np.float32)
    compact = np.zeros(64, np.float32)
    lut = signed_lut(exact(6, True), 6, gradients={"lut1d": (compact, compact), "custom": (full, full)})
    with pytest.raises(MissingGradientError, match=msg(
            f"LUT {lut.lut_id} has no 'lut2d' gradient tables (it has: custom, lut1d); produce them with "
            f"`appmult characterize ... --gradients lut2d` or pass ApproxConfig(compute_missing_gradients=True) "
            f"to compute them with appmult.lut_gen.gradients")):
        LutTables(lut, grad="lut2d")


# -- LutTables state: extra state, check_state_dict, _layer_name, _load_from_state_dict ------

@pytest.fixture
def two_luts():
    ours = signed_lut(exact(4, True), 4)
    theirs = signed_lut(random_lut(4, 3), 4)
    return ours, theirs


def wrong_lut_message(name: str, ours: LutFile, saved: str) -> str:
    return msg(f"Layer '{name}' uses LUT {ours.lut_id} but the state_dict was saved with LUT {saved}; "
               f"build the model with the LUT file it was trained with")


@pytest.mark.parametrize("prefix, name", [
    ("", "<root>"),
    ("lut.", "<root>"),
    ("features.3.lut.", "features.3"),
    ("encX.lut.", "encX"),
    ("fcX.", "fcX"),
    ("blut.", "blut"),
])
def test_check_state_dict_names_the_layer(prefix, name, two_luts):
    """The mismatch message names the layer that owns the tables: the prefix without its
    trailing ``lut.`` (``<root>`` when nothing is left)."""
    ours, theirs = two_luts
    tabs = LutTables(ours)
    with pytest.raises(LutMismatchError, match=wrong_lut_message(name, ours, theirs.lut_id)):
        tabs.check_state_dict({prefix + "_extra_state": LutTables(theirs).get_extra_state()}, prefix)


def test_check_state_dict_refuses_a_non_dict_extra_state(two_luts):
    ours, _ = two_luts
    with pytest.raises(LutMismatchError, match=wrong_lut_message("<root>", ours, "None")):
        LutTables(ours).check_state_dict({"_extra_state": "not a dict"}, "")


def test_check_state_dict_compares_the_table_without_extra_state(two_luts):
    """A state_dict stripped of its extra state cannot bring another LUT's table (mutants:
    the table never looked up)."""
    ours, theirs = two_luts
    tabs = LutTables(ours)
    with pytest.raises(LutMismatchError, match=msg(
            f"Layer 'blk' uses LUT {ours.lut_id} but the state_dict holds a different LUT table; build the model "
            f"with the LUT file it was trained with")):
        tabs.check_state_dict({"blk.lut.table": torch.tensor(theirs.product)}, "blk.lut.")
    tabs.check_state_dict({"blk.lut.table": torch.tensor(ours.product)}, "blk.lut.")


def test_check_state_dict_refuses_a_table_that_is_no_tensor(two_luts):
    ours, _ = two_luts
    with pytest.raises(LutMismatchError, match=msg(
            f"Layer '<root>' uses LUT {ours.lut_id} but the state_dict holds a different LUT table; build the model "
            f"with the LUT file it was trained with")):
        LutTables(ours).check_state_dict({"table": ours.product.tolist()}, "")


def test_check_state_dict_accepts_its_table_in_another_integer_dtype(two_luts):
    ours, _ = two_luts
    LutTables(ours).check_state_dict({"table": torch.tensor(ours.product, dtype=torch.int32)}, "")


def test_extra_state_carries_hash_and_activation_operand(two_luts):
    ours, _ = two_luts
    tabs = LutTables(ours, activation_operand="b")
    assert tabs.get_extra_state() == {"lut_sha256": ours.sha256, "activation_operand": "b"}
    fresh = LutTables(ours, activation_operand="b")
    fresh.load_state_dict(tabs.state_dict())  # round trip with operand b


def test_extra_state_refuses_another_activation_operand(two_luts):
    ours, _ = two_luts
    with pytest.raises(LutMismatchError, match=msg(
            "State_dict maps activations to LUT operand 'b' but the layer maps them to 'a'")):
        LutTables(ours).load_state_dict(LutTables(ours, activation_operand="b").state_dict())


def test_extra_state_without_operand_means_operand_a(two_luts):
    """State saved before the activation operand was recorded loads into an operand-``a``
    layer (mutants: another default)."""
    ours, _ = two_luts
    LutTables(ours).load_state_dict({"table": torch.tensor(ours.product), "_extra_state": {
        "lut_sha256": ours.sha256}})


def test_set_extra_state_refuses_another_lut(two_luts):
    """Called directly (no prefix), the message names the root (mutants: another prefix)."""
    ours, theirs = two_luts
    with pytest.raises(LutMismatchError, match=wrong_lut_message("<root>", ours, theirs.lut_id)):
        LutTables(ours).set_extra_state({"lut_sha256": theirs.sha256, "activation_operand": "a"})


def test_load_state_dict_reports_missing_and_unexpected_keys(two_luts):
    """torch's strict-loading reports reach the caller (mutants: ``strict``, ``missing_keys``
    or ``unexpected_keys`` not passed on)."""
    ours, _ = two_luts
    tabs = LutTables(ours)
    extra = tabs.get_extra_state()
    with pytest.raises(RuntimeError, match=msg(
            'Error(s) in loading state_dict for LutTables:\n\tMissing key(s) in state_dict: "table". ')):
        tabs.load_state_dict({"_extra_state": extra})
    assert tabs.load_state_dict({"_extra_state": extra}, strict=False).missing_keys == ["table"]
    with pytest.raises(RuntimeError, match=msg(
            'Error(s) in loading state_dict for LutTables:\n\tUnexpected key(s) in state_dict: "bogus". ')):
        tabs.load_state_dict({**tabs.state_dict(), "bogus": torch.zeros(1)})
    assert tabs.load_state_dict({**tabs.state_dict(), "bogus": torch.zeros(1)}, strict=False).unexpected_keys == [
        "bogus"]


def test_load_state_dict_reports_copy_errors(two_luts):
    """A table that cannot be copied (a meta tensor holds no data) is reported as torch's
    loading error (mutant: ``error_msgs`` not passed on)."""
    ours, _ = two_luts
    tabs = LutTables(ours)
    sd = {"table": torch.empty((16, 16), dtype=torch.int64, device="meta"), "_extra_state": tabs.get_extra_state()}
    with pytest.raises(RuntimeError, match="^" + re.escape(
            'Error(s) in loading state_dict for LutTables:\n\tWhile copying the parameter named "table"')):
        tabs.load_state_dict(sd)


def test_load_state_dict_in_a_model_names_the_layer(two_luts):
    ours, theirs = two_luts
    model = nn.ModuleDict({"encX": nn.ModuleDict({"lut": LutTables(ours)})})
    other = nn.ModuleDict({"encX": nn.ModuleDict({"lut": LutTables(theirs)})})
    with pytest.raises(LutMismatchError, match=wrong_lut_message("encX", ours, theirs.lut_id)):
        model.load_state_dict(other.state_dict())


# -- kernels._torch_gather (the device-agnostic gather; CPU without numba) --------------------

@pytest.fixture
def torch_gather(monkeypatch):
    """The torch path, in blocks of a few reductions so that ``k`` is split into chunks."""
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    monkeypatch.setattr(K, "_TORCH_BLOCK", 60)


def gather_case(groups=2, nbatch=2, kg=7, ng=3, length=5, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 16, (nbatch, groups * kg, length))
    b = rng.integers(0, 16, (groups * ng, kg))
    return a, b


def gather_ref(table, a, b, groups):
    """``out[n, j, i] = sum_k table[a[n, g*Kg+k, i], b[j, k]]`` by loops."""
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    out = np.zeros((nbatch, nout, length), np.int64)
    for n in range(nbatch):
        for j in range(nout):
            g = j // ng
            for i in range(length):
                out[n, j, i] = sum(int(table[a[n, g * kg + k, i], b[j, k]]) for k in range(kg))
    return out


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64])
def test_torch_gather_forward_chunked_groups(out_dtype, torch_gather):
    """Chunks over ``k`` add up, each group reads its own columns, and the sums stay integers
    of ``out_dtype`` (int64 above 2**24: a float32 accumulator would round)."""
    a, b = gather_case()
    big = 1 << 22 if out_dtype == torch.int64 else 1000
    table = np.random.default_rng(1).integers(big // 2, big, (16, 16)) * 2 + 1  # odd entries
    y = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(table), 2, out_dtype)
    assert y.dtype == out_dtype
    np.testing.assert_array_equal(y.numpy(), gather_ref(table, a, b, 2))


def test_torch_gather_grad_a_and_b(torch_gather):
    """Both backward gathers against loops: ``ga[n, g*Kg+k, i] = sum_j grad[n,j,i] T[a, b[j,k]]``,
    ``gb[j, k] = sum_{n,i} grad[n,j,i] T[a[n, g*Kg+k, i], b[j,k]]``, chunked over ``k``."""
    a, b = gather_case()
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // 2
    rng = np.random.default_rng(2)
    table = rng.standard_normal((16, 16)).astype(np.float32)
    grad = rng.standard_normal((nbatch, nout, length)).astype(np.float32)
    ga_ref = np.zeros((nbatch, ktot, length))
    gb_ref = np.zeros((nout, kg))
    for n in range(nbatch):
        for j in range(nout):
            g = j // ng
            for k in range(kg):
                t = table[a[n, g * kg + k], b[j, k]].astype(np.float64) * grad[n, j]
                ga_ref[n, g * kg + k] += t
                gb_ref[j, k] += t.sum()
    ta, tb, tt, tg = (torch.from_numpy(x) for x in (a, b, table, grad))
    ga, gb = K.gather_grad_a(ta, tb, tt, tg, 2), K.gather_grad_b(ta, tb, tt, tg, 2)
    assert ga.dtype == gb.dtype == torch.float32
    np.testing.assert_allclose(ga.numpy(), ga_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb.numpy(), gb_ref, rtol=1e-5, atol=1e-5)


def test_torch_gather_keeps_dtype_and_device_against_torch_defaults(torch_gather):
    """The results live on the operands' device in the table's dtype whatever torch's defaults
    are (on a GPU the torch path is the only one; here the default device is set to ``meta``
    and the default dtype to float64 to show the same thing on a CPU)."""
    a, b = gather_case(seed=3)
    table = np.random.default_rng(4).integers(0, 100, (16, 16))
    grad = torch.ones((2, 6, 5))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):
            fwd = K.gather_forward(ta, tb, torch.from_numpy(table), 2, torch.int64)
            ga = K.gather_grad_a(ta, tb, torch.from_numpy(table), grad, 2)
            gb = K.gather_grad_b(ta, tb, torch.from_numpy(table), grad, 2)
    finally:
        torch.set_default_dtype(previous)
    assert (fwd.device, ga.device, gb.device) == (CPU, CPU, CPU)
    assert (fwd.dtype, ga.dtype, gb.dtype) == (torch.int64, torch.float32, torch.float32)
    np.testing.assert_array_equal(fwd.numpy(), gather_ref(table, a, b, 2))


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("which", ["a", "b"])
def test_gather_grads_refuse_indices_outside_the_table(which, numba, monkeypatch):
    """Both backward gathers name the operand whose indices are out of range (rows for
    activations, columns for weights) before any kernel reads them."""
    if not numba:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    a, b = gather_case()
    table, grad = torch.ones((16, 16)), torch.ones((2, 6, 5))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if which == "a":
        ta[1, 2, 3] = 16
        message = f"Activation indices outside the table's 16 rows: values in [{a.min()}, 16]"
    else:
        tb[0, 1] = 20
        message = f"Weight indices outside the table's 16 columns: values in [{b.min()}, 20]"
    for fn in (K.gather_grad_a, K.gather_grad_b):
        with pytest.raises(IndexError, match=msg(message)):
            fn(ta, tb, table, grad, 2)


# -- autograd._linear_backward and _linear_zp_backward ---------------------------------------

def unsigned_operands(rng, m, k, n, width=4):
    """Unsigned integer codes (codes are values): ``(m, k)`` activations, ``(n, k)`` weights."""
    qx = rng.integers(0, 1 << width, (m, k))
    qw = rng.integers(0, 1 << width, (n, k))
    return qx, qw


def ste_zp_grads(qx, qw, zx, zw, g):
    """The STE gradients of ``sum_k (qx qw - qx zw - zx qw + zx zw)``: ``dL/dqx = G (qw - zw)``,
    ``dL/dqw = G^T (qx - zx)``, in float64 (``zw`` one value per output)."""
    return g @ (qw - zw[:, None]), g.T @ (qx - zx)


def test_lut_linear_exact_backward_in_grad_dtype():
    """With ``exact=True`` the accumulator is float64, so its gradient arrives as float64
    while the codes are float32: the STE backward computes in the gradient's dtype and
    returns the codes' dtype, ``dL/dqx = G qw``, ``dL/dqw = G^T qx`` (mutants: a code
    operand left float32 in a float64 GEMM)."""
    rng = np.random.default_rng(40)
    cx, cw = signed_codes(rng, (3, 5), 6), signed_codes(rng, (4, 5), 6)
    qx = torch.tensor(cx, dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float32, requires_grad=True)
    y = FN.lut_linear(qx, qw, LutTables(signed_lut(MITCHELL6S, 6)), exact=True)
    assert y.dtype == torch.float64
    g = rng.standard_normal((3, 4))
    y.backward(torch.from_numpy(g))
    assert qx.grad.dtype == qw.grad.dtype == torch.float32
    np.testing.assert_allclose(qx.grad.numpy(), g @ cw, rtol=1e-6)
    np.testing.assert_allclose(qw.grad.numpy(), g.T @ cx, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_signed_lut_zero_points_take_no_part_in_the_backward(kernel):
    """A signed LUT has no cross terms: given zero points, the layers' internal
    ``_approx_linear`` ignores them in forward (the fused low-rank and gather paths) and so
    in backward, ``dL/dqx = G qw`` (mutant: the cross terms' gradients added for signed
    LUTs too). The public ``approx_linear`` refuses such zero points (next test)."""
    rng = np.random.default_rng(41)
    cx, cw = signed_codes(rng, (3, 5), 4), signed_codes(rng, (4, 5), 4)
    p = exact(4, True)
    tabs = LutTables(signed_lut(p, 4), kernel=kernel)
    qx = torch.tensor(cx, dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float32, requires_grad=True)
    one = torch.tensor(1.0)
    y = FN._approx_linear(qx, one, torch.tensor(3.0), qw, one, torch.tensor(-2.0), None, tabs)
    np.testing.assert_array_equal(y.detach().numpy(), matmul_ref(p, 4, cx, cw.T).astype(np.float32))
    g = rng.standard_normal((3, 4)).astype(np.float32)
    y.backward(torch.from_numpy(g))
    np.testing.assert_allclose(qx.grad.numpy(), g.astype(np.float64) @ cw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qw.grad.numpy(), g.T.astype(np.float64) @ cx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", ["approx_linear", "approx_conv2d"])
@pytest.mark.parametrize("zx, zw", [(3.0, 0.0), (0.0, -2.0)])
def test_signed_lut_refuses_zero_points(fn, zx, zw):
    """With a signed LUT no cross terms are computed, so the functional API refuses non-zero
    zero points instead of dropping them (before: a silently wrong output)."""
    tabs = LutTables(signed_lut(exact(4, True), 4))
    one = torch.tensor(1.0)
    if fn == "approx_linear":
        qx, qw = torch.zeros(2, 3), torch.zeros(4, 3)
        call = lambda: approx_linear(qx, one, torch.tensor(zx), qw, one, torch.tensor(zw), None, tabs)  # noqa: E731
    else:
        qx, qw = torch.zeros(1, 2, 3, 3), torch.zeros(4, 2, 2, 2)
        call = lambda: approx_conv2d(qx, one, torch.tensor(zx), qw, one, torch.tensor(zw), None, tabs)  # noqa: E731
    with pytest.raises(InvalidValueError, match=msg(
            f"{fn}: a signed LUT takes symmetrically quantized operands (zero points 0), got activation zero "
            f"point [{zx}] and weight zero points [{zw}]; quantize symmetrically or use an unsigned LUT")):
        call()


@pytest.mark.parametrize("grad", ["ste", "lut1d"])
def test_zero_point_backward_of_float64_operands(grad):
    """Float64 codes and per-channel zero points through the fused low-rank path (whose
    accumulator is float32, so the gradient is float32): the cross terms' gradients
    ``-G Zw``, ``-Zx G`` are computed in the gradient's dtype (mutants: a float64 operand or
    zero point left in a float32 GEMM). LUT-1D: ``dL/dqx = G (g_a(qw) - Zw)``,
    ``dL/dqw = G^T (g_b(qx) - Zx)``."""
    rng = np.random.default_rng(42)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    p = exact(4, False)
    ga_c, gb_c = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    lut = LutFile(p, width_a=4, width_b=4, signed=False, gradients={"lut1d": (ga_c, gb_c)})
    tabs = LutTables(lut, grad=grad, kernel="lowrank")  # the fused low-rank path, not a probe's choice
    zx, zw = 3.0, np.array([1.0, 2.0, 3.0, 4.0])
    qx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    y = approx_linear(qx, one, torch.tensor(zx, dtype=torch.float64), qw, torch.ones((4, 1), dtype=torch.float64),
                      torch.from_numpy(zw[:, None]), None, tabs)
    ref = (cx[:, None, :] - zx) * (cw[None, :, :] - zw[None, :, None])
    np.testing.assert_array_equal(y.detach().numpy(), ref.sum(-1))
    g = rng.standard_normal((3, 4))
    y.backward(torch.from_numpy(g))
    gx_ref, gw_ref = ste_zp_grads(cx, cw, zx, zw, g) if grad == "ste" else \
        ste_zp_grads(gb_c[cx].astype(np.float64), ga_c[cw].astype(np.float64), zx, zw, g)
    np.testing.assert_allclose(qx.grad.numpy(), gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qw.grad.numpy(), gw_ref, rtol=1e-5, atol=1e-5)


def test_zero_point_backward_float64_gradient_per_tensor_zero_point():
    """The fused gather path returns float64 for float64 codes, so the gradient is float64;
    with a per-tensor weight zero point the LUT-1D cross term ``-G Zw`` is a float64 GEMM
    (mutants: its ones vector built in the default float32)."""
    rng = np.random.default_rng(43)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    p = random_lut(4, 5) + 2000  # unsigned products, high rank: the gather kernel
    ga_c, gb_c = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    tabs = LutTables(LutFile(p, width_a=4, width_b=4, signed=False, gradients={"lut1d": (ga_c, gb_c)}),
                     grad="lut1d", kernel="gather")
    zx, zw = 5.0, 7.0
    qx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    one = torch.tensor(1.0, dtype=torch.float64)
    y = approx_linear(qx, one, torch.tensor(zx, dtype=torch.float64), qw, one, torch.tensor(zw, dtype=torch.float64),
                      None, tabs)
    ref = matmul_ref(p, 4, cx, cw.T) - cx.sum(1, keepdims=True) * zw - zx * cw.sum(1)[None, :] + 5 * zx * zw
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    g = rng.standard_normal((3, 4))
    y.backward(torch.from_numpy(g))
    gx_ref, gw_ref = ste_zp_grads(gb_c[cx].astype(np.float64), ga_c[cw].astype(np.float64), zx,
                                  np.full(4, zw), g)
    np.testing.assert_allclose(qx.grad.numpy(), gx_ref, rtol=1e-6)
    np.testing.assert_allclose(qw.grad.numpy(), gw_ref, rtol=1e-6)


def test_zero_point_backward_allocates_on_the_gradients_device():
    """The cross-term GEMM's ones vector lives on the gradient's device whatever torch's
    default device is (on a GPU the gradient is on CUDA; here the default device is ``meta``
    to show the same thing on a CPU)."""
    rng = np.random.default_rng(44)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    ga_c, gb_c = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    tabs = LutTables(LutFile(exact(4, False), width_a=4, width_b=4, signed=False,
                             gradients={"lut1d": (ga_c, gb_c)}), grad="lut1d")
    g = rng.standard_normal((3, 4)).astype(np.float32)
    args = (torch.from_numpy(g), torch.tensor(cx, dtype=torch.float32), torch.tensor(cw, dtype=torch.float32), tabs,
            torch.tensor(2.0), torch.tensor(3.0))
    with torch.device("meta"):
        gx, gw = AG._linear_backward(*args)
    assert gx.device == gw.device == CPU
    gx_ref, gw_ref = ste_zp_grads(gb_c[cx].astype(np.float64), ga_c[cw].astype(np.float64), 2.0, np.full(4, 3.0),
                                  g.astype(np.float64))
    np.testing.assert_allclose(gx.numpy(), gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw.numpy(), gw_ref, rtol=1e-5, atol=1e-5)


def test_lut2d_gather_backward_of_a_non_square_lut():
    """A 9x4-bit LUT (512 activation rows, 16 weight columns) with full LUT-2D tables of
    rank 16 (> AUTO_MAX_RANK: the gather gradient kernel): activation codes above 255 index
    their own rows, ``dL/dqx[m,k] = sum_n G[m,n] g_a[qx[m,k], qw[n,k]]`` (mutant: the
    activation indices narrowed by the column count, to uint8, wrapping)."""
    rng = np.random.default_rng(45)
    p = rng.integers(0, 1000, (512, 16))
    ga = rng.standard_normal((512, 16)).astype(np.float32)
    gb = rng.standard_normal((512, 16)).astype(np.float32)
    tabs = LutTables(LutFile(p, width_a=9, width_b=4, signed=False, gradients={"lut2d": (ga, gb)}), grad="lut2d",
                     kernel="gather")
    assert tabs.grad_kernel is Kernel.GATHER
    cx, cw = rng.integers(256, 512, (3, 5)), rng.integers(0, 16, (4, 5))
    qx = torch.tensor(cx, dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float32, requires_grad=True)
    y = FN.lut_linear(qx, qw, tabs)
    np.testing.assert_array_equal(y.detach().numpy(), p[cx[:, None, :], cw[None, :, :]].sum(-1))
    g = rng.standard_normal((3, 4)).astype(np.float32)
    y.backward(torch.from_numpy(g))
    g64 = g.astype(np.float64)
    gx_ref = np.einsum("mn,mnk->mk", g64, ga[cx[:, None, :], cw[None, :, :]].astype(np.float64))
    gw_ref = np.einsum("mn,mnk->nk", g64, gb[cx[:, None, :], cw[None, :, :]].astype(np.float64))
    np.testing.assert_allclose(qx.grad.numpy(), gx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qw.grad.numpy(), gw_ref, rtol=1e-5, atol=1e-5)


# -- kernels.gather_grad_a / gather_grad_b: float32 arithmetic -------------------------------

@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("operand", ["table", "grad"])
def test_gather_grads_compute_in_float32(operand, numba, monkeypatch):
    """Both backward gathers compute in float32 (their documented result): a float64 table or
    gradient gives exactly the result of its float32 rounding, in float32 (mutants: the
    float64 operand passed on unconverted, rounding differently or giving float64)."""
    if not numba:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    a, b = gather_case(seed=6)
    rng = np.random.default_rng(7)
    table = torch.from_numpy(rng.standard_normal((16, 16)) / 3)
    grad = torch.from_numpy(rng.standard_normal((2, 6, 5)) / 3)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if operand == "table":
        wide, rounded = (table, grad.float()), (table.float(), grad.float())
    else:
        wide, rounded = (table.float(), grad), (table.float(), grad.float())
    for fn in (K.gather_grad_a, K.gather_grad_b):
        y = fn(ta, tb, *wide, 2)
        assert y.dtype == torch.float32
        np.testing.assert_array_equal(y.numpy(), fn(ta, tb, *rounded, 2).numpy())


# -- kernels._verified (the exact-factorization check) ---------------------------------------

def test_verified_refuses_partial_sums_from_two_to_the_62():
    """A factorization whose partial-sum bound reaches ``2**62`` is refused (int64 sums of
    two such steps could overflow); one just below is accepted with its bound (mutants: the
    bound compared with ``>`` or a larger limit)."""
    one = np.ones((1, 1), np.int64)
    assert K._verified(np.array([[1 << 62]]), one << 31, one << 31) is None
    fac = K._verified(np.array([[1 << 61]]), one << 30, one << 31)
    assert fac is not None and fac.bound == 1 << 61


def test_verified_bound_of_the_zero_table():
    """The zero table's factorization adds nothing to a partial sum: bound 0 (mutant: at
    least 1)."""
    fac = K._verified(np.zeros((4, 4), np.int64), np.zeros((4, 1), np.int64), np.zeros((4, 1), np.int64))
    assert fac is not None and fac.bound == 0


@pytest.mark.parametrize("shape", [(4, 8), (64, 64)])
def test_integer_factorization_of_the_zero_table(shape):
    """The zero table (numerical rank 0, also when larger than ``max_rank``) factors as one
    zero column each side: int64 ``U (rows, 1)``, ``V (cols, 1)``, bound 0 (mutants: another
    bound, float factors, the row count for both, every zero singular value counted as rank)."""
    fac = K.integer_factorization(np.zeros(shape, np.int64))
    assert fac is not None and fac.bound == 0
    assert fac.u.dtype == fac.v.dtype == np.int64
    assert fac.u.shape == (shape[0], 1) and fac.v.shape == (shape[1], 1)
    assert not fac.u.any() and not fac.v.any()


def test_integer_factorization_factors_fit_int32():
    """Echelon factors of ``2**31`` or more are refused (the tables keep float32 copies of
    them and the fused paths bound partial sums with them); ``2**31 - 1`` is accepted
    (mutants: the limit compared with ``>`` or set higher)."""
    assert K.integer_factorization(np.array([[1 << 31]])) is None
    fac = K.integer_factorization(np.array([[(1 << 31) - 1]]))
    assert fac is not None and fac.rank == 1
    np.testing.assert_array_equal(fac.u @ fac.v.T, [[(1 << 31) - 1]])


def rank_r_table(r: int, size: int = 40, seed: int = 0) -> np.ndarray:
    """``C @ H`` with ``C = [I; random]``, ``H = [I | random]``: rank ``r``, small echelon factors."""
    rng = np.random.default_rng(seed)
    c = np.concatenate([np.eye(r, dtype=np.int64), rng.integers(-2, 3, (size - r, r))])
    h = np.concatenate([np.eye(r, dtype=np.int64), rng.integers(-2, 3, (r, size - r))], axis=1)
    return c @ h


def test_integer_factorization_max_rank_default_32():
    """Rank 32 is factored, rank 33 is not by default (``max_rank=32``) but is with
    ``max_rank=33`` (mutants: default 33, or rank ``max_rank`` itself refused)."""
    t32, t33 = rank_r_table(32), rank_r_table(33, seed=1)
    assert np.linalg.matrix_rank(t32) == 32 and np.linalg.matrix_rank(t33) == 33
    fac = K.integer_factorization(t32)
    assert fac is not None and fac.rank == 32
    np.testing.assert_array_equal(fac.u @ fac.v.T, t32)
    assert K.integer_factorization(t33) is None
    assert K.integer_factorization(t33, max_rank=33).rank == 33


@pytest.mark.parametrize("given", ["values_a", "values_b"])
def test_integer_factorization_with_one_operands_values(given):
    """The exact-plus-error candidate needs the values of both operands; with only one of
    them the table's own echelon factorization is returned (mutants: the candidate built
    from a missing operand)."""
    v = values(4, True)
    table = exact(4, True) + np.eye(16, dtype=np.int64)
    fac = K.integer_factorization(table, **{given: v})
    assert fac is not None and fac.u.dtype == np.int64
    np.testing.assert_array_equal(fac.u @ fac.v.T, table)


# -- kernels._echelon (integer factorization) ------------------------------------------------

def test_integer_factorization_of_a_column_with_two_nonzeros():
    """Euclid runs until one nonzero is left in the pivot column: ``[[2, 3], [3, 5]]`` (two
    nonzeros in its first column, neither dividing the other) has an exact rank-2 integer
    factorization (mutant: Euclid stopped at two nonzeros, leaving no echelon form and no
    factorization)."""
    table = np.array([[2, 3], [3, 5]])
    fac = K.integer_factorization(table)
    assert fac is not None and fac.rank == 2
    assert fac.u.dtype == fac.v.dtype == np.int64
    np.testing.assert_array_equal(fac.u @ fac.v.T, table)


# -- autograd._linear_forward (gather path: the integer accumulator) -------------------------

@pytest.mark.parametrize("exact_acc", [False, True])
def test_lut_linear_gather_sums_of_two_to_the_31(exact_acc):
    """Two LUT entries of ``2**30`` sum to ``2**31``, one more than int32 holds: the gather
    accumulates in int64 once ``K * max|LUT|`` reaches ``2**31`` (mutants: int32 up to
    ``2**31`` inclusive or beyond, or the table's own int32 dtype)."""
    rng = np.random.default_rng(46)
    p = rng.integers(1 << 29, 1 << 30, (4, 4))
    p[3, 3] = 1 << 30
    tabs = LutTables(LutFile(p, width_a=2, width_b=2, signed=False), kernel="gather")
    cx, cw = rng.integers(0, 4, (3, 2)), rng.integers(0, 4, (2, 2))
    cx[0], cw[0] = 3, 3
    y = FN.lut_linear(torch.tensor(cx, dtype=torch.float32), torch.tensor(cw, dtype=torch.float32), tabs,
                      exact=exact_acc)
    ref = p[cx[:, None, :], cw[None, :, :]].sum(-1)
    assert ref[0, 0] == 1 << 31
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float64 if exact_acc else np.float32))


# -- functional.lut_linear -------------------------------------------------------------------

def test_lut_linear_default_is_float32():
    """Without ``exact`` the accumulators are float32 (mutant: default ``exact=True``)."""
    rng = np.random.default_rng(47)
    cx, cw = signed_codes(rng, (3, 5), 6), signed_codes(rng, (4, 5), 6)
    y = FN.lut_linear(torch.tensor(cx, dtype=torch.float32), torch.tensor(cw, dtype=torch.float32),
                      LutTables(signed_lut(MITCHELL6S, 6)))
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), matmul_ref(MITCHELL6S, 6, cx, cw.T).astype(np.float32))


def test_lut_linear_refuses_codes_outside_the_lut():
    """The message names lut_linear (mutants: another name)."""
    tabs = LutTables(signed_lut(MITCHELL6S, 6))
    with pytest.raises(InvalidValueError, match=msg(
            "lut_linear: quantized weights must be integers in [-32, 31] (the LUT's operand range), "
            "got values in [0, 35]")):
        FN.lut_linear(torch.zeros((2, 3)), torch.tensor([[0.0, 35.0, 1.0]]), tabs)


def test_lut_linear_exact_while_probing_the_kernels(monkeypatch):
    """An ``auto`` table times both kernels on the first call; ``exact=True`` reaches the
    probed computation: float64 accumulators (mutant: ``exact`` dropped under the probe)."""
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")
    rng = np.random.default_rng(48)
    cx, cw = signed_codes(rng, (3, 5), 6), signed_codes(rng, (4, 5), 6)
    tabs = LutTables(signed_lut(exact(6, True), 6), kernel="auto")
    assert len(tabs.auto_candidates) > 1
    y = FN.lut_linear(torch.tensor(cx, dtype=torch.float32), torch.tensor(cw, dtype=torch.float32), tabs, exact=True)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), cx @ cw.T)


@pytest.mark.parametrize("exact_acc", [False, True])
def test_lut_linear_of_the_zero_lut(exact_acc):
    """The all-zero LUT (every partial product dropped) factors with rank 1 and bound 0, takes
    the low-rank kernel and gives zero accumulators, exact or not (mutant: the exactness
    limit tested as ``K / bound``, a division by zero)."""
    tabs = LutTables(LutFile(np.zeros((16, 16), np.int64), width_a=4, width_b=4, signed=False), kernel="lowrank")
    assert tabs.bound == 0
    y = FN.lut_linear(torch.ones((2, 3)), torch.full((4, 3), 5.0), tabs, exact=exact_acc)
    assert y.dtype == (torch.float64 if exact_acc else torch.float32)
    np.testing.assert_array_equal(y.numpy(), np.zeros((2, 4)))


# -- fused._rank1_shifted_conv (rank-1 U = value(x) conv of qx - Zx) -------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zx", [0.0, 1.0, 3.0])
def test_approx_conv2d_rank1_unsigned_zero_points(zx, dtype):
    """A rank-1 unsigned LUT with ``U = value(x)``, ``LUT[x, w] = x * g(w)`` (``g`` drops the
    weight's low bit), with zero points: the accumulator is ``sum LUT[qx, qw] - qx Zw - Zx qw
    + Zx Zw`` with padding holding ``Zx``, here by plain float64 convs; float64 codes leave
    the float32 shifted-conv path (mutants: the shift skipped for ``Zx = 1``, the bias
    ``C + Zx sum w`` dropped, float64 codes sent into the float32 conv)."""
    rng = np.random.default_rng(49)
    qx = torch.from_numpy(rng.integers(0, 16, (2, 3, 5, 5)).astype(np.float64))
    qw = torch.from_numpy(rng.integers(0, 16, (4, 3, 3, 3)).astype(np.float64))
    v = values(4, False)
    g = v & ~1
    tabs = LutTables(LutFile(np.outer(v, g), width_a=4, width_b=4, signed=False), kernel="lowrank")
    assert tabs.u_is_value
    zw = 2.0
    one = torch.tensor(1.0, dtype=dtype)
    y = approx_conv2d(qx.to(dtype), one, torch.tensor(zx, dtype=dtype), qw.to(dtype), one,
                      torch.tensor(zw, dtype=dtype), None, tabs, padding=1)
    xp = torch.nn.functional.pad(qx, (1, 1, 1, 1), value=zx)
    lut_sum = torch.nn.functional.conv2d(xp, torch.from_numpy(g)[qw.long()].double())
    sum_x = torch.nn.functional.conv2d(xp, torch.ones((1, 3, 3, 3), dtype=torch.float64))
    ref = lut_sum - zw * sum_x - zx * qw.sum((1, 2, 3)).reshape(1, -1, 1, 1) + 27 * zx * zw
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.numpy(), ref.numpy().astype(np.float32 if dtype == torch.float32 else np.float64))


# -- autograd._zp_conv_backward (backward of the fused conv accumulators) --------------------

@pytest.mark.parametrize("padding", [(1, 0), (0, 2), (1, 2)])
def test_fused_conv_backward_with_padding_on_one_side(padding):
    """A signed exact-product LUT on the fused low-rank path, zero points given (padding holds
    ``Zx``; a signed LUT has no cross terms), padding in one dimension or both, a non-square
    input: the STE gradients are those of the plain float64 conv of the padded input, by
    torch autograd (mutants: padding applied or cropped only when both sides are padded,
    the crop sized by the width, cross terms for a signed LUT)."""
    rng = np.random.default_rng(50)
    cx = signed_codes(rng, (2, 3, 5, 7), 4)
    cw = signed_codes(rng, (4, 3, 3, 3), 4)
    tabs = LutTables(signed_lut(exact(4, True), 4), kernel="lowrank")
    zx, zw = 3.0, -2.0
    qx = torch.tensor(cx, dtype=torch.float32, requires_grad=True)
    qw = torch.tensor(cw, dtype=torch.float32, requires_grad=True)
    one = torch.tensor(1.0)
    # the internal entry (the public one refuses zero points with a signed LUT)
    y = FN._approx_conv2d(qx, one, torch.tensor(zx), qw, one, torch.tensor(zw), None, tabs, padding=padding)
    rx = torch.tensor(cx, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor(cw, dtype=torch.float64, requires_grad=True)
    ph, pw = padding
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(rx, (pw, pw, ph, ph), value=zx), rw)
    np.testing.assert_array_equal(y.detach().numpy(), ref.detach().numpy().astype(np.float32))
    g = torch.from_numpy(rng.standard_normal(tuple(ref.shape)))
    y.backward(g.float())
    ref.backward(g)
    assert qx.grad.shape == qx.shape
    np.testing.assert_allclose(qx.grad.numpy(), rx.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qw.grad.numpy(), rw.grad.numpy(), rtol=1e-5, atol=1e-5)


# -- fused._gather_linear_prep (the fused gather path's weight side) -------------------------

@pytest.mark.parametrize("zx, zw", [(2.5, 3.0), (2.0, 1.5), (2.5, 1.5)])
def test_approx_linear_gather_non_integer_zero_points(zx, zw):
    """Non-integer zero points (not what the quantizers produce, but approx_linear takes any)
    leave the integer fused gather path: the accumulator is ``sum LUT[qx, qw] - qx Zw - Zx qw
    + K Zx Zw`` with the given values (mutants: the path taken when only one zero point is
    non-integer, or when both are integers only)."""
    rng = np.random.default_rng(51)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    p = random_lut(4, 5) + 2000
    tabs = LutTables(LutFile(p, width_a=4, width_b=4, signed=False), kernel="gather")
    one = torch.tensor(1.0)
    y = approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(zx),
                      torch.tensor(cw, dtype=torch.float32), one, torch.tensor(zw), None, tabs)
    ref = matmul_ref(p, 4, cx, cw.T) - cx.sum(1, keepdims=True) * zw - zx * cw.sum(1)[None, :] + 5 * zx * zw
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_approx_linear_gather_zero_point_gradient():
    """An activation zero point that requires grad gets its gradient (the fused gather path,
    computed without autograd, is not taken): ``dL/dZx = sum_mn G (K Zw - sum_k qw)``
    (mutant: the fused path taken unless both zero points require grad)."""
    rng = np.random.default_rng(52)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    tabs = LutTables(LutFile(random_lut(4, 5) + 2000, width_a=4, width_b=4, signed=False), kernel="gather")
    one = torch.tensor(1.0)
    zx = torch.tensor(3.0, requires_grad=True)
    y = approx_linear(torch.tensor(cx, dtype=torch.float32), one, zx, torch.tensor(cw, dtype=torch.float32), one,
                      torch.tensor(2.0), None, tabs)
    g = rng.standard_normal((3, 4))
    y.backward(torch.from_numpy(g).float())
    ref = (g * (5 * 2.0 - cw.sum(1))[None, :]).sum()
    assert zx.grad is not None
    np.testing.assert_allclose(zx.grad.item(), ref, rtol=1e-5)


# -- functional.approx_linear (the public entry: checks, then _approx_linear) -----------------

def test_approx_linear_refuses_codes_outside_the_lut():
    """Activations outside the LUT's range are refused, naming approx_linear (mutants: another
    name, or none, in the message)."""
    rng = np.random.default_rng(53)
    cx, cw = signed_codes(rng, (2, 5), 6), signed_codes(rng, (3, 5), 6)
    cx[1, 2] = 40
    zero = torch.zeros(())
    with pytest.raises(InvalidValueError, match=msg(
            "approx_linear: quantized activations must be integers in [-32, 31] (the LUT's operand range), "
            "got values in [-32, 40]")):
        approx_linear(torch.tensor(cx, dtype=torch.float32), torch.tensor(1.0), zero,
                      torch.tensor(cw, dtype=torch.float32), torch.tensor(1.0), zero, None,
                      LutTables(signed_lut(MITCHELL6S, 6)))


def test_approx_linear_adds_the_bias():
    """``y = sx sw sum_k LUT[qx, qw] + bias`` (mutant: the bias not passed on)."""
    rng = np.random.default_rng(54)
    cx, cw = signed_codes(rng, (3, 7), 6), signed_codes(rng, (4, 7), 6)
    bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
    zero = torch.zeros(())
    y = approx_linear(torch.tensor(cx, dtype=torch.float32), torch.tensor(0.5), zero,
                      torch.tensor(cw, dtype=torch.float32), torch.tensor(0.25), zero, bias,
                      LutTables(signed_lut(MITCHELL6S, 6)))
    ref = matmul_ref(MITCHELL6S, 6, cx, cw.T) * 0.125 + bias.numpy()[None, :]
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def big_linear_case():
    """:func:`big_sum_case` as approx_linear operands: codes ``(4, 1500)`` and ``(4, 1500)``,
    scales 3/128 and 1/128, zero points 0 (a signed LUT)."""
    lut, a, b, exact_y, float32_y = big_sum_case()
    qx, qw = torch.round(a * (128 / 3)), torch.round(b * 128).t().contiguous()
    zero = torch.zeros(())
    args = (qx, torch.tensor(3 / 128), zero, qw, torch.tensor(1 / 128), zero, None, LutTables(lut))
    return args, exact_y, float32_y


def test_approx_linear_exact_accumulation():
    """``exact=True`` reaches the computation: the exact LUT sum, scaled with one rounding
    (mutants: ``exact`` not passed on, or passed as ``None``)."""
    args, exact_y, _ = big_linear_case()
    np.testing.assert_array_equal(approx_linear(*args, exact=True).numpy(), exact_y)


def test_approx_linear_default_is_the_float32_path():
    """The default is the float32 training path (the int32 sum converted to float32, then
    scaled); pins the default ``exact=False`` (mutant: default ``True``)."""
    args, _, float32_y = big_linear_case()
    np.testing.assert_array_equal(approx_linear(*args).numpy(), float32_y)


def test_approx_linear_fills_the_callers_cache():
    """The weight-side tables of the fused gather path go into the caller's ``cache``, and a
    second call with it gives the same brute-force result (mutant: the cache not passed on)."""
    rng = np.random.default_rng(55)
    cx, cw = unsigned_operands(rng, 3, 5, 4)
    p = random_lut(4, 6) + 2000
    tabs = LutTables(LutFile(p, width_a=4, width_b=4, signed=False), kernel="gather")
    one = torch.tensor(1.0)
    zx, zw = 3.0, 2.0
    ref = matmul_ref(p, 4, cx, cw.T) - cx.sum(1, keepdims=True) * zw - zx * cw.sum(1)[None, :] + 5 * zx * zw
    cache: dict = {}
    for _ in range(2):
        y = approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(zx),
                          torch.tensor(cw, dtype=torch.float32), one, torch.tensor(zw), None, tabs, cache=cache)
        np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))
        assert cache


# -- fused._gather_linear_prep / _gather_linear_zp (the fused gather path of approx_linear) ---

@pytest.mark.numba
def test_approx_linear_gather_rounds_the_accumulator_once(monkeypatch):
    """An unsigned 8-bit LUT on the gather kernel, per-channel weight zero points, N != K:
    the fused path computes the whole accumulator ``sum LUT - qx Zw - Zx qw + K Zx Zw`` in
    int32 and rounds it to float32 once. The sums are above 2**24, so the unfused path
    (float32 LUT sum, then each cross term in float32) rounds differently: the data
    discriminates (mutants: the fused path refused for per-channel zero points when
    N != K, never taken, or taken only off the CPU or for integer activations)."""
    rng = np.random.default_rng(56)
    p = (1 << 20) + rng.integers(0, 60000, (256, 256))
    tabs = LutTables(LutFile(p, width_a=8, width_b=8, signed=False), kernel="gather")
    m, k, n = 3, 64, 5
    cx, cw = unsigned_operands(rng, m, k, n, width=8)
    zw = rng.integers(0, 256, (n, 1))
    zx = 7
    acc = p[cx[:, None, :], cw[None, :, :]].sum(-1) - cx.sum(1, keepdims=True) * zw.T - zx * cw.sum(1)[None, :] \
        + k * zx * zw.T
    assert acc.min() > (1 << 24)
    ref = acc.astype(np.float32)  # one rounding (scales 1)
    one = torch.tensor(1.0)

    def run():
        return approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(float(zx)),
                             torch.tensor(cw, dtype=torch.float32), one, torch.tensor(zw, dtype=torch.float32),
                             None, tabs).numpy()

    np.testing.assert_array_equal(run(), ref)
    monkeypatch.setattr(FN, "_FUSED_GATHER", False)
    assert (run() != ref).any()  # the unfused path would round differently


def test_approx_linear_gather_partial_sums_from_two_to_the_31():
    """A 2-bit unsigned LUT with row 3 at 32767, K = 4, ``Zw = -178956960`` (a float32
    integer), every activation 3: the fused int32 kernel would start each output at
    ``-Zw * 12 = 2**31 - 128`` and add 4 * 32767, past int32. ``gather_linear_prep``'s bound
    (``|C| + |Zw| K max|x| + K max(t16)``) is attained here, so it must refuse the fused path
    and the result is the (float32-rounded) exact sum (mutants: the bound with a smaller
    ``max|x|``, without the table term, ``K / max|x|`` or ``|Zw| / K``, or a limit of
    ``2**32``)."""
    p = np.zeros((4, 4), np.int64)
    p[3] = 32767
    zw = -178956960.0
    tabs = LutTables(LutFile(p, width_a=2, width_b=2, signed=False), kernel="gather")
    cx = np.full((2, 4), 3)
    cw = np.random.default_rng(57).integers(0, 4, (3, 4))
    one = torch.tensor(1.0)
    y = approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(0.0),
                      torch.tensor(cw, dtype=torch.float32), one, torch.tensor(zw), None, tabs)
    ref = p[cx[:, None, :], cw[None, :, :]].sum(-1) - cx.sum(1, keepdims=True) * int(zw)
    assert ref.max() >= 1 << 31 and -int(zw) * 12 < 1 << 31
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)


def test_approx_linear_gather_without_outputs():
    """A linear layer with no outputs (``qw`` of shape ``(0, K)``) on the fused gather path
    gives an empty ``(M, 0)`` result (mutant: the bound's ``max |Zw|`` of an empty array
    without the initial 0, which raises)."""
    tabs = LutTables(LutFile(random_lut(4, 7) + 2000, width_a=4, width_b=4, signed=False), kernel="gather")
    one = torch.tensor(1.0)
    y = approx_linear(torch.ones((3, 5)), one, torch.tensor(2.0), torch.zeros((0, 5)), one, torch.tensor(1.0),
                      None, tabs)
    assert y.shape == (3, 0) and y.dtype == torch.float32


@pytest.mark.numba
def test_gather_linear_prep_refuses_weight_indices_outside_the_table():
    """The kernel names the weight operand whose indices are out of range (mutant: another
    spelling in the message)."""
    b = torch.tensor([[0, 20, 3]])
    with pytest.raises(IndexError, match=msg("Weight indices outside the table's 16 columns: values in [0, 20]")):
        K.gather_linear_prep(b, 0, torch.ones((16, 16), dtype=torch.int64), 0, 0, None)


# -- kernels.probe_choice (timed on a fake clock: each candidate advances it by its cost) ----

def fake_clock_candidates(monkeypatch, costs: dict[str, int]):
    """Candidates that advance a fake ``perf_counter`` by their integer cost, and the count of
    each one's runs."""
    import types
    now = [0]
    monkeypatch.setattr(K, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(K, "_probe_lru", collections.OrderedDict())
    calls = dict.fromkeys(costs, 0)

    def cand(name):
        def run():
            calls[name] += 1
            now[0] += costs[name]
        return run

    return {name: cand(name) for name in costs}, calls


@pytest.mark.parametrize("costs, choice", [({"a": 1, "b": 100}, "a"), ({"a": 100, "b": 1}, "b")])
def test_probe_far_apart_stops_after_the_first_rounds(costs, choice, monkeypatch):
    """Candidates 100x apart: one warm-up and :data:`PROBE_ROUNDS` timed rounds, then the
    faster one is chosen, first or second (mutants: one more round, every round run, the
    margin divided by the first's time instead of multiplied)."""
    candidates, calls = fake_clock_candidates(monkeypatch, costs)
    assert K.probe_choice(("far",), candidates, CPU) == choice
    assert calls == dict.fromkeys(costs, 1 + K.PROBE_ROUNDS)


def test_probe_at_exactly_probe_close_runs_every_round(monkeypatch):
    """The two fastest exactly :data:`PROBE_CLOSE` apart (13 and 10 time units) are "within"
    it: every round runs (mutants: stop when the ratio reaches ``PROBE_CLOSE``, or compare
    with ``PROBE_CLOSE`` divided by the faster time)."""
    assert K.PROBE_CLOSE * 10 == 13
    candidates, calls = fake_clock_candidates(monkeypatch, {"a": 10, "b": 13})
    assert K.probe_choice(("close",), candidates, CPU) == "a"
    assert calls == {"a": 1 + K.PROBE_MAX_ROUNDS, "b": 1 + K.PROBE_MAX_ROUNDS}


def test_probe_later_candidate_must_beat_the_margin(monkeypatch):
    """A later candidate exactly :data:`PROBE_MARGIN` times the first's time (97 vs 100) does
    not beat it: the first stays chosen (mutant: ``<=``)."""
    assert K.PROBE_MARGIN * 100 == 97
    candidates, _ = fake_clock_candidates(monkeypatch, {"a": 100, "b": 97})
    assert K.probe_choice(("margin",), candidates, CPU) == "a"


@pytest.mark.numba
def test_approx_linear_gather_bound_just_below_two_to_the_31(monkeypatch):
    """K = 1, a 2-bit unsigned LUT with row 3 at 30001 (offset 0), ``Zx = 0``,
    ``Zw = -715817882`` (float64): every weight-side constant is 0 and the bound
    ``|Zw| * 3 + 30001`` is ``2**31 - 1``, which int32 holds: the fused path runs and rounds the exact accumulator
    ``2**31 - 1`` to float32 once; the unfused path would round ``Zw`` first (the data
    discriminates) (mutant: the bound's ``max |C|`` with an initial 1, refusing it)."""
    p = np.zeros((4, 4), np.int64)
    p[3] = 30001
    tabs = LutTables(LutFile(p, width_a=2, width_b=2, signed=False), kernel="gather")
    zw = -715817882
    ref = np.array([[30001 - 3 * zw]])
    assert ref[0, 0] == (1 << 31) - 1
    one = torch.tensor(1.0)

    def run():
        return approx_linear(torch.tensor([[3.0]]), one, torch.tensor(0.0), torch.tensor([[2.0]]), one,
                             torch.tensor(float(zw), dtype=torch.float64), None, tabs).numpy()

    np.testing.assert_array_equal(run(), ref.astype(np.float32))
    monkeypatch.setattr(FN, "_FUSED_GATHER", False)
    assert (run() != ref.astype(np.float32)).any()


@pytest.mark.parametrize("width_a, width_b", [(9, 2), (2, 9)])
def test_approx_linear_gather_lut_over_8_bits_on_one_side(width_a, width_b):
    """A 9-bit x 2-bit unsigned LUT (either way round) on the gather kernel, with zero points:
    the fused weight-row kernel takes uint8 indices, so ``gather_linear_prep`` must refuse a
    table with more than 256 rows *or* columns, and the result is the brute-force sum
    (mutant: refused only when both sides exceed 256, the 9-bit indices wrapped)."""
    rng = np.random.default_rng(58)
    p = rng.integers(0, 1000, (1 << width_a, 1 << width_b))
    tabs = LutTables(LutFile(p, width_a=width_a, width_b=width_b, signed=False), kernel="gather")
    m, k, n = 3, 6, 4
    cx = rng.integers(0, 1 << width_a, (m, k))
    cw = rng.integers(0, 1 << width_b, (n, k))
    cx[0, 0], cw[0, 0] = (1 << width_a) - 1, (1 << width_b) - 1  # both ranges' ends
    zx, zw = 5, 2
    ref = p[cx[:, None, :], cw[None, :, :]].sum(-1) - cx.sum(1, keepdims=True) * zw - zx * cw.sum(1)[None, :] \
        + k * zx * zw
    one = torch.tensor(1.0)
    y = approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(float(zx)),
                      torch.tensor(cw, dtype=torch.float32), one, torch.tensor(float(zw)), None, tabs)
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


@pytest.mark.numba
@pytest.mark.parametrize("c", [30001, 30002])
def test_approx_linear_gather_constant_lut_bound_at_two_to_the_31(c, monkeypatch):
    """K = 1, a constant 2-bit unsigned LUT (every entry ``c``: the uint16 table is all 0),
    ``Zw = 0``, ``Zx = -715817882`` (float64), weight 3: the accumulator and the bound of
    ``gather_linear_prep`` are both ``c + 3 |Zx|``. For ``c = 30001`` that is ``2**31 - 1``,
    which int32 holds: the fused path runs and rounds the exact sum to float32 once (the
    unfused path would round ``Zx`` first: the data discriminates). For ``c = 30002`` it is
    ``2**31``, which int32 does not hold: the fused path is refused and the result is the
    float32-rounded exact sum (mutants: the bound's ``max |Zw|`` or ``max(t16)`` with an
    initial 1, refusing ``2**31 - 1``; the limit ``bound > 2**31``, wrapping ``2**31``)."""
    p = np.full((4, 4), c, np.int64)
    tabs = LutTables(LutFile(p, width_a=2, width_b=2, signed=False), kernel="gather")
    zx = -715817882
    ref = np.array([[c - zx * 3]])
    assert ref[0, 0] == (1 << 31) - 30002 + c
    one = torch.tensor(1.0)

    def run():
        return approx_linear(torch.tensor([[1.0]]), one, torch.tensor(float(zx), dtype=torch.float64),
                             torch.tensor([[3.0]]), one, torch.tensor(0.0), None, tabs).numpy()

    if c == 30001:
        np.testing.assert_array_equal(run(), ref.astype(np.float32))
        monkeypatch.setattr(FN, "_FUSED_GATHER", False)
        assert (run() != ref.astype(np.float32)).any()  # the unfused path would round differently
    else:
        np.testing.assert_allclose(run(), ref, rtol=1e-6)


# -- batch 3: fused._gather_linear_prep, gather_layouts.unfold_uint8, kernels.float_factorization ---

def test_approx_linear_gather_per_tensor_zero_point_rounds_once(monkeypatch):
    """As :func:`test_approx_linear_gather_rounds_the_accumulator_once` with one weight zero
    point for all N = 5 outputs: the fused path takes a per-tensor ``Zw`` too and rounds the
    exact int32 accumulator to float32 once; the unfused path rounds differently (the data
    discriminates) (mutant: a per-tensor zero point accepted only as a 2-element array)."""
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set: no fused gather path")
    rng = np.random.default_rng(59)
    p = (1 << 20) + rng.integers(0, 60000, (256, 256))
    tabs = LutTables(LutFile(p, width_a=8, width_b=8, signed=False), kernel="gather")
    m, k, n = 3, 64, 5
    cx, cw = unsigned_operands(rng, m, k, n, width=8)
    zx, zw = 7, 201
    acc = p[cx[:, None, :], cw[None, :, :]].sum(-1) - cx.sum(1, keepdims=True) * zw - zx * cw.sum(1)[None, :] \
        + k * zx * zw
    assert acc.min() > (1 << 24)
    ref = acc.astype(np.float32)  # one rounding (scales 1)
    one = torch.tensor(1.0)

    def run():
        return approx_linear(torch.tensor(cx, dtype=torch.float32), one, torch.tensor(float(zx)),
                             torch.tensor(cw, dtype=torch.float32), one, torch.tensor(float(zw)), None,
                             tabs).numpy()

    np.testing.assert_array_equal(run(), ref)
    monkeypatch.setattr(FN, "_FUSED_GATHER", False)
    assert (run() != ref).any()  # the unfused path would round differently


def test_approx_conv2d_gather_refuses_a_zero_point_just_past_the_lut():
    """A 4-bit unsigned LUT on the fused gather conv path with padding: an activation zero
    point of 16, one past the LUT's last row, would be the padded positions' table index;
    it is refused like any other out-of-range padding value (mutant: the range check
    ``zidx <= na``, which lets index 16 read past the 16-row table). ``approx_conv2d``
    refuses it first (session 11: every path pads with ``Zx`` as a code), so the kernel's
    own guard is called as the fused path calls it, with the last valid value beside."""
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set: no fused gather path")
    rng = np.random.default_rng(60)
    tabs = LutTables(LutFile(random_lut(4, 61) + 2000, width_a=4, width_b=4, signed=False), kernel="gather")
    qx = torch.tensor(rng.integers(0, 16, (2, 2, 5, 5)), dtype=torch.float32)
    qw = torch.tensor(rng.integers(0, 16, (3, 2, 3, 3)), dtype=torch.float32)
    one = torch.tensor(1.0)
    with pytest.raises(InvalidValueError, match="padding inserts the activation zero point as a code"):
        approx_conv2d(qx, one, torch.tensor(16.0), qw, one, torch.tensor(1.0), None, tabs, padding=1)
    from appmult.nn.gather_layouts import check_activations
    with pytest.raises(IndexError, match=msg("Padding value 16 outside the LUT's range")):
        check_activations(qx, 0, 16, 16)
    check_activations(qx, 0, 16, 15)


def within_rel_tol(fac, t: np.ndarray, rel_tol: float = 1e-6) -> bool:
    """``max |P Q^T - t| <= rel_tol max |t|``, in float64."""
    p, q = fac
    return float(np.abs(p @ q.T - t).max()) <= rel_tol * float(np.abs(t).max())


def test_float_factorization_max_rank_default_32():
    """A float table of rank 32 gets 32 columns; rank 33 gives ``None`` by default
    (``max_rank=32``) but 33 columns with ``max_rank=33`` (mutants: default 33, the loop
    stopping two ranks early or going one rank past ``max_rank``)."""
    t32, t33 = rank_r_table(32).astype(np.float64), rank_r_table(33, seed=1).astype(np.float64)
    assert np.linalg.matrix_rank(t32) == 32 and np.linalg.matrix_rank(t33) == 33
    fac = K.float_factorization(t32)
    assert fac is not None and fac[0].shape == (40, 32) and fac[1].shape == (40, 32)
    assert within_rel_tol(fac, t32)
    assert K.float_factorization(t33) is None
    fac = K.float_factorization(t33, max_rank=33)
    assert fac is not None and fac[0].shape[1] == 33 and within_rel_tol(fac, t33)


@pytest.mark.parametrize("shape", [(1, 7), (6, 1), (5, 9)])
def test_float_factorization_of_a_rank_one_table(shape):
    """A rank-1 table (an outer product; a single row or column included) gets one column
    each side (mutants: ranks counted from 2, the loop stopping early)."""
    rng = np.random.default_rng(62)
    t = np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
    fac = K.float_factorization(t)
    assert fac is not None and fac[0].shape == (shape[0], 1) and fac[1].shape == (shape[1], 1)
    assert within_rel_tol(fac, t)


@pytest.mark.parametrize("scale", [1.0, 2.0 ** -10])
def test_float_factorization_tolerance_relative_to_the_tables_own_scale(scale):
    """``rel_tol`` is relative to the table's largest magnitude, also when that is exactly 1
    or far below 1: a rank-2 table whose second component is 1e-4 of the first needs both
    (mutants: the scale at least 1, i.e. an absolute tolerance for small tables; a table of
    largest magnitude 1 taken for the zero table)."""
    rng = np.random.default_rng(63)
    a, b = rng.standard_normal((2, 8)), rng.standard_normal((2, 6))
    t = np.outer(a[0], b[0]) + 1e-4 * np.outer(a[1], b[1])
    t = t * (scale / np.abs(t).max())
    assert np.abs(t).max() == scale
    fac = K.float_factorization(t)
    assert fac is not None and fac[0].shape[1] == 2
    assert within_rel_tol(fac, t)


def test_float_factorization_of_a_float32_table_is_float64():
    """The gradient tables are float32; the SVD runs in float64 and the factors are float64
    as documented (mutants: the table's own dtype kept, a float32 SVD)."""
    t32 = (rank_r_table(3, size=12) / 8).astype(np.float32)  # exact in float32: rank 3
    fac = K.float_factorization(t32)
    assert fac is not None and fac[0].dtype == fac[1].dtype == np.float64
    assert fac[0].shape[1] == 3 and within_rel_tol(fac, t32.astype(np.float64), 1e-12)


def test_float_factorization_of_an_empty_table():
    """An empty table is the zero table: one zero column each side (mutant: its largest
    magnitude taken without the initial 0, which raises)."""
    fac = K.float_factorization(np.zeros((0, 3)))
    assert fac is not None and fac[0].shape == (0, 1) and fac[1].shape == (3, 1)
    assert not fac[1].any()
