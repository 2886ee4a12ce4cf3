"""Gradient LUTs of an approximate multiplier (STE, LUT-2D, LUT-1D, least-squares slope).

All tables are indexed by operand *codes*, like the product LUT, and hold partial
derivatives in product units per unit of operand *value* (float32):

* full tables ``grad_a[a_code, b_code]`` ~ d f / d a and ``grad_b[a_code, b_code]``
  ~ d f / d b, of the product's shape ``(2**width_a, 2**width_b)``;
* compact LUT-1D tables: ``grad_a`` of shape ``(2**width_b,)`` (one value per code of
  the *other* operand ``b``: d f / d a ~ ``grad_a[b]`` whatever ``a``), and ``grad_b``
  of shape ``(2**width_a,)``. :func:`broadcast_lut1d` expands them to full tables.

Methods (Meng, Burleson, De Micheli; DATE 2025, arXiv 2509.10519):

* STE -- the accurate multiplier's gradient: d/da = value(b), d/db = value(a).
* LUT-2D -- for d/da with b fixed, on the ``a`` axis sorted by value: moving average
  with half window ``H`` (window clipped at the table edges), central difference
  ``(S(i+1) - S(i-1)) / 2`` for ``H+1 <= i <= N-2-H``, and near the edges one constant
  per column ``b``: ``(max_a f(a,b) - min_a f(a,b)) / N``. d/db is the same along the
  other axis (one constant per row ``a``). For signed operands the work is done on the
  value axis (:func:`appmult.codes.codes_by_value`), and -- an extension of the published
  recipe, which was stated for unsigned operands -- the edge constant takes the sign of
  the column's least-squares slope, because the range ``max - min`` is never negative
  while d(a*b)/da = b is negative for b < 0. For unsigned operands the edge constant is
  exactly the published one.
* LUT-1D -- compact: ``grad_a[b]`` is the mean over ``a`` of the LUT-2D d/da
  (``method="mean"``) or the least-squares slope of ``f(., b)`` against value(a)
  (``method="lre"``); likewise ``grad_b[a]``.

For the exact multiplier the LUT-2D interior equals STE exactly, while the edges hold
``value(b) * (N-1)/N`` (the range over N codes is ``|b|*(N-1)``, divided by N).

Depends on numpy only; :mod:`appmult.nn` uses it too.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..codes import codes_by_value, codes_to_values

__all__ = [
    "HALF_WINDOWS",
    "auto_half_window",
    "broadcast_lut1d",
    "check_half_window",
    "lre_gradients",
    "lut1d_gradients",
    "lut2d_gradients",
    "ste_gradients",
]

#: Half windows the published method chooses from.
HALF_WINDOWS = (1, 2, 4, 8, 16, 32, 64)

# Columns handled at once by LUT-2D: bounds the int64 cumulative sums of a 12x12 table
# to a few tens of MB instead of several hundred.
_COLUMN_BLOCK = 512


def check_half_window(half_window, *, allow_auto: bool = True) -> int | str:
    """Validate a LUT-2D half window.

    Args:
        half_window: one of :data:`HALF_WINDOWS`, or ``"auto"`` when ``allow_auto``.
        allow_auto: whether ``"auto"`` is accepted.

    Returns:
        The half window (``int``) or ``"auto"``.

    Raises:
        ValueError: any other value.
    """
    if allow_auto and isinstance(half_window, str) and half_window == "auto":
        return "auto"
    if isinstance(half_window, (int, np.integer)) and not isinstance(half_window, bool) \
            and int(half_window) in HALF_WINDOWS:
        return int(half_window)
    choices = "1, 2, 4, ..., 64" + (" or 'auto'" if allow_auto else "")
    raise ValueError(f"Half window must be one of {choices}, not {half_window!r}")


def _check_widths(width_a: int, width_b: int, signed: bool) -> None:
    for name, w in (("width_a", width_a), ("width_b", width_b)):
        if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or not 1 <= int(w) <= 16:
            raise TypeError(f"Operand width {name} must be an integer in 1..16, not {w!r}")
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be a bool, not {signed!r}")


def _check_table(product, width_a: int, width_b: int, signed: bool) -> np.ndarray:
    _check_widths(width_a, width_b, signed)
    p = np.asarray(product)
    if p.dtype.kind not in "iu":
        raise TypeError(f"Product table must hold integers, not {p.dtype}")
    shape = (1 << int(width_a), 1 << int(width_b))
    if p.shape != shape:
        raise ValueError(f"Product table shape {p.shape} does not match widths {width_a}x{width_b} "
                         f"(expected {shape})")
    return p.astype(np.int64, copy=False)


def _values(width: int, signed: bool) -> np.ndarray:
    return codes_to_values(np.arange(1 << width), width, signed)


def ste_gradients(width_a: int, width_b: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Straight-through (exact multiplier) gradients: ``grad_a[a,b] = value(b)``, ``grad_b[a,b] = value(a)``.

    Args:
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.

    Returns:
        ``(grad_a, grad_b)``, float32 arrays of shape ``(2**width_a, 2**width_b)``.
    """
    _check_widths(width_a, width_b, signed)
    va = _values(width_a, signed).astype(np.float32)
    vb = _values(width_b, signed).astype(np.float32)
    shape = (va.size, vb.size)
    return (np.ascontiguousarray(np.broadcast_to(vb[None, :], shape)),
            np.ascontiguousarray(np.broadcast_to(va[:, None], shape)))


def _check_fits(half_window: int, width: int, name: str) -> None:
    n = 1 << width
    if 2 * half_window + 1 >= n:
        raise ValueError(f"Half window {half_window} is too large for a {width}-bit operand {name}: "
                         f"LUT-2D needs 2*H+1 < {n}")


def _lut2d_axis0(f: np.ndarray, half_window: int, signed: bool, values: np.ndarray) -> np.ndarray:
    """LUT-2D d/d(axis 0) of ``f`` whose axis 0 is sorted by value; float64, same shape."""
    n, m = f.shape
    h = half_window
    out = np.empty((n, m), dtype=np.float64)
    i = np.arange(n)
    lo = np.maximum(i - h, 0)
    hi = np.minimum(i + h, n - 1) + 1
    centred = values.astype(np.float64) - values.mean()
    for c0 in range(0, m, _COLUMN_BLOCK):
        blk = f[:, c0:c0 + _COLUMN_BLOCK]
        # Integer prefix sums: window sums are exact, so the interior of a linear column
        # (the exact multiplier) comes out exactly equal to its slope.
        csum = np.zeros((n + 1, blk.shape[1]), dtype=np.int64)
        np.cumsum(blk, axis=0, out=csum[1:])
        window = csum[hi] - csum[lo]
        g = out[:, c0:c0 + blk.shape[1]]
        edge = (blk.max(axis=0) - blk.min(axis=0)).astype(np.float64) / n
        if signed:
            slope_sign = np.sign(centred @ blk.astype(np.float64))
            edge *= np.where(slope_sign == 0, 1.0, slope_sign)
        g[:] = edge[None, :]
        if n - 2 - h >= h + 1:
            # Interior windows are never clipped, so both hold 2H+1 terms.
            g[h + 1:n - 1 - h] = (window[h + 2:n - h] - window[h:n - 2 - h]) / (2.0 * (2 * h + 1))
    return out


def _lut2d_float64(p: np.ndarray, width_a: int, width_b: int, signed: bool,
                   half_window: int) -> tuple[np.ndarray, np.ndarray]:
    _check_fits(half_window, width_a, "a")
    _check_fits(half_window, width_b, "b")
    order_a = codes_by_value(width_a, signed)
    order_b = codes_by_value(width_b, signed)
    va = codes_to_values(order_a, width_a, signed)
    vb = codes_to_values(order_b, width_b, signed)
    ga = np.empty(p.shape, dtype=np.float64)
    ga[order_a, :] = _lut2d_axis0(p[order_a, :], half_window, signed, va)
    gb = np.empty(p.shape, dtype=np.float64)
    gb[:, order_b] = _lut2d_axis0(np.ascontiguousarray(p[:, order_b].T), half_window, signed, vb).T
    return ga, gb


def lut2d_gradients(product, width_a: int, width_b: int, signed: bool,
                    half_window: int | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """LUT-2D gradient tables of a product table (see the module docstring).

    Args:
        product: integer product table ``[a_code, b_code]`` of shape ``(2**width_a, 2**width_b)``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands (smoothing runs along the value order).
        half_window: ``H`` from :data:`HALF_WINDOWS`, or ``"auto"`` for
            :func:`auto_half_window`.

    Returns:
        ``(grad_a, grad_b)``, float32 arrays of the product's shape.

    Raises:
        TypeError: bad widths, signedness or a non-integer table.
        ValueError: table shape not matching the widths, an invalid half window, or one
            too large for an operand (``2*H+1`` must be below ``2**width``).
    """
    p = _check_table(product, width_a, width_b, signed)
    h = check_half_window(half_window)
    if h == "auto":
        h = auto_half_window(p, width_a, width_b, signed)
    ga, gb = _lut2d_float64(p, width_a, width_b, signed, h)
    return ga.astype(np.float32), gb.astype(np.float32)


def lre_gradients(product, width_a: int, width_b: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Compact least-squares slopes: ``grad_a[b]`` = slope of ``f(., b)`` against value(a).

    Args:
        product: integer product table ``[a_code, b_code]``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.

    Returns:
        ``(grad_a, grad_b)``: float32 of shapes ``(2**width_b,)`` and ``(2**width_a,)``.

    Raises:
        TypeError, ValueError: as :func:`lut2d_gradients`.
    """
    p = _check_table(product, width_a, width_b, signed)
    ca = _values(width_a, signed).astype(np.float64)
    ca -= ca.mean()
    cb = _values(width_b, signed).astype(np.float64)
    cb -= cb.mean()
    # Centred regressor: sum(c * f) / sum(c**2) is the slope; no need to centre f.
    pf = p.astype(np.float64)
    ga = (ca @ pf) / (ca @ ca)
    gb = (pf @ cb) / (cb @ cb)
    return ga.astype(np.float32), gb.astype(np.float32)


def lut1d_gradients(product, width_a: int, width_b: int, signed: bool,
                    half_window: int | str = "auto",
                    method: Literal["mean", "lre"] = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Compact LUT-1D gradient tables: one value per code of the other operand.

    Args:
        product: integer product table ``[a_code, b_code]``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.
        half_window: LUT-2D half window for ``method="mean"`` (ignored for ``"lre"``).
        method: ``"mean"`` -- mean over ``a`` of the LUT-2D d/da (and over ``b`` of
            d/db); ``"lre"`` -- least-squares slopes (:func:`lre_gradients`).

    Returns:
        ``(grad_a, grad_b)``: float32 of shapes ``(2**width_b,)`` and ``(2**width_a,)``.

    Raises:
        TypeError, ValueError: as :func:`lut2d_gradients`, or an unknown method.
    """
    if method == "lre":
        return lre_gradients(product, width_a, width_b, signed)
    if method != "mean":
        raise ValueError(f"LUT-1D method must be 'mean' or 'lre', not {method!r}")
    p = _check_table(product, width_a, width_b, signed)
    h = check_half_window(half_window)
    if h == "auto":
        h = auto_half_window(p, width_a, width_b, signed)
    ga, gb = _lut2d_float64(p, width_a, width_b, signed, h)
    return ga.mean(axis=0).astype(np.float32), gb.mean(axis=1).astype(np.float32)


def broadcast_lut1d(grad_a, grad_b, width_a: int, width_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand compact LUT-1D tables to full ones: ``full_a[a,b] = grad_a[b]``, ``full_b[a,b] = grad_b[a]``.

    Args:
        grad_a: shape ``(2**width_b,)``.
        grad_b: shape ``(2**width_a,)``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.

    Returns:
        ``(full_a, full_b)``: float32 arrays of shape ``(2**width_a, 2**width_b)``.

    Raises:
        ValueError: shapes that do not match the widths.
    """
    ga = np.asarray(grad_a, dtype=np.float32)
    gb = np.asarray(grad_b, dtype=np.float32)
    na, nb = 1 << width_a, 1 << width_b
    if ga.shape != (nb,) or gb.shape != (na,):
        raise ValueError(f"Compact LUT-1D tables must have shapes ({nb},) and ({na},) for "
                         f"{width_a}x{width_b} operands, not {ga.shape} and {gb.shape}")
    return (np.ascontiguousarray(np.broadcast_to(ga[None, :], (na, nb))),
            np.ascontiguousarray(np.broadcast_to(gb[:, None], (na, nb))))


def _roughness(g: np.ndarray, h: int) -> float:
    """Mean |step| of the interior gradient along axis 0, relative to its mean magnitude."""
    n = g.shape[0]
    inner = g[h + 1:n - 1 - h]
    if inner.shape[0] < 2:
        return 0.0
    scale = np.abs(inner).mean()
    if scale == 0:
        return 0.0
    return float(np.abs(np.diff(inner, axis=0)).mean() / scale)


def auto_half_window(product, width_a: int, width_b: int, signed: bool, *,
                     threshold: float = 0.05, max_lines: int = 128) -> int:
    """A cheap automatic choice of the LUT-2D half window.

    Heuristic: for each ``H`` in :data:`HALF_WINDOWS` with ``2*H+1`` below both operand
    ranges, compute the LUT-2D gradients on up to ``max_lines`` evenly spaced columns
    (for d/da) and rows (for d/db), and measure their *roughness*: the mean absolute
    step between neighbouring interior gradient values along the operand axis, relative
    to the mean gradient magnitude (the larger of the two directions). The smallest
    ``H`` whose roughness is at most ``threshold`` wins -- the least smoothing that
    yields a usable, mostly monotone gradient; if none reaches it, the smoothest ``H``.
    The exact multiplier gets ``H = 1`` (its gradient is constant, roughness 0).

    The published choice (Meng et al.) is by short training runs, picking the ``H``
    with the lowest training loss; that needs a network and comes with retraining.
    This heuristic only looks at the table.

    Args:
        product: integer product table ``[a_code, b_code]``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.
        threshold: roughness at which smoothing is considered sufficient.
        max_lines: columns/rows sampled per direction (keeps 12-bit tables cheap).

    Returns:
        The chosen half window.

    Raises:
        TypeError, ValueError: as :func:`lut2d_gradients`, or operands too narrow for
            any half window (both need at least 2 bits).
    """
    p = _check_table(product, width_a, width_b, signed)
    candidates = [h for h in HALF_WINDOWS if 2 * h + 1 < min(p.shape)]
    if not candidates:
        raise ValueError(f"No LUT-2D half window fits {width_a}x{width_b} operands "
                         f"(needs 2*H+1 < {min(p.shape)})")
    order_a = codes_by_value(width_a, signed)
    order_b = codes_by_value(width_b, signed)
    cols = order_b[np.unique(np.linspace(0, p.shape[1] - 1, min(max_lines, p.shape[1])).astype(int))]
    rows = order_a[np.unique(np.linspace(0, p.shape[0] - 1, min(max_lines, p.shape[0])).astype(int))]
    fa = p[order_a][:, cols]
    fb = np.ascontiguousarray(p[rows][:, order_b].T)
    va = codes_to_values(order_a, width_a, signed)
    vb = codes_to_values(order_b, width_b, signed)
    best, best_r = candidates[0], np.inf
    for h in candidates:
        r = max(_roughness(_lut2d_axis0(fa, h, signed, va), h),
                _roughness(_lut2d_axis0(fb, h, signed, vb), h))
        if r <= threshold:
            return h
        if r < best_r:
            best, best_r = h, r
    return best
