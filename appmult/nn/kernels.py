"""Kernels that evaluate ``sum_k LUT[a_ik, b_kj]`` and its LUT gradients.

Two families, chosen per LUT (see :func:`choose_kernel`):

* **Low-rank** -- an *exact integer* factorization ``LUT = U @ V.T`` (``U``: one row per
  value of operand ``a``, ``V``: one row per value of ``b``, both integer-valued, rank
  ``r``) turns the approximate GEMM into ordinary GEMMs on operands mapped elementwise
  through the small tables: ``sum_k LUT[A_ik, B_kj] = sum_k sum_r U[A_ik, r] V[B_kj, r]``,
  i.e. one GEMM (or one convolution) with ``r`` times the reduction length. Because the
  factors are integers, every partial sum of that GEMM is an integer; in float32 it is
  therefore exact as long as ``K * S < 2**24`` (``S = max_ab sum_r |U[a,r] V[b,r]|``),
  in float64 as long as ``K * S < 2**53`` -- whatever order the BLAS sums in.
  :func:`integer_factorization` finds such factors and verifies ``U @ V.T == LUT``
  exactly in int64 before they are used.
* **Gather** -- for high-rank LUTs: a sum of table look-ups, accumulated in int32 (exact
  while ``K * max|LUT| < 2**31``, otherwise int64). On CPU, numba kernels
  (``parallel=True``): with many output positions per table entry (convolutions), the
  *row kernel* expands ``e[k, x, j] = LUT[x, B_jk]`` once per call and adds, for every
  position and ``k``, the contiguous row ``e[k, A_k, :]`` (all output channels) to the
  position's accumulator row, over k-blocks whose slab of ``e`` stays in L2
  (:func:`gather_conv_zp` also folds a quantized layer's zero-point cross terms into
  ``e``); with few positions (linear layers) the *weight-row kernel* loads the LUT row of
  each weight code ``LUT[:, B_kj]`` once and uses it for every position (a task owns a
  tile of output channels and all positions), from a uint16 copy of the table offset by
  its minimum where the entries span fewer than ``2**16`` values (half the cache
  footprint; the offset is added back exactly), and :func:`gather_linear_zp` starts its
  accumulators at the zero-point cross terms so a quantized linear layer needs no other
  pass. Where the CPU has AVX-512 VBMI, the *byte-shuffle kernel*
  (:mod:`appmult.nn.byte_shuffle`: 64 look-ups of a 16-bit table per four ``vpermi2b``,
  about 4-8x the scalar loops' rate) replaces both for one-group layers whose table spans
  fewer than ``2**16`` values (every 8x8 multiplier's): the fused conv reads the receptive
  fields of a batch-inner image in place (no unfold) or an unfolded copy, the fused linear
  layer and :func:`gather_forward` a ``(K, positions)`` layout; ``APPMULT_NO_BYTE_SHUFFLE=1``
  turns it off. On CUDA, Triton programs (:mod:`appmult.nn.triton_gather`, when Triton is
  installed; ``APPMULT_NO_TRITON=1`` turns them off) keep each look-up in registers;
  elsewhere a chunked torch gather does the same arithmetic.

Both work on *indices* ``value - min_value`` (tables are stored in value order; see
:mod:`appmult.nn.tables`), in a GEMM-shaped layout shared by linear layers and
(unfolded) convolutions: ``A`` is ``(batch, G*Kg, L)`` (reduction index ``k`` then
output position), ``B`` is ``(G*Ng, Kg)`` (a weight matrix in torch layout, ``G`` groups).

Automatic choice: a one-time timed probe, not a cost model. The two families' costs
depend on the layer shape, the LUT's rank, the fused path that applies (zero points,
padding, rank-1 shortcuts), the BLAS/oneDNN algorithm torch picks, the cache sizes and the
thread count, and their crossover moved by a factor of ~2 between layers of one network
(a rank-7 LUT was faster by the low-rank GEMM on the linear layer and by the gather on the
ResNet-20 conv). A cost model calibrated on the machine would need a term for each of those
and would still miss the next oneDNN heuristic; timing the candidates on the real operands
costs a few extra forwards once per (layer shape, LUT, candidates, device, dtype) and is
right by construction, up to timing noise (best of interleaved rounds; a shared machine's
load hits every candidate alike). :func:`probe_choice` keeps the choices in a bounded
in-process LRU cache; :func:`choose_kernel` (the guess by rank) remains the choice where
nothing is timed (``APPMULT_KERNEL_PROBE=0``). Every candidate returns the same integer
accumulators (each is exact within the bounds in :mod:`appmult.nn.functional`), so the
choice changes speed, never results.

This module holds what decides and drives the kernels: the factorizations, the kernel
choice, the gather drivers (blocking, tiling, layouts, the torch fallback) and their tuning
constants, which tests set to force each path. The compiled inner loops are in
:mod:`appmult.nn.gather_loops` and :mod:`appmult.nn.byte_shuffle`. The two families stay together because
:func:`probe_choice` weighs one against the other with measured costs.

Size: about 800 lines, over the project's ~600, on purpose for now: the factorizations,
the timed kernel choice and the gather drivers share the tuning constants the tests set
and weigh one kernel family against the other; the next split (the probe into its own
module) is noted as work.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import byte_shuffle, float_shuffle, shuffle_gather, switches, triton_gather
from . import gather_loops as loops
from .gather_layouts import check_indices as _check_indices
from .gather_layouts import unfold_uint8
from .offset_tables import float_planes, offset_tables

__all__ = [
    "FP32_EXACT_LIMIT",
    "LowRank",
    "choose_kernel",
    "clear_probe_cache",
    "float_factorization",
    "forced",
    "forced_kernel",
    "gather_forward",
    "gather_grad_a",
    "gather_grad_b",
    "integer_factorization",
    "numba_available",
    "probe_cached",
    "probe_choice",
    "probe_choices",
    "probe_enabled",
]

#: Integers up to this magnitude are represented exactly in float32 (and every sum of them).
FP32_EXACT_LIMIT = 1 << 24
FP64_EXACT_LIMIT = 1 << 53

#: Largest rank the automatic choice sends to the low-rank kernel. Measured forward (2-core
#: AVX-512 EPYC, batch 128, after the quantizer/caching work; benchmarks/bench_nn.py sizes):
#: low-rank costs ~(r + 0.5..1) exact convs on the ResNet-20 conv (r = 5..8: 5.9-7.9x) against
#: ~9.2x for the gather, i.e. a crossover near r = 9-10; on the LeNet conv and the linear layer
#: the gather is relatively slower (11-14x), crossover ~13. 10 favours the large layers,
#: which dominate a network's time.
AUTO_MAX_RANK = 10

#: The same limit on a CPU where the gather runs by byte shuffles (:mod:`appmult.nn.byte_shuffle`,
#: AVX-512 VBMI): forward x fp32, low-rank vs gather (bench_nn sizes, 2 threads), rank 2:
#: ResNet-20 conv 3.09 vs 3.04, LeNet conv 2.93 vs 3.85, linear 1.88 vs 2.89; rank 3: 4.02
#: vs 2.97, 3.54 vs 3.62, 2.23 vs 2.80. Above rank 2 the large convolution loses by a third.
AUTO_MAX_RANK_SHUFFLE = 2


# ------------------------------------------------------------------------------------------
# Exact integer factorization
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LowRank:
    """An exact integer factorization ``table == U @ V.T``.

    Attributes:
        u: int64 ``(rows, r)``.
        v: int64 ``(cols, r)``.
        bound: ``max_ab sum_r |u[a,r] v[b,r]|``: the largest magnitude one reduction step
            can add to a partial sum (``K * bound`` bounds every partial sum).
    """

    u: np.ndarray
    v: np.ndarray
    bound: int

    @property
    def rank(self) -> int:
        return self.u.shape[1]


def _echelon(m: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Integer row echelon basis of the row lattice of ``m`` (object array of Python ints).

    Euclid on each pivot column with unimodular row operations, so the returned rows
    generate exactly the integer span of the input rows (every input row is an *integer*
    combination of them).
    """
    m = m.copy()
    nrows, ncols = m.shape
    r0 = 0
    pivots: list[int] = []
    for c in range(ncols):
        if r0 == nrows:
            break
        while True:
            nz = np.nonzero(m[r0:, c] != 0)[0] + r0
            if nz.size <= 1:
                break
            mags = np.array([abs(int(x)) for x in m[nz, c]])
            p = nz[int(np.argmin(mags))]
            others = nz[nz != p]
            q = m[others, c] // m[p, c]
            m[others] = m[others] - q[:, None] * m[p][None, :]
        if nz.size == 0:
            continue
        p = int(nz[0])
        if p != r0:
            m[[r0, p]] = m[[p, r0]]
        if m[r0, c] < 0:
            m[r0] = -m[r0]
        pivots.append(c)
        r0 += 1
    return m[:r0], pivots


def _factor_exact(table: np.ndarray) -> LowRank | None:
    """``table = C @ H`` with ``H`` the echelon basis of its rows, all integer; verified."""
    obj = table.astype(object)
    h, pivots = _echelon(obj)
    if not pivots:
        return LowRank(np.zeros((table.shape[0], 1), np.int64), np.zeros((table.shape[1], 1), np.int64), 0)
    rest = obj.copy()
    coeff = np.zeros((table.shape[0], len(pivots)), dtype=object)
    for t, pc in enumerate(pivots):
        ct = rest[:, pc] // h[t, pc]
        coeff[:, t] = ct
        rest = rest - ct[:, None] * h[t][None, :]
    if np.any(rest != 0):
        return None  # cannot happen for an echelon basis of the lattice; refuse rather than trust
    big = max(max((abs(int(x)) for x in coeff.ravel()), default=0), max((abs(int(x)) for x in h.ravel()), default=0))
    if big >= 1 << 31:
        return None
    u = coeff.astype(np.int64)
    v = np.ascontiguousarray(h.T.astype(np.int64))
    return _verified(table, u, v)


def _verified(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> LowRank | None:
    absum = np.abs(u).astype(np.float64) @ np.abs(v).astype(np.float64).T
    if absum.max(initial=0.0) >= 2.0 ** 62:
        return None
    if not np.array_equal(u @ v.T, table):  # int64, no overflow by the bound above
        return None
    return LowRank(u, v, int(absum.max(initial=0.0)))


def integer_factorization(table: np.ndarray, *, values_a: np.ndarray | None = None,
                          values_b: np.ndarray | None = None, max_rank: int = 32) -> LowRank | None:
    """Find an exact integer factorization ``table == U @ V.T`` of minimal rank, or ``None``.

    Two candidates are built and the one with the lower rank (then the smaller partial-sum
    bound) wins: the integer echelon basis of the table itself, and -- when the operand
    values are given -- the exact product ``outer(values_a, values_b)`` plus the echelon
    factorization of the error table ``table - outer(...)``, whose factors are small for
    truncated/perforated designs. Both are verified exactly in int64.

    Args:
        table: integer table ``(rows, cols)``.
        values_a: operand value of each row (for the exact-plus-error candidate).
        values_b: operand value of each column.
        max_rank: skip the (Python-integer) search when the float64 numerical rank is larger.

    Returns:
        The factorization, or ``None`` when the rank exceeds ``max_rank``.
    """
    table = np.asarray(table, dtype=np.int64)
    sv = np.linalg.svd(table.astype(np.float64), compute_uv=False)
    tol = sv[0] * max(table.shape) * np.finfo(np.float64).eps if sv.size and sv[0] > 0 else 0.0
    if int((sv > tol).sum()) > max_rank:
        return None
    cands = []
    direct = _factor_exact(table)
    if direct is not None:
        cands.append(direct)
    if values_a is not None and values_b is not None:
        va = np.asarray(values_a, np.int64)[:, None]
        vb = np.asarray(values_b, np.int64)[:, None]
        err = _factor_exact(table - va @ vb.T)
        if err is not None:
            u = np.concatenate([va, err.u], axis=1) if err.rank else va
            v = np.concatenate([vb, err.v], axis=1) if err.rank else vb
            f = _verified(table, u, v)
            if f is not None:
                cands.append(f)
    cands = [c for c in cands if c.rank <= max_rank]
    if not cands:
        return None
    return min(cands, key=lambda c: (c.rank, c.bound))


def float_factorization(table: np.ndarray, *, rel_tol: float = 1e-6, max_rank: int = 32
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """Truncated SVD ``table ~= P @ Q.T`` for float gradient tables (not integer-exact).

    Args:
        table: float table.
        rel_tol: largest allowed ``max|P @ Q.T - table| / max|table|``.
        max_rank: give up beyond this rank.

    Returns:
        ``(P, Q)`` float64, or ``None`` when no rank up to ``max_rank`` meets ``rel_tol``.
    """
    t = np.asarray(table, dtype=np.float64)
    scale = float(np.abs(t).max(initial=0.0))
    if scale == 0.0:
        return np.zeros((t.shape[0], 1)), np.zeros((t.shape[1], 1))
    u, s, vt = np.linalg.svd(t, full_matrices=False)
    for r in range(1, min(max_rank, s.size) + 1):
        p = u[:, :r] * s[:r]
        q = vt[:r].T
        if np.abs(p @ q.T - t).max() <= rel_tol * scale:
            return p, q
    return None


def choose_kernel(rank: int | None, device: torch.device | str = "cpu") -> str:
    """The kernel guessed for a LUT of this exact integer rank (``None``: high rank) on
    ``device``: low-rank up to :data:`AUTO_MAX_RANK_SHUFFLE` on a CPU whose gather runs by
    byte shuffles, up to :data:`AUTO_MAX_RANK` elsewhere.

    Used where nothing is timed (the probe is off) and as the first candidate of
    :func:`probe_choice`, which it wins ties for.
    """
    shuffles = torch.device(device).type == "cpu" and byte_shuffle.available()
    return "lowrank" if rank is not None and rank <= (AUTO_MAX_RANK_SHUFFLE if shuffles else AUTO_MAX_RANK) \
        else "gather"


# ------------------------------------------------------------------------------------------
# Automatic kernel choice: one timed probe per layer shape (see the module notes)
# ------------------------------------------------------------------------------------------

#: Most probe results kept; the least recently used is dropped first (a key is a few
#: shapes and strings, so this bounds memory, not time: a dropped key is probed again).
PROBE_CACHE_MAX = 512
#: Timed rounds of a probe (after one warm-up run of each candidate); the best of them counts.
PROBE_ROUNDS = 3
#: When the two fastest are within :data:`PROBE_CLOSE` of each other after
#: :data:`PROBE_ROUNDS`, more rounds run, up to this many in all: on a loaded machine three
#: wall-clock rounds mis-ranked kernels 12% apart (LeNet conv, rank-7 LUT, load average 9).
PROBE_MAX_ROUNDS = 9
PROBE_CLOSE = 1.3
#: A later candidate must beat the earlier ones by this factor to be chosen (the rank-based
#: guess comes first), so timing noise between near-equal kernels does not flip the choice.
PROBE_MARGIN = 0.97

_probe_lru: collections.OrderedDict[Hashable, str] = collections.OrderedDict()
_probe_lock = threading.Lock()
_forced_local = threading.local()


def probe_enabled() -> bool:
    """Whether ``auto`` layers time their kernels (``APPMULT_KERNEL_PROBE=0`` turns it off)."""
    return switches.value("APPMULT_KERNEL_PROBE", "1") not in ("0", "")


def forced(owner: object) -> str | None:
    """The kernel forced for ``owner`` (a :class:`~appmult.nn.tables.LutTables`) on this thread, or ``None``."""
    table = getattr(_forced_local, "kernels", None)
    return None if not table else table.get(id(owner))


class forced_kernel:
    """Within the block, ``owner.kernel`` reads ``kernel`` on this thread (other threads and
    other tables are unaffected); restored on exit, nested blocks included. (A class, not a
    generator context manager: entered on every forward of an ``auto`` layer, where the
    generator's machinery cost a few microseconds.)"""

    __slots__ = ("key", "kernel", "table", "prev")

    def __init__(self, owner: object, kernel: str):
        self.key, self.kernel = id(owner), kernel

    def __enter__(self) -> None:
        table = getattr(_forced_local, "kernels", None)
        if table is None:
            table = _forced_local.kernels = {}
        self.table = table
        self.prev = table.get(self.key)
        table[self.key] = self.kernel

    def __exit__(self, *exc) -> None:
        if self.prev is None:
            del self.table[self.key]
        else:
            self.table[self.key] = self.prev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_choice(key: Hashable, candidates: dict[str, Callable[[], object]], device: torch.device) -> str:
    """The fastest of ``candidates`` for ``key``, timed on the first call and cached.

    Each candidate runs once to warm up (compilation, allocator, weight-side caches), then
    :data:`PROBE_ROUNDS` interleaved timed rounds -- up to :data:`PROBE_MAX_ROUNDS` while the
    two fastest are within :data:`PROBE_CLOSE` -- and the best time of each counts (the least
    disturbed run on a shared machine); a candidate must beat the earlier ones by
    :data:`PROBE_MARGIN` to be chosen (dict order: put the default first).

    Args:
        key: everything the cost depends on: layer kind and shapes, geometry, LUT hash and
            operand roles, the candidates, device and dtype, exactness.
        candidates: kernel name -> a callable running the layer's forward with that kernel.
        device: where they run (CUDA is synchronized around each timing).

    Returns:
        The chosen kernel name.
    """
    with _probe_lock:
        hit = _probe_lru.get(key)
        if hit is not None:
            _probe_lru.move_to_end(key)
            return hit
    names = list(candidates)
    if len(names) == 1:
        choice = names[0]
    else:
        for name in names:
            candidates[name]()
        best = dict.fromkeys(names, math.inf)
        for rnd in range(max(PROBE_ROUNDS, PROBE_MAX_ROUNDS)):
            if rnd >= PROBE_ROUNDS:
                top = sorted(best.values())
                if top[1] > PROBE_CLOSE * top[0]:
                    break
            for name in names:
                _sync(device)
                t0 = time.perf_counter()
                candidates[name]()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
        choice = names[0]
        for name in names[1:]:
            if best[name] < PROBE_MARGIN * best[choice]:
                choice = name
    with _probe_lock:
        _probe_lru[key] = choice
        while len(_probe_lru) > PROBE_CACHE_MAX:
            _probe_lru.popitem(last=False)
    return choice


def probe_cached(key: Hashable) -> str | None:
    """The cached choice of :func:`probe_choice` for ``key`` (marked as recently used), or
    ``None`` where it has not been probed: the hit path without building the candidates."""
    with _probe_lock:
        hit = _probe_lru.get(key)
        if hit is not None:
            _probe_lru.move_to_end(key)
        return hit


def probe_choices() -> dict:
    """A copy of the cached probe results (key -> kernel), oldest first."""
    with _probe_lock:
        return dict(_probe_lru)


def clear_probe_cache() -> None:
    """Forget every probe result (the next call of each layer shape probes again)."""
    with _probe_lock:
        _probe_lru.clear()


# ------------------------------------------------------------------------------------------
# Gather kernels
# ------------------------------------------------------------------------------------------

def numba_available() -> bool:
    """Whether the numba CPU gather kernels can be used."""
    return loops.AVAILABLE and not switches.is_set("APPMULT_NO_NUMBA")


def _chunk(nbatch: int, length: int) -> int:
    # Enough tasks for every thread, but tiles long enough to vectorize and amortize the
    # per-task accumulator; 256 int32 outputs x a few dozen channels stay in L1/L2.
    threads = max(1, torch.get_num_threads())
    want = max(1, math.ceil(4 * threads / max(1, nbatch)))
    return int(min(256, max(32, math.ceil(length / want))))


def _idx_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 256 else torch.int32


def _use_numba(*tensors: torch.Tensor) -> bool:
    return numba_available() and all(t.device.type == "cpu" for t in tensors)


def gather_forward(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, groups: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``out[n, j, i] = sum_k table[a[n, g*Kg+k, i], b[j, k]]`` (``g`` = group of ``j``).

    Args:
        a: long/uint8 indices ``(nb, G*Kg, L)``.
        b: long/uint8 indices ``(G*Ng, Kg)``.
        table: integer table ``(NA, NB)`` (int32 or int64), indexed ``[a_idx, b_idx]``.
        groups: ``G``.
        out_dtype: ``torch.int32`` (caller guarantees no overflow) or ``torch.int64``.

    Returns:
        ``(nb, G*Ng, L)`` tensor of ``out_dtype``.

    Raises:
        IndexError: an index outside ``table`` (checked before any kernel reads it).
    """
    nbatch, _, length = a.shape
    nout = b.shape[0]
    na, nb_ = table.shape
    _check_indices(a, na, "Activation")
    _check_indices(b, nb_, "Weight")
    if not _use_numba(a, b, table):
        out = triton_gather.forward(a, b, table.to(out_dtype), groups) if triton_gather.usable(a, b, table) else None
        if out is not None:
            return out
        return _torch_gather(a, b, table.to(out_dtype), groups, None, "fwd")
    if groups == 1 and out_dtype == torch.int32 and na <= 256 and nb_ <= 256 \
            and nbatch * length * a.shape[1] * nout >= byte_shuffle.MIN_LOOKUPS and byte_shuffle.available():
        shuffle = shuffle_gather.table_planes(table, a.shape[1])
        if shuffle is not None:
            return shuffle_gather.forward(a, b, shuffle)
    ai = a.to(_idx_dtype(na)).contiguous().numpy()
    bi = b.to(_idx_dtype(nb_)).contiguous().numpy()
    tt = table.t().to(out_dtype).contiguous().numpy()
    if nbatch * length < ROWS_MIN_POSITIONS * na:
        # Few positions (linear layers): expanding the per-weight tables would cost more
        # than it saves; each weight's table row is reused for all positions instead.
        out = np.zeros((nbatch, nout, length), dtype=tt.dtype)
        t16, base = _table16(table, tt.dtype, ai.shape[1] // groups)
        threads = max(1, loops.num_threads())
        jtile = int(max(1, min(64, math.ceil(nbatch * nout / (_TASKS_PER_THREAD * 2 * threads)))))
        loops.forward(ai, bi, tt if t16 is None else t16, groups, jtile, out)
        if base:  # int32: modulo 2**32 like the sums (the true totals fit, by the caller's dtype)
            kb = base * (ai.shape[1] // groups)
            out += out.dtype.type(byte_shuffle.wrap32(kb) if out.dtype == np.int32 else kb)
        return torch.from_numpy(out)

    def expand(g, j0, j1, e):
        loops.expand(bi, tt, g, groups, j0, j1, e)

    out = _rows_accumulate(ai, bi.shape[1], na, nout, groups, tt.dtype, expand)
    return torch.from_numpy(out).permute(0, 2, 1)


def _table16(table: torch.Tensor, acc_dtype: np.dtype, kg: int) -> tuple[np.ndarray | None, int]:
    """``(table - min)`` transposed as uint16 and ``min``, or ``(None, 0)``.

    A 16-bit table halves the gather's cache footprint (512 B per weight's row). Used when
    the entries span fewer than ``2**16`` values and the offset sums ``kg * (max - min)``
    cannot overflow the accumulator; the caller adds ``kg * min`` back (exact: the true
    sum fits the accumulator by the caller's choice of dtype). Made once per table
    (:mod:`appmult.nn.offset_tables`).
    """
    ot = offset_tables(table)
    limit = (1 << 31) if acc_dtype == np.int32 else (1 << 63)
    if ot is None or kg * (ot.hi - ot.lo) >= limit:
        return None, 0
    return ot.t16, ot.lo


def _rows_accumulate(ai: np.ndarray, kg: int, na: int, nout: int, groups: int, dtype: np.dtype,
                     expand) -> np.ndarray:
    """``(nb, L, nout)`` accumulators by the row kernel over blocks of output channels.

    ``expand(g, j0, j1, e)`` fills ``e[k, x, jj]`` (``(Kg, NA, j1 - j0)``) with the
    contribution of activation index ``x`` to output channel ``g*Ng + j0 + jj`` at reduction
    step ``k``; :func:`loops.rows <appmult.nn.gather_loops.rows>` then adds the rows
    ``e[k, A_k]`` of every position. Blocks: ``_EXPAND_BYTES`` bounds ``e``, ``_SLAB_BYTES``
    one k-slab of it (kept in L2 while every position of a task adds to its row).
    """
    nbatch, _, length = ai.shape
    ng = nout // groups
    isz = np.dtype(dtype).itemsize
    jblock = int(max(1, min(ng, _EXPAND_BYTES // (kg * na * isz))))
    kblock = int(max(1, _SLAB_BYTES // (na * jblock * isz)))
    threads = max(1, loops.num_threads())
    # A few tasks per thread: each slab of e is reused by all of a task's batch items
    # (tuned on a shared, busy 2-core machine).
    per_task = int(max(1, nbatch // (_TASKS_PER_THREAD * threads)))
    e = np.empty((kg, na, jblock), dtype=dtype)
    if groups == 1 and jblock >= ng:
        out = np.zeros((nbatch, length, nout), dtype=dtype)
        expand(0, 0, ng, e)
        loops.rows(ai, e, 0, kg, kblock, per_task, out)
        return out
    out = np.empty((nbatch, length, nout), dtype=dtype)
    blk = None
    for g in range(groups):
        for j0 in range(0, ng, jblock):
            j1 = min(ng, j0 + jblock)
            ev = e if j1 - j0 == jblock else np.empty((kg, na, j1 - j0), dtype=dtype)
            if blk is None or blk.shape[2] != j1 - j0:
                blk = np.empty((nbatch, length, j1 - j0), dtype=dtype)
            blk.fill(0)
            expand(g, j0, j1, ev)
            loops.rows(ai, ev, g, kg, kblock, per_task, blk)
            out[:, :, g * ng + j0:g * ng + j1] = blk
    return out


def gather_conv_zp(q: torch.Tensor, lo_x: int, b: torch.Tensor, lo_w: int, table: torch.Tensor, groups: int,
                   kernel_size: tuple[int, int], padding: tuple[int, int], stride: tuple[int, int],
                   dilation: tuple[int, int], zx: int, zw: np.ndarray | None,
                   out_dtype: torch.dtype = torch.int32, *, pad_value: int | None = None
                   ) -> torch.Tensor | None:
    """The whole integer accumulator of a quantized conv by the numba row kernel (CPU), or ``None``.

    ``out[n, j, p] = sum_k table[x, w] - value(x) Zw_j - Zx value(w) + Zx Zw_j`` over each
    receptive field of ``q`` padded with ``pad_value`` (default ``Zx``) (``x``/``w``: indices ``value -
    lo``; ``zw``: per-output-channel zero points, ``None`` for symmetric layers). The
    cross terms are folded into the expanded per-weight rows, so no pass besides the
    index conversion and unfold touches the activations.
    Returns ``None`` (caller falls back) without numba, for few positions, or when int32
    could overflow.

    Args:
        q: ``(N, C, H, W)`` integer-valued float32 activations (unpadded).
        lo_x: smallest activation value (index 0 of the table's rows).
        b: ``(Co, Cg*kh*kw)`` weight indices.
        lo_w: smallest weight value (index 0 of the table's columns).
        table: ``(NA, NB)`` integer table indexed ``[x, w]``.
        groups: conv groups.
        kernel_size: ``(kh, kw)``.
        padding: ``(ph, pw)``.
        stride: ``(sh, sw)``.
        dilation: ``(dh, dw)``.
        zx: activation zero point folded into the cross terms.
        zw: weight zero points (one or one per output channel), ``None`` for none.
        out_dtype: dtype of the result.
        pad_value: activation value inserted by the padding (default ``zx``).

    Returns:
        ``(N, Co, Ho, Wo)`` int32 accumulators converted to ``out_dtype``: a view with the
        kernel's strides (channels-last from the row kernel; channel-major from the byte
        shuffle: ``(Co, Ho, Wo, N)`` in memory for the batch-inner layout, ``(Co, N, Ho, Wo)``
        for the unfolded one).

    Raises:
        IndexError: an activation value or a weight index outside the table.
    """
    if not _use_numba(q, b, table) or q.dtype != torch.float32 or q.dim() != 4:
        return None
    n, c, h, w = q.shape
    kh, kw = kernel_size
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    na, nb_ = table.shape
    if na > 256 or nb_ > 256 or ho <= 0 or wo <= 0:
        return None
    nout, kg = b.shape
    few = n * ho * wo < ROWS_MIN_POSITIONS * na  # the row kernel's expansion would cost more than it saves
    small = n * ho * wo * kg * nout < byte_shuffle.MIN_LOOKUPS  # the byte shuffle's fixed cost would dominate
    shuffle = shuffle_gather.table_planes(table, kg) \
        if groups == 1 and (few or not small) and byte_shuffle.available() else None
    if shuffle is None and few:
        return None
    zwv = np.zeros(nout, np.int64) if zw is None else np.array(np.broadcast_to(np.asarray(zw, np.int64).reshape(-1), (nout,)))
    zwv = np.ascontiguousarray(zwv)
    # bound of one folded entry: |T| + |value(x) zw| + |zx value(w)| + |zx zw|
    vx_max = max(abs(lo_x), abs(lo_x + na - 1))
    vw_max = max(abs(lo_w), abs(lo_w + nb_ - 1))
    zwm = max((abs(int(z)) for z in zwv), default=0)  # Python integers: no int64 abs(-2**63) < 0
    t_lo, t_hi = (int(v) for v in torch.aminmax(table)) if table.numel() else (0, 0)
    step = max(abs(t_lo), abs(t_hi)) + vx_max * zwm + abs(zx) * vw_max + abs(zx) * zwm
    if kg * step >= 1 << 31:
        return None
    _check_indices(b, nb_, "Weight")
    pad_value = int(zx) if pad_value is None else int(pad_value)
    if shuffle is not None:
        return shuffle_gather.conv_zp(q, lo_x, na, b, lo_w, shuffle, kernel_size, padding, stride, dilation, zx,
                                zwv, pad_value).to(out_dtype)
    ai = unfold_uint8(q.detach(), lo_x, na, pad_value, kernel_size, padding, stride, dilation)
    bi = b.to(torch.uint8).contiguous().numpy()
    tt = np.ascontiguousarray(table.t().to(torch.int32).numpy())

    def expand(g, j0, j1, e):
        loops.expand_zp(bi, tt, g, groups, j0, j1, int(lo_x), int(lo_w), int(zx), zwv, e)

    out = _rows_accumulate(ai, kg, na, nout, groups, np.dtype(np.int32), expand)
    return torch.from_numpy(out).reshape(n, ho, wo, nout).permute(0, 3, 1, 2).to(out_dtype)


def gather_linear_prep(b: torch.Tensor, lo_w: int, table: torch.Tensor, lo_x: int, zx: int,
                       zw: np.ndarray | None) -> tuple | None:
    """The weight side of :func:`gather_linear_zp`, computed once per weight (cacheable), or ``None``.

    Args:
        b: ``(N, K)`` weight indices (value - ``lo_w``).
        lo_w: smallest weight value.
        table: ``(NA, NB)`` integer table indexed ``[x, w]`` (8-bit operands: at most 256 x 256).
        lo_x: smallest activation value.
        zx: activation zero point of the cross terms (0 for none).
        zw: weight zero points (one, or one per output), ``None`` for none.

    Returns:
        An opaque tuple for :func:`gather_linear_zp`, or ``None`` where the fused path does not
        apply (no numba, not on the CPU, tables over 8 bits, a sum that could overflow int32).
    """
    if not _use_numba(b, table):
        return None
    na, nb_ = table.shape
    nout, k = b.shape
    if na > 256 or nb_ > 256:
        return None
    _check_indices(b, nb_, "Weight")
    zwv = np.zeros(nout, np.int64) if zw is None else \
        np.array(np.broadcast_to(np.asarray(zw, np.int64).reshape(-1), (nout,)))
    bi = np.ascontiguousarray(b.to(torch.uint8).numpy())
    # both 16-bit forms, cached per table (offset_tables): the scalar loop's uint16 table and,
    # where the byte shuffle runs, its planes -- a snapshot of the table for either path
    t16, base = _table16(table, np.dtype(np.int32), k)
    if t16 is None:
        return None
    shuffle = shuffle_gather.table_planes(table, k) if byte_shuffle.available() else None
    planes = None if shuffle is None else shuffle[0]
    # per-output constant: K * base (the uint16 offset) - Zx sum_k value(w) + K Zx Zw_j, in
    # Python integers: int64 would wrap silently for absurd zero points or weight ranges
    # (2**62 * 4 == 0)
    wsum = [int(s) + k * lo_w for s in bi.astype(np.int64).sum(1)]
    const = [k * base - zx * s + k * zx * int(z) for s, z in zip(wsum, zwv)]
    # every partial sum in the kernel is init + (some of the K entries of t16 >= 0), with
    # init = const_j - Zw_j * sum_k value(x): bound it, for int32
    vx_max = max(abs(lo_x), abs(lo_x + na - 1))
    bound = max(map(abs, const), default=0) + max((abs(int(z)) for z in zwv), default=0) * k * vx_max \
        + k * int(t16.max(initial=0))
    if bound >= 1 << 31:
        return None
    return bi, t16, np.array(const, np.int64), zwv, planes


def gather_linear_zp(q: torch.Tensor, lo_x: int, prep: tuple) -> torch.Tensor:
    """``acc[m, j] = sum_k table[x_mk, w_jk] - value(x_mk) Zw_j - Zx value(w_jk) + Zx Zw_j`` (int32).

    The linear layer's whole integer accumulator by the numba weight-row kernel
    (:func:`loops.forward <appmult.nn.gather_loops.forward>`) on a 16-bit table: the
    weight-side constants come from :func:`gather_linear_prep`; the activation row sums for
    the ``Zw`` term are one integer reduction of the uint8 indices.

    Args:
        q: ``(M, K)`` integer-valued float activations, within the table's rows.
        lo_x: smallest activation value.
        prep: from :func:`gather_linear_prep`.

    Returns:
        ``(M, N)`` int32 accumulators (a transposed view).
    """
    bi, t16, const, zwv, planes = prep
    m, k = q.shape
    nout = bi.shape[0]
    if planes is not None and m * k * nout >= byte_shuffle.MIN_LOOKUPS and byte_shuffle.available():
        return shuffle_gather.linear_zp(q, lo_x, bi, const, zwv, planes)
    ai = (q.detach() if lo_x == 0 else q.detach() - lo_x).to(torch.uint8).t().contiguous()
    out = np.empty((1, nout, m), np.int32)
    if np.any(zwv):
        xsum = ai.sum(0, dtype=torch.int64).numpy() + k * lo_x                       # (M,)
        out[0] = const[:, None] - zwv[:, None] * xsum[None, :]
    else:
        out[0] = const[:, None]
    threads = max(1, loops.num_threads())
    jtile = int(max(1, min(64, math.ceil(nout / (_TASKS_PER_THREAD * 2 * threads)))))
    loops.forward(ai.numpy()[None], bi, t16, 1, jtile, out)
    return torch.from_numpy(out[0]).t()


def _float_shuffles(na: int, nb: int, lookups: int) -> bool:
    """Whether the LUT-2D gradient gathers take :mod:`appmult.nn.float_shuffle`: 8-bit
    indices on both sides, enough look-ups to pay its fixed cost, and the kernel available."""
    return na <= 256 and nb <= 256 and lookups >= FLOAT_SHUFFLE_MIN_LOOKUPS and float_shuffle.available()


def gather_grad_a(a: torch.Tensor, b: torch.Tensor, grad_table: torch.Tensor, grad: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """``out[n, g*Kg+k, i] = sum_j grad[n, j, i] * grad_table[a[n, g*Kg+k, i], b[j, k]]`` (float32).

    Raises:
        IndexError: an index outside ``grad_table``.
    """
    nbatch, ktot, length = a.shape
    na, nb_ = grad_table.shape
    _check_indices(a, na, "Activation")
    _check_indices(b, nb_, "Weight")
    if _use_numba(a, b, grad_table, grad):
        ai = a.to(_idx_dtype(na)).contiguous().numpy()
        bi = b.to(_idx_dtype(nb_)).contiguous().numpy()
        g = grad.to(torch.float32).contiguous().numpy()
        if _float_shuffles(na, nb_, a.numel() * b.shape[0] // max(1, groups)):
            return torch.from_numpy(float_shuffle.grad_a(ai, bi, float_planes(grad_table), g, groups))
        gt = grad_table.t().to(torch.float32).contiguous().numpy()
        out = np.zeros((nbatch, ktot, length), dtype=np.float32)
        loops.grad_a(ai, bi, gt, g, groups, _chunk(nbatch, length), out)
        return torch.from_numpy(out)
    out = triton_gather.grad_a(a, b, grad_table, grad, groups) if triton_gather.usable(a, b, grad_table, grad) else None
    if out is not None:
        return out
    return _torch_gather(a, b, grad_table.to(torch.float32), groups, grad.to(torch.float32), "ga")


def fold(cols: torch.Tensor, size: tuple[int, int], kernel: tuple[int, int], stride, dilation) -> torch.Tensor:
    """``F.fold(cols, size, kernel, dilation, padding=0, stride)``: the columns' sums back into
    the ``(N, C, H, W)`` image, by :func:`appmult.nn.gather_loops.fold` on the CPU (the same
    bits; torch's col2im runs on one thread: 12 vs 4 ms for a ResNet-20 conv's 38 MB of
    LUT-2D gradient columns), else torch."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    hp, wp = size
    if cols.dtype != torch.float32 or not _use_numba(cols) or cols.dim() != 3 or cols.shape[1] % (kh * kw):
        return F.fold(cols, size, kernel, dilation=dilation, padding=0, stride=stride)
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0 or cols.shape[2] != ho * wo:
        return F.fold(cols, size, kernel, dilation=dilation, padding=0, stride=stride)  # its own error
    out = torch.zeros((cols.shape[0], cols.shape[1] // (kh * kw), hp, wp), dtype=torch.float32)
    loops.fold(cols.contiguous().numpy(), out.numpy(), kh, kw, sh, sw, dh, dw, wo)
    return out


def gather_grad_b(a: torch.Tensor, b: torch.Tensor, grad_table: torch.Tensor, grad: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """``out[j, k] = sum_n sum_i grad[n, j, i] * grad_table[a[n, g*Kg+k, i], b[j, k]]`` (float32).

    Raises:
        IndexError: an index outside ``grad_table``.
    """
    na, nb_ = grad_table.shape
    _check_indices(a, na, "Activation")
    _check_indices(b, nb_, "Weight")
    if _use_numba(a, b, grad_table, grad):
        ai = a.to(_idx_dtype(na)).contiguous().numpy()
        bi = b.to(_idx_dtype(nb_)).contiguous().numpy()
        g = grad.to(torch.float32).contiguous().numpy()
        if _float_shuffles(na, nb_, a.numel() * b.shape[0] // max(1, groups)):
            return torch.from_numpy(float_shuffle.grad_b(ai, bi, float_planes(grad_table), g, groups))
        gt = grad_table.t().to(torch.float32).contiguous().numpy()
        out = np.zeros(b.shape, dtype=np.float32)
        loops.grad_b(ai, bi, gt, g, groups, out)
        return torch.from_numpy(out)
    out = triton_gather.grad_b(a, b, grad_table, grad, groups) if triton_gather.usable(a, b, grad_table, grad) else None
    if out is not None:
        return out
    return _torch_gather(a, b, grad_table.to(torch.float32), groups, grad.to(torch.float32), "gb")


# Row kernel tuning: expanded tables up to 64 MB per block of output channels, slabs of
# ~256 KB (fits a 1 MB L2 next to the accumulators), used when there are at least
# ROWS_MIN_POSITIONS output positions per table entry.
_EXPAND_BYTES = 64 << 20
_SLAB_BYTES = 256 << 10
ROWS_MIN_POSITIONS = 2
_TASKS_PER_THREAD = 2  # tasks per numba thread of the row kernel (2 measured best, shared 2-core machine)

#: Fewest look-ups for which the LUT-2D gradient gathers take :mod:`appmult.nn.float_shuffle`
#: (below, its fixed cost -- table planes, tails, dispatch -- makes the scalar loops faster).
FLOAT_SHUFFLE_MIN_LOOKUPS = 1 << 12

# Elements of one gathered block in the torch path (bounds its temporary memory).
_TORCH_BLOCK = 1 << 23


def _torch_gather(a: torch.Tensor, b: torch.Tensor, table: torch.Tensor, groups: int,
                  grad: torch.Tensor | None, what: str) -> torch.Tensor:
    """Device-agnostic reference of the three gather kernels (chunked over ``k``)."""
    a = a.long()
    b = b.long()
    nbatch, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    ncols = table.shape[1]
    flat = table.reshape(-1)
    step = max(1, _TORCH_BLOCK // max(1, nbatch * ng * length))
    if what == "fwd":
        out = torch.zeros((nbatch, nout, length), dtype=table.dtype, device=a.device)
    elif what == "ga":
        out = torch.zeros((nbatch, ktot, length), dtype=table.dtype, device=a.device)
    else:
        out = torch.zeros((nout, kg), dtype=table.dtype, device=a.device)
    for g in range(groups):
        js = slice(g * ng, (g + 1) * ng)
        for k0 in range(0, kg, step):
            k1 = min(kg, k0 + step)
            ag = a[:, g * kg + k0:g * kg + k1, :]                      # (nb, kc, L)
            bg = b[js, k0:k1].t()                                       # (kc, Ng)
            vals = flat[ag[:, :, None, :] * ncols + bg[None, :, :, None]]  # (nb, kc, Ng, L)
            if what == "fwd":
                out[:, js, :] += vals.sum(dim=1)
            elif what == "ga":
                out[:, g * kg + k0:g * kg + k1, :] = (vals * grad[:, None, js, :]).sum(dim=2)
            else:
                out[js, k0:k1] = (vals * grad[:, None, js, :]).sum(dim=(0, 3)).t()
    return out


@functools.lru_cache(maxsize=64)
def _cached_factorization(key: str, table_bytes: bytes, shape: tuple[int, int], va: bytes, vb: bytes,
                          max_rank: int) -> LowRank | None:
    table = np.frombuffer(table_bytes, dtype=np.int64).reshape(shape)
    return integer_factorization(table, values_a=np.frombuffer(va, dtype=np.int64),
                                 values_b=np.frombuffer(vb, dtype=np.int64), max_rank=max_rank)


def cached_integer_factorization(key: str, table: np.ndarray, values_a: np.ndarray, values_b: np.ndarray,
                                 max_rank: int = 32) -> LowRank | None:
    """:func:`integer_factorization`, memoized by ``key`` (a LUT hash) across layers."""
    t = np.ascontiguousarray(table, dtype=np.int64)
    return _cached_factorization(key, t.tobytes(), t.shape, np.ascontiguousarray(values_a, np.int64).tobytes(),
                                 np.ascontiguousarray(values_b, np.int64).tobytes(), max_rank)
