"""The LUT-2D gradient gathers by byte shuffles: float32 table rows looked up 64 at a time.

The LUT-2D backward of a gather layer needs, for a float32 gradient table ``T`` indexed
``[weight code, activation code]`` (the transposed ``gx2``/``gw2``), 8-bit indices ``a``
``(N, G*Kg, L)`` and ``b`` ``(G*Ng, Kg)`` and the output gradient ``grad`` ``(N, G*Ng, L)``:

* :func:`grad_a`: ``out[n, g*Kg+k, i] = sum_j grad[n, j, i] * T[b[j, k], a[n, g*Kg+k, i]]``;
* :func:`grad_b`: ``out[j, k] = sum_n sum_i grad[n, j, i] * T[b[j, k], a[n, g*Kg+k, i]]``.

The scalar loops of :mod:`appmult.nn.gather_loops` look up about one entry per cycle per
core. Here a weight code's row ``T[w, :]`` (256 floats, 1 KB) is held as four byte planes in
sixteen 64-byte registers; ``vpermi2b`` looks 64 activation indices up in 128 bytes of a
plane (index bits 0-6), bit 7 picks the half, and the four byte vectors interleave into 64
floats -- the table's own bits, so every look-up is exact. Then ``grad * value`` (rounded)
is added (rounded) to 64 per-position sums:

* :func:`grad_a` adds, for each position, in the order of ``j`` -- the scalar loop's
  operations in its order, so its results are the scalar loop's bit for bit;
* :func:`grad_b` sums the (float32) products per lane over a batch item's position blocks
  in float32, then in float64 over the batch, the 64 lanes added pairwise at the end: a
  different order from the scalar loop's one float64 running sum, so equal to it up to
  rounding, not bit for bit.

Positions past the last multiple of 64 go through the same loops as one more block, copied
and padded with index 0 and gradient 0 (a padded position adds 0). The loops are LLVM IR compiled by llvmlite for the host CPU once per process (with
:func:`appmult.nn.byte_shuffle.compile_module`) and called per task from cached numba
``prange`` drivers. :func:`available` follows :func:`appmult.nn.byte_shuffle.available`
(AVX-512 VBMI, ``APPMULT_NO_BYTE_SHUFFLE``, ``APPMULT_NO_NUMBA``) and this module's own
compilation; elsewhere the callers keep the scalar loops.
"""

from __future__ import annotations

import functools

import numpy as np

from . import byte_shuffle
from .numba_support import njit, numba, prange

#: Positions per look-up step.
LANES = 64
#: Bytes of one table row's planes (4 planes x 256 entries).
ROW_BYTES = 1024

_V8 = "<64 x i8>"
_VF = "<64 x float>"
_VPERMI2B = "@llvm.x86.avx512.vpermi2var.qi.512"


def _interleave(n: int) -> str:
    """``<0, n, 1, n + 1, ...>``: two ``n``-element vectors' elements alternated."""
    return ", ".join(f"i32 {i // 2 + (n if i % 2 else 0)}" for i in range(2 * n))


def _ir_row(prefix: str, base: str) -> list[str]:
    """Load the 16 plane registers of the row at address ``%base`` as ``%<prefix>r0..15``
    (plane ``p``, quarter ``q``: register ``4 p + q``)."""
    lines = []
    for r in range(16):
        lines += [f"  %{prefix}ra{r} = add i64 %{base}, {64 * r}",
                  f"  %{prefix}rp{r} = inttoptr i64 %{prefix}ra{r} to ptr",
                  f"  %{prefix}r{r} = load {_V8}, ptr %{prefix}rp{r}, align 1"]
    return lines


def _ir_lookup(prefix: str, idx_addr: str) -> list[str]:
    """``%<prefix>v``: the 64 floats of the row ``%<prefix>r*`` at the indices at ``%idx_addr``."""
    p = prefix
    lines = [f"  %{p}ip = inttoptr i64 %{idx_addr} to ptr",
             f"  %{p}x = load {_V8}, ptr %{p}ip, align 1",
             f"  %{p}m = icmp slt {_V8} %{p}x, zeroinitializer"]  # index bit 7: the upper 128 entries
    for q in range(4):
        r = 4 * q
        lines += [
            f"  %{p}lo{q} = call {_V8} {_VPERMI2B}({_V8} %{p}r{r}, {_V8} %{p}x, {_V8} %{p}r{r + 1})",
            f"  %{p}hi{q} = call {_V8} {_VPERMI2B}({_V8} %{p}r{r + 2}, {_V8} %{p}x, {_V8} %{p}r{r + 3})",
            f"  %{p}b{q} = select <64 x i1> %{p}m, {_V8} %{p}hi{q}, {_V8} %{p}lo{q}",
        ]
    lines += [
        f"  %{p}w01 = shufflevector {_V8} %{p}b0, {_V8} %{p}b1, <128 x i32> <{_interleave(64)}>",
        f"  %{p}w23 = shufflevector {_V8} %{p}b2, {_V8} %{p}b3, <128 x i32> <{_interleave(64)}>",
        f"  %{p}h01 = bitcast <128 x i8> %{p}w01 to <64 x i16>",
        f"  %{p}h23 = bitcast <128 x i8> %{p}w23 to <64 x i16>",
        f"  %{p}d = shufflevector <64 x i16> %{p}h01, <64 x i16> %{p}h23, <128 x i32> <{_interleave(64)}>",
        f"  %{p}v = bitcast <128 x i16> %{p}d to {_VF}",
    ]
    return lines


def _ir_loop_head(skip: str) -> list[str]:
    """The entry (to ``%skip`` where there are no rows or no steps), the table row's registers
    and the head of the loop over batch items ``%r``."""
    return ["entry:", "  %hasr = icmp sgt i64 %nrows, 0", "  %hasi = icmp sgt i64 %n64, 0",
            "  %go = and i1 %hasr, %hasi", f"  br i1 %go, label %load, label %{skip}", "load:",
            *_ir_row("", "row"), "  br label %rows", "rows:", "  %r = phi i64 [0, %load], [%rnext, %rows_end]"]


def _ir_row_bases() -> list[str]:
    """Batch item ``%r``'s index and gradient rows: ``%abase = a + r lda``, ``%gbase = g + 4 r ldg``."""
    return ["  %aoff = mul i64 %r, %lda", "  %abase = add i64 %a, %aoff", "  %goff = mul i64 %r, %ldg",
            "  %goffb = shl i64 %goff, 2", "  %gbase = add i64 %g, %goffb"]


def _ir_product() -> list[str]:
    """Step ``%i``: the 64 looked-up floats times the gradient there, ``%prod`` (``%ib``: the
    step's byte offset in float rows)."""
    return ["  %ia = add i64 %abase, %i", *_ir_lookup("", "ia"), "  %ib = shl i64 %i, 2",
            "  %ga = add i64 %gbase, %ib", "  %gp = inttoptr i64 %ga to ptr",
            f"  %gv = load {_VF}, ptr %gp, align 4", f"  %prod = fmul {_VF} %gv, %v"]


def _grad_a_ir() -> str:
    """``@fgrad_a(row, a, lda, g, ldg, out, ldo, nrows, n64)`` (all i64, addresses as
    integers; strides in elements): for ``r < nrows`` and ``i < n64`` (a multiple of 64):
    ``out[r * ldo + i] += g[r * ldg + i] * T_row[a[r * lda + i]]`` (float32, the product
    rounded, then the sum). One row's planes serve every batch item of the call."""
    lines = [
        "define void @fgrad_a(i64 %row, i64 %a, i64 %lda, i64 %g, i64 %ldg, i64 %out, i64 %ldo, i64 %nrows,"
        " i64 %n64) {",
    ]
    lines += _ir_loop_head("done")
    lines += _ir_row_bases()
    lines += [
        "  %ooff = mul i64 %r, %ldo",
        "  %ooffb = shl i64 %ooff, 2",
        "  %obase = add i64 %out, %ooffb",
        "  br label %step",
        "step:",
        "  %i = phi i64 [0, %rows], [%inext, %step]",
    ]
    lines += _ir_product()
    lines += [
        "  %oa = add i64 %obase, %ib",
        "  %op = inttoptr i64 %oa to ptr",
        f"  %ov = load {_VF}, ptr %op, align 4",
        f"  %sum = fadd {_VF} %ov, %prod",
        f"  store {_VF} %sum, ptr %op, align 4",
        f"  %inext = add i64 %i, {LANES}",
        "  %imore = icmp slt i64 %inext, %n64",
        "  br i1 %imore, label %step, label %rows_end",
        "rows_end:",
        "  %rnext = add i64 %r, 1",
        "  %rmore = icmp slt i64 %rnext, %nrows",
        "  br i1 %rmore, label %rows, label %done",
        "done:",
        "  ret void",
        "}",
    ]
    return "\n".join(lines)


def _grad_b_ir() -> str:
    """``double @fgrad_b(row, a, lda, g, ldg, nrows, n64)``: ``sum over r < nrows, i < n64`` of
    ``g[r * ldg + i] * T_row[a[r * lda + i]]`` (``lda``, ``ldg`` in elements). The float32
    products are summed per lane over a row's position blocks in float32, then into 64
    float64 sums (the scalar loop sums in float64), added pairwise at the end (``reassoc``:
    a fixed tree, not 64 dependent adds)."""
    vd = "<64 x double>"
    lines = [
        "define double @fgrad_b(i64 %row, i64 %a, i64 %lda, i64 %g, i64 %ldg, i64 %nrows, i64 %n64) {",
    ]
    lines += _ir_loop_head("empty")
    lines += [f"  %wide = phi {vd} [zeroinitializer, %load], [%widen, %rows_end]"]
    lines += _ir_row_bases()
    lines += [
        "  br label %step",
        "step:",
        "  %i = phi i64 [0, %rows], [%inext, %step]",
        f"  %acc = phi {_VF} [zeroinitializer, %rows], [%accn, %step]",
    ]
    lines += _ir_product()
    lines += [
        f"  %accn = fadd {_VF} %acc, %prod",
        f"  %inext = add i64 %i, {LANES}",
        "  %imore = icmp slt i64 %inext, %n64",
        "  br i1 %imore, label %step, label %rows_end",
        "rows_end:",
        f"  %accd = fpext {_VF} %accn to {vd}",
        f"  %widen = fadd {vd} %wide, %accd",
        "  %rnext = add i64 %r, 1",
        "  %rmore = icmp slt i64 %rnext, %nrows",
        "  br i1 %rmore, label %rows, label %total",
        "total:",
        f"  %s = call reassoc double @llvm.vector.reduce.fadd.v64f64(double 0.0, {vd} %widen)",
        "  ret double %s",
        "empty:",
        "  ret double 0.0",
        "}",
    ]
    return "\n".join(lines)


def module_ir() -> str:
    """The LLVM module: ``@fgrad_a`` and ``@fgrad_b``."""
    head = [f"declare {_V8} {_VPERMI2B}({_V8}, {_V8}, {_V8})",
            "declare double @llvm.vector.reduce.fadd.v64f64(double, <64 x double>)"]
    return "\n".join(head + [_grad_a_ir(), _grad_b_ir()]) + "\n"


@functools.lru_cache(maxsize=1)
def _compiled() -> tuple:
    """``(engine, addresses of fgrad_a and fgrad_b)``, compiled once per process."""
    return byte_shuffle.compile_module(module_ir(), ["fgrad_a", "fgrad_b"])


@functools.lru_cache(maxsize=1)
def _usable() -> bool:
    """Whether this module compiles here (once per process; a failure warns once and the
    callers keep the scalar loops)."""
    return byte_shuffle.compiles(_compiled, "the byte-shuffle gradient gathers are", "the scalar loops")


def available() -> bool:
    """Whether :func:`grad_a` and :func:`grad_b` run here (see the module notes)."""
    return byte_shuffle.available() and _usable()


def planes(table_t: np.ndarray) -> np.ndarray:
    """``(rows, 1024)`` uint8: each row of a float32 table indexed ``[w, x]`` (at most 256
    columns; fewer are padded with zeros no index reaches) as four byte planes of 256."""
    if table_t.ndim != 2 or table_t.shape[1] > 256 or table_t.dtype != np.float32:
        raise ValueError(f"byte planes need a float32 table of at most 256 columns, not {table_t.shape} "
                         f"{table_t.dtype}")
    full = np.zeros((table_t.shape[0], 256), np.float32)
    full[:, :table_t.shape[1]] = table_t
    return np.ascontiguousarray(full.view(np.uint8).reshape(-1, 256, 4).transpose(0, 2, 1)).reshape(-1, ROW_BYTES)


def _check(a: np.ndarray, b: np.ndarray, byte_planes: np.ndarray, grad: np.ndarray, groups: int) -> None:
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    if a.dtype != np.uint8 or b.dtype != np.uint8 or byte_planes.dtype != np.uint8 or grad.dtype != np.float32:
        raise ValueError("grad_a/grad_b take uint8 indices and planes and float32 gradients")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and grad.flags.c_contiguous
            and byte_planes.flags.c_contiguous):
        raise ValueError("grad_a/grad_b take C-contiguous arrays")
    if groups < 1 or nout % groups or ktot != groups * kg or grad.shape != (nbatch, nout, length):
        raise ValueError(f"shapes do not match: a {a.shape}, b {b.shape}, grad {grad.shape}, groups {groups}")
    if byte_planes.ndim != 2 or byte_planes.shape[1] != ROW_BYTES or byte_planes.shape[0] > 256:
        raise ValueError(f"planes must be (rows <= 256, {ROW_BYTES}), not {byte_planes.shape}")


def _tails(a: np.ndarray, grad: np.ndarray, n64: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions past ``n64`` of ``a`` and ``grad`` as one 64-position block each, padded
    with index 0 and gradient 0 (a padded position adds ``0 * T[w, 0] = 0``)."""
    rem = a.shape[2] - n64
    at = np.zeros(a.shape[:2] + (LANES,), np.uint8)
    gt = np.zeros(grad.shape[:2] + (LANES,), np.float32)
    at[:, :, :rem] = a[:, :, n64:]
    gt[:, :, :rem] = grad[:, :, n64:]
    return at, gt


def grad_a(a: np.ndarray, b: np.ndarray, byte_planes: np.ndarray, grad: np.ndarray, groups: int,
           rows: int = 0) -> np.ndarray:
    """``(N, G*Kg, L)`` float32, see the module notes; ``byte_planes``: :func:`planes` of the
    table (``rows``: batch items per task, 0 for the default). Indices must be inside the
    table (the caller checks them)."""
    _check(a, b, byte_planes, grad, groups)
    nbatch, ktot, length = a.shape
    out = np.zeros(a.shape, np.float32)
    if out.size == 0 or b.size == 0:
        return out
    if rows <= 0:  # a quarter of the batch per thread, at most 32 items (their sums stay in L2)
        rows = min(32, max(1, -(-nbatch // (4 * numba.get_num_threads()))))
    addr, pl = _compiled()[1][0], byte_planes
    n64 = length - length % LANES
    _drive_grad_a(addr, a, b, pl, grad, groups, rows, n64, out)
    if n64 < length:
        at, gt = _tails(a, grad, n64)
        ot = np.zeros(at.shape, np.float32)
        _drive_grad_a(addr, at, b, pl, gt, groups, rows, LANES, ot)
        out[:, :, n64:] = ot[:, :, :length - n64]
    return out


def grad_b(a: np.ndarray, b: np.ndarray, byte_planes: np.ndarray, grad: np.ndarray, groups: int) -> np.ndarray:
    """``(G*Ng, Kg)`` float32, see the module notes (``byte_planes`` as for :func:`grad_a`).
    Indices must be inside the table."""
    _check(a, b, byte_planes, grad, groups)
    length = a.shape[2]
    out = np.zeros(b.shape, np.float64)
    if out.size == 0 or a.size == 0:
        return out.astype(np.float32)
    addr, pl = _compiled()[1][1], byte_planes
    n64 = length - length % LANES
    _drive_grad_b(addr, a, b, pl, grad, groups, n64, out)
    if n64 < length:
        at, gt = _tails(a, grad, n64)
        _drive_grad_b(addr, at, b, pl, gt, groups, LANES, out)
    return out.astype(np.float32)


if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.core.extending import intrinsic as _intrinsic

    @_intrinsic
    def _call_a(typingctx, addr, row, a, lda, g, ldg, out, ldo, nrows, n64):
        """Call ``@fgrad_a`` at ``addr`` (nine int64 arguments)."""
        sig = _types.void(*([_types.int64] * 10))

        def codegen(context, builder, signature, args):
            i64 = _ir.IntType(64)
            fn = builder.inttoptr(args[0], _ir.FunctionType(_ir.VoidType(), [i64] * 9).as_pointer())
            builder.call(fn, args[1:])
            return context.get_dummy_value()
        return sig, codegen

    @_intrinsic
    def _call_b(typingctx, addr, row, a, lda, g, ldg, nrows, n64):
        """Call ``@fgrad_b`` at ``addr`` (seven int64 arguments, a float64 result)."""
        sig = _types.float64(*([_types.int64] * 8))

        def codegen(context, builder, signature, args):
            i64 = _ir.IntType(64)
            fn = builder.inttoptr(args[0], _ir.FunctionType(_ir.DoubleType(), [i64] * 7).as_pointer())
            return builder.call(fn, args[1:])
        return sig, codegen

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def _drive_grad_a(addr, a, b, planes_, grad, groups, rows, n64, out):  # pragma: no cover - compiled
        # out[..., :n64] += the sums (zero on entry). Tasks: (reduction index ak, chunk of
        # ``rows`` batch items); per output channel j of ak's group, in order, the compiled
        # loop adds grad * T[b[j, k], a] at every position of the chunk's items -- each
        # position's sum from 0.0 in j order, as the scalar kernel adds
        nbatch, ktot, length = a.shape
        nout, kg = b.shape
        ng = nout // groups
        nrc = (nbatch + rows - 1) // rows
        a0, g0, p0, o0 = a.ctypes.data, grad.ctypes.data, planes_.ctypes.data, out.ctypes.data
        for t in prange(ktot * nrc):
            ak = t // nrc
            r0 = (t % nrc) * rows
            nr = min(nbatch, r0 + rows) - r0
            g = ak // kg
            k = ak % kg
            for jj in range(ng):
                j = g * ng + jj
                _call_a(addr, np.int64(p0 + ROW_BYTES * np.int64(b[j, k])), np.int64(a0 + (r0 * ktot + ak) * length),
                        np.int64(ktot * length), np.int64(g0 + 4 * ((r0 * nout + j) * length)),
                        np.int64(nout * length), np.int64(o0 + 4 * ((r0 * ktot + ak) * length)),
                        np.int64(ktot * length), np.int64(nr), np.int64(n64))

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def _drive_grad_b(addr, a, b, planes_, grad, groups, n64, out):  # pragma: no cover - compiled
        # out[j, k] (float64) += the compiled loop's sum over every batch item's first n64
        # positions. Tasks: (j, k)
        nbatch, ktot, length = a.shape
        nout, kg = b.shape
        ng = nout // groups
        a0, g0, p0 = a.ctypes.data, grad.ctypes.data, planes_.ctypes.data
        for t in prange(nout * kg):
            j = t // kg
            k = t % kg
            ak = (j // ng) * kg + k
            out[j, k] += _call_b(addr, np.int64(p0 + ROW_BYTES * np.int64(b[j, k])), np.int64(a0 + ak * length),
                                 np.int64(ktot * length), np.int64(g0 + 4 * j * length), np.int64(nout * length),
                                 np.int64(nbatch), np.int64(n64))
