"""Survivors of session 7's fast paths (issue 12), reviewed after the fresh mutation run.

* The numba fake quantization (``quant._fused_fake_quant``) gives the torch formulas' bits
  (the mask as ``bool``, like the torch path's) or steps aside, for any broadcast and dtype;
  it runs where ``nn/quant_loops.py`` says (the CPU training step, forward and backward,
  and inference without the mask), and a double backward keeps its graph.
* A frozen activation quantizer keeps its scale and zero point (one computation for many
  forwards) and still follows every change of its range, width or dtype.
* The linear low-rank path's weight side (``functional._lowrank_linear_sides``): a training
  step over the exact product takes the int8 GEMM without making a fold, one over a
  one-plane fold takes it too, and one cache dict shared by two LUTs keeps their int8
  preparations apart.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import ActivationQuantizer
from appmult.nn import functional as FN
from appmult.nn import quant as Q
from test_nn_int8_gemm import brute_acc, int8_gemm, make_layer, spy_int8, trains_alike_through_the_int8_gemm, truncated

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def torch_forward(x, s, z, qmin, qmax):
    t = x / s + z
    return torch.clamp(torch.round(t), qmin, qmax), (t >= qmin - 0.5) & (t <= qmax + 0.5)


def _ties(s32: torch.Tensor, n: int) -> torch.Tensor:
    """float32 values whose quotient by ``s32`` lands on (or next to) a .5 tie and the clamp
    bounds: where a quotient by a wider scale rounds the other way."""
    k = torch.arange(-n, n, dtype=torch.float32) + 0.5
    return (k * s32).reshape(-1)


@needs_numba
def test_fused_fake_quant_is_the_torch_formula_or_steps_aside():
    """Every scale the torch formula broadcasts (per row, per column, one value; float32 or
    float64): ``None``, or the torch path's ``q`` and ``bool`` mask bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 6, generator=gen) * 40
    third64 = torch.tensor(1 / 3, dtype=torch.float64)
    cases = [  # (x, scale, zero point)
        (x, torch.rand(6, 1, generator=gen) + 0.1, torch.full((6, 1), 3.0)),       # per row: fused
        (x, torch.rand(6, generator=gen) + 0.1, torch.full((6,), 3.0)),            # per column
        (x, torch.rand(1, 6, generator=gen) + 0.1, torch.full((1, 6), 3.0)),       # per column
        (x, torch.tensor(0.37), torch.tensor(3.0)),                                # one value: fused
        (_ties(third64.float(), 300), third64, torch.tensor(0.0)),                 # float64 scale
        (_ties(third64.float(), 300).reshape(30, 20), third64.reshape(1, 1).expand(30, 1).contiguous(),
         torch.zeros(30, 1)),
    ]
    fused = 0
    for x_, s, z in cases:
        for qmin, qmax in ((0, 255), (-128, 127)):
            want_q, want_in = torch_forward(x_, s, z, qmin, qmax)
            got = Q._fused_fake_quant(x_, s, z, qmin, qmax, mask=True)
            if got is None:
                continue
            fused += 1
            q, inside, finite = got
            assert finite is bool(torch.isfinite(x_).all())
            assert q.dtype == want_q.dtype and torch.equal(bits(q), bits(want_q)), (tuple(s.shape), s.dtype)
            assert inside.dtype == torch.bool and torch.equal(inside, want_in), (tuple(s.shape), s.dtype)
    assert fused >= 4  # at least the per-row and the one-value cases (both ranges) took it


@needs_numba
def test_ste_saves_a_bool_mask_and_follows_a_float64_range():
    """The training step's saved mask is a ``bool`` tensor (the torch path's, a quarter of a
    float32 one); a quantizer kept in float64 (``.double()``) with float32 inputs gives the
    torch formula's forward and gradient bits."""
    x = torch.randn(40, 30).requires_grad_(True)
    y = Q._FakeQuantSTE.apply(x, torch.tensor(0.0123), torch.tensor(7.0), 0, 255)
    assert y.grad_fn.saved_tensors[0].dtype == torch.bool
    q = ActivationQuantizer(8, False).double()
    q.train()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3000, generator=gen) * 3).requires_grad_(True)
    y, s, z = q(x)
    assert s.dtype == torch.float64 and y.dtype == torch.float32
    want_q, want_in = torch_forward(x.detach(), s, z, q.qmin, q.qmax)
    g = torch.randn(3000, generator=gen)
    y.backward(g)
    assert torch.equal(bits(y.detach()), bits(want_q))
    assert torch.equal(bits(x.grad), bits(g * want_in / s))


def test_double_backward_through_the_ste():
    """A gradient penalty (``create_graph=True``): the backward is differentiable again,
    with the straight-through gradient applied twice."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 50, generator=gen) * 2).requires_grad_(True)
    s, z = torch.tensor(0.02), torch.tensor(100.0)
    y = Q._FakeQuantSTE.apply(x, s, z, 0, 255)
    _, inside = torch_forward(x.detach(), s, z, 0, 255)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g.requires_grad
    assert torch.equal(bits(g.detach()), bits(2 * y.detach() * inside / s))
    g.sum().backward()
    torch.testing.assert_close(x.grad, 2 * inside.float() / s / s, rtol=1e-6, atol=0)


@needs_numba
def test_numba_quantizes_the_training_step_and_inference(monkeypatch):
    """The CPU training step runs ``quant_loops.fake_quant`` (a per-channel weight:
    ``channel_fake_quant``) with the mask and ``ste_grad``; inference runs them without the
    mask; results as the formula."""
    calls = []
    real_fq, real_ste, real_cq = Q.loops.fake_quant, Q.loops.ste_grad, Q.loops.channel_fake_quant
    monkeypatch.setattr(Q.loops, "fake_quant",
                        lambda *a: calls.append(("fake_quant", a[-1].shape[0] > 0)) or real_fq(*a))
    monkeypatch.setattr(Q.loops, "channel_fake_quant",
                        lambda *a: calls.append(("channel_fake_quant", a[-1].shape[0] > 0)) or real_cq(*a))
    monkeypatch.setattr(Q.loops, "ste_grad", lambda *a: calls.append(("ste_grad",)) or real_ste(*a))
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(6, 5, 3, 3, generator=gen)).requires_grad_(True)
    wq = Q.WeightQuantizer(8, False)
    for quantizer, t in ((wq, w), (ActivationQuantizer(8, False), torch.randn(4, 20, generator=gen) + 0.5)):
        kernel = "channel_fake_quant" if quantizer is wq else "fake_quant"
        quantizer.train()
        t = t.detach().requires_grad_(True)
        calls.clear()
        y, s, z = quantizer(t)
        g = torch.randn(t.shape, generator=gen)
        y.backward(g)
        want_q, want_in = torch_forward(t.detach(), s, z, quantizer.qmin, quantizer.qmax)
        assert calls == [(kernel, True), ("ste_grad",)]
        assert torch.equal(bits(y.detach()), bits(want_q)) and torch.equal(bits(t.grad), bits(g * want_in / s))
        calls.clear()
        quantizer.eval()
        with torch.no_grad():
            y, s, z = quantizer(t)
        assert calls == [(kernel, False)]
        assert torch.equal(bits(y), bits(torch_forward(t.detach(), s, z, quantizer.qmin, quantizer.qmax)[0]))


def _frozen(signed=False):
    q = ActivationQuantizer(8, signed)
    q.eval()
    q(torch.linspace(-1.0, 2.0, 50))
    q.observing = False
    return q


def test_frozen_quantizer_computes_its_scale_once(monkeypatch):
    """Frozen, the scale and zero point are computed on the first forward and kept (equal
    to a fresh computation) while the range holds."""
    q = _frozen()
    fresh = q.scale_zero_point()
    count = []
    real = ActivationQuantizer.scale_zero_point
    monkeypatch.setattr(ActivationQuantizer, "scale_zero_point", lambda self: count.append(1) or real(self))
    x = torch.linspace(-2.0, 3.0, 31)
    for _ in range(4):
        _, s, z = q(x)
        assert torch.equal(s, fresh[0]) and torch.equal(z, fresh[1])
    assert len(count) == 1


@pytest.mark.parametrize("change", ["double", "width", "signed", "constant"])
def test_kept_scale_follows_dtype_width_signedness_and_a_collapsed_range(change):
    """``model.double()`` (the same range values, now float64), another width or
    signedness, a range that collapses onto its old maximum: the next frozen forward uses
    the scale and zero point of the quantizer as it is now."""
    q = _frozen()
    x = torch.linspace(-2.0, 3.0, 31)
    before = q(x)
    if change == "double":
        q.double()
        x = x.double()
    elif change == "width":
        q.width = 4
    elif change == "signed":
        q.signed = True
    else:  # recalibrated on a constant input equal to the old maximum
        hi = float(q.max_val)
        with Q.calibrating(q):
            q(torch.full((7,), hi))
        assert float(q.min_val) == float(q.max_val) == hi
    _, s, z = q(x)
    want_s, want_z = q.scale_zero_point()
    assert s.dtype == want_s.dtype and torch.equal(s, want_s) and torch.equal(z, want_z)
    assert not (torch.equal(s, before[1]) and s.dtype == before[1].dtype)


def _train_step(layer, x, int8: bool):
    layer.train()
    layer.act_quant.observing = False
    xg = x.clone().requires_grad_(True)
    with int8_gemm(int8):
        y = layer(xg)
        y.square().sum().backward()
    return y.detach(), xg.grad, layer.weight.grad, layer.bias.grad


def test_exact_product_training_step_makes_no_fold(monkeypatch):
    """A trainable weight over the exact product: the int8 weights come straight from the
    codes (no fold is made, no fold's preparation), with the float path's outputs and
    gradients."""
    folds = []
    real = FN._folded_lowrank_weights
    monkeypatch.setattr(FN, "_folded_lowrank_weights", lambda *a, **k: folds.append(1) or real(*a, **k))
    calls = spy_int8(monkeypatch)
    layer, x = make_layer(truncated(0), 200, 5, seed=4)
    calls.clear()
    got = _train_step(layer, x, True)
    assert calls and not folds
    want = _train_step(*make_layer(truncated(0), 200, 5, seed=4), False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _lsb_dropped_weight() -> np.ndarray:
    """``x * (w & ~1)``: rank 1 with ``U = value(x)`` but not the exact product; its fold
    spans fewer than 256 integers per output (one digit plane)."""
    v = np.arange(256)
    return v[:, None] * (v[None, :] & 0xFE)


def test_one_plane_fold_trains_through_the_int8_gemm(monkeypatch):
    """A trainable weight over a LUT whose fold has one digit plane (not the exact product):
    the training step takes the int8 GEMM, with the float path's outputs and gradients."""
    trains_alike_through_the_int8_gemm(lambda: make_layer(_lsb_dropped_weight(), 300, 5, seed=6), monkeypatch)


def test_a_cache_shared_by_two_luts_keeps_their_int8_sides_apart(monkeypatch):
    """``approx_linear``'s cache is only renewed when the weights change: the same weights
    through two unfolded low-rank LUTs with one cache dict give each LUT's own accumulator
    (brute force) and the output of a fresh cache."""
    layer_a, x = make_layer(truncated(10), 64, 5, seed=7)
    layer_b, _ = make_layer(truncated(11), 64, 5, seed=7)
    with torch.no_grad():
        qx, sx, zx = layer_a.act_quant(x)
        qw, sw, zw = layer_a.weight_quant(layer_a.weight)
    bias = layer_a.bias.detach()
    calls = spy_int8(monkeypatch)
    shared = {}
    outs = []
    for columns, tabs in ((10, layer_a.lut), (11, layer_b.lut)):
        calls.clear()
        with torch.no_grad():
            y = FN.approx_linear(qx, sx, zx, qw, sw, zw, bias, tabs, cache=shared)
            fresh = FN.approx_linear(qx, sx, zx, qw, sw, zw, bias, tabs, cache={})
        assert len(calls) == 2 and torch.equal(y, fresh), columns
        acc = brute_acc(truncated(columns), qx.numpy(), float(zx), qw.numpy(), zw.numpy(), False)
        want = float(sx) * sw.double().numpy().reshape(1, -1) * acc + bias.double().numpy()
        np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])
