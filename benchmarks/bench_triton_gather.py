"""The CUDA gathers alone: Triton programs (int32 table and int16 offsets) against the chunked
torch ops they replace, on the gather shapes of ``bench_nn.py``'s three layers.

For each layer (its unfolded activation indices ``a``, weight indices ``b``, an 8x8 LUT):
forward, activation gradient and weight gradient, each checked against the torch fallback
first (forward bit for bit, gradients to float32 rounding), then timed by
``triton.testing.do_bench`` (median, CUDA events). Look-ups per second count one table
read per multiply of the layer. Prints the autotuner's chosen tile per program.

Run on a GPU: ``python benchmarks/bench_triton_gather.py [--batch 128]``. Without CUDA,
``--quick`` runs tiny shapes under Triton's interpreter (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nn import random_lut  # noqa: E402

from appmult.nn import kernels as K  # noqa: E402
from appmult.nn import triton_gather as TG  # noqa: E402


def shapes(batch: int) -> dict[str, tuple[int, int, int, int]]:
    """Layer -> (N, K, L, outputs) of its gather: conv ``(N, C kh kw, Ho Wo)``, linear ``(1, K, M)``."""
    return {"ResNet-20 conv 32->32 3x3": (batch, 32 * 9, 16 * 16, 32),
            "LeNet conv 6->16 5x5": (batch, 6 * 25, 10 * 10, 16),
            "Linear 512->512": (1, 512, batch, 512)}


def bench(fn, device: str) -> float:
    """Median seconds of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="tiny shapes; without CUDA, under Triton's interpreter")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.quick:
            print("bench_triton_gather: no CUDA device; run with --quick for the interpreter smoke test.")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"
    torch.manual_seed(0)
    table = torch.as_tensor(random_lut(8)).to(torch.int32)  # bench_nn.py's "gather" LUT
    grad_table = torch.randn(table.shape)
    batch = 2 if args.quick else args.batch
    rows, failures = [], []
    for title, (n, k, length, nout) in shapes(batch).items():
        if args.quick:
            k, length, nout = min(k, 12), min(length, 20), min(nout, 8)
        a = torch.randint(0, table.shape[0], (n, k, length), dtype=torch.uint8, device=device)
        b = torch.randint(0, table.shape[1], (nout, k), dtype=torch.uint8, device=device)
        grad = torch.randn((n, nout, length), device=device)
        t, gt = table.to(device), grad_table.to(device)
        ref = K._torch_gather(a, b, t, 1, None, "fwd")
        ref_ga = K._torch_gather(a, b, gt, 1, grad, "ga")
        ref_gb = K._torch_gather(a, b, gt, 1, grad, "gb")
        cases = {}
        for t16 in (True, False):
            TG.TABLE16 = t16
            ok = torch.equal(TG.forward(a, b, t, 1), ref)
            cases[f"fwd triton {'int16' if t16 else 'int32'}"] = (lambda t16=t16: _with16(t16, a, b, t), ok)
        TG.TABLE16 = True
        cases["fwd torch"] = (lambda: K._torch_gather(a, b, t, 1, None, "fwd"), True)
        ok = torch.allclose(TG.grad_a(a, b, gt, grad, 1), ref_ga, rtol=1e-4, atol=1e-3)
        cases["grad_a triton"] = (lambda: TG.grad_a(a, b, gt, grad, 1), ok)
        cases["grad_a torch"] = (lambda: K._torch_gather(a, b, gt, 1, grad, "ga"), True)
        ok = torch.allclose(TG.grad_b(a, b, gt, grad, 1), ref_gb, rtol=1e-4, atol=1e-2)
        cases["grad_b triton"] = (lambda: TG.grad_b(a, b, gt, grad, 1), ok)
        cases["grad_b torch"] = (lambda: K._torch_gather(a, b, gt, 1, grad, "gb"), True)
        lookups = n * k * length * nout
        for name, (fn, ok) in cases.items():
            if not ok:
                failures.append((title, name))
            sec = bench(fn, device)
            rows.append((title, name, sec, lookups / sec, "ok" if ok else "MISMATCH"))
            print(f"{title:<26} {name:<18} {sec * 1e3:9.3f} ms  {lookups / sec / 1e9:7.2f} G look-ups/s  "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
    if device == "cuda":
        for name, prog in zip(("forward", "grad_a", "grad_b"), TG._programs(TG._fixed_tiles())):
            cache = getattr(prog, "cache", {})
            print(f"autotuned {name}: " + "; ".join(f"{key[:3]} -> {cfg}" for key, cfg in cache.items()))
    print("\n| layer | gather | ms | G look-ups/s | check |\n|---|---|---:|---:|---|")
    for title, name, sec, rate, ok in rows:
        print(f"| {title} | {name} | {sec * 1e3:.3f} | {rate / 1e9:.2f} | {ok} |")
    if failures:
        print(f"\nFAILED: {failures}")
        return 1
    return 0


def _with16(on: bool, a, b, t):
    prev = TG.TABLE16
    TG.TABLE16 = on
    try:
        return TG.forward(a, b, t, 1)
    finally:
        TG.TABLE16 = prev


if __name__ == "__main__":
    sys.exit(main())
