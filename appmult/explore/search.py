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
from collections.abc import Callable, Sequence
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

    def merged(self, candidates: Sequence[Candidate]) -> SearchResult:
        """This result with ``candidates`` (e.g. a greedy trajectory) offered to its front."""
        cost, error = self.config.cost, self.config.error
        archive = Archive([(float(c.cost[cost]), c.evaluation.get(error), c) for c in [*self.front, *candidates]])
        return dataclasses.replace(self, front=archive.candidates())


def _identity(seed: Genome, config: ExploreConfig, starts: tuple[Genome, ...] = ()) -> str:
    payload = {"seed": seed.to_state(), "config": dataclasses.asdict(config), "version": CHECKPOINT_VERSION}
    if starts:  # absent when there are none, so that older checkpoints still match
        payload["starts"] = [g.to_state() for g in starts]
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


_COUNTERS = ("bound_index", "evals_in_bound", "elapsed_in_bound", "evaluations", "elapsed", "generation")


class _Fitness:
    """Ranks circuits under a bound: feasible ones ``(0, cost)``, others ``(1, violation)``."""

    def __init__(self, config: ExploreConfig):
        self.config = config
        self.constraints = config.constraints

    def __call__(self, ev: Evaluation, cost: dict[str, int], bound: float) -> tuple[int, float]:
        violation = 0.0
        for metric, limit in self.constraints:
            violation += max(0.0, ev.get(metric) - limit) / (limit or 1.0)
        violation += max(0.0, ev.get(self.config.error) - bound) / (bound or 1.0)
        return (0, float(cost[self.config.cost])) if violation == 0.0 else (1, violation)

    def meets_constraints(self, ev: Evaluation) -> bool:
        return all(ev.get(m) <= limit for m, limit in self.constraints)


def read_checkpoint(path: str | os.PathLike | None) -> dict[str, Any]:
    """The JSON object of an explore checkpoint file, its format checked (not yet its
    identity or fields: :meth:`_Checkpoint.load`).

    Raises:
        appmult.errors.InvalidValueError: no such file, not JSON, or not a checkpoint.
    """
    ckpt = Path(path) if path is not None else None
    if ckpt is None or not ckpt.is_file():
        raise InvalidValueError(f"Cannot resume: no checkpoint file {str(ckpt)!r}")
    try:
        saved = json.loads(ckpt.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidValueError(f"Checkpoint {str(ckpt)!r} is not a readable checkpoint ({exc}); start afresh "
                                "with --overwrite") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise InvalidValueError(f"Checkpoint {str(ckpt)!r} is not an appmult explore checkpoint; start afresh "
                                "with --overwrite")
    return saved


class _Checkpoint:
    """The search state in a JSON file, tied to one seed circuit and configuration."""

    def __init__(self, path: str | os.PathLike | None, identity: str):
        self.path = Path(path) if path is not None else None
        self.identity = identity

    def load(self, state: dict[str, Any], rng: np.random.Generator) -> None:
        """Restore ``state`` and ``rng`` from the file."""
        ckpt = self.path
        saved = read_checkpoint(ckpt)
        if saved.get("identity") != self.identity:
            raise InvalidValueError(f"Checkpoint {str(ckpt)!r} belongs to another search (different seed circuit "
                                    "or configuration); start afresh without --resume")
        try:
            rng.bit_generator.state = saved["rng"]
            state.update({k: saved[k] for k in _COUNTERS})
            state["parent"] = Genome.from_state(saved["parent"])
            state["bests"] = [Candidate.from_state(c) for c in saved["bests"]]
            state["archive"] = [(c, e, Candidate.from_state(s)) for c, e, s in saved["archive"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidValueError(f"Checkpoint {str(ckpt)!r} is damaged ({type(exc).__name__}: {exc}); start "
                                    "afresh with --overwrite") from None

    def save(self, snap: dict[str, Any]) -> None:
        if self.path is None:
            return
        data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "identity": self.identity,
                "rng": snap["rng"], "parent": snap["parent"].to_state(),
                "bests": [c.to_state() for c in snap["bests"]],
                "archive": [[c, e, cand.to_state()] for c, e, cand in snap["archive"]],
                **{k: snap[k] for k in _COUNTERS}}
        atomic_write_text(self.path, json.dumps(data))


@dataclasses.dataclass
class _Parent:
    """The current parent with its figures under the current bound."""

    genome: Genome
    evaluation: Evaluation
    cost: dict[str, int]
    fit: tuple[int, float]
    active: np.ndarray


class _Run:
    """One search: state, evaluator, mutator, archive, checkpoint and progress bar."""

    def __init__(self, seed: Genome, config: ExploreConfig, starts: tuple[Genome, ...],
                 checkpoint: _Checkpoint, on_generation: Callable[[dict[str, Any]], None] | None):
        self.config = config
        self.checkpoint = checkpoint
        self.on_generation = on_generation
        self.evaluator = Evaluator(seed.width_a, seed.width_b, seed.signed, p_a=config.p_a, p_b=config.p_b,
                                   unpack=config.needs_unpack, samples=config.samples, seed=config.seed,
                                   lam=config.lam)
        self.rng = np.random.default_rng(config.seed)
        self.fitness = _Fitness(config)
        self.state: dict[str, Any] = {"bound_index": 0, "evals_in_bound": 0, "elapsed_in_bound": 0.0,
                                      "evaluations": 0, "elapsed": 0.0, "generation": 0, "parent": seed,
                                      "bests": [], "archive": []}
        self.starts = [(g, self.evaluator.evaluate(g), g.cost()) for g in starts]
        n_bounds = len(config.error_bounds)
        self.per_bound_evals = None if config.evaluations is None else max(config.lam,
                                                                            config.evaluations // n_bounds)
        self.per_bound_s = None if config.budget_s is None else config.budget_s / n_bounds

    def resume(self) -> None:
        self.checkpoint.load(self.state, self.rng)

    def snapshot(self) -> dict[str, Any]:
        return {**self.state, "rng": self.rng.bit_generator.state, "archive": self.archive.entries(),
                "bests": list(self.state["bests"])}

    def run(self, progress: bool) -> None:
        """All bounds from where the state stands; the checkpoint is written when interrupted."""
        from tqdm.auto import tqdm
        config, state = self.config, self.state
        self.archive = Archive(state["archive"])
        self.mutator = _Mutator(config, self.rng)
        self.bar = tqdm(total=config.evaluations if config.evaluations else round(config.budget_s),
                        initial=state["evaluations"] if config.evaluations else round(state["elapsed"]),
                        unit="eval" if config.evaluations else "s", desc="explore", disable=not progress,
                        leave=False)
        self.snap = self.snapshot()
        try:
            while state["bound_index"] < len(config.error_bounds):
                self._run_bound(config.error_bounds[state["bound_index"]])
        except KeyboardInterrupt:
            self.checkpoint.save(self.snap)
            raise
        finally:
            self.bar.close()

    def _first_parent(self, bound: float) -> _Parent:
        """The parent a bound starts from: the state's, or at a bound's start the fittest start circuit."""
        genome: Genome = self.state["parent"]
        if self.state["evals_in_bound"] == 0 and self.starts:
            ev, cost = self.evaluator.evaluate(genome), genome.cost()
            best = (self.fitness(ev, cost, bound), -1)
            for i, (g, g_ev, g_cost) in enumerate(self.starts):
                best = min(best, (self.fitness(g_ev, g_cost, bound), i))
            if best[1] >= 0:
                genome = self.starts[best[1]][0]
        ev = self.evaluator.set_parent(genome)
        cost = genome.cost()
        return _Parent(genome, ev, cost, self.fitness(ev, cost, bound), _active_gates(genome))

    def _run_bound(self, bound: float) -> None:
        state = self.state
        parent = self._first_parent(bound)
        started = time.perf_counter() - state["elapsed_in_bound"]
        session_start = time.perf_counter() - state["elapsed"]
        while True:
            if self.per_bound_evals is not None and state["evals_in_bound"] >= self.per_bound_evals:
                break
            if self.per_bound_s is not None and time.perf_counter() - started >= self.per_bound_s:
                break
            n_children = self._generation(parent, bound)
            self._count(parent, bound, n_children, started, session_start)
        if parent.fit[0] == 0:
            state["bests"].append(Candidate(parent.genome, parent.evaluation, parent.cost, bound))
        state.update(bound_index=state["bound_index"] + 1, evals_in_bound=0, elapsed_in_bound=0.0)
        self.snap = self.snapshot()
        self.checkpoint.save(self.snap)

    def _generation(self, parent: _Parent, bound: float) -> int:
        """Make and evaluate ``lam`` children, offer them to the archive, replace the parent (in place)."""
        config = self.config
        children = self.mutator.children(parent.genome, parent.active, config.lam)
        results = []
        for slot, child in enumerate(children):
            c_ev = self.evaluator.evaluate_child(child, slot)
            c_cost = child.cost()
            results.append((self.fitness(c_ev, c_cost, bound), c_ev, c_cost))
        best = min(range(len(children)), key=lambda i: results[i][0])
        for child, (_fit, c_ev, c_cost) in zip(children, results):
            if self.fitness.meets_constraints(c_ev):
                self.archive.offer(float(c_cost[config.cost]), c_ev.get(config.error),
                                   lambda child=child, c_ev=c_ev, c_cost=c_cost: Candidate(child, c_ev, c_cost,
                                                                                           bound))
        if results[best][0] <= parent.fit:
            self.evaluator.accept(children[best], best)
            parent.genome = children[best]
            parent.fit, parent.evaluation, parent.cost = results[best]
            parent.active = _active_gates(parent.genome)
        self.state["parent"] = parent.genome
        return len(children)

    def _count(self, parent: _Parent, bound: float, n_children: int, started: float, session_start: float) -> None:
        """Counters, progress bar, periodic checkpoint and the ``on_generation`` callback."""
        config, state = self.config, self.state
        state["generation"] += 1
        state["evals_in_bound"] += n_children
        state["evaluations"] += n_children
        now = time.perf_counter()
        state["elapsed_in_bound"] = now - started
        previous = state["elapsed"]
        state["elapsed"] = now - session_start
        self.bar.update(n_children if config.evaluations else round(state["elapsed"]) - round(previous))
        self.snap = self.snapshot()
        if state["generation"] % config.checkpoint_every == 0:
            self.checkpoint.save(self.snap)
        if self.on_generation is not None:
            self.on_generation({"bound": bound, "generation": state["generation"],
                                "evaluations": state["evaluations"], "parent_cost": parent.cost[config.cost],
                                "parent_error": parent.evaluation.get(config.error)})


def search(seed: Genome, config: ExploreConfig, *, starts: Sequence[Genome] = (),
           checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
           on_generation: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Search for cheaper circuits derived from ``seed`` (see the module docstring).

    Args:
        seed: the first parent (e.g. :func:`genome_from_netlist` of the exact multiplier).
        config: objectives, bounds, constraints and budget.
        starts: more circuits to start from (e.g. family members): at the start of each
            bound the parent becomes the fittest of the previous bound's parent and these
            (feasible first, then cheapest), so that each bound can begin near its error.
        checkpoint: file to write the search state to (every ``config.checkpoint_every``
            generations, at the end of each bound, and when interrupted).
        resume: continue from ``checkpoint`` (which must exist and belong to the same
            seed, start circuits and configuration).
        progress: show a progress bar.
        on_generation: called after every generation with a small dict (``bound``,
            ``generation``, ``evaluations``, ``parent_cost``, ``parent_error``); it may
            raise ``KeyboardInterrupt`` to stop the search (the checkpoint is written).

    Returns:
        The front and per-bound results.

    Raises:
        appmult.errors.InvalidValueError: ``resume`` without a checkpoint file, a
            checkpoint of another search, or a start circuit of other widths.
        KeyboardInterrupt: interrupted (the checkpoint, if any, holds the state).
    """
    config.check_widths(seed.width_a, seed.width_b)
    starts = tuple(starts)
    for g in starts:
        if (g.width_a, g.width_b, g.signed) != (seed.width_a, seed.width_b, seed.signed):
            raise InvalidValueError("Every start circuit must have the seed's widths and signedness")
    run = _Run(seed, config, starts, _Checkpoint(checkpoint, _identity(seed, config, starts)), on_generation)
    if resume:
        run.resume()
    run.run(progress)
    state = run.state
    return SearchResult(front=run.archive.candidates(), bests=list(state["bests"]),
                        evaluations=state["evaluations"], seconds=state["elapsed"],
                        exhaustive=run.evaluator.exhaustive, config=config)
