"""Float outputs of ``ApproxLinear``/``ApproxConv2d`` with unsigned LUTs against brute force.

An unsigned LUT gets asymmetric quantization, so every output carries the zero-point
cross terms: ``y = sx * sw * sum_k (LUT[qx, qw] - qx*Zw - Zx*qw + Zx*Zw) + bias``. The
reference here is that formula evaluated in numpy, one look-up per product, from the
layer's own quantized operands (its ``act_quant``/``weight_quant`` submodules); the
layer runs through its default path (``ApproxConfig(lut)``), which for these high-rank
LUTs (DRUM, Mitchell, LOA) is the gather kernel. A flipped cross-term sign or a dropped
``Zx*Zw`` changes each output by many quantization steps.

float64 layers take the unfused path (LUT sum, then the cross terms as torch ops); float32
layers take the fused kernels where they apply. A low-rank unsigned LUT (truncated) covers
the fused low-rank path as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.codes import values_to_codes
from appmult.lut_gen import LutFile
from appmult.flows import characterize
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = characterize(spec, gradients=(), progress=False, cost=False).to_lutfile()
    return _LUTS[spec]


SPECS = ["drum:width=6,k=3", "mitchell:width=6", "loa:width=6,lower=4", "truncated:width=6,columns=4"]


def _operands(layer, x):
    """The layer's quantized operands as numpy (eval mode: the observer is frozen)."""
    with torch.no_grad():
        qx, sx, zx = layer.act_quant(x)
        qw, sw, zw = layer.weight_quant(layer.weight)
    f = lambda t: t.detach().to(torch.float64).numpy()  # noqa: E731
    return f(qx), float(sx), float(zx), f(qw), f(sw), f(zw)


def _check_zero_points(zx: float, zw: np.ndarray) -> None:
    # Both cross terms must be live, or the test could not see them.
    assert zx > 0 and (zw > 0).all(), (zx, zw.ravel())


def brute_linear(lut: LutFile, layer: ApproxLinear, x: torch.Tensor) -> np.ndarray:
    qx, sx, zx, qw, sw, zw = _operands(layer, x)
    _check_zero_points(zx, zw)
    cx = values_to_codes(qx.astype(np.int64), lut.width_a, False)
    cw = values_to_codes(qw.astype(np.int64), lut.width_b, False)
    m, n = qx.shape[0], qw.shape[0]
    y = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            z = float(zw.reshape(-1)[j] if zw.size > 1 else zw)
            acc = sum(int(lut.product[cx[i, k], cw[j, k]]) - qx[i, k] * z - zx * qw[j, k] + zx * z
                      for k in range(qx.shape[1]))
            s = float(sw.reshape(-1)[j] if sw.size > 1 else sw)
            y[i, j] = sx * s * acc + float(layer.bias.detach()[j])
    return y


def brute_conv(lut: LutFile, layer: ApproxConv2d, x: torch.Tensor) -> np.ndarray:
    qx, sx, zx, qw, sw, zw = _operands(layer, x)
    _check_zero_points(zx, zw)
    ph, pw = layer.padding
    st, g = layer.stride[0], layer.groups
    qx = np.pad(qx, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=zx)  # padding holds the code Zx
    n, _, hp, wp = qx.shape
    co, cg, kh, kw = qw.shape
    ho, wo = (hp - kh) // st + 1, (wp - kw) // st + 1
    per_group = co // g
    y = np.zeros((n, co, ho, wo))
    for j in range(co):
        z = float(zw.reshape(-1)[j] if zw.size > 1 else zw)
        s = float(sw.reshape(-1)[j] if sw.size > 1 else sw)
        wj = qw[j].astype(np.int64)
        cwj = values_to_codes(wj, lut.width_b, False)
        ch = slice((j // per_group) * cg, (j // per_group + 1) * cg)
        for b in range(n):
            for oh in range(ho):
                for ow in range(wo):
                    px = qx[b, ch, oh * st:oh * st + kh, ow * st:ow * st + kw].astype(np.int64)
                    cx = values_to_codes(px, lut.width_a, False)
                    acc = (int(lut.product[cx, cwj].sum()) - float(px.sum()) * z - zx * float(wj.sum())
                           + px.size * zx * z)
                    y[b, j, oh, ow] = sx * s * acc + float(layer.bias.detach()[j])
    return y


def _positive_shifted(shape, seed):
    """Weights with both signs (a non-zero weight zero point in every channel)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.5


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["per_channel", "per_tensor"])
def test_linear_float_output_matches_brute_force(spec, dtype, scheme):
    lut = lut_of(spec)
    layer = ApproxLinear(13, 5, config=ApproxConfig(lut, weight_scheme=scheme), dtype=dtype).eval()
    with torch.no_grad():
        layer.weight.copy_(_positive_shifted((5, 13), 1))
        layer.bias.copy_(torch.linspace(-0.3, 0.4, 5))
    x = (torch.rand(6, 13, generator=torch.Generator().manual_seed(2)) * 3 - 1).to(dtype)
    got = layer(x)  # initializes the observer from this batch
    want = brute_linear(lut, layer, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", [dict(padding=1), dict(padding=1, stride=2, groups=2)])
def test_conv_float_output_matches_brute_force(spec, dtype, geom):
    lut = lut_of(spec)
    layer = ApproxConv2d(4, 4, 3, config=ApproxConfig(lut), dtype=dtype, **geom).eval()
    with torch.no_grad():
        layer.weight.copy_(_positive_shifted(tuple(layer.weight.shape), 3))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, 4))
    # enough output positions (>= 2 per table row) for the fused numba gather conv to take over
    x = (torch.rand(3, 4, 14, 14, generator=torch.Generator().manual_seed(4)) * 3 - 1).to(dtype)
    got = layer(x)
    want = brute_conv(lut, layer, x)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", SPECS[:1])
def test_exact_accumulate_matches_brute_force(spec):
    """``exact_accumulate=True`` (float64 accumulation of a float32 layer) agrees too."""
    lut = lut_of(spec)
    layer = ApproxConv2d(3, 4, 3, padding=1, config=ApproxConfig(lut, exact_accumulate=True)).eval()
    with torch.no_grad():
        layer.weight.copy_(_positive_shifted(tuple(layer.weight.shape), 5))
    x = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(6)) * 3 - 1
    got = layer(x)
    np.testing.assert_allclose(got.detach().double().numpy(), brute_conv(lut, layer, x), rtol=1e-5, atol=1e-5)


def test_double_converted_linear_with_low_rank_lut():
    """A float32 layer converted with ``.double()`` computes like one built in float64."""
    lut = lut_of("truncated:width=6,columns=4")
    built = ApproxLinear(7, 3, config=ApproxConfig(lut), dtype=torch.float64).eval()
    converted = ApproxLinear(7, 3, config=ApproxConfig(lut)).double().eval()
    converted.load_state_dict(built.state_dict())
    x = torch.rand(4, 7, dtype=torch.float64) * 3 - 1
    torch.testing.assert_close(converted(x), built(x))
