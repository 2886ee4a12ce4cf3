"""Tests written for surviving mutants of ``appmult.nn.functional`` (mutmut, first full run).

Each test checks behaviour against an independent reference (numpy brute-force sums of
``LUT[qx, qw]`` with the zero-point cross terms folded into the table, explicit float32 /
float64 roundings) and its docstring names the behaviour the surviving mutants broke. Where
the behaviour is a documented path choice (the ``APPMULT_NO_FUSED_*`` switches, the
caller's weight-side ``cache``, the automatic kernel choice's probe), a spy on the fused
function checks that it ran (or did not) in addition to the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import LutTables, approx_conv2d, approx_linear, lut_conv2d, lut_linear
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn import kernels as K
from conftest import exact as msg
from test_nn_forward import brute_conv
from test_nn_luts import exact, values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A4 = np.arange(16)[:, None]
B4 = np.arange(16)[None, :]
#: unsigned 4-bit LUT of rank 3 whose factors carry value(x) (the fused low-rank paths apply)
RANK3 = A4 * B4 + (A4 % 3) * (B4 % 5) + 1000
V8 = values(8, True)
#: signed 8-bit LUT of rank 2 (an exact factorization: the automatic choice has two
#: candidates) with sums far above 2**24
BIG_SIGNED = 16000 + np.outer(V8, V8)


def unsigned(p: np.ndarray, width: int = 4) -> LutFile:
    return LutFile(p, width_a=width, width_b=width, signed=False)


def zp_table(p: np.ndarray, zx: float, zw: float) -> np.ndarray:
    """``LUT[a, b] - a Zw - Zx b + Zx Zw`` for unsigned codes: its brute-force sum is the
    accumulator with the cross terms."""
    n = p.shape[0]
    a, b = np.arange(n)[:, None], np.arange(p.shape[1])[None, :]
    return p - a * zw - zx * b + zx * zw


def t32(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def linear_ref(p: np.ndarray, qx: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return p[qx[:, None, :], qw[None, :, :]].sum(-1)


@pytest.fixture
def probing(monkeypatch):
    """Probing on, with a fake probe that picks ``probing.choice`` without timing and
    records the keys it was asked about."""
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")

    class Probe:
        choice = "lowrank"
        keys: list = []

        @staticmethod
        def __call__(key, candidates, device):
            Probe.keys.append(key)
            assert Probe.choice in candidates
            return Probe.choice

    probe = Probe()
    Probe.keys = []
    monkeypatch.setattr(K, "probe_choice", probe)
    return probe


class Spy:
    """Counts the calls of a module function (replaced in place by monkeypatch)."""

    def __init__(self, monkeypatch, modules, name):
        self.calls = 0
        real = getattr(modules[0], name)

        def wrapped(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        for m in modules:
            monkeypatch.setattr(m, name, wrapped)


# -- the automatic kernel choice: what the probed call passes on ------------------------------

def conv_case(seed=1):
    rng = np.random.default_rng(seed)
    qx = rng.integers(0, 16, (2, 4, 7, 7))
    qw = rng.integers(0, 16, (4, 2, 3, 3))
    zx, zw = 3.0, 2.0
    bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ref = brute_conv(zp_table(RANK3, zx, zw), 4, qx, zx, qw, 2, 1, 2, 2) * 0.125 + bias.numpy().reshape(1, -1, 1, 1)
    args = (t32(qx), torch.tensor(0.5), torch.tensor(zx), t32(qw), torch.tensor(0.25), torch.tensor(zw), bias)
    return args, ref.astype(np.float32)


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_approx_conv2d_probed_call_passes_geometry_bias_lut_and_cache(kernel, probing):
    """With an ``auto`` table and probing on, the call run under the chosen kernel gets the
    stride, padding, dilation, groups, bias, LUT and the caller's cache (mutants: one of
    them dropped or ``None`` in the recursive call)."""
    probing.choice = kernel
    args, ref = conv_case()
    tabs = LutTables(unsigned(RANK3))
    assert len(tabs.auto_candidates) == 2
    cache: dict = {}
    y = approx_conv2d(*args, tabs, stride=2, padding=1, dilation=2, groups=2, cache=cache)
    np.testing.assert_array_equal(y.numpy(), ref)
    assert [k[0] for k in probing.keys] == ["conv2d"]
    if kernel == "lowrank":  # the fused low-rank path's weight-side tables
        assert cache


def big_signed_conv():
    rng = np.random.default_rng(0)
    c = rng.integers(-128, 128, (1, 192, 3, 3))
    w = rng.integers(-128, 128, (8, 192, 3, 3))
    acc = brute_conv(BIG_SIGNED, 8, c, 0, w, 1, 0, 1, 1)
    scale = np.float32(3 / 128) * np.float32(1 / 128)
    exact_y = (acc * np.float64(scale)).astype(np.float32)
    float32_y = np.float32(acc.astype(np.float32) * scale)
    assert acc.min() > (1 << 24) and (exact_y != float32_y).any()  # the data discriminates
    zero = torch.zeros(())
    args = (t32(c), torch.tensor(3 / 128), zero, t32(w), torch.tensor(1 / 128), zero, None)
    return args, acc, exact_y


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_approx_conv2d_probed_call_is_exact(kernel, probing):
    """``exact=True`` reaches the call run under the chosen kernel: the exact LUT sum, scaled
    with one rounding (mutants: ``exact`` dropped or ``None`` in the recursive call)."""
    probing.choice = kernel
    args, _, exact_y = big_signed_conv()
    y = approx_conv2d(*args, LutTables(LutFile(BIG_SIGNED, width_a=8, width_b=8, signed=True)), exact=True)
    np.testing.assert_array_equal(y.numpy(), exact_y)


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_lut_conv2d_probes_and_stays_exact(kernel, probing):
    """lut_conv2d of an ``auto`` table takes the probe (keyed ``lut_conv2d``), and
    ``exact=True`` reaches the probed call: float64, the exact sum (mutants: no probe;
    ``exact=None`` in the probed call)."""
    probing.choice = kernel
    args, acc, _ = big_signed_conv()
    tabs = LutTables(LutFile(BIG_SIGNED, width_a=8, width_b=8, signed=True))
    y = lut_conv2d(args[0], args[3], tabs, exact=True)
    assert y.dtype == torch.float64
    np.testing.assert_array_equal(y.numpy(), acc.astype(np.float64))
    assert [k[0] for k in probing.keys] == ["lut_conv2d"]


def big_signed_linear():
    rng = np.random.default_rng(1)
    c = rng.integers(-128, 128, (4, 1500))
    w = rng.integers(-128, 128, (4, 1500))
    acc = BIG_SIGNED[c[:, None, :] & 255, w[None, :, :] & 255].sum(-1)
    scale = np.float32(3 / 128) * np.float32(1 / 128)
    exact_y = (acc * np.float64(scale)).astype(np.float32)
    float32_y = np.float32(acc.astype(np.float32) * scale)
    assert acc.min() > (1 << 24) and (exact_y != float32_y).any()  # the data discriminates
    zero = torch.zeros(())
    return (t32(c), torch.tensor(3 / 128), zero, t32(w), torch.tensor(1 / 128), zero, None), exact_y


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_approx_linear_probed_call_passes_bias_exact_and_cache(kernel, probing):
    """With an ``auto`` table and probing on, the call under the chosen kernel gets the bias,
    ``exact`` and the caller's cache (mutants: ``None`` or nothing in their place)."""
    probing.choice = kernel
    rng = np.random.default_rng(2)
    qx, qw = rng.integers(0, 16, (3, 5)), rng.integers(0, 16, (4, 5))
    zx, zw = 3.0, 2.0
    bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ref = (linear_ref(zp_table(RANK3, zx, zw), qx, qw) * 0.125 + bias.numpy()).astype(np.float32)
    cache: dict = {}
    y = approx_linear(t32(qx), torch.tensor(0.5), torch.tensor(zx), t32(qw), torch.tensor(0.25), torch.tensor(zw),
                      bias, LutTables(unsigned(RANK3)), cache=cache)
    np.testing.assert_array_equal(y.numpy(), ref)
    assert cache and [k[0] for k in probing.keys] == ["linear"]
    args, exact_y = big_signed_linear()
    y = approx_linear(*args, LutTables(LutFile(BIG_SIGNED, width_a=8, width_b=8, signed=True)), exact=True)
    np.testing.assert_array_equal(y.numpy(), exact_y)


# -- lut_conv2d's defaults, message and _check_codes -------------------------------------------

def test_lut_conv2d_defaults_stride_one_float32():
    """Without arguments lut_conv2d is stride 1, float32 (mutants: default stride 2, default
    ``exact=True``)."""
    rng = np.random.default_rng(3)
    qx, qw = rng.integers(0, 16, (1, 2, 5, 5)), rng.integers(0, 16, (3, 2, 2, 2))
    y = lut_conv2d(t32(qx), t32(qw), LutTables(unsigned(RANK3)))
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), brute_conv(RANK3, 4, qx, 0, qw, 1, 0, 1, 1).astype(np.float32))


def test_lut_conv2d_names_itself_when_refusing_codes():
    """The message names lut_conv2d (mutants: another name, or ``None``)."""
    qx = torch.zeros(1, 1, 3, 3)
    qx[0, 0, 1, 1] = 16
    with pytest.raises(InvalidValueError, match=msg(
            "lut_conv2d: quantized activations must be integers in [0, 15] (the LUT's operand range), "
            "got values in [0, 16]")):
        lut_conv2d(qx, torch.zeros(1, 1, 2, 2), LutTables(unsigned(RANK3)))


def test_check_codes_refuses_one_past_the_lut():
    """A code just past the LUT's last one (16 for 4 bits) is refused (mutant: the range
    end off by two)."""
    with pytest.raises(InvalidValueError, match=msg(
            "lut_linear: quantized weights must be integers in [0, 15] (the LUT's operand range), "
            "got values in [0, 16]")):
        lut_linear(torch.zeros(2, 3), t32([[0, 16, 1]]), LutTables(unsigned(RANK3)))


def test_check_codes_checks_weights_of_an_empty_batch():
    """With no activations the weights are still checked (mutant: ``break`` after the empty
    activations)."""
    with pytest.raises(InvalidValueError, match=msg(
            "lut_linear: quantized weights must be integers in [0, 15] (the LUT's operand range), "
            "got values in [-1, 3]")):
        lut_linear(torch.zeros(0, 3), t32([[-1, 3, 1]]), LutTables(unsigned(RANK3)))


# -- the fused-path switches ----------------------------------------------------------------

def switch_case(fn):
    rng = np.random.default_rng(4)
    zx, zw = 3.0, 2.0
    if fn == "linear":
        qx, qw = rng.integers(0, 16, (3, 6)), rng.integers(0, 16, (4, 6))
        ref = linear_ref(zp_table(RANK3, zx, zw), qx, qw) * 0.125
        call = approx_linear
    else:
        qx, qw = rng.integers(0, 16, (1, 2, 5, 5)), rng.integers(0, 16, (3, 2, 3, 3))
        ref = brute_conv(zp_table(RANK3, zx, zw), 4, qx, zx, qw, 1, 1, 1, 1) * 0.125

        def call(*a, **kw):
            return approx_conv2d(*a, padding=1, **kw)
    args = (t32(qx), torch.tensor(0.5), torch.tensor(zx), t32(qw), torch.tensor(0.25), torch.tensor(zw), None)
    return call, args, ref.astype(np.float32)


@pytest.mark.parametrize("fn", ["linear", "conv"])
@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
@pytest.mark.parametrize("override, env, fused", [
    (None, None, True), (None, "1", False), (False, None, False), (True, "1", True), (True, None, True)])
def test_fused_switches(fn, kernel, override, env, fused, monkeypatch):
    """``APPMULT_NO_FUSED_LOWRANK`` / ``APPMULT_NO_FUSED_GATHER`` turn their fused path off;
    the module override (``_FUSED_*``) wins over the environment either way; the other
    kernel's fused path is never taken instead (mutants: another variable name, the
    override ignored or read as ``False``, the gather branch taken for a low-rank table,
    the fused gather or low-rank weights never computed)."""
    name = "LOWRANK" if kernel == "lowrank" else "GATHER"
    for n in ("LOWRANK", "GATHER"):
        monkeypatch.delenv(f"APPMULT_NO_FUSED_{n}", raising=False)
    if env:
        monkeypatch.setenv(f"APPMULT_NO_FUSED_{name}", env)
    monkeypatch.setattr(FN, f"_FUSED_{name}", override)
    fold = Spy(monkeypatch, [FN], "_folded_lowrank_weights")
    gather = Spy(monkeypatch, [FN], "_gather_linear_zp" if fn == "linear" else "_gather_conv_zp")
    call, args, ref = switch_case(fn)
    y = call(*args, LutTables(unsigned(RANK3), kernel=kernel))
    np.testing.assert_array_equal(y.numpy(), ref)
    ours, other = (fold, gather) if kernel == "lowrank" else (gather, fold)
    assert ours.calls == (1 if fused else 0) and other.calls == 0


def test_conv_exact_lowrank_takes_no_gather_path(monkeypatch):
    """``exact=True`` on a low-rank table takes the plain float64 path, not the gather
    kernel's fused one (mutant: the gather branch taken for any kernel)."""
    gather = Spy(monkeypatch, [FN], "_gather_conv_zp")
    call, args, ref = switch_case("conv")
    y = call(*args, LutTables(unsigned(RANK3), kernel="lowrank"), exact=True)
    np.testing.assert_array_equal(y.numpy(), ref)
    assert gather.calls == 0


def big_zero_point_conv():
    """An unsigned 8-bit exact LUT, ``Zx = 0``, ``Zw = 128``, 514 channels of a 1x1 kernel:
    the folded low-rank weights are exact in float32 (``514 * 128 * 255 < 2**24``) while
    the plain LUT sum is odd and above ``2**24``, so converting it to float32 rounds; 512
    positions, enough for the numba gather conv (``2 * 256``)."""
    rng = np.random.default_rng(5)
    qx = rng.integers(250, 256, (1, 514, 16, 32))
    qw = rng.integers(130, 137, (2, 514, 1, 1))
    lut_sum = np.einsum("nchw,oc->nohw", qx, qw[:, :, 0, 0])
    acc = np.einsum("nchw,oc->nohw", qx, qw[:, :, 0, 0] - 128)
    assert lut_sum.min() > (1 << 24) and (lut_sum % 2 == 1).any() and np.abs(acc).max() < (1 << 24)
    one = torch.tensor(1.0)
    args = (t32(qx), one, torch.tensor(0.0), t32(qw), one, torch.tensor(128.0), None)
    return args, acc.astype(np.float32)


@pytest.mark.numba
@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_approx_conv2d_fused_path_exact_where_the_plain_one_rounds(kernel):
    """The fused conv paths give the exact accumulator where the plain path's float32 LUT
    sum rounds (mutants: the folded weights or the gather accumulator never computed, the
    gather branch skipped for gather tables)."""
    args, acc = big_zero_point_conv()
    y = approx_conv2d(*args, LutTables(unsigned(exact(8, False), 8), kernel=kernel))
    np.testing.assert_array_equal(y.numpy(), acc)


# -- the caller's weight-side cache ------------------------------------------------------------

@pytest.mark.parametrize("fn, kernel", [("linear", "lowrank"), ("linear", "gather"), ("conv", "lowrank")])
def test_cache_is_used_and_keyed_by_zero_point_and_table(fn, kernel, monkeypatch):
    """A second call with the same cache reuses the weight-side tables; another activation
    zero point or another LUT gets its own (mutants: the cache not passed, keys ``None`` or
    without the table). (The fused gather conv keeps no weight-side tables.)"""
    name = "_folded_lowrank_weights" if kernel == "lowrank" else "_gather_linear_prep"
    spy = Spy(monkeypatch, [FN], name)
    rng = np.random.default_rng(6)
    p2 = RANK3 + 3 * A4 * (B4 % 2)
    tabs1, tabs2 = (LutTables(unsigned(p), kernel=kernel) for p in (RANK3, p2))
    if fn == "linear":
        qx, qw = rng.integers(0, 16, (3, 6)), rng.integers(0, 16, (4, 6))
    else:
        qx, qw = rng.integers(0, 16, (1, 2, 5, 5)), rng.integers(0, 16, (3, 2, 3, 3))
    cache: dict = {}
    one, zw = torch.tensor(1.0), 2.0
    for tabs, p, zx, calls in ((tabs1, RANK3, 3.0, 1), (tabs1, RANK3, 3.0, 1), (tabs1, RANK3, 5.0, 2),
                               (tabs2, p2, 5.0, 3)):
        if fn == "linear":
            ref = linear_ref(zp_table(p, zx, zw), qx, qw)
            y = approx_linear(t32(qx), one, torch.tensor(zx), t32(qw), one, torch.tensor(zw), None, tabs, cache=cache)
        else:
            ref = brute_conv(zp_table(p, zx, zw), 4, qx, zx, qw, 1, 1, 1, 1)
            y = approx_conv2d(t32(qx), one, torch.tensor(zx), t32(qw), one, torch.tensor(zw), None, tabs,
                              padding=1, cache=cache)
        np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))
        assert spy.calls == calls


def test_rank1_conv_cache_is_used_and_keyed(monkeypatch):
    """The rank-1 shifted conv's weights and bias are computed once per cache, zero point and
    LUT, and reused by the next call (mutants: not cached, cached as ``None`` or not passed
    on; keys ``None`` or without the table -- a stale bias or weight then)."""
    spy = Spy(monkeypatch, [FN, FU], "_rank1_prep")
    rng = np.random.default_rng(7)
    qx, qw = rng.integers(0, 16, (1, 2, 5, 5)), rng.integers(0, 16, (3, 2, 3, 3))
    p1, p3 = exact(4, False), 3 * exact(4, False)
    tabs1, tabs3 = LutTables(unsigned(p1)), LutTables(unsigned(p3))
    assert tabs1.u_is_value and tabs3.u_is_value
    cache: dict = {}
    one, zw = torch.tensor(1.0), 2.0
    for tabs, p, zx, calls in ((tabs1, p1, 3.0, 1), (tabs1, p1, 3.0, 1), (tabs1, p1, 5.0, 2), (tabs3, p3, 5.0, 3)):
        ref = brute_conv(zp_table(p, zx, zw), 4, qx, zx, qw, 1, 1, 1, 1)
        y = approx_conv2d(t32(qx), one, torch.tensor(zx), t32(qw), one, torch.tensor(zw), None, tabs, padding=1,
                          cache=cache)
        np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))
        assert spy.calls == calls


# -- exact multiplication (tabs=None) and the plain path's dtypes --------------------------------

@pytest.mark.parametrize("padding", [(1, 0), (0, 2)])
@pytest.mark.parametrize("exact_acc", [False, True])
def test_approx_conv2d_without_tables_zero_points_and_geometry(padding, exact_acc):
    """``tabs=None``: ``(x - Zx)(w - Zw)`` summed, padding with ``Zx`` on one side only,
    dilation and groups, float32 out also when accumulating in float64 (mutants: padding
    only when both sides pad, dilation/groups dropped, ``+`` for a zero point, operands not
    converted to the accumulation dtype)."""
    rng = np.random.default_rng(8)
    qx, qw = rng.integers(0, 16, (2, 4, 7, 8)), rng.integers(0, 16, (4, 2, 2, 3))
    zx, zw = 3.0, 2.0
    ph, pw = padding
    xp = np.pad(qx, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=int(zx))
    ref = brute_conv(zp_table(exact(4, False), zx, zw), 4, xp, zx, qw, 1, 0, 2, 2) * 0.125
    y = approx_conv2d(t32(qx), torch.tensor(0.5), torch.tensor(zx), t32(qw), torch.tensor(0.25), torch.tensor(zw),
                      None, None, padding=padding, dilation=2, groups=2, exact=exact_acc)
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("exact_acc", [False, True])
def test_approx_linear_without_tables_zero_points(exact_acc):
    """``tabs=None``: ``(x - Zx) @ (w - Zw)^T``, also accumulating in float64 (mutants: ``+``
    for a zero point, an operand not converted to the accumulation dtype)."""
    rng = np.random.default_rng(9)
    qx, qw = rng.integers(0, 16, (3, 5)), rng.integers(0, 16, (4, 5))
    ref = (qx - 3.0) @ (qw - 2.0).T * 0.125
    y = approx_linear(t32(qx), torch.tensor(0.5), torch.tensor(3.0), t32(qw), torch.tensor(0.25), torch.tensor(2.0),
                      None, None, exact=exact_acc)
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def float32_dequantize(acc: np.ndarray, s64: float, b64: np.ndarray) -> np.ndarray:
    """float32 arithmetic: the scale and bias rounded to float32, then ``s * acc + b`` in float32."""
    return s64.astype(np.float32) * acc.astype(np.float32) + b64.astype(np.float32)


@pytest.mark.parametrize("fn, kernel", [("linear", None), ("conv", None), ("conv", "lowrank"),
                                        ("conv", "gather")])
def test_float64_scale_and_bias_with_float32_activations(fn, kernel):
    """float32 activations are dequantized in float32 even with float64 scales and bias: the
    scale and the bias are converted first, not the sum done in float64 and rounded once
    (mutants: ``.to(None)`` for the scale or the bias). Per-channel float64 weight scales: a
    0-dim float64 scale would not promote a float32 tensor anyway."""
    rng = np.random.default_rng(10)
    sw64 = np.array([0.3, 0.7, 0.11, 0.13, 0.9])
    sx, sw = torch.tensor(0.1, dtype=torch.float64), torch.from_numpy(sw64)
    zx, zw = 3.0, 2.0
    tabs = None if kernel is None else LutTables(unsigned(RANK3), kernel=kernel)
    p = exact(4, False) if kernel is None else RANK3
    if fn == "linear":
        qx, qw = rng.integers(0, 16, (6, 7)), rng.integers(0, 16, (5, 7))
        acc = linear_ref(zp_table(p, zx, zw), qx, qw)
        b64 = rng.standard_normal(5) * 0.03 * np.abs(acc).mean()  # the bias as large as the outputs
        y = approx_linear(t32(qx), sx, torch.tensor(zx), t32(qw), sw, torch.tensor(zw), torch.from_numpy(b64), tabs)
        bb = b64[None, :]
        s64 = 0.1 * sw64[None, :]
    else:
        qx, qw = rng.integers(0, 16, (2, 2, 6, 6)), rng.integers(0, 16, (5, 2, 3, 3))
        acc = brute_conv(zp_table(p, zx, zw), 4, qx, zx, qw, 1, 1, 1, 1)
        b64 = rng.standard_normal(5) * 0.03 * np.abs(acc).mean()
        y = approx_conv2d(t32(qx), sx, torch.tensor(zx), t32(qw), sw, torch.tensor(zw), torch.from_numpy(b64), tabs,
                          padding=1)
        bb = b64.reshape(1, -1, 1, 1)
        s64 = 0.1 * sw64.reshape(1, -1, 1, 1)
    ref = float32_dequantize(acc, s64, bb)
    # the data discriminates: float64 scaling or a float64 bias round differently
    assert (np.float32(s64 * acc + np.float32(bb).astype(np.float64)) != ref).any()
    assert (np.float32(s64.astype(np.float32) * acc.astype(np.float32) + bb) != ref).any()
    assert y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), ref)


def test_approx_conv2d_fused_gather_exact_returns_activation_dtype(monkeypatch):
    """``exact=True`` on the fused gather path accumulates in float64 and returns float32
    (the activations' dtype) (mutant: no final cast on the fused path). 36 positions: enough
    for the numba gather conv of a 4-bit LUT (``2 * 16``)."""
    gather = Spy(monkeypatch, [FN], "_gather_conv_zp")
    rng = np.random.default_rng(11)
    qx, qw = rng.integers(0, 16, (1, 2, 8, 8)), rng.integers(0, 16, (3, 2, 3, 3))
    ref = brute_conv(zp_table(RANK3, 3.0, 2.0), 4, qx, 3.0, qw, 1, 0, 1, 1) * 0.125
    y = approx_conv2d(t32(qx), torch.tensor(0.5), torch.tensor(3.0), t32(qw), torch.tensor(0.25), torch.tensor(2.0),
                      None, LutTables(unsigned(RANK3), kernel="gather"), exact=True)
    assert y.dtype == torch.float32 and gather.calls == 1
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))


def test_plain_path_cross_terms_of_float16_operands():
    """float16 codes on the plain (exact, low-rank) path: the cross terms' operand sums are
    taken in the accumulation dtype -- a float16 sum of codes above 2048 would round
    (mutants: ``.to(None)`` before the activation or weight sums)."""
    rng = np.random.default_rng(12)
    p = exact(8, False)
    tabs = LutTables(unsigned(p, 8))
    zx, zw = 100.0, 90.0
    # linear, float16 weights (float32 output)
    qx, qw = rng.integers(0, 256, (3, 64)), rng.integers(0, 256, (4, 64))
    assert (torch.tensor(qw, dtype=torch.float16).sum(1).double().numpy() != qw.sum(1)).any()
    assert (torch.tensor(qx, dtype=torch.float16).sum(1).double().numpy() != qx.sum(1)).any()
    acc = (qx - zx) @ (qw - zw).T
    one = torch.tensor(1.0)
    y = approx_linear(t32(qx), one, torch.tensor(zx), torch.tensor(qw, dtype=torch.float16), one, torch.tensor(zw),
                      None, tabs, exact=True)
    np.testing.assert_array_equal(y.numpy(), acc.astype(np.float32))
    # linear, float16 activations (float16 output of the exact float64 result)
    y = approx_linear(torch.tensor(qx, dtype=torch.float16), torch.tensor(1 / 64), torch.tensor(zx), t32(qw),
                      torch.tensor(1 / 64), torch.tensor(zw), None, tabs, exact=True)
    np.testing.assert_array_equal(y.numpy(), (acc / 4096).astype(np.float16))
    # conv, float16 weights
    qx, qw = rng.integers(0, 256, (1, 8, 4, 4)), rng.integers(0, 256, (3, 8, 3, 3))
    assert (torch.tensor(qw, dtype=torch.float16).sum((1, 2, 3)).double().numpy() != qw.sum((1, 2, 3))).any()
    ref = brute_conv(zp_table(p, zx, zw), 8, qx, zx, qw, 1, 0, 1, 1)
    y = approx_conv2d(t32(qx), one, torch.tensor(zx), torch.tensor(qw, dtype=torch.float16), one, torch.tensor(zw),
                      None, tabs, exact=True)
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))
