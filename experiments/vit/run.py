"""ViT experiment: STE vs LUT-2D vs LUT-1D retraining of a small Vision Transformer.

The LUT-1D work reports its largest gain on vision transformers. This runs the
``appmult retrain`` workflow (:func:`appmult.flows.run_retrain`) on ``vit-tiny`` (patch
embedding, 2 encoder blocks of width 32 with 2 heads, 4x4 patch grid) with every
multiplication approximate: the patch embedding, the QKV and output projections, the
attention products QK^T and AV (both operands quantized per tensor, softmax in float) and
the MLP. Per dataset, multiplier and seed: FP32 pretraining (cached per seed), calibration,
exact-quantized and approximate accuracy before retraining, then retraining with STE,
LUT-2D and LUT-1D backward from the same start (same model, calibration and data order).

Writes ``results.json`` (every run) and ``results.md`` (means with 95% t-intervals over
seeds, and the per-seed paired differences to STE) next to this script. Runs resume
(``--work`` keeps the checkpoints, pretrained models and LUTs).

Usage::

    .venv/bin/python experiments/vit/run.py                        # the full experiment
    .venv/bin/python experiments/vit/run.py --seeds 0 --datasets digits   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import LOSS_HEADER, cached_retrain, log, loss_cells, make_luts, pct, summarize  # noqa: E402

#: Aggressive unsigned 8x8 multipliers (unsigned asymmetric quantization, zero-point terms exact).
SPECS = {
    "trunc-c8": "truncated:width=8,signed=false,columns=8",
    "drum-k3": "drum:width=8,signed=false,k=3",
    "broken-h4v8": "broken_array:width=8,signed=false,hbl=4,vbl=8",
}

#: Per dataset: FP32 pretraining epochs, retraining epochs, batch size. Digits only: MNIST-5k
#: (3.5x the training images per epoch) was cut for compute (README.md).
DATASETS = {
    "digits": dict(pretrain_epochs=60, epochs=8, batch_size=32),
}

GRADS = ("ste", "lut2d", "lut1d")

def aggregate(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["multiplier"]), []).append(r)
    acc = ["| dataset | multiplier | MRE % | FP32 | exact-quantized | approx, no retraining | STE | LUT-2D (H) "
           "| LUT-1D | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    diff = ["| dataset | multiplier | LUT-2D - STE (pp) | LUT-1D - STE (pp) | STE gap to exact-q (pp) "
            "| epoch s: exact-q / STE / LUT-2D / LUT-1D |", "|---|---|---|---|---|---|"]
    loss = [f"| dataset | multiplier | {LOSS_HEADER} |", "|---|---|---|---|---|---|---|---|"]
    for (dataset, name), rs in groups.items():
        s = [r["summary"] for r in rs]
        acc.append(f"| {dataset} | {name} | {100 * s[0]['mre']:.1f} | {pct([x['fp32'] for x in s])} "
                   f"| {pct([x['exact_quantized'] for x in s])} | {pct([x['approx_before'] for x in s])} "
                   f"| {pct([x['after']['ste'] for x in s])} | {pct([x['after']['lut2d'] for x in s])} "
                   f"({s[0]['half_window']['lut2d']}) | {pct([x['after']['lut1d'] for x in s])} | {len(s)} |")
        d2 = [x["after"]["lut2d"] - x["after"]["ste"] for x in s]
        d1 = [x["after"]["lut1d"] - x["after"]["ste"] for x in s]
        gap = [x["exact_quantized"] - x["after"]["ste"] for x in s]
        te = statistics.fmean(r["exact_quantized_epoch_s"] or 0.0 for r in rs)
        ep = " / ".join(f"{statistics.fmean(x['epoch_s'][g] for x in s):.2f}" for g in GRADS)
        diff.append(f"| {dataset} | {name} | {pct(d2)} | {pct(d1)} | {pct(gap)} | {te:.2f} / {ep} |")
        loss.append(f"| {dataset} | {name} | " + " | ".join(loss_cells(s, GRADS)) + " |")
    return ("## Accuracy (%), mean ± 95% CI half width over seeds\n\n" + "\n".join(acc)
            + "\n\n## Paired differences (same seed, same start), mean ± 95% CI half width; epoch times\n\n"
            + "\n".join(diff)
            + "\n\n## Training loss after the last epoch (paired differences: negative = lower than STE)\n\n"
            + "\n".join(loss) + "\n")

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/appmult-vit-exp", help="checkpoints, LUTs, pretrained models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--multipliers", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", default=str(HERE), help="where results.json / results.md go")
    args = p.parse_args(argv)

    from appmult.files import atomic_write_text
    from appmult.flows import RetrainConfig

    work = Path(args.work)
    t0 = time.perf_counter()
    luts = make_luts(work, SPECS, args.multipliers)
    runs = []
    for ds in args.datasets:
        for name in args.multipliers:
            for seed in args.seeds:
                t = time.perf_counter()
                cfg = RetrainConfig(lut=str(luts[name]), model="vit-tiny", dataset=ds, seed=seed, grads=GRADS,
                                    out=str(work / "runs" / ds / name / f"s{seed}"),
                                    pretrained_dir=str(work / "pretrained"), resume=True, progress=False,
                                    threads=args.threads, **DATASETS[ds])
                res = cached_retrain(cfg)
                s = summarize(res)
                runs.append({"dataset": ds, "multiplier": name, "seed": seed, "spec": SPECS[name], "summary": s,
                             "exact_quantized_epoch_s": res["timing"]["exact_quantized_epoch_s"],
                             "results": str(Path(cfg.out) / "results.json")})
                log(f"{ds} {name} s{seed}: fp32 {100 * s['fp32']:.1f}, exact-q {100 * s['exact_quantized']:.1f}, "
                    f"before {100 * s['approx_before']:.1f}, after " + ", ".join(
                        f"{m} {100 * v:.1f}" for m, v in s["after"].items()) + f" ({time.perf_counter() - t:.0f} s)")
                doc = {"format": "appmult.experiments.vit/1", "model": "vit-tiny", "datasets": DATASETS,
                       "multipliers": SPECS, "seeds": args.seeds, "threads": args.threads,
                       "elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "runs": runs}
                atomic_write_text(Path(args.out) / "results.json", json.dumps(doc, indent=1) + "\n")
                atomic_write_text(Path(args.out) / "results.md", aggregate(runs))
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
