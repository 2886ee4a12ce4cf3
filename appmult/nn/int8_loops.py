"""The numba-compiled loops of the linear layer's int8 GEMM (CPU): its epilogue in inference
and the one-plane weights of a training step (:func:`shifted_rows`, :func:`value_rows`,
:func:`mapped_rows`); for a rank-1 LUT's one-node training step, the weight's codes, mask
and int8 side in one pass (:func:`weight_step`, then :func:`step_constants`; the
activation's: :func:`appmult.nn.quant_loops.range_fake_quant`).

:func:`appmult.nn.fused._int8_linear_acc` turns the int32 dot products of the int8 GEMM
into the layer's exact accumulator with half a dozen torch passes over the ``(M, N)``
output in float64, and the layer then scales and adds the bias in two more. Where no
gradient is needed, :func:`epilogue` does all of it in one pass per output row: the same
exact integer accumulator (every term an integer below ``2**53``, so the order of the
float64 additions does not matter), rounded once to float32, then ``* scale`` and
``+ bias`` as two float32 operations in that order -- the bits of the torch path.

numba is an optional dependency of the ``nn`` extra: without it this module defines only
:data:`AVAILABLE` (``False``) and the torch path runs. Compiled with ``cache=True``.
"""

from __future__ import annotations

import numpy as np

from . import numba_support
from .numba_support import njit, numba, prange
from .quant_loops import NON_FINITE

#: Whether numba is installed (the kernels below exist only then).
AVAILABLE = numba_support.AVAILABLE
num_threads = numba_support.num_threads

if numba is not None:
    from .quant_loops import _mask_run, _non_finite_word, _quantize_run, _row_range, _row_scale_zero_point

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def epilogue(dots, planes, a, ow, c, q, zw, scale, bias, ntask, out):  # pragma: no cover - compiled
        # out[i, j] = f32(f32(acc) * scale[j]) + bias[j], with the exact integer
        #   acc = sum_p 256**p dots[i, p N + j] + ow[j] sum_k a[i, k] + c[j] - zw[j] sum_k q[i, k]
        # (the zw term only where zw is not empty; bias only where not empty). Each step is
        # its own loop over the row (a float64 row buffer per task), so every loop vectorizes;
        # the float64 additions in the order of the torch path. ``ntask`` row blocks.
        m, n = out.shape
        has_zw = zw.shape[0] > 0
        has_bias = bias.shape[0] > 0
        for t in prange(ntask):
            acc = np.empty(n, np.float64)
            for i in range(t * m // ntask, (t + 1) * m // ntask):
                asum = np.int64(0)
                for k in range(a.shape[1]):
                    asum += a[i, k]
                fa = np.float64(asum)
                d = dots[i]
                for j in range(n):
                    acc[j] = np.float64(d[j])
                f = 256.0
                for p in range(1, planes):
                    for j in range(n):
                        acc[j] += np.float64(d[p * n + j]) * f
                    f *= 256.0
                for j in range(n):
                    acc[j] += fa * ow[j]
                    acc[j] += c[j]
                if has_zw:
                    # the activation codes are integers: an int64 sum (vectorizes), exact
                    qs = np.int64(0)
                    for k in range(q.shape[1]):
                        qs += np.int64(q[i, k])
                    qsum = np.float64(qs)
                    for j in range(n):
                        acc[j] -= qsum * zw[j]
                row = out[i]
                if has_bias:
                    for j in range(n):
                        row[j] = np.float32(acc[j]) * scale[j] + bias[j]
                else:
                    for j in range(n):
                        row[j] = np.float32(acc[j]) * scale[j]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def shifted_rows(q, off, out):  # pragma: no cover - compiled
        # out[j, k] = int8(q[j, k] - off[j]): the one-plane int8 weights straight from the
        # float32 weight codes (every difference an integer in [-128, 127]), without the
        # full-size float32 temporary of the torch expression.
        n, k = q.shape
        for j in prange(n):
            o = off[j]
            qr, orow = q[j], out[j]
            for i in range(k):
                orow[i] = np.int8(qr[i] - o)

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def value_rows(q, off, zw, zx, signed, ox, lo_w, out, c, ow):  # pragma: no cover - compiled
        # The exact product's one-plane int8 GEMM weights from the float32 weight codes:
        # out[j, k] = int8(q[j, k] - off) and, per row j, with shift = 0 (signed) or Zw_j
        # (zw: one per row) and the exact float64 row sum s_j = sum_k q[j, k]
        # (integers below 2**53: exact in any order):
        #   wsum = s_j - K shift, const = 0 (signed) or -zx wsum,
        #   c[j] = const + ox wsum, ow[j] = (lo_w - shift) + 128
        # -- fused._int8_value_prep's float64 expressions, operation for operation.
        # Returns max_j |const| (the caller refuses the path at FP64_EXACT_LIMIT / 4). The
        # codes are integers: converted to int64 and summed as integers (an integer sum
        # vectorizes; a float64 one may not be reordered: 109 -> 18 us for 512 x 512).
        n, k = q.shape
        top = 0.0
        o = np.int64(off)
        for j in prange(n):
            t = _value_row(q[j], o, out[j])
            c[j], ow[j], const = _value_row_constants(t, k, zw[j], zx, signed, ox, lo_w)
            top = max(top, abs(const))
        return top

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _value_row_constants(t, k, zwj, zx, signed, ox, lo_w):  # pragma: no cover - compiled
        # value_rows' row constants from the row's exact code sum t: (c_j, ow_j, const_j).
        shift = 0.0 if signed else zwj
        wsum = np.float64(t) - k * shift
        const = 0.0 if signed else -zx * wsum
        return const + ox * wsum, (lo_w - shift) + 128.0, const

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _mapped_row(qr, lo_w, vtab, orow):  # pragma: no cover - compiled
        # mapped_rows' work on one row of codes qr: (whether its looked-up weights span at
        # most 255, the exact code sum, the looked-up sum, the row's offset w_min + 128),
        # the digits into orow where they do.
        k = qr.shape[0]
        lw = np.int32(lo_w)
        idx = np.empty(k, np.int32)
        qs = np.int64(0)
        for i in range(k):
            qi = np.int32(qr[i])
            idx[i] = qi - lw
            qs += qi
        w = np.empty(k, np.int32)
        for i in range(k):
            w[i] = vtab[idx[i]]
        vmin = np.int32(2147483647)
        vmax = np.int32(-2147483648)
        vs = np.int64(0)
        for i in range(k):
            v = w[i]
            vmin = min(vmin, v)
            vmax = max(vmax, v)
            vs += v
        if np.int64(vmax) - np.int64(vmin) > 255:
            return False, qs, vs, vmin
        off = vmin + 128
        for i in range(k):
            orow[i] = np.int8(w[i] - off)
        return True, qs, vs, off

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _mapped_row_constants(qs, vs, k, zwj, zx, signed, ox):  # pragma: no cover - compiled
        # mapped_rows' row constant from the row's code sum qs and looked-up sum vs: (c_j, const_j).
        const = 0.0 if signed else -zx * (np.float64(qs) - k * zwj)
        return const + ox * np.float64(vs), const

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def mapped_rows(q, lo_w, vtab, zw, zx, signed, ox, out, c, ow):  # pragma: no cover - compiled
        # The one-plane int8 GEMM weights of a rank-1 LUT U[x] V[w] whose V is a look-up
        # (fused._int8_unfolded_prep through _int8_linear_prep, for one digit plane): per
        # row j of the float32 weight codes q, with w_k = V[q_jk - lo_w] (vtab: the integers
        # V as int32) and the row's smallest w_min: out[j, k] = int8(w_k - (w_min + 128)),
        #   ow[j] = w_min + 128, c[j] = const + ox sum_k w_k,
        #   const = 0 (signed) or -zx (sum_k q_jk - K Zw_j)
        # (integer sums in int64, exact). Returns (rows whose w span more than 255 -- one
        # plane cannot hold them: the caller declines --, max_j |const|). Each step its own
        # loop over the row (the offsets, then the look-ups, then the range and sum): the
        # offsets and the range vectorize, the look-ups run back to back (134 -> 86 us for
        # 512 x 512 against one loop doing all three).
        n, k = q.shape
        bad = 0
        top = 0.0
        for j in prange(n):
            ok, qs, vs, off = _mapped_row(q[j], lo_w, vtab, out[j])
            if not ok:
                bad += 1
                continue
            c[j], const = _mapped_row_constants(qs, vs, k, zw[j], zx, signed, ox)
            ow[j] = np.float64(off)
            top = max(top, abs(const))
        return bad, top

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _value_row(qr, o, orow):  # pragma: no cover - compiled
        # value_rows' work on one row of codes qr: the digits orow[k] = int8(qr[k] - o), and
        # the exact code sum returned.
        t = np.int64(0)
        for i in range(qr.shape[0]):
            v = np.int64(qr[i])
            orow[i] = np.int8(v - o)
            t += v
        return t

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def weight_step(x, qmin, qmax, signed, off, vtab, lo_w, centered, scale, zp, q, inside, out, sums, ow
                    ):  # pragma: no cover - compiled
        # A training step's weight side of the int8 GEMM, one task per row while it is in
        # cache: quant_loops.channel_fake_quant's range, scale[c], zp[c], codes q and mask
        # inside, then
        # * vtab empty (the exact product): value_rows' digits out[c, k] = int8(q[c, k] -
        #   off) and the exact code sum sums[c, 0]; with centered, q[c, k] then becomes
        #   q[c, k] - zp[c] (float32, exact: integers);
        # * else (V a look-up, vtab its integers from lo_w): mapped_rows' digits, code sum
        #   sums[c, 0], looked-up sum sums[c, 1] and offset ow[c].
        # Returns (the finiteness word: >= 2**31 iff an input is Inf or NaN, the number of
        # rows whose scale is not finite -- a range wider than float32 holds --, the number
        # of rows whose looked-up weights span more than one int8 plane). Digits and sums of
        # a non-finite row are arbitrary (the caller refuses it).
        xbits = x.view(np.int32)
        rows, length = x.shape
        tops = 0
        wide = 0
        bad = 0
        o = np.int64(off)
        lo_q, hi_q = np.float32(qmin), np.float32(qmax)
        lo_in, hi_in = np.float32(qmin - 0.5), np.float32(qmax + 0.5)
        mapped = vtab.shape[0] > 0
        ends = np.empty((rows, 2), np.int32)
        for c in prange(rows):
            # (channel_fake_quant's row written out: as an inline helper returning the row's
            # finiteness word, scale and zero point, numba's parfor pass fails with
            # "unexpected cycle in lookup()")
            qr = q[c]
            xr = x[c]
            top = _non_finite_word(xbits[c])
            lo, hi = _row_range(xr, xbits[c], top < NON_FINITE, ends[c])
            s, z = _row_scale_zero_point(lo, hi, qmax, signed)
            _quantize_run(xr, qr, s, z, lo_q, hi_q)
            _mask_run(xr, inside[c], s, z, lo_in, hi_in)
            tops = max(tops, top)
            scale[c], zp[c] = s, z
            if not np.isfinite(s):
                wide += 1
            if top < NON_FINITE and mapped:
                ok, qs, vs, offset = _mapped_row(qr, lo_w, vtab, out[c])
                sums[c, 0] = qs
                sums[c, 1] = vs
                ow[c] = np.float64(offset)
                bad += np.int64(not ok)
            elif top < NON_FINITE:
                sums[c, 0] = _value_row(qr, o, out[c])
                if centered:
                    for i in range(length):
                        qr[i] = qr[i] - z
        return tops, wide, bad

    @njit(cache=True, error_model="numpy", boundscheck=False)
    def step_constants(sums, k, zw, zx, signed, ox, lo_w, mapped, c, ow):  # pragma: no cover - compiled
        # weight_step's row constants once the activation's zero point zx is known (zw: the
        # weight's, float32, one per row): value_rows' c and ow, or (mapped) mapped_rows' c.
        # Returns max_j |const_j| as those do.
        top = 0.0
        for j in range(sums.shape[0]):
            zwj = np.float64(zw[j])
            if mapped:
                c[j], const = _mapped_row_constants(sums[j, 0], sums[j, 1], k, zwj, zx, signed, ox)
            else:
                c[j], ow[j], const = _value_row_constants(sums[j, 0], k, zwj, zx, signed, ox, lo_w)
            top = max(top, abs(const))
        return top
