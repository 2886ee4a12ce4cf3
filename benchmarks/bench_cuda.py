"""CUDA check and timing of the approximate layers (one short run, at most ~5 minutes).

1. Bit-exactness: for each layer (ResNet-20 conv, LeNet conv, Linear 512->512), LUT kind
   (rank-1, rank-7, gather; see ``bench_nn.py``) and kernel (auto, each forced), the layer is
   calibrated on the CPU, copied to the GPU, and its integer accumulators (``int_forward``)
   and eval outputs must equal the CPU's bit for bit.
2. Timing: forward (eval) and forward+backward (train, grad ``ste`` and ``lut2d``) against
   the exact float32 torch layer on the GPU (TF32 off for it too, as in the approximate
   layers), interleaved, median of N rounds, CUDA-synchronized; the LUT-2D/STE ratio is the
   figure the literature reports for retraining (1.4-2.6x on GPU). The gather kernel runs
   twice: through the Triton programs (:mod:`appmult.nn.triton_gather`, where Triton is
   installed) and through the chunked torch ops they replace (``gather/torch``); the low-rank
   kernel also with cuDNN allowed in its float32 convolutions (``lowrank/cudnn``; off by
   default, since its Winograd/FFT algorithms may round: the exactness line says whether
   they did here).

Exits with status 0 and a message when no CUDA device is present; with status 1 when any
exactness check fails. Run: ``python benchmarks/bench_cuda.py [--reps 15] [--quick] [--out table.md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nn import bench_cases, bench_luts, step_fns  # noqa: E402

from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear  # noqa: E402
from appmult.nn import exact_conv as EC  # noqa: E402
from appmult.nn import kernels as K  # noqa: E402
from appmult.nn import triton_gather as TG  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _variant(name: str):
    """``kernel/torch``: the Triton gathers off; ``kernel/cudnn``: cuDNN allowed in the layers'
    float32 convolutions (off by default: its Winograd/FFT algorithms may round)."""
    prev = TG.ENABLED, EC.CUDNN
    TG.ENABLED = not name.endswith("/torch")
    EC.CUDNN = name.endswith("/cudnn")
    try:
        yield
    finally:
        TG.ENABLED, EC.CUDNN = prev


def _configure(fns: dict, ref, x, xd, lut, lname: str, kern: str, dev, fwd, fwdbwd) -> str:
    """Add the timed closures of one LUT and kernel (``kernel/variant``) to ``fns``; return
    the exactness of its eval forward on ``dev`` against the CPU ("ok" or what differs)."""
    status = "ok"
    for grad in ("ste", "lut2d"):
        cls = ApproxConv2d if isinstance(ref, nn.Conv2d) else ApproxLinear
        m = cls.from_float(ref, ApproxConfig(lut, kernel=kern.split("/")[0], grad=grad, compute_missing_gradients=True))
        m.eval()
        m(x)
        m.act_quant.observing = False
        if grad == "ste":  # exactness once per LUT and kernel
            acc_cpu = m.int_forward(x)
            with torch.no_grad():
                y_cpu = m(x)
        md = m.to(dev)
        if grad == "ste":
            with _variant(kern):
                ok_acc = torch.equal(md.int_forward(xd).cpu(), acc_cpu)
                with torch.no_grad():
                    ok_y = torch.equal(md(xd).cpu(), y_cpu)
            if not (ok_acc and ok_y):
                status = f"MISMATCH (acc {ok_acc}, output {ok_y})"

        def f(m=md):
            m.eval()
            with _variant(kern):
                fwd(m)

        def fb(m=md):
            m.train()
            with _variant(kern):
                fwdbwd(m)
        if grad == "ste":
            fns[(lname, kern, grad, "fwd")] = f
        fns[(lname, kern, grad, "bwd")] = fb
    return status


def _table(rows) -> list[str]:
    lines = ["| layer | LUT | kernel | fwd ms | fwd x fp32 | fwd+bwd (ste) ms | fwd+bwd x fp32 | lut2d / ste fwd+bwd |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for title, lname, kern, tf, rf, tb, rb, l2 in rows:
        l2s = "-" if l2 is None else f"{l2:.2f}"
        lines.append(f"| {title} | {lname} | {kern} | {tf * 1e3:.3f} | {rf:.2f} | {tb * 1e3:.3f} | {rb:.2f} | {l2s} |")
    return lines


def _write(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def timed(fns: dict, reps: int) -> dict:
    """Median seconds of each callable, interleaved; one that raises in its warm-up run is
    reported and dropped."""
    for key, fn in list(fns.items()):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"ERROR timing {key}: {exc!r}", flush=True)
            del fns[key]
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
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
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
          f"batch={batch}, median of {args.reps}; Triton gathers: {TG.usable(torch.zeros(1, device=dev))}")
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
            variants = ["gather/torch"] + (["lowrank/cudnn"] if lname != "gather" else [])
            for kern in kernels + variants:
                try:
                    ok = _configure(fns, ref, x, xd, lut, lname, kern, dev, fwd, fwdbwd)
                except Exception as exc:  # noqa: BLE001 - report and go on: one run on a lent GPU
                    print(f"ERROR {title} {lname} {kern}: {exc!r}", flush=True)
                    failures.append((title, lname, kern, repr(exc)))
                    continue
                print(f"exactness {title:<26} {lname:<7} {kern:<13}: {ok}", flush=True)
                if ok != "ok" and not kern.endswith("/cudnn"):  # cuDNN allowed is a finding, not a failure
                    failures.append((title, lname, kern, ok))
        med = timed(fns, args.reps)
        print(f"timed {title} ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
        t_ex, t_exb = med[("exact", "", "", "fwd")], med[("exact", "", "", "bwd")]
        layer_rows = [(title, "exact fp32 torch", "-", t_ex, 1.0, t_exb, 1.0, None)]
        for key, t in med.items():
            lname, kern, grad, what = key
            if lname == "exact" or what != "fwd":
                continue
            t_b = med.get((lname, kern, "ste", "bwd"), math.nan)
            t_l2 = med.get((lname, kern, "lut2d", "bwd"), math.nan)
            shown = kern
            if kern == "auto":
                mine = {c for k2, c in K.probe_choices().items()
                        if luts[lname].sha256 in k2 and k2[2] == tuple(ref.weight.shape) and "ste" in k2
                        and k2[-2].startswith(dev.type)}
                shown = "auto->" + "/".join(sorted(mine)) if mine else "auto"
            layer_rows.append((title, lname, shown, t, t / t_ex, t_b, t_b / t_exb, t_l2 / t_b))
        print("\n".join(_table(layer_rows)[2:]), flush=True)
        rows += layer_rows
        if args.out:
            _write(args.out, _table(rows))
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(_table(rows)))
    if failures:
        print(f"\n{len(failures)} exactness checks FAILED: {failures}")
        return 1
    print("\nall exactness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
