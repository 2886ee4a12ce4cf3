"""The one-node training step of ``ApproxLinear`` (``appmult.nn.train_plan``): what it
returns, its gradients, when it runs and when it steps aside.

References: the numpy brute force of the LUT sum (``test_nn_int8_gemm.brute_acc``) with
the layer's float32 dequantization for the forward, and the general path of the same
layer (``train_plan.ENABLED = False``: the chain of autograd nodes the step replaces) for
everything else, bit for bit (``int32`` views): outputs, the input's, weight's and bias's
gradients and the activation observer's range, over several optimizer steps.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from appmult.nn import kernels as K
from appmult.nn import train_plan
from test_nn_int8_gemm import brute_acc, truncated
from test_nn_train_overhead import drum_table

pytestmark = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def bits(t: torch.Tensor | None):
    return None if t is None else t.detach().contiguous().view(torch.int32).clone()


def weight_side() -> np.ndarray:
    """``x * (w with its lowest bit cleared)``: rank 1, ``U = value(x)``, ``V != value(w)``."""
    v = np.arange(256)
    return np.outer(v, v & ~1)


TABLES = {
    "exact": lambda: (truncated(0), False),
    "exact_signed": lambda: (truncated(0, signed=True), True),
    "weight_side": lambda: (weight_side(), False),
    "drum": lambda: (drum_table(False), False),
    "drum_signed": lambda: (drum_table(True), True),
}


def make(name="exact", *, k=24, n=7, bias=True, seed=0, **config):
    table, signed = TABLES[name]()
    torch.manual_seed(seed)
    cfg = {"kernel": "lowrank", "compute_missing_gradients": True, **config}
    layer = ApproxLinear.from_float(nn.Linear(k, n, bias=bias),
                                    ApproxConfig(LutFile(table, width_a=8, width_b=8, signed=signed), **cfg))
    return layer.train()


def make_conv(name="exact", *, cin=4, cout=6, k=3, bias=True, seed=0, geom=None, **config):
    table, signed = TABLES[name]()
    torch.manual_seed(seed)
    cfg = {"kernel": "lowrank", "compute_missing_gradients": True, **config}
    layer = ApproxConv2d.from_float(nn.Conv2d(cin, cout, k, bias=bias, **(geom or {"padding": 1})),
                                    ApproxConfig(LutFile(table, width_a=8, width_b=8, signed=signed), **cfg))
    return layer.train()


def conv_inputs(signed: bool, n=3, c=4, hw=9, seed=1, steps=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, hw, hw, generator=gen) * (1 + s) + (0 if signed else 0.3) for s in range(steps)]


def inputs(signed: bool, m=9, k=24, seed=1, steps=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, k, generator=gen) * (1 + s) + (0 if signed else 0.3) for s in range(steps)]


def plan(on: bool | None):
    """``train_plan.ENABLED`` set to ``on`` for a block."""
    return mock.patch.object(train_plan, "ENABLED", on)


@contextlib.contextmanager
def spied(monkeypatch):
    """A list that gets one entry per forward the one-node step computed."""
    ran: list = []
    for fn in (train_plan._LinearStepFn, train_plan._ConvStepFn):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: ran.append(1) or real(*a))
    yield ran


def run_steps(layer, xs, *, x_grad=True, penalty=False, transposed=False):
    """Forward, backward and an SGD step per input; what each step produced (bits)."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    out = []
    for x in xs:
        x = x.clone().requires_grad_(x_grad)
        y = layer(x)
        g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        if transposed:  # the gradient reaching the layer is a transposed (non-contiguous) view
            y = y.reshape(-1, y.shape[-1]).t()
            g = g.reshape(-1, g.shape[-1]).t()
        if penalty:  # a gradient penalty: the backward differentiated again (its incoming gradient y g)
            (gx,) = torch.autograd.grad((y * y * g).sum() / 2, x, create_graph=True)
            loss = (y * g).sum() + gx.square().sum()
        else:
            loss = (y * g).sum()
        opt.zero_grad()
        loss.backward()
        b = layer.bias
        w = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
        out.append([bits(y), bits(x.grad), bits(w.grad), bits(None if b is None else b.grad),
                    bits(layer.act_quant.min_val), bits(layer.act_quant.max_val)])
        opt.step()
    return out


def same(a, b) -> bool:
    return all((u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
               for sa, sb in zip(a, b) for u, v in zip(sa, sb)) and len(a) == len(b)


def both_ways(make_layer, xs, monkeypatch, **kw):
    """``(general, planned, plan runs)`` of the same steps from two identical layers."""
    with plan(False):
        want = run_steps(make_layer(), xs, **kw)
    with plan(True), spied(monkeypatch) as ran:
        got = run_steps(make_layer(), xs, **kw)
    return want, got, len(ran)


@contextlib.contextmanager
def int8_steps(monkeypatch):
    """A list that gets the kind of each step whose codes and int8 sides two numba passes made."""
    made: list = []
    real = train_plan._int8_step_codes

    def spy(*a):
        out = real(*a)
        if out is not None:
            made.append(a[-1])
        return out
    monkeypatch.setattr(train_plan, "_int8_step_codes", spy)
    yield made


#: The kind of step the two numba passes make for each table (none for the others).
INT8_STEP = {"exact": "value", "exact_signed": "value", "drum": "mapped"}


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
def test_steps_are_the_general_path_bit_for_bit(name, grad, monkeypatch):
    signed = TABLES[name]()[1]
    with int8_steps(monkeypatch) as made:
        want, got, ran = both_ways(lambda: make(name, grad=grad), inputs(signed), monkeypatch)
    assert ran == 3
    assert made == [INT8_STEP[name]] * 3 if name in INT8_STEP else made == []
    assert same(want, got)


@pytest.mark.parametrize("name", sorted(INT8_STEP))
@pytest.mark.parametrize("observer", ["moving_average", "minmax"])
@pytest.mark.parametrize("shape", [(9, 24, 7), (1, 2, 1), (40, 300, 33), (2, 9000, 3)])
def test_int8_steps_over_shapes_and_observers(name, observer, shape, monkeypatch):
    """The codes and int8 sides by two numba passes (one row, two columns, a row longer than
    a numba block of activations): the general path's bits, the observer's range included,
    for both observers."""
    m, k, n = shape
    signed = TABLES[name]()[1]
    with int8_steps(monkeypatch) as made:
        want, got, ran = both_ways(lambda: make(name, k=k, n=n, act_observer=observer),
                                   inputs(signed, m=m, k=k), monkeypatch)
    assert ran == 3 and made == [INT8_STEP[name]] * 3
    assert same(want, got)


def drum_like(rows: int, top: int, base: int = 0) -> np.ndarray:
    """A rank-1 table ``U[x] V[w]`` over ``rows`` activation codes with looked-up factors:
    ``U`` DRUM-like (the low two bits of larger codes replaced by ``10``) plus ``base``, its
    largest value ``top`` (so its span ``top - base``), ``V`` DRUM(4)'s."""
    u = np.array([min(((x >> 2) << 2) | 2, 255) if x > 4 else x for x in range(rows)], np.int64) + base
    u[-1] = top
    return np.outer(u, drum_table(False)[1])


def linear_with(table, width_a=8, width_b=8, k=24, n=7):
    def make_layer():
        torch.manual_seed(0)
        return ApproxLinear.from_float(nn.Linear(k, n), ApproxConfig(
            LutFile(table, width_a=width_a, width_b=width_b, signed=False), kernel="lowrank")).train()
    return make_layer


class _Transposed(nn.Module):
    """A parametrization storing the weight transposed: the layer's weight is a view that is
    not contiguous."""

    def forward(self, stored):
        return stored.t()

    def right_inverse(self, weight):
        return weight.t().contiguous()


def _boundary_case(case, monkeypatch):
    """``(layer factory, inputs, whether the int8 step is taken)`` of a boundary case."""
    exact = truncated(0)
    if case == "weights_9bit":   # one int8 offset cannot hold a 9-bit weight's codes
        return linear_with(np.outer(np.arange(256), np.arange(512)), width_b=9), inputs(False), False
    if case == "activations_9bit_mapped":  # 512 codes, looked-up factors within 255: taken
        return linear_with(drum_like(512, 255), width_a=9), inputs(False), True
    if case in ("factor_span_255", "factor_span_256"):   # the int8 side holds a span of 255
        return linear_with(drum_like(256, int(case[-3:]))), inputs(False), case.endswith("255")
    if case == "factor_span_255_from_20":
        return linear_with(drum_like(256, 275, base=20)), inputs(False), True
    if case in ("planes_0", "planes_1"):
        monkeypatch.setattr(FU, "INT8_GEMM_MAX_PLANES", int(case[-1]))
        return linear_with(exact), inputs(False), case == "planes_1"
    if case in ("k_1", "k_max", "k_max_plus_1"):
        k = {"k_1": 1, "k_max": FU.INT8_GEMM_MAX_K, "k_max_plus_1": FU.INT8_GEMM_MAX_K + 1}[case]
        return linear_with(exact, k=k, n=2), inputs(False, m=2, k=k), case == "k_max"
    assert case == "weight_not_contiguous"

    def make_layer():
        layer = linear_with(exact)()
        parametrize.register_parametrization(layer, "weight", _Transposed())
        assert not layer.weight.is_contiguous()
        return layer
    return make_layer, inputs(False), False


@pytest.mark.parametrize("case", ["weights_9bit", "activations_9bit_mapped", "factor_span_255", "factor_span_256",
                                  "factor_span_255_from_20", "planes_0", "planes_1", "k_1", "k_max", "k_max_plus_1", "weight_not_contiguous"])
def test_int8_step_boundaries(case, monkeypatch):
    """Where the two numba passes apply and where the step takes its other ways (each giving
    the general path's bits): 9-bit weight codes, 9-bit activation codes with looked-up
    factors, an activation factor spanning 255 or 256 integers, the int8 GEMM off or on one
    plane, ``K`` of 1, the int8 GEMM's largest and one more, a weight that is not contiguous."""
    make_layer, xs, taken = _boundary_case(case, monkeypatch)
    with int8_steps(monkeypatch) as made:
        want, got, _ = both_ways(make_layer, xs, monkeypatch)
    assert len(made) == (3 if taken else 0)
    assert same(want, got)


def test_exact_product_step_with_post_relu_inputs_and_negative_zeros(monkeypatch):
    """Inputs whose range starts at zero, with -0.0 among them (a ReLU keeps -0.0): the codes,
    gradients and the observer's range are the general path's bits."""
    xs = [torch.relu(x - 0.3) for x in inputs(False)]
    for x in xs:
        x[0, :5] = -0.0
    want, got, ran = both_ways(lambda: make("exact"), xs, monkeypatch)
    assert ran == 3 and same(want, got)


@pytest.mark.parametrize("name", ["exact", "drum", "drum_signed"])
def test_forward_is_the_brute_force_sum(name, monkeypatch):
    table, signed = TABLES[name]()
    layer = make(name)
    x = inputs(signed, steps=1)[0].requires_grad_(True)
    with plan(True), spied(monkeypatch) as ran:
        y = layer(x)
    assert ran == [1]
    with torch.no_grad():
        q = layer.quantize(x)   # the observer has this batch's range now: the codes of that forward
        acc = brute_acc(table, q.qx.numpy(), q.zero_x.numpy(), q.qw.numpy(), q.zero_w.numpy().reshape(-1), signed)
        scale = (q.scale_x * q.scale_w.reshape(1, -1)).to(torch.float32)
        want = torch.from_numpy(acc.astype(np.float32)) * scale + layer.bias
    assert torch.equal(bits(y), bits(want))


def test_operand_b_and_lead_dimensions(monkeypatch):
    xs = [x.reshape(3, 3, 24) for x in inputs(False)]
    want, got, ran = both_ways(lambda: make("exact", activation_operand="b"), xs, monkeypatch)
    assert ran == 3 and same(want, got)
    # the activation factor a look-up, the weight's its value: no int8 weight side (the
    # general path from the step's codes and fold)
    sides = []
    real = FN._lowrank_linear_sides
    monkeypatch.setattr(FN, "_lowrank_linear_sides", lambda *a: sides.append(1) or real(*a))
    want, got, ran = both_ways(lambda: make("weight_side", activation_operand="b"), xs, monkeypatch)
    assert ran == 0 and same(want, got)
    assert len(sides) == 6  # one weight side a step, either way (not made again by the general path)


def test_no_bias_a_frozen_bias_and_an_input_without_gradient(monkeypatch):
    want, got, ran = both_ways(lambda: make("exact", bias=False), inputs(False), monkeypatch)
    assert ran == 3 and same(want, got)

    def frozen_bias():
        layer = make("drum")
        layer.bias.requires_grad_(False)
        return layer
    want, got, ran = both_ways(frozen_bias, inputs(False), monkeypatch)
    assert ran == 3 and same(want, got) and got[0][3] is None
    want, got, ran = both_ways(lambda: make("exact"), inputs(False), monkeypatch, x_grad=False)
    assert ran == 3 and same(want, got) and got[0][1] is None


def test_an_incoming_gradient_that_is_not_contiguous(monkeypatch):
    want, got, ran = both_ways(lambda: make("drum"), inputs(False), monkeypatch, transposed=True)
    assert ran == 3 and same(want, got)


@pytest.mark.parametrize("grad", ["ste", "lut2d"])
def test_a_gradient_penalty_differentiates_the_backward_again(grad, monkeypatch):
    """``create_graph=True``: the step's backward is torch operations on the incoming
    gradient, differentiable as the general path's (the same bits both times)."""
    want, got, ran = both_ways(lambda: make("exact", grad=grad), inputs(False), monkeypatch, penalty=True)
    assert ran == 3 and same(want, got)


@pytest.mark.parametrize("name", ["drum", "exact"])
def test_frozen_observer_and_eval_mode_with_gradients(name, monkeypatch):
    def frozen():
        layer = make(name)
        with torch.no_grad():
            layer(inputs(False, steps=1)[0])
        layer.act_quant.observing = False
        return layer
    want, got, ran = both_ways(frozen, inputs(False), monkeypatch)
    assert ran == 3 and same(want, got)
    want, got, ran = both_ways(lambda: frozen().eval(), inputs(False), monkeypatch)
    assert ran == 3 and same(want, got)


def picks(kernel: str):
    """A stand-in for ``kernels.probe_choice`` that picks ``kernel`` (and caches it, as the probe does)."""
    def choice(key, candidates, device):
        K._probe_lru[key] = kernel
        return kernel
    return choice


def test_auto_kernel_takes_the_step_once_its_probe_picked_lowrank(monkeypatch):
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")  # (the suite runs with the probe off)
    K.clear_probe_cache()
    make_layer = lambda: make("exact", kernel="auto")  # noqa: E731
    monkeypatch.setattr(K, "probe_choice", picks("lowrank"))
    want, got, ran = both_ways(make_layer, inputs(False), monkeypatch)
    assert same(want, got)
    assert ran == 3  # the general path (without the plan) probed first, and its choice is kept
    K.clear_probe_cache()
    with plan(True), spied(monkeypatch) as ran:
        run_steps(make_layer(), inputs(False))
    assert len(ran) == 2  # the first step probes through the general path
    K.clear_probe_cache()
    monkeypatch.setattr(K, "probe_choice", picks("gather"))
    want, got, ran = both_ways(make_layer, inputs(False), monkeypatch)
    assert ran == 0 and same(want, got)
    K.clear_probe_cache()


@pytest.mark.parametrize("case", ["frozen_weight", "no_grad", "per_tensor", "correction", "exact_accumulate",
                                  "float64", "gather", "rank7", "switched_off", "env_off", "no_int8_gemm",
                                  "no_numba", "exact_multiplication"])
def test_steps_aside(case, monkeypatch):
    config = {"per_tensor": {"weight_scheme": "per_tensor"}, "correction": {"correction": "control_variate"},
              "exact_accumulate": {"exact_accumulate": True}, "gather": {"kernel": "gather"}}.get(case, {})
    layer = make("exact", **config)
    if case == "rank7":
        layer = ApproxLinear.from_float(nn.Linear(24, 7), ApproxConfig(
            LutFile(truncated(8), width_a=8, width_b=8, signed=False), kernel="lowrank")).train()
    if case == "frozen_weight":
        layer.weight.requires_grad_(False)
    if case == "float64":
        layer = layer.double()
    if case == "exact_multiplication":
        layer.exact_multiplication = True
    if case == "env_off":
        monkeypatch.setenv("APPMULT_NO_TRAIN_PLAN", "1")
    if case == "no_int8_gemm":
        monkeypatch.setenv("APPMULT_NO_INT8_GEMM", "1")
    if case == "no_numba":
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    x = inputs(False, steps=1)[0]
    if case == "float64":
        x = x.double()
    ctx = torch.no_grad() if case == "no_grad" else contextlib.nullcontext()
    with plan(None if case == "env_off" else case != "switched_off"), spied(monkeypatch) as ran, ctx:
        layer(x.requires_grad_(case != "no_grad"))
    assert ran == []


def test_steps_aside_for_the_fused_low_rank_switch(monkeypatch):
    """``APPMULT_NO_FUSED_LOWRANK`` (or ``functional._FUSED_LOWRANK = False``) turns the fused
    low-rank paths off, this one included (the same bits by the plain path)."""
    for how in ("env", "override"):
        with monkeypatch.context() as mp:
            if how == "env":
                mp.setenv("APPMULT_NO_FUSED_LOWRANK", "1")
            else:
                mp.setattr(FN, "_FUSED_LOWRANK", False)
            want, got, ran = both_ways(lambda: make("exact"), inputs(False), mp)
        assert ran == 0 and same(want, got)


@pytest.mark.parametrize("case", ["float64_input", "float64_bias", "strided_input"])
def test_operands_it_does_not_take_give_the_general_path(case, monkeypatch):
    """Where the step's operands are not what its kernels take -- a float64 input or bias on
    a float32 layer (the general path converts them), an input that is not contiguous -- it
    steps aside: the general path's bits."""
    def make_layer():
        layer = make("drum")
        if case == "float64_bias":
            layer.bias = nn.Parameter(layer.bias.detach().double() + 1e-9)
        return layer
    xs = inputs(False)
    if case == "float64_input":
        xs = [x.double() for x in xs]
    if case == "strided_input":
        xs = [x.t().contiguous().t() for x in xs]   # (9, 24) with strides (1, 9)
    prev = train_plan.ENABLED
    want, got, ran = both_ways(make_layer, xs, monkeypatch)
    assert train_plan.ENABLED is prev
    assert ran == 0 and same(want, got)


def test_where_no_int8_side_applies_the_general_path_continues_from_the_codes(monkeypatch):
    """The observer has been updated when the weight side is refused: the step goes on by
    the general path from the codes already made (the observer not updated twice)."""
    monkeypatch.setattr(FN, "_int8_codes_prep", lambda *a: None)
    monkeypatch.setattr(train_plan, "_int8_step_kind", lambda *a: None)  # (the codes by _codes)
    want, got, ran = both_ways(lambda: make("drum"), inputs(False), monkeypatch)
    assert ran == 0 and same(want, got)


def test_looked_up_weights_wider_than_one_int8_plane_give_the_general_path(monkeypatch):
    """A rank-1 LUT whose weight factor is a look-up spanning more than 255 within a row: the
    numba passes refuse it before the observer changes, and the general path takes the step
    (the same bits, the observer updated once a step)."""
    u = np.array([min(((x >> 2) << 2) | 2, 255) if x > 4 else x for x in range(256)], np.int64)
    v = np.arange(256, dtype=np.int64) ** 2 // 64                # 0 .. 1016
    table = np.outer(u, v)

    def make_layer():
        torch.manual_seed(0)
        return ApproxLinear.from_float(nn.Linear(24, 7), ApproxConfig(
            LutFile(table, width_a=8, width_b=8, signed=False), kernel="lowrank")).train()
    assert train_plan._int8_step_kind(inputs(False)[0], make_layer().weight, make_layer().lut) == "mapped"
    with int8_steps(monkeypatch) as made:
        want, got, ran = both_ways(make_layer, inputs(False), monkeypatch)
    assert made == [] and ran == 0 and same(want, got)


@pytest.mark.parametrize("name", ["exact", "drum"])
@pytest.mark.parametrize("everywhere", [False, True])
def test_non_finite_input_and_weight_are_refused_and_change_nothing(name, everywhere, monkeypatch):
    """One NaN or Inf, or nothing but (``everywhere``: the finiteness word is then exactly
    ``2**31``), in the input -- observer updating or frozen -- or in the weight."""
    for observing in (None, False):
        layer = make(name)
        layer(inputs(False, steps=1)[0])
        layer.act_quant.observing = observing
        before = (bits(layer.act_quant.min_val), bits(layer.act_quant.max_val))
        x = inputs(False, steps=1)[0]
        if everywhere:
            x.fill_(float("nan"))
        x[2, 3] = float("nan")
        with plan(True), spied(monkeypatch) as ran, pytest.raises(InvalidValueError, match="ApproxLinear input"):
            layer(x.requires_grad_(True))
        assert ran == []
        assert torch.equal(before[0], bits(layer.act_quant.min_val))
        assert torch.equal(before[1], bits(layer.act_quant.max_val))
    layer = make(name)
    with torch.no_grad():
        if everywhere:
            layer.weight.fill_(float("inf"))
        layer.weight[1, 2] = float("inf")
    with plan(True), pytest.raises(InvalidValueError, match="ApproxLinear weight contains NaN or Inf"):
        layer(inputs(False, steps=1)[0])
    layer = make("exact")
    with torch.no_grad():
        layer.weight[1, 2] = 3e38
        layer.weight[1, 3] = -3e38
    with plan(True), pytest.raises(InvalidValueError, match="too wide to quantize in torch.float32"):
        layer(inputs(False, steps=1)[0])


GEOMS = {"pad1": {"padding": 1}, "strided": {"stride": 2, "padding": 2, "dilation": 2},
         "grouped": {"groups": 2, "padding": (0, 1)}}


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
@pytest.mark.parametrize("geom", sorted(GEOMS))
def test_conv_steps_are_the_general_path_bit_for_bit(name, grad, geom, monkeypatch):
    signed = TABLES[name]()[1]
    want, got, ran = both_ways(lambda: make_conv(name, grad=grad, geom=GEOMS[geom]), conv_inputs(signed),
                               monkeypatch)
    assert ran == 3
    assert same(want, got)


@pytest.mark.parametrize("name", ["exact", "drum"])
def test_conv_forward_is_the_brute_force_sum(name, monkeypatch):
    from test_nn_wide_conv_fold import brute_conv_acc
    table, signed = TABLES[name]()
    layer = make_conv(name, geom=GEOMS["strided"])
    x = conv_inputs(signed, steps=1)[0].requires_grad_(True)
    with plan(True), spied(monkeypatch) as ran:
        y = layer(x)
    assert ran == [1]
    with torch.no_grad():
        q = layer.quantize(x)   # padded with the zero point, the codes of that forward
        acc = brute_conv_acc(table, q.qx, float(q.zero_x), q.qw, q.zero_w, 0, signed, stride=2, dilation=2)
        scale = (q.scale_x * q.scale_w.reshape(1, -1, 1, 1)).to(torch.float32)
        want = torch.as_tensor(acc).to(torch.float32) * scale + layer.bias.reshape(1, -1, 1, 1)
    assert torch.equal(bits(y), bits(want))


def test_conv_unbatched_input_frozen_bias_and_input_without_gradient(monkeypatch):
    xs = [x[0] for x in conv_inputs(False)]
    want, got, ran = both_ways(lambda: make_conv("drum"), xs, monkeypatch)
    assert ran == 3 and same(want, got)

    def frozen_bias():
        layer = make_conv("exact")
        layer.bias.requires_grad_(False)
        return layer
    want, got, ran = both_ways(frozen_bias, conv_inputs(False), monkeypatch, x_grad=False)
    assert ran == 3 and same(want, got) and got[0][1] is None and got[0][3] is None
    want, got, ran = both_ways(lambda: make_conv("exact", bias=False), conv_inputs(False), monkeypatch,
                               penalty=True)
    assert ran == 3 and same(want, got)


@pytest.mark.parametrize("case", ["rank7", "gather", "switched_off", "frozen_weight", "float64_input",
                                  "float64_bias", "strided_input", "auto_gather"])
def test_conv_steps_aside(case, monkeypatch):
    def make_layer():
        if case == "rank7":
            torch.manual_seed(0)
            return ApproxConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), ApproxConfig(
                LutFile(truncated(8), width_a=8, width_b=8, signed=False), kernel="lowrank")).train()
        layer = make_conv("exact", **({"kernel": "gather"} if case == "gather" else
                                      {"kernel": "auto"} if case == "auto_gather" else {}))
        if case == "frozen_weight":
            layer.weight.requires_grad_(False)
        if case == "float64_bias":
            layer.bias = nn.Parameter(layer.bias.detach().double() + 1e-9)
        return layer
    xs = conv_inputs(False)
    if case == "float64_input":
        xs = [x.double() for x in xs]
    if case == "strided_input":
        xs = [x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for x in xs]   # channels-last strides
    if case == "auto_gather":
        monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")
        monkeypatch.setattr(K, "probe_choice", picks("gather"))
        K.clear_probe_cache()
    with plan(False):
        want = run_steps(make_layer(), xs)
    with plan(case != "switched_off"), spied(monkeypatch) as ran:
        got = run_steps(make_layer(), xs)
    K.clear_probe_cache()
    assert ran == [] and same(want, got)


def test_conv_auto_kernel_takes_the_step_once_its_probe_picked_lowrank(monkeypatch):
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")
    monkeypatch.setattr(K, "probe_choice", picks("lowrank"))
    K.clear_probe_cache()
    want, got, ran = both_ways(lambda: make_conv("drum", kernel="auto", geom=GEOMS["strided"]), conv_inputs(False),
                               monkeypatch)
    K.clear_probe_cache()
    assert ran == 3 and same(want, got)


def test_conv_where_no_fused_accumulator_applies_the_general_path_continues(monkeypatch):
    monkeypatch.setattr(FN, "_fused_conv_acc", lambda *a: None)
    for geom in ("strided", "grouped"):   # (the general path must get the whole geometry)
        want, got, ran = both_ways(lambda: make_conv("drum", geom=GEOMS[geom]), conv_inputs(False), monkeypatch)
        assert ran == 0 and same(want, got)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_inside_autocast_computes_in_float32(kind, monkeypatch):
    """``backward()`` called inside ``torch.autocast``: the step's backward turns autocast off,
    as the general path's nodes do (else its matrix products would round to bfloat16)."""
    make_layer, xs = (lambda: make("drum"), inputs(False)) if kind == "linear" else \
        (lambda: make_conv("drum"), conv_inputs(False))

    def steps():
        layer = make_layer()
        out = []
        for x in xs:
            x = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
                (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            out.append([bits(y.float()), bits(x.grad), bits(layer.weight.grad), bits(layer.bias.grad)])
            layer.zero_grad()
        return out
    with plan(False):
        want = steps()
    with plan(True), spied(monkeypatch) as ran:
        got = steps()
    assert len(ran) == 3 and same(want, got)
