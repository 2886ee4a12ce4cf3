"""Human-readable results of a characterization: JSON, Markdown, tables and PNG plots.

Plots go through :mod:`appmult.plotting` (Figure on the Agg canvas, atomic save);
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..codes import codes_by_value, codes_to_values
from ..errors import InvalidValueError
from ..files import atomic_write_text
from ..plotting import new_figure, save_figure
from ..spec import short_spec

__all__ = [
    "COMPARE_COLUMNS",
    "compare_rows",
    "format_table",
    "markdown_report",
    "pareto_plot",
    "report_dict",
    "write_report",
]

# (key, header, format) of the error metrics shown in tables.
_METRIC_ROWS = (("er_pct", "ER (EP) %", "{:.2f}"), ("mae", "MAE (MED)", "{:.4g}"), ("mae_pct", "MAE %", "{:.4g}"),
                ("nmed_pct", "NMED %", "{:.4g}"), ("mre_pct", "MRE %", "{:.4g}"), ("wce", "WCE", "{}"),
                ("wce_pct", "WCE %", "{:.4g}"), ("wcre_pct", "WCRE %", "{:.4g}"),
                ("mse", "MSE", "{:.4g}"), ("bias", "bias", "{:.4g}"), ("std", "std", "{:.4g}"))
_COST_ROWS = ("gates", "aig_nodes", "depth", "transistors", "ice40_lut4", "toggles_per_op")
#: Columns of ``appmult compare``.
COMPARE_COLUMNS = ("name", "er_pct", "nmed_pct", "mre_pct", "wce", "bias", "transistors", "aig_nodes", "depth",
                   "rel_transistors", "rel_aig_nodes")


def _fmt(value: Any, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, int, np.integer)):
        return str(value)
    if isinstance(value, float) and fmt != "{}":
        return fmt.format(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report_dict(char) -> dict[str, Any]:
    """Everything ``report.json`` holds: identity, metrics, exact metrics, cost, gradients used."""
    md = char.metadata()
    return {"name": char.name, "spec": char.spec, "family": md["family"], "params": md["params"],
            "width_a": char.width_a, "width_b": char.width_b, "signed": char.signed,
            "reference": char.reference, "metrics": char.metrics, "exact_metrics": char.exact_metrics,
            "metrics_weighted": getattr(char, "metrics_weighted", None), "cost": char.cost,
            "sha256_verilog": char.sha256_verilog, "sha256_netlist": char.sha256_netlist,
            "tools": char.versions, "gradient_params": md["gradient_params"] if char.has_product else {}}


def markdown_report(char) -> str:
    """Markdown: metrics and cost, each next to the exact multiplier's of the same widths."""
    kind = "signed" if char.signed else "unsigned"
    lines = [f"# {char.name}", "",
             f"{char.width_a}x{char.width_b} {kind}; compared with `{char.reference}`.", "",
             "## Error metrics (uniform operands)", "", "| metric | this | exact |", "|---|---:|---:|"]
    exact = char.exact_metrics
    for key, header, fmt in _METRIC_ROWS:
        lines.append(f"| {header} | {_fmt(char.metrics[key], fmt)} | {_fmt(exact[key], fmt)} |")
    lines += ["", f"Pairs: {char.metrics['pairs']}; max |exact| = {char.metrics['max_exact']}. "
              "MRE and WCRE run over the pairs with exact != 0 (EvoApprox); "
              "MAE % and WCE % divide by 2**(width_a + width_b).", ""]
    cost = char.cost
    lines += ["## Hardware cost", ""]
    if cost:
        ex = cost.get("exact", {})
        rel = cost.get("relative", {})
        lines += ["| figure | this | exact | ratio |", "|---|---:|---:|---:|"]
        for key in _COST_ROWS:
            if key in cost:
                lines.append(f"| {key} | {_fmt(cost[key])} | {_fmt(ex.get(key))} | {_fmt(rel.get(key), '{:.3f}')} |")
    else:
        lines.append("No cost figures (not computed).")
    lines.append("")
    if char.has_product and char.gradient_methods:
        gp = char.metadata()["gradient_params"]
        lines += ["## Gradient tables", ""]
        for m in char.gradient_methods:
            extra = ", ".join(f"{k}={v}" for k, v in gp.get(m, {}).items())
            lines.append(f"* `{m}`" + (f" ({extra})" if extra else ""))
        lines.append("")
    lines += ["## Provenance", "", f"* Verilog SHA-256: `{char.sha256_verilog}`",
              f"* Netlist SHA-256: `{char.sha256_netlist}`",
              "* Tools: " + ", ".join(f"{k} {v}" for k, v in sorted(char.versions.items())), ""]
    return "\n".join(lines)


def _value_axes(char):
    oa = codes_by_value(char.width_a, char.signed)
    ob = codes_by_value(char.width_b, char.signed)
    va = codes_to_values(oa, char.width_a, char.signed)
    vb = codes_to_values(ob, char.width_b, char.signed)
    return oa, ob, va, vb


def _downsample(table: np.ndarray, limit: int = 512) -> np.ndarray:
    # A 4096x4096 heatmap carries nothing a 512x512 one does not at 100 dpi.
    sa = max(1, table.shape[0] // limit)
    sb = max(1, table.shape[1] // limit)
    return table[::sa, ::sb]


def _plots(char, out: Path) -> dict[str, Path]:
    oa, ob, va, vb = _value_axes(char)
    err = (char.product - char.exact_product())[np.ix_(oa, ob)]
    extent = (vb[0] - 0.5, vb[-1] + 0.5, va[-1] + 0.5, va[0] - 0.5)
    files: dict[str, Path] = {}

    fig, ax = new_figure(figsize=(6, 5))
    lim = max(1, int(np.abs(err).max()))
    im = ax.imshow(_downsample(err), cmap="RdBu_r", vmin=-lim, vmax=lim, extent=extent, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="error = approx - exact")
    ax.set(xlabel="b (value)", ylabel="a (value)", title=f"Error map: {char.name}")
    ax.title.set_fontsize(8)
    files["error_heatmap"] = save_figure(fig, out / "error_heatmap.png", dpi=100)

    fig, ax = new_figure(figsize=(6, 4))
    values, counts = np.unique(err, return_counts=True)
    if values.size <= 200:
        ax.bar(values, counts / err.size, width=max(1.0, (values.max() - values.min()) / 200))
    else:
        ax.hist(err.reshape(-1), bins=200, weights=np.full(err.size, 1 / err.size))
    ax.set(xlabel="error = approx - exact", ylabel="share of pairs", title="Error histogram")
    files["error_histogram"] = save_figure(fig, out / "error_histogram.png", dpi=100)

    h = char.half_window
    l2a, l2b = char.gradient("lut2d", half_window=h)
    sa, sb = char.gradient("ste")
    fig, axes = new_figure(2, 2, figsize=(10, 8))
    for ax, table, title in ((axes[0, 0], sa, "STE d/da"), (axes[0, 1], l2a, f"LUT-2D d/da (H={h})"),
                             (axes[1, 0], sb, "STE d/db"), (axes[1, 1], l2b, f"LUT-2D d/db (H={h})")):
        im = ax.imshow(_downsample(table[np.ix_(oa, ob)]), extent=extent, aspect="auto", cmap="viridis",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set(xlabel="b (value)", ylabel="a (value)", title=title)
    files["gradient_tables"] = save_figure(fig, out / "gradient_tables.png", dpi=100)

    l1a, _ = char.gradient("lut1d", half_window=h, compact=True)
    lra, _ = char.gradient("lre", compact=True)
    picks = np.unique(np.linspace(0, len(ob) - 1, 6)[1:-1].astype(int))
    fig, axes = new_figure(1, len(picks), figsize=(4 * len(picks), 3.5), squeeze=False)
    for ax, k in zip(axes[0], picks):
        code_b = ob[k]
        ax.plot(va, l2a[oa, code_b], label="LUT-2D", lw=1)
        ax.plot(va, sa[oa, code_b], label="STE", lw=1)
        ax.axhline(l1a[code_b], color="C2", ls="--", lw=1, label="LUT-1D")
        ax.axhline(lra[code_b], color="C3", ls=":", lw=1, label="LRE")
        ax.set(xlabel="a (value)", title=f"d/da at b = {vb[k]}")
    axes[0, 0].set_ylabel("gradient (product per unit of a)")
    axes[0, 0].legend(fontsize=7)
    files["gradient_curves"] = save_figure(fig, out / "gradient_curves.png", dpi=100)
    return files


def write_report(char, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write ``lut.npz`` (when a product is held), ``report.json``, ``report.md`` and PNG plots.

    Args:
        char: a :class:`~appmult.lut_gen.characterization.Characterization`.
        out_dir: output directory (created).
        plots: draw the PNG plots (error heatmap and histogram, LUT-2D vs STE gradient
            tables, gradient curves for a few values of ``b``); needs the product table.

    Returns:
        Name -> path of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if char.has_product:
        files["lut"] = char.save(out / "lut.npz")
    files["report_json"] = out / "report.json"
    atomic_write_text(files["report_json"], json.dumps(report_dict(char), indent=2, sort_keys=True) + "\n")
    files["report_md"] = out / "report.md"
    atomic_write_text(files["report_md"], markdown_report(char))
    if plots and char.has_product:
        files.update(_plots(char, out))
    return files


def compare_rows(chars: Sequence) -> list[dict[str, Any]]:
    """One row per characterization with the :data:`COMPARE_COLUMNS` (None where missing)."""
    rows = []
    for c in chars:
        cost = c.cost or {}
        rel = cost.get("relative", {}) or {}
        rows.append({"name": c.name, "er_pct": c.metrics["er_pct"], "nmed_pct": c.metrics["nmed_pct"],
                     "mre_pct": c.metrics["mre_pct"], "wce": c.metrics["wce"], "bias": c.metrics["bias"],
                     "transistors": cost.get("transistors"), "aig_nodes": cost.get("aig_nodes"),
                     "depth": cost.get("depth"), "rel_transistors": rel.get("transistors"),
                     "rel_aig_nodes": rel.get("aig_nodes")})
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COMPARE_COLUMNS) -> str:
    """Plain-text table with aligned columns."""
    cells = [[str(c) for c in columns]]
    for r in rows:
        cells.append([_fmt(r.get(c)) if not isinstance(r.get(c), str) else r[c] for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pareto_plot(chars: Sequence, path: str | os.PathLike, *, error: str = "mre_pct",
                cost: str = "transistors") -> Path:
    """Scatter of an error metric against a cost figure, with the Pareto front drawn.

    Args:
        chars: characterizations (those without the cost figure are left out).
        path: output PNG.
        error: metric key (e.g. ``"mre_pct"``, ``"nmed_pct"``, ``"wce"``).
        cost: cost key (e.g. ``"transistors"``, ``"aig_nodes"``, ``"gates"``).

    Returns:
        The path written.

    Raises:
        ValueError: unknown metric.
    """
    pts = []
    for c in chars:
        if error not in c.metrics:
            raise InvalidValueError(f"Unknown error metric {error!r}; choose from {', '.join(k for k in c.metrics)}")
        x = (c.cost or {}).get(cost)
        if x is not None:
            pts.append((float(x), float(c.metrics[error]), c.name))
    fig, ax = new_figure(figsize=(7, 5))
    if pts:
        xs, ys, names = zip(*pts)
        ax.scatter(xs, ys)
        for x, y, n in pts:
            ax.annotate(short_spec(n), (x, y), fontsize=6)
        front, best = [], float("inf")
        for x, y, _ in sorted(pts):
            if y < best:
                front.append((x, y))
                best = y
        ax.step(*zip(*front), where="post", color="C1", lw=1, label="Pareto front")
        ax.legend()
    ax.set(xlabel=cost, ylabel=error, title="Error vs cost")
    return save_figure(fig, path, dpi=100)
