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
from ..errors import InvalidTypeError, InvalidValueError

__all__ = [
    "HALF_WINDOWS",
    "auto_half_window",
    "broadcast_lut1d",
    "check_half_window",
    "lre_gradients",
    "lut1d_gradients",
    "lut2d_and_lut1d",
    "lut2d_gradients",
    "ste_gradients",
]

#: Half windows the published method chooses from.
HALF_WINDOWS = (1, 2, 4, 8, 16, 32, 64)

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
    raise InvalidValueError(f"Half window must be one of {choices}, not {half_window!r}")


def _check_widths(width_a: int, width_b: int, signed: bool) -> None:
    for name, w in (("width_a", width_a), ("width_b", width_b)):
        if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or not 1 <= int(w) <= 16:
            raise InvalidTypeError(f"Operand width {name} must be an integer in 1..16, not {w!r}")
    if not isinstance(signed, (bool, np.bool_)):
        raise InvalidTypeError(f"signed must be a bool, not {signed!r}")


def _check_table(product, width_a: int, width_b: int, signed: bool) -> np.ndarray:
    _check_widths(width_a, width_b, signed)
    p = np.asarray(product)
    if p.dtype.kind not in "iu":
        raise InvalidTypeError(f"Product table must hold integers, not {p.dtype}")
    shape = (1 << int(width_a), 1 << int(width_b))
    if p.shape != shape:
        raise InvalidValueError(f"Product table shape {p.shape} does not match widths {width_a}x{width_b} "
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
        raise InvalidValueError(f"Half window {half_window} is too large for a {width}-bit operand {name}: "
                         f"LUT-2D needs 2*H+1 < {n}")


def _to_value_order(p: np.ndarray, axis: int, width: int, signed: bool) -> np.ndarray:
    # Two's complement value order is the code order rotated by half: negative codes first.
    return np.roll(p, 1 << (width - 1), axis=axis) if signed else p


def _from_value_order(g: np.ndarray, axis: int, width: int, signed: bool) -> np.ndarray:
    return np.roll(g, -(1 << (width - 1)), axis=axis) if signed else g


def _lut2d_axis(f: np.ndarray, half_window: int, signed: bool, values: np.ndarray, axis: int) -> np.ndarray:
    """LUT-2D derivative of ``f`` along ``axis`` (sorted by value); float64, same shape."""
    n = f.shape[axis]
    h = half_window

    def sl(start: int, stop: int) -> tuple[slice, ...]:
        return (slice(None),) * axis + (slice(start, stop),)

    edge = (f.max(axis=axis) - f.min(axis=axis)).astype(np.float64) / n
    if signed:
        centred = values.astype(np.float64) - values.mean()
        cov = centred @ f if axis == 0 else f @ centred
        slope_sign = np.sign(cov)
        edge *= np.where(slope_sign == 0, 1.0, slope_sign)
    out = np.empty(f.shape, dtype=np.float64)
    out[...] = np.expand_dims(edge, axis)
    if n - 2 - h >= h + 1:
        # Interior windows are never clipped, so S(i+1) - S(i-1) is a difference of two
        # (2H+1)-term sums, which telescopes to f[i+H+1] + f[i+H] - f[i-H] - f[i-H-1]:
        # exact in integers (the exact multiplier's interior equals STE exactly), and no
        # prefix sums are needed.
        diff = f[sl(2 * h + 2, n)] + f[sl(2 * h + 1, n - 1)] - f[sl(1, n - 2 * h - 1)] - f[sl(0, n - 2 * h - 2)]
        out[sl(h + 1, n - 1 - h)] = diff / (2.0 * (2 * h + 1))
    return out


def _lut2d_float64(p: np.ndarray, width_a: int, width_b: int, signed: bool,
                   half_window: int) -> tuple[np.ndarray, np.ndarray]:
    _check_fits(half_window, width_a, "a")
    _check_fits(half_window, width_b, "b")
    va = np.sort(_values(width_a, signed))
    vb = np.sort(_values(width_b, signed))
    fa = _to_value_order(p, 0, width_a, signed)
    ga = _from_value_order(_lut2d_axis(fa, half_window, signed, va, 0), 0, width_a, signed)
    fb = _to_value_order(p, 1, width_b, signed)
    gb = _from_value_order(_lut2d_axis(fb, half_window, signed, vb, 1), 1, width_b, signed)
    return ga, gb


def lut2d_and_lut1d(product, width_a: int, width_b: int, signed: bool,
                    half_window: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """LUT-2D tables and the LUT-1D (mean) tables derived from them, in one pass.

    Identical to ``(lut2d_gradients(...), lut1d_gradients(..., method="mean"))`` with an
    explicit half window, at the cost of one LUT-2D computation.

    Returns:
        ``((grad_a, grad_b), (compact_a, compact_b))``, float32.
    """
    p = _check_table(product, width_a, width_b, signed)
    h = check_half_window(half_window, allow_auto=False)
    ga, gb = _lut2d_float64(p, width_a, width_b, signed, h)
    return ((ga.astype(np.float32), gb.astype(np.float32)),
            (ga.mean(axis=0).astype(np.float32), gb.mean(axis=1).astype(np.float32)))


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
        raise InvalidValueError(f"LUT-1D method must be 'mean' or 'lre', not {method!r}")
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
        raise InvalidValueError(f"Compact LUT-1D tables must have shapes ({nb},) and ({na},) for "
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
        raise InvalidValueError(f"No LUT-2D half window fits {width_a}x{width_b} operands "
                         f"(needs 2*H+1 < {min(p.shape)})")
    order_a = codes_by_value(width_a, signed)
    order_b = codes_by_value(width_b, signed)
    cols = order_b[np.unique(np.linspace(0, p.shape[1] - 1, min(max_lines, p.shape[1])).astype(int))]
    rows = order_a[np.unique(np.linspace(0, p.shape[0] - 1, min(max_lines, p.shape[0])).astype(int))]
    fa = p[np.ix_(order_a, cols)]
    fb = p[np.ix_(rows, order_b)]
    va = codes_to_values(order_a, width_a, signed)
    vb = codes_to_values(order_b, width_b, signed)
    best, best_r = candidates[0], np.inf
    for h in candidates:
        r = max(_roughness(_lut2d_axis(fa, h, signed, va, 0), h),
                _roughness(_lut2d_axis(fb, h, signed, vb, 1).T, h))
        if r <= threshold:
            return h
        if r < best_r:
            best, best_r = h, r
    return best
