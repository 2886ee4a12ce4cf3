"""A training step's fixed cost: forward + backward of small linear layers against the float layer.

A layer of a small network (the MLP 784-128-64-10, LeNet-5's classifier) computes little,
so what a training step costs beyond its arithmetic -- the quantizing passes, the int8
GEMM's sides, the autograd node, the calls between them -- decides its ratio to the float
layer. Each row: ``nn.Linear`` and the same layer made approximate (``bench_nn``'s LUTs,
straight-through gradients, training mode: the observer updates), forward and backward of
a fixed post-ReLU batch that requires grad, gradients cleared first; the layers run
**interleaved** (``bench_nn.interleaved``: a seeded random order per round, after a
warm-up) and each cell is the **median** of N rounds.
Run: ``.venv/bin/python benchmarks/bench_small_steps.py [--shapes 16x16x4,128x64x64,512x512x128]
[--luts rank1,drum4] [--grad ste] [--reps 2000] [--threads 2]`` (a shape is ``in x out x batch``).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from appmult.nn import ApproxConfig, approximate_
from bench_nn import bench_luts, interleaved, print_table, set_threads, step_fns


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"16x16x4,128x64x64"`` -> ``[(16, 16, 4), (128, 64, 64)]`` (in, out, batch)."""
    out = []
    for part in text.split(","):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected IN x OUT x BATCH, e.g. 128x64x64")
        out.append(tuple(int(d) for d in dims))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes("16x16x4,128x64x64,512x512x128"))
    ap.add_argument("--luts", default="rank1,drum4")
    ap.add_argument("--grad", default="ste", choices=("ste", "lut1d", "lut2d"))
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    luts = bench_luts()
    unknown = [name for name in args.luts.split(",") if name not in luts]
    if unknown:
        ap.error(f"--luts: unknown {unknown}; choose from {', '.join(luts)}")
    set_threads(args.threads)
    load0 = os.getloadavg()
    rows = []
    for k, n, batch in args.shapes:
        torch.manual_seed(0)
        layers = {"float": nn.Sequential(nn.Linear(k, n))}
        for name in args.luts.split(","):
            layer = nn.Sequential(nn.Linear(k, n))
            layer.load_state_dict(layers["float"].state_dict())
            approximate_(layer, ApproxConfig(luts[name], grad=args.grad))
            layers[name] = layer.train()
        _, fwdbwd = step_fns(torch.relu(torch.randn(batch, k)))
        med, best = interleaved({name: (lambda m=m: fwdbwd(m)) for name, m in layers.items()}, args.reps)
        rows += [(f"{k}->{n}, batch {batch}", name, med[name], med[name] / med["float"], best[name])
                 for name in layers]
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, grad={args.grad}, "
          f"median of {args.reps} interleaved rounds")
    print_table(load0, load1, "layer | LUT | fwd+bwd us (median)> | x float> | best us>",
                [(shape, name, f"{t * 1e6:.0f}", f"{r:.2f}", f"{b * 1e6:.0f}") for shape, name, t, r, b in rows])


if __name__ == "__main__":
    main()
