"""The int8 GEMM's fused inference epilogue (``fused._int8_linear_out``, numba; issue 12).

In inference the linear layer's int8 path turns the GEMM's int32 dot products into the
dequantized output in one numba pass instead of eight torch passes. References: numpy
(the exact int64 accumulator from the LUT, rounded once to float32, then ``* scale`` and
``+ bias`` as float32 operations) and the torch epilogue (``_int8_linear_acc`` then
``_dequantize``), which must agree bit for bit; and the cases where it must step aside.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear
from appmult.nn import functional as FN
from appmult.nn import fused as FU
from test_nn_int8_gemm import brute_acc, forward, make_layer, quantized_case, spy_int8, truncated


def torch_epilogue(qx, prep, tabs, scale, bias):
    """The torch path: the float32 accumulator, then the layers' dequantization."""
    return FN._dequantize(FU._int8_linear_acc(qx, prep, tabs), scale, bias, torch.float32)


def numpy_output(acc, scale, bias):
    """float32(acc) * scale + bias, each step rounded to float32 (numpy float32 arithmetic)."""
    y = acc.astype(np.float32) * scale.astype(np.float32)
    return y if bias is None else (y + bias.astype(np.float32)).astype(np.float32)


def layer_case(columns, signed, k, n=9):
    """(table, tabs, quantized operands, prep) of a calibrated layer: folded where the LUT
    allows it, else the unfolded prep with its per-call ``-Zw sum x`` term."""
    table, layer, x, (qx, sx, zx, qw, sw, zw), fold = quantized_case(columns, signed, k, n)
    prep = FU._int8_linear_prep(fold, layer.lut) if fold is not None else FU._int8_unfolded_prep(qw, zx, zw, layer.lut)
    assert prep is not False
    return table, layer, (qx, sx, zx, qw, sw, zw), prep


CASES = [(0, False, 100), (4, False, 300), (6, False, 600), (0, True, 500), (8, False, 100), (10, False, 300)]


@pytest.mark.numba
@pytest.mark.parametrize("columns, signed, k", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fused_epilogue_equals_numpy_and_the_torch_epilogue(columns, signed, k, with_bias, per_channel):
    """Folded (1 and 2 digit planes, signed) and unfolded (the ``-Zw sum x`` term) preps,
    per-output or one scale, with and without bias."""
    n = 9
    table, layer, (qx, sx, zx, qw, sw, zw), prep = layer_case(columns, signed, k, n)
    gen = torch.Generator().manual_seed(k + columns)
    scale = (torch.rand(1, n, generator=gen) + 0.01) * 1e-3 if per_channel else torch.tensor(3.7e-4)
    bias = torch.randn(n, generator=gen) if with_bias else None
    got = FU._int8_linear_out(qx, prep, layer.lut, scale, bias)
    assert got is not None and got.dtype == torch.float32 and got.shape == (qx.shape[0], n)
    acc = brute_acc(table, qx.numpy(), float(zx), qw.numpy(), zw.numpy(), signed)
    want = numpy_output(acc, np.broadcast_to(scale.numpy().reshape(-1), (n,)), None if bias is None else bias.numpy())
    np.testing.assert_array_equal(got.numpy(), want)
    assert torch.equal(got, torch_epilogue(qx, prep, layer.lut, scale, bias))


@pytest.mark.numba
@pytest.mark.parametrize("span, planes", [(255, 1), (60000, 2), (16_000_000, 3)])
@pytest.mark.parametrize("m", [1, 3, 130])
def test_fused_epilogue_on_synthetic_preps_of_every_plane_count(span, planes, m):
    """Digit planes 1-3, a large constant, every row count from 1 (fewer rows than tasks)."""
    rng = np.random.default_rng(span + m)
    n, k, r = 6, 300, 2
    u = torch.from_numpy(rng.integers(-90, 166, (40, r)).astype(np.float64))
    tabs = types.SimpleNamespace(u=u, u_is_value=False, lo_x=0)
    lo = rng.integers(-(1 << 20), 1 << 20, (n, 1))
    w = lo + rng.integers(0, span + 1, (n, k * r))
    w[:, 0], w[:, 1] = lo[:, 0], lo[:, 0] + span
    const = rng.integers(-(1 << 40), 1 << 40, n).astype(np.float64)
    prep = FU._int8_linear_prep((torch.from_numpy(w.astype(np.float64)), torch.from_numpy(const)), tabs)
    assert prep is not False and prep[-1] == planes
    qx = torch.from_numpy(rng.integers(0, 40, (m, k)).astype(np.float32))
    scale = torch.from_numpy(rng.random((1, n)).astype(np.float32) * 1e-9)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    ux = u.numpy().astype(np.int64)[qx.numpy().astype(np.int64)].reshape(m, k * r)
    acc = ux @ w.T + const.astype(np.int64)[None, :]
    got = FU._int8_linear_out(qx, prep, tabs, scale, bias)
    np.testing.assert_array_equal(got.numpy(), numpy_output(acc, scale.numpy().reshape(-1), bias.numpy()))
    assert torch.equal(got, torch_epilogue(qx, prep, tabs, scale, bias))


@pytest.mark.numba
def test_fused_epilogue_reads_strided_activations():
    table, layer, (qx, sx, zx, qw, sw, zw), prep = layer_case(8, False, 100)  # unfolded: reads qx itself
    wide = torch.zeros(qx.shape[0], 2 * qx.shape[1])
    wide[:, ::2] = qx
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    scale = torch.full((1, 9), 2e-4)
    assert torch.equal(FU._int8_linear_out(strided, prep, layer.lut, scale, None),
                       torch_epilogue(qx, prep, layer.lut, scale, None))


@pytest.mark.numba
def test_fused_epilogue_steps_aside_where_it_cannot_apply(monkeypatch):
    """``None`` (the caller takes the torch epilogue and autograd) where a gradient must be
    carried, for dtypes other than float32, a scale or bias of another size, or without numba."""
    table, layer, (qx, sx, zx, qw, sw, zw), prep = layer_case(0, False, 100)
    tabs, scale, bias = layer.lut, torch.full((1, 9), 1e-3), torch.zeros(9)
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias) is not None
    needs_grad = qx.clone().requires_grad_(True)
    assert FU._int8_linear_out(needs_grad, prep, tabs, scale, bias) is None
    with torch.no_grad():
        assert FU._int8_linear_out(needs_grad, prep, tabs, scale, bias) is not None
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias.clone().requires_grad_(True)) is None
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias, weight=qw.clone().requires_grad_(True)) is None
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias, weight=qw) is not None
    assert FU._int8_linear_out(qx, prep, tabs, scale.clone().requires_grad_(True), bias) is None
    assert FU._int8_linear_out(qx.double(), prep, tabs, scale, bias) is None
    assert FU._int8_linear_out(qx.to("meta"), prep, tabs, scale, bias) is None       # not on the CPU
    assert FU._int8_linear_out(qx, prep, tabs, scale.double(), bias) is None
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias.double()) is None
    assert FU._int8_linear_out(qx, prep, tabs, torch.full((1, 3), 1e-3), bias) is None
    assert FU._int8_linear_out(qx, prep, tabs, scale, torch.zeros(3)) is None
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert FU._int8_linear_out(qx, prep, tabs, scale, bias) is None


@pytest.mark.numba
def test_layer_inference_takes_the_fused_epilogue_and_equals_every_other_path(monkeypatch):
    """Eval forward on the general path: the fused epilogue (spied); the same bits with
    numba off (torch epilogue, same GEMM) and with the int8 GEMM off (float path). (The
    eval plan, which calls the epilogue directly, is compared with this path in
    test_nn_eval_plan.py.)"""
    from appmult.nn import eval_plan
    monkeypatch.setattr(eval_plan, "ENABLED", False)
    layer, x = make_layer(truncated(0), 200, 11, seed=21)
    outs = []
    real = FU._int8_linear_out
    used = []
    monkeypatch.setattr(FN, "_int8_linear_out", lambda *a, **k: used.append(r := real(*a, **k)) or r)
    calls = spy_int8(monkeypatch)
    y = forward(layer, x, True)
    assert calls and used and used[-1] is not None
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    used.clear()
    outs.append(forward(layer, x, True))
    assert used and used[-1] is None
    monkeypatch.delenv("APPMULT_NO_NUMBA")
    outs.append(forward(layer, x, False))
    for other in outs:
        assert torch.equal(y, other)


@pytest.mark.parametrize("bias", [False, True])
def test_first_layer_weight_gets_its_gradient(bias):
    """Regression: a bias-free layer whose input needs no gradient (a network's first layer)
    took the epilogue without autograd -- its output had no ``grad_fn`` and its weight never
    trained. The weight's gradient must be the one of the same layer whose input needs one."""
    torch.manual_seed(3)
    layer = ApproxLinear.from_float(torch.nn.Linear(24, 5, bias=bias),
                                    ApproxConfig(LutFile(truncated(0), width_a=8, width_b=8, signed=False)))
    x = torch.relu(torch.randn(7, 24))
    grads = []
    for x_grad in (True, False):
        layer.weight.grad = None
        y = layer(x.clone().requires_grad_(x_grad))
        assert y.requires_grad
        y.square().sum().backward()
        grads.append(layer.weight.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])
