"""Training-step cost of each gradient mode (ste, lut1d, lut2d) against the exact fp32 layer.

The three layers and LUTs of ``bench_nn.py`` (ResNet-20 conv, LeNet conv, Linear 512 -> 512;
``rank1`` = the exact product, ``gather`` = exact product + random error, no factorization),
forward + backward in training mode, post-ReLU inputs, 2 threads by default. The gradient
tables are computed from each LUT (``compute_missing_gradients``); a ``gather`` LUT's LUT-2D
tables are full rank, so its backward runs the LUT-2D gradient gathers, once by byte shuffles
(``lut2d``, :mod:`appmult.nn.float_shuffle`) and once by the scalar loops (``lut2d, scalar``:
the byte-shuffle gradient gathers switched off for that row only, untimed, before each call).

Then the two gradient gathers alone on each layer's shapes (``gather_grad_a``: the
activation side, ``gather_grad_b``: the weight side), byte shuffles vs scalar loops, in G
look-ups/s.

Timing as ``bench_nn.py``: every callable of a layer interleaved in a seeded random order
each round, medians of ``--reps`` rounds, ratios to the fp32 layer of the same rounds.

Run: ``.venv/bin/python benchmarks/bench_grad_modes.py [--threads 2] [--reps 7]
[--layers resnet20,lenet,linear]``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import kernels as K

from bench_nn import bench_cases, bench_luts, interleaved, set_threads, step_fns

#: The library's threshold, and one that keeps every product on the scalar loops.
_DEFAULT_MIN = K.FLOAT_SHUFFLE_MIN_LOOKUPS
_NEVER = 1 << 62


def shuffles(on: bool) -> None:
    """Turn the byte-shuffle gradient gathers on or off (for the next call)."""
    K.FLOAT_SHUFFLE_MIN_LOOKUPS = _DEFAULT_MIN if on else _NEVER


def layer_rows(cname: str, reps: int) -> list[tuple]:
    title, make, shape = bench_cases(128)[cname]
    ref = make()
    x = torch.relu(torch.randn(shape))
    _, fwdbwd = step_fns(x)
    fns = {"fp32": lambda: fwdbwd(ref)}
    luts = bench_luts()
    cls = ApproxConv2d if isinstance(ref, nn.Conv2d) else ApproxLinear
    for lname in ("rank1", "gather"):
        for grad in ("ste", "lut1d", "lut2d"):
            m = cls.from_float(ref, ApproxConfig(luts[lname], grad=grad, compute_missing_gradients=True))
            m.train()
            m(x)
            m.act_quant.observing = False
            kinds = [(grad, True)]
            if grad == "lut2d" and m.lut.grad_kernel is not None and m.lut.grad_kernel.value == "gather":
                kinds.append(("lut2d, scalar", False))
            for label, on in kinds:
                def setup(m=m, on=on):
                    m.train()
                    shuffles(on)
                fns[(lname, label, m.lut.grad_kernel.value if m.lut.grad_kernel else "-")] = \
                    (setup, lambda m=m: fwdbwd(m))
    med, _ = interleaved(fns, reps)
    shuffles(True)
    base = med["fp32"]
    rows = [(title, "exact fp32 torch", "-", "-", base * 1e3, 1.0)]
    for key, t in med.items():
        if key != "fp32":
            rows.append((title, key[0], key[1], key[2], t * 1e3, t / base))
    return rows


def kernel_rows(cname: str, reps: int) -> list[tuple]:
    """The two gradient gathers on the layer's (unfolded) shapes, random operands."""
    rng = np.random.default_rng(0)
    if cname == "resnet20":
        n, ktot, length, nout = 128, 32 * 9, 16 * 16, 32
    elif cname == "lenet":
        n, ktot, length, nout = 128, 6 * 25, 10 * 10, 16
    else:
        n, ktot, length, nout = 1, 512, 128, 512
    a = torch.from_numpy(rng.integers(0, 256, (n, ktot, length)).astype(np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, (nout, ktot)).astype(np.uint8))
    table = torch.from_numpy(rng.standard_normal((256, 256)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((n, nout, length)).astype(np.float32))
    fns = {}
    for which, fn in (("grad_a", K.gather_grad_a), ("grad_b", K.gather_grad_b)):
        for on in (True, False):
            fns[(which, on)] = (lambda on=on: shuffles(on), lambda fn=fn: fn(a, b, table, g, 1))
    med, _ = interleaved(fns, reps)
    shuffles(True)
    lookups = n * ktot * length * nout
    return [(cname, which, "byte shuffles" if on else "scalar loops", t * 1e3, lookups / t / 1e9)
            for (which, on), t in med.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", default="resnet20,lenet,linear")
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()
    rows, krows = [], []
    for cname in args.layers.split(","):
        rows += layer_rows(cname, args.reps)
        krows += kernel_rows(cname, args.reps)
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, threads={args.threads}, batch=128, fwd+bwd in training mode, median of "
          f"{args.reps} interleaved rounds; load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print("| layer | LUT | grad | grad kernel | fwd+bwd ms | x fp32 |")
    print("|---|---|---|---|---:|---:|")
    for title, lname, grad, gk, ms, ratio in rows:
        print(f"| {title} | {lname} | {grad} | {gk} | {ms:.2f} | {ratio:.2f} |")
    print()
    print("| layer shapes | gather | implementation | ms | G look-ups/s |")
    print("|---|---|---|---:|---:|")
    for cname, which, impl, ms, rate in krows:
        print(f"| {cname} | {which} | {impl} | {ms:.2f} | {rate:.2f} |")


if __name__ == "__main__":
    main()
