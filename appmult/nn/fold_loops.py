"""The numba-compiled loop of a folded low-rank conv cut into runs of input channels.

A convolution too long for one exact float32 convolution runs as one grouped convolution
whose groups are equal runs of its input channels, each giving every output's partial sum
over its run (exact in float32: below ``2**24``). :func:`add_runs` adds the runs and the
fold's constant in float64 (integers below ``2**53``: exact) and rounds once to float32,
in one pass over the grouped output -- the torch fallback (a float64 copy, a sum, an add,
a float32 copy) makes four.

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
