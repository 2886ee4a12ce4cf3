"""The cheap baseline: every registered family over a parameter grid, and its Pareto front."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

from ..hdl import FAMILIES, Multiplier
from ..sim import synthesize
from .evaluator import Evaluation, Evaluator
from .genome import Genome, genome_from_netlist


__all__ = ["SweepPoint", "family_front", "family_grid", "pareto", "sweep_families"]


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One family member: its spec, circuit, error figures and cost estimate."""

    spec: str
    genome: Genome
    evaluation: Evaluation
    cost: dict[str, int]


def _grid(family: str, wa: int, wb: int) -> Iterator[dict]:
    wp = wa + wb
    if family == "exact" or family == "mitchell":
        yield {}
    elif family == "truncated":
        for columns, comp in itertools.product(range(1, wp - 1), (False, True)):
            yield {"columns": columns, "compensate": comp}
    elif family == "perforated":
        for k in range(1, wb):
            yield {"rows": list(range(k))}
    elif family == "broken_array":
        for hbl, vbl in itertools.product(range(0, wb // 2 + 1), range(0, wp - 1)):
            if hbl or vbl:
                yield {"hbl": hbl, "vbl": vbl}
    elif family == "drum":
        for k in range(2, max(wa, wb)):
            yield {"k": k}
    elif family == "loa":
        for lower in range(1, wp - 1):
            yield {"lower": lower}
    else:  # a family registered by the user: its defaults, if it has them
        yield {}


def family_grid(width_a: int, width_b: int, signed: bool) -> list[Multiplier]:
    """Every registered (parametric) family at these widths over a parameter grid.

    Built-in families get a grid over their parameters; a family registered later gets
    its defaults (skipped when they are not valid).
    """
    out = []
    for name, cls in FAMILIES.items():
        if cls.FILE_BACKED:
            continue
        for params in _grid(name, width_a, width_b):
            try:
                out.append(cls(width_a=width_a, width_b=width_b, signed=signed, **params))
            except (TypeError, ValueError):
                continue
    return out


def sweep_families(width_a: int, width_b: int, signed: bool, *, evaluator: Evaluator | None = None,
                   progress: bool = True) -> list[SweepPoint]:
    """Synthesize (cached) and evaluate every member of :func:`family_grid`.

    Args:
        width_a, width_b, signed: the multipliers to compare.
        evaluator: evaluator to use (one with operand distributions for weighted errors);
            default: a uniform exhaustive one.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    evaluator = evaluator or Evaluator(width_a, width_b, signed)
    points = []
    for mult in tqdm(family_grid(width_a, width_b, signed), desc="family sweep", unit="circuit",
                     disable=not progress, leave=False):
        genome = genome_from_netlist(synthesize(mult))
        points.append(SweepPoint(mult.spec, genome, evaluator.evaluate(genome), genome.cost()))
    return points


def pareto(items: list, cost, error) -> list:
    """The non-dominated items (lower cost and lower error are better), by increasing cost.

    Args:
        items: anything.
        cost: item -> cost.
        error: item -> error.
    """
    best = []
    for item in sorted(items, key=lambda x: (cost(x), error(x))):
        if not best or error(item) < error(best[-1]):
            best.append(item)
    return best


def family_front(points: Sequence[SweepPoint], cost: str, error: str) -> list[SweepPoint]:
    """The non-dominated sweep points by the search's cost figure ``cost`` and error
    objective ``error`` (names as in :class:`~appmult.explore.ExploreConfig`)."""
    return pareto(list(points), lambda p: p.cost[cost], lambda p: p.evaluation.get(error))
