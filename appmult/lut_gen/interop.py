"""Product LUTs in other tools' formats, and third-party Verilog netlists.

* Plain-text listing, one pair per line: ``a b product`` (decimal, whitespace
  separated; ``#`` starts a comment), as the public LUT-2D retraining code reads it.
  Products are any integers: a table need not come from a circuit (``appmult verify``
  checks one against a circuit's product port). ``a`` and ``b`` are
  operand *values* by default (``operands="values"``: signed operands appear as
  ``-128 .. 127``); ``operands="codes"`` writes the raw bit patterns ``0 .. 2**w - 1``
  instead. The product is always a value. Lines run ``a`` outer, ``b`` inner, in the
  order of the operand column (value order or code order).
* TFApprox binary: a raw 256x256 table of little-endian ``uint16``, row-major
  ``[a, b]`` (offset ``2 * (256*a + b)`` bytes), no header. 8x8 unsigned only (the
  format has no sign and no widths).
* TorchApprox array: a 256x256 ``int16`` numpy array indexed by the operands' 8-bit
  two's complement bit patterns, i.e. by codes ``[a_code, b_code]`` exactly like an
  appmult LUT (TorchApprox's own accurate table is built that way: ``x[x >= 128] -= 256``
  on ``arange(256)``). 8x8 with products that fit int16 (signed; unsigned only if the
  products stay below 32768). Which operand is the weight is the caller's choice:
  ``transpose=True`` swaps them.

A third-party Verilog circuit is characterized by :func:`appmult.flows.characterize_verilog`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..codes import check_codes, codes_by_value, codes_to_values, values_to_codes
from ..errors import InvalidTypeError, InvalidValueError
from ..files import atomic_write_bytes, atomic_write_text


__all__ = [
    "from_torchapprox",
    "read_listing",
    "read_tfapprox",
    "to_torchapprox",
    "write_listing",
    "write_tfapprox",
]


def _check(product, width_a: int, width_b: int) -> np.ndarray:
    p = np.asarray(product)
    if p.dtype.kind not in "iu":
        raise InvalidTypeError(f"Product table must hold integers, not {p.dtype}")
    shape = (1 << width_a, 1 << width_b)
    if p.shape != shape:
        raise InvalidValueError(f"Product table shape {p.shape} does not match widths {width_a}x{width_b} "
                         f"(expected {shape})")
    if p.dtype == np.uint64 and p.size and int(p.max()) > np.iinfo(np.int64).max:
        raise InvalidValueError(f"Product table holds {int(p.max())}, beyond the int64 range the formats carry")
    return p.astype(np.int64, copy=False)


def _check_operands(operands: str) -> None:
    if operands not in ("values", "codes"):
        raise InvalidValueError(f"Listing operands must be 'values' or 'codes', not {operands!r}")


def write_listing(path: str | os.PathLike, product, width_a: int, width_b: int, signed: bool, *,
                  operands: str = "values") -> Path:
    """Write the ``a b product`` text listing (see the module docstring).

    Args:
        path: output file.
        product: product table ``[a_code, b_code]``.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.
        operands: ``"values"`` (default) or ``"codes"`` for the ``a``, ``b`` columns.

    Returns:
        The path written.

    Raises:
        ValueError: table shape or ``operands`` invalid.
    """
    _check_operands(operands)
    p = _check(product, width_a, width_b)
    if operands == "values":
        oa, ob = codes_by_value(width_a, signed), codes_by_value(width_b, signed)
        la, lb = codes_to_values(oa, width_a, signed), codes_to_values(ob, width_b, signed)
    else:
        oa, ob = np.arange(1 << width_a), np.arange(1 << width_b)
        la, lb = oa, ob
    table = p[np.ix_(oa, ob)]
    cols = np.stack([np.repeat(la, lb.size), np.tile(lb, la.size), table.reshape(-1)], axis=1)
    lines = [f"{x} {y} {z}" for x, y, z in cols.tolist()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def read_listing(path: str | os.PathLike, width_a: int, width_b: int, signed: bool, *,
                 operands: str = "values") -> np.ndarray:
    """Read an ``a b product`` listing into a product table ``[a_code, b_code]``.

    Args:
        path: the listing.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: two's complement operands.
        operands: whether the ``a``, ``b`` columns are ``"values"`` or ``"codes"``.

    Returns:
        int64 product table of shape ``(2**width_a, 2**width_b)``.

    Raises:
        ValueError: malformed lines, operands out of range, or pairs missing or repeated.
    """
    _check_operands(operands)
    try:
        data = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise InvalidValueError(f"Listing {path} is not lines of three integers 'a b product': {exc}") from None
    if data.size == 0:
        raise InvalidValueError(f"Listing {path} is empty: it must hold one line 'a b product' per operand pair")
    if data.shape[1:] != (3,):
        raise InvalidValueError(f"Listing {path} must have three integers per line, not {data.shape[1]}")
    if operands == "values":
        a = values_to_codes(data[:, 0], width_a, signed)
        b = values_to_codes(data[:, 1], width_b, signed)
    else:
        a, b = check_codes(data[:, 0], width_a), check_codes(data[:, 1], width_b)
    n = 1 << (width_a + width_b)
    flat = a * (1 << width_b) + b
    if data.shape[0] != n or np.unique(flat).size != n:
        raise InvalidValueError(f"Listing {path} must hold every one of the {n} operand pairs exactly once "
                         f"({data.shape[0]} lines, {np.unique(flat).size} distinct pairs)")
    table = np.empty(n, dtype=np.int64)
    table[flat] = data[:, 2]
    return table.reshape(1 << width_a, 1 << width_b)


def _check_8x8(width_a: int, width_b: int, what: str) -> None:
    if (width_a, width_b) != (8, 8):
        raise InvalidValueError(f"{what} holds 8x8 tables only, not {width_a}x{width_b}")


def write_tfapprox(path: str | os.PathLike, product, width_a: int = 8, width_b: int = 8,
                   signed: bool = False) -> Path:
    """Write the TFApprox binary table (256x256 little-endian uint16, row-major ``[a, b]``).

    Raises:
        ValueError: not an 8x8 unsigned multiplier, or a product outside 0..65535.
    """
    _check_8x8(width_a, width_b, "The TFApprox format")
    if signed:
        raise InvalidValueError("The TFApprox format holds unsigned 8x8 multipliers only, not signed ones")
    p = _check(product, 8, 8)
    if p.min() < 0 or p.max() > 0xFFFF:
        raise InvalidValueError(f"Products {int(p.min())}..{int(p.max())} do not fit the TFApprox uint16 table")
    atomic_write_bytes(path, p.astype("<u2").tobytes())
    return Path(path)


def read_tfapprox(path: str | os.PathLike) -> np.ndarray:
    """Read a TFApprox binary table into an int64 product table ``[a, b]`` (8x8 unsigned).

    Raises:
        ValueError: the file is not exactly 131072 bytes.
    """
    raw = Path(path).read_bytes()
    if len(raw) != 2 * 256 * 256:
        raise InvalidValueError(f"TFApprox table {path} must be {2 * 256 * 256} bytes (256x256 uint16), not {len(raw)}")
    return np.frombuffer(raw, dtype="<u2").astype(np.int64).reshape(256, 256)


def to_torchapprox(product, width_a: int = 8, width_b: int = 8, signed: bool = True, *,
                   transpose: bool = False) -> np.ndarray:
    """The 256x256 int16 array TorchApprox takes as ``layer.lut`` (indexed by codes).

    Args:
        product: product table ``[a_code, b_code]``.
        width_a: must be 8.
        width_b: must be 8.
        signed: signedness of the operands (the indexing is by code either way).
        transpose: swap the operands (``[b_code, a_code]``).

    Returns:
        C-contiguous int16 array of shape ``(256, 256)``.

    Raises:
        ValueError: not 8x8, or products outside the int16 range.
    """
    _check_8x8(width_a, width_b, "A TorchApprox LUT")
    p = _check(product, 8, 8)
    if p.min() < -(1 << 15) or p.max() >= 1 << 15:
        raise InvalidValueError(f"Products {int(p.min())}..{int(p.max())} do not fit TorchApprox's int16 table")
    return np.ascontiguousarray((p.T if transpose else p).astype(np.int16))


def from_torchapprox(lut, *, transpose: bool = False) -> np.ndarray:
    """An int64 product table ``[a_code, b_code]`` from a TorchApprox 256x256 array.

    Raises:
        ValueError: not a 256x256 integer array.
    """
    t = np.asarray(lut)
    if t.shape != (256, 256) or t.dtype.kind not in "iu":
        raise InvalidValueError(f"A TorchApprox LUT is a 256x256 integer array, not {t.dtype} of shape {t.shape}")
    t = t.astype(np.int64)
    return np.ascontiguousarray(t.T if transpose else t)
