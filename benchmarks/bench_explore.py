"""Benchmark of appmult.explore: candidate evaluations per second on 8x8 (exhaustive).

Run: ``python benchmarks/bench_explore.py`` (``--evaluations N``, ``--signed``).

Measures, on the exact 8x8 multiplier's netlist (about 300 gates, 65,536 pairs):

* full exhaustive evaluation of one candidate from scratch (``Evaluator.evaluate``);
* incremental evaluation of mutated children (``evaluate_child``: only the changed cone);
* the whole search loop (mutation, evaluation, cost estimate, selection, archive), as
  ``search`` reports it, for the MAE objective (bit-sliced sums) and the MRE objective
  (per-vector unpacking);
* the greedy approximate-logic-synthesis walk (``greedy_trajectory``, MAE up to 2%):
  steps, candidate moves evaluated, seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from appmult.explore import (Evaluator, ExploreConfig, genome_from_netlist, greedy_trajectory, numba_available,
                             search)
from appmult.explore.search import _active_gates, _Mutator
from appmult.hdl import ExactMultiplier
from appmult.sim import synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluations", type=int, default=20000)
    parser.add_argument("--signed", action="store_true")
    args = parser.parse_args()
    genome = genome_from_netlist(synthesize(ExactMultiplier(width=8, signed=args.signed)))
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"numba={numba_available()}, 8x8 {'signed' if args.signed else 'unsigned'}, {genome.n_gates} gates")
    ev = Evaluator(8, 8, args.signed, unpack=False, lam=1)
    ev.evaluate(genome)  # compile
    n = 300
    t = time.perf_counter()
    for _ in range(n):
        ev.evaluate(genome)
    full = (time.perf_counter() - t) / n
    print(f"full exhaustive evaluation: {full * 1e3:.3f} ms  ({1 / full:,.0f} candidates/s)")

    mut = _Mutator(ExploreConfig(evaluations=1), np.random.default_rng(0))
    children = [mut.mutate(genome, _active_gates(genome)) for _ in range(2000)]
    ev.set_parent(genome)
    ev.evaluate_child(children[0])
    t = time.perf_counter()
    for child in children:
        ev.evaluate_child(child)
    inc = (time.perf_counter() - t) / len(children)
    print(f"incremental child evaluation: {inc * 1e3:.3f} ms  ({1 / inc:,.0f} candidates/s)")

    for error in ("mae", "mre"):
        cfg = ExploreConfig(error=error, evaluations=args.evaluations, seed=1)
        search(genome, ExploreConfig(error=error, evaluations=200, seed=1), progress=False)  # compile
        result = search(genome, cfg, progress=False)
        print(f"search loop, {error}: {result.evaluations} evaluations in {result.seconds:.2f} s "
              f"({result.throughput:,.0f} candidates/s), archive {len(result.front)}")

    walk_ev = Evaluator(8, 8, args.signed, unpack=False, lam=1)
    t = time.perf_counter()
    walk = greedy_trajectory(genome, ExploreConfig(bounds=(2.0,), evaluations=1), evaluator=walk_ev, progress=False)
    dt = time.perf_counter() - t
    print(f"greedy walk to MAE 2%: {len(walk)} steps, {walk_ev.evaluations:,} moves evaluated in {dt:.1f} s "
          f"({walk_ev.evaluations / dt:,.0f}/s), down to {walk[-1].cost['transistors']} transistors (estimate)")


if __name__ == "__main__":
    main()
