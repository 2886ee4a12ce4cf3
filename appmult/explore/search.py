"""Gate-level search: (1 + lambda) evolution of a seed circuit under a sweep of error bounds.

The method follows the Cartesian Genetic Programming runs behind EvoApproxLib (Mrazek,
Vasicek, Sekanina et al.): a seed netlist (the exact multiplier, a family member, a
user's circuit) is the first parent; each generation makes ``lam`` children by point
mutations of *active* genes; the best child replaces the parent when it is at least as
good (equal fitness is accepted, so the search drifts over neutral networks). A child
is feasible when its error is within the current bound and it meets every constraint;
feasible children are ranked by cost, infeasible ones by how far they violate. The
bounds are raised step by step, each step starting from the previous step's parent.

Mutations are CGP's (a gate's function, one of its connections, a product bit's
connection) and approximate-logic-synthesis moves (a connection or product bit tied to
a constant; a gate replaced by one of its inputs, i.e. its output wire substituted).

Every evaluated child that meets the constraints is offered to an archive of
non-dominated (cost, error) circuits: the Pareto front the search returns.

Reproducible: the same seed circuit, configuration and evaluation budget give the same
front, also when the run was interrupted and resumed from its checkpoint.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidValueError
from ..files import atomic_write_text
from . import _kernels as K
from .config import ExploreConfig
from .evaluator import Evaluation, Evaluator
from .genome import Genome

__all__ = ["Archive", "Candidate", "SearchResult", "search"]

CHECKPOINT_FORMAT = "appmult-explore-checkpoint"
CHECKPOINT_VERSION = 1

# Two-input functions a gate may mutate to (truth tables over x0, x1; x2 ignored).
_FUNCTIONS = np.array([0x88, 0xEE, 0x66, 0x77, 0x11, 0x99, 0x22, 0x44, 0xBB, 0xDD, 0xAA, 0xCC], dtype=np.uint8)
_P_CONSTANT = 0.25  # share of connection mutations that tie the input to a constant (ALS)
_P_REMOVE = 0.2     # share of gate mutations that replace the gate by one of its inputs (ALS)
_P_FUNCTION = 0.3   # share of gate mutations that change the function


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A circuit the search found, with the search's own figures.

    Attributes:
        genome: the circuit.
        evaluation: error figures from the search's evaluator.
        cost: the search's cost estimate (:data:`appmult.explore.COST_FIGURES`).
        bound: the error bound in force when it was found.
    """

    genome: Genome
    evaluation: Evaluation
    cost: dict[str, int]
    bound: float

    def to_state(self) -> dict[str, Any]:
        return {"genome": self.genome.to_state(), "evaluation": dataclasses.asdict(self.evaluation),
                "cost": self.cost, "bound": self.bound}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Candidate:
        return cls(Genome.from_state(state["genome"]), Evaluation(**state["evaluation"]), dict(state["cost"]),
                   float(state["bound"]))


class Archive:
    """Non-dominated (cost, error) circuits, kept sorted by cost (a staircase).

    A circuit enters when no member has both lower-or-equal cost and lower-or-equal
    error; members it dominates leave.
    """

    def __init__(self, entries: list[tuple[float, float, Candidate]] | None = None):
        self._costs: list[float] = []
        self._errors: list[float] = []
        self._items: list[Candidate] = []
        for c, e, cand in entries or []:
            self.offer(c, e, cand)

    def __len__(self) -> int:
        return len(self._items)

    def dominated(self, cost: float, error: float) -> bool:
        i = bisect.bisect_right(self._costs, cost)
        return i > 0 and self._errors[i - 1] <= error

    def offer(self, cost: float, error: float, candidate: Candidate | Callable[[], Candidate]) -> bool:
        """Add a circuit unless dominated (``candidate`` may be a factory, called only then)."""
        if self.dominated(cost, error):
            return False
        i = bisect.bisect_left(self._costs, cost)
        j = i
        while j < len(self._costs) and self._errors[j] >= error:
            j += 1
        item = candidate() if callable(candidate) else candidate
        self._costs[i:j] = [cost]
        self._errors[i:j] = [error]
        self._items[i:j] = [item]
        return True

    def entries(self) -> list[tuple[float, float, Candidate]]:
        return list(zip(self._costs, self._errors, self._items))

    def candidates(self) -> list[Candidate]:
        """Members by increasing cost (and decreasing error)."""
        return list(self._items)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        front: the non-dominated circuits, by increasing cost.
        bests: per error bound, the parent at the end of that bound's run.
        evaluations: candidate evaluations done (over all sessions of a resumed run).
        seconds: search time (over all sessions).
        exhaustive: every operand pair was evaluated (else a sample plus corners).
        config: the configuration.
    """

    front: list[Candidate]
    bests: list[Candidate]
    evaluations: int
    seconds: float
    exhaustive: bool
    config: ExploreConfig

    @property
    def throughput(self) -> float:
        """Candidate evaluations per second."""
        return self.evaluations / self.seconds if self.seconds > 0 else 0.0


def _identity(seed: Genome, config: ExploreConfig) -> str:
    payload = {"seed": seed.to_state(), "config": dataclasses.asdict(config), "version": CHECKPOINT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _Mutator:
    """Point mutations of active genes (see the module docstring)."""

    def __init__(self, config: ExploreConfig, rng: np.random.Generator):
        self.config = config
        self.rng = rng

    def children(self, parent: Genome, active_gates: np.ndarray, n: int) -> list[Genome]:
        return [self.mutate(parent, active_gates) for _ in range(n)]

    def mutate(self, parent: Genome, active_gates: np.ndarray) -> Genome:
        rng = self.rng
        child = parent.copy()
        n_in, wp = parent.n_in, parent.width_p
        n_active = active_gates.size
        for _ in range(int(rng.integers(1, self.config.max_mutations + 1))):
            pick = int(rng.integers(n_active + wp))
            if pick >= n_active:  # a product bit
                k = pick - n_active
                child.out[k] = 0 if rng.random() < 0.5 else int(rng.integers(child.n_nodes))
                continue
            g = int(active_gates[pick])
            node = n_in + g
            t = int(child.tt[g])
            inputs = [q for q in range(3) if K.tt_depends(t, q)] or [0]
            r = rng.random()
            if r < _P_REMOVE:
                q = inputs[int(rng.integers(len(inputs)))]
                child.tt[g] = (0xAA, 0xCC, 0xF0)[q]
            elif r < _P_REMOVE + _P_FUNCTION:
                child.tt[g] = _FUNCTIONS[int(rng.integers(_FUNCTIONS.size))]
                if t == K.MUX_TT:  # a multiplexer keeps its select wire; its data inputs stay x0, x1
                    child.src[g, 2] = 0
            else:
                q = inputs[int(rng.integers(len(inputs)))]
                if rng.random() < _P_CONSTANT:
                    child.src[g, q] = int(rng.integers(2))
                else:
                    child.src[g, q] = int(rng.integers(node))
        return child


def _active_gates(genome: Genome) -> np.ndarray:
    n = genome.n_nodes
    active = np.zeros(n, bool)
    K.plan(genome.tt, genome.src, genome.out, genome.n_in, np.zeros(n, bool), np.ones(n, bool), active,
           np.zeros(n, bool), np.zeros(n, bool))
    return np.flatnonzero(active[genome.n_in:]).astype(np.int64)


def search(seed: Genome, config: ExploreConfig, *, checkpoint: str | os.PathLike | None = None,
           resume: bool = False, progress: bool = True,
           on_generation: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Search for cheaper circuits derived from ``seed`` (see the module docstring).

    Args:
        seed: the first parent (e.g. :func:`genome_from_netlist` of the exact multiplier).
        config: objectives, bounds, constraints and budget.
        checkpoint: file to write the search state to (every ``config.checkpoint_every``
            generations, at the end of each bound, and when interrupted).
        resume: continue from ``checkpoint`` (which must exist and belong to the same
            seed and configuration).
        progress: show a progress bar.
        on_generation: called after every generation with a small dict (``bound``,
            ``generation``, ``evaluations``, ``parent_cost``, ``parent_error``); it may
            raise ``KeyboardInterrupt`` to stop the search (the checkpoint is written).

    Returns:
        The front and per-bound results.

    Raises:
        appmult.errors.InvalidValueError: ``resume`` without a checkpoint file, or a
            checkpoint of another search.
        KeyboardInterrupt: interrupted (the checkpoint, if any, holds the state).
    """
    config.check_widths(seed.width_a, seed.width_b)
    bounds = config.error_bounds
    identity = _identity(seed, config)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    evaluator = Evaluator(seed.width_a, seed.width_b, seed.signed, p_a=config.p_a, p_b=config.p_b,
                          unpack=config.needs_unpack, samples=config.samples, seed=config.seed, lam=config.lam)
    rng = np.random.default_rng(config.seed)
    state: dict[str, Any] = {"bound_index": 0, "evals_in_bound": 0, "elapsed_in_bound": 0.0, "evaluations": 0,
                             "elapsed": 0.0, "generation": 0, "parent": seed, "bests": [], "archive": []}
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise InvalidValueError(f"Cannot resume: no checkpoint file {str(ckpt)!r}")
        saved = json.loads(ckpt.read_text("utf-8"))
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("identity") != identity:
            raise InvalidValueError(f"Checkpoint {str(ckpt)!r} belongs to another search (different seed circuit "
                                    "or configuration); start afresh without --resume")
        rng.bit_generator.state = saved["rng"]
        state.update({k: saved[k] for k in ("bound_index", "evals_in_bound", "elapsed_in_bound", "evaluations",
                                            "elapsed", "generation")})
        state["parent"] = Genome.from_state(saved["parent"])
        state["bests"] = [Candidate.from_state(c) for c in saved["bests"]]
        state["archive"] = [(c, e, Candidate.from_state(s)) for c, e, s in saved["archive"]]
    archive = Archive(state["archive"])
    mutator = _Mutator(config, rng)

    def save(snap: dict[str, Any]) -> None:
        if ckpt is None:
            return
        data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "identity": identity,
                "rng": snap["rng"], "parent": snap["parent"].to_state(),
                "bests": [c.to_state() for c in snap["bests"]],
                "archive": [[c, e, cand.to_state()] for c, e, cand in snap["archive"]],
                **{k: snap[k] for k in ("bound_index", "evals_in_bound", "elapsed_in_bound", "evaluations",
                                        "elapsed", "generation")}}
        atomic_write_text(ckpt, json.dumps(data))

    def snapshot() -> dict[str, Any]:
        return {**state, "rng": rng.bit_generator.state, "archive": archive.entries(), "bests": list(state["bests"])}

    constraints = config.constraints

    def fitness(ev: Evaluation, cost: dict[str, int], bound: float) -> tuple[int, float]:
        violation = 0.0
        for metric, limit in constraints:
            violation += max(0.0, ev.get(metric) - limit) / (limit or 1.0)
        violation += max(0.0, ev.get(config.error) - bound) / (bound or 1.0)
        return (0, float(cost[config.cost])) if violation == 0.0 else (1, violation)

    def meets_constraints(ev: Evaluation) -> bool:
        return all(ev.get(m) <= limit for m, limit in constraints)

    n_bounds = len(bounds)
    per_bound_evals = None if config.evaluations is None else max(config.lam, config.evaluations // n_bounds)
    per_bound_s = None if config.budget_s is None else config.budget_s / n_bounds
    from tqdm.auto import tqdm
    bar = tqdm(total=config.evaluations if config.evaluations else round(config.budget_s),
               initial=state["evaluations"] if config.evaluations else round(state["elapsed"]),
               unit="eval" if config.evaluations else "s", desc="explore", disable=not progress, leave=False)
    snap = snapshot()
    try:
        while state["bound_index"] < n_bounds:
            bound = bounds[state["bound_index"]]
            parent: Genome = state["parent"]
            ev = evaluator.set_parent(parent)
            cost = parent.cost()
            parent_fit = fitness(ev, cost, bound)
            active = _active_gates(parent)
            started = time.perf_counter() - state["elapsed_in_bound"]
            session_start = time.perf_counter() - state["elapsed"]
            while True:
                if per_bound_evals is not None and state["evals_in_bound"] >= per_bound_evals:
                    break
                if per_bound_s is not None and time.perf_counter() - started >= per_bound_s:
                    break
                children = mutator.children(parent, active, config.lam)
                results = []
                for slot, child in enumerate(children):
                    c_ev = evaluator.evaluate_child(child, slot)
                    c_cost = child.cost()
                    results.append((fitness(c_ev, c_cost, bound), c_ev, c_cost))
                best = min(range(len(children)), key=lambda i: results[i][0])
                for child, (fit, c_ev, c_cost) in zip(children, results):
                    if meets_constraints(c_ev):
                        archive.offer(float(c_cost[config.cost]), c_ev.get(config.error),
                                      lambda child=child, c_ev=c_ev, c_cost=c_cost: Candidate(child, c_ev, c_cost,
                                                                                              bound))
                if results[best][0] <= parent_fit:
                    evaluator.accept(children[best], best)
                    parent = children[best]
                    parent_fit, ev, cost = results[best]
                    active = _active_gates(parent)
                state["parent"] = parent
                state["generation"] += 1
                state["evals_in_bound"] += len(children)
                state["evaluations"] += len(children)
                now = time.perf_counter()
                state["elapsed_in_bound"] = now - started
                previous = state["elapsed"]
                state["elapsed"] = now - session_start
                bar.update(len(children) if config.evaluations else round(state["elapsed"]) - round(previous))
                snap = snapshot()
                if state["generation"] % config.checkpoint_every == 0:
                    save(snap)
                if on_generation is not None:
                    on_generation({"bound": bound, "generation": state["generation"],
                                   "evaluations": state["evaluations"], "parent_cost": cost[config.cost],
                                   "parent_error": ev.get(config.error)})
            if parent_fit[0] == 0:
                state["bests"].append(Candidate(parent, ev, cost, bound))
            state.update(bound_index=state["bound_index"] + 1, evals_in_bound=0, elapsed_in_bound=0.0)
            snap = snapshot()
            save(snap)
    except KeyboardInterrupt:
        save(snap)
        raise
    finally:
        bar.close()
    return SearchResult(front=archive.candidates(), bests=list(state["bests"]), evaluations=state["evaluations"],
                        seconds=state["elapsed"], exhaustive=evaluator.exhaustive, config=config)
