"""Per-call overhead of a training step (issue 12, session 14): the same bits by fewer ops.

A training forward of a small approximate layer cost ~0.7 ms whatever its size (the float
layer: 0.1 ms), most of it scalar and small torch ops re-deriving per call what a few
numba or numpy operations give. Each fast path here must give what the torch expressions
it replaces give, bit for bit (``int32``/``int64`` views, so ``-0.0`` and NaN payloads
count): the references are those torch expressions themselves, run on the same inputs
(``_torch_scale_zero_point``; the torch branch of ``_int8_value_prep`` under
``APPMULT_NO_NUMBA=1``), and numpy brute force for the layer's accumulators.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear
from appmult.nn import fused as FU
from appmult.nn import quant as Q
from appmult.nn import train_plan
from appmult.nn.tables import LutTables
from test_nn_int8_gemm import brute_acc, truncated

pytestmark = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int64)


_EDGES = [0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 3.0, -7.25, 255.0, 1e30, -1e30,
          3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("width,signed", [(2, False), (4, True), (8, False), (8, True), (12, False), (12, True)])
def test_range_scale_zero_point_is_the_torch_expressions(width, signed):
    rng = np.random.default_rng(width + 100 * signed)
    pairs = list(itertools.product(_EDGES, repeat=2))
    pairs += [tuple(v) for v in (rng.standard_normal((400, 2)) * 10.0 ** rng.integers(-6, 7, (400, 1)))]
    for lo_v, hi_v in pairs:
        lo, hi = torch.tensor(lo_v, dtype=torch.float32), torch.tensor(hi_v, dtype=torch.float32)
        fast = Q._range_scale_zero_point(lo, hi, width, signed)
        ref = Q._torch_scale_zero_point(lo, hi, width, signed)
        assert fast is not None
        for f, r in zip(fast, ref):
            assert f.shape == r.shape == () and f.dtype == r.dtype == torch.float32
            assert torch.equal(_bits(f), _bits(r)), (lo_v, hi_v, f, r)


def test_range_scale_zero_point_applies_to_float32_cpu_scalars_only(monkeypatch):
    one, two = torch.tensor(-1.0), torch.tensor(2.0)
    assert Q._range_scale_zero_point(one, two, 8, False) is not None
    assert Q._range_scale_zero_point(one.double(), two.double(), 8, False) is None
    assert Q._range_scale_zero_point(one.reshape(1), two.reshape(1), 8, False) is None
    assert Q._range_scale_zero_point(one.clone().requires_grad_(), two, 8, False) is None
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert Q._range_scale_zero_point(one, two, 8, False) is None
    s, z = Q._scale_zero_point(one, two, 8, False)  # the torch expressions, same values
    assert float(s) == pytest.approx(3 / 255) and float(z) == 85.0


@pytest.mark.parametrize("observer", ["moving_average", "minmax"])
def test_observer_training_steps_match_the_torch_path(observer, monkeypatch):
    """Training forwards through the numba scale/zero point and the host-read finiteness
    check give the codes, scales and running range of the torch path (numba off)."""
    def run():
        torch.manual_seed(3)
        aq = Q.ActivationQuantizer(8, False, observer=observer).train()
        out = []
        for i in range(6):
            x = (torch.randn(5, 7) * (i + 1) + 0.2 * i).requires_grad_(True)
            q, s, z = aq(x, "L")
            q.sum().backward()
            out += [q.detach(), s, z, aq.min_val.clone(), aq.max_val.clone(), x.grad]
        return out
    fast = run()
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    slow = run()
    for f, s in zip(fast, slow):
        assert torch.equal(_bits(f), _bits(s))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_observer_refuses_non_finite_batches_before_changing(bad):
    aq = Q.ActivationQuantizer(8, False).train()
    aq(torch.ones(3))
    lo, hi = aq.min_val.clone(), aq.max_val.clone()
    with pytest.raises(InvalidValueError, match="L input contains NaN or Inf"):
        aq(torch.tensor([0.5, bad, 1.0]), "L")
    assert torch.equal(aq.min_val, lo) and torch.equal(aq.max_val, hi)


def _tables(signed: bool, columns: int = 0) -> LutTables:
    return LutTables(LutFile(truncated(columns, signed), width_a=8, width_b=8, signed=signed))


def _prep_cases():
    rng = np.random.default_rng(7)
    for signed, n, k, per_channel in [(False, 5, 9, True), (False, 16, 33, False), (True, 4, 17, True),
                                      (False, 1, 2, True), (False, 64, 300, True)]:
        lo = -128 if signed else 0
        qw = torch.from_numpy(rng.integers(lo, lo + 256, (n, k)).astype(np.float32))
        zw = torch.zeros(n if per_channel else 1) if signed else \
            torch.from_numpy(rng.integers(0, 256, n if per_channel else 1).astype(np.float32))
        for zx in ([0.0] if signed else [0.0, 3.0, 255.0]):
            yield signed, qw, torch.tensor(zx), zw.reshape(-1, 1) if per_channel else zw.reshape(())


def test_int8_value_prep_8bit_is_the_torch_prep(monkeypatch):
    for signed, qw, zx, zw in _prep_cases():
        tabs = _tables(signed)
        fast = FU._int8_value_prep(qw, zx, zw, tabs)
        with monkeypatch.context() as m:
            m.setenv("APPMULT_NO_NUMBA", "1")
            ref = FU._int8_value_prep(qw, zx, zw, tabs)
        assert fast is not None and ref is not None
        assert torch.equal(fast[0], ref[0]) and fast[0].dtype == torch.int8
        for f, r in zip(fast[1:3], ref[1:3]):  # c, ow: float64 integers
            assert f.dtype == r.dtype == torch.float64 and torch.equal(_bits(f), _bits(r))
        assert fast[3:] == ref[3:]


def test_int8_value_prep_8bit_refuses_what_the_torch_prep_refuses(monkeypatch):
    tabs = _tables(False)
    qw = torch.full((3, 4), 200.0)
    for zx, zw in [(torch.tensor(2.5), torch.zeros(3, 1)), (torch.tensor(2.0), torch.tensor([[1.0], [0.5], [2.0]])),
                   (torch.tensor(2.0), torch.zeros(2, 1))]:
        assert FU._int8_value_prep(qw, zx, zw, tabs) is None
    monkeypatch.setattr(FU.K, "FP64_EXACT_LIMIT", 4 * 255 * 200 * 4 - 1)  # |const| = Zx * sum(w - Zw)
    assert FU._int8_value_prep(qw, torch.tensor(255.0), torch.zeros(3, 1), tabs) is None
    assert FU._int8_value_prep(qw, torch.tensor(1.0), torch.zeros(3, 1), tabs) is not None


@pytest.mark.parametrize("one_node", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_training_forward_accumulates_the_brute_force_sum(signed, one_node, monkeypatch):
    """A training step of the int8 path after these changes: the layer's output is the
    dequantized brute-force accumulator of its own codes -- the int8 weights made by the
    fast prep (the general path) or by the one-node step's numba pass (``one_node``)."""
    taken = []
    monkeypatch.setattr(train_plan, "ENABLED", one_node)
    owner, name = (train_plan, "_int8_step_codes") if one_node else (FU, "_int8_value_prep_8bit")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: taken.append(real(*a)) or taken[-1])
    torch.manual_seed(1)
    table = truncated(0, signed)
    layer = ApproxLinear.from_float(nn.Linear(40, 6), ApproxConfig(LutFile(table, width_a=8, width_b=8,
                                                                           signed=signed), kernel="lowrank"))
    layer.train()
    x = (torch.randn(9, 40) + (0 if signed else 0.4)).requires_grad_(True)
    y = layer(x)
    assert len(taken) == 1 and taken[0] is not None  # the fast prep made the int8 weights
    y.sum().backward()
    q = layer.quantize(x)
    acc = brute_acc(table, q.qx.numpy().astype(np.int64), float(q.zero_x), q.qw.numpy().astype(np.int64),
                    q.zero_w.numpy().reshape(-1), signed)
    scale = (q.scale_x * q.scale_w.reshape(1, -1)).to(torch.float32)
    ref = torch.from_numpy(acc.astype(np.float32)) * scale + layer.bias.detach()
    assert torch.equal(y.detach(), ref)
    assert x.grad is not None and layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_weight_scale_check_refuses_an_infinite_scale():
    layer = ApproxLinear.from_float(nn.Linear(4, 2), ApproxConfig(LutFile(truncated(0), width_a=8, width_b=8,
                                                                                     signed=False)))
    with torch.no_grad():
        layer.weight[0] = torch.tensor([-3e38, 3e38, 0.0, 1.0])  # finite, but max - min overflows
    with pytest.raises(InvalidValueError, match="too wide to quantize"):
        layer(torch.ones(1, 4))


def _conv_cases():
    rng = np.random.default_rng(11)
    # (signed, co, cg, kh, kw, weight code spread): small K (the worst case holds), K = 288
    # with spread codes (only these weights' bound holds), K = 800 with extreme codes
    # (neither: the general fold cuts the convolution into channel runs)
    for signed, co, cg, kh, kw, spread in [(False, 4, 3, 3, 3, 255), (True, 5, 2, 5, 5, 255),
                                           (False, 6, 32, 3, 3, 40), (True, 3, 32, 3, 3, 30),
                                           (False, 3, 32, 5, 5, 255), (False, 2, 1, 1, 1, 255)]:
        lo = -128 if signed else 0
        mid = 0 if signed else 128
        codes = np.clip(mid + rng.integers(-spread, spread + 1, (co, cg, kh, kw)), lo, lo + 255)
        if spread == 255:
            codes = rng.choice([lo, lo + 255], (co, cg, kh, kw))
        qw = torch.from_numpy(codes.astype(np.float32))
        if signed:
            qw.view(-1)[::3] = -0.0  # the quantizer's rint gives -0.0 for small negative weights
        for zx in ([0.0] if signed else [0.0, 7.0, 255.0]):
            zw = torch.zeros(co, 1, 1, 1) if signed else \
                torch.from_numpy(rng.integers(0, 256, (co, 1, 1, 1)).astype(np.float32))
            yield signed, qw, torch.tensor(zx), zw
            yield signed, qw, torch.tensor(zx), zw[0].reshape(())  # per-tensor weights: one Zw


def test_value_rank1_prep_is_the_general_fold_and_prep():
    outcomes = set()
    for signed, qw, zx, zw in _conv_cases():
        tabs = _tables(signed)
        fast = FU._value_rank1_prep(qw, zx, zw, tabs)
        fold = FU._folded_lowrank_weights(qw, zx, zw, tabs, chunks=True)
        ref = FU._rank1_prep(zx, *fold, tabs) if fold is not None and len(fold) == 2 else False
        outcomes.add("runs" if fold is not None and len(fold) == 3 else "fold" if ref is not False else "none")
        if ref is False:
            assert fast is None
            continue
        assert fast is not None
        for f, r in zip(fast, ref):
            assert f.dtype == r.dtype == torch.float32 and f.shape == r.shape and f.is_contiguous()
            assert torch.equal(_bits(f), _bits(r))
    assert outcomes == {"fold", "runs"}  # both decisions exercised


def test_value_rank1_prep_declines_where_it_does_not_apply(monkeypatch):
    tabs = _tables(False)
    qw = torch.full((2, 1, 3, 3), 100.0)
    zw = torch.full((2, 1, 1, 1), 3.0)
    assert FU._value_rank1_prep(qw, torch.tensor(2.0), zw, tabs) is not None
    assert FU._value_rank1_prep(qw, torch.tensor(2.5), zw, tabs) is None             # Zx not an integer
    assert FU._value_rank1_prep(qw, torch.tensor(2.0), zw + 0.5, tabs) is None       # Zw not integers
    assert FU._value_rank1_prep(qw.double(), torch.tensor(2.0), zw, tabs) is None    # not float32
    assert FU._value_rank1_prep(qw, torch.tensor(2.0), zw, _tables(False, columns=8)) is None  # not the exact product
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert FU._value_rank1_prep(qw, torch.tensor(2.0), zw, tabs) is None


@pytest.mark.parametrize("signed,padding,stride", [(False, 1, 1), (False, 0, 2), (True, 2, 1)])
def test_conv_training_forward_is_the_brute_force_sum(signed, padding, stride, monkeypatch):
    from appmult.nn import ApproxConv2d
    from appmult.nn import functional as FN
    from test_nn_kernels_perf_paths import _conv_int
    taken = []
    monkeypatch.setattr(FN, "_value_rank1_prep", lambda *a: taken.append(FU._value_rank1_prep(*a)) or taken[-1])
    torch.manual_seed(5)
    table = truncated(0, signed)
    layer = ApproxConv2d.from_float(nn.Conv2d(3, 4, 3, padding=padding, stride=stride),
                                    ApproxConfig(LutFile(table, width_a=8, width_b=8, signed=signed), kernel="lowrank"))
    layer.train()
    x = (torch.randn(2, 3, 6, 7) + (0 if signed else 0.3)).requires_grad_(True)
    y = layer(x)
    assert len(taken) == 1 and taken[0] is not None  # the fast prep made these weights
    y.sum().backward()
    q = layer.quantize(x)  # qx padded with Zx
    zx, zw = float(q.zero_x), q.zero_w.numpy().reshape(1, -1, 1, 1)
    acc = _conv_int(q.qx.numpy().astype(np.int64) - int(zx), q.qw.numpy().astype(np.int64) - zw.reshape(-1, 1, 1, 1)
                    .astype(np.int64), (stride, stride), (1, 1), 1)
    ref = torch.from_numpy(acc.astype(np.float32)) * (q.scale_x * q.scale_w.reshape(1, -1, 1, 1)) \
        + layer.bias.detach().reshape(1, -1, 1, 1)
    assert torch.equal(y.detach(), ref)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


def _first_met_range(row: np.ndarray) -> tuple[float, float]:
    """The float loop's range: ``lo = v if v < lo else lo`` from ``row[0]`` (NaN never
    replaces a bound; of equal values, -0.0 and +0.0, the first met stays)."""
    lo = hi = row[0]
    for v in row:
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi


def _weight_rows():
    rng = np.random.default_rng(4)
    for shape in ((7, 13), (40, 300), (3, 1)):
        for kind in range(10):
            x = rng.standard_normal(shape).astype(np.float32)
            if kind == 1:
                x = np.abs(x)
                x[:, ::5] = 0.0
            elif kind == 2:
                x = np.abs(x)
                x[:, ::5] = -0.0
                x[:, 1::7] = 0.0
            elif kind == 3:
                x = -np.abs(x)
                x[:, ::4] = -0.0
            elif kind == 4:
                x[0, -1] = np.nan
                x[-1, 0] = np.inf
            elif kind == 5:
                x[:] = 0.0
                x[:, ::2] = -0.0
            elif kind == 6:
                x[:, 0] = -np.inf
            elif kind == 7:
                x = (x * 1e-40).astype(np.float32)  # subnormals
            elif kind == 8:  # the minimum is zero, +0.0 met first (the loop keeps it)
                x = np.abs(x)
                x[:, 0] = 0.0
                x[:, 3::5] = -0.0
            elif kind == 9:  # the maximum is zero, -0.0 met first
                x = -np.abs(x)
                x[:, 0] = -0.0
                x[:, 2::5] = 0.0
            yield x


@pytest.mark.parametrize("signed", [False, True])
def test_channel_range_by_integer_keys_is_the_float_loops(signed):
    """``channel_fake_quant``'s per-row range (integer keys, the float loop for zeros and
    non-finite rows) gives the scales and zero points of the float loop's range through the
    torch expressions, bit for bit -- signed zeros, NaN, Inf and subnormals included."""
    qmin, qmax = (-128, 127) if signed else (0, 255)
    for x in _weight_rows():
        r = x.shape[0]
        scale, zp = np.empty(r, np.float32), np.empty(r, np.float32)
        q, inside = np.empty(x.shape, np.float32), np.empty(x.shape, np.bool_)
        tops = FU.quant_loops.channel_fake_quant(x, qmin, qmax, signed, scale, zp, q, inside)
        assert (tops >= FU.quant_loops.NON_FINITE) == (not np.isfinite(x).all())
        ends = np.array([_first_met_range(row) for row in x], np.float32)
        s_ref, z_ref = Q._torch_scale_zero_point(torch.from_numpy(ends[:, 0]), torch.from_numpy(ends[:, 1]), 8, signed)
        assert torch.equal(_bits(torch.from_numpy(scale)), _bits(s_ref))
        assert torch.equal(_bits(torch.from_numpy(zp)), _bits(z_ref))


def _drum(a: int, k: int = 4) -> int:
    if a < (1 << k):
        return a
    t = a.bit_length() - k
    return ((a >> t) | 1) << t


def drum_table(signed: bool) -> np.ndarray:
    """DRUM(4) by codes: rank 1, both factors look-ups (signed: on the magnitude, capped at
    127 so that the factors span 255 integers, as the int8 GEMM needs)."""
    codes = np.arange(256)
    v = np.where(codes < 128, codes, codes - 256) if signed else codes
    d = np.array([int(np.sign(x)) * min(_drum(abs(int(x))), 127 if signed else 255) for x in v], np.int64)
    return np.outer(d, d)


def test_int8_mapped_prep_is_the_general_unfolded_prep():
    rng = np.random.default_rng(9)
    for signed in (False, True):
        tabs = LutTables(LutFile(drum_table(signed), width_a=8, width_b=8, signed=signed))
        assert tabs.rank == 1 and not tabs.v_is_value
        lo = -128 if signed else 0
        for n, k, per_channel, spread in [(5, 9, True, 255), (16, 40, False, 60), (3, 2, True, 20)]:
            mid = 0 if signed else 128
            qw = torch.from_numpy(np.clip(mid + rng.integers(-spread, spread + 1, (n, k)), lo, lo + 255)
                                  .astype(np.float32))
            zw = torch.zeros(n if per_channel else 1) if signed else \
                torch.from_numpy(rng.integers(0, 256, n if per_channel else 1).astype(np.float32))
            zw = zw.reshape(-1, 1) if per_channel else zw.reshape(())
            for zx in ([0.0] if signed else [0.0, 9.0]):
                fast = FU._int8_mapped_prep(qw, torch.tensor(zx), zw, tabs)
                ref = FU._int8_unfolded_prep(qw, torch.tensor(zx), zw, tabs)
                if ref is False or ref[6] != 1:  # more than one digit plane: the fast prep declines
                    assert fast is None
                    continue
                assert fast is not None
                assert torch.equal(fast[0], ref[0]) and fast[3] == ref[3] and fast[6] == ref[6]
                for f, r in zip((fast[1], fast[2]), (ref[1], ref[2])):
                    assert f.dtype == r.dtype == torch.float64 and torch.equal(_bits(f), _bits(r))
                assert torch.equal(fast[4], ref[4])
                assert (fast[5] is None) == (ref[5] is None)
                if ref[5] is not None:
                    assert torch.equal(fast[5].reshape(-1), ref[5].reshape(-1).to(torch.float64))


def test_int8_mapped_prep_takes_the_weight_factor_as_int32_only_where_it_holds_it():
    """``V`` is handed to the kernel as int32, kept with the tables while it is the same
    tensor: a replaced ``V`` is read again, and one with a non-integer or a value of
    magnitude ``2**30`` or more makes the prep decline (the general path decides)."""
    tabs = LutTables(LutFile(drum_table(False), width_a=8, width_b=8, signed=False))
    qw = torch.from_numpy(np.random.default_rng(3).integers(100, 200, (4, 6)).astype(np.float32))
    zx, zw = torch.tensor(5.0), torch.full((4, 1), 120.0)
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is not None
    v = tabs.v.clone()
    for value, holds in [(0.5, False), (2.0 ** 30, False), (-(2.0 ** 30), False), (2.0 ** 30 - 1, True), (7.0, True)]:
        w = v.clone()
        w[255, 0] = value     # a code the weights above never reach: only the check can tell
        tabs.v = w
        got = FU._v_int32(tabs)
        assert (got is not None) == holds
        if holds:
            assert got.dtype == np.int32 and np.array_equal(got, w.reshape(-1).numpy())
            assert FU._int8_mapped_prep(qw, zx, zw, tabs) is not None
        else:
            assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None
    tabs.v = v
    assert np.array_equal(FU._v_int32(tabs), v.reshape(-1).numpy())


@pytest.mark.parametrize("one_node", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_drum_linear_training_forward_is_the_brute_force_sum(signed, one_node, monkeypatch):
    """The int8 weights made by the mapped prep (the general path) or by the one-node step's
    numba pass (``one_node``)."""
    from appmult.nn import functional as FN
    taken = []
    monkeypatch.setattr(train_plan, "ENABLED", one_node)
    owner, name = (train_plan, "_int8_step_codes") if one_node else (FN, "_int8_mapped_prep")
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: taken.append(real(*a)) or taken[-1])
    torch.manual_seed(2)
    table = drum_table(signed)
    layer = ApproxLinear.from_float(nn.Linear(30, 7), ApproxConfig(LutFile(table, width_a=8, width_b=8,
                                                                           signed=signed), kernel="lowrank"))
    layer.train()
    x = (torch.randn(11, 30) + (0 if signed else 0.5)).requires_grad_(True)
    y = layer(x)
    # unsigned: no fold, so the mapped prep; signed LUTs have a fold (no cross terms)
    assert (len(taken) == 1 and taken[0] is not None) if not signed else not taken
    y.sum().backward()
    q = layer.quantize(x)
    acc = brute_acc(table, q.qx.numpy().astype(np.int64), float(q.zero_x), q.qw.numpy().astype(np.int64),
                    q.zero_w.numpy().reshape(-1), signed)
    ref = torch.from_numpy(acc.astype(np.float32)) * (q.scale_x * q.scale_w.reshape(1, -1)).to(torch.float32) \
        + layer.bias.detach()
    assert torch.equal(y.detach(), ref)
    # straight-through: d acc / d qx = qw - Zw, and every x lies inside the batch's own range
    sw = q.scale_w.reshape(1, -1).to(torch.float64)
    expected = sw @ (q.qw.to(torch.float64) - q.zero_w.reshape(-1, 1).to(torch.float64))
    assert torch.allclose(x.grad.to(torch.float64), expected.expand(11, -1), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(layer.weight.grad).all()


def test_probe_cached_is_the_probe_choice_and_keeps_it_recent(monkeypatch):
    from appmult.nn import kernels as K
    monkeypatch.setattr(K, "PROBE_CACHE_MAX", 2)
    K.clear_probe_cache()
    try:
        runs = []
        assert K.probe_cached("k1") is None
        assert K.probe_choice("k1", {"a": lambda: runs.append("a")}, torch.device("cpu")) == "a"
        assert K.probe_cached("k1") == "a"
        K.probe_choice("k2", {"b": lambda: None}, torch.device("cpu"))
        assert K.probe_cached("k1") == "a"          # k1 used last: k2 is the oldest now
        K.probe_choice("k3", {"c": lambda: None}, torch.device("cpu"))
        assert K.probe_cached("k2") is None and K.probe_cached("k1") == "a" and K.probe_cached("k3") == "c"
    finally:
        K.clear_probe_cache()


def test_forced_kernel_nests_and_restores():
    from appmult.nn import kernels as K
    owner, other = object(), object()
    assert K.forced(owner) is None
    with K.forced_kernel(owner, "gather"):
        assert K.forced(owner) == "gather" and K.forced(other) is None
        with K.forced_kernel(owner, "lowrank"):
            assert K.forced(owner) == "lowrank"
        assert K.forced(owner) == "gather"
    assert K.forced(owner) is None
    with pytest.raises(RuntimeError):
        with K.forced_kernel(owner, "lowrank"):
            raise RuntimeError("inside")
    assert K.forced(owner) is None


# -- the fast preps decline where they do not apply (and the torch branches stay checked) --

def test_int8_value_prep_refusals_hold_on_the_torch_branch(monkeypatch):
    """The refusals of ``_int8_value_prep`` on its torch branch (no numba): non-integer
    zero points, a zero-point count that is neither 1 nor N, and the float64 bound."""
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    test_int8_value_prep_8bit_refuses_what_the_torch_prep_refuses(monkeypatch)
    tabs = _tables(False)
    qw = torch.full((3, 4), 200.0)
    assert FU._int8_value_prep(qw, torch.tensor(2.0), torch.zeros(3, 1), tabs) is not None
    # the bound itself: |const| = Zx sum_k (w - Zw) = 255 * 800 reaches FP64_EXACT_LIMIT / 4 exactly
    monkeypatch.setattr(FU.K, "FP64_EXACT_LIMIT", 4 * 255 * 800)
    assert FU._int8_value_prep(qw, torch.tensor(255.0), torch.zeros(3, 1), tabs) is None
    monkeypatch.setattr(FU.K, "FP64_EXACT_LIMIT", 4 * 255 * 800 + 4)
    assert FU._int8_value_prep(qw, torch.tensor(255.0), torch.zeros(3, 1), tabs) is not None


def _rank1_lookup_tables(u: np.ndarray, v: np.ndarray, width_b: int = 8) -> LutTables:
    """An unsigned rank-1 LUT ``u[a] v[b]`` (no fold where ``u`` is no multiple of the value)."""
    return LutTables(LutFile(np.outer(u, v).astype(np.int64), width_a=8, width_b=width_b, signed=False))


def _drum_u() -> np.ndarray:
    return np.array([_drum(a) for a in range(256)], np.int64)


def test_int8_mapped_prep_declines_where_it_does_not_apply(monkeypatch):
    u = _drum_u()
    tabs = _rank1_lookup_tables(u, u)
    qw = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 6)).astype(np.float32))
    zx, zw = torch.tensor(4.0), torch.full((3, 1), 7.0)
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is not None
    assert FU._int8_mapped_prep(qw, zx, torch.tensor(7.0), tabs) is not None          # one Zw for all rows
    assert FU._int8_mapped_prep(qw[:, :1], zx, zw, tabs) is None                       # K = 1 (_int_mm's bug)
    assert FU._int8_mapped_prep(qw.double(), zx, zw, tabs) is None
    assert FU._int8_mapped_prep(qw.reshape(3, 2, 3), zx, zw, tabs) is None
    assert FU._int8_mapped_prep(qw, zx.clone().requires_grad_(), zw, tabs) is None
    assert FU._int8_mapped_prep(qw, zx, zw.clone().requires_grad_(), tabs) is None
    assert FU._int8_mapped_prep(qw, zx.reshape(1), zw, tabs) is None
    assert FU._int8_mapped_prep(qw, zx, zw.half(), tabs) is None
    assert FU._int8_mapped_prep(qw, zx, zw.to("meta"), tabs) is None
    assert FU._int8_mapped_prep(qw, zx, torch.full((2, 1), 7.0), tabs) is None        # neither 1 nor N
    assert FU._int8_mapped_prep(qw, torch.tensor(4.5), zw, tabs) is None
    assert FU._int8_mapped_prep(qw, zx, zw + 0.5, tabs) is None
    assert FU._int8_mapped_prep(qw, zx, zw, _tables(False)) is None                   # v = value(w): the value prep's
    assert FU._int8_mapped_prep(qw, zx, zw, _tables(False, columns=8)) is None        # rank 7
    assert FU._int8_mapped_prep(qw, zx, zw, _rank1_lookup_tables(u, np.arange(512) // 2, width_b=9)) is None
    with monkeypatch.context() as m:
        m.setattr(FU, "INT8_GEMM_MAX_PLANES", 0)
        assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None
    with monkeypatch.context() as m:
        m.delattr(torch, "_int_mm")
        assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None
    with monkeypatch.context() as m:
        m.setenv("APPMULT_NO_NUMBA", "1")
        assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None


def test_int8_mapped_prep_spans_and_bounds():
    """The activation factors may span 255 integers, not 256; a row of looked-up weights
    spanning more than 255 needs a second digit plane (declined: the general prep makes it);
    the longest reduction, ``INT8_GEMM_MAX_K``, still applies."""
    u = _drum_u()
    qw = torch.tensor([[0.0, 255.0, 17.0], [3.0, 3.0, 200.0]])
    zx, zw = torch.tensor(1.0), torch.tensor([[2.0], [5.0]])
    u255 = u.copy()
    u255[-1] = 255
    u256 = u.copy()
    u256[-1] = 256
    assert FU._int8_mapped_prep(qw, zx, zw, _rank1_lookup_tables(u255, u)) is not None
    assert FU._int8_mapped_prep(qw, zx, zw, _rank1_lookup_tables(u256, u)) is None
    wide = _rank1_lookup_tables(u, 2 * u)          # V up to 480: the first row spans 480
    assert FU._int8_mapped_prep(qw, zx, zw, wide) is None
    general = FU._int8_unfolded_prep(qw, zx, zw, wide)
    assert general is not False and general[6] == 2
    narrow = torch.tensor([[3.0, 3.0, 100.0]])    # V = 6, 6, 208: one plane
    assert FU._int8_mapped_prep(narrow, zx, zw[1:], wide) is not None
    k = FU.INT8_GEMM_MAX_K
    long = torch.full((1, k), 9.0)
    prep = FU._int8_mapped_prep(long, torch.tensor(0.0), torch.zeros(1, 1), _rank1_lookup_tables(u, u))
    assert prep is not None and prep[0].shape == (1, k)


def test_int8_mapped_prep_float64_bound(monkeypatch):
    u = _drum_u()
    tabs = _rank1_lookup_tables(u, u)
    qw = torch.full((2, 4), 100.0)
    zx, zw = torch.tensor(255.0), torch.zeros(2, 1)
    top = 255.0 * 400  # |const| = Zx sum_k (w - Zw)
    monkeypatch.setattr(FU.K, "FP64_EXACT_LIMIT", 4 * top)
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None
    monkeypatch.setattr(FU.K, "FP64_EXACT_LIMIT", 4 * top + 4)
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is not None


def _decisions(qw, zx, zw, tabs):
    """(fast, general) results of the rank-1 prep: the general one ``False`` where the fold
    declines or cuts the convolution into runs."""
    fast = FU._value_rank1_prep(qw, zx, zw, tabs)
    fold = FU._folded_lowrank_weights(qw, zx, zw, tabs, chunks=True)
    ref = FU._rank1_prep(zx, *fold, tabs) if fold is not None and len(fold) == 2 else False
    return fast, ref


def _figures(qw, zx, zw, tabs) -> np.ndarray:
    co, k = qw.shape[0], qw[0].numel()
    zwv = np.broadcast_to(zw.numpy().reshape(-1).astype(np.float64), (co,)).copy()
    fig = np.empty(4)
    FU.fold_loops.value_fold_rows(qw.numpy().reshape(co, k), zwv, float(zx), 0.0 if tabs.signed else 1.0,
                                  bool(tabs.signed), float(tabs._v_min[0]), float(tabs._v_max[0]),
                                  float(tabs._u_absmax[0]), float(FU._activation_distance(tabs, float(zx))),
                                  np.empty((co, k), np.float32), np.empty(co, np.float32), fig)
    return fig


def test_value_rank1_prep_decides_as_the_general_path_at_every_bound(monkeypatch):
    """With the float32 limit set at (and one above) each of the figures the prep compares
    -- the fold's worst case plus its constant, its bound by these weights, the rank-1
    convolution's bound -- the prep declines exactly where the general functions do, and
    otherwise gives their weights and bias."""
    outcomes = set()
    for signed, qw, zx, zw in list(_conv_cases())[::3]:
        tabs = _tables(signed)
        fig = _figures(qw, zx, zw, tabs)
        for limit in sorted({fig[0] + fig[1], fig[2], fig[3]}):
            for lim in (limit, limit + 1):
                if lim <= 600:  # below the largest folded weight the general fold takes float64 weights
                    continue
                monkeypatch.setattr(FU.K, "FP32_EXACT_LIMIT", lim)
                fast, ref = _decisions(qw, zx, zw, tabs)
                outcomes.add(ref is False)
                if ref is False:
                    assert fast is None, (lim, fig)
                else:
                    assert fast is not None, (lim, fig)
                    assert all(torch.equal(_bits(f), _bits(r)) for f, r in zip(fast, ref))
    assert outcomes == {True, False}


def test_value_rank1_prep_guards(monkeypatch):
    tabs = _tables(False)
    qw = torch.full((2, 1, 3, 3), 100.0)
    zx, zw = torch.tensor(2.0), torch.full((2, 1, 1, 1), 3.0)
    assert FU._value_rank1_prep(qw, zx, zw, tabs) is not None
    assert FU._value_rank1_prep(qw, zx, zw[0].reshape(()), tabs) is not None         # one Zw for all
    assert FU._value_rank1_prep(qw.reshape(2, 9), zx, zw, tabs) is None               # not 4-D
    assert FU._value_rank1_prep(qw, zx.clone().requires_grad_(), zw, tabs) is None
    assert FU._value_rank1_prep(qw, zx, zw.clone().requires_grad_(), tabs) is None
    assert FU._value_rank1_prep(qw, zx.reshape(1), zw, tabs) is None
    assert FU._value_rank1_prep(qw, zx, zw.half(), tabs) is None
    assert FU._value_rank1_prep(qw, zx, zw.to("meta"), tabs) is None
    assert FU._value_rank1_prep(qw, zx, torch.full((3, 1, 1, 1), 3.0), tabs) is None  # neither 1 nor Co
    wide = LutTables(LutFile(np.outer(np.arange(256), np.arange(512)).astype(np.int64), width_a=8, width_b=9,
                             signed=False))
    assert wide.v_is_value and FU._value_rank1_prep(qw, zx, zw, wide) is None         # 9-bit weight codes


def test_range_scale_zero_point_refuses_mixed_operands():
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    for a, b in [(lo, hi.reshape(1)), (lo.reshape(1), hi), (lo, hi.double()), (lo.double(), hi),
                 (lo.to("meta"), hi), (lo, hi.to("meta")), (lo, hi.clone().requires_grad_())]:
        assert Q._range_scale_zero_point(a, b, 8, False) is None


def test_int8_mapped_prep_needs_rank_one_and_one_plane_suffices(monkeypatch):
    """A rank-2 LUT whose factors are small is declined (the prep reads one column of V);
    one allowed digit plane is enough; factors that do not start at 0 are fine."""
    a, b = np.arange(256)[:, None], np.arange(256)[None, :]
    rank2 = LutTables(LutFile(((a & 15) * (b & 15) + (a >> 4) * (b >> 4)).astype(np.int64), width_a=8, width_b=8,
                              signed=False))
    assert rank2.rank == 2 and float(rank2.u.max() - rank2.u.min()) <= 255  # factors 0 .. 15
    qw = torch.tensor([[0.0, 255.0, 17.0], [3.0, 3.0, 200.0]])
    zx, zw = torch.tensor(1.0), torch.tensor([[2.0], [5.0]])
    assert FU._int8_mapped_prep(qw, zx, zw, rank2) is None
    u = _drum_u()
    monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", 1)
    assert FU._int8_mapped_prep(qw, zx, zw, _rank1_lookup_tables(u, u)) is not None
    shifted = _rank1_lookup_tables(u + 10, u)      # U in 10 .. 250: spans 240
    prep = FU._int8_mapped_prep(qw, zx, zw, shifted)
    ref = FU._int8_unfolded_prep(qw, zx, zw, shifted)
    assert prep is not None and prep[3] == ref[3] == 138 and torch.equal(prep[4], ref[4])


def test_factor_range_follows_a_replaced_u():
    """The kept range of ``U`` is read again when the tables' ``U`` is another tensor: a
    factor spanning 256 integers put in after a first call is declined, not taken from a
    stale range."""
    u = _drum_u()
    tabs = _rank1_lookup_tables(u, u)
    qw = torch.tensor([[0.0, 255.0, 17.0], [3.0, 3.0, 200.0]])
    zx, zw = torch.tensor(1.0), torch.tensor([[2.0], [5.0]])
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is not None
    wide = tabs.u.clone()
    wide[-1, 0] = 256.0
    tabs.u = wide
    assert FU._factor_range(tabs) == (0.0, 256.0)
    assert FU._int8_mapped_prep(qw, zx, zw, tabs) is None
