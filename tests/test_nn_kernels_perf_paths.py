"""Brute-force checks of the kernels' performance code paths (blocking, tiling, layouts).

Each test forces the path with small block sizes (monkeypatched tuning constants) so that
channel blocks, k-blocks and tasks do not divide the problem evenly. No timing asserts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import kernels as K

pytestmark = pytest.mark.usefixtures("gather_path")


def brute_forward(a: np.ndarray, b: np.ndarray, table: np.ndarray, groups: int) -> np.ndarray:
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    t = table.astype(np.int64)
    out = np.zeros((nbatch, nout, length), np.int64)
    for j in range(nout):
        g = j // ng
        out[:, j, :] = t[a[:, g * kg:(g + 1) * kg, :], b[j][None, :, None]].sum(1)
    return out


@pytest.mark.parametrize("signed_table", [False, True])
@pytest.mark.parametrize("slab, expand", [(None, None), (3 * 1024, 40 * 1024), (1, 1)])
@pytest.mark.parametrize("nbatch, length, groups, kg, ng", [
    (3, 600, 1, 5, 2), (5, 97, 3, 7, 5), (2, 301, 2, 13, 19), (9, 64, 1, 11, 33),
])
def test_rows_kernel_blocks(signed_table, slab, expand, nbatch, length, groups, kg, ng, monkeypatch):
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    rng = np.random.default_rng(nbatch * 100 + kg)
    na = 64
    lo, hi = (-4000, 4000) if signed_table else (0, 4096)
    table = torch.from_numpy(rng.integers(lo, hi, (na, na))).to(torch.int32)
    if slab is not None:
        monkeypatch.setattr(K, "_SLAB_BYTES", slab)
        monkeypatch.setattr(K, "_EXPAND_BYTES", expand)
    monkeypatch.setattr(K, "ROWS_MIN_POSITIONS", 0)  # always the row kernel
    a = rng.integers(0, na, (nbatch, groups * kg, length))
    b = rng.integers(0, na, (groups * ng, kg))
    ref = brute_forward(a, b, table.numpy(), groups)
    for dt in (torch.uint8, torch.long):
        got = K.gather_forward(torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt), table, groups, torch.int32)
        assert got.dtype == torch.int32
        assert np.array_equal(got.numpy(), ref)
    got64 = K.gather_forward(torch.from_numpy(a), torch.from_numpy(b), table, groups, torch.int64)
    assert got64.dtype == torch.int64 and np.array_equal(got64.numpy(), ref)


# ------------------------------------------------------------------------------------------
# Fused low-rank conv (zero-point cross terms folded into one convolution)
# ------------------------------------------------------------------------------------------

from appmult.lut_gen import LutFile  # noqa: E402
from appmult.nn import ApproxConfig, ApproxConv2d  # noqa: E402
from appmult.nn import functional as FN  # noqa: E402
from test_nn_backward import lut_with_grads  # noqa: E402
from test_nn_forward import brute_conv, codes  # noqa: E402,F401
from test_nn_luts import exact, mitchell_like, random_lut, truncated  # noqa: E402

FUSED_LUTS = {
    "trunc8u": (truncated(8, 4), 8, False),
    "exact8u": (exact(8, False), 8, False),
    "trunc6s": (truncated(6, 3, signed=True), 6, True),
    "random6u": (random_lut(6, 2), 6, False),
    "mitchell8s": (mitchell_like(8, True), 8, True),
}
FUSED_GEOMS = [
    dict(cin=5, cout=7, k=3, stride=1, padding=1, dilation=1, groups=1, size=9),
    dict(cin=6, cout=4, k=3, stride=2, padding=2, dilation=2, groups=2, size=8),
    dict(cin=4, cout=4, k=3, stride=1, padding=0, dilation=1, groups=4, size=6),
    dict(cin=3, cout=5, k=(2, 3), stride=(1, 2), padding=(1, 0), dilation=1, groups=1, size=7),
]


def _layer(name, geom, scheme="per_channel", grad="ste", seed=0, kernel="lowrank"):
    p, w, s = FUSED_LUTS[name]
    lut = lut_with_grads(p, w, s, low_rank_grads=(seed % 2 == 0), seed=seed) if grad != "ste" else \
        LutFile(p, width_a=w, width_b=w, signed=s)
    torch.manual_seed(seed)
    base = torch.nn.Conv2d(geom["cin"], geom["cout"], geom["k"], stride=geom["stride"], padding=geom["padding"],
                           dilation=geom["dilation"], groups=geom["groups"])
    cfg = ApproxConfig(lut, kernel=kernel, grad=grad, weight_scheme=scheme)
    return ApproxConv2d.from_float(base, cfg), p, w


LOWRANK_LUTS = ["trunc8u", "exact8u", "trunc6s"]
CASES = [(n, "lowrank") for n in LOWRANK_LUTS] + [(n, "gather") for n in FUSED_LUTS]


@pytest.mark.numba
@pytest.mark.parametrize("name, kernel", CASES)
@pytest.mark.parametrize("geom", range(len(FUSED_GEOMS)))
@pytest.mark.parametrize("scheme", ["per_channel", "per_tensor"])
def test_fused_conv_is_bit_exact(name, kernel, geom, scheme, monkeypatch):
    """Fused output == dequantization of the brute-force integer accumulator, bit for bit."""
    g = FUSED_GEOMS[geom]
    layer, p, w = _layer(name, g, scheme, kernel=kernel)
    layer.eval()
    x = torch.rand(3, g["cin"], g["size"], g["size"]) * 2 - 0.5
    if kernel == "gather":
        monkeypatch.setattr(K, "ROWS_MIN_POSITIONS", 0)  # the row kernel even for tiny maps
        monkeypatch.setattr(K, "_SLAB_BYTES", 4096)     # several k-blocks
        if geom % 2:
            monkeypatch.setattr(K, "_EXPAND_BYTES", 1)  # one output channel per block
        x = torch.rand(3, g["cin"], g["size"], g["size"]) * 2 - 0.5
    layer(x)  # initialize the observer
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    if kernel == "lowrank":
        assert FN._folded_lowrank_weights(qw, zx, zw, layer.lut) is not None  # the fused path is taken
        assert layer.lut.u_is_value == (name == "exact8u")  # rank-1 shortcut: activations map to themselves
    else:
        assert FN._gather_conv_zp(qx, qw, zx, zw, layer.lut, FN._pair(g["padding"]), FN._pair(g["stride"]),
                                  FN._pair(g["dilation"]), g["groups"]) is not None
    with torch.no_grad():
        y = layer(x)
    # brute-force integer accumulator of the padded conv, then the cross terms in int64
    st, pd, dl = (FN._pair(g[k]) for k in ("stride", "padding", "dilation"))
    qxn, qwn = qx.detach().numpy().astype(np.int64), qw.detach().numpy().astype(np.int64)
    xp = np.pad(qxn, ((0, 0), (0, 0), (pd[0], pd[0]), (pd[1], pd[1])), constant_values=int(zx))
    acc = _brute_conv_general(p, w, xp, qwn, st, dl, g["groups"])
    if not layer.lut.signed:
        zwn = zw.detach().numpy().astype(np.int64).reshape(-1)
        zwn = np.broadcast_to(zwn, (qwn.shape[0],)) if zwn.size == 1 else zwn
        ones = np.ones((g["groups"], qwn.shape[1]) + qwn.shape[2:], np.int64)
        sum_x = _conv_int(xp, ones, st, dl, g["groups"])
        sum_x = np.repeat(sum_x, qwn.shape[0] // g["groups"], axis=1)
        kk = qwn[0].size
        acc = acc - sum_x * zwn[None, :, None, None] - int(zx) * qwn.reshape(qwn.shape[0], -1).sum(1)[None, :, None, None] \
            + kk * int(zx) * zwn[None, :, None, None]
    co = qw.shape[0]
    swr = sw.reshape(1, co, 1, 1) if sw.dim() else sw
    ref = (sx * swr).to(torch.float32) * torch.from_numpy(acc).to(torch.float32) + layer.bias.detach().reshape(1, co, 1, 1)
    assert torch.equal(y, ref)


def _conv_int(xp, wt, stride, dilation, groups):
    n, c, hp, wp = xp.shape
    co, cg, kh, kw = wt.shape
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, co, ho, wo), np.int64)
    ng = co // groups
    for j in range(co):
        gi = j // ng
        for dy in range(kh):
            for dx in range(kw):
                ys = dy * dilation[0]
                xs = dx * dilation[1]
                patch = xp[:, gi * cg:(gi + 1) * cg, ys:ys + stride[0] * (ho - 1) + 1:stride[0],
                           xs:xs + stride[1] * (wo - 1) + 1:stride[1]]
                out[:, j] += (patch * wt[j, :, dy, dx][None, :, None, None]).sum(1)
    return out


def _brute_conv_general(p, w, xp, qw, stride, dilation, groups):
    n, c, hp, wp = xp.shape
    co, cg, kh, kw = qw.shape
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, co, ho, wo), np.int64)
    ng = co // groups
    cx = codes(xp, w)
    for j in range(co):
        gi = j // ng
        cw = codes(qw[j], w)
        for dy in range(kh):
            for dx in range(kw):
                ys, xs = dy * dilation[0], dx * dilation[1]
                patch = cx[:, gi * cg:(gi + 1) * cg, ys:ys + stride[0] * (ho - 1) + 1:stride[0],
                           xs:xs + stride[1] * (wo - 1) + 1:stride[1]]
                out[:, j] += p[patch, cw[:, dy, dx][None, :, None, None]].sum(1)
    return out


@pytest.mark.parametrize("name, kernel", CASES)
@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
@pytest.mark.parametrize("geom", [0, 1])
def test_fused_conv_gradients_match_unfused(name, kernel, grad, geom, monkeypatch):
    g = FUSED_GEOMS[geom]
    layer, _, _ = _layer(name, g, grad=grad, seed=geom, kernel=kernel)
    monkeypatch.setattr(K, "ROWS_MIN_POSITIONS", 0)
    layer.train()
    x = torch.rand(2, g["cin"], g["size"], g["size"]) * 2 - 0.5
    layer(x)
    layer.act_quant.observing = False
    res = []
    for fused in (True, False):
        monkeypatch.setattr(FN, "_FUSED_LOWRANK", fused)
        monkeypatch.setattr(FN, "_FUSED_GATHER", fused)
        xg = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(xg)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        res.append((y.detach(), xg.grad, layer.weight.grad))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-4)


def test_fused_lowrank_falls_back_when_fp32_could_round():
    """K * bound >= 2**24: the fold is refused (the unfused path decides)."""
    p, w, s = FUSED_LUTS["trunc8u"]
    layer, _, _ = _layer("trunc8u", dict(cin=300, cout=2, k=3, stride=1, padding=1, dilation=1, groups=1, size=4))
    x = torch.rand(1, 300, 4, 4)
    layer.eval()
    layer(x)
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    assert FN._folded_lowrank_weights(qw, zx, zw, layer.lut) is None


def test_gather_conv_zp_rejects_out_of_range_values():
    if not K.numba_available():
        pytest.skip("numba is not installed or APPMULT_NO_NUMBA is set")
    table = torch.arange(256 * 256, dtype=torch.int32).reshape(256, 256) % 1000
    b = torch.zeros((4, 2 * 9), dtype=torch.long)
    q = torch.full((2, 2, 20, 20), 3.0)
    ok = K.gather_conv_zp(q, 0, b, 0, table, 1, (3, 3), (1, 1), (1, 1), (1, 1), 5, np.array([7, 1, 0, 2]))
    assert ok is not None and ok.dtype == torch.int32
    q[1, 1, 5, 5] = 256.0
    with pytest.raises(IndexError):
        K.gather_conv_zp(q, 0, b, 0, table, 1, (3, 3), (1, 1), (1, 1), (1, 1), 5, None)
    q[1, 1, 5, 5] = -1.0
    with pytest.raises(IndexError):
        K.gather_conv_zp(q, 0, b, 0, table, 1, (3, 3), (1, 1), (1, 1), (1, 1), 5, None)


# ------------------------------------------------------------------------------------------
# Fused low-rank linear
# ------------------------------------------------------------------------------------------

from appmult.nn import ApproxLinear  # noqa: E402


@pytest.mark.parametrize("name", LOWRANK_LUTS)
@pytest.mark.parametrize("scheme", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
def test_fused_lowrank_linear(name, scheme, grad, monkeypatch):
    p, w, s = FUSED_LUTS[name]
    lut = lut_with_grads(p, w, s, low_rank_grads=True) if grad != "ste" else LutFile(p, width_a=w, width_b=w, signed=s)
    torch.manual_seed(3)
    layer = ApproxLinear.from_float(torch.nn.Linear(37, 11), ApproxConfig(lut, kernel="lowrank", grad=grad,
                                                                          weight_scheme=scheme))
    x = torch.rand(300, 37) * 2 - 0.5
    layer.eval()
    layer(x)
    layer.act_quant.observing = False
    qx, sx, zx = layer.act_quant(x)
    qw, sw, zw = layer.weight_quant(layer.weight)
    assert FN._folded_lowrank_weights(qw.reshape(11, 37, 1, 1), zx, zw, layer.lut) is not None
    with torch.no_grad():
        y = layer(x)
    # brute-force integer accumulator, cross terms in int64, then the layer's dequantization
    qxn, qwn = qx.detach().numpy().astype(np.int64), qw.detach().numpy().astype(np.int64)
    acc = p[codes(qxn, w)[:, None, :], codes(qwn, w)[None, :, :]].sum(-1)
    if not s:
        zwn = np.broadcast_to(zw.detach().numpy().astype(np.int64).reshape(-1), (11,))
        acc = acc - qxn.sum(1)[:, None] * zwn[None] - int(zx) * qwn.sum(1)[None] + 37 * int(zx) * zwn[None]
    swr = sw.reshape(1, -1) if sw.dim() else sw
    ref = (sx * swr).to(torch.float32) * torch.from_numpy(acc).to(torch.float32) + layer.bias.detach()
    assert torch.equal(y, ref)
    layer.train()
    res = []
    for fused in (True, False):
        monkeypatch.setattr(FN, "_FUSED_LOWRANK", fused)
        xg = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(xg)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        res.append((out.detach(), xg.grad, layer.weight.grad))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=0, atol=0)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_signed_fused_conv_ignores_zero_points_like_unfused(kernel, monkeypatch):
    """The layers' internal _approx_conv2d with a signed LUT and (unusual) nonzero zero
    points: fused == unfused (padding inserts zx; no cross terms for signed LUTs). The
    public approx_conv2d refuses such zero points (tests/test_nn_mutation_survivors.py)."""
    p, w, s = FUSED_LUTS["trunc6s"]
    lut = LutFile(p, width_a=w, width_b=w, signed=s)
    tabs = FN.LutTables(lut, kernel=kernel)
    monkeypatch.setattr(K, "ROWS_MIN_POSITIONS", 0)
    rng = np.random.default_rng(7)
    qx = torch.from_numpy(rng.integers(-32, 32, (2, 3, 6, 6)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(-32, 32, (4, 3, 3, 3)).astype(np.float32))
    args = (qx, torch.tensor(0.05), torch.tensor(5.0), qw, torch.tensor(0.02), torch.full((4, 1, 1, 1), 3.0),
            torch.zeros(4), tabs)
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(FN, "_FUSED_LOWRANK", fused)
        monkeypatch.setattr(FN, "_FUSED_GATHER", fused)
        outs.append(FN._approx_conv2d(*args, padding=1))
    assert torch.equal(outs[0], outs[1])
