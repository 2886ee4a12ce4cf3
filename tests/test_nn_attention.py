"""Approximate attention: QK^T and AV through the LUT, brute-force checked (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from appmult.errors import ConfigError
from appmult.lut_gen import LutFile, lut1d_gradients, lut2d_gradients
from appmult.nn import attention as attention_module
from appmult.nn import (ApproxConfig, ApproxLinear, ApproxMultiheadAttention, LutAttention, LutTables,
                        approximate_, attention_modules, exact_, lut_bmm, lut_sdpa)
from appmult.train import build_model
from appmult.train.vit import ViT
from conftest import exact as msg
from test_nn_luts import codes, exact, mitchell_like, random_lut, values

W = 6  # operand width of the small LUTs


def lutfile(kind: str, signed: bool, width: int = W) -> LutFile:
    table = {"exact": exact, "mitchell": mitchell_like}[kind](width, signed) if kind != "random" \
        else random_lut(width, seed=3, scale=200)
    return LutFile(table, width_a=width, width_b=width, signed=signed, metadata={"spec": kind})


def np_quant(x: np.ndarray, width: int, signed: bool):
    """Dynamic per-tensor quantization, written out: ``(q, scale, zero_point)``."""
    x = x.astype(np.float32)
    if signed:
        s = np.float32(np.abs(x).max()) / np.float32(1 << (width - 1))
        s = s if s > 0 else np.float32(1)
        return np.clip(np.round(x / s), -(1 << (width - 1)), (1 << (width - 1)) - 1), s, np.float32(0)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    qmax = (1 << width) - 1
    s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(qmax))
    s = s if s > 0 else np.float32(1)
    z = np.clip(np.round(-np.float32(lo) / s), 0, qmax)
    return np.clip(np.round(x / s + z), 0, qmax), s, np.float32(z)


def brute_sum(lut: LutFile, qa: np.ndarray, qb: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """``sum_k keep * LUT[qa, qb]`` for ``(B, M, K)`` and ``(B, K, N)`` values, one product at a time."""
    ca, cb = codes(qa, lut.width_a), codes(qb, lut.width_b)
    b, m, k = qa.shape
    n = qb.shape[-1]
    out = np.zeros((b, m, n), np.int64)
    for i in range(b):
        for r in range(m):
            for c in range(n):
                for j in range(k):
                    if keep is None or keep[i, r, j]:
                        out[i, r, c] += int(lut.product[ca[i, r, j], cb[i, j, c]])
    return out


def mha_model(seed: int = 0, e: int = 8, heads: int = 2) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(e, heads, batch_first=True).eval()


# -- integer accumulators ------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
def test_mha_int_accumulators_match_brute_force(signed):
    lut = lutfile("mitchell", signed)
    am = ApproxMultiheadAttention.from_float(mha_model(), ApproxConfig(lut))
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8)
    kpm = torch.tensor([[False, False, False, True], [False] * 4])
    ops = am.operands(x, x, x, key_padding_mask=kpm)
    # The operands of QK^T are the projected heads quantized per tensor, as written out here.
    q = am.q_proj(x).reshape(2, 4, 2, 4).transpose(1, 2).reshape(4, 4, 4).detach().numpy()
    k = am.k_proj(x).reshape(2, 4, 2, 4).transpose(1, 2).reshape(4, 4, 4).detach().numpy()
    qq, sq, zq = np_quant(q, W, signed)
    qk, sk, zk = np_quant(k, W, signed)
    np.testing.assert_array_equal(ops.q.numpy(), qq)
    np.testing.assert_array_equal(ops.k.numpy(), qk)
    assert float(ops.scale_q) == pytest.approx(float(sq), rel=1e-6) and float(ops.zero_k) == float(zk)
    np.testing.assert_array_equal(am.attention.int_scores(ops).numpy(), brute_sum(lut, qq, qk.transpose(0, 2, 1)))
    keep = ops.keep.numpy()
    assert not keep[0:2, :, 3].any() and keep[2:].all()  # the padded key, both heads of sample 0
    np.testing.assert_array_equal(am.attention.int_context(ops).numpy(),
                                  brute_sum(lut, ops.p.numpy(), ops.v.numpy(), keep))


def test_vit_attention_int_accumulators_match_brute_force():
    lut = lutfile("mitchell", True)
    torch.manual_seed(0)
    model = ViT(1, 3, 8, dim=8, depth=1, heads=2).eval()
    approximate_(model, ApproxConfig(lut))
    seen = []
    att = model.blocks[0].attn.sdpa_lut
    att.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    (q, k, v), kwargs = seen[0]
    ops = att.operands(q, k, v, kwargs["attn_mask"], kwargs["is_causal"], kwargs["scale"])
    qq, _, _ = np_quant(q.reshape(-1, *q.shape[-2:]).numpy(), W, True)
    qk, _, _ = np_quant(k.reshape(-1, *k.shape[-2:]).numpy(), W, True)
    np.testing.assert_array_equal(ops.q.numpy(), qq)
    np.testing.assert_array_equal(att.int_scores(ops).numpy(), brute_sum(lut, qq, qk.transpose(0, 2, 1)))
    np.testing.assert_array_equal(att.int_context(ops).numpy(), brute_sum(lut, ops.p.numpy(), ops.v.numpy()))


# -- exact LUT: the quantized float model ----------------------------------------------------

def test_exact_lut_matches_quantized_float_mha():
    mha = mha_model(e=16)
    cfg = ApproxConfig(lutfile("exact", True, 8))
    torch.manual_seed(2)
    x = torch.randn(3, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True},
                   {"key_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])}):
        y_ref, w_ref = mha(x, x, x, **kwargs)
        am = ApproxMultiheadAttention.from_float(mha, cfg)  # fresh observers: eval mode keeps the first range
        y, w = am(x, x, x, **kwargs)
        exact_(am)
        y_q, _ = am(x, x, x, **kwargs)
        exact_(am, False)
        # the exact LUT is the quantized float product, bit for bit up to float rounding
        torch.testing.assert_close(y, y_q, rtol=1e-5, atol=1e-6)
        # and the quantized model is the float model within 8-bit quantization error
        assert (y - y_ref).abs().max() <= 0.03 * y_ref.abs().max()
        assert (w - w_ref).abs().max() <= 0.005


def test_exact_lut_vit_matches_float():
    torch.manual_seed(0)
    model = ViT(1, 4, 8, dim=16, depth=2, heads=2).eval()
    x = torch.randn(5, 1, 8, 8)
    ref = model(x).detach()
    approximate_(model, ApproxConfig(lutfile("exact", True, 8), parts="attention"))
    assert [n for n, _ in attention_modules(model)] == ["blocks.0.attn.sdpa_lut", "blocks.1.attn.sdpa_lut"]
    y = model(x).detach()
    assert (y - ref).abs().max() <= 0.03 * ref.abs().max()
    assert model.blocks[0].attn.sdpa_lut.calls >= 1


# -- gradients --------------------------------------------------------------------------------

def grad_tables(lut: LutFile, grad: str):
    """``(d/da, d/db)`` as functions of value arrays, from appmult.lut_gen or the STE formula."""
    wa = lut.width_a
    if grad == "ste":
        return (lambda a, b: b.astype(np.float64)), (lambda a, b: a.astype(np.float64))
    if grad == "lut1d":
        ga, gb = lut1d_gradients(lut.product, wa, wa, lut.signed, 2)
        return (lambda a, b: ga[codes(b, wa)].astype(np.float64)), (lambda a, b: gb[codes(a, wa)].astype(np.float64))
    ga, gb = lut2d_gradients(lut.product, wa, wa, lut.signed, 2)
    return (lambda a, b: ga[codes(a, wa), codes(b, wa)].astype(np.float64)), \
        (lambda a, b: gb[codes(a, wa), codes(b, wa)].astype(np.float64))


@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
@pytest.mark.parametrize("signed", [False, True])
def test_lut_bmm_backward_brute_force(grad, signed):
    lut = lutfile("mitchell", signed)
    tabs = LutTables(lut, grad=grad, compute_missing_gradients=True, half_window=2)
    rng = np.random.default_rng(0)
    vals = values(W, signed)
    a = rng.choice(vals, size=(2, 3, 4)).astype(np.float32)
    b = rng.choice(vals, size=(2, 4, 5)).astype(np.float32)
    keep = rng.random((2, 3, 4)) > 0.3
    g = rng.standard_normal((2, 3, 5))
    qa, qb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    y = lut_bmm(qa, qb, tabs, keep=torch.tensor(keep))
    np.testing.assert_array_equal(y.detach().numpy(), brute_sum(lut, a, b, keep))
    y.backward(torch.tensor(g, dtype=torch.float32))
    da, db = grad_tables(lut, grad)
    ga, gb = np.zeros(a.shape), np.zeros(b.shape)
    for i, m, k, n in np.ndindex(2, 3, 4, 5):
        if keep[i, m, k]:
            ga[i, m, k] += g[i, m, n] * da(a[i, m, k], b[i, k, n])
            gb[i, k, n] += g[i, m, n] * db(a[i, m, k], b[i, k, n])
    np.testing.assert_allclose(qa.grad.numpy(), ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(qb.grad.numpy(), gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", ["ste", "lut1d", "lut2d"])
def test_attention_value_gradient_brute_force(grad):
    """dL/dv through the whole attention (causal): ``s_p * inside(v) * sum_l G * g_b(p, v)`` over kept keys."""
    lut = lutfile("mitchell", True)
    att = LutAttention(ApproxConfig(lut, grad=grad, compute_missing_gradients=True, half_window=2))
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    v = torch.randn(2, 4, 3, requires_grad=True)
    g = torch.randn(2, 4, 3)
    att(q, k, v, is_causal=True).backward(g)
    ops = att.operands(q, k, v, is_causal=True)
    p, qv, keep = ops.p.numpy(), ops.v.numpy(), ops.keep.numpy()
    _, db = grad_tables(lut, grad)
    inside = np.abs(v.detach().numpy() / float(ops.scale_v)) <= (1 << (W - 1)) - 0.5
    ref = np.zeros(v.shape)
    for i, l, s, j in np.ndindex(2, 4, 4, 3):
        if keep[i, l, s]:
            ref[i, s, j] += g[i, l, j].item() * db(p[i, l, s], qv[i, s, j])
    ref *= float(ops.scale_p) * inside
    np.testing.assert_allclose(v.grad.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert not keep[:, 0, 1:].any() and keep[:, 3].all()


# -- masks -------------------------------------------------------------------------------------

def test_masked_keys_are_not_accumulated():
    """A LUT with LUT[0, b] != 0: a masked key would still add to AV if its product were summed."""
    lut = lutfile("random", False)
    assert (lut.product[0] != 0).any()
    att = LutAttention(ApproxConfig(lut))
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 5, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 3)
    mask = torch.tensor([[True, True, False, True, False]]).expand(5, 5)
    ops = att.operands(q, k, v, mask)
    assert (ops.p[0, :, [2, 4]] == 0).all()
    np.testing.assert_array_equal(att.int_context(ops).numpy(),
                                  brute_sum(lut, ops.p.numpy(), ops.v.numpy(), mask.numpy()[None]))
    causal = att.operands(q, k, v, is_causal=True)
    assert torch.equal(causal.keep[0], torch.ones(5, 5, dtype=torch.bool).tril())
    # a fully masked row attends to nothing: zeros, not NaN
    none = torch.zeros(5, 5, dtype=torch.bool)
    none[1:] = True
    y = att(q, k, v, none)
    assert torch.isfinite(y).all()


def test_float_mask_and_sdpa_routing_match():
    lut = lutfile("mitchell", True)
    att = LutAttention(ApproxConfig(lut))
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 4, 4) for _ in range(3))
    bias = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    direct = att(q, k, v, bias)
    with lut_sdpa(att):
        routed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    torch.testing.assert_close(direct, routed)


# -- conversion ----------------------------------------------------------------------------------

def test_parts_select_what_is_approximate():
    lut = lutfile("mitchell", True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    m1 = approximate_(nn.Sequential(*[*model]), ApproxConfig(lut, parts=("mlp",)))
    assert type(m1[0]) is ApproxLinear and type(m1[1]) is nn.MultiheadAttention
    m2 = approximate_(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2)), ApproxConfig(lut, parts="attention"))
    assert type(m2[0]) is nn.Linear and isinstance(m2[1], ApproxMultiheadAttention)
    assert type(m2[1].q_proj) is nn.Linear and m2[1].attention is not None
    m3 = approximate_(nn.MultiheadAttention(8, 2), ApproxConfig(lut, parts=["projections"]))
    assert isinstance(m3.q_proj, ApproxLinear) and m3.attention is None
    vit = ViT(1, 3, 8, dim=8, depth=1, heads=2)
    approximate_(vit, ApproxConfig(lut, parts=("projections", "attention")))
    assert isinstance(vit.blocks[0].attn.qkv, ApproxLinear) and type(vit.blocks[0].mlp[0]) is nn.Linear
    assert type(vit.head) is nn.Linear and type(vit.patch_embed) is nn.Conv2d


def test_transformer_encoder_layer_eval_goes_through_the_lut():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    approximate_(layer, ApproxConfig(lutfile("mitchell", True)))
    with torch.no_grad():
        layer(torch.randn(2, 3, 8))  # the inference fast path would read packed float weights
    assert layer.self_attn.attention.calls == 1


def test_exact_switches_attention():
    model = approximate_(nn.Sequential(nn.MultiheadAttention(8, 2)), ApproxConfig(lutfile("mitchell", True)))
    exact_(model)
    assert model[0].attention.exact_multiplication and model[0].q_proj.exact_multiplication


def test_vit_tiny_by_name():
    for size in (8, 28):
        model = build_model("vit-tiny", _info(size))
        assert isinstance(model, ViT) and model.patch_size == size // 4
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def _info(size: int):
    class Info:
        in_channels, input_size, num_classes = 1, size, 10
    return Info()


# -- bad configurations -----------------------------------------------------------------------

class HandAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class ImportedSdpaAttention(HandAttention):
    def forward(self, x):
        return scaled_dot_product_attention(*self.qkv(x).chunk(3, -1))  # bound when this file was imported


def test_unsupported_attention_wrong():
    lut = lutfile("mitchell", True)
    model = nn.Sequential(nn.Sequential(HandAttention()))
    with pytest.raises(ConfigError, match=msg(
            "approximate_: cannot approximate the attention of '0.0' (HandAttention): it is neither a "
            "torch.nn.MultiheadAttention nor a module whose forward calls "
            "torch.nn.functional.scaled_dot_product_attention; leave its attention exact with "
            "ApproxConfig(parts=('projections', 'mlp')) or skip it with filter_fn")):
        approximate_(model, ApproxConfig(lut))
    ok = approximate_(model, ApproxConfig(lut, parts=("projections", "mlp")))
    assert isinstance(ok[0][0].qkv, ApproxLinear)


def test_mha_bias_kv_wrong():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ConfigError, match=msg(
            "approximate_: cannot approximate the attention of '0' (MultiheadAttention): add_bias_kv is not "
            "supported (its projections cannot be approximated either); leave the whole module exact with "
            "ApproxConfig(parts=('mlp',)) or skip it with filter_fn")):
        approximate_(model, ApproxConfig(lutfile("mitchell", True)))


def test_sdpa_bound_by_name_wrong():
    model = approximate_(nn.Sequential(ImportedSdpaAttention()), ApproxConfig(lutfile("mitchell", True)))
    with pytest.raises(ValueError, match=msg(
            "ImportedSdpaAttention made no call to torch.nn.functional.scaled_dot_product_attention that appmult "
            "could route through the LUT (a name imported with 'from torch.nn.functional import "
            "scaled_dot_product_attention' is bound before routing): call F.scaled_dot_product_attention")):
        model(torch.randn(1, 3, 4))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_parts_wrong():
    for bad in ((), ("heads",), 3):
        with pytest.raises(ConfigError, match=msg(
                f"ApproxConfig parts must be a non-empty selection of 'projections', 'attention', 'mlp', "
                f"not {bad!r}")):
            ApproxConfig("x.npz", parts=bad)
    assert ApproxConfig("x.npz", parts=["mlp", "attention"]).parts == ("attention", "mlp")


def test_attention_shapes_wrong():
    att = LutAttention(ApproxConfig(lutfile("mitchell", True)))
    with pytest.raises(ValueError, match=msg(
            "LutAttention shapes do not match: query (1, 2, 4), key (1, 3, 5), value (1, 3, 4)")):
        att(torch.randn(1, 2, 4), torch.randn(1, 3, 5), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match=msg("ViT patch size 3 must divide the input size 8")):
        ViT(1, 10, 8, patch_size=3)


@pytest.mark.parametrize("masked", ["no", "torch", "split"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("width, shape", [(6, (2, 3, 4, 5)), (8, (3, 70, 5, 66)), (8, (2, 64, 3, 1))])
def test_lut_bmm_lut2d_backward_by_the_gradient_gathers_brute_force(masked, signed, width, shape, gather_path,
                                                                     monkeypatch):
    """The LUT-2D gradients of all items from the layers' gradient gathers in one call, each
    item a group (byte shuffles on a VBMI CPU, else the scalar loops): both sides without a
    keep mask, the activation side with one (the mask times the unmasked sums); 70 positions
    cross a 64-position block, 8-bit tables reach every plane half."""
    lut = lutfile("mitchell", signed, width)
    tabs = LutTables(lut, grad="lut2d", compute_missing_gradients=True, half_window=2)
    bsz, m, k, n = shape
    rng = np.random.default_rng(width + m)
    vals = values(width, signed)
    a = rng.choice(vals, size=(bsz, m, k)).astype(np.float32)
    b = rng.choice(vals, size=(bsz, k, n)).astype(np.float32)
    g = rng.standard_normal((bsz, m, n))
    keep = rng.random((bsz, m, k)) > 0.3 if masked != "no" else np.ones((bsz, m, k), bool)
    # a masked product's activation side: the torch gather (small) or the gradient gathers
    monkeypatch.setattr(attention_module, "MASKED_SPLIT_MIN_LOOKUPS", 0 if masked == "split" else 1 << 62)
    qa, qb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    y = lut_bmm(qa, qb, tabs, keep=torch.tensor(keep) if masked != "no" else None)
    y.backward(torch.tensor(g, dtype=torch.float32))
    ga2, gb2 = lut2d_gradients(lut.product, width, width, signed, 2)
    ca, cb = codes(a, width), codes(b, width)
    ta = ga2[ca[:, :, :, None], cb[:, None, :, :]].astype(np.float64)   # (B, M, K, N)
    tb = gb2[ca[:, :, :, None], cb[:, None, :, :]].astype(np.float64)
    gk = g[:, :, None, :] * keep[:, :, :, None]
    want_a = (ta * gk).sum(-1)
    want_b = (tb * gk).sum(1)
    np.testing.assert_allclose(qa.grad.numpy(), want_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(qb.grad.numpy(), want_b, rtol=1e-4, atol=1e-4)


def test_lut_bmm_lut2d_backward_in_float64_keeps_float64_sums():
    """An exact (float64) product's LUT-2D gradients are summed in float64 (the float32
    gradient gathers would lose about 1e-7 relative): against float64 brute force over the
    tables' own (stored) entries to 1e-12."""
    lut = lutfile("mitchell", False, 8)
    tabs = LutTables(lut, grad="lut2d", compute_missing_gradients=True, half_window=2)
    rng = np.random.default_rng(12)
    vals = values(8, False)
    a = rng.choice(vals, size=(2, 70, 9)).astype(np.float64)
    b = rng.choice(vals, size=(2, 9, 66)).astype(np.float64)
    g = rng.standard_normal((2, 70, 66))
    qa, qb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    lut_bmm(qa, qb, tabs, exact=True).backward(torch.tensor(g))
    ga2, gb2 = tabs.gx2.double().numpy(), tabs.gw2.double().numpy()
    ca, cb = codes(a, 8), codes(b, 8)
    ta = ga2[ca[:, :, :, None], cb[:, None, :, :]].astype(np.float64)
    tb = gb2[ca[:, :, :, None], cb[:, None, :, :]].astype(np.float64)
    assert qa.grad.dtype == torch.float64
    np.testing.assert_allclose(qa.grad.numpy(), (ta * g[:, :, None, :]).sum(-1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(qb.grad.numpy(), (tb * g[:, :, None, :]).sum(1), rtol=1e-12, atol=1e-12)
