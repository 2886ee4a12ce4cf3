"""CUDA check and timing of the approximate layers (one short run, at most ~5 minutes).

1. Bit-exactness: for each layer (ResNet-20 conv, LeNet conv, Linear 512->512), LUT kind
   (rank-1, rank-7, gather; see ``bench_nn.py``) and kernel (auto, each forced), the layer is
   calibrated on the CPU, copied to the GPU, and its integer accumulators (``int_forward``)
   and eval outputs must equal the CPU's bit for bit.
2. Timing: forward (eval) and forward+backward (train, grad ``ste`` and ``lut2d``) against
   the exact float32 torch layer on the GPU (TF32 off for it too, as in the approximate
   layers), interleaved, median of N rounds, CUDA-synchronized; the LUT-2D/STE ratio is the
   figure the literature reports for retraining (1.4-2.6x on GPU).

Exits with status 0 and a message when no CUDA device is present; with status 1 when any
exactness check fails. Run: ``python benchmarks/bench_cuda.py [--reps 15] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nn import bench_cases, bench_luts, step_fns  # noqa: E402

from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear  # noqa: E402
from appmult.nn import kernels as K  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()
    _sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="batch 32 instead of 128")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke-test the script itself
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device available (torch.cuda.is_available() is False); nothing to do.")
        return 0
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    batch = 32 if args.quick else 128
    luts = bench_luts()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (script smoke test)"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}, "
          f"batch={batch}, median of {args.reps}")
    failures = []
    rows = []
    for title, make, shape in bench_cases(batch).values():
        ref = make()
        x = torch.relu(torch.randn(shape))
        ref_gpu = copy.deepcopy(ref).to(dev)
        xd = x.to(dev)
        fwd, fwdbwd = step_fns(xd)

        def exact_fwd():
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                ref_gpu(xd)

        def exact_bwd():
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                fwdbwd(ref_gpu)

        fns = {("exact", "", "", "fwd"): exact_fwd, ("exact", "", "", "bwd"): exact_bwd}
        for lname, lut in luts.items():
            kernels = ["auto", "lowrank", "gather"] if lname != "gather" else ["auto", "gather"]
            for kern in kernels:
                for grad in ("ste", "lut2d"):
                    cls = ApproxConv2d if isinstance(ref, nn.Conv2d) else ApproxLinear
                    m = cls.from_float(ref, ApproxConfig(lut, kernel=kern, grad=grad, compute_missing_gradients=True))
                    m.eval()
                    m(x)
                    m.act_quant.observing = False
                    if grad == "ste":  # exactness once per LUT and kernel
                        acc_cpu = m.int_forward(x)
                        with torch.no_grad():
                            y_cpu = m(x)
                    md = m.to(dev)
                    if grad == "ste":
                        ok_acc = torch.equal(md.int_forward(xd).cpu(), acc_cpu)
                        with torch.no_grad():
                            ok_y = torch.equal(md(xd).cpu(), y_cpu)
                        status = "ok" if ok_acc and ok_y else f"MISMATCH (acc {ok_acc}, output {ok_y})"
                        print(f"exactness {title:<26} {lname:<7} {kern:<8}: {status}", flush=True)
                        if not (ok_acc and ok_y):
                            failures.append((title, lname, kern))

                    def f(m=md):
                        m.eval()
                        fwd(m)

                    def fb(m=md):
                        m.train()
                        fwdbwd(m)
                    if grad == "ste":
                        fns[(lname, kern, grad, "fwd")] = f
                    fns[(lname, kern, grad, "bwd")] = fb
        med = timed(fns, args.reps)
        t_ex, t_exb = med[("exact", "", "", "fwd")], med[("exact", "", "", "bwd")]
        rows.append((title, "exact fp32 torch", "-", t_ex, 1.0, t_exb, 1.0, None))
        for key, t in med.items():
            lname, kern, grad, what = key
            if lname == "exact" or what != "fwd":
                continue
            t_b, t_l2 = med[(lname, kern, "ste", "bwd")], med[(lname, kern, "lut2d", "bwd")]
            shown = kern
            if kern == "auto":
                mine = {c for k2, c in K.probe_choices().items()
                        if luts[lname].sha256 in k2 and k2[2] == tuple(ref.weight.shape) and "ste" in k2
                        and k2[-2].startswith(dev.type)}
                shown = "auto->" + "/".join(sorted(mine)) if mine else "auto"
            rows.append((title, lname, shown, t, t / t_ex, t_b, t_b / t_exb, t_l2 / t_b))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    hdr = "| layer | LUT | kernel | fwd ms | fwd x fp32 | fwd+bwd (ste) ms | fwd+bwd x fp32 | lut2d / ste fwd+bwd |"
    print(hdr)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for title, lname, kern, tf, rf, tb, rb, l2 in rows:
        l2s = "-" if l2 is None else f"{l2:.2f}"
        print(f"| {title} | {lname} | {kern} | {tf * 1e3:.3f} | {rf:.2f} | {tb * 1e3:.3f} | {rb:.2f} | {l2s} |")
    if failures:
        print(f"\n{len(failures)} exactness checks FAILED: {failures}")
        return 1
    print("\nall exactness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
