"""Turn search results into files a person opens: circuits, Verilog, a table, a Pareto plot.

Every reported figure is *measured* on the re-synthesized circuit, never taken from the
search: each found circuit is written as a circuit file, built as
:class:`appmult.hdl.NetlistMultiplier`, synthesized by Yosys like any family member,
simulated exhaustively (:meth:`appmult.sim.Netlist.exhaustive`) for the error metrics
(:func:`appmult.lut_gen.error_metrics`), and costed by :func:`appmult.sim.hardware_cost`.
The family sweep's front is measured the same way, so the two fronts compare like with
like.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..codes import codes_to_values
from ..files import atomic_write_text
from ..hdl import ExactMultiplier, NetlistMultiplier, circuit_digest, from_spec
from ..lut_gen import error_metrics, exact_product
from ..lut_gen.metrics import metrics_under
from ..plotting import new_figure, save_figure
from ..sim import hardware_cost, synthesize
from ..spec import short_spec
from .config import ExploreConfig
from .search import Candidate, SearchResult
from .sweep import SweepPoint, family_front, pareto


__all__ = ["ERROR_KEY", "compare_fronts", "measure", "thin_front", "write_outputs"]

#: The measured metric key of each error objective.
ERROR_KEY = {"mae": "mae_pct", "wce": "wce_pct", "mre": "mre_pct", "er": "er_pct", "mse": "mse"}
_COSTS = ("transistors", "gates", "aig_nodes", "depth", "ice40_lut4")
_METRICS = ("mae_pct", "wce_pct", "wce", "er_pct", "mre_pct", "mse")


def measure(multiplier, config: ExploreConfig, *, vectors: tuple[np.ndarray, np.ndarray] | None = None
            ) -> dict[str, Any]:
    """Synthesize a multiplier, simulate it and cost it (Yosys cache applies).

    Args:
        multiplier: an :class:`appmult.hdl.Multiplier` (a family member or a netlist one).
        config: for the operand distributions (weighted metrics).
        vectors: operand codes to evaluate when the widths are too large for an
            exhaustive table (the search's sample); ``None``: exhaustive.

    Returns:
        ``{"metrics": {...}, "cost": {...}, "exhaustive": bool, "verilog": text}``.
    """
    net = synthesize(multiplier)
    wa, wb, signed = multiplier.width_a, multiplier.width_b, multiplier.signed
    if vectors is None:
        lut = net.exhaustive()
        exact = exact_product(wa, wb, signed)
        if config.p_a is not None or config.p_b is not None:
            pa = config.p_a if config.p_a is not None else np.ones(1 << wa)
            pb = config.p_b if config.p_b is not None else np.ones(1 << wb)
            m = metrics_under(lut, exact, pa, pb)
        else:
            m = error_metrics(lut, exact)
    else:
        a, b = vectors
        approx = net.evaluate(a, b)
        exact = codes_to_values(a, wa, signed) * codes_to_values(b, wb, signed)
        m = error_metrics(approx, exact, width_a=wa, width_b=wb)
    figures = hardware_cost(net, relative=False, samples=1 << 12)
    return {"metrics": {k: _plain(m[k]) for k in _METRICS},
            "cost": {k: int(figures[k]) for k in _COSTS},
            "exhaustive": vectors is None, "verilog": net.verilog}


def _plain(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    return x


def thin_front(front: list[Candidate], error: str, limit: int, anchors: Sequence[float] = ()) -> list[Candidate]:
    """At most ``limit`` members of a front, spread evenly over log(error) (ends kept),
    plus, for each error in ``anchors``, the cheapest member with no higher error (so that
    a comparison at those errors sees the best the search found there).
    """
    if len(front) <= limit:
        return list(front)
    raw = np.array([c.evaluation.get(error) for c in front])
    positive = raw[raw > 0]
    floor = positive.min() if positive.size else 1.0
    errs = np.maximum(raw, floor / 2)  # an exact circuit sits just below the smallest error
    targets = np.geomspace(errs.min(), errs.max(), limit)
    picked = {int(np.argmin(np.abs(np.log(errs) - np.log(t)))) for t in targets} | {0, len(front) - 1}
    for a in anchors:  # the front is sorted by cost: the first member within the error is the cheapest
        within = np.flatnonzero(raw <= a)
        if within.size:
            picked.add(int(within[0]))
    return [front[i] for i in sorted(picked)]


#: Error range of the family-front points the comparison covers (others: every point).
COMPARISON_RANGE = {"mae_pct": (0.01, 1.0)}


def comparison_range(error_key: str) -> tuple[float, float]:
    """``(low, high)``: the family-front errors :func:`compare_fronts` covers for ``error_key``."""
    return COMPARISON_RANGE.get(error_key, (0.0, math.inf))


def family_bounds(family: Sequence[SweepPoint], config: ExploreConfig) -> tuple[float, ...]:
    """Error bounds at the family front's points: its positive errors within the comparison
    range (so that each bound of the search has one family circuit to beat)."""
    low, high = comparison_range(ERROR_KEY[config.error])
    front = family_front(family, config.cost, config.error)
    return tuple(sorted({e for e in (p.evaluation.get(config.error) for p in front) if e > 0 and low <= e <= high}))


def compare_fronts(found: list[dict], family: list[dict], error_key: str, *, low: float, high: float,
                   saving: float = 0.2) -> list[dict[str, Any]]:
    """For each family-front point with ``low <= error <= high``: the cheapest found circuit
    with no higher error, and whether it saves at least ``saving`` of the transistors.
    """
    rows = []
    for f in family:
        err = f["metrics"][error_key]
        if not low <= err <= high:
            continue
        ok = [c for c in found if c["metrics"][error_key] <= err]
        best = min(ok, key=lambda c: c["cost"]["transistors"]) if ok else None
        fc = f["cost"]["transistors"]
        rows.append({"family": f["name"], "family_error": err, "family_transistors": fc,
                     "found": best["name"] if best else None,
                     "found_error": best["metrics"][error_key] if best else None,
                     "found_transistors": best["cost"]["transistors"] if best else None,
                     "saving": 1 - best["cost"]["transistors"] / fc if best and fc else None,
                     "dominates": bool(best and fc and best["cost"]["transistors"] <= (1 - saving) * fc)})
    return rows


def write_outputs(result: SearchResult, out_dir: str | os.PathLike, *, family: list[SweepPoint] | None = None,
                  vectors: tuple[np.ndarray, np.ndarray] | None = None, max_report: int = 30,
                  progress: bool = True, seed_name: str = "") -> dict[str, Any]:
    """Write every reported circuit (JSON + Verilog), ``front.json``, ``front.md``, ``pareto.png``.

    Args:
        result: what :func:`appmult.explore.search` returned.
        out_dir: output directory (created); circuits go to ``out_dir/circuits/``.
        family: the family sweep (its front is measured and drawn too).
        vectors: the search's sample when it was not exhaustive.
        max_report: about this many found circuits are measured and reported (spread
            over the error range; the front's ends always), plus, at each family-front
            point, the cheapest found circuit with no higher error.
        progress: show a progress bar while measuring.
        seed_name: how the seed circuit is named in the report.

    Returns:
        The JSON document written to ``front.json``.
    """
    from tqdm.auto import tqdm

    config = result.config
    out = Path(out_dir)
    cdir = out / "circuits"
    cdir.mkdir(parents=True, exist_ok=True)
    error_key = ERROR_KEY[config.error]
    est = family_front(family, config.cost, config.error) if family else []
    chosen = thin_front(result.front, config.error, max_report,
                        anchors=[p.evaluation.get(config.error) for p in est])
    found: list[dict[str, Any]] = []
    for k, cand in enumerate(tqdm(chosen, desc="measuring found circuits", unit="circuit", disable=not progress,
                                  leave=False)):
        name = f"c{k:03d}"
        circuit = cand.genome.to_circuit(metadata={
            "found_by": "appmult explore", "seed": seed_name, "bound": cand.bound, "error_objective": config.error,
            "search_evaluation": {kk: _plain(v) for kk, v in vars(cand.evaluation).items()},
            "search_cost": cand.cost, "exhaustive": result.exhaustive})
        path = cdir / f"{name}.json"
        atomic_write_text(path, json.dumps(circuit, indent=1) + "\n")
        mult = NetlistMultiplier(path=path)
        meas = measure(mult, config, vectors=vectors)
        atomic_write_text(cdir / f"{name}.v", meas.pop("verilog"))
        found.append({"name": name, "kind": "found", "spec": f"netlist:path={path.as_posix()},digest="
                      f"{circuit_digest(circuit)[:16]}", "circuit": str(path), "verilog": str(cdir / f"{name}.v"),
                      "bound": cand.bound, "search": {"error": cand.evaluation.get(config.error),
                                                      "cost": cand.cost}, **meas})
    fam_rows: list[dict[str, Any]] = []
    if family:
        for p in tqdm(est, desc="measuring family front", unit="circuit", disable=not progress, leave=False):
            meas = measure(from_spec(p.spec), config, vectors=vectors)
            meas.pop("verilog")
            fam_rows.append({"name": short_spec(p.spec), "kind": "family", "spec": p.spec, **meas})
    cost_key = config.cost
    measured_front = pareto(found, lambda r: r["cost"][cost_key], lambda r: r["metrics"][error_key])
    front_names = {r["name"] for r in measured_front}
    for r in found:
        r["pareto"] = r["name"] in front_names
    exact = _exact_cost(result, vectors is None)
    doc = {"config": config.describe(), "seed": seed_name, "exhaustive": result.exhaustive,
           "evaluations": result.evaluations, "seconds": result.seconds, "throughput": result.throughput,
           "archive_size": len(result.front), "exact_transistors": exact, "error_key": error_key,
           "found": found, "family": fam_rows,
           "bests": [{"bound": b.bound, "error": b.evaluation.get(config.error), "cost": b.cost}
                     for b in result.bests]}
    if fam_rows:
        lo, hi = comparison_range(error_key)
        doc["comparison"] = compare_fronts(found, [f for f in fam_rows if f["spec"].split(":")[0] != "exact"],
                                           error_key, low=lo, high=hi)
    atomic_write_text(out / "front.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "front.md", _markdown(doc))
    _plot(doc, out / "pareto.png", cost_key, error_key)
    return doc


def _exact_cost(result: SearchResult, _exhaustive: bool) -> int | None:
    seed = result.front[0].genome if result.front else None
    if seed is None:
        return None
    mult = ExactMultiplier(width_a=seed.width_a, width_b=seed.width_b, signed=seed.signed)
    return int(hardware_cost(synthesize(mult), relative=False, samples=1 << 10)["transistors"])


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    key = doc["error_key"]
    lines = [f"# appmult explore: {cfg['error']} vs {cfg['cost']}", "",
             f"Seed: {doc['seed'] or 'given circuit'}; {doc['evaluations']} candidate evaluations in "
             f"{doc['seconds']:.1f} s ({doc['throughput']:.0f}/s); "
             f"{'exhaustive' if doc['exhaustive'] else 'NOT exhaustive: sampled pairs plus corners'}; "
             f"archive of {doc['archive_size']} non-dominated circuits, {len(doc['found'])} reported.",
             f"Exact multiplier: {doc['exact_transistors']} transistors. Figures below are measured on the "
             "re-synthesized circuits (Yosys), not taken from the search.", ""]
    head = ["name", "pareto", key, "wce_pct", "er_pct", "mre_pct", "transistors", "rel.", "gates", "aig_nodes",
            "depth", "ice40_lut4", "spec"]
    exact = doc["exact_transistors"] or 0
    for title, rows in (("Found circuits", doc["found"]), ("Family front (parameter sweep)", doc["family"])):
        if not rows:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            m, c = r["metrics"], r["cost"]
            rel = f"{c['transistors'] / exact:.3f}" if exact else ""
            lines.append("| " + " | ".join([r["name"], "yes" if r.get("pareto", True) else "", _fmt(m[key]),
                                             _fmt(m["wce_pct"]), _fmt(m["er_pct"]), _fmt(m["mre_pct"]),
                                             str(c["transistors"]), rel, str(c["gates"]), str(c["aig_nodes"]),
                                             str(c["depth"]), str(c["ice40_lut4"]), f"`{r['spec']}`"]) + " |")
        lines.append("")
    if doc.get("comparison"):
        lines += ["", "## Found front against the family front", "",
                  f"| family | {key} | transistors | found | {key} | transistors | saving |",
                  "|---|---|---|---|---|---|---|"]
        for row in doc["comparison"]:
            saving = "" if row["saving"] is None else f"{100 * row['saving']:.1f}%"
            lines.append(f"| {row['family']} | {_fmt(row['family_error'])} | {row['family_transistors']} | "
                         f"{row['found'] or 'none'} | {_fmt(row['found_error'])} | {row['found_transistors']} | "
                         f"{saving} |")
    return "\n".join(lines) + "\n"


def _plot(doc: dict[str, Any], path: Path, cost_key: str, error_key: str) -> None:
    fig, ax = new_figure(figsize=(7, 4.5))
    for rows, label, style in ((doc["family"], "family front (sweep)", dict(marker="s", color="tab:gray")),
                               ([r for r in doc["found"] if r.get("pareto")], "found (appmult explore)",
                                dict(marker="o", color="tab:red"))):
        pts = sorted((r["cost"][cost_key], r["metrics"][error_key]) for r in rows)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.step(xs, ys, where="post", label=label, **style, markersize=4, linewidth=1)
    ax.set_xlabel(f"{cost_key} (Yosys, re-synthesized)")
    ax.set_ylabel(error_key)
    if all(r["metrics"][error_key] > 0 for r in doc["found"] + doc["family"]) and (doc["found"] or doc["family"]):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{'exhaustive' if doc['exhaustive'] else 'sampled'} {error_key} vs {cost_key}")
    save_figure(fig, path)
