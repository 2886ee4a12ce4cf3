"""``appmult retrain``: retrain a network against an approximate multiplier (LUT or spec)."""

from __future__ import annotations

import argparse
import os
import sys


def _half_window(text: str) -> int | str:
    return text if text == "auto" else int(text) if text.isdigit() else text


def register(sub) -> None:
    p = sub.add_parser(
        "retrain", help="retrain a network against an approximate multiplier",
        description="Pretrain (or load) an FP32 model, quantize and calibrate it for the multiplier, "
                    "evaluate exact-quantized and approximate accuracy, then retrain once per gradient "
                    "mode from the same starting point. Writes results.json, results.md, curves.png and "
                    "per-epoch checkpoints to --out. Runs under torchrun with DDP when WORLD_SIZE > 1.")
    src = p.add_argument_group("multiplier (exactly one)")
    src.add_argument("--lut", metavar="FILE", help="LUT file (.npz) from 'appmult characterize'")
    src.add_argument("--spec", metavar="SPEC", help="multiplier spec, characterized on the fly "
                                                    "(e.g. truncated:width=8,signed=false,columns=6)")
    p.add_argument("--model", default="lenet5", help="mlp, lenet5, resnet8, resnet20 (default lenet5)")
    p.add_argument("--dataset", default="digits", help="digits, mnist5k, mnist, cifar10 (default digits)")
    p.add_argument("--data-dir", metavar="DIR", help="directory of the mnist / cifar10 files")
    p.add_argument("--epochs", type=int, default=3, help="retraining epochs per mode (default 3)")
    p.add_argument("--pretrain-epochs", type=int, default=5, help="FP32 pretraining epochs (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, weights, batch order (default 0)")
    p.add_argument("--grad", nargs="+", default=["ste"], metavar="MODE",
                   help="one or more of ste lut2d lut1d, each retrained from the same start (default ste)")
    p.add_argument("--half-window", type=_half_window, metavar="H|auto",
                   help="LUT-2D/LUT-1D half window 1,2,4,...,64, or 'auto' (short training trials, lowest "
                        "training loss); default: the LUT file's tables")
    p.add_argument("--trial-batches", type=int, metavar="N",
                   help="batches per --half-window auto trial (default one epoch)")
    p.add_argument("--out", default="retrain-out", metavar="DIR", help="output directory (default retrain-out)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--exact-last", type=int, default=0, metavar="N",
                   help="hybrid training: exact products (same quantization) in the last N epochs")
    p.add_argument("--simulated-error", action="store_true",
                   help="also train with simulated error (exact products plus per-product noise of the "
                        "LUT's mean relative error; Hammad et al.), evaluated on the real LUT")
    p.add_argument("--mre", type=float, metavar="X", help="MRE (fraction) for --simulated-error (default: the LUT's)")
    p.add_argument("--noise-operands", choices=("codes", "values"), default="codes",
                   help="products the simulated error applies to: the multiplier's operand codes (default) "
                        "or the zero-point-corrected values x*w")
    p.add_argument("--checkpoint", metavar="FILE", help="start from this FP32 model instead of pretraining")
    p.add_argument("--pretrained-dir", metavar="DIR", help="FP32 model cache (default OUT/pretrained)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--no-time-exact", action="store_true",
                   help="skip timing one exact-quantized epoch for the comparison")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")
    p.add_argument("--verify-rtl", action="store_true",
                   help="after each mode, recompute the first approximate conv layer's integer accumulators "
                        "on a few test images with the RTL MAC of the LUT's circuit (Icarus Verilog) and "
                        "compare them with the layer's; exit status 1 on a mismatch")
    p.add_argument("--rtl-positions", type=int, default=8, metavar="N",
                   help="output positions per RTL check (default 8)")
    p.add_argument("--rtl-sim", choices=("icarus", "verilator"), default="icarus",
                   help="simulator of the RTL check (default icarus)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..flows import RetrainConfig, results_markdown, run_retrain
    cfg = RetrainConfig(lut=args.lut, spec=args.spec, model=args.model, dataset=args.dataset,
                        data_dir=args.data_dir, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, grads=tuple(args.grad),
                        half_window=args.half_window, out=args.out, resume=args.resume,
                        exact_last=args.exact_last, simulated_error=args.simulated_error, mre=args.mre,
                        noise_operands=args.noise_operands,
                        checkpoint=args.checkpoint, pretrained_dir=args.pretrained_dir,
                        progress=not args.no_progress, calib_batches=args.calib_batches,
                        trial_batches=args.trial_batches, time_exact=not args.no_time_exact,
                        threads=args.threads, verify_rtl=args.verify_rtl, rtl_positions=args.rtl_positions,
                        rtl_sim=args.rtl_sim)
    results = run_retrain(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"
    if not args.no_progress and main_rank:
        print(results_markdown(results), file=sys.stderr)
    failed = [(mode, m["rtl_check"]) for mode, m in results["modes"].items()
              if m.get("rtl_check") and not m["rtl_check"]["passed"]]
    if failed:
        if main_rank:
            for mode, r in failed:
                print(f"appmult retrain: error: {mode}: {r['summary']}", file=sys.stderr)
                for c in r["checks"]:
                    if not c["matched"]:
                        print(f"  position ({', '.join(map(str, c['position']))}): int_forward {c['expected']}, "
                              f"RTL {c['actual']}", file=sys.stderr)
        return 1
    return 0
