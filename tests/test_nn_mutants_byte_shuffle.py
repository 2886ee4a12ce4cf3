"""Survivors of the byte-shuffle gather (``nn/byte_shuffle.py``, ``nn/gather_layouts.py``),
reviewed after their first mutation run.

* The compiled loop is built once per process (``_compiled`` is an ``lru_cache``), so under
  mutmut only the test that happened to compile it first counted as running the IR
  generators (``_ir_step``, ``_ir_flush``, ``module_ir``): a test here compiles the module
  afresh and checks every index quarter (the ``vpermi2b`` operands) and a second block (the
  output and ``xs`` offsets) against numpy brute force; the IR text defines exactly the
  loops ``1 .. MAX_BLOCKS`` and every value it computes is used (no load past a weight row).
* The host query needs both AVX-512 VBMI and BW (a stubbed feature map, and the real host
  against ``/proc/cpuinfo``); :func:`available` needs numba and a usable loop.
* The operand checks name the shapes they refused (a table 257 wide, ``P`` not a multiple
  of 64); an empty batch of positions returns an empty result before the loop.
* The three activation layouts against ``torch.nn.functional.unfold``: a table whose first
  value is 1 or -100 (not only 0 and -128, where ``q + lo_x`` and ``q - lo_x`` agree modulo
  256), a row dilation and a column stride of 2, padding positions and padding images
  zero, uint8 indices, boolean activations.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from appmult.nn import byte_shuffle as BS
from appmult.nn import gather_layouts as GL
from conftest import exact as msg

pytestmark = pytest.mark.usefixtures("shuffle_always")

needs_vbmi = pytest.mark.skipif(not BS.available(), reason="needs numba and an AVX-512 VBMI CPU")


def brute(a: np.ndarray, b: np.ndarray, t16: np.ndarray, c0, c1, xs) -> np.ndarray:
    """``c0[j] + c1[j] xs[p] + sum_k t16[b[j, k], a[k, p]]`` wrapped to int32 like the kernel."""
    s = t16.astype(np.int64)[b[:, :, None], a[None, :, :]].sum(1)
    v = c0[:, None].astype(np.int64) + c1[:, None].astype(np.int64) * xs[None, :].astype(np.int64) + s
    return ((v + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


# -- the compiled loop, compiled afresh ------------------------------------------------------

@needs_vbmi
def test_a_fresh_compile_looks_up_every_index_quarter_in_every_block():
    """Kills ``_ir_step`` 29 (indices 64..127 looked up in the third 64-byte register),
    31 (128..191 in the fourth), ``_ir_flush`` 10 (the second block's output 320 bytes on
    instead of 256) and 13 (its ``xs`` read there too). The module is compiled here, not
    taken from the process's cache, so these run the IR of this test's process."""
    rng = np.random.default_rng(29)
    kk, npos, nout = 8, 128, 3
    t16 = rng.integers(0, 1 << 16, size=(256, 256)).astype(np.uint16)
    a = rng.integers(0, 256, size=(kk, npos)).astype(np.uint8)
    a[:4, :64] = np.arange(256, dtype=np.uint8).reshape(4, 64)     # each quarter in block 0 ...
    a[4:, 64:] = np.arange(256, dtype=np.uint8).reshape(4, 64)     # ... and in block 1
    b = rng.integers(0, 256, size=(nout, kk)).astype(np.uint8)
    c0 = rng.integers(-1000, 1000, nout).astype(np.int32)
    c1 = np.array([3, -7, 1], np.int32)
    xs = rng.integers(-(1 << 12), 1 << 12, npos).astype(np.int32)
    BS._compiled.cache_clear()
    try:
        out = BS.accumulate(a, b, BS.planes(t16), c0, c1, xs)
    finally:
        BS._compiled.cache_clear()
    np.testing.assert_array_equal(out, brute(a, b, t16, c0, c1, xs))


def _functions(ir: str) -> dict[int, str]:
    parts = re.split(r"(?m)^define void @gather16_(\d+)\(", ir)[1:]
    return {int(n): body for n, body in zip(parts[::2], parts[1::2])}


def test_module_ir_defines_exactly_the_loops_one_to_max_blocks():
    """Kills ``module_ir`` 9 (a ``gather16_0`` loop too): one function per block count
    ``1 .. MAX_BLOCKS``, no other."""
    ir = BS.module_ir()
    assert re.findall(r"(?m)^define void @gather16_(\d+)\(", ir) == [str(n) for n in range(1, BS.MAX_BLOCKS + 1)]


def test_module_ir_reads_only_the_weight_row_and_uses_every_value():
    """Kills ``_ir_step`` 4 (a ninth plane register loaded from ``tbase + 512``: past row
    255, past the end of the planes). A step loads the weight row's 512 bytes as eight
    64-byte registers, and every value a loop defines is used."""
    for n, body in _functions(BS.module_ir()).items():
        assert re.findall(r"%tbase, (\d+)$", body, re.M) == [str(64 * q) for q in range(8)], n
        defined = re.findall(r"(?m)^\s*%([\w.]+) =", body)
        assert len(defined) == len(set(defined)), n
        dead = [v for v in defined if len(re.findall("%" + re.escape(v) + r"(?![\w.])", body)) < 2]
        assert dead == [], (n, dead)


# -- the host query and the switch -----------------------------------------------------------

@pytest.mark.parametrize("vbmi, bw", [(True, True), (True, False), (False, True), (False, False)])
def test_host_query_needs_both_vbmi_and_bw(vbmi, bw, monkeypatch):
    """Kills ``_host_has_vbmi`` 1-10 (no feature map, ``or``, a key misspelt or ``None``,
    a constant ``None``): stubbed feature maps (llvmlite's are lower case)."""
    llvm = pytest.importorskip("llvmlite.binding")
    feats = {"avx512f": True, "avx512vbmi": vbmi, "avx512bw": bw, "avx512vl": True}
    monkeypatch.setattr(llvm, "get_host_cpu_features", lambda: dict(feats))
    assert BS._host_has_vbmi() is (vbmi and bw)


def test_host_query_agrees_with_proc_cpuinfo():
    """Kills ``_host_has_vbmi`` 1 and, on a VBMI host like this one, 3-10: the real query
    against the kernel's own list of CPU flags."""
    pytest.importorskip("llvmlite.binding")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        pytest.skip("/proc/cpuinfo lists no flags")
    assert BS._host_has_vbmi() is ("avx512vbmi" in flags and "avx512bw" in flags)


def test_available_needs_numba_and_a_usable_loop(monkeypatch):
    """Kills ``available`` 15 (``or``): without numba, or without a usable loop, the
    callers keep the scalar kernels."""
    monkeypatch.delenv("APPMULT_NO_BYTE_SHUFFLE", raising=False)
    monkeypatch.delenv("APPMULT_NO_NUMBA", raising=False)
    monkeypatch.setattr(BS, "_usable", lambda: False)
    monkeypatch.setattr(BS.numba_support, "AVAILABLE", True)
    assert BS.available() is False
    monkeypatch.setattr(BS, "_usable", lambda: True)
    assert BS.available() is True
    monkeypatch.setattr(BS.numba_support, "AVAILABLE", False)
    assert BS.available() is False


# -- operand checks and empty results --------------------------------------------------------

def test_planes_refuse_a_table_257_wide_by_name():
    """Kills ``planes`` 11 (``> 257``: numpy's broadcast error instead)."""
    for shape in ((256, 257), (1, 257)):
        with pytest.raises(ValueError, match=msg(f"byte planes need a uint16 table of at most 256 x 256, "
                                                 f"not {shape} uint16")):
            BS.planes(np.zeros(shape, np.uint16))


def test_accumulate_names_the_blocks_of_a_length_not_a_multiple_of_64():
    """Kills ``accumulate`` 18 (``npos / LANES``: 100 positions made 2 blocks, not 1)."""
    a = np.zeros((3, 100), np.uint8)
    b = np.zeros((2, 3), np.uint8)
    z = np.zeros(2, np.int32)
    planes = BS.planes(np.zeros((256, 256), np.uint16))
    with pytest.raises(ValueError, match=msg(
            "byte-shuffle gather: 100 positions are not a multiple of 64 (pad them)")):
        BS.accumulate(a, b, planes, z, z, np.zeros(100, np.int32))
    with pytest.raises(ValueError, match=msg(  # a too short xs must not hide the unpadded length
            "byte-shuffle gather: 100 positions are not a multiple of 64 (pad them)")):
        BS.accumulate(a, b, planes, z, z, np.zeros(64, np.int32))


def test_no_positions_give_an_empty_result_before_the_loop():
    """Kills ``accumulate_at`` 33 (``npos == 1``: no early return, a division by zero
    chunks). Any host: the loop is never reached."""
    for kk in (0, 3):
        out = BS.accumulate(np.zeros((kk, 0), np.uint8), np.zeros((2, kk), np.uint8),
                            BS.planes(np.zeros((256, 256), np.uint16)), np.zeros(2, np.int32),
                            np.ones(2, np.int32), np.zeros(0, np.int32))
        assert out.shape == (2, 0) and out.dtype == np.int32


# -- the activation layouts ------------------------------------------------------------------

#: kernel, padding, stride, dilation: a row dilation and a column stride of 2
GEOM = ((2, 3), (1, 2), (1, 2), (2, 1))


def unfold_ref(q: torch.Tensor, lo_x: int, pad_value: int, geom=GEOM) -> np.ndarray:
    """``(N, C*kh*kw, L)`` int64 indices by ``torch.nn.functional.unfold`` in float64."""
    (kh, kw), (ph, pw), stride, dilation = geom
    qp = torch.nn.functional.pad(q.to(torch.float64) - lo_x, (pw, pw, ph, ph), value=float(pad_value - lo_x))
    return torch.nn.functional.unfold(qp, (kh, kw), dilation=dilation, stride=stride).to(torch.int64).numpy()


def activations(n: int, lo_x: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo_x, lo_x + 256, (n, 2, 6, 7), generator=gen).to(torch.float32)


def check_unfolds(q: torch.Tensor, lo_x: int, pad_value: int) -> None:
    ref = unfold_ref(q, lo_x, pad_value)
    n, kdim, length = ref.shape
    got = GL.unfold_uint8(q, lo_x, 256, pad_value, *GEOM)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    kp, (ho, wo) = GL.unfold_uint8_kp(q, lo_x, 256, pad_value, *GEOM)
    assert kp.dtype == np.uint8 and ho * wo == length
    npos = n * length
    assert kp.shape == (kdim, -(-npos // 64) * 64) and npos % 64
    np.testing.assert_array_equal(kp[:, :npos], ref.transpose(1, 0, 2).reshape(kdim, npos))
    assert not kp[:, npos:].any()


def check_batch_inner(q: torch.Tensor, lo_x: int, pad_value: int) -> None:
    ref = unfold_ref(q, lo_x, pad_value)
    n, kdim, length = ref.shape
    src, koff, poff, (ho, wo), nbp = GL.batch_inner_fields(q, lo_x, 256, pad_value, *GEOM)
    assert nbp == -(-n // 64) * 64 and ho * wo == length and (ho, wo) == (6, 5)
    assert src.dtype == np.uint8 and src.ndim == 1 and koff.dtype == poff.dtype == np.int64
    assert koff.shape == (kdim,) and poff.shape == (length * nbp // 64,)
    assert koff.min() + poff.min() >= 0 and koff.max() + poff.max() + 64 <= src.shape[0]
    pos = (poff[:, None] + np.arange(64)[None, :]).reshape(-1)
    got = src[koff[:, None] + pos[None, :]].reshape(kdim, length, nbp)     # positions (Ho, Wo, Nb)
    np.testing.assert_array_equal(got[:, :, :n], ref.transpose(1, 2, 0))
    assert not got[:, :, n:].any()


@pytest.mark.parametrize("lo_x", [1, -100, 0])
def test_unfolds_equal_torch_unfold(lo_x):
    """Kills ``unfold_cols`` 14 (indices left float32), 18 (``lo_x == 1`` not shifted) and
    ``unfold_uint8_kp`` 71 (padding positions 1): both unfolded layouts, 3 images (90
    positions, padded to 128)."""
    check_unfolds(activations(3, lo_x, 18 + lo_x), lo_x, lo_x + 7)


@pytest.mark.parametrize("lo_x", [1, -100, 0])
def test_batch_inner_fields_read_the_receptive_fields(lo_x):
    """Kills ``batch_inner_fields`` 47 (``lo_x == 1`` not shifted), 48 (``q + lo_x``),
    72 (padding images 1), 95 (``ii / dh``) and 122 (``ow / sw``): 70 images (two blocks of
    64 per pixel, 58 padding images), row dilation and column stride 2."""
    check_batch_inner(activations(70, lo_x, 47 + lo_x), lo_x, lo_x + 7)


# -- accumulate's early return and the batched products (session 8, third run) ----------------

def test_accumulate_refuses_a_one_dimensional_b_by_name():
    """Kills ``accumulate`` 32 (``b[:, :0]`` taken of any ``b``, not only a 2-D one: a 1-D
    ``b`` raised IndexError instead of the operand check's ValueError)."""
    a = np.zeros((3, 64), np.uint8)
    b = np.zeros(3, np.uint8)
    c0 = c1 = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match=msg(
            "byte-shuffle gather: operands of the wrong shape, dtype or layout (src (192,) uint8, koff (0,) int64, "
            "poff (1,) int64, b (3,) uint8, planes (256, 512), c0 (3,), c1 (3,), xs (64,))")):
        BS.accumulate(a, b, BS.planes(np.zeros((256, 256), np.uint16)), c0, c1, np.zeros(64, np.int32))


@pytest.mark.parametrize("nitems, nout, npos", [(0, 4, 64), (2, 0, 64), (2, 4, 0)])
def test_accumulate_batched_empty_operands_give_an_empty_result(nitems, nout, npos):
    """Kills ``accumulate_batched`` 45 (``nout == 0 and npos == 0``), 46 (``nitems == 0 and
    nout == 0``), 48 (``nitems == 1``), 50 (``nout == 1``) and 52 (``npos == 1``): with no
    items, no output rows or no positions the call returns the empty result (the mutants go
    on to the task split and divide by zero there or in the driver)."""
    a = np.zeros((nitems, 3, npos), np.uint8)
    b = np.zeros((nitems, nout, 3), np.uint8)
    out = BS.accumulate_batched(a, b, BS.planes(np.zeros((256, 256), np.uint16)), np.ones(nout, np.int32))
    assert out.shape == (nitems, nout, npos) and out.dtype == np.int32


@needs_vbmi
@pytest.mark.parametrize("nitems, nout", [(1, 3), (2, 1)])
def test_accumulate_batched_one_item_or_one_output_row(nitems, nout):
    """Kills ``accumulate_batched`` 48 (one item returned uninitialised) and 50 (one output
    row returned uninitialised): brute force ``c0[j] + sum_k T[b[i, j, k], a[i, k, p]]``."""
    rng = np.random.default_rng(48 + nout)
    t16 = rng.integers(0, 1 << 16, (256, 256)).astype(np.uint16)
    a = rng.integers(0, 256, (nitems, 5, 128)).astype(np.uint8)
    b = rng.integers(0, 256, (nitems, nout, 5)).astype(np.uint8)
    c0 = rng.integers(-(1 << 31), 1 << 31, nout).astype(np.int32)
    out = BS.accumulate_batched(a, b, BS.planes(t16), c0)
    ref = c0[None, :, None].astype(np.int64) + t16.astype(np.int64)[b[:, :, :, None], a[:, None, :, :]].sum(2)
    np.testing.assert_array_equal(out, ((ref + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32))


@needs_vbmi
def test_accumulate_batched_more_rows_than_tasks(monkeypatch):
    """Kills ``accumulate_batched`` 97 (``nchunks / nitems``: a float row tile where the rows
    outnumber the tasks, which the driver cannot take): 2 threads, one item, one chunk, 40
    rows (8 tiles of 5)."""
    monkeypatch.setattr(BS.numba_support, "num_threads", lambda: 2)
    rng = np.random.default_rng(97)
    t16 = rng.integers(0, 1 << 16, (256, 256)).astype(np.uint16)
    a = rng.integers(0, 256, (1, 6, 64)).astype(np.uint8)
    b = rng.integers(0, 256, (1, 40, 6)).astype(np.uint8)
    c0 = rng.integers(-1000, 1000, 40).astype(np.int32)
    out = BS.accumulate_batched(a, b, BS.planes(t16), c0)
    ref = c0[None, :, None].astype(np.int64) + t16.astype(np.int64)[b[:, :, :, None], a[:, None, :, :]].sum(2)
    np.testing.assert_array_equal(out, ref.astype(np.int32))
