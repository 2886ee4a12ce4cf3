"""What a few microseconds of Python cost inside a training step: the same call hot and after a large pass.

A layer's step runs its Python (checks, the kernel choice, the calls around its numba
passes) right after a convolution, a GEMM or a backward that has streamed megabytes through
the caches. This script times one such call -- the one-node step's kernel decision for a
LeNet conv (`train_plan._takes_lowrank`: a probe-key look-up, pure Python) and its cheap
checks (`train_plan._tables`) -- in a tight loop and right after other work: a small torch
op, a 32 MB torch pass with 2 threads and with 1, a 32 MB numpy pass, a 0.5 ms sleep
(median of N each). The ratio says how much dearer each Python operation of a step is than
a micro-benchmark shows, and so why a step gains more from fewer operations than from
faster ones.
Run: ``.venv/bin/python benchmarks/bench_cold_calls.py [--reps 300]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from appmult.nn import ApproxConfig, approximate_
from appmult.nn import functional as FN
from appmult.nn import train_plan as TP
from bench_nn import bench_luts, print_table, set_threads


def lenet_conv_calls():
    """``{name: call}``: the step's kernel decision and checks for a LeNet conv 6->16 5x5 on
    a batch of 128 (after one training step, so the automatic choice has probed)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 16, 5))
    approximate_(model, ApproxConfig(bench_luts()["rank1"], grad="ste"))
    layer = model[0].train()
    x = torch.relu(torch.randn(128, 6, 14, 14)).requires_grad_(True)
    layer(x).sum().backward()
    w = layer.weight
    geom = (FN._pair(layer.stride), layer._padding(), FN._pair(layer.dilation), layer.groups)

    def takes_lowrank():
        return TP._takes_lowrank(layer.lut, x, lambda: FN._conv_key(x.shape, w.shape, (w.shape[0], 1, 1, 1), *geom,
                                                                    False, False))
    return {"_takes_lowrank": takes_lowrank, "_tables": lambda: TP._tables(layer, x, w, layer.bias, 4)}


def before_calls() -> dict:
    """``{what ran before: callable}``."""
    small, big, big_np = torch.empty(2000), torch.empty(8_000_000), np.empty(8_000_000, np.float32)

    def torch_pass(threads: int):
        def run():
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            big.add_(1.0)
            torch.set_num_threads(prev)
        return run
    return {"nothing (tight loop)": lambda: None,
            "a 2,000-element torch op": lambda: small.add_(1.0),
            "a 32 MB torch pass, 2 threads": torch_pass(2),
            "a 32 MB torch pass, 1 thread": torch_pass(1),
            "a 32 MB numpy pass": lambda: np.add(big_np, 1.0, out=big_np),
            "a 0.5 ms sleep": lambda: time.sleep(0.0005)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    set_threads(2)
    calls = lenet_conv_calls()
    load0 = os.getloadavg()
    rows = []
    for what, before in before_calls().items():
        cells = [what]
        for call in calls.values():
            times = []
            for _ in range(args.reps):
                before()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            cells.append(f"{statistics.median(times) * 1e6:.1f}")
        rows.append(tuple(cells))
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, median of {args.reps} calls each, us")
    print_table(load0, load1, "before the call | " + " | ".join(f"{name} us>" for name in calls), rows)


if __name__ == "__main__":
    main()
