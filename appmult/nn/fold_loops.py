"""The numba-compiled loops of the folded low-rank conv: runs of input channels, the exact product's fold.

A convolution too long for one exact float32 convolution runs as one grouped convolution
whose groups are equal runs of its input channels, each giving every output's partial sum
over its run (exact in float32: below ``2**24``). :func:`add_runs` adds the runs and the
fold's constant in float64 (integers below ``2**53``: exact) and rounds once to float32,
in one pass over the grouped output -- the torch fallback (a float64 copy, a sum, an add,
a float32 copy) makes four. :func:`value_fold_rows` folds the exact product's weight
codes for a training step's rank-1 convolution (``fused._value_rank1_prep``);
:func:`mapped_fold_rows` looks a training step's weight codes up for a rank-1 convolution
whose activation factor is a look-up (``fused._rank1_mapped_prep``).

numba is an optional dependency of the ``nn`` extra: without it this module defines only
:data:`AVAILABLE` (``False``) and the torch path runs. Compiled with ``cache=True``.
"""

from __future__ import annotations

import numpy as np

from . import numba_support
from .numba_support import njit, numba, prange

#: Whether numba is installed (the kernel below exists only then).
AVAILABLE = numba_support.AVAILABLE

if numba is not None:
    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def add_runs(y, bias, out):  # pragma: no cover - compiled
        # out[n, j, i] = f32(sum_g f64(y[n, g, j, i]) + bias[j]) for y (N, G, Co, L) float32
        # holding integers, bias (Co,) float64 holding integers: every sum exact, one rounding.
        # One task per image (a float64 buffer of its Co L outputs: small feature maps too
        # give each task enough work).
        batch, groups, co, length = y.shape
        for n in prange(batch):
            acc = np.empty((co, length), np.float64)
            for j in range(co):
                src = y[n, 0, j]
                a = acc[j]
                for i in range(length):
                    a[i] = np.float64(src[i])
            for g in range(1, groups):
                for j in range(co):
                    src = y[n, g, j]
                    a = acc[j]
                    for i in range(length):
                        a[i] += np.float64(src[i])
            for j in range(co):
                b = bias[j]
                a = acc[j]
                o = out[n, j]
                for i in range(length):
                    o[i] = np.float32(a[i] + b)

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def value_fold_rows(q, zw, zx, coef, signed, v_lo, v_hi, ua, xmax, out, bias, figures):  # pragma: no cover
        # The exact product's fold and rank-1 prep (fused._folded_lowrank_weights and
        # fused._rank1_prep for LutTables.v_is_value), per row j of the (Co, K) float32
        # weight codes q, zw (Co,) float64 integer zero points, c = coef (1, or 0 signed):
        #   out[j, k] = q[j, k] - f32(c) f32(Zw_j)      (float32, as the torch expression)
        #   S = sum_k q[j, k], A = sum_k |out[j, k]|    (float64: integers, exact)
        #   const = 0 (signed) or -zx (S - K Zw_j);  bias[j] = f32(const + zx (S - K c Zw_j))
        # and into figures the maxima the general functions compare with 2**24:
        #   [0] K max(|v_hi - c Zw_j|, |v_lo - c Zw_j|) ua   (the fold's worst case)
        #   [1] |const|   [2] A ua + |const| (its bound by these weights)
        #   [3] A xmax + |bias|   (the rank-1 convolution's bound)
        n, k = q.shape
        f0 = 0.0
        f1 = 0.0
        f2 = 0.0
        f3 = 0.0
        c32 = np.float32(coef)
        for j in prange(n):
            qr, orow = q[j], out[j]
            shift = coef * zw[j]
            sh = c32 * np.float32(zw[j])
            shi = np.int64(sh)
            # integers (codes, an integer zero point): the sums in int64, which vectorize (a
            # float64 sum may not be reordered); out as the float32 subtraction (its -0.0s)
            ti = np.int64(0)
            ai = np.int64(0)
            for i in range(k):
                v = qr[i]
                orow[i] = v - sh
                vi = np.int64(v)
                ti += vi
                ai += abs(vi - shi)
            t = np.float64(ti)
            a = np.float64(ai)
            const = 0.0 if signed else -zx * (t - k * zw[j])
            b = const + zx * (t - k * shift)
            bias[j] = np.float32(b)
            f0 = max(f0, k * (max(abs(v_hi - shift), abs(v_lo - shift)) * ua))
            f1 = max(f1, abs(const))
            f2 = max(f2, a * ua + abs(const))
            f3 = max(f3, a * xmax + abs(b))
        figures[0] = f0
        figures[1] = f1
        figures[2] = f2
        figures[3] = f3

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def mapped_fold_rows(q, lo_w, v, u_zx, zx, signed, uabs, out, const, figures):  # pragma: no cover
        # The weight side of fused._rank1_mapped_prep, per row j of the (Co, K) float32 weight
        # codes q, v the LUT's weight factor (float64 integers) by code offset, u_zx = U[Zx],
        # uabs = max |U - U[Zx]|:
        #   out[j, k] = f32(V[q[j, k] - lo_w])
        #   c_j = U[Zx] sum_k V - (0 if signed else zx sum_k q);  const[j] = f32(c_j)
        # (float64 sums of integers: exact in any order) and into figures what the torch path
        # compares with 2**24: [0] max_j (sum_k |V| uabs + |c_j|) (the main convolution's
        # bound), [1] max |V|; [2] = 1 where a code's offset is not in the table (NaN
        # included): the caller then leaves the decision to the torch path.
        n, k = q.shape
        nv = v.shape[0]
        f0 = 0.0
        f1 = 0.0
        bad = 0.0
        for j in prange(n):
            qr, orow = q[j], out[j]
            sv = 0.0
            sa = 0.0
            sq = 0.0
            vm = 0.0
            miss = 0.0
            for i in range(k):
                d = np.float64(qr[i]) - lo_w
                ok = d >= 0.0 and d < nv
                miss = miss if ok else 1.0
                x = v[np.int64(d) if ok else 0]
                orow[i] = np.float32(x)
                sv += x
                sa += abs(x)
                sq += np.float64(qr[i])
                vm = max(vm, abs(x))
            c = u_zx * sv
            if not signed:
                c = c - zx * sq
            const[j] = np.float32(c)
            f0 = max(f0, sa * uabs + abs(c))
            f1 = max(f1, vm)
            bad = max(bad, miss)
        figures[0] = f0
        figures[1] = f1
        figures[2] = bad
