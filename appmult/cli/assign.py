"""``appmult assign``: per-layer multiplier assignment from a noise surrogate and an error model."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "assign", help="choose a multiplier per layer (noise surrogate + error model)",
        description="Train a noise surrogate to learn each layer's error tolerance, predict every candidate "
                    "multiplier's output-error std per layer from real operand histograms, give each layer the "
                    "cheapest candidate within its tolerance (Trommer et al., ICCAD 2022), then convert, "
                    "calibrate, retrain (STE) and compare with homogeneous assignments. Writes plan.json, "
                    "results.json and pareto.png to --out.")
    p.add_argument("candidates", nargs="+", metavar="SPEC|FILE",
                   help="candidate multipliers: specs (e.g. truncated:width=8,signed=false,columns=6) or LUT "
                        "files that carry their cost; all of the same widths and signedness")
    p.add_argument("--model", default="lenet5", help="mlp, lenet5, resnet8, resnet20 (default lenet5)")
    p.add_argument("--dataset", default="digits", help="digits, mnist5k, mnist, cifar10 (default digits)")
    p.add_argument("--data-dir", metavar="DIR", help="directory of the mnist / cifar10 files")
    p.add_argument("--checkpoint", metavar="FILE", help="FP32 model from pretraining instead of pretraining here")
    p.add_argument("--pretrain-epochs", type=int, default=30, help="FP32 pretraining epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--surrogate-epochs", type=int, default=5, help="noise-surrogate epochs (default 5)")
    p.add_argument("--sigma-lr", type=float, default=1e-2, help="learning rate of the sigmas (default 1e-2)")
    p.add_argument("--lam", type=float, default=0.2, help="surrogate reward weight lambda (default 0.2)")
    p.add_argument("--sigma-max", type=float, default=0.5, help="reward saturation sigma_max (default 0.5)")
    p.add_argument("--retrain-epochs", type=int, default=2, help="STE retraining epochs after conversion (default 2)")
    p.add_argument("--error-model", choices=("population", "global"), default="population",
                   help="error-std predictor used for the choice (default population)")
    p.add_argument("--cost-figure", default="transistors",
                   help="relative hardware cost figure: transistors, aig_nodes, gates, ice40_lut4, "
                        "weighted_toggles_per_op, ... (default transistors)")
    p.add_argument("--no-exact", action="store_true", help="do not add the exact multiplier to the candidates")
    p.add_argument("--no-homogeneous", action="store_true", help="skip the homogeneous comparison runs")
    p.add_argument("--no-validate", action="store_true", help="skip measuring the real error std per layer")
    p.add_argument("--out", default="assign-out", metavar="DIR", help="output directory (default assign-out)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no stage messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..flows import AssignConfig, run_assign
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive integer, not {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    cfg = AssignConfig(candidates=tuple(args.candidates), model=args.model, dataset=args.dataset,
                       data_dir=args.data_dir, checkpoint=args.checkpoint, pretrain_epochs=args.pretrain_epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       surrogate_epochs=args.surrogate_epochs, sigma_lr=args.sigma_lr, lam=args.lam,
                       sigma_max=args.sigma_max, retrain_epochs=args.retrain_epochs, error_model=args.error_model,
                       cost_figure=args.cost_figure, include_exact=not args.no_exact,
                       homogeneous=not args.no_homogeneous, validate=not args.no_validate, out=args.out,
                       progress=not args.no_progress)
    results = run_assign(cfg)
    if not args.no_progress:
        plan = results["plan"]
        for row in plan["layers"]:
            print(f"{row['layer']:<16} {row['chosen']:<48} sigma {row['predicted_sigma']:10.1f} "
                  f"<= {row['tolerance']:10.1f} {'' if row['fits'] else '(nothing fits)'}", file=sys.stderr)
        print(f"total relative {plan['cost_figure']}: {plan['total_relative_cost']:.3f}", file=sys.stderr)
        for p in results["points"]:
            print(f"{p['label']:<48} cost {p['cost']:.3f} accuracy {100 * p['accuracy']:.2f}% "
                  f"(before retraining {100 * p['accuracy_before']:.2f}%)", file=sys.stderr)
    return 0
