"""The LUT file: the contract between the hardware half and the learning half.

One ``.npz`` file (numpy's zip of ``.npy`` arrays, loaded with ``allow_pickle=False``)
holding:

* ``product`` -- the product table ``lut[a_code, b_code]`` (stored in the smallest
  signed integer dtype that holds it, returned as int64);
* ``grad__<method>__a`` / ``grad__<method>__b`` -- gradient tables, float32. Full
  tables have the product's shape; compact LUT-1D tables are 1-D: ``grad_a`` has one
  value per code of ``b`` (shape ``(2**width_b,)``) and ``grad_b`` one per code of ``a``;
* ``metadata`` -- UTF-8 JSON (as uint8 bytes): format version, widths, signedness,
  family and parameters, spec, SHA-256 of the Verilog and of the netlist, tool
  versions, metrics, cost, gradient parameters;
* ``sha256`` -- SHA-256 over everything above in a canonical form, checked on load.

This module depends on numpy only, so :mod:`appmult.nn` can read LUT files without
Amaranth or Yosys.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InvalidValueError, MissingFileError, UserError
from ..files import atomic_writer

__all__ = ["FORMAT_VERSION", "LutFile", "LutFileError", "load"]

FORMAT_VERSION = 1
_MAGIC = "appmult-lut"


class LutFileError(UserError, ValueError):
    """A LUT file that cannot be trusted: corrupt, tampered, wrong format, or mismatched."""


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _check_name(method: str) -> None:
    if not isinstance(method, str) or not method.isidentifier() or "__" in method:
        raise InvalidValueError(f"Gradient method name must be an identifier without '__', not {method!r}")


class LutFile:
    """A product LUT with optional gradient tables and metadata.

    Args:
        product: integer array of shape ``(2**width_a, 2**width_b)``: product values
            indexed by operand codes.
        width_a: width of operand ``a``.
        width_b: width of operand ``b``.
        signed: whether codes are two's complement and products signed.
        gradients: ``{method: (grad_a, grad_b)}``; full tables of the product's shape, or
            compact 1-D tables (``grad_a`` over codes of ``b``, ``grad_b`` over codes of ``a``).
        metadata: JSON-serialisable dict (family, params, hashes, metrics, ...).

    Raises:
        LutFileError: shapes, dtypes or values that do not fit the widths.
    """

    def __init__(self, product, *, width_a: int, width_b: int, signed: bool,
                 gradients: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 metadata: Mapping[str, Any] | None = None):
        for name, w in (("width_a", width_a), ("width_b", width_b)):
            if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or not 1 <= int(w) <= 16:
                raise LutFileError(f"LUT {name} must be an integer in 1..16, not {w!r}")
        if not isinstance(signed, (bool, np.bool_)):
            raise LutFileError(f"LUT signed must be a bool, not {signed!r}")
        self._wa, self._wb, self._signed = int(width_a), int(width_b), bool(signed)
        prod = np.asarray(product)
        if prod.dtype.kind not in "iu":
            raise LutFileError(f"Product table must hold integers, not {prod.dtype}")
        shape = (1 << self._wa, 1 << self._wb)
        if prod.shape != shape:
            raise LutFileError(f"Product table shape {prod.shape} does not match widths "
                               f"{self._wa}x{self._wb} (expected {shape})")
        # Own copies: freezing them must not freeze the caller's arrays.
        self._product = np.array(prod, dtype=np.int64, order="C", copy=True)
        self._product.setflags(write=False)
        self._gradients: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for method, pair in (gradients or {}).items():
            self.set_gradient(method, *pair)
        self._metadata = dict(metadata or {})
        try:
            _canonical_json(self._metadata)
        except (TypeError, ValueError) as exc:
            raise LutFileError(f"LUT metadata must be JSON-serialisable: {exc}") from None
        self._hash: str | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def width_a(self) -> int:
        return self._wa

    @property
    def width_b(self) -> int:
        return self._wb

    @property
    def signed(self) -> bool:
        return self._signed

    @property
    def product(self) -> np.ndarray:
        """Read-only int64 product table ``[a_code, b_code]``."""
        return self._product

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the metadata dict."""
        return json.loads(_canonical_json(self._metadata))

    @property
    def gradients(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{method: (grad_a, grad_b)}`` (read-only float32 arrays)."""
        return dict(self._gradients)

    def gradient(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored gradient tables of one method.

        Raises:
            KeyError: the file holds no tables for ``method``.
        """
        if method not in self._gradients:
            have = ", ".join(self._gradients) or "none"
            raise KeyError(f"LUT file holds no {method!r} gradient tables (it has: {have})")
        return self._gradients[method]

    def set_gradient(self, method: str, grad_a, grad_b) -> None:
        """Add or replace the gradient tables of ``method`` (validated against the widths)."""
        _check_name(method)
        full = (1 << self._wa, 1 << self._wb)
        ga = np.array(grad_a, dtype=np.float32, order="C", copy=True)
        gb = np.array(grad_b, dtype=np.float32, order="C", copy=True)
        ok = (ga.shape == full and gb.shape == full) or (ga.shape == (full[1],) and gb.shape == (full[0],))
        if not ok:
            raise LutFileError(
                f"Gradient tables for {method!r} have shapes {ga.shape} and {gb.shape}; expected "
                f"{full} for both (full) or {(full[1],)} and {(full[0],)} (compact LUT-1D)")
        if not (np.isfinite(ga).all() and np.isfinite(gb).all()):
            raise LutFileError(f"Gradient tables for {method!r} contain NaN or Inf")
        ga.setflags(write=False)
        gb.setflags(write=False)
        self._gradients[method] = (ga, gb)
        self._hash = None

    @property
    def sha256(self) -> str:
        """Content hash (hex) over product, gradients, widths and metadata."""
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    @property
    def lut_id(self) -> str:
        """Short identity (first 16 hex digits of :attr:`sha256`) for names and logs."""
        return self.sha256[:16]

    def _header(self) -> dict[str, Any]:
        return {"magic": _MAGIC, "format_version": FORMAT_VERSION, "width_a": self._wa,
                "width_b": self._wb, "signed": self._signed,
                "gradients": sorted(self._gradients)}

    def _compute_hash(self) -> str:
        h = hashlib.sha256()
        h.update(_canonical_json(self._header()))
        h.update(_canonical_json(self._metadata))
        h.update(self._product.astype("<i8", copy=False).tobytes())
        for method in sorted(self._gradients):
            for arr in self._gradients[method]:
                h.update(method.encode() + str(arr.shape).encode())
                h.update(arr.astype("<f4", copy=False).tobytes())
        return h.hexdigest()

    def check_compatible(self, *, width_a: int, width_b: int, signed: bool, what: str = "the layer") -> None:
        """Raise a clear error unless this LUT fits operands of these widths and signedness.

        Raises:
            LutFileError: widths or signedness differ.
        """
        have = (self._wa, self._wb, self._signed)
        want = (width_a, width_b, signed)
        if have != want:
            def fmt(t):
                return f"{t[0]}x{t[1]} {'signed' if t[2] else 'unsigned'}"
            raise LutFileError(f"LUT {self.lut_id} is {fmt(have)} but {what} needs {fmt(want)}")

    def __repr__(self) -> str:
        fam = self._metadata.get("spec") or self._metadata.get("family", "?")
        return (f"<LutFile {fam} {self._wa}x{self._wb} {'signed' if self._signed else 'unsigned'} "
                f"grads={sorted(self._gradients)} id={self.lut_id}>")

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (a crash never leaves a half-written file).

        Returns:
            The path written.
        """
        path = Path(path)
        lo, hi = (int(self._product.min()), int(self._product.max())) if self._product.size else (0, 0)
        dtype = next(d for d in (np.int8, np.int16, np.int32, np.int64)
                     if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max)
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(_canonical_json(self._header()), dtype=np.uint8),
            "metadata": np.frombuffer(_canonical_json(self._metadata), dtype=np.uint8),
            "product": self._product.astype(dtype),
            "sha256": np.frombuffer(self.sha256.encode("ascii"), dtype=np.uint8),
        }
        for method, (ga, gb) in self._gradients.items():
            arrays[f"grad__{method}__a"] = ga
            arrays[f"grad__{method}__b"] = gb
        with atomic_writer(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LutFile":
        """Read and verify a LUT file (never unpickles).

        Raises:
            FileNotFoundError: no such file.
            LutFileError: not a LUT file, unsupported version, a pickled object inside,
                or contents that do not match their hash.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"LUT file {path} does not exist")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                # np.load would take any non-zip file for a pickle: say what it really is.
                raise LutFileError(f"LUT file {path} is not a readable .npz archive (no zip header)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as exc:
            # numpy refuses object arrays without unpickling them.
            raise LutFileError(f"LUT file {path} holds a pickled object or malformed array ({exc}); "
                               f"refusing to load it") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise LutFileError(f"LUT file {path} is not a readable .npz archive ({exc})") from None
        missing = [k for k in ("header", "metadata", "product", "sha256") if k not in arrays]
        if missing:
            raise LutFileError(f"{path} is not an appmult LUT file (missing {', '.join(missing)})")
        try:
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
            metadata = json.loads(arrays["metadata"].tobytes().decode("utf-8"))
            stored = arrays["sha256"].tobytes().decode("ascii")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LutFileError(f"LUT file {path} has a corrupt header or metadata ({exc})") from None
        if header.get("magic") != _MAGIC:
            raise LutFileError(f"{path} is not an appmult LUT file")
        if header.get("format_version") != FORMAT_VERSION:
            raise LutFileError(f"LUT file {path} has format version {header.get('format_version')}; "
                               f"this appmult reads version {FORMAT_VERSION}")
        grads = {}
        for method in header.get("gradients", []):
            try:
                grads[method] = (arrays[f"grad__{method}__a"], arrays[f"grad__{method}__b"])
            except KeyError:
                raise LutFileError(f"LUT file {path} lists {method!r} gradients but lacks their tables") from None
        lut = cls(arrays["product"], width_a=header["width_a"], width_b=header["width_b"],
                  signed=header["signed"], gradients=grads, metadata=metadata)
        if lut.sha256 != stored:
            raise LutFileError(f"LUT file {path} does not match its content hash (stored {stored[:16]}, "
                               f"computed {lut.lut_id}): it is corrupt or was modified")
        return lut


def load(path: str | os.PathLike) -> LutFile:
    """Read and verify a LUT file; see :meth:`LutFile.load`."""
    return LutFile.load(path)
