"""Characterization timings: 8x8 end to end, 12x12 full LUT, 16x16 streamed metrics.

Run: ``.venv/bin/python benchmarks/bench_lut.py [--skip-16]``. Every case runs with a
warm Yosys cache (one untimed warm-up synthesis) and a cold LUT cache (a fresh
temporary directory), so the figures are synthesis-cache hit + exhaustive simulation +
metrics + cost + gradient tables, i.e. what a user sees the first time they
characterize an already-synthesized design.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import appmult.hdl
from appmult.lut_gen import characterization as charmod

try:  # the families beyond exact are registered by their modules
    import appmult.hdl.truncated  # noqa: F401
except ImportError:  # pragma: no cover
    pass

CASES = [
    ("8x8 characterize (LUT + metrics + cost + STE/LUT-2D/LUT-1D)", "truncated:width=8,columns=4", True, "<= 2 s"),
    ("12x12 characterize (full LUT, same)", "truncated:width=12,columns=8", True, "<= 30 s"),
    ("16x16 metrics only (4.3 G pairs, streamed)", "truncated:width=16,columns=12", False, "report"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-16", action="store_true", help="leave out the 16x16 case (minutes)")
    args = parser.parse_args()
    rows = []
    for label, spec, full, target in CASES:
        if args.skip_16 and not full:
            continue
        mult = appmult.hdl.from_spec(spec)
        appmult.sim.synthesize(mult)  # warm the Yosys cache (untimed)
        if full:
            appmult.sim.synthesize(appmult.hdl.ExactMultiplier(width=mult.width_a))
        with tempfile.TemporaryDirectory() as tmp:
            original = charmod.lut_cache_dir
            charmod.lut_cache_dir = lambda: Path(tmp)
            try:
                t0 = time.perf_counter()
                char = charmod.characterize(mult, progress=False, product=full, cost=full)
                cold = time.perf_counter() - t0
                t0 = time.perf_counter()
                charmod.characterize(mult, progress=False, product=full, cost=full)
                hit = time.perf_counter() - t0
            finally:
                charmod.lut_cache_dir = original
        rows.append((label, spec, f"{cold:.2f} s", f"{hit:.3f} s", target, f"{char.metrics['mre_pct']:.4g}"))
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    header = ("case", "spec", "cold LUT cache", "LUT cache hit", "target", "MRE %")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    import appmult.sim  # noqa: F401  (synthesize)
    main()
