"""Where each error bound of the search may start: family-front members, a greedy trajectory."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidValueError
from .config import ExploreConfig
from .evaluator import Evaluator
from .genome import Genome
from .greedy import greedy_trajectory
from .search import Candidate
from .sweep import SweepPoint, family_front

__all__ = ["search_starts"]


def search_starts(seed: Genome, config: ExploreConfig, *, family: Sequence[SweepPoint] | None = None,
                  family_starts: bool = False, greedy: bool = False, evaluator: Evaluator | None = None,
                  progress: bool = True) -> tuple[tuple[Genome, ...], list[Candidate]]:
    """The start circuits for :func:`appmult.explore.search`, and the greedy trajectory.

    Args:
        seed: the search's seed circuit (where the greedy walk begins).
        config: the search configuration (objective, cost figure, constraints, bounds).
        family: the family sweep (needed for ``family_starts``).
        family_starts: start from the family front's members too.
        greedy: run :func:`greedy_trajectory` and start from its circuits too.
        evaluator: evaluator for the greedy walk (default: built from ``config``).
        progress: show a progress bar.

    Returns:
        ``(starts, trajectory)``: the start genomes (greedy ones first) and the greedy
        circuits (empty without ``greedy``), which belong in the reported front
        (:meth:`appmult.explore.SearchResult.merged`).

    Raises:
        appmult.errors.InvalidValueError: ``family_starts`` without a family sweep.
    """
    starts: list[Genome] = []
    trajectory: list[Candidate] = []
    if greedy:
        trajectory = greedy_trajectory(seed, config, evaluator=evaluator, progress=progress)
        starts += [c.genome for c in trajectory]
    if family_starts:
        if family is None:
            raise InvalidValueError("Family starts need the family sweep")
        starts += [p.genome for p in family_front(family, config.cost, config.error)]
    return tuple(starts), trajectory
