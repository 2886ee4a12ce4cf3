"""Bit-exactness of the approximate layers' integer accumulators against brute-force LUT sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear, LutTables, lut_conv2d, lut_linear
from appmult.nn import kernels as K
from test_nn_luts import codes, exact, mitchell_like, random_lut, truncated

# (name, table, width, signed): an exact, truncated (low-rank) and high-rank LUT each way,
# at 8 bits and below.
LUTS = {
    "exact6s": (exact(6, True), 6, True),
    "exact8u": (exact(8, False), 8, False),
    "trunc8u": (truncated(8, 4), 8, False),
    "trunc6s": (truncated(6, 3, signed=True), 6, True),
    "mitchell6u": (mitchell_like(6, False), 6, False),
    "mitchell8s": (mitchell_like(8, True), 8, True),
    "random4s": (random_lut(4, 1), 4, True),
    "random6u": (random_lut(6, 2), 6, False),
}


def make_lut(name: str) -> LutFile:
    p, w, s = LUTS[name]
    return LutFile(p, width_a=w, width_b=w, signed=s, metadata={"spec": name})


def brute_conv(p, w, qx, zx, qw, stride, padding, dilation, groups):
    """sum LUT[code(x), code(w)] over each receptive field, padding with the zero point."""
    n, c, h, wd = qx.shape
    co, cg, kh, kw = qw.shape
    xp = np.pad(qx, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=zx)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, co, ho, wo), np.int64)
    ng = co // groups
    for b in range(n):
        for j in range(co):
            g = j // ng
            cw = codes(qw[j], w)
            for oh in range(ho):
                for ow in range(wo):
                    rows = oh * stride + np.arange(kh) * dilation
                    cols = ow * stride + np.arange(kw) * dilation
                    patch = xp[b, g * cg:(g + 1) * cg][:, rows][:, :, cols]
                    out[b, j, oh, ow] = p[codes(patch, w), cw].sum()
    return out


def brute_linear(p, w, qx, qw):
    return np.array([[p[codes(qx[m], w), codes(qw[j], w)].sum() for j in range(qw.shape[0])]
                     for m in range(qx.shape[0])])


def quantized(layer, x):
    qx, _, zx = layer.act_quant(x)
    qw, _, _ = layer.weight_quant(layer.weight)
    return qx.detach().numpy().astype(np.int64), int(zx), qw.detach().numpy().astype(np.int64)


GEOMS = [
    dict(stride=1, padding=1, dilation=1, groups=1, size=9),   # enough positions for the row kernel
    dict(stride=2, padding=2, dilation=2, groups=1, size=7),
    dict(stride=1, padding=1, dilation=1, groups=2, size=6),
    dict(stride=1, padding=1, dilation=1, groups=4, size=6),   # depthwise
]


@pytest.mark.parametrize("name", list(LUTS))
@pytest.mark.parametrize("kernel", ["auto", "gather", "lowrank"])
@pytest.mark.parametrize("geom", range(len(GEOMS)))
def test_conv_int_accumulators_bit_exact(name, kernel, geom):
    lut = make_lut(name)
    g = dict(GEOMS[geom])
    size = g.pop("size")
    torch.manual_seed(geom)
    if kernel == "lowrank" and LutTables(lut).rank is None:
        # A high-rank LUT cannot take the low-rank kernel: asking for it is a clear error.
        with pytest.raises(ValueError, match=f"LUT {lut.lut_id} has no exact integer factorization "
                                             r"of rank <= 32; use kernel='gather' or kernel='auto'"):
            ApproxConv2d(4, 4, 3, bias=True, config=ApproxConfig(lut, kernel=kernel), **g)
        return
    layer = ApproxConv2d(4, 4, 3, bias=True, config=ApproxConfig(lut, kernel=kernel), **g).eval()
    # Inputs shifted positive so that unsigned zero points are nonzero and padding matters.
    x = torch.randn(2, 4, size, size) + 0.7
    layer(x)
    acc = layer.int_forward(x)
    qx, zx, qw = quantized(layer, x)
    if not lut.signed:
        assert zx != 0
    ref = brute_conv(lut.product, lut.width_a, qx, zx, qw, g["stride"], g["padding"], g["dilation"], g["groups"])
    assert acc.dtype == torch.int64
    assert np.array_equal(acc.numpy(), ref)


@pytest.mark.parametrize("name", list(LUTS))
@pytest.mark.parametrize("kernel", ["auto", "gather", "lowrank"])
def test_linear_int_accumulators_bit_exact(name, kernel):
    lut = make_lut(name)
    if kernel == "lowrank" and LutTables(lut).rank is None:
        with pytest.raises(ValueError, match=r"has no exact integer factorization of rank <= 32"):
            ApproxLinear(37, 5, config=ApproxConfig(lut, kernel=kernel))
        return
    torch.manual_seed(1)
    layer = ApproxLinear(37, 5, config=ApproxConfig(lut, kernel=kernel)).eval()
    x = torch.randn(6, 37) + 0.3
    layer(x)
    acc = layer.int_forward(x)
    qx, _, qw = quantized(layer, x)
    assert np.array_equal(acc.numpy(), brute_linear(lut.product, lut.width_a, qx, qw))


@pytest.mark.parametrize("name", ["exact8u", "trunc8u", "mitchell6u", "exact6s", "mitchell8s"])
def test_float_forward_matches_dequantized_accumulators(name):
    """y = sx * sw * (sum LUT - qx Zw - Zx qw + K Zx Zw) + b, in float64 from the int accumulators."""
    lut = make_lut(name)
    torch.manual_seed(3)
    layer = ApproxConv2d(3, 5, 3, padding=1, config=ApproxConfig(lut, exact_accumulate=True)).eval()
    x = torch.rand(2, 3, 6, 6) * 2 - 0.3
    y = layer(x).double()
    acc = layer.int_forward(x).double()
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    qx, qw = qx.double(), qw.double()
    if not lut.signed:
        xp = torch.nn.functional.pad(qx, (1, 1, 1, 1), value=float(zx))
        sum_x = torch.nn.functional.conv2d(xp, torch.ones(1, 3, 3, 3, dtype=torch.float64))
        sum_w = qw.sum((1, 2, 3)).reshape(1, -1, 1, 1)
        zwr = zw.double().reshape(1, -1, 1, 1)
        acc = acc - sum_x * zwr - float(zx) * sum_w + 27 * float(zx) * zwr
    ref = float(sx) * sw.double().reshape(1, -1, 1, 1) * acc + layer.bias.double().reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_fp32_lowrank_is_exact_within_bound():
    """Integer factors: float32 sums are exact while K * S < 2**24."""
    lut = make_lut("exact8u")
    tabs = LutTables(lut)
    assert tabs.rank == 1 and tabs.bound == 255 * 255
    k = (1 << 24) // tabs.bound  # 258
    assert tabs.fp32_exact(k - 1) and not tabs.fp32_exact(k + 1)
    qx = torch.full((3, k - 1), 255.0)
    qw = torch.full((2, k - 1), 255.0)
    acc = lut_linear(qx, qw, tabs, exact=False)
    assert acc.dtype == torch.float32
    assert (acc == float((k - 1) * 255 * 255)).all()


def test_most_negative_code_reaches_the_lut():
    """Signed operands reach -2**(w-1) and index the LUT row of code 2**(w-1)."""
    p = exact(8, True).copy()
    p[128, 128] = 12345  # mark the (-128, -128) entry
    lut = LutFile(p, width_a=8, width_b=8, signed=True)
    layer = ApproxLinear(1, 1, bias=False, config=ApproxConfig(lut)).eval()
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    x = torch.tensor([[-1.0], [1.0]])
    layer(x)
    acc = layer.int_forward(x)
    assert acc[0, 0].item() == 12345
    assert acc[1, 0].item() == p[127, 128]  # +1.0 -> 127 times -128


@pytest.mark.parametrize("width", [4, 8])
def test_gather_kernels_agree(width, monkeypatch):
    """numba row kernel, numba direct kernel and the torch path give identical sums."""
    rng = np.random.default_rng(width)
    n = 1 << width
    table = torch.from_numpy(rng.integers(-3000, 3000, (n, n))).to(torch.int32)
    for nbatch, length, groups in ((3, 600, 1), (1, 7, 2), (4, 300, 3)):
        kg, ng = 5, 2
        a = torch.from_numpy(rng.integers(0, n, (nbatch, groups * kg, length)))
        b = torch.from_numpy(rng.integers(0, n, (groups * ng, kg)))
        ref = np.zeros((nbatch, groups * ng, length), np.int64)
        tb = table.numpy().astype(np.int64)
        for j in range(groups * ng):
            g = j // ng
            ref[:, j, :] = tb[a[:, g * kg:(g + 1) * kg, :].numpy(), b[j].numpy()[None, :, None]].sum(1)
        got = K.gather_forward(a, b, table, groups, torch.int32)
        assert np.array_equal(got.numpy(), ref)
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
        got_t = K.gather_forward(a, b, table, groups, torch.int64)
        monkeypatch.delenv("APPMULT_NO_NUMBA")
        assert np.array_equal(got_t.numpy(), ref)


def test_lowrank_and_gather_agree_in_training_mode():
    lut = make_lut("trunc8u")
    torch.manual_seed(5)
    base = torch.nn.Conv2d(8, 6, 3, padding=1)
    x = torch.rand(4, 8, 10, 10)
    ys = []
    for kernel in ("lowrank", "gather"):
        m = ApproxConv2d.from_float(base, ApproxConfig(lut, kernel=kernel)).eval()
        ys.append(m(x))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)


def test_integer_factorization_is_exact_and_small():
    for name, expect in (("exact8u", 1), ("exact6s", 1), ("trunc8u", 5)):
        p, w, s = LUTS[name]
        f = K.integer_factorization(p)
        assert f is not None and f.rank == expect
        assert np.array_equal(f.u @ f.v.T, p)
    assert K.integer_factorization(mitchell_like(8, False)) is None


def test_activation_operand_b():
    """With activation_operand='b' activations index the LUT's second operand."""
    p = random_lut(4, 7)
    lut = LutFile(p, width_a=4, width_b=4, signed=False)
    layer = ApproxLinear(9, 3, config=ApproxConfig(lut, activation_operand="b")).eval()
    x = torch.rand(5, 9)
    layer(x)
    acc = layer.int_forward(x)
    qx, _, qw = quantized(layer, x)
    assert np.array_equal(acc.numpy(), brute_linear(p.T, 4, qx, qw))


def test_conv_functional_matches_layer():
    lut = make_lut("random6u")
    tabs = LutTables(lut)
    qx = torch.randint(0, 64, (2, 3, 5, 5)).float()
    qw = torch.randint(0, 64, (4, 3, 2, 2)).float()
    acc = lut_conv2d(qx, qw, tabs, stride=1, exact=True)
    ref = brute_conv(lut.product, 6, qx.long().numpy(), 0, qw.long().numpy(), 1, 0, 1, 1)
    assert np.array_equal(acc.long().numpy(), ref)
