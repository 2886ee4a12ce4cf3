"""``layer.operands(x)``: the MAC's operand codes, against an independent numpy brute force.

The brute force takes the quantized values from the layer's quantizers and builds each
output's row of ``K`` code pairs with explicit loops and bounds checks (a position outside
the input is padding and carries the activation zero point's code), so it shares neither
the padding nor the gather code with the layer. Each row's ``sum LUT[a, b]`` must equal
``int_forward`` exactly. LUTs are random and non-square (``width_a != width_b``), so a
swapped operand or a transposed table cannot pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from appmult.codes import values_to_codes
from appmult.errors import InvalidTypeError, InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import (ActivationQuantizer, ApproxConfig, ApproxConv2d, ApproxLinear, LayerOperands,
                        QuantizedOperands, frozen, layer_operands)

WA, WB = 5, 4  # LUT operand widths: a non-square table


def random_lut(signed: bool, seed: int = 0) -> LutFile:
    rng = np.random.default_rng(seed)
    return LutFile(rng.integers(-300, 300, size=(1 << WA, 1 << WB)), width_a=WA, width_b=WB, signed=signed,
                   metadata={})


def with_extremes(t: torch.Tensor, scale: float = 1.5) -> torch.Tensor:
    """``t`` with one entry at ``-max|t|``: a signed quantizer maps it to the most negative code."""
    t = t.clone()
    t.view(-1)[0] = -scale * float(t.abs().max())
    return t


def calibrated(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    layer.train()
    with torch.no_grad():
        layer(x)
    return layer.eval()


def quantized_values(layer, x):
    """``(qx, zx, qw)`` as numpy values, straight from the layer's quantizers (observer frozen)."""
    with torch.no_grad(), frozen(layer):
        qx, _, zx = layer.act_quant(x)
        qw, _, _ = layer.weight_quant(layer.weight)
    return qx.numpy().astype(np.int64), int(zx), qw.numpy().astype(np.int64)


def brute_conv_rows(layer: ApproxConv2d, x: torch.Tensor):
    """``(xcodes, wcodes, is_padding)``, each ``(N, Cout, Ho, Wo, K)``, by explicit loops."""
    qx, zx, qw = quantized_values(layer, x)
    n, c, h, wd = qx.shape
    cout, cg, kh, kw = qw.shape
    (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, layer.padding
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = cg * kh * kw
    xv = np.zeros((n, cout, ho, wo, k), np.int64)
    pad = np.zeros((n, cout, ho, wo, k), bool)
    per_group = cout // layer.groups
    for b in range(n):
        for co in range(cout):
            g = co // per_group
            for y in range(ho):
                for xx in range(wo):
                    col = 0
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                r, s = y * sh + i * dh - ph, xx * sw + j * dw - pw
                                if 0 <= r < h and 0 <= s < wd:
                                    xv[b, co, y, xx, col] = qx[b, g * cg + ci, r, s]
                                else:
                                    xv[b, co, y, xx, col] = zx
                                    pad[b, co, y, xx, col] = True
                                col += 1
    wv = np.broadcast_to(qw.reshape(1, cout, 1, 1, k), xv.shape)
    tabs = layer.lut
    return (values_to_codes(xv, tabs.width_x, tabs.signed), values_to_codes(wv, tabs.width_w, tabs.signed), pad)


def brute_linear_rows(layer: ApproxLinear, x: torch.Tensor):
    qx, _, qw = quantized_values(layer, x)
    qx = qx.reshape(-1, layer.in_features)
    m, nout = qx.shape[0], qw.shape[0]
    xv = np.broadcast_to(qx[:, None, :], (m, nout, layer.in_features))
    wv = np.broadcast_to(qw[None, :, :], xv.shape)
    tabs = layer.lut
    return (values_to_codes(xv, tabs.width_x, tabs.signed), values_to_codes(wv, tabs.width_w, tabs.signed),
            np.zeros(xv.shape, bool))


def lut_sums(lut: LutFile, activation_operand: str, xc: np.ndarray, wc: np.ndarray) -> np.ndarray:
    a, b = (wc, xc) if activation_operand == "b" else (xc, wc)
    return lut.product.astype(np.int64)[a, b].sum(-1)


def check_against_brute(layer, x, brute, lut, activation_operand):
    ops = layer.operands(x)
    assert isinstance(ops, LayerOperands) and isinstance(ops.quantized, QuantizedOperands)
    xc, wc, pad = brute(layer, x)
    assert ops.out_shape == xc.shape[:-1] and ops.fan_in == xc.shape[-1]
    assert np.array_equal(ops.x.numpy(), xc) and np.array_equal(ops.w.numpy(), wc)
    assert np.array_equal(ops.is_padding.numpy(), pad)
    assert np.array_equal(ops.padded.numpy(), pad.sum(-1))
    assert ops.activation_operand == activation_operand
    a, b = (ops.w, ops.x) if activation_operand == "b" else (ops.x, ops.w)
    assert ops.a is a and ops.b is b
    # The brute-force rows sum to int_forward, exactly.
    ref = layer.int_forward(x).numpy().reshape(ops.out_shape)
    assert np.array_equal(lut_sums(lut, activation_operand, xc, wc), ref)
    assert np.array_equal(lut.product.astype(np.int64)[ops.a.numpy(), ops.b.numpy()].sum(-1), ref)
    return ops, xc, wc


CONV_GEOMETRIES = {
    "padding": dict(cin=3, cout=4, k=3, padding=1),
    "asymmetric-padding-stride-dilation": dict(cin=2, cout=3, k=(3, 2), padding=(2, 1), stride=(2, 1),
                                               dilation=(1, 2)),
    "groups": dict(cin=4, cout=6, k=3, padding=1, stride=2, groups=2),
    "depthwise": dict(cin=4, cout=4, k=3, padding=2, dilation=2, groups=4),
    "depthwise-multiplier": dict(cin=3, cout=6, k=2, padding=1, groups=3),
    "no-padding": dict(cin=2, cout=2, k=3),
}


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("activation_operand", ["a", "b"])
@pytest.mark.parametrize("geom", list(CONV_GEOMETRIES))
def test_conv_operands_match_brute_force(geom, activation_operand, signed):
    g = dict(CONV_GEOMETRIES[geom])
    cin, cout, k = g.pop("cin"), g.pop("cout"), g.pop("k")
    lut = random_lut(signed, seed=len(geom))
    torch.manual_seed(0)
    layer = ApproxConv2d(cin, cout, k, config=ApproxConfig(lut=lut, activation_operand=activation_operand), **g)
    with torch.no_grad():
        layer.weight.copy_(with_extremes(layer.weight))
    x = with_extremes(torch.randn(2, cin, 6, 7) + 0.4)
    calibrated(layer, x)
    ops, xc, wc = check_against_brute(layer, x, brute_conv_rows, lut, activation_operand)
    width_x, width_w = (WB, WA) if activation_operand == "b" else (WA, WB)
    if signed:  # the most negative code (bit pattern 100..0) is multiplied on both sides
        assert (xc == 1 << (width_x - 1)).any() and (wc == 1 << (width_w - 1)).any()
    else:  # padding carries a non-zero zero-point code
        assert float(ops.quantized.zero_x) > 0
    if g.get("padding"):
        assert ops.is_padding.any() and (ops.x[ops.is_padding] == int(ops.quantized.zero_x) % (1 << width_x)).all()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("activation_operand", ["a", "b"])
def test_linear_operands_match_brute_force(activation_operand, signed):
    lut = random_lut(signed, seed=7)
    torch.manual_seed(1)
    layer = ApproxLinear(6, 3, config=ApproxConfig(lut=lut, activation_operand=activation_operand))
    with torch.no_grad():
        layer.weight.copy_(with_extremes(layer.weight))
    x = with_extremes(torch.randn(2, 4, 6) + 0.3)  # leading dims are flattened into rows
    calibrated(layer, x)
    ops, xc, wc = check_against_brute(layer, x, brute_linear_rows, lut, activation_operand)
    assert ops.out_shape == (8, 3) and not ops.is_padding.any()
    width_x = WB if activation_operand == "b" else WA
    if signed:
        assert (xc == 1 << (width_x - 1)).any()


@pytest.mark.parametrize("geom", ["groups", "depthwise", "asymmetric-padding-stride-dilation"])
def test_positions_gather_the_same_rows(geom):
    g = dict(CONV_GEOMETRIES[geom])
    cin, cout, k = g.pop("cin"), g.pop("cout"), g.pop("k")
    layer = ApproxConv2d(cin, cout, k, config=ApproxConfig(lut=random_lut(False)), **g)
    x = torch.randn(2, cin, 6, 7)
    calibrated(layer, x)
    full = layer.operands(x)
    # Every output, in a shuffled order.
    pos = [p for p in np.ndindex(*full.out_shape)]
    pos = [pos[i] for i in np.random.default_rng(0).permutation(len(pos))]
    some = layer.operands(x, positions=pos)
    idx = tuple(torch.tensor(pos).T)
    assert some.positions.tolist() == [list(p) for p in pos] and full.positions is None
    for name in ("x", "w", "is_padding", "padded"):
        assert torch.equal(getattr(some, name), getattr(full, name)[idx]), name
    assert torch.equal(some.weight_codes, full.weight_codes)


def test_linear_positions():
    layer = ApproxLinear(5, 4, config=ApproxConfig(lut=random_lut(True), activation_operand="b"))
    x = torch.randn(3, 5)
    calibrated(layer, x)
    full, some = layer.operands(x), layer.operands(x, positions=torch.tensor([[2, 3], [0, 1]]))
    assert torch.equal(some.a, full.a[[2, 0], [3, 1]]) and torch.equal(some.b, full.b[[2, 0], [3, 1]])


@pytest.mark.parametrize("positions,message", [
    ([(0, 0, 9, 0)], "Position (0, 0, 9, 0) is outside the layer's output of shape (1, 2, 5, 5)"),
    ([(0, -1, 0, 0)], "Position (0, -1, 0, 0) is outside the layer's output of shape (1, 2, 5, 5)"),
    ([(0, 0, 0)], "positions must be index tuples of length 4 (the output has shape (1, 2, 5, 5)), not shape (1, 3)"),
])
def test_positions_wrong(positions, message):
    layer = ApproxConv2d(1, 2, 3, padding=1, config=ApproxConfig(lut=random_lut(False)))
    with pytest.raises(InvalidValueError, match="^" + re.escape(message) + "$"):
        layer.operands(torch.rand(1, 1, 5, 5), positions=positions)


def test_layer_operands_is_the_method():
    layer = ApproxLinear(3, 2, config=ApproxConfig(lut=random_lut(False)))
    x = torch.rand(4, 3)
    assert torch.equal(layer_operands(layer, x).a, layer.operands(x).a)


def test_layer_operands_wrong():
    with pytest.raises(InvalidTypeError, match="^layer_operands needs an ApproxConv2d or ApproxLinear, not Linear$"):
        layer_operands(nn.Linear(3, 2), torch.rand(1, 3))


def test_rows_are_views_not_copies_per_output_channel():
    # groups == 1: all 16 output channels read the same receptive field; the activation rows
    # must cost one im2col of the input (N * Ho * Wo * K codes), not 16 of them.
    layer = ApproxConv2d(3, 16, 3, padding=1, config=ApproxConfig(lut=random_lut(False)))
    x = torch.randn(2, 3, 8, 8)
    ops = layer.operands(x)
    im2col = 2 * 8 * 8 * ops.fan_in * 8
    assert ops.x.shape == (2, 16, 8, 8, 27)
    assert ops.x.untyped_storage().nbytes() == im2col
    assert ops.w.untyped_storage().nbytes() == 16 * 27 * 8


def test_quantize_pads_with_the_zero_point():
    layer = ApproxConv2d(1, 1, 3, padding=(1, 2), config=ApproxConfig(lut=random_lut(False)))
    x = torch.randn(1, 1, 4, 4) - 0.5
    calibrated(layer, x)
    q = layer.quantize(x)
    zx = float(q.zero_x)
    assert zx > 0 and q.padding == (1, 2) and q.qx.shape == (1, 1, 6, 8)
    assert (q.qx[..., 0, :] == zx).all() and (q.qx[..., :, :2] == zx).all() and (q.qx[..., :, -2:] == zx).all()


# --- frozen() -----------------------------------------------------------------------------------

def model_with_observers():
    lut = random_lut(False)
    model = nn.Sequential(ApproxConv2d(1, 2, 3, config=ApproxConfig(lut=lut)), nn.Flatten(),
                          ApproxLinear(18, 2, config=ApproxConfig(lut=lut)))
    model[0].act_quant.observing = True
    return model


def test_frozen_freezes_every_observer_and_restores_them():
    model = model_with_observers().train()
    x = torch.randn(2, 1, 5, 5)
    model(x)
    before = [(q.min_val.clone(), q.max_val.clone()) for q in model.modules() if isinstance(q, ActivationQuantizer)]
    with frozen(model) as m:
        assert m is model
        assert [q.observing for q in model.modules() if isinstance(q, ActivationQuantizer)] == [False, False]
        model(x * 10)  # training mode, and one observer was set to always observe
    after = [(q.min_val, q.max_val) for q in model.modules() if isinstance(q, ActivationQuantizer)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))
    assert model[0].act_quant.observing is True and model[2].act_quant.observing is None


def test_frozen_restores_on_exceptions():
    model = model_with_observers()
    with pytest.raises(RuntimeError, match="^boom$"):
        with frozen(model):
            raise RuntimeError("boom")
    assert model[0].act_quant.observing is True and model[2].act_quant.observing is None


def test_frozen_on_a_layer_and_on_a_quantizer():
    layer = model_with_observers()[0]
    with frozen(layer):
        assert layer.act_quant.observing is False
    with frozen(layer.act_quant):
        assert layer.act_quant.observing is False
    assert layer.act_quant.observing is True


def test_frozen_wrong():
    with pytest.raises(InvalidTypeError, match="^frozen needs a torch.nn.Module, not str$"):
        with frozen("model"):
            pass


def test_int_forward_neither_observes_nor_leaves_the_observer_frozen():
    layer = model_with_observers()[0].train()
    x = torch.randn(1, 1, 5, 5)
    layer(x)
    lo, hi = layer.act_quant.min_val.clone(), layer.act_quant.max_val.clone()
    layer.int_forward(x * 10)
    layer.operands(x * 10)
    assert torch.equal(layer.act_quant.min_val, lo) and torch.equal(layer.act_quant.max_val, hi)
    assert layer.act_quant.observing is True
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidValueError, match="contains NaN or Inf"):
        layer.int_forward(bad)
    assert layer.act_quant.observing is True
