"""Heterogeneous multiplier assignment experiment (Trommer et al., ICCAD 2022) with LeNet-5.

For each dataset: pretrain FP32 (cached), train the noise surrogate, record operand
statistics on 8 training batches of the exact-quantized network, compare predicted
(global / population) with measured error std per layer and multiplier, assign, and
retrain the assignment and every homogeneous choice (STE). Writes results.json,
results.md and pareto-<dataset>.png here; work files go to --work.

    nice -n 10 .venv/bin/python experiments/assign/run.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from appmult.lut_gen.report import short_spec
from appmult.flows import AssignConfig, run_assign

HERE = Path(__file__).resolve().parent

CANDIDATES = [
    "truncated:width=8,signed=false,columns=4",
    "truncated:width=8,signed=false,columns=6",
    "truncated:width=8,signed=false,columns=8",
    "perforated:width=8,signed=false,rows=[0,1]",
    "perforated:width=8,signed=false,rows=[0,1,2]",
    "broken_array:width=8,signed=false,hbl=2,vbl=6",
    "drum:width=8,signed=false,k=5",
    "drum:width=8,signed=false,k=4",
    "mitchell:width=8,signed=false",
]

SETTINGS = {
    "digits": dict(pretrain_epochs=30, batch_size=32, surrogate_epochs=5, retrain_epochs=2),
    "mnist5k": dict(pretrain_epochs=5, batch_size=64, surrogate_epochs=2, retrain_epochs=1),
}


def markdown(all_results: dict) -> str:
    lines = []
    for ds, r in all_results.items():
        plan = r["plan"]
        lines += [f"## {ds}", "",
                  f"FP32 {100 * r['fp32_accuracy']:.2f}%, exact-quantized (8-bit, no retraining) "
                  f"{100 * r['exact_quantized_accuracy']:.2f}%; surrogate {r['surrogate_s']:.1f} s, "
                  f"whole run {r['wall_s']:.0f} s.", "",
                  "### Predicted vs measured error std (integer accumulator units)", "",
                  "| layer | K | multiplier | measured std | global | rel. err | population | rel. err "
                  "| measured mean | predicted bias K·mu |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v in r["validation"]:
            lines.append(f"| {v['layer']} | {v['fan_in']} | {short_spec(v['multiplier'])} | {v['measured_std']:.0f} "
                         f"| {v['global_sigma']:.0f} | {100 * v['global_rel_error']:+.1f}% "
                         f"| {v['population_sigma']:.0f} | {100 * v['population_rel_error']:+.1f}% "
                         f"| {v['measured_mean']:.0f} | {v['global_bias']:.0f} |")
        ge = [abs(v["global_rel_error"]) for v in r["validation"]]
        pe = [abs(v["population_rel_error"]) for v in r["validation"]]
        lines += ["", f"Mean |relative error|: global {100 * sum(ge) / len(ge):.1f}%, "
                      f"population {100 * sum(pe) / len(pe):.1f}% over {len(ge)} layer×multiplier pairs.", "",
                  "### Plan", "",
                  "| layer | ops/sample | learned sigma_l | exact std | tolerance | chosen | predicted sigma | cost |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in plan["layers"]:
            lines.append(f"| {row['layer']} | {row['ops']} | {row['sigma_l']:.3f} | {row['exact_std']:.0f} "
                         f"| {row['tolerance']:.0f} | {short_spec(row['chosen'])}{'' if row['fits'] else ' (none fits)'} "
                         f"| {row['predicted_sigma']:.0f} | {row['cost']:.3f} |")
        lines += ["", f"Total ops-weighted relative {plan['cost_figure']}: **{plan['total_relative_cost']:.3f}**", "",
                  "### Cost vs accuracy (test set; STE retraining)", "",
                  "| configuration | relative cost | accuracy before retraining | after |", "|---|---|---|---|"]
        for p in sorted(r["points"], key=lambda p: p["cost"]):
            lines.append(f"| {'**assignment**' if p['kind'] == 'heterogeneous' else short_spec(p['label'])} "
                         f"| {p['cost']:.3f} | {100 * p['accuracy_before']:.2f}% | {100 * p['accuracy']:.2f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--work", default="/tmp/appmult-assign-exp")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Datasets not run this time keep their earlier results (run one dataset at a time).
    previous = HERE / "results.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    started = time.perf_counter()
    for ds in args.datasets:
        cfg = AssignConfig(candidates=CANDIDATES, model="lenet5", dataset=ds, out=f"{args.work}/{ds}",
                           **SETTINGS[ds])
        r = run_assign(cfg)
        shutil.copyfile(Path(cfg.out) / "pareto.png", HERE / f"pareto-{ds}.png")
        shutil.copyfile(Path(cfg.out) / "plan.json", HERE / f"plan-{ds}.json")
        r.pop("surrogate_history", None)
        results[ds] = r
        (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (HERE / "results.md").write_text(markdown(results))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
