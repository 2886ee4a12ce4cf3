"""The numba fake quantization (``quant._fused_fake_quant``, ``nn/quant_loops.py``; issue 12)
against the torch formulas it replaces, bit for bit (compared as int32 words, so -0.0 and
NaN payloads count), and the cases where it steps aside."""

from __future__ import annotations

import pytest
import torch

from appmult.nn import quant as Q
from appmult.nn.quant import _FakeQuantSTE, _fake_quant_nograd


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def torch_forward(x, s, z, qmin, qmax):
    t = x / s + z
    return torch.clamp(torch.round(t), qmin, qmax), (t >= qmin - 0.5) & (t <= qmax + 0.5)


def nasty(shape, seed):
    """Values on and around every rounding boundary, the clamp bounds, signed zeros, NaN, +-Inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=gen)
    specials = torch.tensor([0.5, -0.5, 1.5, 2.5, -0.0, 0.0, float("nan"), float("inf"), float("-inf"),
                             255.5, 255.49998, -128.5, 127.5, 1e30, -1e30, 0.49999997])
    flat[idx[:len(specials)]] = specials[: min(len(specials), n)]
    return x


CASES = [  # (shape, per-channel, qmin, qmax)
    ((512, 512), True, 0, 255), ((7, 3, 3, 3), True, -128, 127), ((1, 40), True, 0, 255),
    ((128, 32, 16, 16), False, 0, 255), ((5, 300), False, -128, 127), ((33,), False, 0, 15),
]


@pytest.mark.numba
@pytest.mark.parametrize("shape, per_channel, qmin, qmax", CASES)
def test_fused_fake_quant_equals_torch_bit_for_bit(shape, per_channel, qmin, qmax):
    x = nasty(shape, seed=len(shape) + shape[0])
    gen = torch.Generator().manual_seed(1)
    if per_channel:
        cshape = (shape[0],) + (1,) * (len(shape) - 1)
        s = torch.rand(cshape, generator=gen) * 0.05 + 1e-3
        z = torch.randint(0, 10, cshape, generator=gen).float()
    else:
        s, z = torch.tensor(0.0137), torch.tensor(3.0)
    # scale factors that make x / s land exactly on .5
    want_q, want_in = torch_forward(x, s, z, qmin, qmax)
    q, inside, finite = Q._fused_fake_quant(x, s, z, qmin, qmax, mask=True)
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(inside, want_in)
    assert finite is bool(torch.isfinite(x).all())
    q2, none, finite2 = Q._fused_fake_quant(x, s, z, qmin, qmax, mask=False)
    assert none is None and torch.equal(bits(q2), bits(want_q)) and finite2 is finite
    # the entry points: the eval quantizer and the STE function (forward and backward)
    assert torch.equal(bits(_fake_quant_nograd(x, s, z, qmin, qmax)), bits(want_q))
    xg = x.clone().requires_grad_(True)
    y = _FakeQuantSTE.apply(xg, s, z, qmin, qmax)
    assert torch.equal(bits(y.detach()), bits(want_q))
    g = torch.randn(shape, generator=gen)
    g.view(-1)[:3] = torch.tensor([float("inf"), -0.0, float("nan")])
    y.backward(g)
    assert torch.equal(bits(xg.grad), bits(g * want_in / s))


@pytest.mark.numba
def test_exact_halves_round_to_even():
    s = torch.tensor(1.0)
    x = torch.arange(-10, 10, dtype=torch.float32) + 0.5
    q, _, _ = Q._fused_fake_quant(x, s, torch.tensor(0.0), -128, 127, mask=True)
    assert torch.equal(q, torch.round(x)) and q[10].item() == 0.0 and q[11].item() == 2.0
    # the gradient mask includes both bounds exactly, and nothing beyond
    for qmin, qmax in ((0, 255), (-128, 127)):
        edge = torch.tensor([qmin - 0.5, qmax + 0.5, qmin - 0.50001, qmax + 0.50001])
        _, inside, _ = Q._fused_fake_quant(edge, s, torch.tensor(0.0), qmin, qmax, mask=True)
        assert inside.tolist() == [True, True, False, False]
        assert torch.equal(inside, torch_forward(edge, s, torch.tensor(0.0), qmin, qmax)[1])


@pytest.mark.numba
def test_fused_fake_quant_steps_aside(monkeypatch):
    x, s, z = torch.rand(4, 6), torch.tensor(0.01), torch.tensor(1.0)
    assert Q._fused_fake_quant(x, s, z, 0, 255, mask=False) is not None
    assert Q._fused_fake_quant(x.double(), s.double(), z.double(), 0, 255, mask=False) is None
    assert Q._fused_fake_quant(x.t(), s, z, 0, 255, mask=False) is None              # not contiguous
    assert Q._fused_fake_quant(x.to("meta"), s.to("meta"), z.to("meta"), 0, 255, mask=False) is None  # not the CPU
    assert Q._fused_fake_quant(x, torch.rand(1, 6), torch.zeros(1, 6), 0, 255, mask=False) is None  # dim-1 scale
    assert Q._fused_fake_quant(x, s, z.double(), 0, 255, mask=False) is None
    assert Q._fused_fake_quant(x, torch.rand(4, 1), torch.zeros(4), 0, 255, mask=False) is None  # shapes differ
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert Q._fused_fake_quant(x, s, z, 0, 255, mask=False) is None
    # and the torch path then gives the same bits
    monkeypatch.delenv("APPMULT_NO_NUMBA")
    fused = _fake_quant_nograd(x, s, z, 0, 255)
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert torch.equal(bits(_fake_quant_nograd(x, s, z, 0, 255)), bits(fused))


def test_learnable_scale_keeps_the_torch_path():
    """A scale that requires a gradient (not what the quantizers make) takes the torch
    formula, whose graph carries it."""
    x = torch.rand(3, 5)
    s = torch.tensor(0.02, requires_grad=True)
    q = Q._fake_quant(x, s, torch.tensor(0.0), 0, 255)
    assert torch.equal(q.detach(), torch_forward(x, s.detach(), torch.tensor(0.0), 0, 255)[0])
