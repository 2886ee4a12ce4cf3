"""Approximate layers never give a silent wrong answer (issue 11, the ``appmult.nn`` items).

Each test names the issue-11 item it covers: 1 (non-finite weights, indices that leave the
table), 3 (float16/bfloat16/float64), 7 (a refused ``load_state_dict`` changes nothing), 15
(empty batches, unbatched input) and the messages (channel mismatch, the ``meta`` device).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import (ApproxConfig, ApproxConv2d, ApproxLinear, LutMismatchError, LutTables, approx_conv2d,
                        approx_linear, approximate_, frozen, lut_conv2d, lut_linear)
from appmult.nn import kernels as K
from conftest import exact as exact_message
from test_nn_forward import brute_conv, brute_linear
from test_nn_luts import mitchell_like, random_lut, truncated

TABLES = {
    "trunc8u": (lambda: truncated(8, 4), 8, False),          # rank 5: the low-rank kernels
    "mitchell8u": (lambda: mitchell_like(8, False), 8, False),  # high rank: the gather kernels
    "mitchell8s": (lambda: mitchell_like(8, True), 8, True),
    "random6u": (lambda: random_lut(6, 3), 6, False),        # 64 codes: uint8 indices can leave it
}


def make_lut(name: str) -> LutFile:
    table, width, signed = TABLES[name]
    return LutFile(table(), width_a=width, width_b=width, signed=signed, metadata={"spec": name})


def conv_layer(name: str, cin: int = 4, cout: int = 8, **kw) -> ApproxConv2d:
    torch.manual_seed(0)
    return ApproxConv2d(cin, cout, 3, padding=1, config=ApproxConfig(make_lut(name), **kw))


def linear_layer(name: str, fin: int = 16, fout: int = 6, **kw) -> ApproxLinear:
    torch.manual_seed(0)
    return ApproxLinear(fin, fout, config=ApproxConfig(make_lut(name), **kw))


# --- item 1: non-finite weights are refused; no index ever leaves the table ------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u", "random6u"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("training", [False, True])
def test_non_finite_weight_refused(bad, lut, kind, training):  # item 1
    layer = linear_layer(lut) if kind == "linear" else conv_layer(lut)
    layer.train(training)
    x = torch.rand(3, 16) if kind == "linear" else torch.rand(2, 4, 6, 6)
    layer(x)
    with torch.no_grad():
        layer.weight[1, 2] = bad
    name = type(layer).__name__
    message = exact_message(f"{name} weight contains NaN or Inf; approximate layers quantize their weights "
                            f"and cannot represent non-finite values")
    for call in (layer, layer.int_forward, layer.quantize, layer.operands):
        with pytest.raises(InvalidValueError, match=message):
            call(x)
    with torch.no_grad(), pytest.raises(InvalidValueError, match=message):
        layer(x)


def test_non_finite_weight_written_through_data_refused():  # item 1
    """The weight check runs once per weight change (the quantized weight is cached), and a
    write through ``.data`` that bypasses the version counter is still a change."""
    layer = conv_layer("mitchell8u").eval()
    x = torch.rand(2, 4, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.weight.data[0, 0, 0, 0] = float("nan")
        with pytest.raises(InvalidValueError, match="ApproxConv2d weight contains NaN or Inf"):
            layer(x)


def test_weight_too_large_to_quantize_refused():  # item 1
    layer = linear_layer("mitchell8u").eval()
    with torch.no_grad():
        layer.weight[0, 0] = 3e38
        layer.weight[0, 1] = -3e38
    with pytest.raises(InvalidValueError, match=exact_message(
            "ApproxLinear weight range [-3e+38, 3e+38] is too wide to quantize in torch.float32")):
        layer(torch.rand(2, 16))


def test_nan_weight_with_10_bit_lut_does_not_crash():  # item 1
    """A 10-bit gather LUT and a NaN weight used to kill the process in the gather kernel."""
    code = textwrap.dedent("""
        import numpy as np, torch
        from appmult.lut_gen import LutFile
        from appmult.nn import ApproxConfig, ApproxLinear
        table = np.random.default_rng(1).integers(-1000, 1001, size=(1024, 1024))
        lut = LutFile(table, width_a=10, width_b=10, signed=False, metadata={})
        layer = ApproxLinear(16, 4, config=ApproxConfig(lut, kernel="gather")).eval()
        with torch.no_grad():
            layer.weight[0, 0] = float("nan")
        for call in (layer, layer.int_forward):
            try:
                call(torch.rand(3, 16))
            except ValueError as e:
                print("refused:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused: ApproxLinear weight contains NaN or Inf") == 2


def _adversarial(n: int):
    """Index tensors just outside a table of ``n`` rows, in the dtypes a caller might pass."""
    cases = [(torch.int64, n), (torch.int64, -1), (torch.int32, n + 3)]
    if n < 256:
        cases.append((torch.uint8, n))      # a uint8 index proves nothing for a small table
    else:
        cases.append((torch.int64, n + 256 - n % 256))  # would wrap into range as uint8
    return cases


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("entry", ["forward", "grad_a", "grad_b"])
@pytest.mark.parametrize("n", [64, 256])
@pytest.mark.parametrize("operand", ["a", "b"])
def test_gather_kernels_refuse_indices_outside_the_table(numba, entry, n, operand, monkeypatch):  # item 1
    if numba and not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    if not numba:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    rng = np.random.default_rng(n)
    table = torch.from_numpy(rng.integers(-50, 50, (n, n))).to(torch.int32)
    grad_table = table.to(torch.float32)
    nbatch, groups, kg, ng, length = 2, 2, 5, 3, 40
    for dtype, value in _adversarial(n):
        a = torch.from_numpy(rng.integers(0, n, (nbatch, groups * kg, length))).to(dtype)
        b = torch.from_numpy(rng.integers(0, n, (groups * ng, kg))).to(dtype)
        (a if operand == "a" else b).view(-1)[7] = value
        grad = torch.rand(nbatch, groups * ng, length)
        with pytest.raises(IndexError, match=f"outside the table's {n} "):
            if entry == "forward":
                K.gather_forward(a, b, table, groups, torch.int32)
            elif entry == "grad_a":
                K.gather_grad_a(a, b, grad_table, grad, groups)
            else:
                K.gather_grad_b(a, b, grad_table, grad, groups)


@pytest.mark.parametrize("value", [256, -1, 300])
def test_gather_conv_kernel_refuses_weight_indices_outside_the_table(value):  # item 1
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    table = torch.from_numpy(np.random.default_rng(0).integers(-50, 50, (256, 256))).to(torch.int32)
    q = torch.randint(0, 256, (8, 4, 16, 16)).to(torch.float32)
    b = torch.randint(0, 256, (8, 36))
    b[3, 5] = value
    with pytest.raises(IndexError, match="Weight indices outside the table's 256 columns"):
        K.gather_conv_zp(q, 0, b, 0, table, 1, (3, 3), (1, 1), (1, 1), (1, 1), 0, None)


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
@pytest.mark.parametrize("bad", [256.0, -1.0, float("nan")])
@pytest.mark.parametrize("operand", ["qx", "qw"])
def test_functional_api_refuses_codes_outside_the_lut(lut, bad, operand):  # item 1
    tabs = LutTables(make_lut(lut))
    torch.manual_seed(1)
    ops = {"qx": torch.randint(0, 256, (3, 9)).float(), "qw": torch.randint(0, 256, (4, 9)).float()}
    ops[operand][1, 2] = bad
    role = "activations" if operand == "qx" else "weights"
    message = exact_message(f"lut_linear: quantized {role} must be integers in [0, 255] (the LUT's operand "
                            f"range), got values in [{ops[operand].min().item():g}, {ops[operand].max().item():g}]")
    with pytest.raises(InvalidValueError, match=message):
        lut_linear(ops["qx"], ops["qw"], tabs)
    one = torch.ones(())
    with pytest.raises(InvalidValueError, match="approx_linear: quantized"):
        approx_linear(ops["qx"], one, one * 0, ops["qw"], one, one * 0, None, tabs)
    cx = torch.randint(0, 256, (1, 2, 5, 5)).float()
    cw = torch.randint(0, 256, (3, 2, 3, 3)).float()
    (cx if operand == "qx" else cw).view(-1)[4] = bad
    with pytest.raises(InvalidValueError, match="lut_conv2d: quantized"):
        lut_conv2d(cx, cw, tabs)
    with pytest.raises(InvalidValueError, match="approx_conv2d: quantized"):
        approx_conv2d(cx, one, one * 0, cw, one, one * 0, None, tabs, padding=1)


# --- item 3: float16 / bfloat16 / float64 keep the integer sums exact --------------------------------

@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
def test_fp16_input_to_fp32_layer_is_exact(lut):  # item 3
    layer = conv_layer(lut, cin=64).eval()  # fan-in 576: float16 sums overflow
    x = torch.rand(2, 64, 8, 8).half()
    layer(x.float())
    y = layer(x)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    assert torch.equal(y, layer(x.float()).half())
    lin = linear_layer(lut, fin=576).eval()
    xl = torch.rand(5, 576).half()
    lin(xl.float())
    assert torch.equal(lin(xl), lin(xl.float()).half())


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_exact(lut, dtype):  # item 3
    layer = conv_layer(lut, cin=64).eval()
    x = torch.rand(2, 64, 8, 8)
    ref = layer(x)
    ref.square().sum().backward()
    grad_ref = layer.weight.grad.clone()
    layer.weight.grad = None
    acc_ref = layer.int_forward(x)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        acc = layer.int_forward(x)
        y.square().sum().backward()
    assert y.dtype == torch.float32  # computed in float32, returned in the input's dtype
    assert torch.equal(y, ref) and torch.equal(acc, acc_ref)
    assert torch.equal(layer.weight.grad, grad_ref)


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8s"])
def test_half_model_is_exact(lut):  # item 3
    layer = conv_layer(lut).half().eval()
    x = torch.rand(2, 4, 6, 6).half()
    y = layer(x)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    q = layer.quantize(x)
    table, width, _ = TABLES[lut]
    want = brute_conv(table(), width, q.qx.double().numpy(), 0, q.qw.double().numpy(), 1, 0, 1, 1)
    assert np.array_equal(layer.int_forward(x).numpy(), want)


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
def test_float64_model_after_approximate_(lut):  # item 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    approximate_(model, ApproxConfig(make_lut(lut)))
    model.to(torch.float64).eval()
    assert model[0].lut.u_f32 is None or model[0].lut.u_f32.dtype == torch.float32  # tables keep their dtypes
    x = torch.rand(3, 4, 6, 6, dtype=torch.float64)
    y = model(x)
    assert y.dtype == torch.float64 and y.shape == (3, 5)
    table, width, _ = TABLES[lut]
    q = model[0].quantize(x)
    want = brute_conv(table(), width, q.qx.numpy(), 0, q.qw.numpy(), 1, 0, 1, 1)
    assert np.array_equal(model[0].int_forward(x).numpy(), want)
    h = model[2](model[1](model[0](x)))
    q = model[3].quantize(h)
    assert np.array_equal(model[3].int_forward(h).numpy(), brute_linear(table(), width, q.qx.numpy(), q.qw.numpy()))


# --- item 7: a refused load_state_dict changes nothing ----------------------------------------------

def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return all(torch.equal(after[k], v) for k, v in before.items())


def _model(lut: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    return approximate_(model, ApproxConfig(make_lut(lut)))


def test_refused_load_changes_nothing():  # item 7
    model, other = _model("trunc8u", 0), _model("mitchell8u", 1)
    other(torch.rand(2, 4, 8, 8))  # running statistics and observer ranges differ too
    before = _snapshot(model)
    with pytest.raises(LutMismatchError, match="Layer '1' uses LUT"):
        model.load_state_dict(other.state_dict())
    assert _unchanged(model, before)
    layer, before = model[1], _snapshot(model[1])
    with pytest.raises(LutMismatchError, match="Layer '<root>' uses LUT"):
        layer.load_state_dict(other[1].state_dict())
    assert _unchanged(layer, before)


def test_other_table_without_lut_identity_refused():  # item 7
    model, other = _model("trunc8u", 0), _model("mitchell8u", 1)
    stripped = {k: v for k, v in other.state_dict().items() if not k.endswith("_extra_state")}
    before = _snapshot(model)
    message = exact_message(f"Layer '1' uses LUT {model[1].lut.lut_id} but the state_dict holds a different "
                            f"LUT table; build the model with the LUT file it was trained with")
    with pytest.raises(LutMismatchError, match=message):
        model.load_state_dict(stripped, strict=False)
    assert _unchanged(model, before)
    with pytest.raises(LutMismatchError, match="Layer '<root>' uses LUT"):
        model[1].load_state_dict({k[2:]: v for k, v in stripped.items() if k.startswith("1.")}, strict=False)
    assert _unchanged(model, before)
    same = _model("trunc8u", 2)
    same.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
                         strict=False)
    assert torch.equal(same[1].weight, model[1].weight)


# --- item 15: empty batches and unbatched input, as torch ------------------------------------------

@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_empty_batch_like_torch(lut, training, kind):  # item 15
    layer = linear_layer(lut) if kind == "linear" else conv_layer(lut)
    ref = nn.Linear(16, 6) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
    layer.train(training)
    full = torch.rand(3, 16) if kind == "linear" else torch.rand(3, 4, 6, 6)
    layer(full)
    observed = layer.act_quant.min_val.clone(), layer.act_quant.max_val.clone()
    for x in (full[:0], full[:0].unsqueeze(0)) if kind == "linear" else (full[:0],):
        y = layer(x)
        want = ref(x)
        assert y.shape == want.shape and y.dtype == want.dtype
        y.sum().backward()
        assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
        assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
        layer.weight.grad = layer.bias.grad = None
        acc = layer.int_forward(x)
        assert acc.shape == want.shape and acc.dtype == torch.int64
    assert torch.equal(layer.act_quant.min_val, observed[0]) and torch.equal(layer.act_quant.max_val, observed[1])


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
def test_empty_batch_on_a_fresh_layer(lut):  # item 15
    for layer, x in ((linear_layer(lut), torch.rand(0, 16)), (conv_layer(lut), torch.rand(0, 4, 6, 6))):
        with frozen(layer):
            assert layer.int_forward(x).numel() == 0
        assert not bool(layer.act_quant.initialized)  # an empty batch has no range to learn


@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
def test_unbatched_conv_input_like_torch(lut):  # item 15
    layer = conv_layer(lut).eval()
    x = torch.rand(4, 6, 6)
    layer(x[None])
    y = layer(x)
    assert y.shape == nn.Conv2d(4, 8, 3, padding=1)(x).shape
    assert torch.equal(y, layer(x[None])[0])
    assert torch.equal(layer.int_forward(x), layer.int_forward(x[None])[0])


# --- messages: channel mismatch in the user's terms; the meta device ---------------------------------

@pytest.mark.parametrize("lut", ["trunc8u", "mitchell8u"])
def test_channel_mismatch_message(lut):  # messages
    layer = conv_layer(lut, cin=64).eval()
    nn_message = ("Given groups=1, weight of size [8, 64, 3, 3], expected input[2, 28, 8, 8] to have 64 "
                  "channels, but got 28 channels instead")
    with pytest.raises(RuntimeError, match=exact_message(nn_message)):
        nn.Conv2d(64, 8, 3, padding=1)(torch.rand(2, 28, 8, 8))
    for call in (layer, layer.int_forward, layer.quantize, layer.operands):
        with pytest.raises(InvalidValueError, match=exact_message(nn_message)):
            call(torch.rand(2, 28, 8, 8))
    with pytest.raises(InvalidValueError, match=exact_message(nn_message.replace("[2, 28", "[1, 28"))):
        layer(torch.rand(28, 8, 8))
    with pytest.raises(InvalidValueError, match=exact_message(
            "Expected 3D (unbatched) or 4D (batched) input to ApproxConv2d, but got input of size: [1, 2, 64, 8, 8]")):
        layer(torch.rand(1, 2, 64, 8, 8))


@pytest.mark.parametrize("correction", ["none", "control_variate"])
def test_meta_model_converts_and_materializes(correction):  # messages (meta device)
    cfg = ApproxConfig(make_lut("mitchell8u"), correction=correction)

    def build():
        return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))

    torch.manual_seed(0)
    real = approximate_(build(), cfg).eval()
    x = torch.rand(2, 4, 6, 6)
    want = real(x)
    meta = approximate_(build().to("meta"), cfg)
    message = exact_message("ApproxConv2d cannot run on the 'meta' device: its outputs are sums of LUT entries "
                            "picked by the data. Materialize the model first: model.to_empty(device=...), then "
                            "load_state_dict(...)")
    with pytest.raises(InvalidValueError, match=message):
        meta(x.to("meta"))
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    meta.eval()
    for a, b in zip(meta.buffers(), real.buffers()):
        assert torch.equal(a, b)
    assert torch.equal(meta(x), want)
