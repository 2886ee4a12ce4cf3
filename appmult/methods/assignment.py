"""Heterogeneous multiplier assignment (Trommer, Waschneck, Kumar; ICCAD 2022).

Per layer ``l``: the noise surrogate (:mod:`appmult.methods.surrogate`) learns the relative
error ``|sigma_l|`` the layer tolerates; the tolerance in accumulator units is
``std(exact accumulators of l) * |sigma_l|``; the error model
(:mod:`appmult.methods.error_model`) predicts each candidate multiplier's accumulated-error
std on that layer's real operands; the layer gets the **cheapest candidate whose
predicted std is within the tolerance** (ties: the more accurate one).

When no candidate fits, the layer gets the **most accurate candidate** (smallest
predicted std; ties: the cheaper one) and is marked ``"fits": false`` in the plan.
:func:`appmult.flows.run_assign` adds the exact multiplier of the candidates' widths to the set unless
told not to, and its predicted std is 0, so with it every layer fits.

Costs are our own netlist figures relative to the exact multiplier
(``characterize(spec).cost["relative"][figure]``); the plan's total is ops-weighted:
``sum_l ops_l cost_l / sum_l ops_l``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

from ..errors import UserError
from ..lut_gen.lutfile import LutFile
from ..nn import ApproxConfig
from .error_model import predict_sigma

__all__ = [
    "AssignError",
    "Candidate",
    "PLAN_FORMAT",
    "assign",
    "check_candidates",
    "check_plan",
    "choose",
    "plan_configs",
]

PLAN_FORMAT = "appmult.assign.plan/1"


class AssignError(UserError, ValueError):
    """Candidates or inputs that cannot be assigned (mixed widths, no cost, ...)."""


class Candidate(NamedTuple):
    """A candidate multiplier: its name, LUT and cost relative to the exact multiplier."""

    name: str
    lut: LutFile
    cost: float
    spec: str | None = None




def check_candidates(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise AssignError("Assignment needs at least one candidate multiplier")
    names = [c.name for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AssignError(f"Candidate names must be unique; repeated: {', '.join(dup)}")
    first = candidates[0].lut
    for c in candidates[1:]:
        if (c.lut.width_a, c.lut.width_b, c.lut.signed) != (first.width_a, first.width_b, first.signed):
            raise AssignError(f"All candidates must share widths and signedness (one quantization); "
                              f"{candidates[0].name} is {first.width_a}x{first.width_b} "
                              f"{'signed' if first.signed else 'unsigned'}, {c.name} is "
                              f"{c.lut.width_a}x{c.lut.width_b} {'signed' if c.lut.signed else 'unsigned'}")


def choose(tolerances: Mapping[str, float], predictions: Mapping[str, Mapping[str, float]],
           costs: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per layer, the cheapest candidate whose predicted std is within the tolerance.

    Ties in cost go to the smaller predicted std. When nothing fits, the most accurate
    candidate (smallest predicted std, then cheapest) is taken with ``fits`` False.

    Args:
        tolerances: layer -> tolerated error std (accumulator units, >= 0).
        predictions: layer -> {candidate -> predicted error std}.
        costs: candidate -> relative cost.

    Returns:
        layer -> ``{"chosen", "predicted_sigma", "tolerance", "cost", "fits"}``.

    Raises:
        AssignError: a layer without predictions, a candidate without a cost, or a
            negative / non-finite tolerance.
    """
    out = {}
    for layer, tol in tolerances.items():
        if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise AssignError(f"Tolerance of layer {layer!r} must be a finite non-negative number, not {tol!r}")
        preds = predictions.get(layer)
        if not preds:
            raise AssignError(f"No predicted error for layer {layer!r}")
        missing = [c for c in preds if c not in costs]
        if missing:
            raise AssignError(f"No cost for candidate {', '.join(map(repr, missing))}")
        fitting = [c for c, s in preds.items() if s <= tol]
        if fitting:
            best = min(fitting, key=lambda c: (costs[c], preds[c]))
        else:
            best = min(preds, key=lambda c: (preds[c], costs[c]))
        out[layer] = {"chosen": best, "predicted_sigma": float(preds[best]), "tolerance": float(tol),
                      "cost": float(costs[best]), "fits": bool(fitting)}
    return out


def assign(stats: Mapping[str, Any], sigmas: Mapping[str, float], candidates: Sequence[Candidate], *,
           error_model: str = "population", cost_figure: str = "transistors") -> dict[str, Any]:
    """The per-layer plan from operand statistics, learned sigmas and candidates.

    Args:
        stats: layer -> :class:`~appmult.methods.error_model.OperandStats`.
        sigmas: layer -> learned ``|sigma_l|`` (from :func:`~appmult.nn.surrogate.learned_sigmas`).
        candidates: the candidate multipliers (same widths and signedness).
        error_model: ``"population"`` or ``"global"``.
        cost_figure: name of the cost figure (recorded in the plan).

    Returns:
        The plan (JSON-ready; see :func:`check_plan`).

    Raises:
        AssignError: inconsistent candidates, or a layer without a sigma.
    """
    check_candidates(candidates)
    missing = [n for n in stats if n not in sigmas]
    if missing:
        raise AssignError(f"No learned sigma for layer {', '.join(map(repr, missing))}")
    costs = {c.name: c.cost for c in candidates}
    tol = {n: s.exact_std * abs(float(sigmas[n])) for n, s in stats.items()}
    preds, biases = {}, {}
    for n, s in stats.items():
        preds[n], biases[n] = {}, {}
        for c in candidates:
            p = predict_sigma(s, c.lut, error_model)
            preds[n][c.name], biases[n][c.name] = p.sigma, p.bias
    picked = choose(tol, preds, costs)
    layers = []
    for n, s in stats.items():
        row = {"layer": n, **picked[n], "spec": next(c.spec for c in candidates if c.name == picked[n]["chosen"]),
               "sigma_l": abs(float(sigmas[n])), "exact_std": s.exact_std, "fan_in": s.fan_in, "ops": s.ops,
               "predicted_bias": biases[n][picked[n]["chosen"]], "predictions": preds[n]}
        layers.append(row)
    total_ops = sum(r["ops"] for r in layers)
    return {"format": PLAN_FORMAT, "error_model": error_model, "cost_figure": cost_figure,
            "candidates": [{"name": c.name, "spec": c.spec, "cost": c.cost} for c in candidates],
            "layers": layers,
            "total_relative_cost": sum(r["ops"] * r["cost"] for r in layers) / total_ops}


def check_plan(plan: Any) -> dict[str, Any]:
    """Validate a plan (e.g. read back from JSON).

    Returns:
        ``plan``.

    Raises:
        AssignError: a missing key, a wrong type, or a chosen multiplier that is not a candidate.
    """
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise AssignError(f"Not an assignment plan (format must be {PLAN_FORMAT!r})")
    for key, typ in (("layers", list), ("candidates", list), ("total_relative_cost", (int, float)),
                     ("error_model", str), ("cost_figure", str)):
        if not isinstance(plan.get(key), typ):
            raise AssignError(f"Assignment plan key {key!r} is missing or not a {getattr(typ, '__name__', 'number')}")
    names = {c.get("name") for c in plan["candidates"] if isinstance(c, dict)}
    for row in plan["layers"]:
        for key in ("layer", "chosen", "predicted_sigma", "tolerance", "cost", "fits", "ops"):
            if not isinstance(row, dict) or key not in row:
                raise AssignError(f"Assignment plan layer entry lacks {key!r}: {row!r}")
        if row["chosen"] not in names:
            raise AssignError(f"Layer {row['layer']!r} chose {row['chosen']!r}, which is not a candidate")
    return plan


def plan_configs(plan: Mapping[str, Any], candidates: Sequence[Candidate], **config: Any) -> dict[str, Any]:
    """``{layer: ApproxConfig}`` for :func:`~appmult.nn.approximate_` from a plan.

    Args:
        plan: the plan.
        candidates: the candidates it was made from.
        **config: further :class:`~appmult.nn.ApproxConfig` fields (``grad``, ...).

    Raises:
        AssignError: a chosen multiplier not among ``candidates``.
    """
    by_name = {c.name: c for c in candidates}
    out = {}
    for row in plan["layers"]:
        if row["chosen"] not in by_name:
            raise AssignError(f"Layer {row['layer']!r} chose {row['chosen']!r}, which is not a candidate")
        out[row["layer"]] = ApproxConfig(by_name[row["chosen"]].lut, **config)
    return out
