"""Benchmark of appmult.sim: netlist build (cold/warm cache), exhaustive evaluation, Amaranth simulator.

Run: ``python benchmarks/bench_sim.py`` (``--family-spec`` to time another design).
The cold build uses a fresh temporary cache directory, so it includes the Yosys runs
(but not YoWASP's one-off WebAssembly compilation, which happens on its very first use).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from appmult.hdl import ExactMultiplier, from_spec
from appmult.sim import simulate_amaranth, synthesize


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec8", default=None, help="8x8 design to time (default exact, unsigned)")
    parser.add_argument("--amaranth-vectors", type=int, default=2000)
    args = parser.parse_args()
    m8 = from_spec(args.spec8) if args.spec8 else ExactMultiplier(width=8)
    m12 = ExactMultiplier(width=12)
    rows = []

    old = os.environ.get("APPMULT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["APPMULT_CACHE"] = tmp
        try:
            for name, m in (("8x8", m8), ("12x12", m12)):
                t = time.perf_counter()
                synthesize(m)
                cold = time.perf_counter() - t
                warm = best_of(lambda: synthesize(m), 3)
                rows.append((f"netlist build {name}, cold cache", f"{cold * 1e3:9.1f} ms", ""))
                rows.append((f"netlist build {name}, warm cache", f"{warm * 1e3:9.1f} ms", ""))
        finally:
            if old is None:
                os.environ.pop("APPMULT_CACHE", None)
            else:
                os.environ["APPMULT_CACHE"] = old

    net8, net12 = synthesize(m8), synthesize(m12)
    t = time.perf_counter()
    net8.evaluator
    rows.append(("compile 8x8 evaluator", f"{(time.perf_counter() - t) * 1e3:9.1f} ms",
                 f"{net8.evaluator.n_gates} gates, {net8.evaluator.n_registers} buffers"))
    t = time.perf_counter()
    net12.evaluator
    rows.append(("compile 12x12 evaluator", f"{(time.perf_counter() - t) * 1e3:9.1f} ms",
                 f"{net12.evaluator.n_gates} gates, {net12.evaluator.n_registers} buffers"))

    t8 = best_of(net8.exhaustive, 20)
    rows.append(("exhaustive 8x8 (65,536 pairs)", f"{t8 * 1e3:9.2f} ms", f"{65536 / t8 / 1e6:8.1f} M vectors/s"))
    t12 = best_of(net12.exhaustive, 3)
    rows.append(("exhaustive 12x12 (16.8 M pairs)", f"{t12 * 1e3:9.1f} ms", f"{(1 << 24) / t12 / 1e6:8.1f} M vectors/s"))
    t12s = best_of(lambda: sum(1 for _ in net12.exhaustive_chunks()), 3)
    rows.append(("12x12 streamed (exhaustive_chunks)", f"{t12s * 1e3:9.1f} ms",
                 f"{(1 << 24) / t12s / 1e6:8.1f} M vectors/s"))

    rng = np.random.default_rng(0)
    n = args.amaranth_vectors
    a, b = rng.integers(0, 256, n), rng.integers(0, 256, n)
    te = best_of(lambda: net8.evaluate(a, b), 5)
    rows.append((f"evaluate 8x8, {n} random pairs", f"{te * 1e3:9.2f} ms", f"{n / te / 1e6:8.2f} M vectors/s"))
    t = time.perf_counter()
    sim = simulate_amaranth(m8, a, b)
    ta = time.perf_counter() - t
    assert (sim == net8.evaluate(a, b)).all(), "Amaranth simulator and netlist disagree"
    rows.append((f"Amaranth simulator 8x8, {n} pairs", f"{ta * 1e3:9.1f} ms", f"{n / ta / 1e3:8.1f} k vectors/s"))
    rows.append(("  bit-parallel exhaustive / Amaranth", "", f"{(65536 / t8) / (n / ta):8.0f} x vectors/s"))

    print(f"appmult.sim benchmark  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__})")
    print(f"8x8 design: {m8.spec}")
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>12}  {r[2]}")


if __name__ == "__main__":
    main()
