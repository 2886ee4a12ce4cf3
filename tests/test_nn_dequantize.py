"""Dequantization of a convolution's accumulator in one numba pass (issue 12, rank-1 overhead).

``functional._dequantize`` computed ``acc.mul_(scale)`` then ``.add_(bias)``: two passes over
the output. ``quant_loops.dequantize_channels`` does both in one, and must give torch's bits
(multiply rounded, then add: no fused multiply-add). Reference: torch's two operations on a
copy; the conditions under which the pass applies are checked against torch's broadcasting.
"""

from __future__ import annotations

import pytest
import torch

from appmult.nn import functional as FN
from appmult.nn import quant_loops as L

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def bits(t):
    return t.contiguous().view(torch.int32)


def torch_dequant(acc, scale, bias):
    y = acc * scale
    return y if bias is None else y + bias


def fma_sensitive(shape, gen):
    """Accumulators and scales whose product is inexact, so a fused multiply-add would differ."""
    acc = torch.randint(-2**24, 2**24, shape, generator=gen).float()
    return acc


@needs_numba
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 16, 10, 10), (3, 2, L.BLOCK + 3), (2, 5, 1, 1), (1, 1, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_one_pass_is_torch_mul_then_add_bit_for_bit(shape, with_bias, per_channel):
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    acc = fma_sensitive(shape, gen)
    side = (1, c) + (1,) * (len(shape) - 2) if per_channel else ()
    scale = torch.rand(side, generator=gen) * 1e-3 + 1e-7
    bias = torch.randn(side, generator=gen) * 3 if with_bias else None
    want = torch_dequant(acc, scale, bias)
    got = acc.clone()
    assert FN._dequantize_channels(got, scale, bias) is True
    assert torch.equal(bits(got), bits(want))
    # and through _dequantize, in place on the accumulator
    acc2 = acc.clone()
    out = FN._dequantize(acc2, scale, bias, torch.float32)
    assert torch.equal(bits(out), bits(want)) and out.data_ptr() == acc2.data_ptr()
    # a fused multiply-add would differ somewhere on these operands: the test can tell
    if with_bias:
        fused = torch.addcmul(bias.double(), acc.double(), scale.double()).float()
        assert not torch.equal(bits(fused), bits(want)) or acc.numel() < 64


@needs_numba
def test_per_channel_sides_of_every_broadcastable_shape():
    gen = torch.Generator().manual_seed(5)
    acc = fma_sensitive((2, 3, 4, 4), gen)
    for side in [(3, 1, 1), (1, 3, 1, 1), (1, 1, 1), (1,), (), (1, 1, 1, 1)]:
        scale = torch.rand(side, generator=gen) + 0.5
        bias = torch.randn(side, generator=gen)
        got = acc.clone()
        assert FN._dequantize_channels(got, scale, bias) is True, side
        assert torch.equal(bits(got), bits(torch_dequant(acc, scale, bias))), side


@needs_numba
def test_steps_aside_where_it_does_not_apply(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    acc = fma_sensitive((2, 3, 4, 4), gen)
    s, b = torch.rand(1, 3, 1, 1, generator=gen), torch.randn(1, 3, 1, 1, generator=gen)
    refused = [
        (acc.double(), s, b),                                # not float32
        (acc.transpose(2, 3), s, b),                         # not contiguous
        (acc[:, :, 0, 0].contiguous(), s.reshape(1, 3), b.reshape(1, 3)),  # (N, C): a linear layer's
        (acc, s.reshape(3), b),                              # broadcasts along the last dim, not channels
        (acc, torch.rand(1, 1, 1, 4), b),                    # one per column
        (acc, torch.rand(2, 3, 1, 1), b),                    # one per (batch, channel): not per channel
        (acc, s.double(), b),                                # scale not float32
        (acc, s, b.double()),                                # bias not float32
        (acc, torch.rand(1, 1, 2, 3, 1, 1), b),              # more dims than acc
    ]
    for a, sc, bi in refused:
        before = a.clone()
        assert FN._dequantize_channels(a, sc, bi) is False
        assert torch.equal(a, before)
    # autograd must see the product: a grad-requiring accumulator, scale or bias keeps torch
    for req in range(3):
        a, sc, bi = acc.clone(), s.clone(), b.clone()
        [a, sc, bi][req].requires_grad_(True)
        assert FN._dequantize_channels(a, sc, bi) is False
        with torch.no_grad():
            assert FN._dequantize_channels(a.detach().clone(), sc.detach(), bi.detach()) is True
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert FN._dequantize_channels(acc.clone(), s, b) is False


@needs_numba
def test_conv_layer_output_is_the_two_pass_result(monkeypatch):
    """An eval conv on the general path: the same bits as the torch dequantization of the
    same accumulator (the rank-1 eval plan, which skips this path, is compared with it in
    test_nn_eval_plan.py)."""
    from appmult.lut_gen import LutFile
    from appmult.nn import eval_plan
    monkeypatch.setattr(eval_plan, "ENABLED", False)
    from appmult.nn import ApproxConfig, ApproxConv2d
    from test_nn_luts import exact, random_lut
    torch.manual_seed(0)
    x = torch.relu(torch.randn(3, 4, 9, 9))
    for table, kernels in ((exact(8, False), ("lowrank", "gather")), (random_lut(8, 1), ("gather",))):
        for kernel in kernels:
            m = ApproxConv2d(4, 6, 3, padding=1, config=ApproxConfig(
                LutFile(table, width_a=8, width_b=8, signed=False), kernel=kernel)).eval()
            m(x)
            seen = []
            real = FN._dequantize_channels

            def spy(acc, scale, bias):
                seen.append((acc.clone(), scale.clone(), None if bias is None else bias.clone()))
                return real(acc, scale, bias)
            FN._dequantize_channels = spy
            try:
                with torch.no_grad():
                    y = m(x)
            finally:
                FN._dequantize_channels = real
            (acc, scale, bias), = seen
            assert torch.equal(bits(y), bits(torch_dequant(acc, scale, bias)))
