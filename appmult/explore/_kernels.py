"""Inner loops of the search: circuit simplification and cost, incremental planning, gate
evaluation and error sums, as plain Python functions that numba compiles when present.

Gate functions are 8-bit truth tables over the inputs ``(x0, x1, x2)``: bit ``i`` of the
table is the output for ``x0 = i & 1``, ``x1 = (i >> 1) & 1``, ``x2 = (i >> 2) & 1``
(``0x88`` is ``x0 & x1``, ``0xCA`` is ``x2 ? x1 : x0``). Node 0 is constant 0, node 1
constant 1, then the operand bits, then one node per gate.

Without numba (or with ``APPMULT_NO_NUMBA=1``) the same functions run as Python, and the
two hot kernels (:func:`eval_gates`, :func:`error_sums`) have numpy versions
(:func:`eval_gates_numpy`, :func:`error_sums_numpy`) that are slower but independent
implementations, which the tests compare against the compiled ones.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional (the nn extra has it); the numpy paths work without it
    import numba as _numba
except ImportError:  # pragma: no cover - exercised only without numba
    _numba = None

__all__ = ["COST_FIGURES", "MUX_TT", "numba_available"]

#: Truth table of ``x2 ? x1 : x0``.
MUX_TT = 0xCA
#: Cost figures :func:`circuit_cost` returns, in order.
COST_FIGURES = ("transistors", "gates", "aig_nodes", "depth")
_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def numba_available() -> bool:
    """Whether the compiled kernels are used (numba installed, ``APPMULT_NO_NUMBA`` unset)."""
    return _numba is not None and os.environ.get("APPMULT_NO_NUMBA", "") == ""


def _jit(fn):
    if _numba is None:
        return fn
    return _numba.njit(cache=True, nogil=True)(fn)


# -- truth-table helpers ------------------------------------------------------------------
@_jit
def tt_depends(t, k):
    """Whether truth table ``t`` depends on input ``k``."""
    for i in range(8):
        if ((t >> i) & 1) != ((t >> (i ^ (1 << k))) & 1):
            return True
    return False


@_jit
def _tt_flip(t, k):
    r = 0
    for i in range(8):
        r |= ((t >> (i ^ (1 << k))) & 1) << i
    return r


@_jit
def _tt_const(t, k):
    # input k is constant 0: t(x) = t(x with bit k cleared)
    r = 0
    for i in range(8):
        r |= ((t >> (i & ~(1 << k))) & 1) << i
    return r


@_jit
def _tt_merge(t, j, k):
    # input k equals input j: t(x) = t(x with bit k := bit j)
    r = 0
    for i in range(8):
        src = (i & ~(1 << k)) | (((i >> j) & 1) << k)
        r |= ((t >> src) & 1) << i
    return r


@_jit
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


# -- simplification and cost --------------------------------------------------------------
@_jit
def simplify(tt, src, n_in, rep, inv, stt, ssrc, sdep):
    """Constant propagation and alias folding over the whole gate list.

    Per node: ``rep`` (representative node: 0 for a constant, the node itself for an input
    or a gate that remains) and ``inv`` (the node is ``rep`` inverted; for a constant, its
    value). For remaining gates: ``stt`` (truth table over ``ssrc`` with the source
    inversions absorbed) and ``sdep`` (bit mask of the inputs it depends on).
    """
    n_gates = tt.shape[0]
    rep[0] = 0
    inv[0] = 0
    rep[1] = 0
    inv[1] = 1
    for x in range(2, n_in):
        rep[x] = x
        inv[x] = 0
    for g in range(n_gates):
        node = n_in + g
        t = int(tt[g])
        r0 = rep[src[g, 0]]
        r1 = rep[src[g, 1]]
        r2 = rep[src[g, 2]]
        if inv[src[g, 0]]:
            t = _tt_flip(t, 0)
        if inv[src[g, 1]]:
            t = _tt_flip(t, 1)
        if inv[src[g, 2]]:
            t = _tt_flip(t, 2)
        if r0 == 0:
            t = _tt_const(t, 0)
        if r1 == 0:
            t = _tt_const(t, 1)
        if r2 == 0:
            t = _tt_const(t, 2)
        if r1 != 0 and r1 == r0:
            t = _tt_merge(t, 0, 1)
        if r2 != 0 and r2 == r0:
            t = _tt_merge(t, 0, 2)
        elif r2 != 0 and r2 == r1:
            t = _tt_merge(t, 1, 2)
        dep = 0
        n_dep = 0
        last = 0
        for k in range(3):
            if tt_depends(t, k):
                dep |= 1 << k
                n_dep += 1
                last = k
        if n_dep == 0:
            rep[node] = 0
            inv[node] = t & 1
        elif n_dep == 1:
            rep[node] = r0 if last == 0 else (r1 if last == 1 else r2)
            inv[node] = t & 1  # output at x = 0: 1 means inverted
        else:
            rep[node] = node
            inv[node] = 0
            stt[node] = t
            ssrc[node, 0] = r0
            ssrc[node, 1] = r1
            ssrc[node, 2] = r2
            sdep[node] = dep


@_jit
def _two_input_class(t, dep):
    # The 4-bit truth table over the two inputs a gate depends on, and its class:
    # 0 AND-like (NOR cheaper), 1 OR-like (NAND cheaper), 2 XOR-like.
    j = -1
    k = -1
    for q in range(3):
        if (dep >> q) & 1:
            if j < 0:
                j = q
            else:
                k = q
    t4 = 0
    for i in range(4):
        x = ((i & 1) << j) | (((i >> 1) & 1) << k)
        t4 |= ((t >> x) & 1) << i
    ones = 0
    for i in range(4):
        ones += (t4 >> i) & 1
    return t4, ones


@_jit
def circuit_cost(tt, src, out, n_in, rep, inv, stt, ssrc, sdep, used, level, figures):
    """Cost of the simplified circuit: ``figures`` = transistors, gates, AIG nodes, depth.

    Transistors as Yosys ``stat -tech cmos`` counts the gate a remaining node maps to
    (NAND/NOR 4, AND/OR/ANDNOT/ORNOT 6, XOR/XNOR 12, MUX 12, NOT 2); an inverted product
    bit costs a NOT. Depth counts every gate but inverters.
    """
    simplify(tt, src, n_in, rep, inv, stt, ssrc, sdep)
    n_nodes = n_in + tt.shape[0]
    for x in range(n_nodes):
        used[x] = 0
        level[x] = 0
    for k in range(out.shape[0]):
        r = rep[out[k]]
        if r >= n_in:
            used[r] = 1
    for node in range(n_nodes - 1, n_in - 1, -1):
        if used[node] and rep[node] == node:
            for q in range(3):
                if (sdep[node] >> q) & 1 and ssrc[node, q] >= n_in:
                    used[ssrc[node, q]] = 1
    transistors = 0
    gates = 0
    aig = 0
    for node in range(n_in, n_nodes):
        if not used[node]:
            continue
        dep = sdep[node]
        lv = 0
        for q in range(3):
            if (dep >> q) & 1:
                lv = max(lv, level[ssrc[node, q]])
        level[node] = lv + 1
        gates += 1
        if dep == 7:
            transistors += 12
            aig += 3
        else:
            t4, ones = _two_input_class(stt[node], dep)
            if ones == 2:
                transistors += 12
                aig += 3
            elif (ones == 1 and t4 == 1) or (ones == 3 and t4 == 7):
                transistors += 4
                aig += 1
            else:
                transistors += 6
                aig += 1
    depth = 0
    # An inverted product bit needs a NOT (once per signal); inverters add no level.
    for k in range(out.shape[0]):
        r = rep[out[k]]
        depth = max(depth, level[r])
        if r != 0 and inv[out[k]] and used[r] != 2:
            used[r] = 2
            transistors += 2
            gates += 1
    figures[0] = transistors
    figures[1] = gates
    figures[2] = aig
    figures[3] = depth


# -- incremental evaluation -----------------------------------------------------------------
@_jit
def plan(tt, src, out, n_in, changed, valid, active, dirty, recompute):
    """Which gates a candidate must (re)compute, given its parent's valid values.

    ``active``: the node reaches a product bit. ``dirty``: the node or something it
    reads changed. ``recompute``: active and (dirty or not valid in the parent).

    Returns:
        The number of gates to compute.
    """
    n_gates = tt.shape[0]
    n_nodes = n_in + n_gates
    for x in range(n_nodes):
        active[x] = False
        dirty[x] = False
        recompute[x] = False
    for k in range(out.shape[0]):
        active[out[k]] = True
    for g in range(n_gates - 1, -1, -1):
        if active[n_in + g]:
            t = tt[g]
            for q in range(3):
                if tt_depends(t, q):
                    active[src[g, q]] = True
    count = 0
    for g in range(n_gates):
        node = n_in + g
        d = changed[node]
        if not d:
            t = tt[g]
            for q in range(3):
                if dirty[src[g, q]] and tt_depends(t, q):
                    d = True
        dirty[node] = d
        if active[node] and (d or not valid[node]):
            recompute[node] = True
            count += 1
    return count


@_jit
def _classify(t):
    # (kind, ma, mb, my, sel): kind 0 const, 1 buffer of input sel, 2 xor, 3 and-like
    # ((x0^ma) & (x1^mb)) ^ my, 4 mux, 5 any other 3-input table.
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    zero = np.uint64(0)
    if not tt_depends(t, 2):
        t4 = t & 0xF
        if t4 == 0 or t4 == 15:
            return 0, zero, zero, ones if t4 == 15 else zero, 0
        d0 = tt_depends(t, 0)
        d1 = tt_depends(t, 1)
        if d0 and not d1:
            return 1, zero, zero, ones if t4 & 1 else zero, 0
        if d1 and not d0:
            return 1, zero, zero, ones if t4 & 1 else zero, 1
        if t4 == 6 or t4 == 9:
            return 2, zero, zero, ones if t4 == 9 else zero, 0
        c = 0
        for i in range(4):
            c += (t4 >> i) & 1
        if c == 1:
            m = 0
            for i in range(4):
                if (t4 >> i) & 1:
                    m = i
            return 3, zero if m & 1 else ones, zero if m & 2 else ones, zero, 0
        z = 0
        for i in range(4):
            if not (t4 >> i) & 1:
                z = i
        return 3, zero if z & 1 else ones, zero if z & 2 else ones, ones, 0
    if t == 0xCA:
        return 4, zero, zero, zero, 0
    return 5, zero, zero, zero, 0


@_jit
def eval_gates(tt, src, n_in, recompute, vp, vc):
    """Compute the ``recompute`` gates into ``vc``, reading the others from ``vp``."""
    n_gates = tt.shape[0]
    n = vc.shape[1]
    for g in range(n_gates):
        node = n_in + g
        if not recompute[node]:
            continue
        t = int(tt[g])
        s0 = src[g, 0]
        s1 = src[g, 1]
        s2 = src[g, 2]
        a = vc[s0] if recompute[s0] else vp[s0]
        b = vc[s1] if recompute[s1] else vp[s1]
        c = vc[s2] if recompute[s2] else vp[s2]
        y = vc[node]
        kind, ma, mb, my, sel = _classify(t)
        if kind == 0:
            for i in range(n):
                y[i] = my
        elif kind == 1:
            if sel == 0:
                for i in range(n):
                    y[i] = a[i] ^ my
            else:
                for i in range(n):
                    y[i] = b[i] ^ my
        elif kind == 2:
            for i in range(n):
                y[i] = a[i] ^ b[i] ^ my
        elif kind == 3:
            for i in range(n):
                y[i] = ((a[i] ^ ma) & (b[i] ^ mb)) ^ my
        elif kind == 4:
            for i in range(n):
                y[i] = a[i] ^ ((a[i] ^ b[i]) & c[i])
        else:
            ones = np.uint64(0xFFFFFFFFFFFFFFFF)
            for i in range(n):
                acc = np.uint64(0)
                for m in range(8):
                    if (t >> m) & 1:
                        la = a[i] if m & 1 else a[i] ^ ones
                        lb = b[i] if m & 2 else b[i] ^ ones
                        lc = c[i] if m & 4 else c[i] ^ ones
                        acc |= la & lb & lc
                y[i] = acc


def eval_gates_numpy(tt, src, n_in, recompute, vp, vc):
    """numpy version of :func:`eval_gates` (same arguments and result)."""
    for g in np.flatnonzero(recompute[n_in:]):
        node = n_in + int(g)
        x = [vc[s] if recompute[s] else vp[s] for s in src[g]]
        t = int(tt[g])
        # Shannon expansion over the minterms: slow, but shares nothing with the kernel.
        acc = np.zeros(vc.shape[1], dtype=np.uint64)
        for m in range(8):
            if (t >> m) & 1:
                term = np.full(vc.shape[1], _ONES, dtype=np.uint64)
                for q in range(3):
                    term &= x[q] if (m >> q) & 1 else ~x[q]
                acc |= term
        vc[node] = acc


@_jit
def gather_outputs(out, recompute, vp, vc, o):
    """``o[k] = `` the words of product bit ``k`` (from ``vc`` where recomputed, else ``vp``)."""
    n = o.shape[1]
    for k in range(out.shape[0]):
        x = out[k]
        row = vc[x] if recompute[x] else vp[x]
        for i in range(n):
            o[k, i] = row[i]


@_jit
def _difference(o, e, signed, ab):
    # ab = o - e (two's complement, width_p + 1 bits); the product's top bit is sign-extended
    # when signed, zero-extended when not
    wp = o.shape[0]
    n = o.shape[1]
    borrow = np.zeros(n, dtype=np.uint64)
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    for k in range(wp + 1):
        src = wp - 1 if k >= wp else k
        ek = e[k]
        dk = ab[k]
        if k < wp or signed:
            ok = o[src]
            for i in range(n):
                x = ok[i] ^ ek[i]
                dk[i] = x ^ borrow[i]
                borrow[i] = ((ok[i] ^ ones) & ek[i]) | ((x ^ ones) & borrow[i])
        else:
            for i in range(n):
                x = ek[i]
                dk[i] = x ^ borrow[i]
                borrow[i] = ek[i] | ((x ^ ones) & borrow[i])


@_jit
def _absolute(ab, valid, nz):
    # ab := |ab| = (ab ^ s) + s with s the sign plane, masked by valid; nz |= any bit set
    m = ab.shape[0]
    n = ab.shape[1]
    sign = ab[m - 1].copy()
    carry = sign.copy()
    for k in range(m):
        dk = ab[k]
        for i in range(n):
            x = dk[i] ^ sign[i]
            v = (x ^ carry[i]) & valid[i]
            carry[i] = x & carry[i]
            dk[i] = v
            nz[i] |= v


@_jit
def _bit_counts(ab, nz, counts, stats):
    # stats[0] += vectors with an error; counts[k] += vectors with bit k of |e| set
    n = ab.shape[1]
    total = np.int64(0)
    for i in range(n):
        total += np.int64(_popcount(nz[i]))
    stats[0] += total
    for k in range(ab.shape[0]):
        c = np.int64(0)
        dk = ab[k]
        for i in range(n):
            c += np.int64(_popcount(dk[i]))
        counts[k] += c


@_jit
def _worst_case(ab, nz):
    # greedy from the top plane over all vectors at once: the largest |e|
    n = ab.shape[1]
    cand = nz.copy()
    w = 0
    for k in range(ab.shape[0] - 1, -1, -1):
        dk = ab[k]
        hit = np.uint64(0)
        for i in range(n):
            hit |= cand[i] & dk[i]
        if hit != 0:
            for i in range(n):
                cand[i] &= dk[i]
            w |= 1 << k
    return w


@_jit
def _weighted_sums(ab, nz, wv, wr, stats):
    # stats[2:6] += sum w|e|, sum w e^2, sum w [e != 0], sum wr |e| (per-vector values)
    m = ab.shape[0]
    n = ab.shape[1]
    vals = np.zeros(64, dtype=np.int64)
    s_abs = 0.0
    s_sq = 0.0
    s_nz = 0.0
    s_rel = 0.0
    for i in range(n):
        if nz[i] == 0:
            continue
        for j in range(64):
            vals[j] = 0
        # transpose the bit planes of this word into 64 integers (vectorizes over j)
        for k in range(m):
            x = ab[k, i]
            for j in range(64):
                vals[j] |= np.int64((x >> np.uint64(j)) & np.uint64(1)) << k
        base = 64 * i
        for j in range(64):
            fv = float(vals[j])
            wj = wv[base + j]
            s_abs += wj * fv
            s_sq += wj * fv * fv
            s_nz += wj if vals[j] != 0 else 0.0
            s_rel += wr[base + j] * fv
    stats[2] += s_abs
    stats[3] += s_sq
    stats[4] += s_nz
    stats[5] += s_rel


@_jit
def error_sums(o, e, valid, signed, unpack, wv, wr, counts, stats):
    """Error sums of one chunk of output words against the exact product's bits.

    Bit-plane major, so that every inner loop runs over words and vectorizes.

    Args:
        o: ``(width_p, n)`` output words; bit ``j`` of word ``i`` is vector ``64 i + j``.
        e: ``(width_p + 1, n)`` words of the exact product (two's complement, one extra bit).
        valid: ``(n,)`` mask of the vectors that count.
        signed: the output is two's complement.
        unpack: also the weighted sums (per-vector values; slower).
        wv: per-vector weights of the absolute/squared error and error rate.
        wr: per-vector weights of the relative error (``w / |exact|``, 0 where exact is 0).
        counts: ``(width_p + 1,)`` int64, ``counts[k] +=`` vectors with bit ``k`` of ``|e|`` set.
        stats: float64 ``[nonzero count, wce, sum w|e|, sum w e^2, sum w [e != 0], sum wr |e|]``
            (added to; ``wce`` is a running maximum).
    """
    n = o.shape[1]
    ab = np.empty((o.shape[0] + 1, n), dtype=np.uint64)
    nz = np.zeros(n, dtype=np.uint64)
    _difference(o, e, signed, ab)
    _absolute(ab, valid, nz)
    _bit_counts(ab, nz, counts, stats)
    w = _worst_case(ab, nz)
    if w > stats[1]:
        stats[1] = w
    if unpack:
        _weighted_sums(ab, nz, wv, wr, stats)


def error_sums_numpy(o, e, valid, signed, unpack, wv, wr, counts, stats):
    """numpy version of :func:`error_sums`: unpacks every vector and subtracts integers."""
    wp, n = o.shape
    m = wp + 1

    def values(words, width, is_signed):
        bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], -1),
                             axis=1, bitorder="little").astype(np.int64)
        v = (bits << np.arange(width, dtype=np.int64)[:, None]).sum(axis=0)
        if is_signed:
            v = np.where(v >= 1 << (width - 1), v - (1 << width), v)
        return v

    approx = values(o, wp, signed)
    exact = values(e, m, True)
    mask = np.unpackbits(valid.view(np.uint8), bitorder="little").astype(bool)
    err = np.abs(approx - exact) * mask
    for k in range(m):
        counts[k] += int(((err >> k) & 1).sum())
    stats[0] += int((err != 0).sum())
    stats[1] = max(stats[1], float(err.max(initial=0)))
    if unpack:
        f = err.astype(np.float64)
        stats[2] += float((wv * f).sum())
        stats[3] += float((wv * f * f).sum())
        stats[4] += float(wv[err != 0].sum())
        stats[5] += float((wr * f).sum())
