"""``appmult assign``: per-layer multiplier assignment from a noise surrogate and an error model."""

from __future__ import annotations

import argparse
import functools
import sys

from ..flows import AssignConfig
from ._config import add_option, build_config


def register(sub) -> None:
    p = sub.add_parser(
        "assign", help="choose a multiplier per layer (noise surrogate + error model)",
        description="Train a noise surrogate to learn each layer's error tolerance, predict every candidate "
                    "multiplier's output-error std per layer from real operand histograms, give each layer the "
                    "cheapest candidate within its tolerance (Trommer et al., ICCAD 2022), then convert, "
                    "calibrate, retrain (STE) and compare with homogeneous assignments. Writes plan.json, "
                    "results.json and pareto.png to --out.")
    opt = functools.partial(add_option, p, AssignConfig)
    p.add_argument("candidates", nargs="+", metavar="SPEC|FILE",
                   help="candidate multipliers: specs (e.g. truncated:width=8,signed=false,columns=6) or LUT "
                        "files that carry their cost; all of the same widths and signedness")
    opt("model", "--model", help="mlp, lenet5, resnet8, resnet20 (default %(default)s)")
    opt("dataset", "--dataset", help="digits, mnist5k, mnist, cifar10 (default %(default)s)")
    opt("data_dir", "--data-dir", metavar="DIR",
        help="directory of the mnist / cifar10 / cifar100 files (digits and mnist5k ship with their packages)")
    opt("checkpoint", "--checkpoint", metavar="FILE", help="FP32 model from pretraining instead of pretraining here")
    opt("pretrain_epochs", "--pretrain-epochs", type=int, help="FP32 pretraining epochs (default %(default)s)")
    opt("batch_size", "--batch-size", type=int, help="batch size (default %(default)s)")
    opt("lr", "--lr", type=float, help="Adam learning rate (default %(default)s)")
    opt("seed", "--seed", type=int, help="seed (default %(default)s)")
    opt("surrogate_epochs", "--surrogate-epochs", type=int, help="noise-surrogate epochs (default %(default)s)")
    opt("sigma_lr", "--sigma-lr", type=float, help="learning rate of the sigmas (default %(default)s)")
    opt("lam", "--lam", type=float, help="surrogate reward weight lambda (default %(default)s)")
    opt("sigma_max", "--sigma-max", type=float, help="reward saturation sigma_max (default %(default)s)")
    opt("retrain_epochs", "--retrain-epochs", type=int,
        help="STE retraining epochs after conversion (default %(default)s)")
    opt("error_model", "--error-model", choices=("population", "global"),
        help="error-std predictor used for the choice (default %(default)s)")
    opt("cost_figure", "--cost-figure",
        help="relative hardware cost figure: transistors, aig_nodes, gates, ice40_lut4, "
             "weighted_toggles_per_op, ... (default %(default)s)")
    opt("include_exact", "--no-exact", action="store_false", help="do not add the exact multiplier to the candidates")
    opt("homogeneous", "--no-homogeneous", action="store_false", help="skip the homogeneous comparison runs")
    opt("validate", "--no-validate", action="store_false", help="skip measuring the real error std per layer")
    opt("out", "--out", metavar="DIR", help="output directory (default %(default)s)")
    opt("overwrite", "--overwrite", action="store_true",
        help="replace the assignment run already in --out (plan.json, results.json, pareto.png); without it "
             "such a directory is refused")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (torch's and the numba kernels')")
    opt("progress", "--no-progress", action="store_false", help="no stage messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..flows import run_assign
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, not {args.threads}")
    cfg = build_config(AssignConfig, args)
    from ..flows.assign import names_lut_file
    from ._lut_widths import check_lut_widths
    for candidate in cfg.candidates:
        if not names_lut_file(candidate):
            check_lut_widths(candidate, "assignment needs one per candidate")
    from ..nn import cpu_threads
    with cpu_threads(args.threads):
        results = run_assign(cfg)
    if cfg.progress:
        plan = results["plan"]
        for row in plan["layers"]:
            print(f"{row['layer']:<16} {row['chosen']:<48} sigma {row['predicted_sigma']:10.1f} "
                  f"<= {row['tolerance']:10.1f} {'' if row['fits'] else '(nothing fits)'}", file=sys.stderr)
        print(f"total relative {plan['cost_figure']}: {plan['total_relative_cost']:.3f}", file=sys.stderr)
        for p in results["points"]:
            print(f"{p['label']:<48} cost {p['cost']:.3f} accuracy {100 * p['accuracy']:.2f}% "
                  f"(before retraining {100 * p['accuracy_before']:.2f}%)", file=sys.stderr)
    return 0
