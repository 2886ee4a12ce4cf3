"""Automatic search for approximate multipliers: family sweeps and gate-level evolution.

* :func:`seed_genome`, :func:`genome_from_netlist`, :func:`genome_from_circuit` -- the
  search's circuit representation (:class:`Genome`) from a spec, a synthesized netlist,
  a user's Verilog or a stored circuit file.
* :class:`Evaluator` -- exhaustive bit-parallel error evaluation, incremental over the
  changed cone (operands up to 12 bits; wider: a seeded sample plus corners).
* :class:`ExploreConfig` -- error objective, cost figure, error bounds, constraints, budget.
* :func:`search` -- (1 + lambda) CGP/ALS search under a sweep of error bounds, with an
  archive of non-dominated circuits, checkpoints and resume.
* :func:`greedy_trajectory` -- greedy approximate logic synthesis (one constant or wire
  substitution at a time, the most cost saved per unit of error): a trajectory of
  circuits in seconds, and starts for the search (:func:`search_starts`).
* :func:`sweep_families` -- every registered family over a parameter grid (the baseline).
* :func:`write_outputs` -- found circuits as circuit files and Verilog (each a
  ``netlist:path=...`` multiplier), measured after re-synthesis; table and Pareto plot.

May import only the base modules, :mod:`appmult.hdl`, :mod:`appmult.sim` and
:mod:`appmult.lut_gen`; the network-aware mode lives in :mod:`appmult.flows.explore`.
"""

from ._kernels import COST_FIGURES, numba_available
from .config import DEFAULT_BOUNDS, ERROR_METRICS, ExploreConfig, parse_budget
from .evaluator import EXHAUSTIVE_MAX_WIDTH, Evaluation, Evaluator
from .genome import Genome, genome_from_circuit, genome_from_netlist, seed_genome
from .greedy import greedy_trajectory
from .report import ERROR_KEY, compare_fronts, comparison_range, family_bounds, measure, thin_front, write_outputs
from .search import Archive, Candidate, SearchResult, search
from .starts import search_starts
from .sweep import SweepPoint, family_front, family_grid, pareto, sweep_families

__all__ = [
    "COST_FIGURES",
    "DEFAULT_BOUNDS",
    "ERROR_KEY",
    "ERROR_METRICS",
    "EXHAUSTIVE_MAX_WIDTH",
    "Archive",
    "Candidate",
    "Evaluation",
    "Evaluator",
    "ExploreConfig",
    "Genome",
    "SearchResult",
    "SweepPoint",
    "compare_fronts",
    "comparison_range",
    "family_bounds",
    "family_front",
    "family_grid",
    "genome_from_circuit",
    "genome_from_netlist",
    "greedy_trajectory",
    "measure",
    "numba_available",
    "pareto",
    "parse_budget",
    "search",
    "search_starts",
    "seed_genome",
    "sweep_families",
    "thin_front",
    "write_outputs",
]
