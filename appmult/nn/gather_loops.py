"""The numba-compiled inner loops of the CPU gather kernels.

Each loop works on numpy arrays of value-offset indices and integer (or float32 gradient)
tables in the layout of :mod:`appmult.nn.kernels`, which chooses among them, sizes their
blocks and tiles, and falls back to torch where numba is missing or the tensors are not
on the CPU. numba is an optional dependency of the ``nn`` extra: without it this module
defines only :data:`AVAILABLE` (``False``). Compiled with ``cache=True``: the first call
after an edit here compiles for a few seconds, later processes load the cache.
"""

from __future__ import annotations

import numpy as np

from . import numba_support
from .numba_support import njit, numba, prange

#: Whether numba is installed (the kernels below exist only then).
AVAILABLE = numba_support.AVAILABLE
num_threads = numba_support.num_threads

if numba is not None:
    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def forward(a, b, table_t, groups, jtile, out):  # pragma: no cover - compiled
        # out[bi, j, :] += sum_k table_t[b[j, k], a[bi, g*Kg + k, :]]: a task owns ``jtile``
        # output channels and *all* positions of one batch item, so each weight's table row
        # (``table_t[b[j, k]]``, 256 entries: 512 B as uint16) is loaded once and used for
        # every position (128 rows of a linear layer); tasks over chunks of positions
        # reloaded it per chunk (measured 1.8x slower on Linear 512->512, batch 128). The
        # accumulator row (L int32) stays in L1, the activations' (Kg, L) uint8 slab in L2.
        # ``table_t`` may be a uint16 table offset by its minimum (the caller adds
        # ``Kg * min`` back, or starts ``out`` there).
        # Four k per pass over the positions: one load and store of the accumulator per
        # four look-ups (measured 1.18x over one k per pass, 1 thread).
        nbatch, ktot, length = a.shape
        nout, kg = b.shape
        ng = nout // groups
        k4 = kg - kg % 4
        nj = (nout + jtile - 1) // jtile
        for t in prange(nbatch * nj):
            bi = t // nj
            j0 = (t % nj) * jtile
            j1 = min(nout, j0 + jtile)
            for j in range(j0, j1):
                g = j // ng
                o = out[bi, j]
                bj = b[j]
                ab = a[bi, g * kg:(g + 1) * kg]
                for k in range(0, k4, 4):
                    r0 = table_t[np.intp(bj[k])]
                    r1 = table_t[np.intp(bj[k + 1])]
                    r2 = table_t[np.intp(bj[k + 2])]
                    r3 = table_t[np.intp(bj[k + 3])]
                    a0, a1, a2, a3 = ab[k], ab[k + 1], ab[k + 2], ab[k + 3]
                    for i in range(length):
                        o[i] += (np.int64(r0[np.intp(a0[i])]) + np.int64(r1[np.intp(a1[i])])) \
                            + (np.int64(r2[np.intp(a2[i])]) + np.int64(r3[np.intp(a3[i])]))
                for k in range(k4, kg):
                    row = table_t[np.intp(bj[k])]
                    ak = ab[k]
                    for i in range(length):
                        o[i] += row[np.intp(ak[i])]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def expand(b, table_t, g, groups, j0, j1, e):  # pragma: no cover - compiled
        # e[k, x, jj] = table[x, b[g*Ng + j0 + jj, k]]: the products of every activation
        # value with one weight code, laid out so a position adds one contiguous row.
        nout, kg = b.shape
        ng = nout // groups
        na = table_t.shape[1]
        for k in prange(kg):
            for jj in range(j1 - j0):
                row = table_t[b[g * ng + j0 + jj, k]]
                for x in range(na):
                    e[k, x, jj] = row[x]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def rows(a, e, g, kg, kblock, per_task, out):  # pragma: no cover - compiled
        # out[bi, i, jj] += sum_k e[k, a[bi, g*Kg + k, i], jj]: vector adds of rows of e.
        # k-blocks keep a slab of e (kblock * NA * nj values) in L2 while every position of
        # the task's batch items adds to its accumulator row. ``out`` is this channel
        # block's own contiguous (nb, L, nj) array and rows are taken as 1-D contiguous
        # slices (``e[k, x]``, ``out[bi, i]``): with 3-D indexing and a channel offset LLVM
        # could not prove contiguity and the inner loop ran ~2-3x slower.
        nbatch, ktot, length = a.shape
        nj = e.shape[2]
        ntask = (nbatch + per_task - 1) // per_task
        for t in prange(ntask):
            b0 = t * per_task
            b1 = min(nbatch, b0 + per_task)
            for k0 in range(0, kg, kblock):
                k1 = min(kg, k0 + kblock)
                for bi in range(b0, b1):
                    for k in range(k0, k1):
                        ek = e[k]
                        ak = a[bi, g * kg + k]
                        ob = out[bi]
                        for i in range(length):
                            row = ek[np.intp(ak[i])]
                            o = ob[i]
                            for jj in range(nj):
                                o[jj] += row[jj]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def expand_zp(b, table_t, g, groups, j0, j1, lo_x, lo_w, zx, zw, e):  # pragma: no cover
        # e[k, x, jj] = table[x, w] - (x + lo_x) zw_j - zx (w + lo_w) + zx zw_j,  w = b[j, k]:
        # the zero-point cross terms of an asymmetric layer folded into the expanded rows.
        nout, kg = b.shape
        ng = nout // groups
        na = table_t.shape[1]
        for k in prange(kg):
            for jj in range(j1 - j0):
                j = g * ng + j0 + jj
                w = b[j, k]
                row = table_t[w]
                c = zx * zw[j] - zx * (np.int64(w) + lo_w) - lo_x * zw[j]
                for x in range(na):
                    e[k, x, jj] = row[x] + c - x * zw[j]

    @njit(parallel=True, cache=True, fastmath=False)
    def grad_a(a, b, ga_t, grad, groups, chunk, out):  # pragma: no cover - compiled
        # out[bi, g*Kg+k, i] = sum_j grad[bi, j, i] * ga_t[b[j,k], a[bi, g*Kg+k, i]]
        nbatch, ktot, length = a.shape
        nout, kg = b.shape
        ng = nout // groups
        nch = (length + chunk - 1) // chunk
        for t in prange(nbatch * nch):
            bi = t // nch
            i0 = (t % nch) * chunk
            i1 = min(length, i0 + chunk)
            for g in range(groups):
                for k in range(kg):
                    arow = a[bi, g * kg + k, i0:i1]
                    acc = np.zeros(i1 - i0, dtype=np.float32)
                    for jj in range(ng):
                        j = g * ng + jj
                        row = ga_t[b[j, k]]
                        grow = grad[bi, j, i0:i1]
                        for i in range(i1 - i0):
                            acc[i] += grow[i] * row[arow[i]]
                    out[bi, g * kg + k, i0:i1] = acc

    @njit(parallel=True, cache=True, fastmath=False)
    def grad_b(a, b, gb_t, grad, groups, out):  # pragma: no cover - compiled
        # out[j, k] = sum_bi sum_i grad[bi, j, i] * gb_t[b[j,k], a[bi, g*Kg+k, i]]
        nbatch, ktot, length = a.shape
        nout, kg = b.shape
        ng = nout // groups
        for t in prange(nout * kg):
            j = t // kg
            k = t % kg
            g = j // ng
            row = gb_t[b[j, k]]
            s = 0.0
            for bi in range(nbatch):
                arow = a[bi, g * kg + k]
                grow = grad[bi, j]
                for i in range(length):
                    s += grow[i] * row[arow[i]]
            out[j, k] = s

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def fold(cols, out, kh, kw, sh, sw, dh, dw, wo):  # pragma: no cover - compiled
        # out[n, c, y*sh + i*dh, x*sw + j*dw] += cols[n, (c*kh + i)*kw + j, y*wo + x] (out zero
        # on entry): torch's col2im without padding, its loops in its order (so its bits),
        # one task per (item, channel) instead of a single thread
        n, c, hp, wp = out.shape
        ho = cols.shape[2] // wo
        for t in prange(n * c):
            bi = t // c
            ci = t % c
            img = out[bi, ci]
            for i in range(kh):
                for j in range(kw):
                    col = cols[bi, (ci * kh + i) * kw + j]
                    x0 = j * dw
                    for y in range(ho):
                        r = img[y * sh + i * dh]
                        base = y * wo
                        for x in range(wo):
                            r[x * sw + x0] += col[base + x]
