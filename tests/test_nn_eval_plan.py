"""The eval plans of ``ApproxConv2d`` (rank 1) and ``ApproxLinear`` (int8 GEMM)
(``appmult.nn.eval_plan``): what they return, when they run, and that whatever they were
derived from changing makes them step aside or rebuild.

References: the numpy brute force of the LUT sum (one look-up per product, cross terms,
int64; ``test_nn_wide_conv_fold.brute_conv_acc``, ``test_nn_int8_gemm.brute_acc``) with the layer's float32
dequantization, and the general path of the same layer (``eval_plan.ENABLED = False``),
bit for bit. A plan that missed a change would return the old answer: each invalidation
test changes one thing where no version counter sees it and compares with a fresh layer.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import eval_plan
from appmult.nn import quant_loops as L
from test_nn_int8_gemm import brute_acc
from test_nn_int8_gemm import truncated as gemm_table
from test_nn_luts import exact, truncated
from test_nn_wide_conv_fold import brute_conv_acc

pytestmark = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def weight_side(width: int = 8) -> np.ndarray:
    """``x * (w with its lowest bit cleared)``: rank 1 with ``U = value(x)`` and ``V != value(w)``."""
    v = np.arange(1 << width)
    return np.outer(v, v & ~1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def make(table, *, signed=False, cin=4, cout=6, k=3, shift=0.0, seed=0, bias=True, scheme="per_channel",
         batch=3, **geom):
    torch.manual_seed(seed)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    ref = nn.Conv2d(cin, cout, k, bias=bias, **geom)
    layer = ApproxConv2d.from_float(ref, ApproxConfig(lut, kernel="lowrank", weight_scheme=scheme)).eval()
    x = torch.relu(torch.randn(batch, cin, 9, 9)) + shift   # shift < 0: negative inputs, Zx > 0
    layer(x)
    layer.act_quant.observing = False
    return layer, x


def general(layer, x):
    """The layer's output by the general path (the plan off)."""
    prev = eval_plan.ENABLED
    eval_plan.ENABLED = False
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        eval_plan.ENABLED = prev


def planned(layer, x):
    """The layer's output with the plan on, and whether the plan ran."""
    ran = []
    with _spied(ran):
        with torch.no_grad():
            return layer(x), bool(ran)


@contextlib.contextmanager
def _spied(ran: list):
    """Within the block, every quantizing pass of a plan (the only way into one) appends to ``ran``."""
    real = eval_plan._quantized, eval_plan._quantized_mapped
    eval_plan._quantized = lambda *a: ran.append(1) or real[0](*a)
    eval_plan._quantized_mapped = lambda *a: ran.append(1) or real[1](*a)
    try:
        yield
    finally:
        eval_plan._quantized, eval_plan._quantized_mapped = real


def brute(layer, x, table, signed, padding):
    """Brute-force accumulator, then ``f32(acc) * (sx sw) + bias`` in numpy float32."""
    with torch.no_grad():
        qx, sx, zx, qw, sw, zw = layer._quantize(x)
        zw = zw.reshape(-1).expand(qw.shape[0])   # per tensor: the one value for every output
        g, ci, co = layer.groups, qx.shape[1] // layer.groups, qw.shape[0] // layer.groups
        acc = np.concatenate([brute_conv_acc(table, qx[:, i * ci:(i + 1) * ci], float(zx), qw[i * co:(i + 1) * co],
                                             zw[i * co:(i + 1) * co], padding, signed, layer.stride[0],
                                             layer.dilation[0]) for i in range(g)], axis=1)
        scale = (sx * sw.reshape(1, -1, 1, 1)).numpy().astype(np.float32)
        out = acc.astype(np.float32) * scale
        if layer.bias is not None:
            out = out + layer.bias.detach().reshape(1, -1, 1, 1).numpy().astype(np.float32)
    return torch.from_numpy(out)


CASES = {
    "exact, ReLU input (Zx = 0)": dict(table=exact(8, False)),
    "exact, negative inputs (Zx > 0)": dict(table=exact(8, False), shift=-0.4),
    "weight-side approximation": dict(table=weight_side(), shift=-0.3),
    "signed exact": dict(table=exact(8, True), signed=True, shift=-0.5),
    "per-tensor weights, no bias": dict(table=exact(8, False), scheme="per_tensor", bias=False, shift=-0.2),
    "padding 1, stride 2": dict(table=exact(8, False), padding=1, stride=2, shift=-0.1),
    "padding 2, dilation 2": dict(table=weight_side(), padding=2, dilation=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_output_is_the_brute_force_and_the_general_path(name):
    case = dict(CASES[name])
    table, signed = case.pop("table"), case.get("signed", False)
    layer, x = make(table, **case)
    y, ran = planned(layer, x)
    assert ran
    assert torch.equal(bits(y), bits(brute(layer, x, table, signed, layer._padding()[0])))
    assert torch.equal(bits(y), bits(general(layer, x)))
    y2, ran2 = planned(layer, x)  # the kept plan: same bits again
    assert ran2 and torch.equal(bits(y2), bits(y))


def test_training_mode_with_the_observer_frozen_and_no_gradient():
    """Train mode changes nothing the plan depends on when the observer is frozen and no
    gradient is wanted (e.g. an evaluation pass inside a training loop)."""
    layer, x = make(exact(8, False), shift=-0.3)
    layer.train()
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(general(layer, x)))


def test_grouped_and_unbatched_inputs():
    layer, x = make(exact(8, False), cin=4, cout=6, groups=2, padding=1, shift=-0.2)
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(general(layer, x)))
    y1, ran1 = planned(layer, x[1])
    assert ran1 and y1.shape == (6, 9, 9) and torch.equal(bits(y1), bits(general(layer, x[1])))


def _gather_only():
    t = exact(8, False).copy()
    t[3, 5] += 7   # no exact low-rank factorization of small rank
    return t


STEPS_ASIDE = {
    "training mode, the observer following it": lambda m: (m.train(), setattr(m.act_quant, "observing", None)),
    "observer switched on": lambda m: setattr(m.act_quant, "observing", True),
    "exact multiplication": lambda m: setattr(m, "exact_multiplication", True),
    "plan switched off": lambda m: setattr(eval_plan, "ENABLED", False),
}


@pytest.mark.parametrize("name", list(STEPS_ASIDE))
def test_steps_aside(name):
    layer, x = make(exact(8, False), shift=-0.2)
    prev = eval_plan.ENABLED
    try:
        STEPS_ASIDE[name](layer)
        _, ran = planned(layer, x)
    finally:
        eval_plan.ENABLED = prev
    assert not ran


def test_steps_aside_where_the_general_path_differs(monkeypatch):
    ran = []
    with _spied(ran):
        # a gradient to carry: the weight requires grad and grad mode is on
        layer, x = make(exact(8, False))
        y = layer(x)
        assert y.requires_grad and not ran
        # an input that is not contiguous (channels last), float64 input, a float64 layer
        with torch.no_grad():
            layer(x.to(memory_format=torch.channels_last))
            layer(x.double())
            layer.double()(x.double())
        assert not ran
        # a rank-7 LUT (the mapped low-rank path), a gather-only LUT, exact accumulation
        for table, kernel, exact_acc in ((truncated(8, 8), "lowrank", False), (_gather_only(), "gather", False),
                                         (exact(8, False), "lowrank", True)):
            lut = LutFile(table, width_a=8, width_b=8, signed=False)
            m = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, kernel=kernel, exact_accumulate=exact_acc)).eval()
            m(x)
            with torch.no_grad():
                m(x)
        assert not ran
        # the environment switches, read at each call
        for env in ("APPMULT_NO_EVAL_PLAN", "APPMULT_NO_FUSED_LOWRANK", "APPMULT_NO_NUMBA"):
            monkeypatch.setenv(env, "1")
            with torch.no_grad():
                y = layer.float()(x)
            monkeypatch.delenv(env)
            assert not ran and torch.equal(bits(y), bits(general(layer, x))), env
        with torch.no_grad():
            layer(x)
        assert ran  # and back on


def test_an_input_that_wants_a_gradient_through_frozen_weights():
    """Frozen weights (cached: no gradient reaches them) but an input that requires grad
    (input attributions, adversarial examples): the plan, which carries no gradient, steps
    aside; the gradient is the general path's."""
    layer, x = make(exact(8, False), shift=-0.2)
    layer.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert y.requires_grad
    g, = torch.autograd.grad(y.sum(), xg)
    prev = eval_plan.ENABLED
    eval_plan.ENABLED = False
    try:
        x2 = x.clone().requires_grad_(True)
        y2 = layer(x2)
        g2, = torch.autograd.grad(y2.sum(), x2)
    finally:
        eval_plan.ENABLED = prev
    assert torch.equal(bits(y.detach()), bits(y2.detach())) and torch.equal(g, g2)


def _fresh_copy(layer, x):
    """The same layer state computed from scratch (a new layer, the same weights, bias, range)."""
    m = ApproxConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                     bias=layer.bias is not None, config=layer.config)
    m.load_state_dict(layer.state_dict())
    m.eval()
    m.act_quant.observing = False
    return general(m, x)


def _observe_again(layer, x):
    """The range moved by the observer (moving average) on other data."""
    layer.act_quant.observing = True
    with torch.no_grad():
        layer(x * 3 - 1)
    layer.act_quant.observing = False


REBUILDS = {   # each written where no version counter sees it, or through the observer
    "one weight through .data": lambda m, x: m.weight.data.view(-1).__setitem__(37, m.weight.data.view(-1)[37] * -3 + 0.25),
    "activation range observed again": _observe_again,
    "activation range through .data": lambda m, x: m.act_quant.max_val.data.mul_(1.5),
}


@pytest.mark.parametrize("name", list(REBUILDS))
def test_change_rebuilds_the_plan(name):
    layer, x = make(exact(8, False), shift=-0.2)
    y0, _ = planned(layer, x)
    REBUILDS[name](layer, x)
    y1, ran = planned(layer, x)
    assert ran and not torch.equal(y1, y0)
    assert torch.equal(bits(y1), bits(_fresh_copy(layer, x)))


def test_bias_written_through_data_rebuilds_the_plan():
    layer, x = make(exact(8, False), shift=-0.2)
    y0, _ = planned(layer, x)
    layer.bias.data[4] += 0.5   # no version bump
    y1, ran = planned(layer, x)
    assert ran and torch.equal(bits(y1), bits(_fresh_copy(layer, x)))
    assert not torch.equal(y1[:, 4], y0[:, 4])
    assert torch.equal(y1[:, :4], y0[:, :4]) and torch.equal(y1[:, 5:], y0[:, 5:])


def test_geometry_changed_in_place():
    layer, x = make(exact(8, False), padding=1)
    planned(layer, x)
    layer.stride = (2, 2)
    y, ran = planned(layer, x)
    assert ran and y.shape[-1] == 5 and torch.equal(bits(y), bits(_fresh_copy(layer, x)))


def test_non_finite_input_is_refused_as_the_general_path_refuses_it():
    layer, x = make(exact(8, False))
    planned(layer, x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[1, 2, 3, 4] = bad
        with pytest.raises(InvalidValueError, match="ApproxConv2d input contains NaN or Inf") as plan_err:
            planned(layer, xb)
        with pytest.raises(InvalidValueError) as general_err:
            general(layer, xb)
        assert str(plan_err.value) == str(general_err.value)


def _no_plan_same_bits(layer, x, reference=None):
    """The plan does not run, and the output is the general path's (or ``reference``)."""
    y, ran = planned(layer, x)
    assert not ran
    assert torch.equal(bits(y), bits(general(layer, x) if reference is None else reference))


def or_one(width: int = 8) -> np.ndarray:
    """``LUT[x, w] = (x | 1) w``: rank 1, ``U(x) = x | 1`` is not the value (a look-up)."""
    v = np.arange(1 << width)
    return np.outer(v | 1, v)


MAPPED_CASES = {
    "Zx > 0, per-channel Zw (the S term)": dict(shift=-0.3),
    "Zx = 0, padding 1, stride 2": dict(padding=1, stride=2),
    "grouped, dilation 2, padding 2": dict(cin=4, cout=6, groups=2, dilation=2, padding=2, shift=-0.2),
    "per-tensor weights, no bias": dict(scheme="per_tensor", bias=False, shift=-0.1),
}


@pytest.mark.parametrize("name", list(MAPPED_CASES))
def test_mapped_rank1_plan_is_the_brute_force_and_the_general_path(name):
    """A rank-1 LUT whose activation factor is a look-up (DRUM-like): the plan maps the
    codes and sums the cross term's window in its quantizing pass."""
    table = or_one()
    layer, x = make(table, **MAPPED_CASES[name])
    assert layer.lut.rank == 1 and not layer.lut.u_is_value
    y, ran = planned(layer, x)
    assert ran
    assert torch.equal(bits(y), bits(brute(layer, x, table, False, layer._padding()[0])))
    assert torch.equal(bits(y), bits(general(layer, x)))


def test_steps_aside_for_a_forced_gather_kernel_and_a_correction():
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    torch.manual_seed(1)
    x = torch.relu(torch.randn(2, 4, 9, 9))
    m = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, kernel="gather")).eval()
    m(x)
    _no_plan_same_bits(m, x)
    table = weight_side()
    lut = LutFile(table, width_a=8, width_b=8, signed=False)
    m = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, kernel="lowrank", correction="control_variate")).eval()
    m(x)
    y, ran = planned(m, x)
    assert not ran and not torch.equal(y, brute(m, x, table, False, 0))   # corrected: not the raw sum
    assert torch.equal(bits(y), bits(general(m, x)))


def test_steps_aside_for_a_bias_that_wants_a_gradient():
    """Frozen weights, trainable bias (bias-only fine-tuning): the output carries its gradient."""
    layer, x = make(exact(8, False), shift=-0.2)
    layer.weight.requires_grad_(False)
    y = layer(x)
    assert y.requires_grad
    g, = torch.autograd.grad(y.sum(), layer.bias)
    assert torch.equal(g, torch.full_like(g, y[:, 0].numel()))


def test_steps_aside_until_the_observer_has_a_range():
    """A frozen but never-initialized observer takes its range from the first batch (the
    general path does): no plan before that."""
    torch.manual_seed(2)
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    m = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, kernel="lowrank")).eval()
    m.act_quant.observing = False
    x = torch.relu(torch.randn(2, 4, 9, 9)) - 0.1
    y, ran = planned(m, x)
    assert not ran and bool(m.act_quant.initialized)
    y2, ran2 = planned(m, x)
    assert ran2 and torch.equal(bits(y2), bits(y))


def test_steps_aside_for_a_wide_conv_cut_in_channel_runs():
    layer, x = make(exact(8, False), cin=160, cout=8, k=3, batch=2)
    y, ran = planned(layer, x)
    folds = [v for k, v in layer.__dict__["_wcache"]["tables"].items() if k[0] == "fold"]
    assert not ran and len(folds) == 1 and len(folds[0]) == 3   # the runs' form
    assert torch.equal(bits(y), bits(brute(layer, x, exact(8, False), False, 0)))


def test_steps_aside_where_the_rank1_convolution_would_not_be_exact(monkeypatch):
    layer, x = make(exact(8, False), shift=-0.2)
    monkeypatch.setattr(eval_plan, "_rank1_prep", lambda *a: False)
    _no_plan_same_bits(layer, x, brute(layer, x, exact(8, False), False, 0))


def test_steps_aside_for_a_float64_activation_range():
    layer, x = make(exact(8, False), shift=-0.2)
    layer.act_quant.double()
    _no_plan_same_bits(layer, x)


def test_bias_removed_after_planning():
    layer, x = make(exact(8, False), shift=-0.2)
    planned(layer, x)
    layer.bias = None
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(general(layer, x)))
    assert torch.equal(bits(y), bits(brute(layer, x, exact(8, False), False, 0)))


def test_steps_aside_where_no_fold_applies(monkeypatch):
    layer, x = make(exact(8, False), shift=-0.2)
    monkeypatch.setattr(eval_plan, "_folded_lowrank_weights", lambda *a, **k: None)
    _no_plan_same_bits(layer, x, brute(layer, x, exact(8, False), False, 0))


# ------------------------------------------------------------------------------------------
# The linear layer's plan (int8 GEMM and numba epilogue)
# ------------------------------------------------------------------------------------------


def make_linear(table, *, signed=False, k=40, n=9, seed=0, bias=True, scheme="per_channel", shift=0.3, lead=(6,)):
    torch.manual_seed(seed)
    lut = LutFile(table, width_a=8, width_b=8, signed=signed)
    layer = ApproxLinear.from_float(nn.Linear(k, n, bias=bias),
                                    ApproxConfig(lut, kernel="lowrank", weight_scheme=scheme)).eval()
    x = torch.randn(*lead, k) + shift     # negative values too: Zx > 0 when unsigned
    layer(x)
    layer.act_quant.observing = False
    return layer, x


def brute_linear(layer, x, table, signed):
    """Brute-force accumulator, rounded once to float32, ``* (sx sw)``, ``+ bias`` (numpy float32)."""
    with torch.no_grad():
        xf = x.reshape(-1, layer.in_features)
        qx, sx, zx, qw, sw, zw = layer._quantize(xf)
        zw = zw.reshape(-1).expand(qw.shape[0])
        acc = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy(), signed)
        out = acc.astype(np.float32) * (sx * sw.reshape(1, -1)).numpy().astype(np.float32)
        if layer.bias is not None:
            out = (out + layer.bias.detach().numpy().astype(np.float32)).astype(np.float32)
    return torch.from_numpy(out).reshape(*x.shape[:-1], layer.out_features)


LINEAR_CASES = {
    "exact (one digit plane)": dict(columns=0),
    "truncated 6 columns (rank > 1)": dict(columns=6, k=120),
    "truncated 10 columns": dict(columns=10, k=60),
    "signed exact": dict(columns=0, signed=True, shift=0.0),
    "per-tensor weights, no bias": dict(columns=4, scheme="per_tensor", bias=False),
    "3-D input": dict(columns=0, lead=(2, 3)),
    "one row": dict(columns=8, lead=(1,)),
}


@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear_plan_output_is_the_brute_force_and_the_general_path(name):
    case = dict(LINEAR_CASES[name])
    columns, signed = case.pop("columns"), case.get("signed", False)
    table = gemm_table(columns, signed)
    layer, x = make_linear(table, **case)
    y, ran = planned(layer, x)
    assert ran and y.shape == (*x.shape[:-1], layer.out_features)
    assert torch.equal(bits(y), bits(brute_linear(layer, x, table, signed)))
    assert torch.equal(bits(y), bits(general(layer, x)))
    y2, ran2 = planned(layer, x)
    assert ran2 and torch.equal(bits(y2), bits(y))


def test_linear_plan_steps_aside_without_the_int8_gemm_and_where_no_prep_applies(monkeypatch):
    table = gemm_table(0)
    layer, x = make_linear(table)
    monkeypatch.setenv("APPMULT_NO_INT8_GEMM", "1")
    _no_plan_same_bits(layer, x, brute_linear(layer, x, table, False))
    monkeypatch.delenv("APPMULT_NO_INT8_GEMM")
    y, ran = planned(layer, x)   # switched back on: planned again
    assert ran and torch.equal(bits(y), bits(brute_linear(layer, x, table, False)))
    layer2, x2 = make_linear(table, seed=1)
    monkeypatch.setattr(eval_plan.FN, "_lowrank_linear_sides", lambda *a: (None, False))
    _no_plan_same_bits(layer2, x2, brute_linear(layer2, x2, table, False))


def test_linear_plan_follows_weight_bias_and_range_changes():
    table = gemm_table(4)
    layer, x = make_linear(table, k=30)
    y0, _ = planned(layer, x)
    changes = [lambda: layer.weight.data[3].mul_(-1.5),        # through .data: no version bumps
               lambda: layer.bias.data[2:5].add_(0.25),
               lambda: layer.act_quant.min_val.data.mul_(2.0)]
    for change in changes:
        change()
        y1, ran = planned(layer, x)
        assert ran and not torch.equal(y1, y0)
        assert torch.equal(bits(y1), bits(brute_linear(layer, x, table, False)))
        y0 = y1


def test_linear_plan_non_finite_input_and_gradients():
    layer, x = make_linear(gemm_table(0))
    xb = x.clone()
    xb[2, 7] = float("nan")
    with pytest.raises(InvalidValueError, match="ApproxLinear input contains NaN or Inf"):
        planned(layer, xb)
    y = layer(x)   # grad mode, the weight requires grad: the general path, with its graph
    assert y.requires_grad


def test_linear_plan_with_a_scale_or_bias_the_epilogue_does_not_take(monkeypatch):
    """A bias of another length than the outputs cannot happen in a layer; the plan checks
    the epilogue's conditions anyway (``_int8_linear_out``'s) and steps aside."""
    table = gemm_table(0)
    layer, x = make_linear(table)
    monkeypatch.setattr(eval_plan, "_bias_bits", lambda m: np.zeros(3, np.float32))
    _no_plan_same_bits(layer, x, brute_linear(layer, x, table, False))


def test_new_lut_tables_object_rebuilds_the_plan():
    """The LUT tables swapped for another LUT's: the plan (keyed on the tables themselves)
    is rebuilt, even where the old object's id could be reused."""
    layer, x = make(exact(8, False), shift=-0.2)
    planned(layer, x)
    other, _ = make(weight_side(), shift=-0.2)
    layer.lut = other.lut
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(brute(layer, x, weight_side(), False, 0)))


@pytest.mark.parametrize("plan_on", [True, False])
def test_lut_tables_cycled_through_one_layer_never_reuse_a_freed_lut_fold(plan_on):
    """Tables swapped in and out of a layer whose weight does not change (``layer.lut =``):
    with weight-side entries keyed on ``id(tabs)``, a new tables object at a freed one's
    address got the old LUT's fold -- 26 wrong outputs in 60 swaps on the general path, 3
    with the plan (found by the mutation review). Every output must be its LUT's brute force."""
    from appmult.nn.tables import LutTables
    layer, x = make(exact(8, False), shift=-0.2, padding=1)
    v = np.arange(256)
    tables = [np.outer(v, v & ~m) for m in (0, 1, 3, 7)]
    luts = [LutFile(t, width_a=8, width_b=8, signed=False) for t in tables]
    cfg = layer.config
    prev = eval_plan.ENABLED
    eval_plan.ENABLED = plan_on
    try:
        for i in range(60):
            layer.lut = None
            layer.lut = LutTables(luts[i % 4], grad=cfg.grad, kernel=cfg.kernel)
            with torch.no_grad():
                y = layer(x)
            assert torch.equal(bits(y), bits(brute(layer, x, tables[i % 4], False, 1))), i
    finally:
        eval_plan.ENABLED = prev
