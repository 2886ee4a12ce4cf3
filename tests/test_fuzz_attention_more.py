"""Fuzz findings for the approximate attention pieces (lut_bmm, LutAttention,
ApproxMultiheadAttention, approximate_ on transformer layers).

Tests named ``..._defect`` failed on the code they were written against (before commit
"Attention refuses what it got wrong"), each because of the defect named in its docstring ("a wrong answer must never come without an error", or
a crash / raw torch error on input a user could reasonably give). The other tests pin
behaviour that was checked correct against an independent reference (integer codes from a
numpy quantizer, numpy brute-force LUT sums, float64 softmax / masking / gradients).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from appmult.lut_gen import LutFile, lut1d_gradients, lut2d_gradients
from appmult.nn import (ApproxConfig, ApproxMultiheadAttention, LutAttention, LutTables, approximate_,
                        lut_bmm)
from test_nn_attention import np_quant
from test_nn_luts import codes, values


def lutfile(signed: bool, err: int = 0, seed: int = 0, width: int = 8) -> LutFile:
    """The exact product (table in code order), plus uniform random error in [-err, err]."""
    v = values(width, signed)
    table = np.outer(v, v).astype(np.int64)
    if err:
        table = table + np.random.default_rng(seed).integers(-err, err + 1, size=table.shape)
    return LutFile(table, width_a=width, width_b=width, signed=signed, metadata={"spec": f"exact+{err}"})


def brute(lut: LutFile, qa: np.ndarray, qb: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """``sum_k keep * LUT[qa, qb]`` of ``(B, M, K)`` and ``(B, K, N)`` values, in int64."""
    ca, cb = codes(qa, lut.width_a), codes(qb, lut.width_b)
    p = lut.product.astype(np.int64)[ca[:, :, :, None], cb[:, None, :, :]]
    if keep is not None:
        p = p * keep[:, :, :, None]
    return p.sum(2)


def cross_terms(acc, qa, za, qb, zb, keep):
    """``acc - sum_a*zb - za*sum_b + count*za*zb`` (an unsigned LUT's zero-point terms), float64."""
    kf = np.ones(qa.shape) if keep is None else keep.astype(np.float64)
    qa, qb = qa.astype(np.float64), qb.astype(np.float64)
    return acc - (qa * kf).sum(-1, keepdims=True) * zb - za * (kf @ qb) + kf.sum(-1, keepdims=True) * za * zb


def reference_attention(att: LutAttention, lut: LutFile, q, k, v, attn_mask=None, is_causal=False):
    """Checks ``att``'s output against an independent reference; returns the list of mismatches.

    QK^T: q and k quantized by numpy (np_quant), brute-force LUT sums; scores, masks and the
    softmax in float64 as LutAttention documents them (fully masked rows: zeros). AV: the
    module's own quantized probabilities (a float32/float64 rounding boundary may move one
    code) against the float64 probabilities within one step, then brute-force LUT sums over
    the kept keys only."""
    w, signed = lut.width_a, lut.signed
    out = att(q, k, v, attn_mask=attn_mask, is_causal=is_causal).detach().double().numpy()
    ops = att.operands(q, k, v, attn_mask, is_causal)
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    (l, e), s, ev = qn.shape[-2:], kn.shape[-2], vn.shape[-1]
    batch = np.broadcast_shapes(qn.shape[:-2], kn.shape[:-2], vn.shape[:-2])
    (qq, sq, zq), (qk, sk, zk), (qv, sv, zv) = (np_quant(x, w, signed) for x in (qn, kn, vn))
    qq = np.broadcast_to(qq, batch + (l, e)).reshape(-1, l, e)
    qk = np.broadcast_to(qk, batch + (s, e)).reshape(-1, s, e)
    qv = np.broadcast_to(qv, batch + (s, ev)).reshape(-1, s, ev)
    bad = [name for name, mine, theirs in (("q", qq, ops.q), ("k", qk, ops.k), ("v", qv, ops.v))
           if not np.array_equal(mine, theirs.numpy())]
    acc = brute(lut, qq, qk.transpose(0, 2, 1)).astype(np.float64)
    if not signed:
        acc = cross_terms(acc, qq, zq, qk.transpose(0, 2, 1), zk, None)
    scores = (float(sq) * float(sk) * acc).reshape(batch + (l, s)) / np.sqrt(e)
    keep = np.tril(np.ones((l, s), bool)) if is_causal else None
    if attn_mask is not None:
        m = attn_mask.numpy()
        if m.dtype == bool:
            keep = m if keep is None else keep & m
        else:
            scores = scores + m.astype(np.float64)
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    taken = None
    if attn_mask is not None or is_causal:
        taken = scores != -np.inf
        scores = np.where(taken.any(-1, keepdims=True), scores, 0.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    if taken is not None:
        p = np.where(taken, p, 0.0)
    p = np.broadcast_to(p, batch + (l, s)).reshape(-1, l, s)
    sp, zp = float(ops.scale_p), float(ops.zero_p)
    if np.abs((ops.p.double().numpy() - zp) * sp - p).max() > 1.01 * sp + 1e-7:
        bad.append("p")
    keep3 = None if taken is None else np.broadcast_to(taken, batch + (l, s)).reshape(-1, l, s)
    if (keep3 is None) != (ops.keep is None) or (keep3 is not None and not np.array_equal(keep3, ops.keep.numpy())):
        bad.append("keep")
    acc2 = brute(lut, ops.p.numpy(), qv, keep3).astype(np.float64)
    if not np.array_equal(att.int_context(ops).numpy(), acc2):
        bad.append("int_context")
    if not signed:
        acc2 = cross_terms(acc2, ops.p.numpy(), zp, qv, zv, keep3)
    want = (sp * float(sv) * acc2).reshape(batch + (l, ev))
    if out.shape != want.shape or not np.isfinite(out).all() \
            or np.abs(out - want).max() > 1e-5 * max(1.0, np.abs(want).max()):
        bad.append("output")
    return bad


# ==========================================================================================
# Defects (each test fails on the current code because of the defect in its docstring)
# ==========================================================================================

def test_lut_bmm_non_integer_operands_defect():
    """DEFECT (silent wrong answer): lut_bmm documents integer-valued operands and its range
    check's message says "must be integers in [...]", but a non-integer operand inside the
    range passes the check and is truncated to an index (1.5 -> 1, -1.5 -> -1): 1.5*3 + 2*1
    comes back as 5 with no error."""
    tabs = LutTables(lutfile(True), grad="ste")
    qb = torch.tensor([[[3.0], [1.0]]])
    for bad in (1.5, -1.5, 0.25):
        with pytest.raises(ValueError):
            lut_bmm(torch.tensor([[[bad, 2.0]]]), qb, tabs)


def test_lut_bmm_non_bool_keep_defect():
    """DEFECT (silent wrong answer): ``keep`` is documented as a bool mask, but an integer or
    float tensor of the right shape is multiplied into the products instead of being
    refused: keep=[2, 1] gives 2*LUT[1,3] + LUT[2,1] = 8 (as a mask: 5), keep=[0.5, 1] 3.5."""
    tabs = LutTables(lutfile(True), grad="ste")
    qa, qb = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0], [1.0]]])
    for keep in (torch.tensor([[[2, 1]]]), torch.tensor([[[0.5, 1.0]]])):
        try:
            y = lut_bmm(qa, qb, tabs, keep=keep)
        except (TypeError, ValueError):
            continue
        assert float(y) == 5.0, f"keep {keep.dtype} silently weighted the products: {float(y)}"


def test_lut_bmm_non_tensor_operand_message_defect():
    """DEFECT (poor message): a non-tensor operand gives AttributeError: 'list' object has no
    attribute 'dim' instead of a TypeError naming lut_bmm."""
    tabs = LutTables(lutfile(True), grad="ste")
    with pytest.raises(TypeError, match="lut_bmm"):
        lut_bmm([[[1.0, 2.0]]], torch.tensor([[[3.0], [1.0]]]), tabs)


def _mha(bf: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, 2, batch_first=bf).eval()
    return mha, ApproxMultiheadAttention.from_float(mha, ApproxConfig(lutfile(True), parts="attention"))


@pytest.mark.parametrize("bf", [True, False])
def test_mha_transposed_masks_defect(bf):
    """DEFECT (silent wrong answer): ApproxMultiheadAttention reshapes its masks instead of
    checking their shapes, so an (S, L) attn_mask for L=3, S=5 (or (N*H, S, L)), or a
    key_padding_mask given as (S, N) -- the sequence-first layout of batch_first=False --
    is reinterpreted element by element as (L, S) / (N, S). nn.MultiheadAttention raises
    for each ("The shape of the 2D attn_mask is torch.Size([5, 3]), but should be (3, 5).",
    "Expected key_padded_mask.shape[0] to be 2, but got 5")."""
    mha, am = _mha(bf)
    n, l, s = 2, 3, 5
    q = torch.randn(n, l, 8) if bf else torch.randn(l, n, 8)
    kv = torch.randn(n, s, 8) if bf else torch.randn(s, n, 8)
    for kw in ({"attn_mask": torch.rand(s, l) > 0.5}, {"attn_mask": torch.randn(s, l)},
               {"attn_mask": torch.rand(n * 2, s, l) > 0.5}, {"key_padding_mask": torch.rand(s, n) > 0.5}):
        with pytest.raises(Exception):
            mha(q, kv, kv, **kw)  # torch refuses each
        with pytest.raises(ValueError):
            am(q, kv, kv, **kw)


def test_mha_integer_masks_defect():
    """DEFECT (silent wrong answer): a uint8 / int64 attn_mask or key_padding_mask (torch's old
    byte masks, where 1 meant "not allowed") is converted to float and *added* to the
    scores (+1.0 on the masked keys) instead of masking them or being refused;
    nn.MultiheadAttention raises "only bool and floating types of attn_mask are supported"."""
    mha, am = _mha()
    x = torch.randn(2, 5, 8)
    m = torch.zeros(5, 5, dtype=torch.uint8)
    m[:, 4] = 1
    for kw in ({"attn_mask": m}, {"attn_mask": m.long()}, {"key_padding_mask": m[:2]}):
        with pytest.raises(Exception):
            mha(x, x, x, **kw)
        try:
            y, _ = am(x, x, x, **kw)
        except (TypeError, ValueError):
            continue
        masked = {k: (t != 0) for k, t in kw.items()}
        y_bool, _ = am(x, x, x, **masked)
        torch.testing.assert_close(y, y_bool, msg=f"{kw.keys()} {next(iter(kw.values())).dtype} mask added as +1.0")


def test_mha_shape_mismatch_messages_defect():
    """DEFECT (poor message): mismatched inputs reach a reshape and fail with torch's
    "shape '[2, 5, 2, 4]' is invalid for input of size 48" (a RuntimeError, not the project's
    InvalidValueError naming the argument): key and value of different lengths, a
    key_padding_mask of the wrong length or batch, an unbatched query with batched key and
    value, a 3-D attn_mask of N (not N*H) masks."""
    _, am = _mha()
    x = torch.randn(2, 5, 8)
    for args, kw in (((x, x, x[:, :3]), {}),
                     ((x, x, x), {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}),
                     ((x, x, x), {"key_padding_mask": torch.zeros(1, 5, dtype=torch.bool)}),
                     ((x[0], x, x), {}),
                     ((x, x, x), {"attn_mask": torch.zeros(2, 5, 5, dtype=torch.bool)})):
        with pytest.raises(ValueError, match="ApproxMultiheadAttention"):
            am(*args, **kw)


def test_transformer_encoder_padding_mask_inference_defect():
    """DEFECT (crash): nn.TransformerEncoder (enable_nested_tensor=True, torch's default) of
    converted layers, in eval mode under no_grad with a src_key_padding_mask -- ordinary
    padded-batch inference -- raises AttributeError: 'ApproxMultiheadAttention' object has
    no attribute 'in_proj_weight' (torch's sparsity fast-path check reads it; the class
    only sets in_proj_bias = None). The same stack runs with enable_nested_tensor=False or in
    train mode. Expected: the output of the layers one after another (non-padded rows)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    approximate_(enc, ApproxConfig(lutfile(True, err=50, seed=2)))
    enc.eval()
    x = torch.randn(2, 5, 8)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        want = x
        for lyr in enc.layers:
            want = lyr(want, src_key_padding_mask=kpm)
        calls = enc.layers[0].self_attn.attention.calls
        y = enc(x, src_key_padding_mask=kpm)
    assert enc.layers[0].self_attn.attention.calls > calls
    torch.testing.assert_close(y[~kpm], want[~kpm])


def test_attention_score_overflow_message_defect():
    """DEFECT (crash with an unhelpful message): finite inputs whose scores overflow float32
    (q, k ~ 1e20; or q at +-3e38, which torch's SDPA still computes finitely), a non-finite
    ``scale``, or a NaN / +inf entry in a float mask make the probabilities NaN, and their
    NaN codes reach the table as indices: IndexError "index out of range in self". NaN/Inf
    *inputs* get a clear InvalidValueError; these should too."""
    att = LutAttention(ApproxConfig(lutfile(True)))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3) for _ in range(3))
    bad_mask = torch.zeros(4, 4)
    bad_mask[:, 1] = float("nan")
    for args, kw in (((q * 1e20, k * 1e20, v), {}), ((q.sign() * 3e38, k, v), {}),
                     ((q, k, v), {"scale": float("inf")}), ((q, k, v), {"attn_mask": bad_mask})):
        with pytest.raises(ValueError):
            att(*args, **kw)


def test_unsigned_operand_range_overflow_silent_nan_defect():
    """DEFECT (silent wrong answer): with an unsigned LUT, a value (or query/key) tensor whose
    range hi - lo overflows float32 (entries near +-3e38, finite) gets an infinite scale:
    every output is NaN with no error (torch's SDPA gives finite values). The layers refuse
    this case ("weight range [...] is too wide to quantize"); attention does not."""
    att = LutAttention(ApproxConfig(lutfile(False)))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3) for _ in range(3))
    assert torch.isfinite(F.scaled_dot_product_attention(q, k, v.sign() * 3e38)).all()
    try:
        y = att(q, k, v.sign() * 3e38)
    except ValueError:
        return
    assert torch.isfinite(y).all(), "NaN output without an error"


def test_float_mask_finfo_min_skips_padded_keys_defect():
    """DEFECT (silent wrong answer, mask semantics): LutAttention skips a masked key's AV
    products only where the mask makes its score exactly -inf. Float masks that mask with
    a large finite negative number -- torch.finfo(dtype).min, the convention of Hugging Face
    models whose SDPA calls approximate_ routes here -- leave the key "taken": its
    probability is exactly 0 but LUT[0, v] is still accumulated, so with a multiplier whose
    LUT[0, b] != 0 the output depends on the padded key's value (0.039 here; 0.0 with -inf).
    The docstring promises "a mask means the same as in float attention"."""
    att = LutAttention(ApproxConfig(lutfile(True, err=300, seed=1)))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 4)
    v[0, 0, 0], v[0, 0, 1] = 3.0, -3.0  # keeps V's quantization range when key 4 changes
    v2 = v.clone()
    v2[0, 4] = torch.tensor([0.5, -0.5, 1.0, -1.0])
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        m = torch.zeros(4, 5)
        m[:, 4] = fill
        assert torch.equal(att(q, k, v, m), att(q, k, v2, m)), f"padded key leaks with mask value {fill}"
    # Documented: another finite value only lowers the score; the key takes part (p = 0 after
    # rounding) and the multiplier's LUT[0, v] != 0 shows in the output.
    m = torch.zeros(4, 5)
    m[:, 4] = -1e9
    assert not torch.equal(att(q, k, v, m), att(q, k, v2, m))


def test_mha_add_bias_kv_projections_silently_float_defect():
    """DEFECT (silent wrong answer): following the ConfigError's own hint for an
    nn.MultiheadAttention with add_bias_kv / add_zero_attn ("leave its attention exact with
    ApproxConfig(parts=('projections', 'mlp'))"), approximate_ leaves the whole module float
    -- its input and output projections too (out_proj is a Linear subclass, so "mlp" does
    not take it either) -- with no error: the model is evaluated with those products exact."""
    lut = lutfile(True)
    for kw in ({"add_bias_kv": True}, {"add_zero_attn": True}):
        model = nn.Sequential(nn.MultiheadAttention(8, 2, **kw), nn.Linear(8, 8))
        try:
            approximate_(model, ApproxConfig(lut, parts=("projections", "mlp")))
        except ValueError:
            continue
        assert type(model[0]) is not nn.MultiheadAttention, f"{kw}: projections silently left float"


# ==========================================================================================
# Behaviour checked correct against an independent reference
# ==========================================================================================

CASES = [  # (signed, lut error, q shape, k shape, v shape, mask kind)
    (True, 0, (2, 65, 4), (2, 66, 4), (2, 66, 3), "bool"),
    (False, 300, (2, 65, 4), (2, 66, 4), (2, 66, 3), "floatinf"),
    (True, 300, (3, 2, 1, 1), (1, 2, 1, 1), (3, 1, 1, 2), "none"),      # lengths 1, head_dim 1, broadcast
    (False, 0, (2, 2, 7, 1), (2, 1, 64, 1), (1, 2, 64, 5), "causal"),
    (True, 300, (2, 3, 5, 2), (2, 3, 5, 2), (2, 3, 5, 2), "rows"),       # fully masked query rows
    (False, 300, (1, 4, 8), (1, 65, 8), (1, 65, 2), "bcast"),            # (1, S) mask
    (True, 300, (2, 5, 8), (2, 5, 8), (2, 5, 4), "causal+float"),
]


@pytest.mark.parametrize("signed, err, qs, ks, vs, kind", CASES)
def test_lut_attention_matches_independent_reference(signed, err, qs, ks, vs, kind):
    """(Checked on ~1,300 random cases: float32/float64, masks bool/float/-inf/causal/broadcast,
    lengths 1..70 across the 64-position blocks, exact_accumulate, gather and low-rank.)"""
    lut = lutfile(signed, err, seed=1)
    att = LutAttention(ApproxConfig(lut))
    rng = np.random.default_rng(len(qs) + ks[-2])
    q, k, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in (qs, ks, vs))
    l, s = qs[-2], ks[-2]
    mask, causal = None, kind.startswith("causal")
    if kind == "bool":
        mask = torch.from_numpy(rng.random((l, s)) > 0.4)
    if kind == "floatinf":
        m = rng.standard_normal((2, l, s)).astype(np.float32)
        m[rng.random(m.shape) > 0.6] = -np.inf
        mask = torch.from_numpy(m)
    if kind == "rows":
        m = rng.random((2, 3, l, s)) > 0.4
        m[..., 0, :] = False
        mask = torch.from_numpy(m)
    if kind == "bcast":
        mask = torch.from_numpy(rng.random((1, s)) > 0.4)
    if kind == "causal+float":
        mask = torch.from_numpy(rng.standard_normal((l, s)).astype(np.float32))
    assert reference_attention(att, lut, q, k, v, mask, causal) == []
    if kind == "rows":  # documented: a fully masked row gives zeros, not torch's NaN
        assert (att(q, k, v, mask)[..., 0, :] == 0).all()


@pytest.mark.parametrize("bf, unbatched, kdim, vdim, mask", [
    (True, False, 8, 8, "bool3+floatkpm"), (False, False, 3, 5, "float2+boolkpm"),
    (False, True, 8, 8, "bool3+boolkpm"), (True, False, 8, 5, "causal")])
def test_mha_plumbing_matches_independent_heads(bf, unbatched, kdim, vdim, mask):
    """ApproxMultiheadAttention = out_proj(LutAttention(heads, merged mask)) with the heads,
    the (N*H)-major 3-D mask and the key-padding mask built independently from the float
    module's weights (checked on ~850 random configurations: heads 1..8, head_dim 1..4,
    kdim/vdim, bias, float64, unbatched, batch_first both ways, weights averaged or not)."""
    torch.manual_seed(1)
    h, e, n, l, s = 2, 8, 2, 4, 6
    mha = nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim, batch_first=bf).eval()
    am = ApproxMultiheadAttention.from_float(mha, ApproxConfig(lutfile(False, 300, seed=2), parts="attention"))
    n = 1 if unbatched else n
    q, k, v = torch.randn(n, l, e), torch.randn(n, s, kdim), torch.randn(n, s, vdim)
    kw = {}
    if mask.startswith("bool3"):
        kw["attn_mask"] = torch.rand(n * h, l, s) > 0.7
    if mask.startswith("float2"):
        kw["attn_mask"] = torch.randn(l, s)
    if mask == "causal":
        kw["attn_mask"], kw["is_causal"] = torch.ones(l, s, dtype=torch.bool).triu(1), False
    if mask.endswith("kpm"):
        pad = torch.rand(n, s) > 0.7
        kw["key_padding_mask"] = pad if mask.endswith("boolkpm") else torch.zeros(n, s).masked_fill(pad, float("-inf"))
    allowed, add = torch.ones(n, h, l, s, dtype=torch.bool), torch.zeros(n, h, l, s)
    if "attn_mask" in kw:
        m = kw["attn_mask"]
        m4 = m.reshape(n, h, l, s) if m.dim() == 3 else m[None, None]
        allowed, add = (allowed & ~m4, add) if m4.dtype == torch.bool else (allowed, add + m4)
    if "key_padding_mask" in kw:
        m4 = kw["key_padding_mask"].reshape(n, 1, 1, s)
        allowed, add = (allowed & ~m4, add) if m4.dtype == torch.bool else (allowed, add + m4)
    wq, wk, wv = mha.in_proj_weight.split(e) if mha._qkv_same_embed_dim else \
        (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    bq, bk, bv = mha.in_proj_bias.split(e)
    with torch.no_grad():
        heads = [F.linear(x, wt, b).reshape(n, ln, h, e // h).transpose(1, 2)
                 for x, wt, b, ln in ((q, wq, bq, l), (k, wk, bk, s), (v, wv, bv, s))]
        ctx = am.attention(*heads, attn_mask=add.masked_fill(~allowed, float("-inf")))
        want = mha.out_proj(ctx.transpose(1, 2).reshape(n, l, e))
        if unbatched:
            q, k, v = q[0], k[0], v[0]
            kw = {key: (t[0] if key == "key_padding_mask" else t[:h] if t.dim() == 3 else t) for key, t in kw.items()}
            want = want[0]
        elif not bf:
            q, k, v, want = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), want.transpose(0, 1)
        y, w = am(q, k, v, **kw)
        y_ref, w_ref = mha(q, k, v, **kw)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert w.shape == w_ref.shape


@pytest.mark.parametrize("grad", ["lut1d", "lut2d"])
@pytest.mark.parametrize("signed", [False, True])
def test_lut_bmm_gradients_match_documented_formula(grad, signed):
    """d/dqa = sum_n G * g_a(qa, qb) and d/dqb = sum_m G * g_b(qa, qb) over kept products, in
    float64 from appmult.lut_gen's tables (checked on ~450 random cases: M up to 130 across
    the 64-position blocks, masked or not, float32/float64, exact, one side only)."""
    width = 8
    lut = lutfile(signed, err=200, seed=5)
    tabs = LutTables(lut, grad=grad, compute_missing_gradients=True, half_window=2)
    rng = np.random.default_rng(3)
    vals = values(width, signed)
    a = rng.choice(vals, size=(2, 65, 3)).astype(np.float32)
    b = rng.choice(vals, size=(2, 3, 66)).astype(np.float32)
    keep = rng.random(a.shape) > 0.3
    g = rng.standard_normal((2, 65, 66))
    qa, qb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    y = lut_bmm(qa, qb, tabs, keep=torch.tensor(keep))
    np.testing.assert_array_equal(y.detach().numpy(), brute(lut, a, b, keep))
    y.backward(torch.tensor(g, dtype=torch.float32))
    ca, cb = codes(a, width), codes(b, width)
    if grad == "lut1d":
        g1a, g1b = lut1d_gradients(lut.product, width, width, signed, 2)
        ta = np.broadcast_to(g1a[cb][:, None], (2, 65, 3, 66)).astype(np.float64)
        tb = np.broadcast_to(g1b[ca][..., None], (2, 65, 3, 66)).astype(np.float64)
    else:
        g2a, g2b = lut2d_gradients(lut.product, width, width, signed, 2)
        ta = g2a[ca[..., None], cb[:, None]].astype(np.float64)
        tb = g2b[ca[..., None], cb[:, None]].astype(np.float64)
    gk = g[:, :, None, :] * keep[..., None]
    for got, terms, axis in ((qa.grad, ta * gk, -1), (qb.grad, tb * gk, 1)):
        want = terms.sum(axis)
        assert (np.abs(got.numpy() - want) <= 1e-5 * (1 + np.abs(terms).sum(axis))).all()


@pytest.mark.parametrize("norm_first", [False, True])
def test_converted_encoder_layer_state_dict_and_pickle_round_trip(norm_first):
    """A converted nn.TransformerEncoderLayer: state_dict into a freshly converted layer and
    torch.save/load give the same outputs bit for bit (padding and causal masks)."""
    cfg = ApproxConfig(lutfile(True, err=50, seed=2))
    torch.manual_seed(0)
    layer = approximate_(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, norm_first=norm_first), cfg).eval()
    other = approximate_(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, norm_first=norm_first), cfg)
    other.load_state_dict(layer.state_dict())
    other.eval()
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    x = torch.randn(5, 2, 8)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kw in ({"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}):
            y = layer(x, **kw)
            assert torch.equal(y, other(x, **kw)) and torch.equal(y, pickled(x, **kw))
    assert layer.self_attn.attention.calls == 2
