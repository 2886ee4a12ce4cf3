"""The approximate layers give the same results on a CUDA device as on the CPU.

What is checked, each time against the CPU's result (or a numpy brute force), never
against the device itself:

* ``ApproxConv2d`` / ``ApproxLinear`` inference, per LUT kind (exact, truncated = low rank,
  DRUM-like, random and signed Mitchell-like = gather only) and kernel (``auto``,
  ``lowrank``, ``gather``), for three conv geometries: the integer accumulators
  (``int_forward``), the quantized operands and the eval outputs bit for bit, and the
  device's accumulators against the numpy brute force of ``tests/test_nn_forward.py``;
* training (``ste``, ``lut2d``, ``lut1d``): the forward bit for bit, the input, weight and
  bias gradients close (the device may sum in another order);
* ``lut_bmm``, ``approx_matmul`` and ``ApproxMultiheadAttention``;
* autocast on the device changes no bit of the layers' outputs;
* three SGD steps of a small model converted by ``approximate_``;
* bad input (NaN, codes outside the table) raises the CPU's error on the device too.

Run on a GPU machine: ``python -m pytest -m cuda tests/test_nn_cuda.py`` (every test is
marked ``cuda`` and skipped where no CUDA device is found). Run against the CPU itself, a
smoke test of the test logic: ``APPMULT_TEST_DEVICE=cpu python -m pytest tests/test_nn_cuda.py``
(``APPMULT_TEST_DEVICE`` names the device compared with the CPU; default ``cuda``).
Needs torch (and numba for the CPU's fast paths); never imports Amaranth.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.lut_gen.gradients import lut1d_gradients, lut2d_gradients
from appmult.nn import (ApproxConfig, ApproxConv2d, ApproxLinear, ApproxMultiheadAttention, LutTables,
                        approx_conv2d, approx_linear, approx_matmul, approximate_, lut_bmm, lut_conv2d, lut_linear)
from appmult.nn import kernels as K
from conftest import exact as exact_message
from test_nn_forward import brute_conv, brute_linear
from test_nn_luts import codes, exact, mitchell_like, random_lut, truncated
from test_nn_rank1_mapped_conv import drum

DEV = os.environ.get("APPMULT_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.device(DEV).type == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device"),
]


# name -> (table, signed); all 8x8. The last two have no exact factorization: gather only.
LUTS = {
    "exact8u": (lambda: exact(8, False), False),
    "trunc8u": (lambda: truncated(8, 4), False),        # rank 5
    "drum8u": (lambda: drum(8, 4), False),              # rank 1, factor not the value
    "random8u": (lambda: random_lut(8, 5), False),      # full rank
    "mitchell8s": (lambda: mitchell_like(8, True), True),
}
FACTORABLE = ("exact8u", "trunc8u", "drum8u")
GATHER_ONLY = ("random8u", "mitchell8s")
LUT_KERNELS = [(n, k) for n in FACTORABLE for k in ("auto", "lowrank", "gather")] + \
              [(n, k) for n in GATHER_ONLY for k in ("auto", "gather")]

GEOMS = {
    "pad1": dict(stride=1, padding=1, dilation=1, groups=1),
    "stride2_dil2": dict(stride=2, padding=2, dilation=2, groups=1),
    "groups2": dict(stride=1, padding=1, dilation=1, groups=2),
}


@functools.lru_cache(maxsize=None)
def make_lut(name: str, gradients: bool = False) -> LutFile:
    """The LUT file; with ``gradients``, holding its LUT-2D and LUT-1D tables (the
    functional API and attention take no ``compute_missing_gradients``)."""
    table, signed = LUTS[name]
    p = table()
    grads = None
    if gradients:
        grads = {"lut2d": lut2d_gradients(p, 8, 8, signed), "lut1d": lut1d_gradients(p, 8, 8, signed)}
    return LutFile(p, width_a=8, width_b=8, signed=signed, gradients=grads, metadata={"spec": name})


@pytest.fixture(params=["default", "no_triton"])
def device_gather(request, monkeypatch, kernel):
    """The device's gather kernels both ways: as the library picks them (Triton programs on
    CUDA where Triton imports) and the torch fallback (``APPMULT_NO_TRITON=1``). The switch
    changes nothing on the CPU (numba), nor with the low-rank kernel unless LUT-2D gradients
    gather (``lut_bmm``'s backward does): skipped there."""
    monkeypatch.delenv("APPMULT_NO_TRITON", raising=False)
    if request.param == "no_triton":
        if torch.device(DEV).type != "cuda":
            pytest.skip("APPMULT_NO_TRITON changes CUDA runs only")
        if kernel == "lowrank" and request.node.callspec.params.get("grad") != "lut2d":
            pytest.skip("no gather on the device with the low-rank kernel")
        monkeypatch.setenv("APPMULT_NO_TRITON", "1")
    return request.param


def on_device(module: nn.Module) -> nn.Module:
    """A copy of the CPU module on the device under test (the CPU one stays as it is)."""
    return copy.deepcopy(module).to(DEV)


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """A device gradient against the CPU's: equal up to the order of float32 sums."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=max(1e-5 * scale, 1e-12))


def calibrated(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """One eval forward sets the activation range; then the observer is frozen."""
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.act_quant.observing = False
    return layer


def conv_layer(name: str, kernel: str, geom: str, grad: str = "ste", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ApproxConfig(make_lut(name), kernel=kernel, grad=grad, compute_missing_gradients=True)
    layer = ApproxConv2d(4, 4, 3, bias=True, config=cfg, **GEOMS[geom])
    x = torch.relu(torch.randn(2, 4, 7, 7))
    return calibrated(layer, x), x


def linear_layer(name: str, kernel: str, grad: str = "ste", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ApproxConfig(make_lut(name), kernel=kernel, grad=grad, compute_missing_gradients=True)
    layer = ApproxLinear(37, 5, config=cfg)
    x = torch.relu(torch.randn(6, 37))
    return calibrated(layer, x), x


def eval_outputs(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What inference gives, on the layer's device, moved to the CPU: the integer
    accumulators, the quantized operands, the output without autograd (weight side cached)
    and with it (computed afresh), and the output again (the cached weight side reused)."""
    q = layer.quantize(x)
    out = {"int_forward": layer.int_forward(x), "qx": q.qx, "qw": q.qw, "sx": q.scale_x, "zx": q.zero_x,
           "sw": q.scale_w, "zw": q.zero_w}
    with torch.no_grad():
        out["no_grad"] = layer(x)
        out["no_grad_again"] = layer(x)
    out["grad_enabled"] = layer(x).detach()
    return {k: v.detach().cpu() for k, v in out.items()}


def assert_same_inference(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    want = eval_outputs(layer, x)
    got = eval_outputs(on_device(layer), dev(x))
    for key, w in want.items():
        assert got[key].dtype == w.dtype, key
        assert torch.equal(got[key], w), f"{key} differs on {DEV}"
    return got


# -- 1. inference: bit for bit, and against the numpy brute force -------------------------------

@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("name,kernel", LUT_KERNELS)
def test_conv_inference_matches_cpu(name, kernel, geom, device_gather):
    layer, x = conv_layer(name, kernel, geom)
    got = assert_same_inference(layer, x)
    g = GEOMS[geom]
    lut = make_lut(name)
    # quantize() pads with the zero point: the brute force needs no padding of its own
    ref = brute_conv(lut.product, 8, got["qx"].numpy().astype(np.int64), int(got["zx"]),
                     got["qw"].numpy().astype(np.int64), g["stride"], 0, g["dilation"], g["groups"])
    assert np.array_equal(got["int_forward"].numpy(), ref)


@pytest.mark.parametrize("name,kernel", LUT_KERNELS)
def test_linear_inference_matches_cpu(name, kernel, device_gather):
    layer, x = linear_layer(name, kernel)
    got = assert_same_inference(layer, x)
    ref = brute_linear(make_lut(name).product, 8, got["qx"].numpy().astype(np.int64),
                       got["qw"].numpy().astype(np.int64))
    assert np.array_equal(got["int_forward"].numpy(), ref)


@pytest.mark.parametrize("name,kernel", [(n, k) for n, k in LUT_KERNELS if not LUTS[n][1]])
def test_conv_with_activation_zero_point_matches_cpu(name, kernel):
    """Inputs with negative values: a non-zero activation zero point, which padding inserts
    as a code and the cross terms subtract."""
    torch.manual_seed(4)
    cfg = ApproxConfig(make_lut(name), kernel=kernel)
    layer = ApproxConv2d(3, 5, 3, padding=1, config=cfg)
    x = torch.randn(2, 3, 6, 6) + 0.5
    calibrated(layer, x)
    got = assert_same_inference(layer, x)
    assert int(got["zx"]) != 0
    ref = brute_conv(make_lut(name).product, 8, got["qx"].numpy().astype(np.int64), int(got["zx"]),
                     got["qw"].numpy().astype(np.int64), 1, 0, 1, 1)
    assert np.array_equal(got["int_forward"].numpy(), ref)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_control_variate_correction_matches_cpu(kind):
    """``correction="control_variate"``: the corrected accumulators and outputs (the
    correction's integer arithmetic on the device) bit for bit."""
    torch.manual_seed(6)
    cfg = ApproxConfig(make_lut("trunc8u"), correction="control_variate")
    layer = ApproxConv2d(4, 4, 3, padding=1, config=cfg) if kind == "conv" else ApproxLinear(37, 5, config=cfg)
    x = torch.relu(torch.randn(2, 4, 7, 7) if kind == "conv" else torch.randn(6, 37))
    calibrated(layer, x)
    layer_d, xd = on_device(layer), dev(x)
    corrected = layer.int_forward_corrected(x)
    assert not torch.equal(corrected, layer.int_forward(x))  # (the correction is not zero)
    assert torch.equal(layer_d.int_forward_corrected(xd).cpu(), corrected)
    with torch.no_grad():
        assert torch.equal(layer_d(xd).cpu(), layer(x))


def test_unbatched_and_3d_inputs_match_cpu():
    conv, x = conv_layer("trunc8u", "auto", "pad1")
    lin, xl = linear_layer("mitchell8s", "auto")
    conv_d, lin_d = on_device(conv), on_device(lin)
    with torch.no_grad():
        assert torch.equal(conv_d(dev(x[0])).cpu(), conv(x[0]))
        assert torch.equal(lin_d(dev(xl.reshape(2, 3, 37))).cpu(), lin(xl.reshape(2, 3, 37)))
    assert torch.equal(conv_d.int_forward(dev(x[1])).cpu(), conv.int_forward(x[1]))


# -- 2. training: forward bit for bit, gradients close -----------------------------------------

TRAIN_CASES = [("trunc8u", "lowrank"), ("trunc8u", "gather"), ("mitchell8s", "gather")]


def _train_step(layer: nn.Module, x: torch.Tensor, r: torch.Tensor):
    layer.train()
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    (y * r).sum().backward()
    return y.detach().cpu(), xg.grad.cpu(), layer.weight.grad.cpu(), layer.bias.grad.cpu()


@pytest.mark.parametrize("grad", ["ste", "lut2d", "lut1d"])
@pytest.mark.parametrize("name,kernel", TRAIN_CASES)
@pytest.mark.parametrize("kind", ["conv", "conv_groups2", "linear"])
def test_training_gradients_match_cpu(kind, name, kernel, grad, device_gather):
    if kind == "linear":
        layer, x = linear_layer(name, kernel, grad)
    else:
        layer, x = conv_layer(name, kernel, "pad1" if kind == "conv" else "groups2", grad)
    layer_d = on_device(layer)
    torch.manual_seed(11)
    r = torch.randn(layer(x).shape)
    want = _train_step(layer, x, r)
    got = _train_step(layer_d, dev(x), dev(r))
    assert torch.equal(got[0], want[0])  # the forward: exact integer sums, same dequantization
    for g, w in zip(got[1:], want[1:]):
        assert w.abs().max() > 0  # (a gradient that is all zeros would prove nothing)
        assert_grad_close(g, w)


# -- 3. activation x activation: lut_bmm, approx_matmul, attention -----------------------------

@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grad", ["ste", "lut2d"])
@pytest.mark.parametrize("name,kernel", [("trunc8u", "lowrank"), ("trunc8u", "gather"), ("mitchell8s", "gather")])
def test_lut_bmm_matches_cpu(name, kernel, grad, masked, device_gather):
    tabs = LutTables(make_lut(name, gradients=True), grad=grad, kernel=kernel)
    tabs_d = copy.deepcopy(tabs).to(DEV)
    lo, hi = tabs.lo_x, tabs.lo_x + 255
    gen = torch.Generator().manual_seed(3)
    qa = torch.randint(lo, hi + 1, (3, 5, 9), generator=gen).float()
    qb = torch.randint(lo, hi + 1, (3, 9, 4), generator=gen).float()
    keep = torch.rand(3, 5, 9, generator=gen) > 0.3 if masked else None
    r = torch.randn(3, 5, 4, generator=gen)

    def run(qa, qb, keep, tabs, r):
        exact_acc = lut_bmm(qa, qb, tabs, keep=keep, exact=True)
        a, b = qa.clone().requires_grad_(True), qb.clone().requires_grad_(True)
        acc = lut_bmm(a, b, tabs, keep=keep)
        (acc * r).sum().backward()
        return exact_acc.cpu(), acc.detach().cpu(), a.grad.cpu(), b.grad.cpu()

    want = run(qa, qb, keep, tabs, r)
    got = run(dev(qa), dev(qb), None if keep is None else dev(keep), tabs_d, dev(r))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    p = make_lut(name).product
    k = np.ones((3, 5, 9), bool) if keep is None else keep.numpy()
    ca, cb = codes(qa.numpy(), 8), codes(qb.numpy(), 8)
    ref = np.einsum("bmk,bmkn->bmn", k, p[ca[:, :, :, None], cb[:, None, :, :]])
    assert np.array_equal(got[0].numpy().astype(np.int64), ref)
    for g, w in zip(got[2:], want[2:]):
        assert_grad_close(g, w)


@pytest.mark.parametrize("grad", ["ste", "lut2d"])
@pytest.mark.parametrize("name,kernel", [("trunc8u", "auto"), ("trunc8u", "lowrank"), ("trunc8u", "gather"),
                                         ("mitchell8s", "auto")])
def test_approx_matmul_matches_cpu(name, kernel, grad, device_gather):
    lut = make_lut(name, gradients=True)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 6, 12, generator=gen)
    b = torch.randn(1, 12, 7, generator=gen) + 0.2  # broadcast batch
    r = torch.randn(2, 6, 7, generator=gen)

    def run(a, b, r):
        ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = approx_matmul(ag, bg, lut, grad=grad, kernel=kernel)
        (y * r).sum().backward()
        ye = approx_matmul(a, b, lut, grad=grad, kernel=kernel, exact=True)
        return y.detach().cpu(), ye.cpu(), ag.grad.cpu(), bg.grad.cpu()

    want = run(a, b, r)
    got = run(dev(a), dev(b), dev(r))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):
        assert_grad_close(g, w)


@pytest.mark.parametrize("name,kernel", [("trunc8u", "auto"), ("trunc8u", "gather"), ("mitchell8s", "auto")])
def test_multihead_attention_matches_cpu(name, kernel):
    """Projections and QK^T bit for bit; AV from the CPU's operands bit for bit (the softmax
    before it may differ in the last bit between devices, so the probabilities' codes may
    too); the outputs close."""
    torch.manual_seed(2)
    cfg = ApproxConfig(make_lut(name), kernel=kernel)
    mha = ApproxMultiheadAttention(16, 2, batch_first=True, config=cfg).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)  # True: not allowed
    with torch.no_grad():
        mha(q, kv, kv, attn_mask=causal)  # calibrates the projections' observers
    for proj in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj):
        proj.act_quant.observing = False
    mha_d = on_device(mha)
    with torch.no_grad():
        want, want_w = mha(q, kv, kv, attn_mask=causal)
        got, got_w = mha_d(dev(q), dev(kv), dev(kv), attn_mask=dev(causal))
    ops = mha.operands(q, kv, kv, attn_mask=causal)
    ops_d = mha_d.operands(dev(q), dev(kv), dev(kv), attn_mask=dev(causal))
    for field in ("q", "scale_q", "zero_q", "k", "scale_k", "zero_k", "v", "scale_v", "zero_v", "keep"):
        assert torch.equal(getattr(ops_d, field).cpu(), getattr(ops, field)), field
    assert torch.equal(mha_d.attention.int_scores(ops_d).cpu(), mha.attention.int_scores(ops))
    moved = type(ops)(**{f: None if getattr(ops, f) is None else dev(getattr(ops, f))
                         for f in ops.__dataclass_fields__})
    assert torch.equal(mha_d.attention.int_context(moved).cpu(), mha.attention.int_context(ops))
    assert (ops_d.p.cpu() == ops.p).float().mean() > 0.95
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


# -- 4. autocast on the device ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,name", [("conv", "trunc8u"), ("conv", "mitchell8s"), ("linear", "trunc8u"),
                                       ("linear", "random8u")])
def test_autocast_changes_nothing_on_the_device(kind, name, dtype):
    """The layers turn autocast off inside: under ``torch.autocast`` on the device the output
    (and the accumulators) are those without it -- and the CPU's; gradients too. (CPU
    autocast behaves the same, so ``APPMULT_TEST_DEVICE=cpu`` runs this as well.)"""
    if kind == "conv":
        layer, x = conv_layer(name, "auto", "pad1")
    else:
        layer, x = linear_layer(name, "auto")
    with torch.no_grad():
        want = layer(x)
    layer_d, xd = on_device(layer), dev(x)
    with torch.no_grad():
        plain = layer_d(xd)
    plain_acc = layer_d.int_forward(xd)
    layer_d.train()
    layer_d(xd).square().sum().backward()
    plain_grad = layer_d.weight.grad.clone()
    layer_d.weight.grad = None
    layer_d.eval()
    with torch.autocast(torch.device(DEV).type, dtype=dtype):
        with torch.no_grad():
            y = layer_d(xd)
        acc = layer_d.int_forward(xd)
        layer_d.train()
        layer_d(xd).square().sum().backward()
    assert y.dtype == torch.float32
    assert torch.equal(y, plain) and torch.equal(y.cpu(), want)
    assert torch.equal(acc, plain_acc)
    torch.testing.assert_close(layer_d.weight.grad, plain_grad, rtol=1e-5, atol=1e-5 * float(plain_grad.abs().max()))


# -- 5. a small model trained for three steps ---------------------------------------------------

@pytest.mark.parametrize("name,grad", [("trunc8u", "ste"), ("trunc8u", "lut2d"), ("mitchell8s", "lut1d")])
def test_three_sgd_steps_match_cpu(name, grad):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model = approximate_(model, ApproxConfig(make_lut(name), grad=grad, compute_missing_gradients=True))
    assert [type(m) for m in model if not isinstance(m, (nn.ReLU, nn.Flatten))] == \
        [ApproxConv2d, ApproxConv2d, ApproxLinear]
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    start = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model_d = on_device(model)

    def train(m, x, target):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    want = train(model, x, target)
    got = train(model_d, dev(x), dev(target))
    assert all(np.isfinite(want)) and all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    sd_d = model_d.state_dict()
    moved = 0
    for key, w in model.state_dict().items():
        if not isinstance(w, torch.Tensor):
            continue
        assert sd_d[key].device.type == torch.device(DEV).type, key
        if w.is_floating_point():
            torch.testing.assert_close(sd_d[key].cpu(), w, rtol=1e-4, atol=1e-5)
            moved += not torch.equal(w, start[key])
        else:
            assert torch.equal(sd_d[key].cpu(), w), key
    assert moved >= 6  # every weight and bias trained (and the observers moved)


# -- 6. bad input: the CPU's error on the device ------------------------------------------------

def _same_error(cpu_call, dev_call, expected: type[Exception], pattern: str) -> None:
    """``cpu_call()`` raises ``expected`` matching ``pattern``, and ``dev_call()`` (the same
    call on the device) raises the very same error: class and message."""
    with pytest.raises(expected, match=pattern) as cpu_err:
        cpu_call()
    with pytest.raises(type(cpu_err.value), match=exact_message(str(cpu_err.value))):
        dev_call()


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", ["trunc8u", "mitchell8s"])
def test_non_finite_input_and_weight_refused_on_the_device(kind, name):
    layer, x = conv_layer(name, "auto", "pad1") if kind == "conv" else linear_layer(name, "auto")
    layer_d = on_device(layer)
    bad = x.clone()
    bad.view(-1)[5] = float("nan")
    cls = type(layer).__name__
    message = exact_message(f"{cls} input contains NaN or Inf; approximate layers quantize their inputs and "
                            f"cannot represent non-finite values")
    ranges = (layer.act_quant.min_val.clone(), layer.act_quant.max_val.clone())
    for observing in (False, True):  # the quantizing pass finds it, or the observer's min/max
        for m in (layer, layer_d):
            m.train(observing)
            m.act_quant.observing = observing
        _same_error(lambda: layer(bad), lambda: layer_d(dev(bad)), InvalidValueError, message)
        _same_error(lambda: layer.int_forward(bad), lambda: layer_d.int_forward(dev(bad)), InvalidValueError,
                    message)
    for m in (layer, layer_d):  # no range changed
        assert torch.equal(m.act_quant.min_val.cpu(), ranges[0]) and torch.equal(m.act_quant.max_val.cpu(), ranges[1])
    with torch.no_grad():
        for m in (layer, layer_d):
            m.weight[1].view(-1)[2] = float("inf")
    wmessage = exact_message(f"{cls} weight contains NaN or Inf; approximate layers quantize their weights and "
                             f"cannot represent non-finite values")
    for training in (True, False):
        layer.train(training)
        layer_d.train(training)
        _same_error(lambda: layer(x), lambda: layer_d(dev(x)), InvalidValueError, wmessage)
    with torch.no_grad():
        _same_error(lambda: layer(x), lambda: layer_d(dev(x)), InvalidValueError, wmessage)
    _same_error(lambda: layer.int_forward(x), lambda: layer_d.int_forward(dev(x)), InvalidValueError, wmessage)


@pytest.mark.parametrize("bad", [256.0, -1.0, float("nan")])
@pytest.mark.parametrize("name", ["trunc8u", "random8u"])
def test_codes_outside_the_lut_refused_on_the_device(name, bad):
    tabs = LutTables(make_lut(name))
    tabs_d = copy.deepcopy(tabs).to(DEV)
    torch.manual_seed(1)
    qx, qw = torch.randint(0, 256, (3, 9)).float(), torch.randint(0, 256, (4, 9)).float()
    qx[1, 2] = bad
    message = exact_message(f"lut_linear: quantized activations must be integers in [0, 255] (the LUT's operand "
                            f"range), got values in [{qx.min().item():g}, {qx.max().item():g}]")
    for t in (tabs, tabs_d):
        args = [qx.to(t.prod.device), qw.to(t.prod.device), t]
        with pytest.raises(InvalidValueError, match=message):
            lut_linear(*args)
        with pytest.raises(InvalidValueError, match=message):
            lut_linear(*args, exact=True)
    one = torch.ones(())
    for t in (tabs, tabs_d):
        d = t.prod.device
        with pytest.raises(InvalidValueError, match="^approx_linear: quantized activations must be integers"):
            approx_linear(qx.to(d), one.to(d), 0 * one.to(d), qw.to(d), one.to(d), 0 * one.to(d), None, t)
        cx = torch.randint(0, 256, (1, 2, 5, 5)).float().to(d)
        cw = torch.randint(0, 256, (3, 2, 3, 3)).float().to(d)
        cw.view(-1)[4] = bad
        with pytest.raises(InvalidValueError, match="^lut_conv2d: quantized weights must be integers"):
            lut_conv2d(cx, cw, t)
        with pytest.raises(InvalidValueError, match="^approx_conv2d: quantized weights must be integers"):
            approx_conv2d(cx, one.to(d), 0 * one.to(d), cw, one.to(d), 0 * one.to(d), None, t, padding=1)
        with pytest.raises(InvalidValueError, match="^lut_bmm: quantized activations must be integers"):
            lut_bmm(qx.to(d)[None], qw.to(d).t()[None], t)


@pytest.mark.parametrize("entry", ["forward", "grad_a", "grad_b"])
@pytest.mark.parametrize("value", [64, -1])
def test_gather_kernels_refuse_indices_outside_the_table_on_the_device(entry, value):
    """The device runs the torch gather (no numba): its bounds check must hold there too
    (a flat index ``a * ncols + b`` out of one operand's range could land inside the table)."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(-50, 50, (64, 64), generator=gen).to(torch.int32)
    a = torch.randint(0, 64, (2, 10, 8), generator=gen)
    b = torch.randint(0, 64, (6, 5), generator=gen)
    b[3, 1] = value
    grad = torch.rand(2, 6, 8, generator=gen)

    def call(a, b, table, grad):
        if entry == "forward":
            return K.gather_forward(a, b, table, 2, torch.int32)
        if entry == "grad_a":
            return K.gather_grad_a(a, b, table.float(), grad, 2)
        return K.gather_grad_b(a, b, table.float(), grad, 2)

    _same_error(lambda: call(a, b, table, grad), lambda: call(dev(a), dev(b), dev(table), dev(grad)), IndexError,
                "^Weight indices outside the table's 64 columns")


def test_approx_matmul_refuses_nan_on_the_device():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    a[0, 1] = float("nan")
    message = exact_message("approx_matmul input contains NaN or Inf; approximate layers quantize their inputs and "
                            "cannot represent non-finite values")
    lut = make_lut("trunc8u")
    _same_error(lambda: approx_matmul(a, b, lut), lambda: approx_matmul(dev(a), dev(b), lut), InvalidValueError,
                message)
