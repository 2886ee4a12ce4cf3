"""Speed of approximate attention (QK^T and AV through a LUT) against exact fp32 SDPA, same run.

One ViT-tiny-sized attention call -- batch 64, 2 heads, 17 tokens, head width 16 (the
``vit-tiny`` model on 8x8 digits) -- and a larger one (batch 32, 4 heads, 65 tokens, head
width 32), with three signed 8x8 LUTs built here with numpy (no Yosys): the exact product
(rank 1), a truncated array multiplier (low-rank) and the exact product plus a random
error table (gather kernel). ``fwd`` is a no-grad forward; ``fwd+bwd`` adds the backward
(STE and LUT-1D). Interleaved rounds, medians, load average printed before and after;
ratios divide by ``torch.nn.functional.scaled_dot_product_attention``'s median of the
same rounds.

Run: ``.venv/bin/python benchmarks/bench_attention.py [--threads 2] [--reps 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, LutAttention


def signed_values(w: int) -> np.ndarray:
    c = np.arange(1 << w)
    return np.where(c >= 1 << (w - 1), c - (1 << w), c)


def luts() -> dict[str, LutFile]:
    v = signed_values(8)
    ex = np.outer(v, v)
    trunc = (ex >> 6) << 6  # drop the 6 low bits of the exact product: low rank, signed
    rnd = ex + np.random.default_rng(0).integers(-50, 51, ex.shape)
    return {name: LutFile(t, width_a=8, width_b=8, signed=True, metadata={"spec": name})
            for name, t in (("exact", ex), ("trunc6", trunc), ("random", rnd))}


def median_times(fns: dict, reps: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for k, f in fns.items():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; threads {args.threads}")
    shapes = {"vit-tiny digits (64x2x17x16)": (64, 2, 17, 16), "larger (32x4x65x32)": (32, 4, 65, 32)}
    for label, shape in shapes.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        fns = {}

        def exact_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def exact_bwd():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        fns["fp32 sdpa fwd"], fns["fp32 sdpa fwd+bwd"] = exact_fwd, exact_bwd
        for name, lut in luts().items():
            for grad in ("ste", "lut1d", "lut2d"):
                att = LutAttention(ApproxConfig(lut, grad=grad, compute_missing_gradients=True, half_window=2))
                if grad == "ste":
                    def fwd(att=att):
                        with torch.no_grad():
                            att(q, k, v)
                    fns[f"{name} ({att.lut.kernel.value}) fwd"] = fwd

                def bwd(att=att):
                    att(q, k, v).sum().backward()
                fns[f"{name} ({att.lut.kernel.value}) fwd+bwd {grad}"] = bwd
        t = median_times(fns, args.reps)
        print(f"\n{label}")
        print(f"{'case':40s} {'median ms':>10s} {'x fp32':>8s}")
        for key, sec in t.items():
            base = t["fp32 sdpa fwd+bwd"] if "bwd" in key else t["fp32 sdpa fwd"]
            print(f"{key:40s} {sec * 1e3:10.2f} {sec / base:8.1f}")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
