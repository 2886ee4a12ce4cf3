"""Benchmark of appmult.tb: one exhaustive 8x8 verification (65,536 pairs) per simulator.

Run: ``python benchmarks/bench_verify.py`` (``--spec`` for another 8x8 design,
``--repeat N`` for best-of-N, ``--lanes`` to compare testbench widths). Reports, per
simulator, the build (compile) time, the run time (simulator start-up, cocotb and
Python start-up, the LUT load and the check) and, inside it, the drive/read loop alone.
Wall and CPU seconds of the tool processes are both shown: on a shared machine the CPU
figure is the stable one.
The LUT comes from the circuit (characterization, cached) and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from appmult.hdl import from_spec
from appmult.flows import circuit_lut
from appmult.tb import simulator_available, verify_multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", default="exact:width=8", help="8x8 design (default exact, unsigned)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    parser.add_argument("--lanes", type=int, nargs="+", default=[16, 1],
                        help="testbench lanes to time in Icarus (default 16 and 1)")
    args = parser.parse_args()
    mult = from_spec(args.spec)
    lut = circuit_lut(mult)
    cases = [("icarus", lanes) for lanes in args.lanes] + [("verilator", 16)]
    rows = []
    for sim, lanes in cases:
        if not simulator_available(sim):
            rows.append((f"{sim} (lanes={lanes})", "not installed", "", "", ""))
            continue
        best = None
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
                result = verify_multiplier(mult, lut, sim=sim, lanes=lanes, build_dir=tmp)
                loop = json.loads((Path(tmp) / "result.json").read_text())["sim_loop_s"]
            assert result.passed and result.pairs_checked == 1 << 16, result.report()
            total = result.build_s + result.run_s
            if best is None or total < best[0]:
                best = (total, result, loop)
        total, r, loop = best
        rows.append((f"{sim} (lanes={lanes})", f"{r.build_s:.2f} s ({r.build_cpu_s:.2f} s CPU)",
                     f"{r.run_s:.2f} s ({r.run_cpu_s:.2f} s CPU)", f"{loop:.2f} s", f"{total:.2f} s"))
    print(f"exhaustive 8x8 verification of {mult.spec}, 65,536 pairs, best of {args.repeat}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print()
    print("| simulator | build (wall, CPU) | run (wall, CPU) | of which drive/read loop | total wall |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
