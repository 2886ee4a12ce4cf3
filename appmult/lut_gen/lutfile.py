"""The LUT file: the contract between the hardware half and the learning half.

One ``.npz`` file (numpy's zip of ``.npy`` arrays, never unpickled) holding:

* ``product`` -- the product table ``lut[a_code, b_code]`` (stored in the smallest
  signed integer dtype that holds it, returned as int64);
* ``grad__<method>__a`` / ``grad__<method>__b`` -- gradient tables, float32. Full
  tables have the product's shape; compact LUT-1D tables are 1-D: ``grad_a`` has one
  value per code of ``b`` (shape ``(2**width_b,)``) and ``grad_b`` one per code of ``a``;
* ``metadata`` -- UTF-8 JSON (as uint8 bytes): format version, widths, signedness,
  family and parameters, spec, SHA-256 of the Verilog and of the netlist, tool
  versions, metrics, cost, gradient parameters;
* ``header`` -- UTF-8 JSON: magic, format version, ``width_a``, ``width_b``, ``signed``
  and the list of gradient methods;
* ``sha256`` -- SHA-256 over everything above in a canonical form, checked on load.

Reading trusts nothing in the file before checking it (:meth:`LutFile.load`): a member
outside this list is refused unread, each member's declared size and ``.npy`` header are
checked against the widths before anything is inflated, header and metadata follow one
schema whose messages name the field, and metadata that contradicts the table (its
``width_a``, ``width_b``, ``signed`` or the widths in its ``spec``) is refused.

This module depends on numpy only, so :mod:`appmult.nn` can read LUT files without
Amaranth or Yosys.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..codes import value_range
from ..errors import InvalidValueError, MissingFileError, SpecError, UserError
from ..files import atomic_writer
from ..spec import convert_value, split_items, split_spec

__all__ = ["FORMAT_VERSION", "LutFile", "LutFileError", "load", "read_sha256"]

FORMAT_VERSION = 1
_MAGIC = "appmult-lut"


class LutFileError(UserError, ValueError):
    """A LUT file that cannot be trusted: corrupt, tampered, wrong format, or mismatched."""


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _is_method_name(method: Any) -> bool:
    return isinstance(method, str) and method.isidentifier() and "__" not in method


def _check_name(method: str) -> None:
    if not _is_method_name(method):
        raise InvalidValueError(f"Gradient method name must be an identifier without '__', not {method!r}")


def _json(value: Any) -> str:
    """A JSON value as the file holds it, for messages (``5``, ``"4"``, ``true``, ``null``)."""
    return json.dumps(value)


_JSON_TYPES = ((dict, "an object"), (list, "a list"), (str, "a string"), (bool, "a boolean"),
               (int, "a number"), (float, "a number"), (type(None), "null"))


def _json_type(value: Any) -> str:
    return next(name for t, name in _JSON_TYPES if isinstance(value, t))


def _is_width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16


def _signedness(signed: bool) -> str:
    return "signed" if signed else "unsigned"


def _spec_claims(spec: str) -> dict[str, Any]:
    """Widths and signedness a spec string states explicitly (``width`` sets both widths)."""
    try:
        family, _, rest = spec.partition(":")
        _, items = split_spec(f"{family}:{','.join(split_items(rest))}")  # a stray comma still states widths
        claims: dict[str, Any] = {}
        for key, text in items:
            if key in ("width", "width_a", "width_b"):
                value = convert_value("int", text, key)
                for k in (("width_a", "width_b") if key == "width" else (key,)):
                    claims[k] = value
            elif key == "signed":
                claims["signed"] = convert_value("bool", text, key)
        return claims
    except SpecError:
        return {}  # not a spec appmult can read: a label, it states nothing about the table


def _metadata_disagreement(metadata: Mapping[str, Any], width_a: int, width_b: int, signed: bool) -> str | None:
    """What the metadata says about the widths and signedness that the table contradicts, or None.

    Only what the metadata states is compared: its ``width_a``, ``width_b`` and ``signed``
    fields, then the widths and signedness written in its ``spec`` string.
    """
    actual = {"width_a": width_a, "width_b": width_b, "signed": signed}
    claims = [f"{k}={_json(metadata[k])}" for k in actual if k in metadata and metadata[k] != actual[k]]
    if claims:
        return f"metadata says {', '.join(claims)}"
    spec = metadata.get("spec")
    if isinstance(spec, str):
        stated = _spec_claims(spec)
        claims = [f"{k}={_json(stated[k])}" for k in actual if k in stated and stated[k] != actual[k]]
        if claims:
            return f"metadata spec {spec!r} says {', '.join(claims)}"
    return None


# Metadata fields with a fixed JSON type (others are free-form): name -> (check, what it must be).
_METADATA_FIELDS: dict[str, tuple[Any, str]] = {
    "width_a": (_is_width, "an integer in 1..16"),
    "width_b": (_is_width, "an integer in 1..16"),
    "signed": (lambda v: isinstance(v, bool), "true or false"),
    "spec": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "metrics": (lambda v: isinstance(v, dict), "a JSON object"),
    "cost": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    "tools": (lambda v: isinstance(v, dict), "a JSON object"),
    "gradient_params": (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
                        "a JSON object of objects"),
}


def _metadata_problem(metadata: Any) -> str | None:
    """The first way ``metadata`` breaks the schema, or None."""
    if not isinstance(metadata, dict):
        return f"metadata must be a JSON object, not {_json_type(metadata)}"
    for name, (ok, what) in _METADATA_FIELDS.items():
        if name in metadata and not ok(metadata[name]):
            value = metadata[name]
            shown = _json_type(value) if isinstance(value, (dict, list)) else _json(value)
            return f"metadata field {name!r} must be {what}, not {shown}"
    return None


def _header_problem(header: Any) -> str | None:
    """The first way ``header`` breaks the schema (magic and version already checked), or None."""
    for name in ("width_a", "width_b", "signed", "gradients"):
        if name not in header:
            return f"header field {name!r} is missing"
    for name in ("width_a", "width_b"):
        if not _is_width(header[name]):
            return f"header field {name!r} must be an integer in 1..16, not {_json(header[name])}"
    if not isinstance(header["signed"], bool):
        return f"header field 'signed' must be true or false, not {_json(header['signed'])}"
    grads = header["gradients"]
    if not isinstance(grads, list):
        shown = _json_type(grads) if isinstance(grads, dict) else _json(grads)
        return f"header field 'gradients' must be a list of method names, not {shown}"
    seen = set()
    for method in grads:
        if not _is_method_name(method):
            return f"header field 'gradients' holds an invalid method name {_json(method)}"
        if method in seen:
            return f"header field 'gradients' lists {method!r} twice"
        seen.add(method)
    return None


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
        if metadata is not None and not isinstance(metadata, Mapping):
            raise LutFileError(f"LUT metadata must be a dict, not {type(metadata).__name__}")
        self._metadata = dict(metadata or {})
        try:
            _canonical_json(self._metadata)
        except (TypeError, ValueError) as exc:
            raise LutFileError(f"LUT metadata must be JSON-serialisable: {exc}") from None
        problem = _metadata_disagreement(self._metadata, self._wa, self._wb, self._signed)
        if problem:
            # A file that describes another multiplier than its table would be logged, and
            # trusted, as that multiplier.
            raise LutFileError(f"LUT {problem}, but the table is {self._wa}x{self._wb} {_signedness(self._signed)}")
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

    def check_compatible(self, *, width_a: int, width_b: int, signed: bool, what: str = "the layer",
                         width_p: int | None = None) -> None:
        """Raise a clear error unless this LUT fits operands of these widths and signedness.

        Args:
            width_p: the product port's width, if the LUT must describe hardware with one:
                every entry must then be a value of that many bits (two's complement when
                signed); a wider one is no product that port can carry.

        Raises:
            LutFileError: widths or signedness differ, or an entry does not fit ``width_p``.
        """
        have = (self._wa, self._wb, self._signed)
        want = (width_a, width_b, signed)
        if have != want:
            def fmt(t):
                return f"{t[0]}x{t[1]} {'signed' if t[2] else 'unsigned'}"
            raise LutFileError(f"LUT {self.lut_id} is {fmt(have)} but {what} needs {fmt(want)}")
        if width_p is not None:
            lo, hi = value_range(width_p, signed)
            outside = np.argwhere((self._product < lo) | (self._product > hi))
            if outside.size:
                a, b = (int(v) for v in outside[0])
                raise LutFileError(f"LUT {self.lut_id} holds {int(self._product[a, b])} at codes a = {a}, b = {b}: "
                                   f"{what} has a {width_p}-bit product ({lo}..{hi}), so the LUT is not its "
                                   f"table ({len(outside)} entries outside)")

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
        """Read and verify a LUT file (never unpickles, never inflates more than the widths need).

        Only the members the format defines are read, each after its declared size (zip
        header) and its array header (dtype, shape) were checked against the widths; the
        header and metadata are checked against one schema, the metadata against the table,
        and everything against the stored content hash.

        Raises:
            FileNotFoundError: no such file, or a directory.
            LutFileError: not a LUT file, unsupported version, an unexpected or oversized
                member, a pickled object inside, a malformed header or metadata, metadata
                that contradicts the table, or contents that do not match their hash.
        """
        path = Path(path)
        with _LutArchive(path) as archive:
            return archive.read(cls)


def read_sha256(path: str | os.PathLike) -> str:
    """The content hash a LUT file *states* (cheap: reads one small member, verifies nothing else).

    Use it as a cache key; :func:`load` checks that the contents match it.

    Raises:
        FileNotFoundError: no such file, or a directory.
        LutFileError: not a LUT file, or no valid hash member.
    """
    with _LutArchive(Path(path)) as archive:
        return archive.sha256()


# Zip and .npy framing: an .npy header is at most 64 KiB (format 1.0: 2-byte length).
_NPY_SLACK = 1 << 16
# Header, metadata and hash are small JSON/ASCII blobs.
_MAX_TEXT_BYTES = {"header": 1 << 16, "metadata": 1 << 24, "sha256": _NPY_SLACK + 64}
_REQUIRED = ("header", "metadata", "product", "sha256")


class _LutArchive:
    """An open LUT file: reads members one by one, checking each before inflating it."""

    def __init__(self, path: Path):
        if path.is_dir():
            raise MissingFileError(f"LUT file {path} is a directory, not a file")
        if not path.is_file():
            raise MissingFileError(f"LUT file {path} does not exist")
        self.path = path
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                # np.load would take any non-zip file for a pickle: say what it really is.
                raise LutFileError(f"LUT file {path} is not a readable .npz archive (no zip header)")
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise LutFileError(f"LUT file {path} is not a readable .npz archive ({exc})") from None
        try:
            self.members = self._members()
        except BaseException:
            self.zip.close()
            raise

    def __enter__(self) -> "_LutArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.zip.close()

    def _error(self, message: str) -> LutFileError:
        return LutFileError(f"LUT file {self.path}: {message}")

    def _members(self) -> dict[str, zipfile.ZipInfo]:
        members: dict[str, zipfile.ZipInfo] = {}
        unexpected = []
        for info in self.zip.infolist():
            stem = info.filename[:-4] if info.filename.endswith(".npy") else None
            known = stem in _REQUIRED or (stem is not None and stem.startswith("grad__")
                                          and stem.endswith(("__a", "__b")))
            if not known or stem in members:
                unexpected.append(info.filename)
            else:
                members[stem] = info
        missing = [k for k in _REQUIRED if k not in members]
        if missing:
            raise LutFileError(f"{self.path} is not an appmult LUT file (missing {', '.join(missing)})")
        if unexpected:
            raise LutFileError(f"LUT file {self.path} holds an unexpected member {unexpected[0]!r}; "
                               f"refusing to read it")
        return members

    def _array(self, stem: str, limit: int, expect: str, ok) -> np.ndarray:
        """Member ``stem`` as an array: declared size <= ``limit``, ``ok(dtype, shape)`` before reading data."""
        info = self.members[stem]
        name = info.filename
        if info.file_size > limit:
            raise self._error(f"member {name!r} declares {info.file_size} bytes uncompressed, more than the "
                              f"{limit} it may hold; refusing to inflate it")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_SLACK)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_SLACK)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                if dtype.hasobject:
                    raise LutFileError(f"LUT file {self.path} holds a pickled object in member {name!r}; "
                                       f"refusing to load it")
                if not ok(dtype, shape):
                    raise self._error(f"member {name!r} holds {dtype} of shape {shape}, expected {expect}")
                count = int(np.prod(shape, dtype=np.int64))
                data = f.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise ValueError(f"member {name!r} is truncated")
        except LutFileError:
            raise
        except (ValueError, zipfile.BadZipFile, OSError, EOFError, RuntimeError, zlib.error) as exc:
            # RuntimeError: an encrypted member; BadZipFile: a CRC mismatch (a corrupt copy).
            raise LutFileError(f"LUT file {self.path} is not a readable .npz archive ({exc})") from None
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")

    def _bytes(self, stem: str) -> bytes:
        array = self._array(stem, _MAX_TEXT_BYTES[stem], "a 1-D uint8 array",
                            lambda dtype, shape: dtype == np.uint8 and len(shape) == 1)
        return array.tobytes()

    def _json(self, stem: str) -> Any:
        try:
            return json.loads(self._bytes(stem).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LutFileError(f"LUT file {self.path} has a corrupt header or metadata ({exc})") from None

    def sha256(self) -> str:
        try:
            stored = self._bytes("sha256").decode("ascii")
        except UnicodeDecodeError:
            stored = ""
        if len(stored) != 64 or any(c not in "0123456789abcdef" for c in stored):
            raise self._error("member 'sha256.npy' is not a SHA-256 hex digest")
        return stored

    def header(self) -> dict[str, Any]:
        header = self._json("header")
        if not isinstance(header, dict):
            raise self._error(f"header must be a JSON object, not {_json_type(header)}")
        if header.get("magic") != _MAGIC:
            raise LutFileError(f"{self.path} is not an appmult LUT file")
        if header.get("format_version") != FORMAT_VERSION:
            raise LutFileError(f"LUT file {self.path} has format version {header.get('format_version')}; "
                               f"this appmult reads version {FORMAT_VERSION}")
        problem = _header_problem(header)
        if problem:
            raise self._error(problem)
        return header

    def read(self, cls: type[LutFile]) -> LutFile:
        header = self.header()
        wa, wb, signed = header["width_a"], header["width_b"], header["signed"]
        metadata = self._json("metadata")
        problem = _metadata_problem(metadata)
        if problem:
            raise self._error(problem)
        problem = _metadata_disagreement(metadata, wa, wb, signed)
        if problem:
            raise self._error(f"{problem}, but the table is {wa}x{wb} {_signedness(signed)}")
        stored = self.sha256()
        methods = header["gradients"]
        listed = {f"grad__{m}__{x}" for m in methods for x in "ab"}
        for stem in self.members:
            if stem.startswith("grad__") and stem not in listed:
                raise self._error(f"member {self.members[stem].filename!r} holds gradient tables its header "
                                  f"does not list")
        for stem in sorted(listed):
            if stem not in self.members:
                method = stem.split("__")[1]
                raise LutFileError(f"LUT file {self.path} lists {method!r} gradients but lacks their tables")
        full = (1 << wa, 1 << wb)
        n = full[0] * full[1]
        product = self._array("product", n * 8 + _NPY_SLACK, f"an integer table of shape {full}",
                              lambda dtype, shape: dtype.kind in "iu" and dtype.itemsize <= 8 and shape == full)
        grads = {}
        for method in methods:
            pair = []
            for x, compact in (("a", (full[1],)), ("b", (full[0],))):
                pair.append(self._array(f"grad__{method}__{x}", n * 4 + _NPY_SLACK,
                                        f"float32 of shape {full} or {compact}",
                                        lambda dtype, shape, c=compact: dtype == np.float32 and shape in (full, c)))
            grads[method] = tuple(pair)
        try:
            lut = cls(product, width_a=wa, width_b=wb, signed=signed, gradients=grads, metadata=metadata)
        except LutFileError as exc:
            raise self._error(str(exc)) from None
        if lut.sha256 != stored:
            raise LutFileError(f"LUT file {self.path} does not match its content hash (stored {stored[:16]}, "
                               f"computed {lut.lut_id}): it is corrupt or was modified")
        return lut


def load(path: str | os.PathLike) -> LutFile:
    """Read and verify a LUT file; see :meth:`LutFile.load`."""
    return LutFile.load(path)
