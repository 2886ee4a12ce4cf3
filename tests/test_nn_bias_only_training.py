"""Bias-only training (a frozen weight, an input without grad): the bias gets its gradient.

Found by fuzzing: after an earlier ``torch.no_grad`` call, the linear layer's int8-GEMM path
raised "A view was created in no_grad mode and is being modified inplace" -- its
accumulator, returned as is by a custom Function, was dequantized in place with a bias that
needs a gradient (``functional._dequantize`` now adds such a bias out of place). Reference:
the same layer with the bias frozen too (the output, bit for bit) and the bias gradient of
``y * g`` summed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear

_V = np.arange(256)
LUTS = {"exact": np.outer(_V, _V), "drum-like": np.outer(_V | 1, _V | 1)}


def _layer(kind: str, lut: str, kernel: str):
    torch.manual_seed(0)
    ref = nn.Linear(130, 6) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    cls = ApproxLinear if kind == "linear" else ApproxConv2d
    return cls.from_float(ref, ApproxConfig(LutFile(LUTS[lut], width_a=8, width_b=8, signed=False), kernel=kernel))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("lut", list(LUTS))
@pytest.mark.parametrize("kernel", ["auto", "lowrank", "gather"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bias_only_gradient(kind, lut, kernel, mode):
    layer = _layer(kind, lut, kernel)
    x = torch.randn((5, 130) if kind == "linear" else (2, 3, 6, 6))
    with torch.no_grad():
        layer(x)  # an earlier no-grad call (calibration, validation)
    layer.train(mode == "train")
    layer.weight.requires_grad_(False)
    for _ in range(3):  # caches and plans made by the first call are reused by the next
        if mode == "train":
            layer.act_quant.observing = False  # the same quantization in every call
        y = layer(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * g).sum().backward()
        want = g.sum(0) if kind == "linear" else g.sum((0, 2, 3))
        torch.testing.assert_close(layer.bias.grad, want, rtol=1e-5, atol=1e-5)
        layer.bias.grad = None
        layer.bias.requires_grad_(False)
        try:
            assert torch.equal(y.detach(), layer(x))
        finally:
            layer.bias.requires_grad_(True)
