"""Greedy approximate logic synthesis: one move at a time, the most cost saved per unit of error.

From a seed circuit, every step tries each single move of approximate logic synthesis
on the current circuit -- an active gate tied to constant 0 or 1 or replaced by one of
its inputs (its output wire substituted), a product bit tied to 0 or 1 -- evaluates each
one exhaustively (incrementally, as the search does), and applies the one that saves the
most cost per unit of added error. Moves that raise no error come first (the larger
saving first); moves that save nothing, break a constraint or leave the largest error
bound are skipped. The walk stops when no move is left.

Every step's circuit is kept: a trajectory from the seed to the largest bound, in a few
seconds for an 8x8 multiplier. It is a baseline of its own and a set of starts for the
evolutionary search (:func:`appmult.explore.search` with ``starts=``), which then begins
each bound at the cheapest trajectory circuit within it instead of climbing down from
the exact multiplier. The idea is that of wire-by-constant substitution in approximate
logic synthesis (e.g. SASIMI, Venkataramani et al. 2013), with the exhaustive error of
this package's evaluator as the guide. Deterministic: no random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from . import _kernels as K
from .config import ExploreConfig
from .evaluator import Evaluation, Evaluator
from .genome import Genome
from .search import Candidate, _active_gates, _Fitness

__all__ = ["greedy_trajectory"]

_CONSTANT_TT = (0x00, 0xFF)
_INPUT_TT = (0xAA, 0xCC, 0xF0)


def _moves(genome: Genome) -> Iterator[Genome]:
    """Every single-move child of ``genome`` (gates first, in order, then product bits)."""
    for g in _active_gates(genome):
        t = int(genome.tt[g])
        options = list(_CONSTANT_TT) + [_INPUT_TT[q] for q in range(3) if K.tt_depends(t, q)]
        for new in options:
            if new != t:
                child = genome.copy()
                child.tt[g] = new
                yield child
    for k in range(genome.width_p):
        for node in (0, 1):
            if int(genome.out[k]) != node:
                child = genome.copy()
                child.out[k] = node
                yield child


def _score(saving: float, added_error: float) -> tuple[float, float]:
    """Rank of a move: saving per unit of added error (error-free moves first), then saving."""
    return (math.inf if added_error <= 0 else saving / added_error, saving)


def greedy_trajectory(seed: Genome, config: ExploreConfig, *, evaluator: Evaluator | None = None,
                      max_steps: int | None = None, progress: bool = True) -> list[Candidate]:
    """Walk from ``seed`` to the largest error bound by greedy moves (module docstring).

    Args:
        seed: the first circuit (e.g. the exact multiplier's genome).
        config: the error objective, cost figure, constraints and bounds (the largest
            bound ends the walk; the budget fields are not used).
        evaluator: evaluator to use (one with operand distributions for weighted
            errors); default: one built from ``config`` for the seed's widths.
        max_steps: stop after this many moves (default: no limit).
        progress: show a progress bar (one tick per step).

    Returns:
        The circuits after each step, by decreasing cost, each as a
        :class:`~appmult.explore.Candidate` whose ``bound`` is the largest bound. The seed
        is not included.
    """
    from tqdm.auto import tqdm

    config.check_widths(seed.width_a, seed.width_b)
    if evaluator is None:
        evaluator = Evaluator(seed.width_a, seed.width_b, seed.signed, p_a=config.p_a, p_b=config.p_b,
                              unpack=config.needs_unpack, samples=config.samples, seed=config.seed)
    fitness = _Fitness(config)
    limit = max(config.error_bounds)
    metric, figure = config.error, config.cost
    current: Genome = seed.copy()
    ev = evaluator.set_parent(current)
    cost = current.cost()
    trajectory: list[Candidate] = []
    with tqdm(desc="greedy", unit="step", disable=not progress, leave=False) as bar:
        while max_steps is None or len(trajectory) < max_steps:
            best: tuple[tuple[float, float], Genome, Evaluation, dict[str, int]] | None = None
            for child in _moves(current):
                c_cost = child.cost()
                saving = cost[figure] - c_cost[figure]
                if saving <= 0:
                    continue
                c_ev = evaluator.evaluate_child(child, 0)
                if c_ev.get(metric) > limit or not fitness.meets_constraints(c_ev):
                    continue
                rank = _score(saving, c_ev.get(metric) - ev.get(metric))
                if best is None or rank > best[0]:
                    best = (rank, child, c_ev, c_cost)
            if best is None:
                break
            _, current, ev, cost = best
            evaluator.evaluate_child(current, 0)
            evaluator.accept(current, 0)
            trajectory.append(Candidate(current, ev, cost, limit))
            bar.update(1)
            bar.set_postfix({figure: cost[figure], metric: f"{ev.get(metric):.4g}"})
    return trajectory
