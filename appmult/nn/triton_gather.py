"""The three gather kernels as Triton programs, for CUDA tensors.

On the CPU the gathers run in numba (:mod:`appmult.nn.gather_loops`, byte and float
shuffles); elsewhere :func:`appmult.nn.kernels._torch_gather` computes them with torch
ops, which materialize a ``(batch, k-chunk, outputs, positions)`` tensor of indices and
one of looked-up values per chunk: several bytes of device memory written and read again
for every look-up. These programs do each look-up in registers instead: a program owns a
tile of outputs, keeps its accumulators in registers, and walks the reduction, loading
the two operands' indices and reading the table through the cache (a 256x256 int32
product table is 256 KB: it stays in L2, its hot rows in L1). Same sums as the numba and
torch kernels:

* :func:`forward`: ``out[n, g*Ng+j, i] = sum_k T[a[n, g*Kg+k, i], b[g*Ng+j, k]]``, integer
  (the table's dtype, int32 or int64, wrapping like the other kernels' int32; the callers
  choose int64 where int32 could overflow), bit for bit the CPU's;
* :func:`grad_a`: ``out[n, g*Kg+k, i] = sum_j grad[n, g*Ng+j, i] * T[a[n, g*Kg+k, i], b[g*Ng+j, k]]``;
* :func:`grad_b`: ``out[g*Ng+j, k] = sum_n sum_i grad[n, g*Ng+j, i] * T[a[n, g*Kg+k, i], b[g*Ng+j, k]]``;

the two gradients in float32 (the sums in another order than the CPU's: equal to
rounding, not bit for bit).

Triton is imported on first use (it is not a dependency: CI and the CPU never load it);
:func:`usable` says whether these programs run for the given tensors (all on CUDA, Triton
importable, :data:`ENABLED` and no ``APPMULT_NO_TRITON=1``). Under ``TRITON_INTERPRET=1``
Triton's interpreter runs them on CPU tensors (slowly): ``tests/test_nn_triton_gather.py``
uses that where Triton is installed without a GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import switches

__all__ = ["ENABLED", "forward", "grad_a", "grad_b", "usable"]

#: Switch for the Triton gathers (``False``: the torch fallback runs on CUDA; benchmarks
#: compare the two this way). ``APPMULT_NO_TRITON=1`` turns them off too.
ENABLED = True


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load means "not available"
        return False
    return True


#: Set when a program failed its first launch (no compiler, an unsupported GPU...): the
#: torch gathers run from then on, after one warning.
_failed: list[str] = []
_launched: set[str] = set()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`forward`/:func:`grad_a`/:func:`grad_b` run for these tensors."""
    return (ENABLED and not _failed and switches.value("APPMULT_NO_TRITON") in ("", "0")
            and all(t.device.type == "cuda" for t in tensors) and _triton_imports())


#: Tile shapes and warps the autotuner chooses among (per program: ``BJ`` outputs x ``BL``
#: positions for the forward and the weight gradient, ``BK`` reductions x ``BL`` positions
#: for the activation gradient). Where tiles are fixed (:func:`_fixed_tiles`) the first runs.
FWD_CONFIGS = ((32, 128, 4), (32, 64, 4), (16, 64, 4), (32, 128, 8), (64, 64, 8))
GA_CONFIGS = ((32, 32, 4), (16, 32, 4), (32, 64, 4), (32, 64, 8))
GB_CONFIGS = ((32, 128, 4), (16, 64, 4), (32, 64, 4), (32, 128, 8))
#: ``True``: forward tables whose entries span fewer than ``2**16`` values (every 8x8
#: multiplier's) are read as int16 offsets from their middle -- half the bytes of int32, so a
#: 256x256 table (128 KB) can stay in a multiprocessor's L1. Measured on an H200 (autotuned
#: tiles, ``benchmarks/bench_triton_gather.py``): 25% faster on the ResNet-20 conv's gather,
#: 1.7x slower on the LeNet conv's and 15% slower on the linear layer's, and finding the
#: table's range costs a device-to-host copy per call; so off by default (the table as given).
TABLE16 = False


def _interpreting() -> bool:
    return switches.value("TRITON_INTERPRET", "0") == "1"


def _fixed_tiles() -> bool:
    """No autotuning: under the interpreter, or ``APPMULT_TRITON_AUTOTUNE=0`` (each new
    problem shape costs the autotuner a compile and a short timing per config: tests of
    many small shapes turn it off)."""
    return _interpreting() or switches.value("APPMULT_TRITON_AUTOTUNE", "1") == "0"


def _tuning_bench(kernel_call, quantiles):
    """The autotuner's timing of one config: CUDA events, 5 ms warm-up, 25 ms of runs."""
    from triton.testing import do_bench
    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int by ``int(array)``, which numpy
    2.4 refuses for a one-element 1-d array: read the element instead (interpreter only)."""
    import numpy as np
    from triton.runtime import interpreter as interp

    orig = interp._patch_lang_tensor
    if getattr(orig, "appmult_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched.appmult_shim = True
    interp._patch_lang_tensor = patched


@functools.lru_cache(maxsize=4)
def _programs(fixed: bool):
    """The three Triton programs (autotuned over the configs above unless ``fixed``),
    compiled lazily by Triton on first launch."""
    import triton
    import triton.language as tl

    if _interpreting():
        _interpreter_numpy_shim()

    def tuned(configs, names, fn):
        if fixed:
            return fn
        return triton.autotune([triton.Config(dict(zip(names, c[:2])), num_warps=c[2]) for c in configs],
                               key=["L", "KG", "NG"], do_bench=_tuning_bench)(fn)

    @triton.jit
    def fwd(a_ptr, bt_ptr, t_ptr, out_ptr, L, KG, NG, G, NB, OFFSET,
            BJ: tl.constexpr, BL: tl.constexpr):
        # a: (N, G*KG, L); bt: (G, KG, NG) (b transposed per group); out: (N, G*NG, L)
        pid_l = tl.program_id(0)
        pid_j = tl.program_id(1)
        pid_ng = tl.program_id(2)
        n = pid_ng // G
        g = pid_ng % G
        offs_l = pid_l * BL + tl.arange(0, BL)
        offs_j = pid_j * BJ + tl.arange(0, BJ)
        ml = offs_l < L
        mj = offs_j < NG
        a_row = a_ptr + (n.to(tl.int64) * G + g) * KG * L + offs_l
        b_row = bt_ptr + g.to(tl.int64) * KG * NG + offs_j
        acc = tl.zeros((BJ, BL), dtype=out_ptr.dtype.element_ty)
        for k in range(0, KG):
            av = tl.load(a_row + k * L, mask=ml, other=0).to(tl.int32)
            bv = tl.load(b_row + k * NG, mask=mj, other=0).to(tl.int32)
            vals = tl.load(t_ptr + (av[None, :] * NB + bv[:, None]), mask=mj[:, None] & ml[None, :], other=0)
            acc += vals.to(out_ptr.dtype.element_ty)
        acc += OFFSET
        out = out_ptr + ((n.to(tl.int64) * G + g) * NG + offs_j[:, None]) * L + offs_l[None, :]
        tl.store(out, acc, mask=mj[:, None] & ml[None, :])

    @triton.jit
    def ga(a_ptr, b_ptr, t_ptr, g_ptr, out_ptr, L, KG, NG, G, NB,
           BK: tl.constexpr, BL: tl.constexpr):
        # a: (N, G*KG, L); b: (G*NG, KG); grad: (N, G*NG, L); out: (N, G*KG, L)
        pid_l = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_ng = tl.program_id(2)
        n = pid_ng // G
        g = pid_ng % G
        offs_l = pid_l * BL + tl.arange(0, BL)
        offs_k = pid_k * BK + tl.arange(0, BK)
        ml = offs_l < L
        mk = offs_k < KG
        m2 = mk[:, None] & ml[None, :]
        base = ((n.to(tl.int64) * G + g) * KG + offs_k[:, None]) * L + offs_l[None, :]
        av = tl.load(a_ptr + base, mask=m2, other=0).to(tl.int32) * NB
        g_row = g_ptr + (n.to(tl.int64) * G + g) * NG * L + offs_l
        b_row = b_ptr + g.to(tl.int64) * NG * KG + offs_k
        acc = tl.zeros((BK, BL), dtype=tl.float32)
        for j in range(0, NG):
            gv = tl.load(g_row + j * L, mask=ml, other=0.0)
            bv = tl.load(b_row + j * KG, mask=mk, other=0).to(tl.int32)
            acc += tl.load(t_ptr + (av + bv[:, None]), mask=m2, other=0.0) * gv[None, :]
        tl.store(out_ptr + base, acc, mask=m2)

    @triton.jit
    def gb(a_ptr, b_ptr, t_ptr, g_ptr, out_ptr, N, L, KG, NG, G, NB,
           BJ: tl.constexpr, BL: tl.constexpr):
        # a: (N, G*KG, L); b: (G*NG, KG); grad: (N, G*NG, L); out: (G*NG, KG)
        k = tl.program_id(0)
        pid_j = tl.program_id(1)
        g = tl.program_id(2)
        offs_j = pid_j * BJ + tl.arange(0, BJ)
        mj = offs_j < NG
        bv = tl.load(b_ptr + (g.to(tl.int64) * NG + offs_j) * KG + k, mask=mj, other=0).to(tl.int32)
        acc = tl.zeros((BJ, BL), dtype=tl.float32)
        for n in range(0, N):
            ng_ = (n * G + g).to(tl.int64)
            a_row = a_ptr + (ng_ * KG + k) * L
            g_rows = g_ptr + (ng_ * NG + offs_j[:, None]) * L
            for l0 in range(0, L, BL):
                offs_l = l0 + tl.arange(0, BL)
                ml = offs_l < L
                m2 = mj[:, None] & ml[None, :]
                av = tl.load(a_row + offs_l, mask=ml, other=0).to(tl.int32)
                gv = tl.load(g_rows + offs_l[None, :], mask=m2, other=0.0)
                acc += tl.load(t_ptr + (av[None, :] * NB + bv[:, None]), mask=m2, other=0.0) * gv
        tl.store(out_ptr + (g.to(tl.int64) * NG + offs_j) * KG + k, tl.sum(acc, axis=1), mask=mj)

    return (tuned(FWD_CONFIGS, ("BJ", "BL"), fwd), tuned(GA_CONFIGS, ("BK", "BL"), ga),
            tuned(GB_CONFIGS, ("BJ", "BL"), gb))


def _launch(which: str, grid, configs, names, *args) -> bool:
    """``program[grid](*args)``: ``grid(meta)`` with the autotuner's tile sizes, or with the
    first config's where tiles are fixed (:func:`_fixed_tiles`). ``False`` where the program's
    first launch in this process failed (after a warning; the caller takes the torch path
    and :func:`usable` says no from then on); a failure after a successful launch raises."""
    fixed = _fixed_tiles()
    program = _programs(fixed)[("fwd", "ga", "gb").index(which)]
    try:
        if fixed:
            meta = dict(zip(names, configs[0][:2]))
            program[grid(meta)](*args, **meta, num_warps=configs[0][2])
        else:
            program[grid](*args)
    except Exception as exc:  # noqa: BLE001 - compilation/launch failures of any kind
        if which in _launched:
            raise
        _failed.append(f"{which}: {exc!r}")
        warnings.warn(f"the Triton gather program '{which}' failed its first launch ({exc!r}); the torch "
                      "gathers run instead (APPMULT_NO_TRITON=1 skips Triton)", RuntimeWarning, stacklevel=3)
        return False
    _launched.add(which)
    return True


def _table16(table: torch.Tensor, kg: int) -> tuple[torch.Tensor, int]:
    """``(table as read by the forward, the sum's offset)``: int16 ``table - mid`` and
    ``kg * mid`` where the entries span fewer than ``2**16`` values and :data:`TABLE16`, else
    the table itself and 0. The offset is taken modulo ``2**32`` for an int32 result: the
    sum is then the same modulo ``2**32`` as the plain one, i.e. the same int32."""
    if not TABLE16 or table.numel() == 0:
        return table.contiguous(), 0
    lo, hi = (int(v) for v in torch.aminmax(table))
    if hi - lo >= 1 << 16:
        return table.contiguous(), 0
    mid = lo + (1 << 15)
    offset = kg * mid
    if table.dtype == torch.int32:
        offset = (offset + (1 << 31)) % (1 << 32) - (1 << 31)
    return (table.to(torch.int64) - mid).to(torch.int16).contiguous(), offset


def _small(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices as uint8 where the table has at most 256 entries that way (a quarter of int32's
    bytes to read), else int32; contiguous."""
    return idx.to(torch.uint8 if n <= 256 else torch.int32).contiguous()


def _shapes(a: torch.Tensor, b: torch.Tensor, groups: int) -> tuple[int, int, int, int, int]:
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    if groups < 1 or ktot != groups * kg or nout % groups:
        raise ValueError(f"gather shapes do not match: a {tuple(a.shape)}, b {tuple(b.shape)}, groups {groups}")
    return nbatch, ktot, length, nout, kg


def forward(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, groups: int) -> torch.Tensor | None:
    """``(N, G*Ng, L)`` sums of ``table`` (int32 or int64: the result's dtype) over ``k``, or
    ``None`` where the program could not be launched (see :func:`_launch`).

    Args:
        a: ``(N, G*Kg, L)`` activation indices (checked by the caller to lie in the table).
        b: ``(G*Ng, Kg)`` weight indices (likewise).
        table: ``(NA, NB)`` integer table indexed ``[a, b]``.
        groups: ``G``.
    """
    nbatch, _, length, nout, kg = _shapes(a, b, groups)
    ng = nout // groups
    na, nb_ = table.shape
    out = torch.empty((nbatch, nout, length), dtype=table.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if kg == 0:
        return out.zero_()
    bt = _small(b, nb_).reshape(groups, ng, kg).transpose(1, 2).contiguous()
    tab, offset = _table16(table, kg)

    def grid(meta):
        return ((length + meta["BL"] - 1) // meta["BL"], (ng + meta["BJ"] - 1) // meta["BJ"], nbatch * groups)
    ok = _launch("fwd", grid, FWD_CONFIGS, ("BJ", "BL"), _small(a, na), bt, tab, out, length, kg, ng, groups, nb_,
                 offset)
    return out if ok else None


def grad_a(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, grad: torch.Tensor,
           groups: int) -> torch.Tensor | None:
    """``(N, G*Kg, L)`` float32 gradient of the activation indices' positions (see the module),
    or ``None`` as for :func:`forward`."""
    nbatch, ktot, length, nout, kg = _shapes(a, b, groups)
    ng = nout // groups
    na, nb_ = table.shape
    out = torch.zeros((nbatch, ktot, length), dtype=torch.float32, device=a.device)
    if out.numel() == 0 or ng == 0:
        return out
    def grid(meta):
        return ((length + meta["BL"] - 1) // meta["BL"], (kg + meta["BK"] - 1) // meta["BK"], nbatch * groups)
    ok = _launch("ga", grid, GA_CONFIGS, ("BK", "BL"), _small(a, na), _small(b, nb_),
                 table.to(torch.float32).contiguous(), grad.to(torch.float32).contiguous(), out, length, kg, ng, groups,
                 nb_)
    return out if ok else None


def grad_b(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, grad: torch.Tensor,
           groups: int) -> torch.Tensor | None:
    """``(G*Ng, Kg)`` float32 gradient of the weight indices' positions (see the module),
    or ``None`` as for :func:`forward`."""
    nbatch, _, length, nout, kg = _shapes(a, b, groups)
    ng = nout // groups
    na, nb_ = table.shape
    out = torch.zeros((nout, kg), dtype=torch.float32, device=a.device)
    if out.numel() == 0 or nbatch * length == 0:
        return out
    def grid(meta):
        return (kg, (ng + meta["BJ"] - 1) // meta["BJ"], groups)
    ok = _launch("gb", grid, GB_CONFIGS, ("BJ", "BL"), _small(a, na), _small(b, nb_),
                 table.to(torch.float32).contiguous(), grad.to(torch.float32).contiguous(), out, nbatch, length, kg, ng,
                 groups, nb_)
    return out if ok else None
