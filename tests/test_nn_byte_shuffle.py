"""The byte-shuffle gather (:mod:`appmult.nn.byte_shuffle`) against numpy brute-force sums.

The kernel's own edges: the 16-bit lanes flushed every 256 steps (K = 255, 256, 257, 513),
the index bit 7 that picks a plane half (indices 0, 127, 128, 255), table entries 0 and
65535 (both byte planes full), 1 .. 5 blocks per task (the loop handles up to 4), the
int32 wrap of the start values, offsets that read a layout in place; then the layers'
drivers in :mod:`appmult.nn.kernels` (conv in both layouts, stride, dilation, padding,
per-channel zero points; linear; the generic forward) against brute force and against the
scalar loops (``APPMULT_NO_BYTE_SHUFFLE=1``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from appmult.nn import byte_shuffle as BS
from appmult.nn import kernels as K
from conftest import exact as msg

pytestmark = pytest.mark.usefixtures("shuffle_always")

needs_vbmi = pytest.mark.skipif(not BS.available(), reason="needs numba and an AVX-512 VBMI CPU")


def wrap32(v: np.ndarray) -> np.ndarray:
    """int64 -> int32 modulo 2**32 (the kernel's arithmetic)."""
    return ((v.astype(np.int64) + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


def ref_at(src, koff, poff, b, t16, c0, c1, xs) -> np.ndarray:
    """``c0[j] + c1[j] xs[p] + sum_k t16[b[j, k], src[koff[k] + poff[p // 64] + p % 64]]`` in int64."""
    pos = (poff[:, None] + np.arange(64)[None, :]).reshape(-1)
    a = src[koff[:, None] + pos[None, :]]                               # (K, P)
    sums = t16.astype(np.int64)[b[:, :, None], a[None, :, :]].sum(1)   # (nout, P)
    return c0[:, None].astype(np.int64) + c1[:, None].astype(np.int64) * xs[None, :] + sums


def random_case(rng, kk, npos, nout):
    t16 = rng.integers(0, 1 << 16, size=(256, 256)).astype(np.uint16)
    t16[:, 255] = 0xFFFF
    t16[255, :] = 0xFFFF
    t16[0, 0] = 0
    a = rng.integers(0, 256, size=(kk, npos)).astype(np.uint8)
    if kk:
        a[0, :4] = [0, 127, 128, 255]
    b = rng.integers(0, 256, size=(nout, kk)).astype(np.uint8)
    if kk:
        b[0, 0] = 255
    c0 = rng.integers(-(1 << 31), 1 << 31, nout).astype(np.int32)
    c1 = rng.integers(-5, 6, nout).astype(np.int32)
    xs = rng.integers(-(1 << 20), 1 << 20, npos).astype(np.int32)
    return t16, a, b, c0, c1, xs


@needs_vbmi
@pytest.mark.parametrize("kk, blocks, nout", [
    (0, 1, 2), (1, 1, 1), (255, 2, 3), (256, 3, 5), (257, 5, 7), (513, 9, 4), (40, 4, 1), (3, 1, 33),
])
def test_accumulate_equals_brute_force(kk, blocks, nout):
    rng = np.random.default_rng(kk * 31 + blocks)
    t16, a, b, c0, c1, xs = random_case(rng, kk, 64 * blocks, nout)
    out = BS.accumulate(a, b, BS.planes(t16), c0, c1, xs)
    koff = np.arange(kk, dtype=np.int64) * a.shape[1]
    poff = np.arange(blocks, dtype=np.int64) * 64
    np.testing.assert_array_equal(out, wrap32(ref_at(a.reshape(-1), koff, poff, b, t16, c0, c1, xs)))


@needs_vbmi
def test_full_table_entries_over_flush_boundaries_do_not_wrap_the_lanes():
    """Every look-up 0xFFFF for 513 steps: each 16-bit lane holds 256 * 255 before it flushes."""
    kk, nout = 513, 2
    t16 = np.full((256, 256), 0xFFFF, np.uint16)
    a = np.full((kk, 128), 255, np.uint8)
    b = np.full((nout, kk), 255, np.uint8)
    z = np.zeros(nout, np.int32)
    out = BS.accumulate(a, b, BS.planes(t16), z, z, np.zeros(128, np.int32))
    assert (out == kk * 0xFFFF).all()


@needs_vbmi
def test_accumulate_at_reads_blocks_at_any_offsets():
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 5000).astype(np.uint8)
    koff = rng.integers(0, 2000, 37).astype(np.int64)
    poff = rng.integers(0, 2900, 6).astype(np.int64)
    t16, _, b, c0, c1, _ = random_case(rng, 37, 64, 9)
    xs = rng.integers(-1000, 1000, 6 * 64).astype(np.int32)
    out = BS.accumulate_at(src, koff, poff, b, BS.planes(t16), c0, c1, xs)
    np.testing.assert_array_equal(out, wrap32(ref_at(src, koff, poff, b, t16, c0, c1, xs)))


@needs_vbmi
def test_field_sums_equal_the_sum_of_values():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, size=(300, 192)).astype(np.uint8)
    koff = np.arange(300, dtype=np.int64) * 192
    poff = np.arange(3, dtype=np.int64) * 64
    got = BS.field_sums(a.reshape(-1), koff, poff, -128)
    np.testing.assert_array_equal(got, a.astype(np.int64).sum(0) - 300 * 128)


def test_offsets_outside_the_source_are_refused_before_any_read():
    src = np.zeros(1000, np.uint8)
    z = np.zeros(1, np.int32)
    b = np.zeros((1, 2), np.uint8)
    planes = BS.planes(np.zeros((256, 256), np.uint16))
    with pytest.raises(ValueError, match=msg("byte-shuffle gather: offsets reach bytes 100 .. 1000 of a "
                                             "1000-byte source")):
        BS.accumulate_at(src, np.array([0, 837], np.int64), np.array([100], np.int64), b, planes, z, z,
                         np.zeros(64, np.int32))
    ok = BS.accumulate_at if BS.available() else None  # the last byte itself is inside
    if ok is not None:
        ok(src, np.array([0, 836], np.int64), np.array([100], np.int64), b, planes, z, z, np.zeros(64, np.int32))
    with pytest.raises(ValueError, match="offsets reach bytes -1 .. "):
        BS.accumulate_at(src, np.array([0, 5], np.int64), np.array([-1], np.int64), b, planes, z, z,
                         np.zeros(64, np.int32))


@pytest.mark.parametrize("bad", ["a dtype", "a not 64", "xs length", "b shape", "c0 dtype", "a 1-D"])
def test_wrong_operands_are_refused(bad):
    a = np.zeros((3, 128), np.uint8)
    b = np.zeros((2, 3), np.uint8)
    c0 = np.zeros(2, np.int32)
    xs = np.zeros(128, np.int32)
    planes = BS.planes(np.zeros((256, 256), np.uint16))
    if bad == "a dtype":
        a = a.astype(np.int16)
    elif bad == "a not 64":
        a = np.zeros((3, 100), np.uint8)
        xs = np.zeros(100, np.int32)
    elif bad == "xs length":
        xs = np.zeros(64, np.int32)
    elif bad == "b shape":
        b = np.zeros((2, 4), np.uint8)
    elif bad == "c0 dtype":
        c0 = c0.astype(np.int64)
    else:
        a = a.reshape(-1)
    with pytest.raises(ValueError, match="byte-shuffle gather: "):
        BS.accumulate(a, b, planes, c0, np.zeros(2, np.int32), xs)


def test_planes_split_bytes_and_pad_small_tables():
    t = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 31
    p = BS.planes(t)
    assert p.shape == (256, 512) and p.dtype == np.uint8
    np.testing.assert_array_equal(p[:64, :32].astype(np.int64) + 256 * p[:64, 256:288].astype(np.int64), t)
    assert not p[64:].any() and not p[:, 32:256].any() and not p[:, 288:].any()
    for bad in (np.zeros((257, 256), np.uint16), np.zeros((256, 256), np.int32), np.zeros(256, np.uint16)):
        with pytest.raises(ValueError, match="byte planes need a uint16 table of at most 256 x 256"):
            BS.planes(bad)


def test_switches_turn_it_off(monkeypatch):
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    assert not BS.available()
    monkeypatch.delenv("APPMULT_NO_BYTE_SHUFFLE")
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert not BS.available()


def test_module_ir_holds_one_loop_per_block_count():
    ir = BS.module_ir()
    for n in range(1, BS.MAX_BLOCKS + 1):
        assert f"define void @gather16_{n}(" in ir
    assert ir.count("@llvm.x86.avx512.vpermi2var.qi.512(") == 1 + 4 * sum(range(1, BS.MAX_BLOCKS + 1))


# -- the layers' drivers -------------------------------------------------------------------

#: (padding, stride, dilation) of the conv tests
GEOMS = [((1, 1), (1, 1), (1, 1)), ((2, 0), (2, 1), (1, 2)), ((0, 0), (1, 1), (1, 1))]


def conv_ref(q, lo_x, iw, lo_w, table, padding, stride, dilation, zx, zw, pad_value):
    """Brute force of :func:`K.gather_conv_zp` in int64: unfold of the values, then the sum."""
    n = q.shape[0]
    co = iw.shape[0]
    kh, kw = iw.shape[2:]
    qp = torch.nn.functional.pad(q.to(torch.float64), (padding[1],) * 2 + (padding[0],) * 2, value=float(pad_value))
    cols = torch.nn.functional.unfold(qp, (kh, kw), dilation=dilation, stride=stride).to(torch.int64)  # (N, K, L)
    x = cols.numpy()
    w = iw.reshape(co, -1).numpy().astype(np.int64)
    t = table.numpy().astype(np.int64)
    out = np.zeros((n, co, x.shape[2]), np.int64)
    zwv = np.broadcast_to(np.asarray(zw if zw is not None else 0, np.int64).reshape(-1), (co,))
    for j in range(co):
        out[:, j, :] = (t[x - lo_x, w[j][None, :, None]] - x * zwv[j] - zx * (w[j][None, :, None] + lo_w)
                        + zx * zwv[j]).sum(1)
    ho = (q.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return out.reshape(n, co, ho, -1)


@needs_vbmi
@pytest.mark.parametrize("n, geom", [(n, g) for n in (64, 3) for g in GEOMS] + [(256, GEOMS[0])])
@pytest.mark.parametrize("signed", [False, True])
def test_conv_zp_both_layouts_equal_brute_force_and_the_scalar_loops(n, geom, signed, monkeypatch):
    """batch 64 and 256: the batch-inner layout (receptive fields read in place); batch 3: unfolded."""
    padding, stride, dilation = geom
    rng = np.random.default_rng(n + 7 * stride[0] + signed)
    c, h, w, co, kh, kw = 3, 7, 6, 5, 3, 2
    lo_x, lo_w = (-128, -128) if signed else (0, 0)
    table = torch.from_numpy(rng.integers(-30000, 30000, (256, 256))).to(torch.int32)
    q = torch.from_numpy(rng.integers(lo_x, lo_x + 256, (n, c, h, w))).to(torch.float32)
    q[0, 0, 0, :2] = torch.tensor([lo_x, lo_x + 255], dtype=torch.float32)
    iw = torch.from_numpy(rng.integers(0, 256, (co, c, kh, kw)))
    zx, zw = (0, None) if signed else (3, rng.integers(-4, 5, co))

    def run():
        return K.gather_conv_zp(q, lo_x, iw.reshape(co, -1), lo_w, table, 1, (kh, kw), padding, stride, dilation,
                                zx, zw, torch.int64, pad_value=zx)
    got = run()
    assert got is not None
    ref = conv_ref(q, lo_x, iw, lo_w, table, padding, stride, dilation, zx, zw, zx)
    np.testing.assert_array_equal(got.numpy(), ref)
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    scalar = run()
    if n == 3:
        assert scalar is None  # the row kernel declines so few positions; the byte shuffle takes them
    else:
        assert torch.equal(scalar, got)


@needs_vbmi
def test_conv_zp_refuses_activations_outside_the_table():
    q = torch.full((64, 1, 3, 3), 256.0)
    iw = torch.zeros((1, 1), dtype=torch.int64)
    table = torch.zeros((256, 256), dtype=torch.int32)
    with pytest.raises(IndexError, match=msg("Quantized activations outside the LUT's range [0, 255]")):
        K.gather_conv_zp(q, 0, iw, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None)


@needs_vbmi
@pytest.mark.parametrize("m", [128, 5])
def test_linear_zp_equals_brute_force_and_the_scalar_loop(m, monkeypatch):
    rng = np.random.default_rng(m)
    k, n = 300, 9
    table = torch.from_numpy(rng.integers(-100, 65000, (256, 256))).to(torch.int32)
    iw = torch.from_numpy(rng.integers(0, 256, (n, k)))
    zw = rng.integers(-3, 4, n)
    q = torch.from_numpy(rng.integers(0, 256, (m, k))).to(torch.float32)
    prep = K.gather_linear_prep(iw, 0, table, 0, 2, zw)
    got = K.gather_linear_zp(q, 0, prep)
    x = q.numpy().astype(np.int64)
    t = table.numpy().astype(np.int64)
    w = iw.numpy()
    ref = (t[x[:, None, :], w[None, :, :]] - x[:, None, :] * zw[None, :, None] - 2 * w[None, :, :]
           + 2 * zw[None, :, None]).sum(2)
    np.testing.assert_array_equal(got.numpy(), ref)
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    assert torch.equal(K.gather_linear_zp(q, 0, prep), got)


@needs_vbmi
@pytest.mark.parametrize("nbatch, length", [(3, 128), (2, 100), (1, 1)])
def test_gather_forward_in_place_and_copied(nbatch, length, monkeypatch):
    """``L`` a multiple of 64: read in place; otherwise copied to ``(K, nb*L)``."""
    rng = np.random.default_rng(length)
    kk, nout = 70, 6
    table = torch.from_numpy(rng.integers(-20000, 40000, (256, 200))).to(torch.int32)
    a = torch.from_numpy(rng.integers(0, 256, (nbatch, kk, length)))
    b = torch.from_numpy(rng.integers(0, 200, (nout, kk)))
    got = K.gather_forward(a, b, table, 1, torch.int32)
    t = table.numpy().astype(np.int64)
    ref = t[a.numpy()[:, None, :, :], b.numpy()[None, :, :, None]].sum(2)
    np.testing.assert_array_equal(got.numpy(), ref)
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    assert torch.equal(K.gather_forward(a, b, table, 1, torch.int32), got)


@needs_vbmi
def test_table_planes_follow_writes_to_the_table():
    """The planes are cached per table tensor: an in-place write must not give stale sums."""
    rng = np.random.default_rng(9)
    table = torch.from_numpy(rng.integers(0, 1000, (256, 256))).to(torch.int32)
    a = torch.from_numpy(rng.integers(0, 256, (1, 10, 64)))
    b = torch.from_numpy(rng.integers(0, 256, (2, 10)))
    first = K.gather_forward(a, b, table, 1, torch.int32)
    table += 1
    second = K.gather_forward(a, b, table, 1, torch.int32)
    assert torch.equal(second, first + 10)


@pytest.mark.numba
def test_a_module_that_does_not_compile_falls_back_with_one_warning(monkeypatch):
    """Another LLVM (a different llvmlite) that rejects the IR must not break every layer:
    the callers take the scalar loops and the user is told once."""
    if not BS.numba_support.AVAILABLE:
        pytest.skip("numba not installed")
    monkeypatch.setattr(BS, "_host_has_vbmi", lambda: True)

    def broken():
        raise RuntimeError("LLVM ERROR: unknown intrinsic")
    monkeypatch.setattr(BS, "_compiled", broken)
    BS._usable.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=msg("appmult: the byte-shuffle gather kernel is unavailable "
                                                    "(RuntimeError: LLVM ERROR: unknown intrinsic); using the "
                                                    "scalar gather loops")):
            assert not BS.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # decided once per process: a second warning would raise here
            assert not BS.available()
    finally:
        BS._usable.cache_clear()


def test_module_ir_spells_out_its_constant_vectors():
    """No ``splat (...)`` shorthand (LLVM 19+ only): constants are written element by element."""
    ir = BS.module_ir()
    assert "splat" not in ir
    assert BS._splat("i16", 255, 3) == "<i16 255, i16 255, i16 255>"


@needs_vbmi
@pytest.mark.parametrize("what", ["linear", "forward", "conv"])
def test_small_products_go_to_the_scalar_loops_large_ones_to_the_byte_shuffle(what, monkeypatch):
    """Below ``MIN_LOOKUPS`` look-ups the callers keep the scalar loops (the byte shuffle's
    fixed cost per call would dominate); at or above it they take the byte shuffle; the
    integers are the same either way (brute force)."""
    monkeypatch.setattr(BS, "MIN_LOOKUPS", 1 << 18)  # the module's value (this file sets 0)
    calls = []
    SG = pytest.importorskip("appmult.nn.shuffle_gather")
    for name in ("linear_zp", "forward", "conv_zp"):
        real = getattr(SG, name)
        monkeypatch.setattr(SG, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    rng = np.random.default_rng(11)
    table = torch.from_numpy(rng.integers(0, 60000, (256, 256))).to(torch.int32)
    t = table.numpy().astype(np.int64)
    for n, expect in ((8, []), (64, {"linear": ["linear_zp"], "forward": ["forward"], "conv": ["conv_zp"]}[what])):
        calls.clear()
        if what == "linear":  # n*64*n look-ups: 4,096 or 262,144 (= MIN_LOOKUPS)
            iw = torch.from_numpy(rng.integers(0, 256, (n, 64)))
            q = torch.from_numpy(rng.integers(0, 256, (n, 64))).to(torch.float32)
            got = K.gather_linear_zp(q, 0, K.gather_linear_prep(iw, 0, table, 0, 0, None)).numpy()
            ref = t[q.numpy().astype(np.int64)[:, None, :], iw.numpy()[None, :, :]].sum(2)
        elif what == "forward":
            a = torch.from_numpy(rng.integers(0, 256, (1, 64, n * n)))
            b = torch.from_numpy(rng.integers(0, 256, (n, 64)))
            got = K.gather_forward(a, b, table, 1, torch.int32).numpy()
            ref = t[a.numpy()[:, None, :, :], b.numpy()[None, :, :, None]].sum(2)
        else:  # n images of 8x8, one channel, a 1x1 kernel, 64 outputs: n*64*64 look-ups
            q = torch.from_numpy(rng.integers(0, 256, (n, 1, 8, 8))).to(torch.float32)
            iw = torch.from_numpy(rng.integers(0, 256, (64, 1)))
            got = K.gather_conv_zp(q, 0, iw, 0, table, 1, (1, 1), (0, 0), (1, 1), (1, 1), 0, None).numpy()
            ref = t[q.numpy().astype(np.int64)[:, None, :, :, :], iw.numpy()[None, :, 0, None, None, None]][:, :, 0]
        assert calls == expect
        np.testing.assert_array_equal(got, ref)


# -- attention's batched products ------------------------------------------------------------

@needs_vbmi
def test_accumulate_batched_equals_brute_force():
    rng = np.random.default_rng(12)
    t16 = rng.integers(0, 1 << 16, (256, 256)).astype(np.uint16)
    t16[255, 255] = 0xFFFF
    a = rng.integers(0, 256, (5, 300, 128)).astype(np.uint8)
    a[:, :, 0] = 255
    b = rng.integers(0, 256, (5, 7, 300)).astype(np.uint8)
    b[:, 0, :] = 255
    c0 = rng.integers(-(1 << 31), 1 << 31, 7).astype(np.int32)
    out = BS.accumulate_batched(a, b, BS.planes(t16), c0)
    ref = c0[None, :, None].astype(np.int64) + t16.astype(np.int64)[b[:, :, :, None], a[:, None, :, :]].sum(2)
    np.testing.assert_array_equal(out, wrap32(ref))


@pytest.mark.parametrize("bad", ["a not 64", "items differ", "k differs", "b int16", "c0 length"])
def test_accumulate_batched_refuses_wrong_operands(bad):
    a = np.zeros((2, 3, 64), np.uint8)
    b = np.zeros((2, 4, 3), np.uint8)
    c0 = np.zeros(4, np.int32)
    if bad == "a not 64":
        a = np.zeros((2, 3, 65), np.uint8)
    elif bad == "items differ":
        b = np.zeros((3, 4, 3), np.uint8)
    elif bad == "k differs":
        b = np.zeros((2, 4, 5), np.uint8)
    elif bad == "b int16":
        b = b.astype(np.int16)
    else:
        c0 = np.zeros(5, np.int32)
    with pytest.raises(ValueError, match="byte-shuffle gather: "):
        BS.accumulate_batched(a, b, BS.planes(np.zeros((256, 256), np.uint16)), c0)


@needs_vbmi
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("m", [17, 64])
def test_lut_bmm_takes_one_batched_call_equal_to_brute_force_and_the_torch_path(signed, m, monkeypatch):
    """Attention's gather products (each item its own second operand) in one byte-shuffle
    call: the integers of brute force and of the torch gather it replaces (m = 17: padded)."""
    from appmult.lut_gen import LutFile
    from appmult.nn import LutTables, lut_bmm
    from appmult.nn import shuffle_gather as SG
    rng = np.random.default_rng(m + signed)
    v = np.arange(256) - (128 if signed else 0)
    lut = LutFile(np.outer(v, v) + rng.integers(-40, 41, (256, 256)), width_a=8, width_b=8, signed=signed)
    tabs = LutTables(lut, kernel="gather")
    a = torch.from_numpy(rng.choice(v, (3, m, 20)).astype(np.float32))
    b = torch.from_numpy(rng.choice(v, (3, 20, 9)).astype(np.float32))
    calls = []
    real = SG.bmm
    monkeypatch.setattr(SG, "bmm", lambda *x: calls.append(1) or real(*x))
    got = lut_bmm(a, b, tabs)
    assert calls == [1]
    ca, cb = a.numpy().astype(np.int64) & 255, b.numpy().astype(np.int64) & 255  # the LUT's codes
    ref = lut.product.astype(np.int64)[ca[:, :, :, None], cb[:, None, :, :]].sum(2)
    np.testing.assert_array_equal(got.numpy(), ref)
    monkeypatch.setenv("APPMULT_NO_BYTE_SHUFFLE", "1")
    assert torch.equal(lut_bmm(a, b, tabs), got)


def test_nothing_to_compute_builds_no_offsets(monkeypatch):
    """No positions or no outputs: an empty result at once, without one offset per step (a
    reduction of 2**31 steps once built 16 GB of them)."""
    made = []
    real = np.arange
    monkeypatch.setattr(BS.np, "arange", lambda n, *a, **k: made.append(n) or real(n, *a, **k))
    planes = BS.planes(np.zeros((256, 256), np.uint16))
    k = 1 << 20
    out = BS.accumulate(np.zeros((k, 0), np.uint8), np.zeros((3, k), np.uint8), planes,
                        np.zeros(3, np.int32), np.zeros(3, np.int32), np.zeros(0, np.int32))
    assert out.shape == (3, 0) and out.dtype == np.int32
    out = BS.accumulate(np.zeros((k, 64), np.uint8), np.zeros((0, k), np.uint8), planes,
                        np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(64, np.int32))
    assert out.shape == (0, 64)
    assert k not in made
