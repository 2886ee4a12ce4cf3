"""Control-variate correction (Zervakis et al.) at inference, no retraining: accuracy and hardware cost.

For each dataset (digits, MNIST-5k) and seed: LeNet-5 pretrained in FP32
(:func:`appmult.train.pretrain_fp32`, cached; the same recipe as
``experiments/retrain``), converted with 8x8 unsigned approximate multipliers
(asymmetric quantization, zero-point terms exact), calibrated, then evaluated

* exact-quantized (same quantization, exact products),
* approximate (the LUT),
* approximate + control variate, error model fitted uniformly over activation codes,
* approximate + control variate, fitted per layer under that layer's activation-code
  histogram (measured on calibration batches),

and the fraction of the approximate model's accuracy loss (vs exact-quantized) that the
correction recovers. All accuracies come from the float forward, which applies the same
integer correction as ``int_forward_corrected`` and the RTL MAC.

Hardware: Yosys gate netlists (``abc -g`` simple gates, ``stat -tech cmos`` transistor
estimate) of each multiplier and of an 8-lane MAC with and without the correction
hardware, so the correction's cost sits next to the multiplier's savings.

Writes ``results.json`` and ``results.md`` next to this script.

Usage::

    nice -n 10 .venv/bin/python experiments/control_variate/run.py            # everything
    .venv/bin/python experiments/control_variate/run.py --seeds 0 --datasets digits --no-hardware
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: 8x8 unsigned multipliers: the four aggressive ones of experiments/retrain, a milder
#: weight-side perforation (error exactly linear in the activation), and Mitchell.
SPECS = {
    "perf-r01": "perforated:width=8,signed=false,rows=[0,1]",
    "perf-r0123": "perforated:width=8,signed=false,rows=[0,1,2,3]",
    "trunc-c9": "truncated:width=8,signed=false,columns=9",
    "broken-h3v8": "broken_array:width=8,signed=false,hbl=3,vbl=8",
    "drum-k3": "drum:width=8,signed=false,k=3",
    "mitchell": "mitchell:width=8,signed=false",
}

#: FP32 pretraining per dataset (as experiments/retrain, so its cache can be shared).
DATASETS = {"digits": dict(pretrain_epochs=30, batch_size=32), "mnist5k": dict(pretrain_epochs=5, batch_size=64)}

FRAC_BITS = 8
CAL_BATCHES = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_luts(work: Path) -> dict:
    from appmult.flows import characterize
    from appmult.lut_gen.lutfile import load
    out = {}
    for name, spec in SPECS.items():
        path = work / "luts" / f"{name}.npz"
        if not path.exists():
            characterize(spec, gradients=(), progress=False, cost=False).save(path)
        out[name] = load(path)
    return out


def accuracy(model, loader) -> float:
    from appmult.train.training import evaluate
    return evaluate(model, loader).accuracy


def activation_histograms(model, loader, batches: int) -> dict:
    """Per approximate layer, counts of its quantized activation codes on ``batches`` batches."""
    import torch

    from appmult.nn import approximate_layers
    hists, hooks = {}, []
    for name, layer in approximate_layers(model):
        n = 1 << layer.act_quant.width
        hists[name] = torch.zeros(n, dtype=torch.float64)

        def hook(mod, inp, out, name=name, n=n):
            q = out[0].detach().to(torch.int64).flatten() - mod.qmin   # codes of an unsigned LUT
            hists[name] += torch.bincount(q, minlength=n).to(torch.float64)
        hooks.append(layer.act_quant.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.numpy() for k, v in hists.items()}


def run_one(ds: str, seed: int, luts: dict, work: Path) -> list[dict]:
    import copy

    from appmult.nn import ApproxConfig, approximate_, approximate_layers, calibrate, exact_multiplication
    from appmult.nn.correction import ControlVariate
    from appmult.train.data import make_loaders
    from appmult.train.training import pretrain_fp32

    p = DATASETS[ds]
    pre = pretrain_fp32("lenet5", ds, p["pretrain_epochs"], seed, out_dir=work / "pretrained",
                        batch_size=p["batch_size"], progress=False)
    loaders = make_loaders(ds, p["batch_size"], seed)
    fp32 = accuracy(pre.model, loaders.test)
    # The same calibration batches for every variant.
    cal = [b for _, b in zip(range(CAL_BATCHES), loaders.train)]
    rows = []
    for name, lut in luts.items():
        t0 = time.process_time()
        model = copy.deepcopy(pre.model)
        cfg = ApproxConfig(lut, correction="control_variate", correction_frac_bits=FRAC_BITS)
        approximate_(model, cfg)
        layers = dict(approximate_layers(model))
        fits = {n: l.correction for n, l in layers.items()}

        def evaluate_as(corrections: dict | None) -> float:
            # Each variant gets its own calibration: the activation ranges of later layers
            # depend on what earlier layers compute.
            for n, l in layers.items():
                l.correction = None if corrections is None else corrections[n]
            calibrate(model, cal)
            return accuracy(model, loaders.test)

        with exact_multiplication(model):
            exact_q = evaluate_as(None)
        approx = evaluate_as(None)
        cv = evaluate_as(fits)
        hists = activation_histograms(model, cal, CAL_BATCHES)
        cv_hist = evaluate_as({n: ControlVariate(lut, hists[n], frac_bits=FRAC_BITS) for n in layers})
        loss = exact_q - approx
        rec = (lambda acc: (acc - approx) / loss if loss > 0.005 else None)
        row = {"dataset": ds, "seed": seed, "multiplier": name, "spec": SPECS[name], "fp32": fp32,
               "exact_quantized": exact_q, "approx": approx, "cv": cv, "cv_hist": cv_hist,
               "recovered_cv": rec(cv), "recovered_cv_hist": rec(cv_hist),
               "mre": lut.metadata.get("metrics", {}).get("mre"), "cpu_s": time.process_time() - t0}
        log(f"{ds} s{seed} {name}: exact-q {exact_q:.4f} approx {approx:.4f} cv {cv:.4f} cv-hist {cv_hist:.4f}")
        rows.append(row)
    return rows


# -- hardware ----------------------------------------------------------------------------------

def _gate_figures(verilog: str, top: str) -> dict:
    from appmult.sim.netlist import ABC_GATES
    from appmult.sim.yosys import run_yosys
    script = "\n".join([
        "read_verilog -sv design.v", f"hierarchy -check -top {top}", f"synth -flatten -top {top}",
        f"abc -g {ABC_GATES}", "opt_clean -purge", "tee -q -o cmos.txt stat -tech cmos",
        "tee -q -o stat.json stat -json", ""])
    out = run_yosys(script, {"design.v": verilog}, ("cmos.txt", "stat.json"))
    transistors = None
    for line in out["cmos.txt"].decode().splitlines():
        if "Estimated number of transistors" in line:
            transistors = int(line.split(":")[1].strip().rstrip("+"))
    cells = json.loads(out["stat.json"].decode())["design"].get("num_cells_by_type", {})
    ffs = sum(int(v) for k, v in cells.items() if "DFF" in k.upper())
    return {"cells": sum(int(v) for v in cells.values()), "flip_flops": ffs, "transistors": transistors}


def hardware(lanes: int, acc_width: int) -> dict:
    """Multiplier gate counts (vs exact) and an ``lanes``-lane MAC with/without the correction."""
    from appmult.hdl import from_spec
    from appmult.hdl.export import export_verilog
    from appmult.hdl.mac import MacUnit

    specs = {"exact": "exact:width=8,signed=false", **SPECS}
    out = {"lanes": lanes, "acc_width": acc_width, "frac_bits": FRAC_BITS, "multipliers": {}, "mac": {}}
    for name, spec in specs.items():
        mult = from_spec(spec)
        out["multipliers"][name] = _gate_figures(export_verilog(mult, name="m"), "m")
        plain = MacUnit(from_spec(spec), lanes=lanes, acc_width=acc_width)
        corr = MacUnit(from_spec(spec), lanes=lanes, acc_width=acc_width, correction=True, alpha_frac_bits=FRAC_BITS)
        out["mac"][name] = {"plain": _gate_figures(export_verilog(plain, name="mac"), "mac"),
                            "corrected": _gate_figures(export_verilog(corr, name="mac"), "mac"),
                            "alpha_width": corr.alpha_width, "sum_width": corr.sum_width}
        log(f"hardware {name}: mult {out['multipliers'][name]['transistors']} T, MAC "
            f"{out['mac'][name]['plain']['transistors']} T, +CV {out['mac'][name]['corrected']['transistors']} T")
    return out


# -- tables ------------------------------------------------------------------------------------

def _ms(xs, scale=100.0) -> str:
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def tables(rows: list[dict], hw: dict | None) -> str:
    lines = ["## Accuracy (%; mean ± std over seeds) and share of the loss recovered", "",
             "| dataset | multiplier | MRE % | FP32 | exact-quantized | approximate | + CV (uniform fit) "
             "| + CV (histogram fit) | recovered, uniform | recovered, histogram | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["multiplier"]), []).append(r)
    for (ds, name), rs in groups.items():
        # Recovery of the mean accuracies (per-seed ratios are unstable when a loss is small).
        def rec(key):
            loss = statistics.fmean(r["exact_quantized"] - r["approx"] for r in rs)
            if loss <= 0.005:
                return "— (loss < 0.5 pp)"
            return f"{100 * statistics.fmean(r[key] - r['approx'] for r in rs) / loss:.0f} %"
        mre = rs[0]["mre"]
        lines.append(f"| {ds} | {name} | {'—' if mre is None else f'{100 * mre:.1f}'} | {_ms([r['fp32'] for r in rs])} "
                     f"| {_ms([r['exact_quantized'] for r in rs])} | {_ms([r['approx'] for r in rs])} "
                     f"| {_ms([r['cv'] for r in rs])} | {_ms([r['cv_hist'] for r in rs])} | {rec('cv')} "
                     f"| {rec('cv_hist')} | {len(rs)} |")
    if hw:
        ex_m = hw["multipliers"]["exact"]["transistors"]
        ex_mac = hw["mac"]["exact"]["plain"]["transistors"]
        lanes = hw["lanes"]
        lines += ["", f"## Hardware cost (Yosys `stat -tech cmos` transistors; {lanes}-lane MAC, "
                  f"{hw['acc_width']}-bit accumulator, alpha with F = {hw['frac_bits']})", "",
                  "| multiplier | multiplier T | saved per lane vs exact | MAC T | MAC + CV T | CV cost "
                  "| CV cost per lane | net saving per lane | MAC + CV vs exact MAC | break-even lanes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in hw["multipliers"].items():
            mac = hw["mac"][name]
            saved = ex_m - m["transistors"]
            cv = mac["corrected"]["transistors"] - mac["plain"]["transistors"]
            lines.append(f"| {name} | {m['transistors']} | {saved} ({100 * saved / ex_m:.0f} %) "
                         f"| {mac['plain']['transistors']} | {mac['corrected']['transistors']} | {cv} "
                         f"| {cv / lanes:.0f} | {saved - cv / lanes:.0f} "
                         f"| {100 * mac['corrected']['transistors'] / ex_mac:.0f} % "
                         f"| {'—' if saved <= 0 else -(-cv // saved)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--work", default="/tmp/appmult-retrain-exp",
                   help="LUTs and pretrained models (shared with experiments/retrain: same recipe)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lanes", type=int, default=8)
    p.add_argument("--acc-width", type=int, default=26, help="holds K <= 1024 products of 16 bits")
    p.add_argument("--no-hardware", action="store_true")
    p.add_argument("--tables-only", action="store_true", help="rewrite results.md from results.json")
    args = p.parse_args()
    if args.tables_only:
        res = json.loads((HERE / "results.json").read_text())
        (HERE / "results.md").write_text("# Control-variate correction: results\n\n" + tables(res["runs"], res["hardware"])
                                         + f"\nWall {res['wall_s']:.0f} s, CPU {res['cpu_s']:.0f} s "
                                           f"({res['threads']} thread).\n")
        return

    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    t0, c0 = time.time(), time.process_time()
    luts = make_luts(work)
    rows = []
    for ds in args.datasets:
        for seed in args.seeds:
            rows.extend(run_one(ds, seed, luts, work))
    hw = None if args.no_hardware else hardware(args.lanes, args.acc_width)
    result = {"specs": SPECS, "datasets": DATASETS, "frac_bits": FRAC_BITS, "calibration_batches": CAL_BATCHES,
              "seeds": args.seeds, "runs": rows, "hardware": hw,
              "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "threads": args.threads}
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results.md").write_text("# Control-variate correction: results\n\n" + tables(rows, hw)
                                     + f"\nWall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s "
                                       f"({args.threads} thread).\n")
    log(f"done in {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU")


if __name__ == "__main__":
    main()
