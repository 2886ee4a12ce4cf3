"""The automatic kernel choice (timed probe), the linear weight-row gather, and the pure-torch
fallbacks that CUDA runs, forced on the CPU so CI covers their logic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear, LutTables, lut_linear
from appmult.nn import functional as FN
from appmult.nn import kernels as K
from test_nn_forward import brute_linear, make_lut, quantized
from test_nn_luts import exact, mitchell_like, truncated


@pytest.fixture(autouse=True)
def _fresh_probe_cache(monkeypatch):
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "1")  # on, also under `make mutate` (conftest turns it off)
    K.clear_probe_cache()
    yield
    K.clear_probe_cache()


def _layer(lut, kind="linear", kernel="auto", **cfg):
    torch.manual_seed(0)
    if kind == "linear":
        layer = ApproxLinear(24, 6, config=ApproxConfig(lut, kernel=kernel, **cfg))
        x = torch.rand(5, 24)
    else:
        layer = ApproxConv2d(3, 4, 3, padding=1, config=ApproxConfig(lut, kernel=kernel, **cfg))
        x = torch.rand(2, 3, 6, 6)
    layer.eval()
    layer(x)
    return layer, x


# -- the probe ------------------------------------------------------------------------------

def test_probe_times_once_per_key_and_caches():
    calls = {"a": 0, "b": 0}

    def cand(name, delay):
        def run():
            calls[name] += 1
            t = torch.zeros(1)
            for _ in range(delay):
                t = t + 1
        return run

    choice = K.probe_choice(("k", 1), {"a": cand("a", 2000), "b": cand("b", 1)}, torch.device("cpu"))
    assert choice == "b"
    ran = calls["a"]
    assert calls["a"] == calls["b"] and 1 + K.PROBE_ROUNDS <= ran <= 1 + K.PROBE_MAX_ROUNDS
    assert K.probe_choice(("k", 1), {"a": cand("a", 1), "b": cand("b", 1)}, torch.device("cpu")) == "b"
    assert calls["a"] == ran  # cached: nothing ran again
    assert K.probe_choices() == {("k", 1): "b"}


def test_probe_runs_more_rounds_only_for_close_candidates(monkeypatch):
    import itertools
    import types
    ticks = itertools.count()
    monkeypatch.setattr(K, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))  # every run: 1
    calls = {"a": 0, "b": 0}

    def cand(name):
        def run():
            calls[name] += 1
        return run

    K.probe_choice(("close",), {"a": cand("a"), "b": cand("b")}, torch.device("cpu"))
    assert calls["a"] == 1 + K.PROBE_MAX_ROUNDS  # equal costs: every round runs


def test_probe_single_candidate_runs_nothing_and_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(K, "PROBE_CACHE_MAX", 3)
    ran = []
    for i in range(5):
        assert K.probe_choice(("only", i), {"gather": lambda: ran.append(1)}, torch.device("cpu")) == "gather"
    assert not ran
    assert list(K.probe_choices()) == [("only", 2), ("only", 3), ("only", 4)]


def test_forced_kernel_is_scoped_and_restored():
    tabs = LutTables(make_lut("trunc8u"))
    guess = K.choose_kernel(tabs.rank)  # (which one depends on the CPU: see test_rank_guess_*)
    other = "gather" if guess == "lowrank" else "lowrank"
    assert tabs.auto_candidates == (guess, other)
    assert tabs.kernel.value == guess
    with K.forced_kernel(tabs, other):
        assert tabs.kernel.value == other
        with K.forced_kernel(tabs, guess):
            assert tabs.kernel.value == guess
        assert tabs.kernel.value == other
    assert tabs.kernel.value == guess
    assert K.forced(tabs) is None


def test_only_factorable_auto_luts_have_candidates():
    assert LutTables(make_lut("mitchell8s")).auto_candidates == ()
    assert LutTables(make_lut("trunc8u"), kernel="gather").auto_candidates == ()
    assert LutTables(make_lut("exact8u")).auto_candidates == ("lowrank", "gather")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name", ["exact8u", "trunc8u", "trunc6s", "exact6s"])
def test_auto_layer_probes_once_and_matches_every_forced_kernel(kind, name):
    lut = make_lut(name)
    auto, x = _layer(lut, kind)
    assert len(K.probe_choices()) == 1  # the calibration call probed
    (key, choice), = K.probe_choices().items()
    assert choice in ("lowrank", "gather") and lut.sha256 in key
    auto(x)
    assert len(K.probe_choices()) == 1  # same shape: cached
    outs = {"auto": auto.int_forward(x)}
    for kern in ("lowrank", "gather"):
        layer, _ = _layer(lut, kind, kern)
        outs[kern] = layer.int_forward(x)
    assert torch.equal(outs["auto"], outs["lowrank"]) and torch.equal(outs["auto"], outs["gather"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_probe_times_inference_with_the_weight_side_cached(kind, monkeypatch):
    """A forward whose weight can train (no weight-side cache) and an inference forward
    (cached: e.g. the int8 GEMM of the linear layer) run different code, so each is probed
    under its own key, and the inference probe runs with the cache present."""
    lut = make_lut("trunc8u")
    layer, x = _layer(lut, kind)               # calibration with a gradient-carrying weight
    assert [k[-7] for k in K.probe_choices()] == [False]
    cached_in_probe = []
    real = FN._approx_linear if kind == "linear" else FN._approx_conv2d

    def spy(*args, **kwargs):
        cached_in_probe.append(kwargs.get("cache") is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(FN, "_approx_linear" if kind == "linear" else "_approx_conv2d", spy)
    with torch.no_grad():
        layer(x)
    assert sorted(k[-7] for k in K.probe_choices()) == [False, True]
    assert cached_in_probe and all(cached_in_probe)
    with torch.no_grad():
        layer(x)
    assert len(K.probe_choices()) == 2


@pytest.mark.parametrize("shuffles", [True, False])
def test_probe_off_uses_the_rank_guess(monkeypatch, shuffles):
    """Rank 5 (``trunc8u``): the gather where it runs by byte shuffles, else low-rank; rank 1
    (``exact8u``): low-rank either way."""
    monkeypatch.setenv("APPMULT_KERNEL_PROBE", "0")
    monkeypatch.setattr(K.byte_shuffle, "available", lambda: shuffles)
    layer, x = _layer(make_lut("trunc8u"))
    assert not K.probe_choices()
    assert layer.lut.rank == 5 and layer.lut.kernel.value == ("gather" if shuffles else "lowrank")
    layer, x = _layer(make_lut("exact8u"))
    assert layer.lut.kernel.value == "lowrank"


def test_rank_guess_follows_the_tables_device(monkeypatch):
    """The guess is made for the tables' device: a byte-shuffle CPU takes the gather for rank
    5, any other device the low-rank kernel (the meta device stands in for CUDA here); a
    kernel set by hand stays."""
    monkeypatch.setattr(K.byte_shuffle, "available", lambda: True)
    tabs = LutTables(make_lut("trunc8u"))
    assert tabs.kernel.value == "gather"
    tabs.to("meta")
    assert tabs.kernel.value == "lowrank"
    tabs.kernel = "gather"
    assert tabs.kernel.value == "gather"
    tabs = LutTables(make_lut("trunc8u"), kernel="gather").to("meta")
    assert tabs.kernel.value == "gather"


def test_auto_follows_the_probe_choice(monkeypatch):
    """Whatever the probe picks is the kernel the layer then runs."""
    seen = []
    real = FN._approx_linear

    def spy(*args, **kwargs):
        seen.append(args[7].kernel.value)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "probe_choice", lambda key, cands, device: "gather")
    monkeypatch.setattr(FN, "_approx_linear", spy)
    layer, x = _layer(make_lut("trunc8u"))
    seen.clear()
    with torch.no_grad():
        layer(x)
    assert seen[-1] == "gather"


def test_raw_functional_api_probes_too():
    tabs = LutTables(make_lut("trunc8u"))
    qx = torch.randint(0, 256, (4, 10)).float()
    qw = torch.randint(0, 256, (3, 10)).float()
    acc = lut_linear(qx, qw, tabs, exact=True)
    assert len(K.probe_choices()) == 1
    assert np.array_equal(acc.long().numpy(), brute_linear(truncated(8, 4), 8, qx.long().numpy(), qw.long().numpy()))


# -- the linear weight-row gather (fused cross terms, 16-bit table) --------------------------

@pytest.mark.parametrize("name", ["mitchell8s", "random6u", "exact8u", "trunc8u"])
@pytest.mark.parametrize("scheme", ["per_tensor", "per_channel"])
def test_gather_linear_fused_matches_unfused(name, scheme, monkeypatch):
    lut = make_lut(name)
    layer, x = _layer(lut, kernel="gather", weight_scheme=scheme)
    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(FN, "_FUSED_GATHER", fused)
        with torch.no_grad():
            outs[fused] = layer(x)
        outs[(fused, "int")] = layer.int_forward(x)
    assert torch.equal(outs[True], outs[False])
    assert torch.equal(outs[(True, "int")], outs[(False, "int")])
    qx, _, qw = quantized(layer, x)
    p, w = (lut.product, lut.width_a)
    assert np.array_equal(outs[(True, "int")].long().numpy(), brute_linear(p, w, qx, qw))


def test_gather_linear_prep_refuses_wide_tables_and_overflow():
    rng = np.random.default_rng(3)
    b = torch.from_numpy(rng.integers(0, 256, (4, 16)))
    wide = torch.from_numpy(rng.integers(-40000, 40000, (256, 256))).to(torch.int32)  # range >= 2**16
    assert K.gather_linear_prep(b, 0, wide, 0, 0, None) is None
    narrow = torch.from_numpy(rng.integers(0, 60000, (256, 256))).to(torch.int32)
    big_k = torch.from_numpy(rng.integers(0, 256, (2, 40000)))
    assert K.gather_linear_prep(big_k, 0, narrow, 0, 0, None) is None  # K * 60000 >= 2**31
    if K.numba_available():
        assert K.gather_linear_prep(b, 0, narrow, 0, 0, None) is not None


def test_gather_forward_16bit_table_with_negative_entries_is_exact():
    """The uint16 offset table (entries shifted by their minimum) in the few-positions kernel."""
    rng = np.random.default_rng(5)
    table = torch.from_numpy(rng.integers(-30000, 30000, (256, 256))).to(torch.int32)
    a = torch.from_numpy(rng.integers(0, 256, (1, 40, 9))).to(torch.uint8)
    b = torch.from_numpy(rng.integers(0, 256, (7, 40))).to(torch.uint8)
    ref = table.numpy().astype(np.int64)[a[0].long().numpy()[:, None, :], b.long().numpy().T[:, :, None]].sum(0)
    got = K.gather_forward(a, b, table, 1, torch.int32)
    assert np.array_equal(got[0].numpy(), ref)
    got64 = K.gather_forward(a, b, table.to(torch.int64), 1, torch.int64)
    assert np.array_equal(got64[0].numpy(), ref)


def test_most_negative_code_through_the_fused_linear_gather():
    p = mitchell_like(8, True)
    p[0, 0] = 12345  # -128 x -128 (value order index 0, 0)
    lut = LutFile(p, width_a=8, width_b=8, signed=True)
    layer = ApproxLinear(1, 1, bias=False, config=ApproxConfig(lut, kernel="gather")).eval()
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    x = torch.tensor([[-1.0], [1.0]])
    layer(x)
    acc = layer.int_forward(x)
    assert acc[1, 0].item() == p[127, 128]
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()


# -- the pure-torch fallbacks (what CUDA runs), forced on the CPU ---------------------------

def test_torch_gather_gradients_match_numba(monkeypatch):
    rng = np.random.default_rng(7)
    gt = torch.from_numpy(rng.standard_normal((64, 64)).astype(np.float32))
    for nbatch, length, groups in ((2, 30, 1), (1, 5, 2)):
        kg, ng = 6, 3
        a = torch.from_numpy(rng.integers(0, 64, (nbatch, groups * kg, length)))
        b = torch.from_numpy(rng.integers(0, 64, (groups * ng, kg)))
        g = torch.from_numpy(rng.standard_normal((nbatch, groups * ng, length)).astype(np.float32))
        ga, gb = K.gather_grad_a(a, b, gt, g, groups), K.gather_grad_b(a, b, gt, g, groups)
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
        ga_t, gb_t = K.gather_grad_a(a, b, gt, g, groups), K.gather_grad_b(a, b, gt, g, groups)
        monkeypatch.delenv("APPMULT_NO_NUMBA")
        torch.testing.assert_close(ga_t, ga, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gb_t, gb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name,kernel", [("mitchell8s", "gather"), ("random6u", "gather"),
                                         ("trunc8u", "lowrank"), ("trunc8u", "auto"), ("exact8u", "gather")])
@pytest.mark.parametrize("grad", ["ste", "lut2d"])
def test_layers_without_numba_match(kind, name, kernel, grad, monkeypatch):
    """The whole layer with APPMULT_NO_NUMBA (the CUDA code path: torch gathers, no fused numba
    kernels) gives the same integer accumulators, outputs and gradients on the CPU."""
    lut = make_lut(name)
    res = {}
    for no_numba in (False, True):
        if no_numba:
            monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
        layer, x = _layer(lut, kind, kernel, grad=grad, compute_missing_gradients=True)
        acc = layer.int_forward(x)
        layer.train()
        xg = x.clone().requires_grad_(True)
        layer.act_quant.observing = False
        y = layer(xg)
        y.square().sum().backward()
        res[no_numba] = (acc, y.detach(), xg.grad, layer.weight.grad)
        monkeypatch.delenv("APPMULT_NO_NUMBA", raising=False)
    assert torch.equal(res[True][0], res[False][0])
    assert torch.equal(res[True][1], res[False][1])
    torch.testing.assert_close(res[True][2], res[False][2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[True][3], res[False][3], rtol=1e-5, atol=1e-5)


def test_exact_lut_rank1_probe_candidates_are_exact():
    """A rank-1 LUT (the exact product) through auto: the chosen kernel reproduces x*w."""
    p = exact(8, False)
    lut = LutFile(p, width_a=8, width_b=8, signed=False)
    layer, x = _layer(lut)
    qx, _, qw = quantized(layer, x)
    assert np.array_equal(layer.int_forward(x).long().numpy(), qx @ qw.T)


def test_cuda_context_turns_tf32_off_and_restores_it():
    """TF32 would round low-rank factors above 2**11 in CUDA convolutions; the layers' compute
    context turns it off (the flags are plain switches, so this runs without a GPU)."""
    from appmult.nn.autograd import _autocast_off
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    prev = (cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        with _autocast_off("cuda"):
            assert not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = prev


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name,kernel", [("trunc8u", "lowrank"), ("trunc8u", "gather"), ("mitchell8s", "auto")])
def test_cuda_matches_cpu(kind, name, kernel):
    layer, x = _layer(make_lut(name), kind, kernel)
    acc = layer.int_forward(x)
    with torch.no_grad():
        y = layer(x)
    layer.cuda()
    assert torch.equal(layer.int_forward(x.cuda()).cpu(), acc)
    with torch.no_grad():
        assert torch.equal(layer(x.cuda()).cpu(), y)
