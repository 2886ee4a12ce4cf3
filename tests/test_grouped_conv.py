"""Depthwise and grouped convolutions through the error model, the simulated error and the RTL
check, each against a brute-force loop over groups, output channels and positions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from appmult.lut_gen import LutFile, exact_product  # noqa: E402
from appmult.methods.error_model import measure_error, record_operands  # noqa: E402
from appmult.methods.simulated_error import SimulatedError, product_noise_conv2d  # noqa: E402
from appmult.nn import ApproxConfig, ApproxConv2d, approximate_, calibrate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = 5
GEOMETRIES = [  # (Cin, Cout, groups, conv kwargs)
    (4, 4, 4, dict(padding=1)),                              # depthwise
    (4, 8, 4, dict(padding=1, stride=2)),                    # depthwise, channel multiplier 2
    (6, 4, 2, dict(padding=(1, 0), dilation=(1, 2))),        # grouped
]


def truncated(width: int, cut: int) -> LutFile:
    return LutFile((exact_product(width, width, False) >> cut) << cut, width_a=width, width_b=width, signed=False)


def brute_fields(layer: ApproxConv2d, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Per (n, cout, y, x): the activation codes of its receptive field and its weight codes, by loops."""
    q = layer.quantize(x)
    xp = q.qx.double()  # padded with the zero point's code
    wq = q.qw.double()
    g, cout = layer.groups, layer.out_channels
    cg, per = layer.in_channels // g, cout // g
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    n_, _, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    fx = np.zeros((n_, cout, ho, wo, cg * kh * kw), dtype=np.int64)
    fw = np.zeros((cout, cg * kh * kw), dtype=np.int64)
    for co in range(cout):
        grp = co // per
        fw[co] = wq[co].reshape(-1).numpy()
        for n in range(n_):
            for y in range(ho):
                for xx in range(wo):
                    patch = xp[n, grp * cg:(grp + 1) * cg, y * sh:y * sh + dh * (kh - 1) + 1:dh,
                               xx * sw:xx * sw + dw * (kw - 1) + 1:dw]
                    fx[n, co, y, xx] = patch.reshape(-1).numpy()
    return fx, fw, q


def grouped_model(cin, cout, groups, kw, lut):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, groups=groups, **kw))
    return approximate_(model, ApproxConfig(lut))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_error_model_against_brute_force(geometry):
    cin, cout, groups, kw = geometry
    exact = LutFile(exact_product(W, W, False), width_a=W, width_b=W, signed=False)
    approx = truncated(W, 3)
    model = grouped_model(cin, cout, groups, kw, exact)
    data = [torch.rand(3, cin, 6, 7) - 0.2 for _ in range(2)]
    calibrate(model, data)
    stats = record_operands(model, data, fields=10_000)["0"]
    layer = model[0]
    fields, weights, hx, s1, s2, cnt = [], None, np.zeros(1 << W), 0.0, 0.0, 0
    with torch.no_grad():
        for x in data:
            fx, fw, q = brute_fields(layer, x)
            per = cout // groups
            uniq = fx[:, ::per]  # one field per group and position: the channels of a group share it
            fields.append(uniq.reshape(-1, fx.shape[-1]))
            hx += np.bincount(uniq.reshape(-1), minlength=1 << W)
            zx, zw = float(q.zero_x), q.zero_w.double().reshape(-1).numpy()
            centered = ((fx - zx) * (fw - zw[:, None])[None, :, None, None, :]).sum(-1)
            s1, s2, cnt = s1 + centered.sum(), s2 + (centered ** 2).sum(), cnt + centered.size
            weights = fw
    assert stats.fan_in == cin // groups * 9
    assert np.array_equal(stats.hist_x, hx)
    assert np.array_equal(stats.weights, weights)
    # Every recorded field is one of the real ones (sampled from all of them).
    real = {tuple(r) for r in np.concatenate(fields)}
    assert len(stats.fields) == min(10_000, len(np.concatenate(fields)))
    assert all(tuple(r) in real for r in stats.fields)
    mean = s1 / cnt
    assert stats.exact_std == pytest.approx(np.sqrt(s2 / cnt - mean ** 2), rel=1e-9)
    # measure_error: approx - exact accumulators, brute force from the LUT.
    measured = measure_error(layer, stats, approx)
    diffs = []
    with torch.no_grad():
        for x in stats.inputs:
            fx, fw, _ = brute_fields(layer, x)
            wcodes = np.broadcast_to(fw[None, :, None, None, :], fx.shape)
            diffs.append((approx.product[fx, wcodes] - exact.product[fx, wcodes]).sum(-1).reshape(-1))
    d = np.concatenate(diffs).astype(np.float64)
    assert measured.count == d.size
    assert measured.mean == pytest.approx(d.mean(), rel=1e-9, abs=1e-9)
    assert measured.std == pytest.approx(d.std(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_exact_simulated_error_of_grouped_conv_against_brute_force(geometry):
    cin, cout, groups, kw = geometry
    g = torch.Generator().manual_seed(3)
    qx = torch.randint(0, 32, (2, cin, 6, 7), generator=g).double()
    qw = torch.randint(0, 32, (cout, cin // groups, 3, 3), generator=g).double()
    stride, dilation = kw.get("stride", 1), kw.get("dilation", 1)
    sim = SimulatedError(0.05, method="exact")
    noise = product_noise_conv2d(qx, qw, sim, stride=stride, dilation=dilation, groups=groups,
                                 generator=torch.Generator().manual_seed(7))
    ref_shape = F.conv2d(qx, qw, stride=stride, dilation=dilation, groups=groups).shape
    assert noise.shape == ref_shape
    # The same draws, one per product, in the documented (B, G, Co/G, K, L) order.
    b, (ho, wo) = qx.shape[0], ref_shape[-2:]
    k, per = cin // groups * 9, cout // groups
    rel = sim.sample_relative((b, groups, per, k, ho * wo), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(7))
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    brute = torch.zeros(ref_shape, dtype=torch.float64)
    for n in range(b):
        for co in range(cout):
            grp, j = divmod(co, per)
            for y in range(ho):
                for x in range(wo):
                    patch = qx[n, grp * (cin // groups):(grp + 1) * (cin // groups), y * sh:y * sh + 2 * dh + 1:dh,
                               x * sw:x * sw + 2 * dw + 1:dw].reshape(-1)
                    prods = patch * qw[co].reshape(-1)
                    brute[n, co, y, x] = (prods * rel[n, grp, j, :, y * wo + x]).sum()
    assert torch.allclose(noise, brute, rtol=1e-12, atol=1e-9)


def test_auto_simulated_error_of_depthwise_conv_is_exact_sampling():
    # Small fan-in: "auto" now samples every product for grouped convolutions too (no Gaussian fallback).
    qx = torch.randint(0, 32, (2, 4, 5, 5)).double()
    qw = torch.randint(0, 32, (4, 1, 3, 3)).double()
    a = product_noise_conv2d(qx, qw, SimulatedError(0.05, method="auto"), groups=4,
                             generator=torch.Generator().manual_seed(1))
    e = product_noise_conv2d(qx, qw, SimulatedError(0.05, method="exact"), groups=4,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, e)


@pytest.mark.simulator
def test_depthwise_conv_matches_rtl(tmp_path):
    pytest.importorskip("amaranth")
    from appmult.flows import characterize
    from appmult.flows.rtlcheck import verify_layer_rtl
    from appmult.tb import simulator_available
    if not simulator_available("icarus"):
        pytest.skip("Icarus Verilog is not installed")
    lut = characterize("drum:width=6,k=3", gradients=(), progress=False, cost=False).to_lutfile()
    torch.manual_seed(0)
    layer = ApproxConv2d(4, 8, 3, padding=1, groups=4, config=ApproxConfig(lut=lut))
    x = torch.randn(2, 4, 5, 5) + 0.5
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.eval()
    result = verify_layer_rtl(layer, x, positions=6, build_dir=tmp_path)
    assert result.passed, result.report()
    assert result.fan_in == 9
    ref = layer.int_forward(x)
    assert [c.expected for c in result.checks] == [int(ref[c.position]) for c in result.checks]
