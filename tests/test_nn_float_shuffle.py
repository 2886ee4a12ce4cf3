"""The LUT-2D gradient gathers by byte shuffles (:mod:`appmult.nn.float_shuffle`).

References: a float64 numpy brute-force sum of ``grad * T[b, a]`` and the scalar numba loops
of :mod:`appmult.nn.gather_loops` (``grad_a`` bit for bit: same products, same order of
adds per position; ``grad_b`` to float rounding: it sums in another order). The kernel's own
edges: index bit 7 (entries 127/128), positions not a multiple of 64 (the padded tail
block), fewer than 64 positions, groups, tables smaller than 256 x 256, special float
entries (signed zeros, subnormals, the largest finite), tasks of 1 .. many batch items.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from appmult.nn import float_shuffle as FS
from appmult.nn import gather_loops as GL
from appmult.nn import kernels as K
from appmult.nn import offset_tables as OT
from conftest import exact as msg

# the host's ability, not the module's: a module that fails to compile on a VBMI host must fail
# these tests, not skip them
needs_vbmi = pytest.mark.skipif(not FS.byte_shuffle.available(), reason="needs numba and an AVX-512 VBMI CPU")


@needs_vbmi
def test_the_module_compiles_wherever_the_host_can_run_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FS.available()
    engine, addrs = FS._compiled()
    assert addrs.shape == (2,) and addrs.dtype == np.int64 and (addrs != 0).all()

SHAPES = [  # (N, G*Kg, L, G*Ng, G, na, nb)
    (2, 6, 64, 4, 1, 256, 256), (3, 8, 100, 6, 2, 256, 256), (1, 5, 7, 3, 1, 256, 256), (4, 12, 130, 8, 4, 64, 200),
    (1, 20, 128, 33, 1, 256, 256), (5, 3, 192, 2, 1, 16, 256),
]


def case(rng, n, ktot, length, nout, groups, na, nb):
    a = rng.integers(0, na, (n, ktot, length)).astype(np.uint8)
    a.reshape(-1)[:4] = [0, 127, 128, na - 1][:4] if na > 128 else a.reshape(-1)[:4]
    b = rng.integers(0, nb, (nout, ktot // groups)).astype(np.uint8)
    table = rng.standard_normal((na, nb)).astype(np.float32)   # indexed [x, w], as gx2/gw2
    grad = rng.standard_normal((n, nout, length)).astype(np.float32)
    return a, b, table, grad


def brute(a, b, table, grad, groups):
    """float64 ``out_a[n, g*Kg+k, i] = sum_j grad[n,j,i] T[a, b[j,k]]``, ``out_b[j,k] = sum_{n,i} ...``."""
    n, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    t = table.astype(np.float64)
    out_a = np.zeros((n, ktot, length))
    out_b = np.zeros((nout, kg))
    for j in range(nout):
        g = j // ng
        for k in range(kg):
            vals = t[a[:, g * kg + k, :], b[j, k]]        # (n, L)
            prod = grad[:, j, :].astype(np.float64) * vals
            out_a[:, g * kg + k, :] += prod
            out_b[j, k] = prod.sum()
    return out_a, out_b


@needs_vbmi
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [0, 1, 3])
def test_grad_a_is_the_scalar_loop_bit_for_bit_and_brute_force(shape, rows):
    rng = np.random.default_rng(sum(shape) + rows)
    n, ktot, length, nout, groups, na, nb = shape
    a, b, table, grad = case(rng, *shape)
    table_t = np.ascontiguousarray(table.T)
    got = FS.grad_a(a, b, FS.planes(table_t), grad, groups, rows)
    scalar = np.zeros(a.shape, np.float32)
    GL.grad_a(a, b, table_t, grad, groups, K._chunk(n, length), scalar)
    assert np.array_equal(got.view(np.int32), scalar.view(np.int32))
    np.testing.assert_allclose(got, brute(a, b, table, grad, groups)[0], rtol=1e-5, atol=1e-5)


@needs_vbmi
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_b_equals_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    a, b, table, grad = case(rng, *shape)
    groups = shape[4]
    table_t = np.ascontiguousarray(table.T)
    got = FS.grad_b(a, b, FS.planes(table_t), grad, groups)
    want = brute(a, b, table, grad, groups)[1]
    assert got.dtype == np.float32 and got.shape == b.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
    scalar = np.zeros(b.shape, np.float32)
    GL.grad_b(a, b, table_t, grad, groups, scalar)
    np.testing.assert_allclose(got, scalar, rtol=2e-6, atol=1e-5)


@needs_vbmi
def test_look_ups_return_the_tables_bits():
    """One output channel, gradient 1: each output is ``0.0 + 1 * entry`` -- the entry itself
    (but -0.0, which the add makes +0.0), so every byte of every entry must come back in
    place (subnormals, extremes, no flush to zero)."""
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1.0, -2.5],
                        np.float32)
    table = np.zeros((256, 3), np.float32)
    table[:, 0] = np.resize(specials, 256)
    table[:, 1] = np.arange(256, dtype=np.float32) * -1.5
    table[:, 2] = np.random.default_rng(1).standard_normal(256).astype(np.float32)
    pl = FS.planes(np.ascontiguousarray(table.T))
    a = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
    for w in range(3):
        b = np.array([[w]], np.uint8)
        got = FS.grad_a(a, b, pl, np.ones((1, 1, 256), np.float32), 1)
        want = np.float32(0.0) + table[:, w]
        assert np.array_equal(got.reshape(-1).view(np.int32), want.view(np.int32)), w


def test_planes_split_each_entry_into_four_bytes_and_pad():
    t = np.random.default_rng(2).standard_normal((3, 70)).astype(np.float32)
    pl = FS.planes(t)
    assert pl.shape == (3, 1024) and pl.dtype == np.uint8
    back = pl.reshape(3, 4, 256).transpose(0, 2, 1).copy().view(np.float32)[:, :, 0]
    assert np.array_equal(back[:, :70].view(np.int32), t.view(np.int32))
    assert not back[:, 70:].any()
    with pytest.raises(ValueError, match="float32 table of at most 256 columns"):
        FS.planes(np.zeros((2, 257), np.float32))
    with pytest.raises(ValueError, match="float32 table"):
        FS.planes(np.zeros((2, 4), np.float64))


@pytest.mark.parametrize("bad", ["a dtype", "grad dtype", "groups", "grad shape", "planes", "not contiguous",
                                 "planes dtype", "outputs per group", "no groups"])
def test_wrong_operands_are_refused(bad):
    a = np.zeros((2, 4, 64), np.uint8)
    b = np.zeros((3, 4), np.uint8)
    pl = np.zeros((256, 1024), np.uint8)
    g = np.zeros((2, 3, 64), np.float32)
    groups = 1
    if bad == "a dtype":
        a = a.astype(np.int32)
    elif bad == "grad dtype":
        g = g.astype(np.float64)
    elif bad == "groups":
        groups = 2
    elif bad == "grad shape":
        g = np.zeros((2, 3, 65), np.float32)
    elif bad == "planes":
        pl = np.zeros((256, 512), np.uint8)
    elif bad == "planes dtype":
        pl = np.zeros((256, 1024), np.int8)
    elif bad == "outputs per group":   # 3 outputs in 2 groups, the reduction split right
        a, groups = np.zeros((2, 8, 64), np.uint8), 2
    elif bad == "no groups":
        groups = 0
    else:
        a = np.zeros((2, 64, 4), np.uint8).transpose(0, 2, 1)
    for fn in (FS.grad_a, FS.grad_b):
        with pytest.raises(ValueError):
            fn(a, b, pl, g, groups)


@needs_vbmi
def test_a_single_product_is_not_an_empty_one():
    """One item, one reduction step, one position, one output: the product itself."""
    table = np.random.default_rng(4).standard_normal((256, 256)).astype(np.float32)
    a, b = np.array([[[200]]], np.uint8), np.array([[17]], np.uint8)
    g = np.array([[[1.5]]], np.float32)
    pl = FS.planes(np.ascontiguousarray(table.T))
    want = np.float32(0.0) + g[0, 0, 0] * table[200, 17]
    assert FS.grad_a(a, b, pl, g, 1)[0, 0, 0] == want
    assert FS.grad_b(a, b, pl, g, 1)[0, 0] == np.float32(np.float64(g[0, 0, 0] * table[200, 17]))


@needs_vbmi
def test_empty_operands_give_zeros():
    pl = np.zeros((256, 1024), np.uint8)
    assert FS.grad_a(np.zeros((0, 4, 64), np.uint8), np.zeros((3, 4), np.uint8), pl,
                     np.zeros((0, 3, 64), np.float32), 1).shape == (0, 4, 64)
    out = FS.grad_b(np.zeros((0, 4, 64), np.uint8), np.zeros((3, 4), np.uint8), pl, np.zeros((0, 3, 64), np.float32), 1)
    assert out.shape == (3, 4) and out.dtype == np.float32 and not out.any()
    assert FS.grad_b(np.zeros((2, 4, 0), np.uint8), np.zeros((3, 4), np.uint8), pl,
                     np.zeros((2, 3, 0), np.float32), 1).shape == (3, 4)


@needs_vbmi
@pytest.mark.parametrize("groups, na", [(1, 256), (2, 64)])
def test_kernels_dispatch_by_size_and_switch(groups, na, monkeypatch):
    """``gather_grad_a``/``_b`` take the byte shuffles at or above the threshold (same bits for
    ``a``, float rounding for ``b``), the scalar loops below it and with the switch off."""
    rng = np.random.default_rng(3)
    a, b, table, grad = case(rng, 3, 4 * groups, 70, 2 * groups, groups, na, 256)
    at, bt, tt, gt = (torch.from_numpy(v) for v in (a.astype(np.int64), b.astype(np.int64), table, grad))
    calls = []
    for name in ("grad_a", "grad_b"):
        real = getattr(FS, name)
        monkeypatch.setattr(FS, name, lambda *args, _r=real, _n=name: calls.append(_n) or _r(*args))
    monkeypatch.setattr(K, "FLOAT_SHUFFLE_MIN_LOOKUPS", a.size * b.shape[0] // groups)
    fa, fb = K.gather_grad_a(at, bt, tt, gt, groups), K.gather_grad_b(at, bt, tt, gt, groups)
    assert calls == ["grad_a", "grad_b"]
    monkeypatch.setattr(K, "FLOAT_SHUFFLE_MIN_LOOKUPS", a.size * b.shape[0] // groups + 1)
    sa, sb = K.gather_grad_a(at, bt, tt, gt, groups), K.gather_grad_b(at, bt, tt, gt, groups)
    monkeypatch.setattr(K, "FLOAT_SHUFFLE_MIN_LOOKUPS", 0)
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    oa, ob = K.gather_grad_a(at, bt, tt, gt, groups), K.gather_grad_b(at, bt, tt, gt, groups)
    assert calls == ["grad_a", "grad_b"]
    assert torch.equal(fa, sa) and torch.equal(sa, oa)
    torch.testing.assert_close(fb, sb, rtol=2e-6, atol=1e-5)
    assert torch.equal(sb, ob)
    want_a, want_b = brute(a, b, table, grad, groups)
    np.testing.assert_allclose(fa.numpy(), want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fb.numpy(), want_b, rtol=2e-6, atol=1e-5)


def test_float_planes_are_cached_per_table_and_version():
    t = torch.randn(256, 256)
    p1 = OT.float_planes(t)
    assert OT.float_planes(t) is p1
    assert np.array_equal(p1, FS.planes(np.ascontiguousarray(t.t().numpy())))
    t[3, 5] = 7.0  # bumps the version: new planes with the new entry
    p2 = OT.float_planes(t)
    assert p2 is not p1
    assert p2.reshape(256, 4, 256).transpose(0, 2, 1).copy().view(np.float32)[5, 3, 0] == 7.0
    u = t.clone()
    assert OT.float_planes(u) is not p2


def test_a_module_that_does_not_compile_falls_back_with_one_warning(monkeypatch):
    if not FS.byte_shuffle.available():
        pytest.skip("needs numba and an AVX-512 VBMI CPU")

    def broken():
        raise RuntimeError("LLVM ERROR: bad")
    monkeypatch.setattr(FS, "_compiled", broken)
    FS._usable.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=msg("appmult: the byte-shuffle gradient gathers are unavailable "
                                                    "(RuntimeError: LLVM ERROR: bad); using the scalar loops")):
            assert not FS.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not FS.available()
        assert not K._float_shuffles(256, 256, 1 << 30)
    finally:
        FS._usable.cache_clear()


@needs_vbmi
@pytest.mark.parametrize("geom", [dict(padding=1), dict(padding=(0, 2), stride=2, groups=2)])
def test_lut2d_conv_training_step_gradients_do_not_depend_on_the_path(geom, monkeypatch):
    """A LUT-2D conv layer's input and weight gradients: byte shuffles vs scalar loops (to
    float rounding: with the switch off the forward may take another exact path, whose
    backward adds the zero-point terms in another order), and inside one backward the
    activation-side gather's columns bit for bit."""
    from appmult.lut_gen import LutFile
    from appmult.nn import ApproxConfig, ApproxConv2d
    from test_nn_luts import random_lut
    monkeypatch.setattr(K, "FLOAT_SHUFFLE_MIN_LOOKUPS", 0)
    lut = LutFile(random_lut(8, 5), width_a=8, width_b=8, signed=False)
    grads, same = {}, []
    real = K.gather_grad_a

    def both(a, b, t, g, groups):
        got = real(a, b, t, g, groups)
        with monkeypatch.context() as mp:
            mp.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
            same.append(torch.equal(got, real(a, b, t, g, groups)))
        return got
    monkeypatch.setattr(K, "gather_grad_a", both)
    for path in ("shuffle", "scalar"):
        if path == "scalar":
            monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
        torch.manual_seed(0)
        m = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, grad="lut2d", kernel="gather",
                                                      compute_missing_gradients=True), **geom)
        assert m.lut.grad_kernel.value == "gather"
        x = torch.relu(torch.randn(3, 4, 9, 9)).requires_grad_(True)
        m(x.detach())
        y = m(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads[path] = (x.grad.clone(), m.weight.grad.clone())
    assert same == [True, True]
    torch.testing.assert_close(grads["shuffle"][0], grads["scalar"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["shuffle"][1], grads["scalar"][1], rtol=1e-5, atol=1e-5)


@needs_vbmi
def test_a_fresh_compile_of_the_module_gives_the_same_sums():
    """The module is compiled once per process (``_compiled`` is an ``lru_cache``): under
    mutmut a mutant of the IR generators only acts where the module is compiled afresh.
    Here it is, then both loops run on a case that reaches every plane quarter (codes 0-255,
    so both halves of every plane), several batch items and position blocks, and a tail:
    ``grad_a`` against the scalar loop's bits, ``grad_b`` against brute force."""
    rng = np.random.default_rng(9)
    n, ktot, length, nout = 3, 4, 200, 5
    a = rng.integers(0, 256, (n, ktot, length)).astype(np.uint8)
    a[0, :, :256 if length >= 256 else length] = np.resize(np.arange(256, dtype=np.uint8), (ktot, length))
    b = rng.integers(0, 256, (nout, ktot)).astype(np.uint8)
    b[:, 0] = [0, 127, 128, 255, 64]
    table = rng.standard_normal((256, 256)).astype(np.float32)
    grad = rng.standard_normal((n, nout, length)).astype(np.float32)
    table_t = np.ascontiguousarray(table.T)
    FS._compiled.cache_clear()
    FS._usable.cache_clear()
    try:
        got_a = FS.grad_a(a, b, FS.planes(table_t), grad, 1)
        got_b = FS.grad_b(a, b, FS.planes(table_t), grad, 1)
    finally:
        FS._compiled.cache_clear()
        FS._usable.cache_clear()
    scalar = np.zeros(a.shape, np.float32)
    GL.grad_a(a, b, table_t, grad, 1, K._chunk(n, length), scalar)
    assert np.array_equal(got_a.view(np.int32), scalar.view(np.int32))
    np.testing.assert_allclose(got_b, brute(a, b, table, grad, 1)[1], rtol=2e-6, atol=1e-5)
