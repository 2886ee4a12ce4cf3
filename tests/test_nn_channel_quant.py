"""Per-channel weight quantization in one numba pass (``quant._fused_channel_quant``, issue 12).

``quant_loops.channel_fake_quant`` computes each output channel's range, its scale and zero
point, the codes and the straight-through mask in one task per channel. Reference: the torch
path it replaces -- ``WeightQuantizer.scale_zero_point`` (amin/amax and the float32 formula of
``_scale_zero_point``) and ``clamp(round(w / s + Z))`` -- compared bit for bit (``int32``
views), on random weights and on the rows where the formula has branches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import quant as Q
from appmult.nn import quant_loops
from test_nn_luts import exact

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def torch_reference(w: torch.Tensor, wq: Q.WeightQuantizer):
    s, z = wq.scale_zero_point(w)
    t = w / s + z
    q = torch.clamp(torch.round(t), wq.qmin, wq.qmax)
    return q, (t >= wq.qmin - 0.5) & (t <= wq.qmax + 0.5), s, z


def special_rows(k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows where the formula branches: zeros, a constant, all positive, all negative, a
    single non-zero, tiny (subnormal) and huge magnitudes, -0.0, ties at .5 after scaling."""
    r = torch.randn(k, generator=gen)
    rows = [torch.zeros(k), torch.full((k,), 0.37), r.abs() + 0.1, -r.abs() - 0.1,
            torch.zeros(k).index_fill(0, torch.tensor([k // 2]), -2.5), r * 1e-40, r * 1e30,
            torch.full((k,), -0.0), torch.arange(k, dtype=torch.float32) - k / 2, r]
    return torch.stack(rows)


@needs_numba
@pytest.mark.parametrize("width", [2, 4, 8, 12])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(10, 7), (10, 3, 3, 3), (10, 1)])
def test_equals_the_torch_path_bit_for_bit(width, signed, shape):
    gen = torch.Generator().manual_seed(width * 7 + signed)
    wq = Q.WeightQuantizer(width, signed)
    k = int(np.prod(shape[1:]))
    cases = [special_rows(k, gen).reshape(shape)]
    cases += [torch.randn(shape, generator=gen) * 10.0 ** e for e in (-6, -2, 0, 3)]
    for w in cases:
        q, inside, s, z, finite = Q._fused_channel_quant(w, wq, mask=True)
        rq, rin, rs, rz = torch_reference(w, wq)
        assert finite
        assert torch.equal(bits(s), bits(rs)) and s.shape == rs.shape
        assert torch.equal(z, rz) and z.shape == rz.shape  # (the sign of a zero zero point may differ)
        assert torch.equal(q, rq) and torch.equal(inside, rin)
        q2, none, s2, z2, _ = Q._fused_channel_quant(w, wq, mask=False)
        assert none is None and torch.equal(q2, q) and torch.equal(bits(s2), bits(s))


@needs_numba
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_found_by_the_pass(bad):
    w = torch.randn(4, 6)
    w[2, 3] = bad
    assert Q._fused_channel_quant(w, Q.WeightQuantizer(8, False), mask=True)[-1] is False
    w[2, 3] = 1.0
    assert Q._fused_channel_quant(w, Q.WeightQuantizer(8, False), mask=True)[-1] is True


def test_steps_aside_where_it_cannot_run(monkeypatch):
    wq = Q.WeightQuantizer(8, False)
    assert Q._fused_channel_quant(torch.randn(5), wq, mask=True) is None                 # one dimension
    assert Q._fused_channel_quant(torch.randn(5, 3).double(), wq, mask=True) is None     # float64
    assert Q._fused_channel_quant(torch.randn(0, 3), wq, mask=True) is None              # empty
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert Q._fused_channel_quant(torch.randn(5, 3), wq, mask=True) is None


@needs_numba
@pytest.mark.parametrize("scheme", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("signed", [False, True])
def test_layer_training_step_same_bits_as_the_torch_path(scheme, signed, monkeypatch):
    """A conv's training step (per-channel weights: the fused pass, spied) gives the codes,
    output and gradients of the same step with numba off, bit for bit (the low-rank kernel
    forced: an ``auto`` probe may pick the gather kernel, whose numba and torch backward sums
    differ in the last bits)."""
    calls = []
    real = quant_loops.channel_fake_quant
    monkeypatch.setattr(quant_loops, "channel_fake_quant", lambda *a: calls.append(1) or real(*a))
    lut = LutFile(exact(8, signed), width_a=8, width_b=8, signed=signed)
    results = []
    for numba_on in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not numba_on:
                mp.setenv("APPMULT_NO_NUMBA", "1")
            torch.manual_seed(0)
            layer = ApproxConv2d.from_float(torch.nn.Conv2d(3, 4, 3, padding=1),
                                            ApproxConfig(lut, weight_scheme=scheme, kernel="lowrank"))
            x = torch.randn(2, 3, 6, 6, requires_grad=True)
            y = layer(x)
            y.square().sum().backward()
            results.append((y.detach(), x.grad, layer.weight.grad))
    assert bool(calls) == (scheme == "per_channel")
    for a, b in zip(*results):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("cls", [ApproxLinear, ApproxConv2d])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("numba_on", [True, False])
def test_non_finite_weight_refused_with_its_message(cls, training, numba_on, monkeypatch):
    if not numba_on:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    if cls is ApproxLinear:
        layer, x = ApproxLinear.from_float(torch.nn.Linear(6, 3), ApproxConfig(lut)), torch.randn(2, 6)
    else:
        layer, x = ApproxConv2d.from_float(torch.nn.Conv2d(2, 3, 3), ApproxConfig(lut)), torch.randn(2, 2, 5, 5)
    layer.train(training)
    with torch.no_grad():
        layer.weight[1].view(-1)[0] = float("nan")
    with pytest.raises(InvalidValueError, match=f"{cls.__name__} weight contains NaN or Inf"):
        if training:
            layer(x)
        else:
            with torch.no_grad():
                layer(x)
