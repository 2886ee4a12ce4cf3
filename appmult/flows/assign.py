"""The assignment run: candidates, surrogate, operand statistics, plan, retraining, Pareto plot.

The algorithm itself (:func:`appmult.methods.assign`) is torch and numpy only; this flow
characterizes candidate specs from their circuits (Amaranth and Yosys) and runs it on a
trained network.
"""


from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..files import atomic_write_text, check_output_dir
from ..lut_gen import LutFile
from ..methods.assignment import AssignError, Candidate, assign, check_candidates, plan_configs
from ..methods.error_model import measure_error, predict_sigma, record_operands
from ..methods.surrogate import train_surrogate
from ..nn import ApproxConfig, approximate_, calibrate, load_lut
from ..plotting import save_figure, new_figure
from ..sim.cost import FIGURES as COST_FIGURES
from ..spec import short_spec
from ..train import evaluate, fit, load_pretrained, make_loaders, pretrain_fp32
from ..train.pretraining import USER_FILE_ADVICE
from .assign_config import AssignConfig
from .characterization import characterize

__all__ = ["AssignConfig", "load_candidate", "names_lut_file", "plot_pareto", "run_assign"]


def _exact_spec(lut: LutFile) -> str:
    return (f"exact:width_a={lut.width_a},width_b={lut.width_b},"
            f"signed={'true' if lut.signed else 'false'}")


def names_lut_file(source: str | os.PathLike) -> bool:
    """Whether a candidate names a LUT file rather than a spec: a ``.npz`` name, or a path
    that does not start with a family name and a colon (``netlist:path=run/c001.json`` is a
    spec)."""
    text = os.fspath(source)
    family, colon, _ = text.partition(":")
    return text.endswith(".npz") or (os.sep in text and not (colon and family and os.sep not in family))


def load_candidate(source: str | os.PathLike, *, figure: str = "transistors", progress: bool = False) -> Candidate:
    """A candidate from a spec string (characterized, cached) or a LUT file carrying its cost.

    Args:
        source: multiplier spec (``"truncated:width=8,signed=false,columns=6"``) or ``.npz`` path.
        figure: cost figure (see :data:`appmult.sim.cost.FIGURES`), relative to exact.
        progress: progress bar while simulating a spec.

    Returns:
        The :class:`Candidate` (name: the spec, or the file's stem).

    Raises:
        AssignError: an unknown figure, or a LUT file without that cost figure.
        FileNotFoundError: a path that does not exist.
    """
    if figure not in COST_FIGURES:
        raise AssignError(f"Cost figure must be one of {', '.join(COST_FIGURES)}, not {figure!r}")
    text = os.fspath(source)
    if names_lut_file(text):
        lut = load_lut(text)
        cost = (lut.metadata.get("cost") or {}).get("relative", {}).get(figure)
        if cost is None:
            raise AssignError(f"LUT file {text} carries no relative {figure!r} cost; characterize the "
                              f"multiplier from its spec (with cost) or pass the spec instead")
        spec = lut.metadata.get("spec")
        return Candidate(spec or Path(text).stem, lut, float(cost), spec)
    char = characterize(text, gradients=("ste",), progress=progress, cost=True)
    if char.cost is None or char.cost.get("relative", {}).get(figure) is None:
        raise AssignError(f"No relative {figure!r} cost for {text}")
    return Candidate(char.spec or text, char.to_lutfile(), float(char.cost["relative"][figure]), char.spec)


def plot_pareto(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None,
                cost_figure: str = "transistors") -> Path:
    """Accuracy against ops-weighted relative cost; homogeneous points and the assignment.

    Args:
        points: dicts with ``label``, ``cost``, ``accuracy`` (0..1), optional
            ``accuracy_before`` (no retraining) and ``kind`` (``"homogeneous"`` or
            ``"heterogeneous"``).
        path: output image.
        title: figure title.
        cost_figure: axis label.

    Returns:
        ``path``.
    """
    fig, ax = new_figure(figsize=(8, 5))
    for p in points:
        het = p.get("kind") == "heterogeneous"
        color, marker = ("C3", "*") if het else ("C0", "o")
        ax.scatter([p["cost"]], [100 * p["accuracy"]], color=color, marker=marker, s=140 if het else 40, zorder=3)
        if p.get("accuracy_before") is not None:
            ax.scatter([p["cost"]], [100 * p["accuracy_before"]], facecolors="none", edgecolors=color,
                       marker=marker, s=140 if het else 40, zorder=2)
        label = "assignment" if het else short_spec(str(p["label"]))
        ax.annotate(label, (p["cost"], 100 * p["accuracy"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set(xlabel=f"ops-weighted relative cost ({cost_figure}, exact = 1)", ylabel="test accuracy (%)",
           title=title or "accuracy vs. multiplier cost (filled: retrained, hollow: before)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def _say(cfg: AssignConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[assign] {msg}", file=sys.stderr, flush=True)


def _reseed(loaders, seed: int) -> None:
    # The train loader's generator advances with every pass; reseeding it gives every
    # conversion the same calibration batches, so runs differ only by their multipliers.
    gen = getattr(loaders.train, "generator", None)
    if gen is not None:
        gen.manual_seed(seed)


def _convert_eval_retrain(fp32, configs, loaders, cfg: AssignConfig) -> dict[str, Any]:
    model = approximate_(copy.deepcopy(fp32), configs)
    _reseed(loaders, cfg.seed)
    calibrate(model, loaders.train, cfg.calib_batches)
    before = evaluate(model, loaders.test).accuracy
    started = time.perf_counter()
    after = before
    if cfg.retrain_epochs:
        hist = fit(model, loaders, cfg.retrain_epochs, lr=cfg.lr, seed=cfg.seed, progress=False)
        after = hist[-1]["test_accuracy"]
    return {"accuracy_before": before, "accuracy": after, "retrain_s": time.perf_counter() - started}


def _candidates(cfg: AssignConfig) -> tuple[list[Candidate], Candidate | None, LutFile]:
    """The candidates (plus the exact multiplier if asked), the exact one among them, the exact LUT."""
    cands = [load_candidate(s, figure=cfg.cost_figure, progress=cfg.progress) for s in cfg.candidates]
    check_candidates(cands)
    if cfg.include_exact and not any(c.spec == _exact_spec(c.lut) for c in cands):
        cands.append(load_candidate(_exact_spec(cands[0].lut), figure=cfg.cost_figure))
    exact = next((c for c in cands if c.spec == _exact_spec(c.lut)), None)
    ref_lut = exact.lut if exact is not None else load_candidate(_exact_spec(cands[0].lut)).lut
    return cands, exact, ref_lut


def _fp32_model(cfg: AssignConfig, out: Path):
    """The FP32 model: from ``cfg.checkpoint``, or pretrained (cached in ``out/pretrained``)."""
    if cfg.checkpoint is not None:
        return load_pretrained(cfg.checkpoint, advice=USER_FILE_ADVICE).model
    _say(cfg, f"FP32 {cfg.model} on {cfg.dataset}, {cfg.pretrain_epochs} epochs (cached)")
    return pretrain_fp32(cfg.model, cfg.dataset, cfg.pretrain_epochs, cfg.seed, out / "pretrained",
                         batch_size=cfg.batch_size, lr=cfg.lr, data_dir=cfg.data_dir, progress=False).model


def _validation(ref, stats, cands: Sequence[Candidate], exact: Candidate | None) -> list[dict[str, Any]]:
    """Per layer and approximate candidate: both predictions of the error std next to the measured one."""
    rows = []
    layers = dict(ref.named_modules())
    for c in cands:
        if c is exact:
            continue
        for n, s in stats.items():
            g, p = predict_sigma(s, c.lut, "global"), predict_sigma(s, c.lut, "population")
            m = measure_error(layers[n], s, c.lut)
            rows.append({
                "layer": n, "multiplier": c.name, "fan_in": s.fan_in, "measured_std": m.std,
                "measured_mean": m.mean, "global_sigma": g.sigma, "population_sigma": p.sigma,
                "global_bias": g.bias, "population_bias": p.bias,
                "global_rel_error": (g.sigma - m.std) / m.std if m.std else None,
                "population_rel_error": (p.sigma - m.std) / m.std if m.std else None})
    return rows


def run_assign(cfg: AssignConfig) -> dict[str, Any]:
    """Surrogate, statistics, plan, conversion, retraining, Pareto plot; files in ``cfg.out``.

    Writes ``plan.json``, ``results.json`` (plan, sigmas, predictions vs measurements,
    accuracies) and ``pareto.png``.

    Returns:
        The results dict.

    Raises:
        appmult.errors.UsageError: an output directory that cannot be written (checked first).
        AssignError: bad candidates (mixed widths, no cost).
        FileNotFoundError: a missing checkpoint or LUT file.
    """

    out = check_output_dir(cfg.out, files=("plan.json", "results.json", "pareto.png"))  # before any work
    held = [name for name in ("plan.json", "results.json") if (out / name).is_file()]
    if held and not cfg.overwrite:
        raise AssignError(f"Output directory {out} already holds an assignment run ({held[0]}); pass --overwrite "
                          "(overwrite=True) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cands, exact, ref_lut = _candidates(cfg)
    loaders = make_loaders(cfg.dataset, cfg.batch_size, cfg.seed, cfg.data_dir)
    fp32 = _fp32_model(cfg, out)
    fp32_acc = evaluate(fp32, loaders.test).accuracy

    _say(cfg, f"noise surrogate, {cfg.surrogate_epochs} epochs")
    ts = time.perf_counter()
    sigmas, shist = train_surrogate(copy.deepcopy(fp32), loaders, cfg.surrogate_epochs, lr=cfg.lr,
                                    sigma_lr=cfg.sigma_lr, lam=cfg.lam, sigma_max=cfg.sigma_max, seed=cfg.seed)
    surrogate_s = time.perf_counter() - ts

    ref = approximate_(copy.deepcopy(fp32), ApproxConfig(ref_lut))
    _reseed(loaders, cfg.seed)
    calibrate(ref, loaders.train, cfg.calib_batches)
    exact_q_acc = evaluate(ref, loaders.test).accuracy
    # Statistics from training batches: the assignment must not look at the test set.
    _reseed(loaders, cfg.seed)
    stats = record_operands(ref, loaders.train, num_batches=cfg.stats_batches, seed=cfg.seed)

    validation = []
    if cfg.validate:
        _say(cfg, "predicted vs measured error std per layer and multiplier")
        validation = _validation(ref, stats, cands, exact)

    plan = assign(stats, sigmas, cands, error_model=cfg.error_model, cost_figure=cfg.cost_figure)
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=1) + "\n")
    _say(cfg, f"plan: total relative cost {plan['total_relative_cost']:.3f}; retraining {cfg.retrain_epochs} epochs")

    points = [{"label": "assignment", "kind": "heterogeneous", "cost": plan["total_relative_cost"],
               **_convert_eval_retrain(fp32, plan_configs(plan, cands), loaders, cfg)}]
    if cfg.homogeneous:
        for c in cands:
            _say(cfg, f"homogeneous {c.name}")
            points.append({"label": c.name, "kind": "homogeneous", "cost": c.cost,
                           **_convert_eval_retrain(fp32, ApproxConfig(c.lut), loaders, cfg)})
    plot_pareto(points, out / "pareto.png", cost_figure=cfg.cost_figure,
                title=f"{cfg.model} on {cfg.dataset}: accuracy vs {cfg.cost_figure}")
    results = {"config": dataclasses.asdict(cfg), "fp32_accuracy": fp32_acc,
               "exact_quantized_accuracy": exact_q_acc, "sigmas": sigmas, "surrogate_history": shist,
               "surrogate_s": surrogate_s, "plan": plan, "points": points, "validation": validation,
               "wall_s": time.perf_counter() - t0}
    results["config"]["candidates"] = list(cfg.candidates)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results
