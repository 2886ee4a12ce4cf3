"""``ApproxConfig``: how a layer is approximated (which LUT, quantization, kernel, backward)."""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from pathlib import Path

from ..errors import ConfigError, InvalidTypeError, InvalidValueError
from ..lut_gen.lutfile import LutFile, read_sha256
from ..lut_gen.lutfile import load as _load
from ..reference import check_frac_bits
from .tables import GradMode, Kernel
from .quant import Observer, WeightScheme

__all__ = ["ApproxConfig", "PARTS", "load_lut"]

#: The parts of a network :func:`~appmult.nn.approximate_` can approximate, in canonical order:
#: ``projections`` (the Q/K/V and output projections of attention modules), ``attention``
#: (the products QK^T and AV), ``mlp`` (every other ``nn.Linear``/``nn.Conv2d``: MLP blocks,
#: patch embeddings, classifier heads, CNN layers).
PARTS = ("projections", "attention", "mlp")


#: At most this many LUTs, and about this many bytes of tables, stay cached by :func:`load_lut`.
LUT_CACHE_ENTRIES = 16
LUT_CACHE_BYTES = 1 << 30

# content hash -> (the verified LUT, the file states it was verified at); oldest first.
_lut_cache: collections.OrderedDict[str, tuple[LutFile, list[tuple]]] = collections.OrderedDict()
_lut_cache_lock = threading.Lock()


def _file_state(path: Path) -> tuple:
    st = path.stat()
    # ctime changes on every write and cannot be set back, unlike mtime.
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _nbytes(lut: LutFile) -> int:
    return lut.product.nbytes + sum(t.nbytes for pair in lut.gradients.values() for t in pair)


def load_lut(path: str | os.PathLike) -> LutFile:
    """Load (and verify) a LUT file, cached by its content hash.

    The file's stated hash is read first (one small member); a LUT with that hash that was
    verified at this very file state (path, inode, size, modification and change times) is
    returned without reading the tables again. Otherwise the whole file is loaded and
    verified. So a rewritten file is never answered with an older LUT, and a file that was
    changed is verified again even if it still claims the same hash. The cache holds at most
    :data:`LUT_CACHE_ENTRIES` LUTs and about :data:`LUT_CACHE_BYTES` bytes of tables
    (least recently used go first).

    Raises:
        FileNotFoundError: no such file, or a directory.
        appmult.lut_gen.LutFileError: not a valid LUT file.
    """
    p = Path(path)
    stated = read_sha256(p)  # also the missing-file and directory messages
    before = _file_state(p)
    with _lut_cache_lock:
        hit = _lut_cache.get(stated)
        if hit is not None and before in hit[1]:
            _lut_cache.move_to_end(stated)
            return hit[0]
    lut = _load(p)
    stable = _file_state(p) == before  # not rewritten while it was read
    with _lut_cache_lock:
        entry = _lut_cache.get(lut.sha256)
        if entry is None:
            entry = _lut_cache[lut.sha256] = (lut, [])
        _lut_cache.move_to_end(lut.sha256)
        if stable and before not in entry[1]:
            entry[1].append(before)
            del entry[1][:-8]  # a few paths per LUT are plenty
        total = sum(_nbytes(v[0]) for v in _lut_cache.values())
        while len(_lut_cache) > 1 and (len(_lut_cache) > LUT_CACHE_ENTRIES or total > LUT_CACHE_BYTES):
            _, (old, _) = _lut_cache.popitem(last=False)
            total -= _nbytes(old)
        return entry[0]


@dataclasses.dataclass(frozen=True)
class ApproxConfig:
    """Configuration of an approximate layer. Frozen and hashable (it can key caches).

    Args:
        lut: LUT file path or a loaded :class:`~appmult.lut_gen.LutFile`. Operand widths
            and signedness come from it: a signed LUT gives symmetric quantization, an
            unsigned one asymmetric quantization with zero points.
        grad: backward mode: ``"ste"`` (no table needed), ``"lut2d"`` or ``"lut1d"`` (tables
            stored in the LUT file under those names).
        weight_scheme: ``"per_channel"`` (default) or ``"per_tensor"`` weight scales.
        act_observer: activation range observer, ``"moving_average"`` or ``"minmax"``.
        momentum: moving-average weight of a new batch.
        kernel: ``"auto"`` (by exact rank), ``"lowrank"`` or ``"gather"``.
        exact_accumulate: accumulate in float64/integers in every forward (bit-exact LUT
            sums always); otherwise float32 low-rank sums, exact while ``K * S < 2**24``.
        activation_operand: LUT operand that receives activations, ``"a"`` (default, the
            RTL MAC's order) or ``"b"``.
        compute_missing_gradients: compute absent gradient tables with
            :mod:`appmult.lut_gen.gradients` instead of raising.
        half_window: LUT-2D half window used when computing tables (``"auto"`` or int).
        bits: expected operand widths, ``int`` or ``(activation_bits, weight_bits)``;
            ``None`` takes them from the LUT. A LUT of other widths is refused.
        signed: expected signedness (``None``: from the LUT).
        correction: ``"none"`` (default) or ``"control_variate"``: correct each output's
            accumulated multiplier error by ``-(alpha_bar * sum a + B)`` at inference
            (:mod:`appmult.nn.correction`, no retraining).
        correction_hist: optional activation histogram (one count per code of the
            activation operand) weighting the error-model fit; stored as a tuple.
        correction_frac_bits: fractional bits ``F`` of the per-channel ``alpha_bar``
            (0..24), as the hardware holds it.
        parts: which parts :func:`~appmult.nn.approximate_` approximates, a selection of
            ``"projections"``, ``"attention"``, ``"mlp"`` (see :data:`PARTS`; a single
            string is one part). Stored as a tuple in canonical order. Default: all.

    Raises:
        TypeError: ``lut`` is neither a path nor a LutFile, or a flag is not a bool.
        ValueError: an unknown mode string or a momentum outside ``(0, 1]``, or a
            correction histogram that is not a flat sequence of non-negative counts.
        ConfigError: ``parts`` is empty or names an unknown part.
    """

    lut: str | LutFile
    grad: str = "ste"
    weight_scheme: str = "per_channel"
    act_observer: str = "moving_average"
    momentum: float = 0.1
    kernel: str = "auto"
    exact_accumulate: bool = False
    activation_operand: str = "a"
    compute_missing_gradients: bool = False
    half_window: int | str = "auto"
    bits: int | tuple[int, int] | None = None
    signed: bool | None = None
    correction: str | None = "none"
    correction_hist: tuple[float, ...] | None = None
    correction_frac_bits: int = 8
    parts: tuple[str, ...] = PARTS

    def __post_init__(self) -> None:
        lut = self.lut
        if isinstance(lut, os.PathLike):
            object.__setattr__(self, "lut", os.fspath(lut))
        elif not isinstance(lut, (str, LutFile)):
            raise InvalidTypeError(f"ApproxConfig lut must be a LUT file path or a LutFile, not {type(lut).__name__}")

        def check(enum_cls, field):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum_cls(value).value)
            except ValueError:
                allowed = ", ".join(repr(e.value) for e in enum_cls)
                raise InvalidValueError(f"ApproxConfig {field} must be one of {allowed}, not {value!r}") from None

        check(GradMode, "grad")
        check(WeightScheme, "weight_scheme")
        check(Observer, "act_observer")
        check(Kernel, "kernel")
        if self.activation_operand not in ("a", "b"):
            raise InvalidValueError(f"ApproxConfig activation_operand must be 'a' or 'b', not {self.activation_operand!r}")
        for flag in ("exact_accumulate", "compute_missing_gradients"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidTypeError(f"ApproxConfig {flag} must be a bool, not {getattr(self, flag)!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) \
                or not 0.0 < float(self.momentum) <= 1.0:
            raise InvalidValueError(f"ApproxConfig momentum must be a number in (0, 1], not {self.momentum!r}")
        hw = self.half_window
        if not (hw == "auto" or (isinstance(hw, int) and not isinstance(hw, bool) and hw >= 1)):
            raise InvalidValueError(f"ApproxConfig half_window must be 'auto' or a positive int, not {hw!r}")

        bits = self.bits
        if bits is not None:
            pair = (bits, bits) if isinstance(bits, int) else tuple(bits) if isinstance(bits, (tuple, list)) else ()
            if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 16
                                         for b in pair):
                raise InvalidValueError(f"ApproxConfig bits must be an int in 1..16 or a pair of them, not {bits!r}")
            object.__setattr__(self, "bits", pair)
        if self.signed is not None and not isinstance(self.signed, bool):
            raise InvalidTypeError(f"ApproxConfig signed must be a bool or None, not {self.signed!r}")

        self._check_correction()
        self._check_parts()

    def _check_parts(self) -> None:
        given = self.parts
        items = (given,) if isinstance(given, str) else given
        try:
            items = tuple(items)
        except TypeError:
            items = ()
        if not items or any(not isinstance(p, str) or p not in PARTS for p in items):
            allowed = ", ".join(map(repr, PARTS))
            raise ConfigError(f"ApproxConfig parts must be a non-empty selection of {allowed}, not {given!r}")
        object.__setattr__(self, "parts", tuple(p for p in PARTS if p in items))

    def _check_correction(self) -> None:
        corr = "none" if self.correction is None else self.correction
        if corr not in ("none", "control_variate"):
            raise InvalidValueError(f"ApproxConfig correction must be 'none' or 'control_variate', not {corr!r}")
        object.__setattr__(self, "correction", corr)
        hist = self.correction_hist
        if hist is not None:
            try:
                values = tuple(float(v) for v in hist)
            except (TypeError, ValueError):
                raise InvalidValueError("ApproxConfig correction_hist must be a sequence of non-negative counts") from None
            if not values or any(not (v >= 0.0) or v == float("inf") for v in values):
                raise InvalidValueError("ApproxConfig correction_hist must be a sequence of non-negative counts")
            # A tuple keeps the config hashable (arrays are not).
            object.__setattr__(self, "correction_hist", values)
        check_frac_bits(self.correction_frac_bits)

    def load(self) -> LutFile:
        """The LUT file (loaded and verified once per path), checked against ``bits``/``signed``.

        Raises:
            appmult.lut_gen.LutFileError: the LUT's widths or signedness differ from the
                requested quantization.
        """
        lut = self.lut if isinstance(self.lut, LutFile) else load_lut(self.lut)
        if self.bits is not None or self.signed is not None:
            bx, bw = self.bits if self.bits is not None else (None, None)
            if self.activation_operand == "b":
                bx, bw = bw, bx
            lut.check_compatible(width_a=lut.width_a if bx is None else bx,
                                 width_b=lut.width_b if bw is None else bw,
                                 signed=lut.signed if self.signed is None else self.signed,
                                 what="the requested quantization")
        return lut
