"""Speed of the approximate layers against the exact fp32 torch layer (same run, same machine).

The table of the speed issue: three layers -- a ResNet-20 conv (128x32x16x16, 32->32,
3x3, pad 1), a LeNet conv (128x6x14x14, 6->16, 5x5) and a linear layer (128x512 ->
512) -- times three unsigned 8x8 LUTs built here with numpy (no Yosys needed):

* ``rank1``: the exact product through the LUT path (exact integer rank 1);
* ``drum4``: DRUM(4) (rank 1, but the activation factor is a look-up, not the value);
* ``rank7``: an array multiplier with the 8 low partial-product columns dropped (rank 7);
* ``gather``: the exact product plus a random error table (no factorization: gather only);

each with the automatic kernel choice (``auto``; the kernel it picked is shown) and every
kernel forced (``lowrank`` where the LUT factors, ``gather`` always); for the linear layer
also ``lowrank, fp32 GEMM``: the low-rank kernel with its exact int8 GEMM turned off (the
float32 GEMMs it used before, for a before/after in the same run). Inputs are post-ReLU
(``relu(randn)``), 2 threads by default, gradients ``ste``. ``fwd`` rows are eval forwards
with the activation observer frozen after one calibration call (weights unchanged, so the
layers' weight-side caches hit); ``fwd+bwd`` rows run in training mode (the switch between
the two modes is made untimed before each call).

Timing on a shared machine: all callables of one layer run **interleaved** (one run of
each per round in a seeded random order, after one warm-up round that also lets ``auto``
probe), and each cell is
the **median** of N rounds; ratios divide by the exact fp32 layer's median of the same
rounds (``best x``: the ratio of the best runs, the least disturbed, for a heavily loaded
machine). The load average is printed before and after.

Run: ``.venv/bin/python benchmarks/bench_nn.py [--threads 2] [--reps 7] [--quick]
[--layers resnet20,lenet,linear] [--clock wall|cpu]``. On a heavily loaded machine wall
times of long calls are inflated by waiting for a core far more than those of short calls,
which biases every ratio; ``--threads 1 --clock cpu`` (process CPU time, one thread, so no
thread spins) measures the work itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

import numpy as np
import torch
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import functional as FN
from appmult.nn import kernels as K


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


def drum_lut(width: int, k: int = 4) -> np.ndarray:
    """Unsigned DRUM(k): each operand cut to the k bits from its leading one, the lowest of
    them set (unbiased); rank 1 with a looked-up activation factor (no fold of the cross terms)."""
    def approx(a: int) -> int:
        if a < (1 << k):
            return a
        t = a.bit_length() - k
        return ((a >> t) | 1) << t
    d = np.array([approx(a) for a in range(1 << width)], np.int64)
    return np.outer(d, d)


def random_lut(width: int, seed: int = 0) -> np.ndarray:
    """Exact unsigned product plus a random error table (full rank)."""
    v = np.arange(1 << width)
    rng = np.random.default_rng(seed)
    return np.outer(v, v) + rng.integers(-64, 65, size=(1 << width, 1 << width))


#: Minor page faults and calls over every :func:`interleaved` timed loop of the process (the
#: setups' included; the warm-up calls not).
TIMED_FAULTS = {"faults": 0, "calls": 0}


def interleaved(fns: dict, reps: int, clock=time.perf_counter, seed: int = 0) -> tuple[dict, dict]:
    """Median and best of ``reps`` runs of each callable, the callables interleaved in every round.

    On a shared machine a disturbance then hits baseline and candidate alike; the median
    is robust to the few rounds another process takes over, the best is the least
    disturbed run (closer to the cost on an idle machine when the load is heavy). Each
    round runs the callables in a new (seeded) random order: in a fixed order a callable
    always follows the same one, and the first approximate layer after the float layer's
    backward measured 0.1-0.2 ms slower, whichever layer it was.

    A value may be a pair ``(setup, fn)``: ``setup()`` runs untimed before each timed ``fn()``
    (a layer's ``eval()``/``train()`` switch, ~10 us, is not part of its forward).
    """
    pairs = {k: v if isinstance(v, tuple) else (None, v) for k, v in fns.items()}
    for setup, fn in pairs.values():
        if setup is not None:
            setup()
        fn()  # warm-up (numba compile, allocator, observers, the auto kernel's probe)
    times: dict = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    faults0 = minor_faults()
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            setup, fn = pairs[k]
            if setup is not None:
                setup()
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    if faults0 is not None:
        TIMED_FAULTS["faults"] += minor_faults() - faults0
        TIMED_FAULTS["calls"] += reps * len(fns)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def _picked(m: nn.Module) -> str:
    """The kernel an auto layer ran with (its probe's choice where the library records one)."""
    picked = getattr(m, "_bench_picked", None)
    if picked is None:
        choices = getattr(K, "probe_choices", None)
        if choices is not None:
            mine = [c for key, c in choices().items()
                    if m.lut.sha256 in key and key[2] == tuple(m.weight.shape) and key[-1] == torch.float32]
            picked = "/".join(sorted(set(mine))) if mine else None
    return picked or m.lut.kernel.value


def bench_luts() -> dict[str, LutFile]:
    """The benchmark's unsigned 8x8 LUTs: ``rank1`` (the exact product), ``drum4`` (DRUM(4):
    rank 1, looked-up factors), ``rank7`` (8 low columns truncated), ``gather`` (exact
    product + random error, no factorization)."""
    return {
        "rank1": LutFile(truncated_lut(8, 0), width_a=8, width_b=8, signed=False),
        "drum4": LutFile(drum_lut(8, 4), width_a=8, width_b=8, signed=False),
        "rank7": LutFile(truncated_lut(8, 8), width_a=8, width_b=8, signed=False),
        "gather": LutFile(random_lut(8), width_a=8, width_b=8, signed=False),
    }


def bench_cases(batch: int) -> dict[str, tuple]:
    """Short name -> (title, float layer factory, input shape) of the three benchmark layers."""
    return {
        "resnet20": ("ResNet-20 conv 32->32 3x3", lambda: nn.Conv2d(32, 32, 3, padding=1), (batch, 32, 16, 16)),
        "lenet": ("LeNet conv 6->16 5x5", lambda: nn.Conv2d(6, 16, 5), (batch, 6, 14, 14)),
        "linear": ("Linear 512->512", lambda: nn.Linear(512, 512), (batch, 512)),
    }


def step_fns(x: torch.Tensor):
    """``fwd(m)``: a no-grad forward of ``x``; ``fwdbwd(m)``: forward and backward of a copy
    of ``x`` that requires grad, gradients cleared first."""
    xg = x.clone().requires_grad_(True)

    def fwd(m):
        with torch.no_grad():
            m(x)

    def fwdbwd(m):
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).sum().backward()
    return fwd, fwdbwd


#: The row of a linear layer's low-rank kernel with the int8 GEMM turned off (float32 GEMMs).
FP32_GEMM = "lowrank, fp32 GEMM"


@contextlib.contextmanager
def int8_gemm(on: bool):
    """The int8-GEMM switch of the linear low-rank path (``functional._INT8_GEMM``), set for a block."""
    prev = FN._INT8_GEMM
    FN._INT8_GEMM = on
    try:
        yield
    finally:
        FN._INT8_GEMM = prev


def print_table(load0, load1, header: str, rows: list[tuple]) -> None:
    """The load averages before and after a run, then a markdown table: ``header`` the
    column names (``|``-separated; a name ending in ``>`` is right-aligned), ``rows`` the
    cells already formatted."""
    print(f"load average before: {load0[0]:.2f}, after: {load1[0]:.2f} ({os.cpu_count()} CPUs)")
    names = [h.strip() for h in header.split("|")]
    print("| " + " | ".join(h.rstrip(">") for h in names) + " |")
    print("|" + "|".join("---:" if h.endswith(">") else "---" for h in names) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def minor_faults() -> int | None:
    """The process's minor page faults so far (``None`` where ``resource`` is missing). A run
    whose timed calls fault thousands of times each is in glibc's small-mmap-threshold state,
    where torch's own convolution takes up to twice as long (benchmarks/README.md, session 19)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def set_threads(n: int) -> None:
    """torch's and numba's thread counts (numba's capped at the number it was started with)."""
    torch.set_num_threads(n)
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="batch 32 instead of 128")
    ap.add_argument("--layers", default="resnet20,lenet,linear")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time (all threads) instead of wall time -- not inflated "
                         "by waiting for a core on a loaded machine; meant for --threads 1, where no "
                         "thread spins")
    args = ap.parse_args()
    set_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    batch = 32 if args.quick else 128

    luts = bench_luts()
    cases = bench_cases(batch)
    rows = []
    load0 = os.getloadavg()
    for cname in args.layers.split(","):
        title, make, shape = cases[cname]
        ref = make()
        x = torch.relu(torch.randn(shape))
        fwd, fwdbwd = step_fns(x)
        fns = {("exact", "", "fwd"): lambda: fwd(ref), ("exact", "", "bwd"): lambda: fwdbwd(ref)}
        mods = {}
        for lname, lut in luts.items():
            kernels = ["auto", "lowrank", "gather"] if lname != "gather" else ["auto", "gather"]
            if lname != "gather" and isinstance(ref, nn.Linear):
                kernels.append(FP32_GEMM)  # the low-rank kernel without the int8 GEMM: before/after
            for kern in kernels:
                cls = ApproxConv2d if isinstance(ref, nn.Conv2d) else ApproxLinear
                m = cls.from_float(ref, ApproxConfig(lut, kernel="lowrank" if kern == FP32_GEMM else kern))
                m.eval()
                int8 = kern != FP32_GEMM
                with int8_gemm(int8):
                    m(x)  # calibrate the activation observer once, then freeze it
                m.act_quant.observing = False
                mods[(lname, kern)] = m

                def f(m=m, int8=int8):
                    with int8_gemm(int8):
                        fwd(m)

                def fb(m=m, int8=int8):
                    with int8_gemm(int8):
                        fwdbwd(m)
                fns[(lname, kern, "fwd")] = (m.eval, f)
                fns[(lname, kern, "bwd")] = (m.train, fb)
        med, best = interleaved(fns, args.reps, clock)
        t_ex, t_exb = med[("exact", "", "fwd")], med[("exact", "", "bwd")]
        b_ex, b_exb = best[("exact", "", "fwd")], best[("exact", "", "bwd")]
        rows.append((title, "exact fp32 torch", "-", t_ex, 1.0, 1.0, t_exb, 1.0, 1.0))
        for (lname, kern), m in mods.items():
            t_f, t_b = med[(lname, kern, "fwd")], med[(lname, kern, "bwd")]
            b_f, b_b = best[(lname, kern, "fwd")], best[(lname, kern, "bwd")]
            shown = f"auto->{_picked(m)}" if kern == "auto" else kern
            rows.append((title, lname, shown, t_f, t_f / t_ex, b_f / b_ex, t_b, t_b / t_exb, b_b / b_exb))
    load1 = os.getloadavg()

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={batch}, grad=ste, "
          f"median of {args.reps} interleaved rounds, post-ReLU inputs, {args.clock} clock")
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} ({os.cpu_count()} CPUs)")
    if TIMED_FAULTS["calls"]:
        print(f"minor page faults in the timed rounds: {TIMED_FAULTS['faults'] / TIMED_FAULTS['calls']:.0f} per call "
              "(thousands: the allocator maps large buffers afresh every call, see benchmarks/README.md)")
    print("ms and 'x fp32' are medians (ratio of the medians); 'best x' is the ratio of the best runs")
    hdr = f"| {'layer':<26} | {'LUT':<6} | {'kernel':<21} | {'fwd ms':>8} | {'fwd x fp32':>10} | {'best x':>6} | " \
          f"{'fwd+bwd ms':>10} | {'fwd+bwd x fp32':>14} | {'best x':>6} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for title, lname, kern, tf, rf, bf, tb, rb, bb in rows:
        print(f"| {title:<26} | {lname:<6} | {kern:<21} | {tf * 1e3:8.2f} | {rf:10.2f} | {bf:6.2f} | "
              f"{tb * 1e3:10.2f} | {rb:14.2f} | {bb:6.2f} |")


if __name__ == "__main__":
    main()
