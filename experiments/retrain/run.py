"""Retraining experiment: STE vs LUT-2D vs LUT-1D (and simulated error) on aggressive multipliers.

For each dataset (digits, MNIST-5k), multiplier and seed this runs the ``appmult retrain``
workflow (:func:`appmult.flows.run_retrain`) with LeNet-5: FP32 pretraining (cached
per seed), calibration, exact-quantized and approximate accuracy before retraining, then
retraining with STE, LUT-2D and LUT-1D backward and with simulated error (Hammad et
al.), each from the same start. On digits it also repeats LUT-2D with the half window
chosen by short training trials (``half_window="auto"``) instead of the LUT file's
heuristic one. Writes ``results.json`` (every run's summary and the aggregates) and
``results.md`` (mean +- std over seeds) next to this script.

Usage::

    .venv/bin/python experiments/retrain/run.py                 # the full experiment
    .venv/bin/python experiments/retrain/run.py --seeds 0 --datasets digits   # a quick look

Runs resume: a restarted experiment continues where it stopped (``--work`` keeps the
checkpoints, the pretrained models and the LUTs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Multipliers chosen (by a screening on the pretrained models) because, without
#: retraining, they lose accuracy visibly; four families, 8x8 unsigned like the published
#: retraining recipe (asymmetric quantization, zero-point terms exact).
SPECS = {
    "trunc-c9": "truncated:width=8,signed=false,columns=9",
    "perf-r0123": "perforated:width=8,signed=false,rows=[0,1,2,3]",
    "drum-k3": "drum:width=8,signed=false,k=3",
    "broken-h3v8": "broken_array:width=8,signed=false,hbl=3,vbl=8",
}

#: Per dataset: FP32 pretraining epochs, retraining epochs, batch size (sized from the
#: measured epoch cost so that the whole experiment fits in about 25 minutes on 2 cores).
DATASETS = {
    "digits": dict(pretrain_epochs=30, epochs=5, batch_size=32),
    "mnist5k": dict(pretrain_epochs=5, epochs=2, batch_size=64),
}

MODES = ("ste", "lut2d", "lut1d", "simulated-error")
ALL_MODES = MODES + ("simulated-error-values",)


def cached_run(cfg):
    """``run_retrain(cfg)``, or the results a finished earlier run left in ``cfg.out``."""
    from appmult.flows import run_retrain
    done = Path(cfg.out) / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run_retrain(cfg)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_luts(work: Path, names: list[str]) -> dict[str, Path]:
    from appmult.flows import characterize
    out = {}
    for name in names:
        path = work / "luts" / f"{name}.npz"
        if not path.exists():
            characterize(SPECS[name], progress=False, cost=False).save(path)
        out[name] = path
    return out


def summarize(res: dict) -> dict:
    """The numbers of one run that the tables need."""
    modes = res["modes"]
    return {
        "fp32": res["fp32"]["accuracy"],
        "exact_quantized": res["start"]["exact_quantized_accuracy"],
        "approx_before": res["start"]["approx_accuracy"],
        "after": {m: modes[m]["approx_after"] for m in modes},
        "epoch_s": {m: modes[m]["epoch_time_s"] for m in modes},
        "exact_quantized_epoch_s": res["timing"]["exact_quantized_epoch_s"],
        "half_window": {m: modes[m]["half_window"] for m in modes},
        "mre": res["lut"]["metrics"]["mre"],
        "total_s": res["timing"]["total_s"],
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std([x * scale for x in xs])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(runs: list[dict], auto: list[dict]) -> tuple[dict, str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["multiplier"]), []).append(r)
    agg = {}
    lines = ["| dataset | multiplier | MRE % | FP32 | exact-quantized | approx, no retraining | STE | LUT-2D (H) "
             "| LUT-1D | simulated error (codes) | simulated error (values) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tlines = ["| dataset | multiplier | exact-quantized | STE | LUT-2D | LUT-1D | simulated error "
              "| LUT-2D / STE |", "|---|---|---|---|---|---|---|---|"]
    for (ds, name), rs in groups.items():
        s = [r["summary"] for r in rs]
        modes = [m for m in ALL_MODES if all(m in x["after"] for x in s)]
        row = {"fp32": mean_std([x["fp32"] for x in s]),
               "exact_quantized": mean_std([x["exact_quantized"] for x in s]),
               "approx_before": mean_std([x["approx_before"] for x in s]),
               "after": {m: mean_std([x["after"][m] for x in s]) for m in modes},
               "epoch_s": {m: mean_std([x["epoch_s"][m] for x in s]) for m in modes},
               "exact_quantized_epoch_s": mean_std([x["exact_quantized_epoch_s"] for x in s]),
               "seeds": [r["seed"] for r in rs], "spec": SPECS[name], "mre": s[0]["mre"]}
        agg[f"{ds}/{name}"] = row
        hw = s[0]["half_window"]["lut2d"]
        lines.append(
            f"| {ds} | {name} | {100 * s[0]['mre']:.1f} | {fmt([x['fp32'] for x in s])} "
            f"| {fmt([x['exact_quantized'] for x in s])} | {fmt([x['approx_before'] for x in s])} "
            + "".join(f"| {fmt([x['after'][m] for x in s]) if m in modes else '—'}"
                      + (f" ({hw})" if m == "lut2d" else "") + " " for m in ALL_MODES)
            + f"| {len(s)} |")
        t = {m: statistics.fmean(x["epoch_s"][m] for x in s) for m in MODES}
        te = statistics.fmean(x["exact_quantized_epoch_s"] for x in s)
        tlines.append(f"| {ds} | {name} | {te:.2f} | " + " | ".join(
            f"{t[m]:.2f} ({t[m] / te:.1f}x)" for m in MODES) + f" | {t['lut2d'] / t['ste']:.2f} |")
    alines = []
    if auto:
        alines = ["| dataset | multiplier | heuristic H | LUT-2D, heuristic H | trial-chosen H (per seed) "
                  "| LUT-2D, trial-chosen H |", "|---|---|---|---|---|---|"]
        by = {}
        for a in auto:
            by.setdefault((a["dataset"], a["multiplier"]), []).append(a)
        for (ds, name), rs in by.items():
            base = [r["summary"] for r in groups[(ds, name)]]
            alines.append(f"| {ds} | {name} | {base[0]['half_window']['lut2d']} "
                          f"| {fmt([x['after']['lut2d'] for x in base])} "
                          f"| {', '.join(str(r['chosen']) for r in rs)} | {fmt([r['after'] for r in rs])} |")
            agg[f"{ds}/{name}"]["lut2d_auto"] = {"chosen": [r["chosen"] for r in rs],
                                                 "after": mean_std([r["after"] for r in rs])}
    md = ("## Accuracy (%), mean ± std over seeds\n\n" + "\n".join(lines)
          + "\n\n## Epoch time (s, train + test pass), ratio to exact-quantized\n\n" + "\n".join(tlines) + "\n"
          + ("\n## LUT-2D half window: heuristic vs training trials (digits)\n\n" + "\n".join(alines) + "\n"
             if alines else ""))
    return agg, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/appmult-retrain-exp", help="checkpoints, LUTs, pretrained models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--multipliers", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--no-auto", action="store_true", help="skip the half-window trials on digits")
    p.add_argument("--no-sim-values", action="store_true",
                   help="skip simulated error on value products (noise_operands='values')")
    p.add_argument("--out", default=str(HERE), help="where results.json / results.md go")
    args = p.parse_args(argv)

    from appmult.files import atomic_write_text
    from appmult.flows import RetrainConfig

    work = Path(args.work)
    t0 = time.perf_counter()
    luts = make_luts(work, args.multipliers)
    log(f"LUTs ready ({time.perf_counter() - t0:.0f} s)")
    runs, auto = [], []
    for ds in args.datasets:
        dcfg = DATASETS[ds]
        for name in args.multipliers:
            for seed in args.seeds:
                t = time.perf_counter()
                cfg = RetrainConfig(lut=str(luts[name]), model="lenet5", dataset=ds, seed=seed,
                                    grads=("ste", "lut2d", "lut1d"), simulated_error=True,
                                    out=str(work / "runs" / ds / name / f"s{seed}"),
                                    pretrained_dir=str(work / "pretrained"), resume=True, progress=False,
                                    threads=args.threads, **dcfg)
                res = cached_run(cfg)
                s = summarize(res)
                if not args.no_sim_values:
                    # Simulated error on the zero-point-corrected products x*w (the paper's
                    # floating-point view) instead of the code products the multiplier sees.
                    vcfg = RetrainConfig(lut=str(luts[name]), model="lenet5", dataset=ds, seed=seed, grads=(),
                                         simulated_error=True, noise_operands="values",
                                         out=str(work / "runs" / ds / name / f"s{seed}-simvalues"),
                                         pretrained_dir=str(work / "pretrained"), resume=True, progress=False,
                                         threads=args.threads, time_exact=False, **dcfg)
                    vres = cached_run(vcfg)
                    s["after"]["simulated-error-values"] = vres["modes"]["simulated-error"]["approx_after"]
                    s["epoch_s"]["simulated-error-values"] = vres["modes"]["simulated-error"]["epoch_time_s"]
                runs.append({"dataset": ds, "multiplier": name, "seed": seed, "spec": SPECS[name],
                             "summary": s, "results": str(Path(cfg.out) / "results.json")})
                log(f"{ds} {name} s{seed}: exact-q {100 * s['exact_quantized']:.1f}, before "
                    f"{100 * s['approx_before']:.1f}, after " + ", ".join(
                        f"{m} {100 * v:.1f}" for m, v in s["after"].items())
                    + f" ({time.perf_counter() - t:.0f} s)")
                if ds == "digits" and not args.no_auto:
                    t = time.perf_counter()
                    acfg = RetrainConfig(lut=str(luts[name]), model="lenet5", dataset=ds, seed=seed,
                                         grads=("lut2d",), half_window="auto", trial_batches=15,
                                         out=str(work / "runs" / ds / name / f"s{seed}-auto"),
                                         pretrained_dir=str(work / "pretrained"), resume=True, progress=False,
                                         threads=args.threads, time_exact=False, **dcfg)
                    ares = cached_run(acfg)
                    info = ares["half_window_trials"]["lut2d"]
                    auto.append({"dataset": ds, "multiplier": name, "seed": seed, "chosen": info["chosen"],
                                 "trials": info["trials"], "after": ares["modes"]["lut2d"]["approx_after"]})
                    log(f"  auto H={info['chosen']}: LUT-2D {100 * auto[-1]['after']:.1f} "
                        f"({time.perf_counter() - t:.0f} s)")
                agg, md = aggregate(runs, auto)
                out = Path(args.out)
                doc = {"format": "appmult.experiments.retrain/1", "model": "lenet5", "datasets": DATASETS,
                       "multipliers": SPECS, "seeds": args.seeds, "threads": args.threads,
                       "elapsed_s": time.perf_counter() - t0, "aggregate": agg, "runs": runs,
                       "half_window_auto": auto}
                atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
                atomic_write_text(out / "results.md", md)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
