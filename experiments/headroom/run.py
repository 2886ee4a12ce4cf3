"""Headroom experiment: where does the LUT gradient (LUT-2D, LUT-1D) beat STE retraining?

``experiments/retrain/`` found no gap to close: on LeNet-5 with per-channel weights, STE
retraining recovered the exact-quantized accuracy whatever the gradient. This experiment
looks for settings that leave STE a gap, on data that ships (digits, MNIST-5k), with the
published protocol's quantization (the ``date25`` recipe: unsigned asymmetric per-tensor
activations *and* weights, only convolutions through the multiplier, calibration over one
training epoch in train mode, Adam 1e-3 halved at 1/3 and 2/3 of the run), deeper models
(ResNet-8) and aggressive unsigned multipliers (8 truncated columns is the published worst
case). It has two phases:

1. ``--phase screen``: one seed, STE only, every (model, dataset, multiplier) candidate:
   the STE gap = exact-quantized accuracy - accuracy after STE retraining.
2. ``--phase main``: the settings named in :data:`MAIN` (chosen from the screen's gaps),
   ``--seeds`` seeds, STE vs LUT-2D vs LUT-1D from the same start (same pretrained model,
   same calibration, same data order), with the per-seed paired difference to STE and 95%
   t-intervals over seeds.

Writes ``screen.json``/``screen.md`` and ``results.json``/``results.md`` next to this
script. Runs resume (``--work`` keeps checkpoints, pretrained models and LUTs).

Usage::

    .venv/bin/python experiments/headroom/run.py --phase screen
    .venv/bin/python experiments/headroom/run.py --phase main --seeds 0 1 2
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

#: Aggressive unsigned 8x8 multipliers (MRE in the screen table).
SPECS = {
    "trunc-c8": "truncated:width=8,signed=false,columns=8",
    "trunc-c9": "truncated:width=8,signed=false,columns=9",
    "drum-k3": "drum:width=8,signed=false,k=3",
    "perf-r0123": "perforated:width=8,signed=false,rows=[0,1,2,3]",
    "broken-h4v8": "broken_array:width=8,signed=false,hbl=4,vbl=8",
}

#: Per (model, dataset): FP32 pretraining epochs, retraining epochs, batch size. Sized from
#: epochs measured first (see README.md) so that the screen and the main phase together
#: stay within about an hour of one core.
SCALE = {
    ("lenet5", "digits"): dict(pretrain_epochs=30, epochs=6, batch_size=32),
    ("lenet5", "mnist5k"): dict(pretrain_epochs=6, epochs=6, batch_size=64),
    ("resnet8", "digits"): dict(pretrain_epochs=20, epochs=6, batch_size=32),
    ("resnet8", "mnist5k"): dict(pretrain_epochs=4, epochs=3, batch_size=64),
}

#: The screen: every model x dataset x multiplier above.
SCREEN = [(m, d, s) for (m, d) in SCALE for s in SPECS]

#: The main phase: (model, dataset, multiplier) triples picked from the screen (largest
#: STE gaps; see README.md for the screen table this choice was made from).
MAIN: list[tuple[str, str, str]] = [
    ("resnet8", "mnist5k", "trunc-c9"),   # screen: STE 30.1% against 92.9% exact-quantized
    ("resnet8", "digits", "drum-k3"),     # screen: STE 95.0% against 98.1%
    ("lenet5", "digits", "drum-k3"),      # screen: STE 93.0% against 95.5%
]

GRADS = ("ste", "lut2d", "lut1d")


def run_one(work: Path, luts: dict[str, Path], model: str, dataset: str, name: str, seed: int, grads,
            threads: int, tag: str) -> dict:
    """One retraining with the date25 recipe, scaled down (cached in ``--work``)."""
    from appmult.flows import RetrainConfig
    scale = SCALE[(model, dataset)]
    e = scale["epochs"]
    cfg = RetrainConfig(lut=str(luts[name]), recipe="date25", model=model, dataset=dataset, seed=seed,
                        grads=tuple(grads), epochs=e, milestones=tuple(sorted({max(1, e // 3), max(1, 2 * e // 3)})),
                        batch_size=scale["batch_size"], pretrain_epochs=scale["pretrain_epochs"],
                        half_window="auto" if "lut2d" in grads else None, trial_epochs=2, trial_batches=20,
                        out=str(work / tag / model / dataset / name / f"s{seed}"),
                        pretrained_dir=str(work / "pretrained"), resume=True, progress=False, threads=threads)
    return cached_retrain(cfg)


def screen(args, work: Path) -> int:
    from appmult.files import atomic_write_text
    luts = make_luts(work, SPECS, sorted({s for _, _, s in SCREEN}))
    rows, lines = [], ["| model | dataset | multiplier | MRE % | FP32 | exact-quantized | approx, no retraining "
                       "| STE after | STE gap (pp) | run s |", "|---|---|---|---|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for model, dataset, name in SCREEN:
        if args.only and model not in args.only:
            continue
        t = time.perf_counter()
        s = summarize(run_one(work, luts, model, dataset, name, 0, ("ste",), args.threads, "screen"))
        gap = s["exact_quantized"] - s["after"]["ste"]
        rows.append({"model": model, "dataset": dataset, "multiplier": name, "spec": SPECS[name],
                     "summary": s, "ste_gap": gap})
        lines.append(f"| {model} | {dataset} | {name} | {100 * s['mre']:.1f} | {100 * s['fp32']:.1f} "
                     f"| {100 * s['exact_quantized']:.1f} | {100 * s['approx_before']:.1f} "
                     f"| {100 * s['after']['ste']:.1f} | {100 * gap:+.1f} | {s['total_s']:.0f} |")
        log(lines[-1] + f" ({time.perf_counter() - t:.0f} s)")
        doc = {"format": "appmult.experiments.headroom.screen/1", "seed": 0, "scale": {
            f"{m}/{d}": v for (m, d), v in SCALE.items()}, "threads": args.threads,
            "elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "rows": rows}
        atomic_write_text(Path(args.out) / "screen.json", json.dumps(doc, indent=1) + "\n")
        atomic_write_text(Path(args.out) / "screen.md", "\n".join(lines) + "\n")
    log(f"screen done in {time.perf_counter() - t0:.0f} s")
    return 0


def aggregate(runs: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["dataset"], r["multiplier"]), []).append(r)
    acc = ["| model | dataset | multiplier | exact-quantized | approx, no retraining | STE | LUT-2D (H per seed) "
           "| LUT-1D | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    diff = ["| model | dataset | multiplier | LUT-2D - STE (pp) | LUT-1D - STE (pp) | STE gap to exact-q (pp) "
            "| epoch s: STE / LUT-2D / LUT-1D |", "|---|---|---|---|---|---|---|"]
    loss = [f"| model | dataset | multiplier | {LOSS_HEADER} |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, dataset, name), rs in groups.items():
        s = [r["summary"] for r in rs]
        hw = ", ".join(str(x["half_window"]["lut2d"]) for x in s)
        acc.append(f"| {model} | {dataset} | {name} | {pct([x['exact_quantized'] for x in s])} "
                   f"| {pct([x['approx_before'] for x in s])} | {pct([x['after']['ste'] for x in s])} "
                   f"| {pct([x['after']['lut2d'] for x in s])} ({hw}) | {pct([x['after']['lut1d'] for x in s])} "
                   f"| {len(s)} |")
        d2 = [x["after"]["lut2d"] - x["after"]["ste"] for x in s]
        d1 = [x["after"]["lut1d"] - x["after"]["ste"] for x in s]
        gap = [x["exact_quantized"] - x["after"]["ste"] for x in s]
        ep = " / ".join(f"{statistics.fmean(x['epoch_s'][g] for x in s):.1f}" for g in GRADS)
        diff.append(f"| {model} | {dataset} | {name} | {pct(d2)} | {pct(d1)} | {pct(gap)} | {ep} |")
        loss.append(f"| {model} | {dataset} | {name} | " + " | ".join(loss_cells(s, GRADS)) + " |")
    return ("## Accuracy (%), mean ± 95% CI half width over seeds\n\n" + "\n".join(acc)
            + "\n\n## Paired differences (same seed, same start), mean ± 95% CI half width\n\n"
            + "\n".join(diff)
            + "\n\n## Training loss after the last epoch (paired differences: negative = lower than STE)\n\n"
            + "\n".join(loss) + "\n")


def main_phase(args, work: Path) -> int:
    from appmult.files import atomic_write_text
    chosen = [tuple(t.split("/")) for t in args.settings] if args.settings else MAIN
    if not chosen:
        raise SystemExit("no settings: pass --settings model/dataset/multiplier ... (pick them from the screen)")
    luts = make_luts(work, SPECS, sorted({s for _, _, s in chosen}))
    runs = []
    t0 = time.perf_counter()
    for model, dataset, name in chosen:
        for seed in args.seeds:
            t = time.perf_counter()
            res = run_one(work, luts, model, dataset, name, seed, GRADS, args.threads, "main")
            s = summarize(res)
            runs.append({"model": model, "dataset": dataset, "multiplier": name, "seed": seed,
                         "spec": SPECS[name], "summary": s})
            log(f"{model} {dataset} {name} s{seed}: exact-q {100 * s['exact_quantized']:.1f}, before "
                f"{100 * s['approx_before']:.1f}, after " + ", ".join(
                    f"{m} {100 * v:.1f}" for m, v in s["after"].items()) + f" ({time.perf_counter() - t:.0f} s)")
            doc = {"format": "appmult.experiments.headroom/1", "settings": [list(c) for c in chosen],
                   "seeds": args.seeds, "threads": args.threads, "scale": {
                       f"{m}/{d}": v for (m, d), v in SCALE.items()},
                   "elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "runs": runs}
            atomic_write_text(Path(args.out) / "results.json", json.dumps(doc, indent=1) + "\n")
            atomic_write_text(Path(args.out) / "results.md", aggregate(runs))
    log(f"main phase done in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("screen", "main"), required=True)
    p.add_argument("--work", default="/tmp/appmult-headroom", help="checkpoints, LUTs, pretrained models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", help="main phase: model/dataset/multiplier triples")
    p.add_argument("--only", nargs="+", help="screen: only these models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", default=str(HERE), help="where the json/md files go")
    args = p.parse_args(argv)
    work = Path(args.work)
    return screen(args, work) if args.phase == "screen" else main_phase(args, work)


if __name__ == "__main__":
    sys.exit(main())
