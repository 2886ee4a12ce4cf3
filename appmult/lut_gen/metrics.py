"""Error metrics of an approximate product table, as EvoApprox defines them.

With ``e = approx - exact`` over all operand pairs (uniform), or under a joint operand
distribution ``w`` (weights, normalised to sum 1), and ``wa``, ``wb`` the operand
widths. Keys ending in ``_pct`` are percentages (100 times the plain key); every
other key is a fraction or an absolute value.

* ``er`` -- error rate (EvoApprox "EP"): share of pairs with ``e != 0``; ``er_pct``.
* ``mae`` -- mean ``|e|`` (EvoApprox "MAE"/"MED"); ``mae_pct = 100 * mae / 2**(wa+wb)``
  (EvoApprox "MAE%").
* ``wce`` -- worst-case error, max ``|e|``; ``wce_pct = 100 * wce / 2**(wa+wb)``
  (EvoApprox "WCE%").
* ``mre`` -- mean relative error (EvoApprox "MRE"/"MRED"): mean of ``|e| / |exact|`` over
  the pairs whose exact product is **not 0** only (pairs with ``exact == 0`` are left
  out of the mean, numerator and count alike; under a distribution, the weights are
  renormalised over those pairs); ``mre_pct``.
* ``wcre`` -- worst-case relative error: max ``|e| / |exact|`` over the pairs with
  ``exact != 0``; ``wcre_pct``.
* ``mre_max1`` / ``wcre_max1`` (and ``_pct``) -- the other convention found in the
  literature: ``|e| / max(1, |exact|)`` averaged / maximised over **all** pairs, so a
  pair with ``exact == 0`` counts ``|e|`` itself. The two conventions differ visibly for
  circuits with a nonzero output on a zero operand, and for the constant-zero
  multiplier (``mre`` = 100%, ``mre_max1`` < 100%).
* ``nmed`` -- ``mae / max|exact|`` (max over *all* pairs, so that values under different
  operand distributions stay comparable); ``nmed_pct``.
* ``mse`` -- mean ``e**2``; ``bias`` -- mean ``e``; ``std`` -- standard deviation of
  ``e`` (population, i.e. divided by the count / total weight).
* ``pairs`` (number of pairs seen), ``max_exact`` (``max|exact|``), ``weighted``.

Under a distribution the maxima (``wce``, ``wcre``, ``wcre_max1``) run over the pairs
with non-zero weight. Undefined values are ``nan``: ``mre``/``wcre`` when no pair (of
non-zero weight) has a nonzero exact product, and ``mae_pct``/``wce_pct`` when the widths
are neither given nor readable from a ``(2**wa, 2**wb)`` table.

Precision (uniform case): counts, ``sum|e|``, ``sum e`` and ``sum e**2`` are exact
integer sums (numpy int64/uint64 within blocks of at most 2**22 elements, Python ints
across blocks, so even 16x16 tables with 32-bit errors cannot overflow); ``mae``,
``mse``, ``bias`` and ``std`` are then the correctly rounded float64 of the exact
rationals (``std`` from the exact integer ``n*sum(e**2) - sum(e)**2``, so no
cancellation). The relative-error sums are float64: each row of the table is summed
by numpy (pairwise summation), and the row sums are combined with :func:`math.fsum`
(exactly rounded, independent of order). Maxima are exact. Hence streaming a table in
row blocks (:class:`MetricsAccumulator`) gives bit-identical results to the one-shot
:func:`error_metrics` for every metric. Weighted metrics are float64 throughout
(per-row sums, combined with ``fsum``; the variance uses the centred parallel formula),
relative precision about 1e-14.

Depends on numpy only.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from ..codes import codes_to_values
from ..errors import InvalidTypeError, InvalidValueError

__all__ = [
    "METRIC_KEYS",
    "MetricsAccumulator",
    "error_metrics",
    "exact_product",
    "metrics_under",
]

#: Keys of the dictionaries returned by :func:`error_metrics` (in display order).
METRIC_KEYS = ("er", "er_pct", "mae", "mae_pct", "wce", "wce_pct", "mre", "mre_pct", "wcre", "wcre_pct",
               "mre_max1", "mre_max1_pct", "wcre_max1", "wcre_max1_pct", "nmed", "nmed_pct",
               "mse", "bias", "std", "pairs", "max_exact", "weighted")

# Largest block handled with numpy integer sums: |e| < 2**32 for up to 16x16 multipliers,
# so sums of |e| over 2**22 elements stay below 2**54 (int64-safe), and the temporaries
# of one block stay around 200 MB.
_BLOCK = 1 << 22


def exact_product(width_a: int, width_b: int, signed: bool, a_start: int = 0,
                  a_stop: int | None = None) -> np.ndarray:
    """Exact product values indexed by codes: rows ``a_start:a_stop`` of the full table.

    Args:
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.
        a_start: first code of ``a`` (row) to include.
        a_stop: one past the last row (default: all rows).

    Returns:
        int64 array of shape ``(a_stop - a_start, 2**width_b)``.
    """
    a_stop = (1 << width_a) if a_stop is None else a_stop
    va = codes_to_values(np.arange(a_start, a_stop), width_a, signed)
    vb = codes_to_values(np.arange(1 << width_b), width_b, signed)
    return va[:, None] * vb[None, :]


def _as_2d(x: np.ndarray) -> np.ndarray:
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def _log2_exact(n: int) -> int | None:
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None


def _check_width(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidTypeError(f"{name} must be a non-negative integer or None, not {value!r}")
    return int(value)


def _fsum_rows(rows: list[np.ndarray]) -> float:
    return math.fsum(np.concatenate(rows).tolist()) if rows else 0.0


class MetricsAccumulator:
    """Streams product blocks (whole rows of the table) and merges their statistics.

    Feed row blocks of the product table and the matching exact products (and weights,
    if any) with :meth:`update`, then read :meth:`result`. Results are bit-identical to
    :func:`error_metrics` on the whole table, whatever the block boundaries (see the
    module docstring for why).

    Args:
        weighted: whether every :meth:`update` carries weights.
        width_a: operand width of ``a``, for ``mae_pct``/``wce_pct`` (which divide by
            ``2**(width_a + width_b)``); ``None`` reads it from the number of rows seen
            when every block was 2-D and the count is a power of two (a whole table
            indexed by codes); otherwise those two metrics are ``nan``.
        width_b: operand width of ``b``; ``None`` reads it from the row length likewise.

    Raises:
        TypeError: a width that is not a non-negative integer.

    Example:
        acc = MetricsAccumulator(width_a=wa, width_b=wb)
        for a0, a1, block in netlist.exhaustive_chunks():
            acc.update(block, exact_product(wa, wb, signed, a0, a1))
        metrics = acc.result()
    """

    def __init__(self, *, weighted: bool = False, width_a: int | None = None, width_b: int | None = None):
        self._weighted = bool(weighted)
        self._width_a = _check_width("width_a", width_a)
        self._width_b = _check_width("width_b", width_b)
        self._n = 0
        self._rows = 0
        self._row_len: int | None = None
        self._max_abs_e = 0
        self._max_exact = 0
        self._wcre = 0.0
        self._wcre_max1 = 0.0
        # Uniform: exact integers.
        self._nonzero = 0
        self._nonzero_exact = 0
        self._sum_abs = 0
        self._sum_e = 0
        self._sum_e2 = 0
        # Per-row float sums, combined with fsum at the end (order independent).
        self._rel_rows: list[np.ndarray] = []       # |e|/|exact| over exact != 0
        self._rel1_rows: list[np.ndarray] = []      # |e|/max(1, |exact|) over all pairs
        # Weighted: per-row float statistics.
        self._w_rows: list[np.ndarray] = []
        self._wx_rows: list[np.ndarray] = []        # weight of the pairs with exact != 0
        self._wnz_rows: list[np.ndarray] = []
        self._wabs_rows: list[np.ndarray] = []
        self._wmean_rows: list[np.ndarray] = []
        self._wm2_rows: list[np.ndarray] = []

    @property
    def weighted(self) -> bool:
        return self._weighted

    def update(self, product, exact, weights=None) -> None:
        """Add a block of rows.

        Args:
            product: integer array of approximate products (any shape; the last axis is a
                row of the table).
            exact: integer array of exact products, same shape.
            weights: non-negative float array of the same shape (required exactly when
                the accumulator is ``weighted``); they need not be normalised.

        Raises:
            TypeError: non-integer products.
            ValueError: shapes differ, weights missing/unexpected or negative.
        """
        p = np.asarray(product)
        x = np.asarray(exact)
        for name, arr in (("Approximate products", p), ("Exact products", x)):
            if arr.dtype.kind not in "iu":
                raise InvalidTypeError(f"{name} must be integers, not {arr.dtype}")
        if p.shape != x.shape:
            raise InvalidValueError(f"Approximate and exact product shapes differ: {p.shape} vs {x.shape}")
        if self._weighted != (weights is not None):
            raise InvalidValueError("Weights must be given with every update of a weighted accumulator, "
                             "and never to an unweighted one")
        p2 = _as_2d(p.astype(np.int64, copy=False))
        x2 = _as_2d(x.astype(np.int64, copy=False))
        w2 = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != p.shape:
                raise InvalidValueError(f"Weights shape {w.shape} does not match the products' {p.shape}")
            if w.size and (not np.isfinite(w).all() or w.min() < 0):
                raise InvalidValueError("Weights must be finite and non-negative")
            w2 = _as_2d(w)
        if p2.size:
            # The table shape is only used to read the widths when they are not given,
            # and only from 2-D blocks of whole rows ([a_code, b_code]).
            same = p.ndim == 2 and self._row_len in (None, p2.shape[1])
            self._row_len = p2.shape[1] if same else -1
            self._rows += p2.shape[0]
        rows_per_block = max(1, _BLOCK // max(1, p2.shape[1]))
        for r0 in range(0, p2.shape[0], rows_per_block):
            sl = slice(r0, r0 + rows_per_block)
            self._update_block(p2[sl], x2[sl], None if w2 is None else w2[sl])

    def _update_block(self, p: np.ndarray, x: np.ndarray, w: np.ndarray | None) -> None:
        e = p - x
        abs_e = np.abs(e)
        abs_x = np.abs(x)
        nz_x = abs_x != 0
        # rel: |e|/|exact| where exact != 0, else 0 (left out). Where exact != 0,
        # max(1, |exact|) == |exact|, so rel1 differs from rel only at exact == 0 (|e|).
        rel = np.divide(abs_e, abs_x, out=np.zeros(abs_e.shape), where=nz_x)
        rel1 = rel.copy()
        np.copyto(rel1, abs_e, where=~nz_x, casting="unsafe")
        self._n += e.size
        if x.size:
            self._max_exact = max(self._max_exact, int(abs_x.max()))
        if w is None:
            if e.size:
                self._max_abs_e = max(self._max_abs_e, int(abs_e.max()))
                self._wcre = max(self._wcre, float(rel.max()))
                self._wcre_max1 = max(self._wcre_max1, float(rel1.max()))
            self._nonzero += int(np.count_nonzero(e))
            self._nonzero_exact += int(np.count_nonzero(nz_x))
            if e.size and int(abs_e.max()) >= 1 << 31:
                # (a product port wider than 32 bits: |e|**2 and the block's sums would wrap in
                # 64 bits -- reported as an MSE of 0 -- so Python's integers, slower but exact)
                big = abs_e.astype(object)
                self._sum_abs += int(big.sum())
                self._sum_e += int(e.astype(object).sum())
                self._sum_e2 += int((big * big).sum())
            else:
                self._sum_abs += int(abs_e.sum())
                self._sum_e += int(e.sum())
                # |e| < 2**31, so |e|**2 fits uint64; split it into 32-bit halves so the sums
                # over a block (<= 2**22 elements) cannot overflow either.
                sq = abs_e.astype(np.uint64) ** 2
                self._sum_e2 += (int((sq >> np.uint64(32)).sum()) << 32) + int((sq & np.uint64(0xFFFFFFFF)).sum())
            self._rel_rows.append(rel.sum(axis=1))
            self._rel1_rows.append(rel1.sum(axis=1))
            return
        support = w > 0
        if support.any():
            self._max_abs_e = max(self._max_abs_e, int(abs_e[support].max()))
            self._wcre = max(self._wcre, float(rel[support].max()))
            self._wcre_max1 = max(self._wcre_max1, float(rel1[support].max()))
        ef = e.astype(np.float64)
        wr = w.sum(axis=1)
        mean_r = np.divide((w * ef).sum(axis=1), wr, out=np.zeros_like(wr), where=wr > 0)
        self._w_rows.append(wr)
        self._wx_rows.append((w * nz_x).sum(axis=1))
        self._wnz_rows.append((w * (e != 0)).sum(axis=1))
        self._wabs_rows.append((w * abs_e).sum(axis=1))
        self._rel_rows.append((w * rel).sum(axis=1))
        self._rel1_rows.append((w * rel1).sum(axis=1))
        self._wmean_rows.append(mean_r)
        self._wm2_rows.append((w * (ef - mean_r[:, None]) ** 2).sum(axis=1))

    def _full_scale(self) -> float:
        """``2**(width_a + width_b)``, the EvoApprox denominator of MAE% and WCE% (nan: unknown)."""
        wa, wb = self._width_a, self._width_b
        table = self._row_len is not None and self._row_len > 0  # only 2-D blocks of equal rows
        if wb is None and table:
            wb = _log2_exact(self._row_len)
        if wa is None and table:
            wa = _log2_exact(self._rows)
        if wa is None or wb is None:
            return math.nan
        return float(2 ** (wa + wb))

    def result(self) -> dict[str, Any]:
        """The metrics of everything seen so far (see the module docstring for keys).

        Raises:
            ValueError: nothing was added, or all weights are zero.
        """
        if self._n == 0:
            raise InvalidValueError("No product pairs were added; cannot compute error metrics")
        max_exact = self._max_exact
        rel_sum = _fsum_rows(self._rel_rows)
        rel1_sum = _fsum_rows(self._rel1_rows)
        if not self._weighted:
            n = self._n
            er = self._nonzero / n
            mae = self._sum_abs / n
            mse = self._sum_e2 / n
            bias = self._sum_e / n
            var = Fraction(n * self._sum_e2 - self._sum_e ** 2, n * n)
            std = math.sqrt(var)
            any_nonzero_exact = self._nonzero_exact > 0
            mre = rel_sum / self._nonzero_exact if any_nonzero_exact else math.nan
            mre_max1 = rel1_sum / n
        else:
            wr = np.concatenate(self._w_rows)
            total = math.fsum(wr.tolist())
            if total <= 0:
                raise InvalidValueError("All operand weights are zero; cannot compute weighted error metrics")
            er = math.fsum(np.concatenate(self._wnz_rows).tolist()) / total
            mae = math.fsum(np.concatenate(self._wabs_rows).tolist()) / total
            mean_r = np.concatenate(self._wmean_rows)
            bias = math.fsum((wr * mean_r).tolist()) / total
            m2 = math.fsum(np.concatenate(self._wm2_rows).tolist()) + math.fsum((wr * (mean_r - bias) ** 2).tolist())
            var = max(m2 / total, 0.0)
            std = math.sqrt(var)
            mse = var + bias * bias
            total_x = _fsum_rows(self._wx_rows)
            any_nonzero_exact = total_x > 0
            mre = rel_sum / total_x if any_nonzero_exact else math.nan
            mre_max1 = rel1_sum / total
        wcre = float(self._wcre) if any_nonzero_exact else math.nan
        nmed = mae / max_exact if max_exact else 0.0
        scale = self._full_scale()
        return {
            "er": float(er),
            "er_pct": 100.0 * float(er),
            "mae": float(mae),
            "mae_pct": 100.0 * float(mae) / scale,
            "wce": int(self._max_abs_e),
            "wce_pct": 100.0 * int(self._max_abs_e) / scale,
            "mre": float(mre),
            "mre_pct": 100.0 * float(mre),
            "wcre": wcre,
            "wcre_pct": 100.0 * wcre,
            "mre_max1": float(mre_max1),
            "mre_max1_pct": 100.0 * float(mre_max1),
            "wcre_max1": float(self._wcre_max1),
            "wcre_max1_pct": 100.0 * float(self._wcre_max1),
            "nmed": float(nmed),
            "nmed_pct": 100.0 * float(nmed),
            "mse": float(mse),
            "bias": float(bias),
            "std": float(std),
            "pairs": int(self._n),
            "max_exact": int(max_exact),
            "weighted": self._weighted,
        }


def error_metrics(product, exact, weights=None, *, width_a: int | None = None,
                  width_b: int | None = None) -> dict[str, Any]:
    """Error metrics of approximate products against exact ones.

    Args:
        product: integer array of approximate product values (e.g. a LUT indexed by codes).
        exact: integer array of exact product values, same shape.
        weights: optional non-negative joint weights of the pairs (an operand
            distribution), same shape; normalised internally.
        width_a: width of operand ``a`` for ``mae_pct``/``wce_pct``; ``None`` reads it
            from a 2-D ``(2**width_a, 2**width_b)`` table (else those two are ``nan``).
        width_b: width of operand ``b``, likewise.

    Returns:
        Dict with the keys of :data:`METRIC_KEYS` (definitions in the module docstring).

    Raises:
        TypeError: non-integer products, or a width that is not a non-negative integer.
        ValueError: shapes differ, empty input, negative or all-zero weights.
    """
    acc = MetricsAccumulator(weighted=weights is not None, width_a=width_a, width_b=width_b)
    acc.update(product, exact, weights)
    return acc.result()


def _normalised_hist(hist, n: int, name: str) -> np.ndarray:
    h = np.asarray(hist, dtype=np.float64)
    if h.shape != (n,):
        raise InvalidValueError(f"Histogram {name} must have one entry per code ({n},), not shape {h.shape}")
    if not np.isfinite(h).all() or (h.size and h.min() < 0):
        raise InvalidValueError(f"Histogram {name} must be finite and non-negative")
    s = h.sum()
    if s <= 0:
        raise InvalidValueError(f"Histogram {name} is all zeros")
    return h / s


def metrics_under(product, exact, hist_a, hist_b) -> dict[str, Any]:
    """Error metrics under independent operand distributions given as histograms over codes.

    The joint weight of ``(a, b)`` is ``hist_a[a] * hist_b[b]`` (each normalised), which
    is what matters inside a network: real layer inputs are far from uniform.

    Args:
        product: approximate product table ``[a_code, b_code]``.
        exact: exact product table, same shape.
        hist_a: counts (or probabilities) per code of ``a``, length ``product.shape[0]``.
        hist_b: counts per code of ``b``, length ``product.shape[1]``.

    Returns:
        Weighted metrics dict (see :func:`error_metrics`).

    Raises:
        ValueError: histogram shapes that do not match the table, negative or all-zero
            histograms.
    """
    p = np.asarray(product)
    if p.ndim != 2:
        raise InvalidValueError(f"Product table must be 2-D [a_code, b_code], not shape {p.shape}")
    pa = _normalised_hist(hist_a, p.shape[0], "hist_a")
    pb = _normalised_hist(hist_b, p.shape[1], "hist_b")
    return error_metrics(p, exact, np.outer(pa, pb))
