"""The gather by byte shuffles: 64 look-ups of a 16-bit table per few AVX-512 VBMI instructions.

``out[j, p] = c0[j] + c1[j] * xs[p] + sum_k T[b[j, k], a[k, p]]`` for a table ``T`` of
256 x 256 entries in ``[0, 2**16)`` (the gather's uint16 table, offset by its minimum), 8-bit
indices ``a`` (reduction step ``k``, then position ``p``) and ``b`` (output ``j``, then ``k``).

How: a weight code ``w`` selects one table row ``T[w, :]`` (256 entries), kept as two byte
planes (low and high bytes, 256 B each = four 64-byte registers). ``vpermi2b`` looks 64
activation indices up in 128 bytes of a plane at once (index bits 0-6); the index's bit 7
picks between the two halves. So 64 products cost four shuffles, a blend per plane and a
few adds, where the scalar loop of :mod:`appmult.nn.gather_loops` does about one look-up
per cycle. The byte sums go into 16-bit lanes (the even and odd positions of each 16-bit
word: ``and``/``shift``), which hold 256 reduction steps of byte values exactly (256 * 255
< 2**16); every 256 steps, and at the end, they are widened and added to the int32 output
(``low + 256 * high``), the first time on top of ``c0[j] + c1[j] * xs[p]`` (the
zero-point cross terms, so the output needs no other pass). Exact: integer adds only; the
int32 sums wrap only where the caller's bound allows (the caller checks it).

numba cannot emit ``vpermi2b``, so the loop is LLVM IR compiled once per process by
llvmlite (numba's own dependency) for the host CPU, and a cached numba ``prange`` loop
calls it per task through its address. :func:`available` is true only where the host CPU
has AVX-512 VBMI and BW (``llvmlite.binding.get_host_cpu_features``) and
``APPMULT_NO_BYTE_SHUFFLE`` is unset or empty; elsewhere callers keep the scalar kernels.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from . import numba_support, switches
from .numba_support import njit, numba, prange

#: Positions one call of the compiled loop handles per 64-lane block, and the most blocks
#: it keeps in registers at once (accumulators: 4 per block).
LANES = 64
MAX_BLOCKS = 4
#: Reduction steps whose byte sums a 16-bit lane holds exactly (256 * 255 < 2**16).
STEPS_PER_FLUSH = 256
#: Tasks per numba thread.
TASKS_PER_THREAD = 4
#: Fewest look-ups for which callers take this kernel: below, its fixed cost per call (~60
#: us of layout, checks and dispatch) makes the scalar loops faster (linear, 2 threads:
#: 64x64 by 64 outputs, 262,144 look-ups, 99 vs 106 us; 17x16 by 17: 85 vs 24 us).
MIN_LOOKUPS = 1 << 18


#: LLVM vector types of the loop: 64 bytes, 32 16-bit lanes, 32 int32 lanes.
_V8, _V16, _V32 = "<64 x i8>", "<32 x i16>", "<32 x i32>"
#: The LLVM intrinsic of ``vpermi2b`` (64 bytes looked up in the 128 of two registers).
_VPERMI2B = "@llvm.x86.avx512.vpermi2var.qi.512"


def _splat(ty: str, value: int, n: int) -> str:
    """An LLVM constant vector of ``n`` equal elements (spelled out: the ``splat`` shorthand
    needs LLVM 19)."""
    return "<" + ", ".join(f"{ty} {value}" for _ in range(n)) + ">"


def _interleave_mask() -> str:
    """``<0, 32, 1, 33, ...>``: the even and odd positions' sums back in position order."""
    return ", ".join(f"i32 {i // 2 + (32 if i % 2 else 0)}" for i in range(LANES))


def _kernel_ir(blocks: int) -> str:
    """LLVM IR of ``@gather16_<blocks>``: output rows ``j0 <= j < j1`` at positions
    ``p0 .. p0 + 64 * blocks`` (all ``K`` steps; ``p0`` a multiple of 64).

    Arguments (all i64; pointers as addresses): ``a`` uint8, ``koff`` (K,) int64, ``b``
    (nout, ldb) uint8, ``K``, ``planes`` (256, 512) uint8 (row ``w``: low bytes of ``T[w, :]``,
    then high bytes), ``out`` (nout, ldo) int32, ``j0``, ``j1``, ``p0``, ``c0``/``c1``
    (nout,) int32, ``xs`` (positions,) int32, ``poff`` (blocks,) int64. The 64 activation
    indices of step ``k`` and block ``q`` (positions ``64 q ..``) are the bytes at ``a +
    koff[k] + poff[q]``: a row-major ``(K, P)`` array has ``koff[k] = k P``, ``poff[q] =
    64 q``; other offsets read the receptive fields of an image in place (no unfold).
    """
    accs = [f"{plane}{par}{t}" for t in range(blocks) for plane in ("l", "h") for par in ("e", "o")]
    lines = _ir_entry(blocks)
    lines += _acc_phis(accs, "")
    lines += _ir_step(blocks)
    lines += [
        "  %knext = add i64 %k, 1",
        "  %kmore = icmp ult i64 %knext, %kend",
        "  br i1 %kmore, label %step, label %flush",
        "flush:",
    ]
    lines += _acc_phis(accs, "_f")
    lines += _ir_flush(blocks)
    lines += [
        "  br label %flush_end",
        "flush_end:",
        "  %kdone = icmp uge i64 %kend, %K",
        "  br i1 %kdone, label %row_end, label %chunk",
        "row_end:",
        "  %jnext = add i64 %j, 1",
        "  %jmore = icmp slt i64 %jnext, %j1",
        "  br i1 %jmore, label %row, label %done",
        "done:",
        "  ret void",
        "}",
    ]
    return "\n".join(lines)


def _acc_phis(accs: list[str], suffix: str) -> list[str]:
    """The 16-bit accumulators' values at a block head: zero from the chunk head, else the
    previous step's sums (``suffix``: ``""`` in the step loop, ``"_f"`` at the flush)."""
    return [f"  %{acc}{suffix} = phi {_V16} [zeroinitializer, %chunk], [%{acc}_n, %step]" for acc in accs]


def _ir_entry(n: int) -> list[str]:
    """The function's head: the blocks' offsets, the loop over output rows (their weight
    row, output row and start values) and the head of a chunk of at most 256 steps."""
    lines = [
        f"define void @gather16_{n}(i64 %a, i64 %koff, i64 %b, i64 %ldb, i64 %K, i64 %planes, i64 %out,"
        " i64 %ldo, i64 %j0, i64 %j1, i64 %p0, i64 %c0, i64 %c1, i64 %xs, i64 %poff) {",
        "entry:",
        "  %blk = lshr i64 %p0, 3",  # byte offset of poff[p0 / 64]: (p0 / 64) * 8
        "  %poff_b = add i64 %poff, %blk",
    ]
    for t in range(n):
        lines += [f"  %pa{t} = add i64 %poff_b, {8 * t}",
                  f"  %pp{t} = inttoptr i64 %pa{t} to ptr",
                  f"  %po{t} = load i64, ptr %pp{t}, align 8"]
    lines += [
        "  %has_rows = icmp slt i64 %j0, %j1",
        "  br i1 %has_rows, label %row, label %done",
        "row:",
        "  %j = phi i64 [%j0, %entry], [%jnext, %row_end]",
        "  %brow = mul i64 %j, %ldb",
        "  %brow_addr = add i64 %b, %brow",
        "  %orow = mul i64 %j, %ldo",
        "  %orow_p = add i64 %orow, %p0",
        "  %orow_b = shl i64 %orow_p, 2",
        "  %obase = add i64 %out, %orow_b",
        "  %jb = shl i64 %j, 2",
        "  %c0a = add i64 %c0, %jb",
        "  %c0p = inttoptr i64 %c0a to ptr",
        "  %c0v = load i32, ptr %c0p, align 4",
        "  %c1a = add i64 %c1, %jb",
        "  %c1p = inttoptr i64 %c1a to ptr",
        "  %c1v = load i32, ptr %c1p, align 4",
        "  %c0i = insertelement <64 x i32> poison, i32 %c0v, i64 0",
        "  %c0s = shufflevector <64 x i32> %c0i, <64 x i32> poison, <64 x i32> zeroinitializer",
        "  %c1i = insertelement <64 x i32> poison, i32 %c1v, i64 0",
        "  %c1s = shufflevector <64 x i32> %c1i, <64 x i32> poison, <64 x i32> zeroinitializer",
        "  br label %chunk",
        "chunk:",
        "  %kc = phi i64 [0, %row], [%kend, %flush_end]",
        f"  %kc_end = add i64 %kc, {STEPS_PER_FLUSH}",
        "  %kc_short = icmp ult i64 %K, %kc_end",
        "  %kend = select i1 %kc_short, i64 %K, i64 %kc_end",
        "  %kc_empty = icmp uge i64 %kc, %kend",
        "  br i1 %kc_empty, label %flush, label %step",
        "step:",
        "  %k = phi i64 [%kc, %chunk], [%knext, %step]",
    ]
    return lines


def _ir_step(n: int) -> list[str]:
    """One reduction step: the weight code's eight plane registers, then per block the 64
    indices, four ``vpermi2b``, the half picked by bit 7 and the even/odd 16-bit sums."""
    v8, v16 = _V8, _V16
    lines = [
        "  %wa = add i64 %brow_addr, %k",
        "  %wp = inttoptr i64 %wa to ptr",
        "  %w8 = load i8, ptr %wp, align 1",
        "  %w = zext i8 %w8 to i64",
        "  %woff = shl i64 %w, 9",
        "  %tbase = add i64 %planes, %woff",
    ]
    for q in range(8):
        lines += [f"  %ta{q} = add i64 %tbase, {64 * q}",
                  f"  %tp{q} = inttoptr i64 %ta{q} to ptr",
                  f"  %t{q} = load {v8}, ptr %tp{q}, align 1"]
    lines += ["  %kb = shl i64 %k, 3", "  %ka = add i64 %koff, %kb", "  %kp = inttoptr i64 %ka to ptr",
              "  %kv = load i64, ptr %kp, align 8", "  %abase = add i64 %a, %kv"]
    for t in range(n):
        lines += [
            f"  %ia{t} = add i64 %abase, %po{t}",
            f"  %ip{t} = inttoptr i64 %ia{t} to ptr",
            f"  %x{t} = load {v8}, ptr %ip{t}, align 1",
            f"  %m{t} = icmp slt {v8} %x{t}, zeroinitializer",
        ]
        for plane, q0 in (("l", 0), ("h", 4)):
            lines += [
                f"  %{plane}a{t} = call {v8} {_VPERMI2B}({v8} %t{q0}, {v8} %x{t}, {v8} %t{q0 + 1})",
                f"  %{plane}b{t} = call {v8} {_VPERMI2B}({v8} %t{q0 + 2}, {v8} %x{t}, {v8} %t{q0 + 3})",
                f"  %{plane}s{t} = select <64 x i1> %m{t}, {v8} %{plane}b{t}, {v8} %{plane}a{t}",
                f"  %{plane}w{t} = bitcast {v8} %{plane}s{t} to {v16}",
                f"  %{plane}ev{t} = and {v16} %{plane}w{t}, {_splat('i16', 255, 32)}",
                f"  %{plane}od{t} = lshr {v16} %{plane}w{t}, {_splat('i16', 8, 32)}",
                f"  %{plane}e{t}_n = add {v16} %{plane}e{t}, %{plane}ev{t}",
                f"  %{plane}o{t}_n = add {v16} %{plane}o{t}, %{plane}od{t}",
            ]
    return lines


def _ir_flush(n: int) -> list[str]:
    """The end of a chunk: per block, the 16-bit sums widened (``low + 256 high``), back in
    position order, added to the output (the first time to ``c0 + c1 xs`` instead)."""
    v16, v32 = _V16, _V32
    lines = ["  %first = icmp eq i64 %kc, 0"]
    for t in range(n):
        lines += [
            f"  %oa{t} = add i64 %obase, {4 * LANES * t}",
            f"  %op{t} = inttoptr i64 %oa{t} to ptr",
            f"  %prev{t} = load <64 x i32>, ptr %op{t}, align 4",
            f"  %xa{t} = add i64 %xs, {4 * LANES * t}",
            f"  %xb{t} = shl i64 %p0, 2",
            f"  %xc{t} = add i64 %xa{t}, %xb{t}",
            f"  %xp{t} = inttoptr i64 %xc{t} to ptr",
            f"  %xv{t} = load <64 x i32>, ptr %xp{t}, align 4",
        ]
        parts = []
        for par in ("e", "o"):
            lines += [
                f"  %lz{par}{t} = zext {v16} %l{par}{t}_f to {v32}",
                f"  %hz{par}{t} = zext {v16} %h{par}{t}_f to {v32}",
                f"  %hs{par}{t} = shl {v32} %hz{par}{t}, {_splat('i32', 8, 32)}",
                f"  %s{par}{t} = add {v32} %lz{par}{t}, %hs{par}{t}",
            ]
            parts.append(f"%s{par}{t}")
        lines += [
            f"  %sum{t} = shufflevector {v32} {parts[0]}, {v32} {parts[1]}, <64 x i32> <{_interleave_mask()}>",
            f"  %init_m{t} = mul <64 x i32> %c1s, %xv{t}",
            f"  %init{t} = add <64 x i32> %init_m{t}, %c0s",
            f"  %base{t} = select i1 %first, <64 x i32> %init{t}, <64 x i32> %prev{t}",
            f"  %new{t} = add <64 x i32> %base{t}, %sum{t}",
            f"  store <64 x i32> %new{t}, ptr %op{t}, align 4",
        ]
    return lines


def module_ir() -> str:
    """The whole LLVM module: one function per block count ``1 .. MAX_BLOCKS``."""
    head = f"declare <64 x i8> {_VPERMI2B}(<64 x i8>, <64 x i8>, <64 x i8>)\n"
    return head + "\n".join(_kernel_ir(n) for n in range(1, MAX_BLOCKS + 1)) + "\n"


_DISABLE_ENV = "APPMULT_NO_BYTE_SHUFFLE"
#: Arguments of the compiled loop (all i64).
_NARGS = 15


def _host_has_vbmi() -> bool:
    """Whether the host CPU has AVX-512 VBMI and BW (what the compiled loop needs)."""
    import llvmlite.binding as llvm
    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512vbmi")) and bool(feats.get("avx512bw"))


def available() -> bool:
    """Whether :func:`accumulate` runs here: numba and llvmlite, an AVX-512 VBMI CPU, and
    neither ``APPMULT_NO_BYTE_SHUFFLE`` nor ``APPMULT_NO_NUMBA`` set (to anything but the
    empty string, like ``APPMULT_NO_NUMBA`` in :mod:`appmult.nn.kernels`; read at each call)."""
    if switches.is_set(_DISABLE_ENV) or switches.is_set("APPMULT_NO_NUMBA"):
        return False
    return numba_support.AVAILABLE and _usable()


@functools.lru_cache(maxsize=1)
def _usable() -> bool:
    """Whether the host has VBMI and the loop compiles here (once per process). An llvmlite
    that cannot query the host or compile the module (another LLVM than numba 0.68's) makes
    the callers take the scalar loops, with one warning, instead of failing every layer."""
    return compiles(lambda: _host_has_vbmi() and _compiled() is not None, "the byte-shuffle gather kernel is",
                    "the scalar gather loops")


def compiles(make, what: str, fallback: str) -> bool:
    """``bool(make())`` -- a host check and a module's compilation -- or, where it raises,
    ``False`` with a warning that ``what`` is unavailable and ``fallback`` runs instead (the
    callers cache the answer, so the user is told once)."""
    try:
        return bool(make())
    except Exception as exc:  # noqa: BLE001 - any failure here only means "use the scalar loops"
        warnings.warn(f"appmult: {what} unavailable ({type(exc).__name__}: {exc}); using {fallback}",
                      RuntimeWarning, stacklevel=3)
        return False


def compile_module(ir_text: str, names: list[str]) -> tuple:
    """``(engine, addresses)``: LLVM IR compiled for the host CPU (all its features, -O3);
    the addresses of the functions ``names`` as an int64 array (the engine is kept with them:
    it owns the code)."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    target = llvm.Target.from_default_triple()
    tm = target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                      opt=3)
    passes = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(mod, passes)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    return engine, np.array([engine.get_function_address(name) for name in names], np.int64)


@functools.lru_cache(maxsize=1)
def _compiled() -> tuple:
    """``(engine, addresses)`` of ``gather16_1 .. gather16_<MAX_BLOCKS>``, compiled once per process."""
    return compile_module(module_ir(), [f"gather16_{n}" for n in range(1, MAX_BLOCKS + 1)])


if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.extending import intrinsic as _intrinsic

    @_intrinsic
    def _call_loop(typingctx, addr, a, koff, b, ldb, k, planes, out, ldo, j0, j1, p0, c0, c1, xs, poff):
        """Call the compiled loop at ``addr`` (a C function of 15 int64 arguments)."""
        sig = _types.void(*([_types.int64] * (_NARGS + 1)))

        def codegen(context, builder, signature, args):
            i64 = _ir.IntType(64)
            fnty = _ir.FunctionType(_ir.VoidType(), [i64] * _NARGS)
            fn = builder.inttoptr(args[0], fnty.as_pointer())
            builder.call(fn, args[1:])
            return context.get_dummy_value()
        return sig, codegen

    @njit(parallel=True, cache=True)
    def _drive_batched(addrs, a, a_step, koff, b, b_step, ldb, k, planes, out, o_step, ldo, nout, nblocks, nitems,
                       jtile, c0, c1, xs, poff):  # pragma: no cover
        # ``nitems`` independent products of the same shape (one: steps 0): item ``i`` reads
        # its indices at ``a + i a_step``, its weights at ``b + i b_step``, writes ``out + i
        # o_step`` (steps in bytes). Tasks: (item, tile of output rows, chunk of up to
        # MAX_BLOCKS 64-position blocks); a chunk's activation slab (K x 64*blocks bytes)
        # stays in L2 for all rows of the tile
        nchunks = (nblocks + MAX_BLOCKS - 1) // MAX_BLOCKS
        ntiles = (nout + jtile - 1) // jtile
        per_item = ntiles * nchunks
        for t in prange(nitems * per_item):
            i = t // per_item
            r = t % per_item
            c = r // ntiles
            j0 = (r % ntiles) * jtile
            j1 = min(nout, j0 + jtile)
            blk0 = c * MAX_BLOCKS
            nb = min(MAX_BLOCKS, nblocks - blk0)
            _call_loop(addrs[nb - 1], a + i * a_step, koff, b + i * b_step, ldb, k, planes, out + i * o_step, ldo,
                       np.int64(j0), np.int64(j1), np.int64(blk0 * LANES), c0, c1, xs, poff)


def planes(t16: np.ndarray) -> np.ndarray:
    """``(256, 512)`` uint8 byte planes of a uint16 table indexed ``[w, x]`` (at most 256 x 256;
    a smaller table is padded with zeros its indices never reach): row ``w`` holds the low
    bytes of ``t16[w, :]``, then the high bytes."""
    if t16.ndim != 2 or t16.shape[0] > 256 or t16.shape[1] > 256 or t16.dtype != np.uint16:
        raise ValueError(f"byte planes need a uint16 table of at most 256 x 256, not {t16.shape} {t16.dtype}")
    full = np.zeros((256, 256), np.uint16)
    full[:t16.shape[0], :t16.shape[1]] = t16
    return np.ascontiguousarray(np.concatenate([(full & 0xFF).astype(np.uint8), (full >> 8).astype(np.uint8)], 1))


def wrap32(v: int) -> int:
    """``v`` modulo ``2**32`` as a signed int32 value (the loop's arithmetic: a start value
    outside int32 still gives the exact total wherever the total fits)."""
    return (int(v) + (1 << 31)) % (1 << 32) - (1 << 31)


@functools.lru_cache(maxsize=1)
def _identity_planes() -> np.ndarray:
    """Planes whose row 0 is ``T[0, x] = x`` (low bytes ``0 .. 255``, high bytes 0)."""
    t = np.zeros((256, 256), np.uint16)
    t[0] = np.arange(256)
    return planes(t)


def field_sums(src: np.ndarray, koff: np.ndarray, poff: np.ndarray, lo_x: int) -> np.ndarray:
    """``(P,)`` int32: ``sum_k (x[k, p] + lo_x)`` -- each position's sum of activation values
    (indices read as for :func:`accumulate_at`), by the same loop on the identity table:
    one output row, so about ``1/nout`` of the layer's look-ups (exact: at most ``K * 255``
    plus ``K lo_x``, far inside int32 for any 8-bit layer)."""
    kk = koff.shape[0]
    one = np.zeros(1, np.int32)
    return accumulate_at(src, koff, poff, np.zeros((1, kk), np.uint8), _identity_planes(),
                         np.array([kk * lo_x], np.int32), one, np.zeros(poff.shape[0] * LANES, np.int32))[0]


def accumulate(a: np.ndarray, b: np.ndarray, byte_planes: np.ndarray, c0: np.ndarray, c1: np.ndarray,
               xs: np.ndarray) -> np.ndarray:
    """``out[j, p] = c0[j] + c1[j] * xs[p] + sum_k T[b[j, k], a[k, p]]`` (int32, wrapping).

    Args:
        a: ``(K, P)`` uint8 activation indices, C-contiguous, ``P`` a multiple of 64 (pad
            with any index; the padded positions' outputs are computed and meaningless).
        b: ``(nout, K)`` uint8 weight indices, C-contiguous.
        byte_planes: from :func:`planes`.
        c0, c1: ``(nout,)`` int32; xs: ``(P,)`` int32.

    Returns:
        ``(nout, P)`` int32.

    Raises:
        ValueError: shapes, dtypes or layouts the loop does not take (a bug in the caller).
    """
    if a.ndim != 2 or not a.flags.c_contiguous:
        raise ValueError(f"byte-shuffle gather: a must be a C-contiguous 2-D array, not {a.shape}")
    kk, npos = a.shape
    if npos % LANES:
        raise ValueError(f"byte-shuffle gather: {npos} positions are not a multiple of {LANES} (pad them)")
    poff = np.arange(npos // LANES, dtype=np.int64) * LANES
    if npos and b.ndim == 2 and b.shape[0]:
        koff = np.arange(kk, dtype=np.int64) * npos
    else:  # nothing to compute: no step offsets (K may be 2**31: 16 GB of them)
        koff, b = np.zeros(0, np.int64), (b[:, :0] if b.ndim == 2 else b)
    return accumulate_at(a.reshape(-1), koff, poff, b, byte_planes, c0, c1, xs)


def accumulate_at(src: np.ndarray, koff: np.ndarray, poff: np.ndarray, b: np.ndarray, byte_planes: np.ndarray,
                  c0: np.ndarray, c1: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """:func:`accumulate` with the activation indices read in place: the 64 indices of step
    ``k`` at positions ``64 q .. 64 q + 63`` are ``src[koff[k] + poff[q] :][:64]``.

    Args:
        src: 1-D uint8 array holding every index the offsets reach.
        koff: ``(K,)`` int64 offsets of the reduction steps.
        poff: ``(P / 64,)`` int64 offsets of the position blocks.
        b, byte_planes, c0, c1, xs: as for :func:`accumulate` (``xs``: ``(P,)``).

    Returns:
        ``(nout, P)`` int32.

    Raises:
        ValueError: wrong shapes, dtypes or layouts, or an offset outside ``src`` (a bug in
            the caller; checked before the loop reads anything).
    """
    npos = poff.shape[0] * LANES
    nout = b.shape[0]
    _check(src, koff, poff, b, byte_planes, c0, c1, xs)
    out = np.empty((nout, npos), np.int32)
    if nout == 0 or npos == 0:
        return out
    _launch(src, koff, poff, b, byte_planes, out, c0, c1, xs, 1, (0, 0, 0))
    return out


def _launch(src, koff, poff, b, byte_planes, out, c0, c1, xs, nitems: int, steps: tuple[int, int, int]) -> None:
    """Run the compiled loop over ``nitems`` products (``steps``: the byte distances between
    items in ``src``, ``b`` and ``out``), all rows and blocks; the operands are checked."""
    kk, nblocks = koff.shape[0], poff.shape[0]
    nout = c0.shape[0]
    _, addrs = _compiled()
    nchunks = -(-nblocks // MAX_BLOCKS)
    threads = max(1, numba_support.num_threads())
    # a few tasks per thread (balance on a shared machine); a task's rows share its slab of
    # activation indices (in L2), so split the rows only where chunks are too few
    ntiles = max(1, min(nout, -(-TASKS_PER_THREAD * threads // (nchunks * nitems))))
    jtile = -(-nout // ntiles)
    _drive_batched(addrs, src.ctypes.data, steps[0], koff.ctypes.data, b.ctypes.data, steps[1], kk, kk,
                   byte_planes.ctypes.data, out.ctypes.data, steps[2], nblocks * LANES, nout, nblocks, nitems, jtile,
                   c0.ctypes.data, c1.ctypes.data, xs.ctypes.data, poff.ctypes.data)


def accumulate_batched(a: np.ndarray, b: np.ndarray, byte_planes: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """``out[i, j, p] = c0[j] + sum_k T[b[i, j, k], a[i, k, p]]`` (int32, wrapping): a batch of
    independent products (each item its own weights, as in attention's ``Q K^T``) in one call.

    Args:
        a: ``(B, K, P)`` uint8, C-contiguous, ``P`` a multiple of 64.
        b: ``(B, nout, K)`` uint8, C-contiguous.
        byte_planes: from :func:`planes`.
        c0: ``(nout,)`` int32 start values.

    Returns:
        ``(B, nout, P)`` int32.

    Raises:
        ValueError: shapes, dtypes or layouts the loop does not take (a bug in the caller).
    """
    ok = (a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0] and a.shape[1] == b.shape[2]
          and a.dtype == np.uint8 and b.dtype == np.uint8 and a.flags.c_contiguous and b.flags.c_contiguous
          and byte_planes.shape == (256, 512) and byte_planes.dtype == np.uint8 and byte_planes.flags.c_contiguous
          and c0.dtype == np.int32 and c0.shape == b.shape[1:2] and c0.flags.c_contiguous)
    if not ok:
        raise ValueError("byte-shuffle gather: batched operands of the wrong shape, dtype or layout "
                         f"(a {a.shape} {a.dtype}, b {b.shape} {b.dtype}, planes {byte_planes.shape}, c0 {c0.shape})")
    nitems, kk, npos = a.shape
    nout = b.shape[1]
    if npos % LANES:
        raise ValueError(f"byte-shuffle gather: {npos} positions are not a multiple of {LANES} (pad them)")
    out = np.empty((nitems, nout, npos), np.int32)
    if nitems == 0 or nout == 0 or npos == 0:
        return out
    koff = np.arange(kk, dtype=np.int64) * npos
    poff = np.arange(npos // LANES, dtype=np.int64) * LANES
    _launch(a, koff, poff, b, byte_planes, out, c0, np.zeros(nout, np.int32), np.zeros(npos, np.int32), nitems,
            (kk * npos, nout * kk, 4 * nout * npos))
    return out


def _check(src, koff, poff, b, byte_planes, c0, c1, xs) -> None:
    kk, nblocks = koff.shape[0], poff.shape[0]
    nout = b.shape[0]
    ok = (src.ndim == 1 and src.dtype == np.uint8 and src.flags.c_contiguous
          and koff.ndim == 1 and poff.ndim == 1 and koff.dtype == np.int64 and poff.dtype == np.int64
          and koff.flags.c_contiguous and poff.flags.c_contiguous
          and b.dtype == np.uint8 and b.flags.c_contiguous and b.shape == (nout, kk)
          and byte_planes.shape == (256, 512) and byte_planes.dtype == np.uint8 and byte_planes.flags.c_contiguous
          and all(v.dtype == np.int32 and v.flags.c_contiguous for v in (c0, c1, xs))
          and c0.shape == (nout,) and c1.shape == (nout,) and xs.shape == (nblocks * LANES,))
    if not ok:
        raise ValueError("byte-shuffle gather: operands of the wrong shape, dtype or layout "
                         f"(src {src.shape} {src.dtype}, koff {koff.shape} {koff.dtype}, poff {poff.shape} "
                         f"{poff.dtype}, b {b.shape} {b.dtype}, planes {byte_planes.shape}, c0 {c0.shape}, "
                         f"c1 {c1.shape}, xs {xs.shape})")
    if kk and nblocks and nout:
        lo = int(koff.min()) + int(poff.min())
        hi = int(koff.max()) + int(poff.max()) + LANES
        if lo < 0 or hi > src.shape[0]:
            raise ValueError(f"byte-shuffle gather: offsets reach bytes {lo} .. {hi - 1} "
                             f"of a {src.shape[0]}-byte source")
