"""The numba-compiled fake quantization of the CPU training step and inference.

``clamp(round(x / s + Z), qmin, qmax)`` and, for the straight-through gradient, the mask
``qmin - 0.5 <= x / s + Z <= qmax + 0.5`` take seven torch passes over the tensor (the
boolean comparisons among the slowest); :func:`fake_quant` makes one, with the same
float32 operations in the same order (division, addition, round half to even, clamp
that keeps NaN), so the same bits. Each task also looks for non-finite inputs in the block
it has just read (still in cache; clamping maps an Inf to a valid code, so ``q`` cannot
tell): the exponent field of a float32's bits plus its lowest bit carries into bit 31
only when the field is all ones (Inf, NaN), and an OR over the block keeps that bit -- an
integer reduction that vectorizes, so the layers need no pass of their own to refuse
NaN and Inf. :func:`ste_grad` is the backward ``grad * mask / s``.
One scale and zero point per row of the ``(C, L)`` view: per output channel for weights,
``C = 1`` for activations. :func:`dequantize_channels` is a convolution's ``acc * scale +
bias`` (per output channel) in one pass instead of two. :func:`same_words` compares a
layer's weight with the copy its cached codes were made from. :func:`map_codes`,
:func:`quantize_map` and :func:`dequantize_channels_zw` serve a rank-1 convolution whose
activation factor is a look-up (``fused._rank1_mapped_conv`` and its eval plan).
:func:`range_fake_quant` is a training step's activation quantization from the observer's
range (its scale and zero point in the same call), with the linear int8 GEMM's activation
side where asked.

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

#: The exponent field of a float32's bits (all ones for Inf and NaN only) and its lowest bit:
#: ``(bits & EXPONENT) + EXPONENT_LSB`` reaches :data:`NON_FINITE` for Inf and NaN only.
EXPONENT = 0x7F800000
EXPONENT_LSB = 0x00800000
NON_FINITE = 1 << 31


if numba is not None:
    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _quantize_run(xr, qr, s, z, lo, hi):  # pragma: no cover - compiled
        # qr[i] = clamp(rint(xr[i] / s + z), lo, hi); NaN stays NaN (selects, not branches)
        for i in range(xr.shape[0]):
            r = np.rint(xr[i] / s + z)
            r = lo if r < lo else r
            qr[i] = hi if r > hi else r

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _mask_run(xr, mr, s, z, lo_in, hi_in):  # pragma: no cover - compiled
        # mr[i] = lo_in <= xr[i] / s + z <= hi_in (the straight-through mask)
        for i in range(xr.shape[0]):
            t = xr[i] / s + z
            mr[i] = (t >= lo_in) & (t <= hi_in)

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _non_finite_word(br):  # pragma: no cover - compiled
        # OR of (bits & EXPONENT) + EXPONENT_LSB over the run: >= 2**31 iff one is Inf or NaN
        top = 0
        for i in range(br.shape[0]):
            top |= (br[i] & EXPONENT) + EXPONENT_LSB
        return top

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def fake_quant(x, scale, zp, qmin, qmax, q, inside):  # pragma: no cover - compiled
        # q[c, i] = clamp(rint(x[c, i] / scale[c] + zp[c]), qmin, qmax) (NaN stays NaN);
        # inside[c, i] = qmin - 0.5 <= t <= qmax + 0.5 where inside is not empty.
        # Returns the largest over tasks of the OR of (bits & EXPONENT) + EXPONENT_LSB over
        # their inputs (x viewed as int32, the sums in int64): >= 2**31 iff one is Inf or NaN.
        xbits = x.view(np.int32)
        rows, length = x.shape
        tops = 0
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
            xr = x[c, i0:i0 + n]
            _quantize_run(xr, q[c, i0:i0 + n], s, z, lo, hi)
            # a loop of its own: in the one above it cost 1.5x, here 1.3x
            tops = max(tops, _non_finite_word(xbits[c, i0:i0 + n]))
            if mask:
                _mask_run(xr, inside[c, i0:i0 + n], s, z, lo_in, hi_in)
        return tops

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _row_range(xr, br, finite, ends):  # pragma: no cover - compiled
        # (min, max) of the row xr as the float loop `lo = v if v < lo else lo` (and max)
        # from lo = hi = xr[0] gives them. For a finite row, by order-preserving integer keys
        # of the float32 bits (a float's bits, the magnitude bits flipped when negative: an
        # integer min/max vectorizes, 70 -> 16 us for 512 x 512); the float loop where the
        # keys end on a zero (-0.0 and +0.0 compare equal: the loop keeps the first one met)
        # or the row is not finite (NaN compares false). ends: a 2-entry int32 scratch row.
        if finite:
            klo = np.int64(2147483647)
            khi = np.int64(-2147483648)
            for i in range(br.shape[0]):
                b = np.int64(br[i])
                k = b ^ ((b >> 31) & 0x7FFFFFFF)
                klo = min(klo, k)
                khi = max(khi, k)
            ends[0] = np.int32(klo ^ ((klo >> 31) & 0x7FFFFFFF))
            ends[1] = np.int32(khi ^ ((khi >> 31) & 0x7FFFFFFF))
            f = ends.view(np.float32)
            lo, hi = f[0], f[1]
            if lo != 0 and hi != 0:
                return lo, hi
        lo, hi = xr[0], xr[0]
        for i in range(xr.shape[0]):
            v = xr[i]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        return lo, hi

    @njit(cache=True, error_model="numpy", boundscheck=False)
    def _row_scale_zero_point(lo, hi, qmax, signed):  # pragma: no cover - compiled
        # quant._scale_zero_point of one row's range, float32 operation for operation (NaN
        # propagates through the clamps and the maximum as in torch; the selects keep -0.0
        # where torch's clamps do).
        if signed:
            alo, ahi = abs(lo), abs(hi)
            amax = alo if (alo != alo or alo > ahi) else ahi
            scale = amax / np.float32(qmax + 1)
            zp = np.float32(0.0)
        else:
            lo = np.float32(0.0) if lo > 0 else lo
            hi = np.float32(0.0) if hi < 0 else hi
            scale = (hi - lo) / np.float32(qmax)
            safe = scale if scale > 0 else np.float32(1.0)
            zp = np.rint(-lo / safe)
            zp = np.float32(0.0) if zp < 0 else zp
            zp = np.float32(qmax) if zp > qmax else zp
        return (scale if scale > 0 else np.float32(1.0)), zp

    #: :func:`appmult.nn.quant._scale_zero_point` of one float32 range (``np.float32``
    #: bounds), returned as two ``np.float32`` -- the activation observer's scale and zero point.
    range_scale_zero_point = _row_scale_zero_point

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def range_fake_quant(x, lo, hi, qmin, qmax, signed, sz, q, inside, ox, table, lo_x, centered, a
                         ):  # pragma: no cover - compiled
        # An activation's quantization from its range [lo, hi] (np.float32): the scale and
        # zero point as range_scale_zero_point (into sz[0], sz[1]), the codes q and mask
        # inside as fake_quant (x, q, inside: C-contiguous, any shape), and where a is not
        # empty the int8 GEMM's activation side (int8_loops): int8(q - ox) (table empty: the
        # GEMM's factor is the value), else the int8 table of U - ox at q - lo_x; with
        # centered, q then becomes q - zero point (float32, exact: integers). Returns
        # fake_quant's finiteness word (>= 2**31 iff an input is Inf or NaN; then a is
        # arbitrary).
        s, z = _row_scale_zero_point(lo, hi, qmax, signed)
        sz[0], sz[1] = s, z
        xf = x.reshape(-1)
        qf, mf = q.reshape(-1), inside.reshape(-1)
        af = a.reshape(-1)
        side = af.shape[0] > 0
        xbits = xf.view(np.int32)
        length = xf.shape[0]
        lo_q, hi_q = np.float32(qmin), np.float32(qmax)
        lo_in, hi_in = np.float32(qmin - 0.5), np.float32(qmax + 0.5)
        o = np.int32(ox)
        lx = np.int32(lo_x)
        mapped = table.shape[0] > 0
        tops = 0
        nb = (length + BLOCK - 1) // BLOCK
        for task in prange(nb):
            i0 = task * BLOCK
            n = min(length - i0, BLOCK)
            xr, qr = xf[i0:i0 + n], qf[i0:i0 + n]
            _quantize_run(xr, qr, s, z, lo_q, hi_q)
            top = _non_finite_word(xbits[i0:i0 + n])
            tops = max(tops, top)
            _mask_run(xr, mf[i0:i0 + n], s, z, lo_in, hi_in)
            if side and top < NON_FINITE:
                ar = af[i0:i0 + n]
                if mapped:
                    for i in range(n):
                        ar[i] = table[np.int32(qr[i]) - lx]
                else:
                    for i in range(n):
                        ar[i] = np.int8(np.int32(qr[i]) - o)
            if centered:
                for i in range(n):
                    qr[i] = qr[i] - z
        return tops

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def channel_fake_quant(x, qmin, qmax, signed, scale, zp, q, inside):  # pragma: no cover - compiled
        # Per row c of x: the range [min, max], scale[c] and zp[c] from it
        # (_row_scale_zero_point), then q and inside as fake_quant does, in one task per row
        # (the row stays in cache between its passes). Returns fake_quant's finiteness word
        # (>= 2**31 iff an input is Inf or NaN; a row holding NaN gets an arbitrary range).
        xbits = x.view(np.int32)
        rows, length = x.shape
        tops = 0
        lo_q, hi_q = np.float32(qmin), np.float32(qmax)
        lo_in, hi_in = np.float32(qmin - 0.5), np.float32(qmax + 0.5)
        mask = inside.shape[0] > 0
        ends = np.empty((rows, 2), np.int32)  # each row's range as float32 bits
        for c in prange(rows):
            xr = x[c]
            top = _non_finite_word(xbits[c])
            tops = max(tops, top)
            lo, hi = _row_range(xr, xbits[c], top < NON_FINITE, ends[c])
            s, z = _row_scale_zero_point(lo, hi, qmax, signed)
            scale[c], zp[c] = s, z
            _quantize_run(xr, q[c], s, z, lo_q, hi_q)
            if mask:
                _mask_run(xr, inside[c], s, z, lo_in, hi_in)
        return tops

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

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def dequantize_channels(acc, scale, bias):  # pragma: no cover - compiled
        # acc[n, c, i] = acc[n, c, i] * scale[c] + bias[c] in place (float32: the multiply
        # rounded, then the add, as torch's mul_ and add_; no fused multiply-add); an empty
        # bias adds nothing.
        batch, channels, length = acc.shape
        has_bias = bias.shape[0] > 0
        nb = (length + BLOCK - 1) // BLOCK
        for task in prange(batch * channels * nb):
            row = task // nb
            c = row % channels
            i0 = (task % nb) * BLOCK
            n = min(length - i0, BLOCK)
            s = scale[c]
            r = acc[row // channels, c, i0:i0 + n]
            if has_bias:
                b = bias[c]
                for i in range(n):
                    r[i] = r[i] * s + b
            else:
                for i in range(n):
                    r[i] = r[i] * s

    @njit(cache=True, boundscheck=False)
    def same_words(a, b):  # pragma: no cover - compiled
        # Whether two int64 arrays of one length hold the same words: the OR of their XORs
        # (a loop that vectorizes; one thread: for the ~1 MB weight of a 512x512 linear layer
        # 25 us here, torch.equal on the same words 90 us, a parallel loop 60-110 us).
        d = 0
        for i in range(a.shape[0]):
            d |= a[i] ^ b[i]
        return d == 0

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def map_codes(q, table, lo, out):  # pragma: no cover - compiled
        # out[i] = table[q[i] - lo] for the integer-valued float32 codes q (of the table's
        # range: the quantizer's output); a NaN or out-of-range code reads the first or the
        # last entry instead of memory outside the table (selects: the loop vectorizes).
        top = np.float32(table.shape[0] - 1)
        nb = (q.shape[0] + BLOCK - 1) // BLOCK
        for task in prange(nb):
            i0 = task * BLOCK
            for i in range(i0, min(q.shape[0], i0 + BLOCK)):
                k = q[i] - lo
                k = k if k >= 0 else np.float32(0.0)
                k = top if k > top else k
                out[i] = table[np.int32(k)]

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _group_sums(fg, codes, g, cg, length, off):  # pragma: no cover - compiled
        # fg[i] = sum over the channels of group g of f32(codes[ch, i]) + off, for one
        # image's codes flattened (C, length): int32 offsets or float32 codes, integers
        # (exact below 2**24: the callers' bounds), summed from +0.0
        for i in range(length):
            fg[i] = 0.0
        for ch in range(g * cg, (g + 1) * cg):
            src = codes[ch * length:(ch + 1) * length]
            for i in range(length):
                fg[i] += np.float32(src[i]) + off

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _into_padded(sg, fg, h, w, ph, pw):  # pragma: no cover - compiled
        # the (h w) flat map fg into the interior of the zero-bordered (H + 2 ph, W + 2 pw) sg
        for r in range(sg.shape[0]):
            for k in range(sg.shape[1]):
                sg[r, k] = 0.0
        for r in range(h):
            sr, fr = sg[ph + r, pw:pw + w], fg[r * w:(r + 1) * w]
            for k in range(w):
                sr[k] = fr[k]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def quantize_map(x, scale, zp, qmin, qmax, table, groups, zx, a, sums):  # pragma: no cover - compiled
        # For x, a (N, C, H, W): a[n, c] = table[q - qmin] with q = clamp(rint(x / s + z),
        # qmin, qmax) as fake_quant computes it (one scale and zero point); where sums (N, G,
        # H + 2 ph, W + 2 pw) is not empty, its interior holds the sum over the channels of
        # each group of (q - zx) and its border zeros (the window sums' zero padding, ph and
        # pw from its shape): integers, exact below 2**24. A NaN code becomes qmin here (the
        # selects below; the caller refuses the input: the returned word is fake_quant's).
        # One task per image, each step a loop over the whole image (C H W: the per-channel
        # loops of H W ran 1.6x slower, 1.5-1.7x for a ResNet-20 batch): the codes as int32
        # offsets q - qmin, then the look-ups by them, then the group sums over whole planes
        # (q - zx = offset + (qmin - zx), integers), copied into the padded maps once per
        # group. (One loop with the look-up in it ran 9x slower.)
        n, c, h, w = x.shape
        has_sums = sums.shape[0] > 0
        if a.shape != x.shape or table.shape[0] < qmax - qmin + 1 or groups < 1 or c % groups \
                or (has_sums and (sums.shape[0] != n or sums.shape[1] != groups or sums.shape[2] < h
                                  or sums.shape[3] < w)):
            raise ValueError("quantize_map: operands of inconsistent shapes")   # (no bounds checks below)
        ph, pw = (sums.shape[2] - h) // 2, (sums.shape[3] - w) // 2
        cg = c // groups
        s, z = scale[0], zp[0]
        lo, hi = np.float32(qmin), np.float32(qmax)
        shift = lo - zx
        length = h * w
        image = c * length
        x2, a2, xb2 = x.reshape(n, image), a.reshape(n, image), x.view(np.int32).reshape(n, image)
        offsets = np.empty((n, image), np.int32)
        flat = np.empty((n if has_sums else 0, length), np.float32)   # one group's unpadded sums
        tops = 0
        for img in prange(n):
            xr, ar, qr = x2[img], a2[img], offsets[img]
            for i in range(image):
                v = np.rint(xr[i] / s + z)
                v = v if v >= lo else lo      # NaN -> lo: never an index outside the table
                v = hi if v > hi else v
                qr[i] = np.int32(v - lo)
            for i in range(image):
                ar[i] = table[np.uint32(qr[i])]   # (unsigned: no negative-index wrap-around)
            tops = max(tops, _non_finite_word(xb2[img]))
            if has_sums:
                fg = flat[img]
                for g in range(groups):
                    _group_sums(fg, qr, g, cg, length, shift)
                    _into_padded(sums[img, g], fg, h, w, ph, pw)
        return tops

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _window_spans(geom, ho, wo, wp):  # pragma: no cover - compiled
        # (wlen, rlen) of _flat_window_sums: the flat starts up to the last output's, and the
        # row sums the windows at those starts read
        wlen = (ho - 1) * geom[2] * wp + (wo - 1) * geom[3] + 1
        return wlen, wlen + (geom[0] - 1) * geom[4] * wp

    @njit(inline="always", error_model="numpy", boundscheck=False)
    def _flat_window_sums(src, geom, ho, wo, wp, rows, full, win):  # pragma: no cover - compiled
        # win[i wo + j] = the sum of the padded map src (flattened, row stride wp) over the
        # receptive field of output (i, j) (geom = kh, kw, sh, sw, dh, dw): the row sums at
        # every flat start t, R[t] = sum_b src[t + b dw], then the window sums W[t] = sum_a
        # R[t + a dh wp], read at t = i sh wp + j sw -- loops over whole planes (the sums at
        # positions no output reads cost less than loops over rows of wo, which do not
        # vectorize: 3.6x faster for a LeNet batch, 2.7x for a ResNet-20 one). Integer sums
        # (exact in any order below 2**24: the callers bound the sum of magnitudes), each
        # started from +0.0. rows, full: scratch of _window_spans' lengths (rlen, wlen).
        kh, kw, sh, sw, dh, dw = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]
        rlen, wlen = rows.shape[0], full.shape[0]
        for t in range(rlen):
            rows[t] = np.float32(0.0) + src[t]
        for b in range(1, kw):
            sb = src[b * dw:b * dw + rlen]
            for t in range(rlen):
                rows[t] += sb[t]
        for t in range(wlen):
            full[t] = np.float32(0.0) + rows[t]
        for a in range(1, kh):
            ra = rows[a * dh * wp:a * dh * wp + wlen]
            for t in range(wlen):
                full[t] += ra[t]
        for i in range(ho):
            wi, fi = win[i * wo:(i + 1) * wo], full[i * sh * wp:]
            for j in range(wo):
                wi[j] = fi[j * sw]

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def dequantize_channels_zw(acc, sums, geom, nzw, scale, bias):  # pragma: no cover - compiled
        # acc[n, j] = (acc[n, j] + nzw[j] S[n, g(j)]) * scale[j] + bias[j] in place, float32,
        # for acc (N, Co, Ho, Wo), with S the window sums over each output's receptive field
        # of sums (N, G, H + 2 ph, W + 2 pw: zero-padded by quantize_map; geom = kh, kw, sh,
        # sw, dh, dw): integers, exact below 2**24 (the caller's bound is on the sum of
        # magnitudes, so every partial sum in any order is exact too). The product is exact,
        # the sum rounds once (as the integer accumulator's conversion), then the multiply
        # and the add each round (torch's addcmul_, mul_ and add_); an empty bias adds
        # nothing. An empty scale (and bias) adds the term only: acc[n, j] += nzw[j] S
        # (the training path, which dequantizes later). One task per image; its S per group
        # once (_flat_window_sums), then every output channel of it.
        batch, channels, ho, wo = acc.shape
        groups, hp, wp = sums.shape[1], sums.shape[2], sums.shape[3]
        if sums.shape[0] != batch or groups < 1 or channels % groups or nzw.shape[0] < channels \
                or geom.shape[0] != 6 or min(geom[2], geom[3], geom[4], geom[5]) < 1 \
                or (hp - geom[4] * (geom[0] - 1) - 1) // geom[2] + 1 != ho \
                or (wp - geom[5] * (geom[1] - 1) - 1) // geom[3] + 1 != wo \
                or scale.shape[0] not in (0, channels) or bias.shape[0] not in (0, channels) \
                or (bias.shape[0] > 0 and scale.shape[0] == 0):
            raise ValueError("dequantize_channels_zw: operands of inconsistent shapes")   # (no bounds checks below)
        per = channels // groups
        has_bias = bias.shape[0] > 0
        scaled = scale.shape[0] > 0
        olen = ho * wo
        wlen, rlen = _window_spans(geom, ho, wo, wp)
        rows_all = np.empty((batch, rlen), np.float32)
        full_all = np.empty((batch, wlen), np.float32)
        s_all = np.empty((batch, olen), np.float32)
        acc3 = acc.reshape(batch, channels, olen)
        maps = sums.reshape(batch, groups, hp * wp)
        for img in prange(batch):
            rows, full, win = rows_all[img], full_all[img], s_all[img]
            for g in range(groups):
                _flat_window_sums(maps[img, g], geom, ho, wo, wp, rows, full, win)
                for j in range(g * per, (g + 1) * per):
                    wj = nzw[j]
                    sc = scale[j] if scaled else np.float32(1.0)
                    b = bias[j] if has_bias else np.float32(0.0)
                    out = acc3[img, j]
                    if not scaled:
                        for k in range(olen):
                            out[k] += wj * win[k]
                    elif has_bias:
                        for k in range(olen):
                            out[k] = (out[k] + wj * win[k]) * sc + b
                    else:
                        for k in range(olen):
                            out[k] = (out[k] + wj * win[k]) * sc

    @njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
    def map_codes_sums(q, table, lo, zx, out, sums):  # pragma: no cover - compiled
        # For the integer-valued float32 codes q (N, C, H, W): out = table[q - lo] as
        # map_codes reads it (a NaN or out-of-range code reads the first or the last entry),
        # and the interior of sums (N, G, H + 2 ph, W + 2 pw) the sum over each group's
        # channels of q - zx, its border zeros (integers, exact below 2**24: the caller's
        # bound). One task per image: the look-ups over the whole image, then the group sums
        # over whole planes, copied into the padded maps once per group.
        n, c, h, w = q.shape
        groups = sums.shape[1]
        if out.shape != q.shape or table.shape[0] < 1 or sums.shape[0] != n or groups < 1 or c % groups \
                or sums.shape[2] < h or sums.shape[3] < w:
            raise ValueError("map_codes_sums: operands of inconsistent shapes")   # (no bounds checks below)
        ph, pw = (sums.shape[2] - h) // 2, (sums.shape[3] - w) // 2
        cg = c // groups
        top = np.float32(table.shape[0] - 1)
        length = h * w
        image = c * length
        q2, o2 = q.reshape(n, image), out.reshape(n, image)
        flat = np.empty((n, length), np.float32)
        for img in prange(n):
            qr, orow, fg = q2[img], o2[img], flat[img]
            for i in range(image):
                k = qr[i] - lo
                k = k if k >= 0 else np.float32(0.0)
                k = top if k > top else k
                orow[i] = table[np.int32(k)]
            for g in range(groups):
                _group_sums(fg, qr, g, cg, length, -zx)   # (q + (-zx) is q - zx, signed zeros too)
                _into_padded(sums[img, g], fg, h, w, ph, pw)
