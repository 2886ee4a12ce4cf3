"""Whole-network training steps: approximate layers against the same float network (same run).

What a user retraining on the CPU waits for: one SGD step (forward, loss, backward, update)
of a network built by name (``lenet5`` on 1x28x28 images, ``resnet20`` on 3x32x32), float
and with every Conv2d/Linear approximate through the benchmark LUTs of ``bench_nn.py``
(``rank1``: the exact product; ``rank7``: 8 low columns truncated; ``gather``: a random
error table), ``ste`` gradients by default. The networks run **interleaved** (one step of
each per round, seeded random order, after two warm-up steps) and each cell is the
**median** of N rounds; the ratio divides by the float network's median. Minor page faults
per step (``getrusage``, the whole process) are printed beside: glibc's default malloc
returns freed tensors to the kernel and every later step faults them back in
(``appmult.heap``; run once with ``APPMULT_NO_MALLOPT=1`` to see the defaults).

Run: ``.venv/bin/python benchmarks/bench_train_step.py [--models lenet5,resnet20]
[--luts rank1,gather] [--grad ste | --grads ste,lut2d] [--batch 128] [--reps 7] [--threads 2]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import time
import types

import torch
import torch.nn.functional as F

from appmult.heap import keep_freed_memory
from appmult.nn import ApproxConfig, approximate_
from appmult.train.models import build_model
from bench_nn import bench_luts, print_table, set_threads

#: Model name -> (input channels, image size).
INPUTS = {"lenet5": (1, 28), "mlp": (1, 28), "resnet8": (3, 32), "resnet20": (3, 32), "resnet18": (3, 32),
          "vgg19_bn": (3, 32)}


def make_step(name: str, lut, grad: str, batch: int, seed: int = 0, device: str = "cpu"):
    """A closure running one SGD step of ``name`` (float where ``lut`` is ``None``) on a fixed
    batch, on ``device``."""
    c, size = INPUTS[name]
    torch.manual_seed(seed)
    model = build_model(name, types.SimpleNamespace(in_channels=c, num_classes=10, input_size=size))
    if lut is not None:
        approximate_(model, ApproxConfig(lut, grad=grad, compute_missing_gradients=True))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, c, size, size).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(steps: dict, reps: int, seed: int = 0) -> tuple[dict, dict]:
    """Median seconds and minor page faults per step of each closure, interleaved (CUDA
    synchronized before and after each step)."""
    for step in steps.values():
        step()
        step()
    times = {k: [] for k in steps}
    faults = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            _sync()
            t0 = time.perf_counter()
            steps[k]()
            _sync()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(v) for k, v in faults.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--luts", default="rank1,gather")
    ap.add_argument("--grad", default="ste", choices=("ste", "lut1d", "lut2d"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the whole step runs there)")
    ap.add_argument("--grads", default=None,
                    help="comma-separated gradient modes, each LUT once per mode (overrides --grad), e.g. ste,lut2d")
    args = ap.parse_args()
    bad = [g for g in (args.grads or "").split(",") if args.grads and g not in ("ste", "lut1d", "lut2d")]
    if bad:
        ap.error(f"--grads: unknown gradient mode(s) {bad}; choose from ste, lut1d, lut2d")
    set_threads(args.threads)
    luts = bench_luts()
    load0 = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        steps = {"float": make_step(name, None, args.grad, args.batch, device=args.device)}
        grads = args.grads.split(",") if args.grads else [args.grad]
        for lname in args.luts.split(","):
            for grad in grads:
                key = lname if len(grads) == 1 else f"{lname} {grad}"
                steps[key] = make_step(name, luts[lname], grad, args.batch, device=args.device)
        med, flt = measure(steps, args.reps)
        rows += [(name, k, med[k], med[k] / med["float"], flt[k]) for k in steps]
    load1 = os.getloadavg()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"grad={args.grads or args.grad}, "
          f"median of {args.reps} interleaved rounds; malloc kept by appmult.heap: {keep_freed_memory()}")
    print_table(load0, load1, "model | layers | ms / step> | x float> | page faults / step>",
                [(name, k, f"{t * 1e3:.1f}", f"{r:.2f}", f"{f:.0f}") for name, k, t, r, f in rows])


if __name__ == "__main__":
    main()
