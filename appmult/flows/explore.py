"""Network-aware exploration: search multipliers for one trained network, retrain a shortlist.

The pipeline behind ``appmult explore --model ... --dataset ...`` (:func:`run_network_explore`):

1. An FP32 model, pretrained and cached (:func:`appmult.train.pretrain_fp32`).
2. Converted with the *exact* multiplier's LUT, calibrated on fixed training batches and
   evaluated (the "exact-quantized" accuracy every candidate is compared with); its
   per-layer operand histograms are recorded (:func:`appmult.methods.record_operands`)
   and mixed into one distribution per operand, each layer weighted by its share of the
   network's multiplications (written to ``hist.npz``, usable with ``appmult explore
   --hist``). The search's weights ``p_a[a] * p_b[b]`` treat the two operands as
   independent: a product of the mixed marginals, not the per-layer joint distribution.
3. The gate-level search and the family sweep under that distribution-weighted error
   (:func:`appmult.explore.search`, :func:`appmult.explore.write_outputs` into ``search/``).
4. Retraining from the same FP32 model (:func:`appmult.flows.run_retrain`, one directory
   under ``retrain/`` each): first the exact multiplier (the reference: the same schedule
   also lifts an FP32 model that was not trained to the end), then, along each front
   (found circuits, family members) by increasing error, a bisection for the last circuit
   that meets the target -- ``target_accuracy``, or ``max_drop`` percentage points below
   the better of the exact-quantized and the retrained exact accuracy -- with at most
   ``shortlist`` (``family_shortlist``) retrainings, then up to ``neighbours`` cheaper
   members next to where it stopped (accuracy does not always fall with the error).
5. The chosen circuit: the cheapest (transistors, after re-synthesis) retrained one that
   meets the target; its Verilog is checked against its LUT in a simulator
   (:func:`appmult.tb.verify_multiplier`).
6. ``network.json``, ``network.md`` and ``accuracy.png`` (accuracy vs transistors).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..explore import (Evaluator, search, search_starts, seed_genome, sweep_families,
                       write_outputs)
from ..files import atomic_write_text
from ..hdl import from_spec
from ..methods import record_operands
from ..nn import calibrate, exact_multiplication
from ..plotting import new_figure, save_figure
from ..tb import SimulatorNotFound, verify_multiplier
from ..train import evaluate, make_loaders, pretrain_fp32
from .characterization import circuit_lut
from .retrain import run_retrain
from .retrain_config import RetrainConfig
from .explore_config import NetworkExploreConfig
from .retrain_start import approx_model, fixed_batches


__all__ = ["NetworkExploreConfig", "run_network_explore"]


def _say(cfg: NetworkExploreConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[explore] {msg}", file=sys.stderr, flush=True)


# -- steps ------------------------------------------------------------------------------------------
def _pretrained(cfg: NetworkExploreConfig):
    cache = Path(cfg.pretrained_dir) if cfg.pretrained_dir else Path(cfg.out) / "pretrained"
    return pretrain_fp32(cfg.model, cfg.dataset, cfg.pretrain_epochs, cfg.seed, out_dir=cache,
                         batch_size=cfg.batch_size, lr=cfg.lr, data_dir=cfg.data_dir, progress=cfg.progress)


def _mix(stats: dict, operand: str, n: int) -> np.ndarray:
    """One operand's histograms, normalized per layer and mixed by the layers' MAC shares."""
    total = sum(s.ops for s in stats.values()) or 1
    p = np.zeros(n)
    for s in stats.values():
        h = s.hist_x if s.activation_operand == operand else s.hist_w
        h = np.asarray(h, dtype=np.float64)[:n]
        if h.sum() > 0:
            p += (s.ops / total) * h / h.sum()
    return p


def _distributions(cfg: NetworkExploreConfig, fp32) -> dict[str, Any]:
    """Exact-quantized accuracy and the operand distributions ``p_a``, ``p_b`` of the network."""
    import torch
    loaders = make_loaders(cfg.dataset, cfg.batch_size, cfg.seed, cfg.data_dir)
    lut = circuit_lut(from_spec(cfg.exact_spec))
    model = approx_model(fp32, lut, "ste", torch.device("cpu"))
    calibrate(model, fixed_batches(loaders.train, cfg.calib_batches, cfg.seed))
    with exact_multiplication(model):
        exact_q = evaluate(model, loaders.test).accuracy
    stats = record_operands(model, loaders.train, num_batches=cfg.record_batches, keep_inputs=0, seed=cfg.seed)
    n = 1 << cfg.width
    p_a, p_b = _mix(stats, "a", n), _mix(stats, "b", n)
    layers = [{"name": s.name, "ops": int(s.ops), "fan_in": int(s.fan_in),
               "activation_operand": s.activation_operand} for s in stats.values()]
    return {"exact_quantized": 100 * float(exact_q), "p_a": p_a, "p_b": p_b, "layers": layers}


def _search(cfg: NetworkExploreConfig, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, Any]:
    """The weighted search (and family sweep); the measured fronts as :func:`write_outputs` writes them."""
    config = dataclasses.replace(cfg.search, p_a=tuple(p_a.tolist()), p_b=tuple(p_b.tolist()))
    genome, seed_name = seed_genome(cfg.exact_spec)
    family = None
    if cfg.sweep:
        ev = Evaluator(cfg.width, cfg.width, False, p_a=config.p_a, p_b=config.p_b)
        family = sweep_families(cfg.width, cfg.width, False, evaluator=ev, progress=cfg.progress)
    starts, trajectory = search_starts(genome, config, family=family, family_starts=cfg.family_starts,
                                       greedy=cfg.greedy_starts, progress=cfg.progress)
    out = Path(cfg.out) / "search"
    result = search(genome, config, starts=starts, checkpoint=out / "checkpoint.json",
                    progress=cfg.progress).merged(trajectory)
    return write_outputs(result, out, family=family, max_report=max(cfg.shortlist, 1) * 4,
                         progress=cfg.progress, seed_name=seed_name)


def _fronts(cfg: NetworkExploreConfig, doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per kind (found, family), the front members worth a retraining, by increasing error:
    an error above zero and within the search's largest bound."""
    key = doc["error_key"]
    top = cfg.search.error_bounds[-1]  # beyond the largest bound a circuit is not worth a retraining

    def fits(r: dict[str, Any]) -> bool:
        return 0 < r["metrics"][key] <= top

    fronts = {"found": [r for r in doc["found"] if r["pareto"] and fits(r)],
              "family": [r for r in doc["family"] if fits(r)] if cfg.sweep else []}
    return {kind: sorted(rows, key=lambda r: r["metrics"][key]) for kind, rows in fronts.items()}


def _row(cfg: NetworkExploreConfig, checkpoint: Path, key: str, row: dict[str, Any],
         threshold: float | None) -> dict[str, Any]:
    """Retrain against one circuit; its line of the report."""
    _say(cfg, f"retraining against {row['name']} ({row['cost']['transistors']} transistors)")
    acc = _retrain(cfg, checkpoint, row)
    return {"name": row["name"], "kind": row["kind"], "spec": row["spec"], "error": row["metrics"][key],
            "transistors": row["cost"]["transistors"], "accuracy_before": acc["before"],
            "accuracy_after": acc["after"], "meets_target": threshold is not None and acc["after"] >= threshold,
            "retrain_dir": acc["out"], "exact_quantized_in_run": acc["exact_quantized_run"]}


def _bisect(cfg: NetworkExploreConfig, checkpoint: Path, key: str, front: list[dict[str, Any]], limit: int,
            threshold: float, neighbours: int = 0) -> list[dict[str, Any]]:
    """Retrain at most ``limit`` members of a front (by increasing error, so decreasing cost),
    bisecting for the last one that meets the target; then up to ``neighbours`` more.

    The bisection assumes the retrained accuracy falls as the error grows along a front (a
    heuristic: the report lists every retrained circuit, so a violation shows). The
    neighbours test it where it matters: the nearest members past the cheapest one that met
    the target (past the start of the front when none did) that were not retrained yet.
    """
    lo, hi, done = -1, len(front), {}  # front[..lo] assumed to meet the target, front[hi..] not
    while hi - lo > 1 and len(done) < limit:
        mid = (lo + hi) // 2
        done[mid] = _row(cfg, checkpoint, key, front[mid], threshold)
        if done[mid]["meets_target"]:
            lo = mid
        else:
            hi = mid
    for i in [i for i in range(lo + 1, len(front)) if i not in done][:neighbours if done else 0]:
        done[i] = _row(cfg, checkpoint, key, front[i], threshold)
    return list(done.values())


def _retrain(cfg: NetworkExploreConfig, checkpoint: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Retrain the FP32 model against one circuit; its accuracies (%)."""
    rcfg = RetrainConfig(spec=row["spec"], model=cfg.model, dataset=cfg.dataset, data_dir=cfg.data_dir,
                         epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, grads=(cfg.grad,),
                         out=str(Path(cfg.out) / "retrain" / re.sub(r"[^A-Za-z0-9_.-]+", "_", row["name"])),
                         checkpoint=str(checkpoint), overwrite=True, progress=cfg.progress,
                         calib_batches=cfg.calib_batches, time_exact=False)
    results = run_retrain(rcfg)
    mode = results["modes"][cfg.grad]
    return {"before": 100 * results["start"]["approx_accuracy"], "after": 100 * mode["approx_after"],
            "exact_quantized_run": 100 * results["start"]["exact_quantized_accuracy"], "out": rcfg.out}


def _verify(cfg: NetworkExploreConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The chosen circuit's Verilog against its LUT (the one it was retrained with) in a simulator."""
    mult = from_spec(row["spec"])
    try:
        res = verify_multiplier(mult, circuit_lut(mult), sim=cfg.sim)
    except SimulatorNotFound as exc:
        return {"status": "skipped", "reason": str(exc)}
    return {"status": "passed" if res.passed else "FAILED", "simulator": cfg.sim,
            "pairs_checked": res.pairs_checked, "mismatches": res.mismatch_count, "exhaustive": res.exhaustive}


def _reference(cfg: NetworkExploreConfig, checkpoint: Path, doc: dict[str, Any],
               exact_quantized: float) -> tuple[dict[str, Any], float]:
    """The exact multiplier retrained on the same schedule, and the accuracy target.

    The target compares like with like: without ``target_accuracy`` it is ``max_drop``
    below the better of the exact-quantized accuracy and the exact multiplier's accuracy
    after the same retraining (which gains on an FP32 model that was not trained to the end).
    """
    exact = {"name": "exact", "kind": "exact", "spec": cfg.exact_spec, "metrics": {doc["error_key"]: 0.0},
             "cost": {"transistors": doc["exact_transistors"]}}
    ref = _row(cfg, checkpoint, doc["error_key"], exact, None)
    if cfg.target_accuracy is not None:
        threshold = float(cfg.target_accuracy)
    else:
        threshold = max(exact_quantized, ref["accuracy_after"]) - cfg.max_drop
    ref["meets_target"] = ref["accuracy_after"] >= threshold
    return ref, threshold


def run_network_explore(cfg: NetworkExploreConfig) -> dict[str, Any]:
    """Run the whole network-aware exploration (see the module docstring) and write its files.

    Args:
        cfg: the configuration.

    Returns:
        The document written to ``<out>/network.json``.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = _pretrained(cfg)
    dist = _distributions(cfg, pre.model)
    np.savez(out / "hist.npz", p_a=dist["p_a"], p_b=dist["p_b"])
    _say(cfg, f"exact-quantized accuracy {dist['exact_quantized']:.2f}%; searching under the weighted error")
    doc = _search(cfg, dist["p_a"], dist["p_b"])
    key = doc["error_key"]
    reference, threshold = _reference(cfg, pre.path, doc, dist["exact_quantized"])
    fronts = _fronts(cfg, doc)
    rows = (_bisect(cfg, pre.path, key, fronts["found"], cfg.shortlist, threshold, cfg.neighbours)
            + _bisect(cfg, pre.path, key, fronts["family"], cfg.family_shortlist, threshold, cfg.neighbours))
    rows.sort(key=lambda r: r["transistors"])
    ok = [r for r in rows if r["meets_target"]]
    chosen = min(ok, key=lambda r: (r["transistors"], r["error"])) if ok else None
    verification = None
    if chosen is not None and cfg.verify:
        _say(cfg, f"verifying the RTL of {chosen['name']} against its LUT")
        verification = _verify(cfg, chosen)
    result = {"model": cfg.model, "dataset": cfg.dataset, "width": cfg.width, "grad": cfg.grad,
              "epochs": cfg.epochs, "pretrained": str(pre.path), "error_key": key,
              "exact_quantized_accuracy": dist["exact_quantized"], "reference": reference, "threshold": threshold,
              "exact_transistors": doc["exact_transistors"], "layers": dist["layers"], "candidates": rows,
              "chosen": chosen, "verification": verification,
              "best_family_meeting_target": min((r for r in ok if r["kind"] == "family"),
                                                key=lambda r: r["transistors"], default=None),
              "search": {"evaluations": doc["evaluations"], "seconds": doc["seconds"], "dir": str(out / "search")}}
    atomic_write_text(out / "network.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "network.md", _markdown(result))
    _plot(result, out / "accuracy.png")
    return result


# -- files ------------------------------------------------------------------------------------------
def _markdown(res: dict[str, Any]) -> str:
    key = res["error_key"]
    lines = [f"# appmult explore: {res['model']} on {res['dataset']}, {res['width']}x{res['width']} unsigned", "",
             f"Exact-quantized accuracy {res['exact_quantized_accuracy']:.2f}% (exact multiplier after the same "
             f"retraining: {res['reference']['accuracy_after']:.2f}%); target {res['threshold']:.2f}%; "
             f"exact multiplier {res['exact_transistors']} transistors. Errors are weighted by the network's "
             f"operand distributions; retraining: {res['epochs']} epochs, {res['grad']} gradients.", "",
             f"| circuit | kind | weighted {key} | transistors | accuracy before % | after % | meets target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["candidates"]:
        lines.append(f"| {r['name']} | {r['kind']} | {r['error']:.4g} | {r['transistors']} | "
                     f"{r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} | {'yes' if r['meets_target'] else 'no'} |")
    lines.append("")
    c = res["chosen"]
    if c is None:
        lines.append("No shortlisted circuit reached the target.")
    else:
        lines.append(f"Chosen: **{c['name']}** ({c['kind']}, {c['transistors']} transistors, "
                     f"{c['accuracy_after']:.2f}% after retraining), spec `{c['spec']}`.")
        v = res["verification"]
        if v is not None:
            lines.append(f"RTL check: {v['status']}" + (f" ({v['pairs_checked']} pairs in {v['simulator']}, "
                                                        f"{v['mismatches']} differ)" if "pairs_checked" in v
                                                       else f" ({v.get('reason', '')})"))
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    fig, ax = new_figure(figsize=(6, 4))
    for kind, marker in (("family", "s"), ("found", "o")):
        rows = [r for r in res["candidates"] if r["kind"] == kind]
        if rows:
            ax.scatter([r["transistors"] for r in rows], [r["accuracy_after"] for r in rows], marker=marker,
                       label=f"{kind} (after retraining)")
    ax.axhline(res["exact_quantized_accuracy"], color="gray", ls="--", lw=1, label="exact-quantized")
    ax.axhline(res["reference"]["accuracy_after"], color="black", ls="-.", lw=1, label="exact, retrained")
    ax.axhline(res["threshold"], color="red", ls=":", lw=1, label="target")
    ax.set_xlabel("transistors (re-synthesized)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{res['model']} / {res['dataset']}")
    ax.legend(fontsize=8)
    save_figure(fig, path)
