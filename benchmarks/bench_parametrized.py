"""Approximate layers with a parametrized weight against the same layer with a plain one.

A weight made by ``torch.nn.utils.parametrize`` (here ``weight_norm``) is computed from
other parameters at every read. The table gives, for the Linear 512->512 and LeNet conv
layers of ``bench_nn.py`` (batch 128, the exact product through the LUT path, low-rank
kernel, observer frozen after calibration, post-ReLU inputs), the no-grad eval forward and
the training forward+backward of the weight-normed layer as a ratio to the plain layer in
the same run (interleaved rounds, medians). The parametrization's own arithmetic is part
of the ratio (``weight_norm``: a norm and a multiply over the weight).

``python benchmarks/bench_parametrized.py [--reps 200] [--threads 2]``
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn.utils import parametrizations

from bench_nn import bench_luts, interleaved, set_threads, step_fns
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear

CASES = {
    "Linear 512->512": (lambda: nn.Linear(512, 512), (128, 512), ApproxLinear),
    "LeNet conv 6->16 5x5": (lambda: nn.Conv2d(6, 16, 5), (128, 6, 14, 14), ApproxConv2d),
}


def layer_pair(make, shape, cls, lut):
    """``(plain, weight-normed)`` approximate copies of one float layer, calibrated on a
    post-ReLU input and frozen, and that input."""
    ref = make()
    x = torch.relu(torch.randn(shape))
    plain = cls.from_float(ref, ApproxConfig(lut, kernel="lowrank"))
    normed = cls.from_float(ref, ApproxConfig(lut, kernel="lowrank"))
    parametrizations.weight_norm(normed, "weight")
    for m in (plain, normed):
        m.eval()
        with torch.no_grad():
            m(x)
        m.act_quant.observing = False
    return plain, normed, x


def timed_fns(plain, normed, x) -> dict:
    """``(layer, step) -> (mode switch, timed step)`` for :func:`bench_nn.interleaved`."""
    ev, tr = step_fns(x)
    return {(name, mode): (m.eval if mode == "eval" else m.train, (lambda m=m, f=f: f(m)))
            for name, m in (("plain", plain), ("normed", normed)) for mode, f in (("eval", ev), ("train", tr))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    lut = bench_luts()["rank1"]
    load0 = os.getloadavg()
    rows = []
    for title, (make, shape, cls) in CASES.items():
        med, _ = interleaved(timed_fns(*layer_pair(make, shape, cls, lut)), args.reps)
        for mode in ("eval", "train"):
            rows.append((title, mode, med[("plain", mode)], med[("normed", mode)]))
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, median of {args.reps} interleaved rounds; "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print("| layer | step | plain us | weight_norm us | x plain |")
    print("|---|---|---:|---:|---:|")
    for title, mode, tp, tn in rows:
        step = "eval forward (no grad)" if mode == "eval" else "training fwd+bwd"
        print(f"| {title} | {step} | {tp * 1e6:.0f} | {tn * 1e6:.0f} | {tn / tp:.2f} |")


if __name__ == "__main__":
    main()
