"""The numba-compiled fake quantization of the CPU training step and inference.

``clamp(round(x / s + Z), qmin, qmax)`` and, for the straight-through gradient, the mask
``qmin - 0.5 <= x / s + Z <= qmax + 0.5`` take seven torch passes over the tensor (the
boolean comparisons among the slowest); :func:`fake_quant` makes one, with the same
float32 operations in the same order (division, addition, round half to even, clamp
that keeps NaN), so the same bits. :func:`ste_grad` is the backward ``grad * mask / s``.
One scale and zero point per row of the ``(C, L)`` view: per output channel for weights,
``C = 1`` for activations.

numba is an optional dependency of the ``nn`` extra: without it this module defines only
:data:`AVAILABLE` (``False``) and the torch path runs. Compiled with ``cache=True``.
"""

from __future__ import annotations

import numpy as np

from . import numba_support
from .numba_support import njit, numba, prange

#: Whether numba is installed (the kernels below exist only then).
AVAILABLE = numba_support.AVAILABLE
num_threads = numba_support.num_threads

#: Elements per task: long enough to vectorize, short enough to share a tensor among threads.
BLOCK = 1 << 14

if numba is not None:
    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def fake_quant(x, scale, zp, qmin, qmax, q, inside):  # pragma: no cover - compiled
        # q[c, i] = clamp(rint(x[c, i] / scale[c] + zp[c]), qmin, qmax) (NaN stays NaN);
        # inside[c, i] = qmin - 0.5 <= t <= qmax + 0.5 where inside is not empty.
        rows, length = x.shape
        lo, hi = np.float32(qmin), np.float32(qmax)
        lo_in, hi_in = np.float32(qmin - 0.5), np.float32(qmax + 0.5)
        mask = inside.shape[0] > 0
        nb = (length + BLOCK - 1) // BLOCK
        for task in prange(rows * nb):
            c = task // nb
            i0 = (task % nb) * BLOCK
            n = min(length - i0, BLOCK)
            s, z = scale[c], zp[c]
            # block slices indexed from 0: with i0..i1 bounds the loop did not vectorize (8x slower)
            xr, qr = x[c, i0:i0 + n], q[c, i0:i0 + n]
            for i in range(n):
                t = xr[i] / s + z
                r = np.rint(t)
                r = lo if r < lo else r   # selects, not branches
                qr[i] = hi if r > hi else r
            if mask:
                mr = inside[c, i0:i0 + n]
                for i in range(n):
                    t = xr[i] / s + z
                    mr[i] = (t >= lo_in) & (t <= hi_in)

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def ste_grad(grad, inside, scale, out):  # pragma: no cover - compiled
        # out[c, i] = grad[c, i] * inside[c, i] / scale[c]  (float32, in that order)
        rows, length = grad.shape
        nb = (length + BLOCK - 1) // BLOCK
        for task in prange(rows * nb):
            c = task // nb
            i0 = (task % nb) * BLOCK
            n = min(length - i0, BLOCK)
            s = scale[c]
            gr, mr, orow = grad[c, i0:i0 + n], inside[c, i0:i0 + n], out[c, i0:i0 + n]
            for i in range(n):
                orow[i] = (gr[i] * np.float32(mr[i])) / s
