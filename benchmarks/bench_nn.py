"""Speed of the approximate layers against exact fp32 torch layers (same run, same machine).

Layers: a LeNet-size conv (128x6x14x14, 6->16, 5x5), a ResNet-20-size conv
(128x32x16x16, 32->32, 3x3, pad 1) and a linear layer (128x400 -> 120). LUTs (8x8,
built here with numpy so the benchmark needs no Yosys): a low-rank truncated multiplier
(unsigned, low partial-product columns dropped: exact integer rank 1 + columns) and a
high-rank one (exact product plus a random error table: no factorization, gather kernel).
Baseline: the naive PyTorch emulation (unfold, then one table look-up per product and a
sum), timed on a slice of the batch and scaled.

Run: ``.venv/bin/python benchmarks/bench_nn.py [--threads 2] [--reps 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear


def truncated_lut(width: int, columns: int) -> np.ndarray:
    """Unsigned array multiplier with partial-product columns ``< columns`` removed."""
    a = np.arange(1 << width)[:, None]
    b = np.arange(1 << width)[None, :]
    p = np.zeros((1 << width, 1 << width), np.int64)
    for i in range(width):
        for j in range(width):
            if i + j >= columns:
                p += (((a >> i) & 1) * ((b >> j) & 1)) << (i + j)
    return p


def random_lut(width: int, seed: int = 0) -> np.ndarray:
    """Exact unsigned product plus a random error table (full rank)."""
    v = np.arange(1 << width)
    rng = np.random.default_rng(seed)
    return np.outer(v, v) + rng.integers(-64, 65, size=(1 << width, 1 << width))


def timeit(fn, reps: int) -> float:
    """Best of ``reps`` runs: on a shared machine the minimum is the least disturbed run."""
    fn()  # warm-up (numba compile, allocator)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def naive_conv(x: torch.Tensor, conv: nn.Conv2d, lut: torch.Tensor) -> torch.Tensor:
    """Unfold + one gather per product, like a straightforward PyTorch emulator."""
    q = torch.clamp(torch.round(x * 16), 0, 255).long()
    w = torch.clamp(torch.round(conv.weight.detach() * 64 + 128), 0, 255).long().reshape(conv.out_channels, -1)
    cols = F.unfold(q.float(), conv.kernel_size, conv.dilation, conv.padding, conv.stride).long()
    prods = lut.reshape(-1)[cols[:, :, None, :] * 256 + w.t()[None, :, :, None]]  # (N, K, Co, L)
    return prods.sum(1)


def naive_linear(x: torch.Tensor, lin: nn.Linear, lut: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round(x * 16), 0, 255).long()
    w = torch.clamp(torch.round(lin.weight.detach() * 64 + 128), 0, 255).long()
    return lut.reshape(-1)[q[:, None, :] * 256 + w[None, :, :]].sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--columns", type=int, default=4, help="truncated columns of the low-rank LUT")
    ap.add_argument("--quick", action="store_true", help="batch 32 instead of 128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = 32 if args.quick else 128

    luts = {
        f"trunc{args.columns}": LutFile(truncated_lut(8, args.columns), width_a=8, width_b=8, signed=False),
        "random": LutFile(random_lut(8), width_a=8, width_b=8, signed=False),
    }
    cases = {
        "lenet conv": (lambda: nn.Conv2d(6, 16, 5), (batch, 6, 14, 14)),
        "resnet20 conv": (lambda: nn.Conv2d(32, 32, 3, padding=1), (batch, 32, 16, 16)),
        "linear": (lambda: nn.Linear(400, 120), (batch, 400)),
    }
    rows = []
    for cname, (make, shape) in cases.items():
        ref = make()
        x = torch.rand(shape)
        xg = x.clone().requires_grad_(True)

        def fwd(m=ref):
            with torch.no_grad():
                m(x)

        def fwdbwd(m=ref):
            m.zero_grad(set_to_none=True)
            m(xg).sum().backward()

        t_ex = timeit(fwd, args.reps)
        t_exb = timeit(fwdbwd, args.reps)
        rows.append((cname, "exact fp32 torch", "-", t_ex, 1.0, t_exb, 1.0, None))
        for lname, lut in luts.items():
            cfg = ApproxConfig(lut)
            m = (ApproxConv2d if isinstance(ref, nn.Conv2d) else ApproxLinear).from_float(ref, cfg)
            m.eval()
            m(x)  # calibrate the activation observer once
            t_f = timeit(lambda: fwd(m), args.reps)
            m.train()
            t_b = timeit(lambda: fwdbwd(m), args.reps)
            kern = f"{m.lut.kernel.value} r={m.lut.rank}" if m.lut.rank else m.lut.kernel.value
            rows.append((cname, lname, kern, t_f, t_f / t_ex, t_b, t_b / t_exb, None))
        # Naive baseline on a slice of the batch, scaled to the full batch.
        sl = max(1, batch // 16)
        tlut = torch.from_numpy(luts["random"].product.copy())
        if isinstance(ref, nn.Conv2d):
            t_nv = timeit(lambda: naive_conv(x[:sl], ref, tlut), max(1, args.reps // 2)) * batch / sl
        else:
            t_nv = timeit(lambda: naive_linear(x[:sl], ref, tlut), max(1, args.reps // 2)) * batch / sl
        rows.append((cname, f"naive unfold+gather (x{batch // sl} scaled)", "-", t_nv, t_nv / t_ex, None, None, None))
        # speed-up of the gather kernel over the naive baseline
        gather_row = [r for r in rows if r[0] == cname and r[1] == "random"][0]
        rows[-1] = rows[-1][:7] + (t_nv / gather_row[3],)

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={batch}, grad=ste, "
          f"best of {args.reps}")
    hdr = f"{'layer':<14} {'multiplier':<34} {'kernel':<12} {'fwd ms':>8} {'x exact':>8} " \
          f"{'fwd+bwd ms':>11} {'x exact':>8} {'gather speed-up':>16}"
    print(hdr)
    print("-" * len(hdr))
    for cname, lname, kern, tf, rf, tb, rb, sp in rows:
        tb_s = f"{tb * 1e3:11.1f}" if tb is not None else f"{'-':>11}"
        rb_s = f"{rb:8.2f}" if rb is not None else f"{'-':>8}"
        sp_s = f"{sp:15.0f}x" if sp is not None else ""
        print(f"{cname:<14} {lname:<34} {kern:<12} {tf * 1e3:8.1f} {rf:8.2f} {tb_s} {rb_s} {sp_s}")


if __name__ == "__main__":
    main()
