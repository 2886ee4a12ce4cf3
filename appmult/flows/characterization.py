"""Characterize a circuit: synthesize, simulate every input pair, build the LUT and its tables.

The product table always comes from simulating the synthesized gate netlist
(:func:`appmult.sim.synthesize` then :meth:`~appmult.sim.Netlist.exhaustive`), never
from a family's numpy model: the LUT must be what the hardware computes.

Results are cached on disk under ``$APPMULT_CACHE/lut/`` (default
``~/.cache/appmult/lut/``), keyed by what determines the circuit: for a
:class:`~appmult.hdl.Multiplier`, its canonical spec, its class and the SHA-256 of the
source files of the classes it is built from, plus the versions of appmult, Amaranth,
Yosys and numpy; for a :class:`~appmult.sim.Netlist`, the SHA-256 of the gate list and
its port mapping. A hit skips synthesis, simulation and the cost figures. Entries are
written atomically, so concurrent processes may share the cache, and carry SHA-256
hashes of their contents that are checked on every read: an entry damaged or edited on
disk is rebuilt (with a warning), never served.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import hdl, sim
from ..errors import InvalidTypeError, InvalidValueError
from ..files import atomic_write_bytes, atomic_write_text
from ..lut_gen import LutFile
from ..lut_gen.characterization import (MAX_LUT_WIDTH, MAX_METRICS_WIDTH, Characterization, check_gradients,
                                        tool_versions)
from ..lut_gen.gradients import check_half_window
from ..lut_gen.metrics import MetricsAccumulator, exact_product
from ..reference import required_acc_width as _required_acc_width

__all__ = ["characterize", "characterize_metrics", "characterize_verilog", "circuit_lut", "lut_cache_dir",
           "required_acc_width"]

# Bump when the cache entry layout or the meaning of its contents changes.
_CACHE_FORMAT = 3  # 2: EvoApprox metric conventions (er fraction, mre over exact != 0); 3: sealed by SHA-256


def lut_cache_dir() -> Path:
    """Directory of the characterization cache.

    ``$APPMULT_CACHE/lut`` when the environment variable is set, else
    ``~/.cache/appmult/lut``. Read at every call, so tests can redirect it.
    """
    root = os.environ.get("APPMULT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "appmult") / "lut"


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
        if isinstance(source, str):
            source = hdl.from_spec(source)
        if isinstance(source, hdl.Multiplier):
            self.multiplier, self._netlist = source, None
            self.width_a, self.width_b, self.signed = source.width_a, source.width_b, source.signed
            self.spec: str | None = source.spec
            self.name = self.spec
            self.describe = source.describe()
            self.origin = "amaranth"
            self.key_payload = {"spec": self.spec, "class": f"{type(source).__module__}.{type(source).__qualname__}",
                                "sources": _class_sources_hash(type(source))}
        elif isinstance(source, sim.Netlist):
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
            raise InvalidTypeError(f"characterize takes a Multiplier, a Netlist or a spec string, not {source!r}")
        for name, w in (("width_a", self.width_a), ("width_b", self.width_b)):
            if w > MAX_METRICS_WIDTH:
                raise InvalidValueError(f"Operand {name}={w} is too wide: characterization supports up to "
                                 f"{MAX_METRICS_WIDTH} bits")

    @property
    def netlist(self):
        if self._netlist is None:
            # Looked up on the module at call time so tests can count synthesis runs.
            self._netlist = sim.synthesize(self.multiplier)
        return self._netlist

    def cache_key(self, kind: str) -> str:
        return _key({"format": _CACHE_FORMAT, "kind": kind, "widths": [self.width_a, self.width_b],
                     "signed": self.signed, "tools": tool_versions(), **self.key_payload})


def _cost(source: _Source) -> dict[str, Any] | None:
    try:
        return source.netlist.cost()
    except sim.YosysError as exc:  # e.g. a third-party netlist synth_ice40 cannot map
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
    acc = MetricsAccumulator(width_a=wa, width_b=wb)
    wacc = MetricsAccumulator(weighted=True, width_a=wa, width_b=wb) if weighted else None
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
        raise InvalidValueError(f"Histogram {name} must have one entry per code ({n},), not shape {h.shape}")
    if not np.isfinite(h).all() or h.min() < 0 or h.sum() <= 0:
        raise InvalidValueError(f"Histogram {name} must be finite, non-negative and not all zeros")
    return h / h.sum()


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
    methods = check_gradients(gradients)
    half_window = check_half_window(half_window)
    src = _Source(source)
    if not product:
        return characterize_metrics(src, progress=progress, cache=cache, cost=cost)
    if max(src.width_a, src.width_b) > MAX_LUT_WIDTH:
        raise InvalidValueError(f"Full product LUTs are limited to {MAX_LUT_WIDTH}x{MAX_LUT_WIDTH} operands; "
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


def _sealed(entry: dict[str, Any]) -> str:
    """An entry's JSON with the SHA-256 of its canonical form, checked by :func:`_unsealed`."""
    return json.dumps({"entry": entry, "sha256": _key(entry)})


def _unsealed(text: str) -> dict[str, Any] | None:
    """The entry of :func:`_sealed` text, or None when it is malformed or does not match its hash."""
    try:
        doc = json.loads(text)
        entry = doc["entry"]
        if isinstance(entry, dict) and doc["sha256"] == _key(entry):
            return entry
    except (ValueError, TypeError, KeyError):
        pass
    return None


def _corrupt(path: Path) -> None:
    warnings.warn(f"Characterization cache entry {path} is corrupt; rebuilding it", RuntimeWarning, stacklevel=4)


def _save_full_entry(stem: Path, char: Characterization) -> None:
    # A raw .npy (not the compressed LUT file): zlib on a 12x12 table costs seconds each
    # way. The JSON carries the .npy's SHA-256 and its own, so an entry edited or damaged on
    # disk is rebuilt, never served (a LUT file made from it would carry a valid hash).
    # The JSON goes last: its presence marks a complete entry.
    buf = io.BytesIO()
    np.save(buf, char.product, allow_pickle=False)
    table = buf.getvalue()
    info = {"metrics": char.metrics, "cost": char.cost, "sha256_verilog": char.sha256_verilog,
            "sha256_netlist": char.sha256_netlist, "tools": char.versions,
            "table_sha256": hashlib.sha256(table).hexdigest()}
    try:
        atomic_write_bytes(stem.with_suffix(".npy"), table)
        atomic_write_text(stem.with_suffix(".json"), _sealed(info))
    except OSError:
        pass  # a read-only cache is not an error


def _load_full_entry(stem: Path, src: _Source, half_window, methods) -> Characterization | None:
    try:
        text = stem.with_suffix(".json").read_text("utf-8")
        table_bytes = stem.with_suffix(".npy").read_bytes()
    except (OSError, ValueError):
        return None  # a miss, or an incomplete entry that is simply rebuilt
    info = _unsealed(text)
    if info is None or info.get("table_sha256") != hashlib.sha256(table_bytes).hexdigest():
        _corrupt(stem)
        return None
    try:
        table = np.load(io.BytesIO(table_bytes), allow_pickle=False)
    except ValueError:
        _corrupt(stem)
        return None
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
            d = _unsealed(path.read_text("utf-8"))
        except (OSError, ValueError):
            d = None
        if d is not None and {"metrics", "cost", "sha256_verilog", "sha256_netlist", "tools"} <= set(d):
            return _metrics_only(src, d["metrics"], d["cost"], d["sha256_verilog"], d["sha256_netlist"],
                                 d["tools"])
        _corrupt(path)
    _, metrics, wmetrics = _simulate(src, want_product=False, progress=progress, hist_a=hist_a,
                                     hist_b=hist_b, chunk_vectors=chunk_vectors)
    netlist = src.netlist
    char = _metrics_only(src, metrics, _cost(src) if cost else None, netlist.sha256_verilog,
                         netlist.sha256_netlist, tool_versions())
    char.metrics_weighted = wmetrics
    if cache and not weighted:
        try:
            atomic_write_text(path, _sealed({"metrics": metrics, "cost": char.cost,
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


def characterize_verilog(path: str | os.PathLike, *, top: str, width_a: int | None = None,
                         width_b: int | None = None, signed: bool = False, a: str | None = None,
                         b: str | None = None, p: str | None = None, **kwargs) -> Characterization:
    """Characterize a third-party combinational multiplier written in Verilog.

    Port names and widths not given are taken from the module as
    :meth:`appmult.sim.Netlist.from_verilog` does (EvoApprox modules: ``A``, ``B``, ``O``).

    Args:
        path: Verilog file.
        top: module name.
        width_a, width_b: operand widths (default: the ports' widths).
        signed: two's complement operands and product.
        a, b, p: operand and product port names (default: inferred).
        **kwargs: passed to :func:`characterize` (``gradients``, ``half_window``, ``cache``, ``cost``, ...).

    Returns:
        The :class:`~appmult.lut_gen.Characterization`.

    Raises:
        FileNotFoundError, appmult.sim.YosysError, appmult.sim.NetlistError: as
            :meth:`appmult.sim.Netlist.from_verilog`.
    """
    given = {k: v for k, v in (("width_a", width_a), ("width_b", width_b), ("a", a), ("b", b), ("p", p))
             if v is not None}
    netlist = sim.Netlist.from_verilog(path, top=top, signed=signed, **given)
    return characterize(netlist, **kwargs)


def circuit_lut(multiplier: hdl.Multiplier) -> LutFile:
    """The product LUT of a multiplier's *circuit* (never its Python model), without gradients or cost.

    Args:
        multiplier: an :class:`appmult.hdl.Multiplier`.

    Returns:
        A :class:`~appmult.lut_gen.LutFile` for the multiplier's widths and signedness.
    """
    return characterize(multiplier, gradients=(), progress=False, cost=False).to_lutfile()


def required_acc_width(lut_or_multiplier, fan_in: int) -> int:
    """:func:`appmult.reference.required_acc_width` that also takes a multiplier (its circuit's LUT).

    Raises:
        TypeError: ``fan_in`` is not a positive integer, or the first argument is neither
            a LUT nor a Multiplier.
    """
    if isinstance(lut_or_multiplier, hdl.Multiplier):
        lut_or_multiplier = circuit_lut(lut_or_multiplier)
    return _required_acc_width(lut_or_multiplier, fan_in)
