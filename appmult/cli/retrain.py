"""``appmult retrain``: retrain a network against an approximate multiplier (LUT or spec)."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from ..flows import RECIPES, RetrainConfig
from ._config import add_option, build_config


def register(sub) -> None:
    p = sub.add_parser(
        "retrain", help="retrain a network against an approximate multiplier",
        description="Pretrain (or load) an FP32 model, quantize and calibrate it for the multiplier, "
                    "evaluate exact-quantized and approximate accuracy, then retrain once per gradient "
                    "mode from the same starting point. Writes results.json, results.md, curves.png and "
                    "per-epoch checkpoints to --out. Runs under torchrun with DDP when WORLD_SIZE > 1.")
    opt = functools.partial(add_option, p, RetrainConfig)
    src = p.add_argument_group("multiplier (exactly one)")
    add_option(src, RetrainConfig, "lut", "--lut", metavar="FILE", help="LUT file (.npz) from 'appmult characterize'")
    add_option(src, RetrainConfig, "spec", "--spec", metavar="SPEC",
               help="multiplier spec, characterized on the fly (e.g. truncated:width=8,signed=false,columns=6)")
    opt("recipe", "--recipe", choices=tuple(RECIPES),
        help="a published retraining protocol; date25 (Meng et al., DATE 2025): unsigned asymmetric per-tensor "
             "quantization, --approximate conv, --calibration epoch, Adam lr 1e-3 without weight decay, batch 64, "
             "30 epochs halving the rate at 10 and 20, --augment crop-flip on CIFAR, --half-window auto from "
             "5-epoch lenet5 trials. Every flag given explicitly overrides the recipe")
    opt("model", "--model",
        help="mlp, lenet5, resnet8, resnet20, vgg19_bn, resnet18, resnet34, resnet50, or torchvision:NAME "
             "(default %(default)s)")
    opt("dataset", "--dataset", help="digits, mnist5k, mnist, cifar10, cifar100 (default %(default)s)")
    opt("data_dir", "--data-dir", metavar="DIR",
        help="directory of the mnist / cifar10 / cifar100 files (digits and mnist5k ship with their packages)")
    opt("epochs", "--epochs", type=int, help="retraining epochs per mode (default 3; date25: 30)")
    opt("pretrain_epochs", "--pretrain-epochs", type=int, help="FP32 pretraining epochs (default %(default)s)")
    opt("batch_size", "--batch-size", type=int, help="global batch size (default 64)")
    opt("lr", "--lr", type=float, help="Adam learning rate (default 0.001)")
    opt("weight_decay", "--weight-decay", type=float, help="Adam weight decay of the retraining (default 0)")
    opt("milestones", "--milestones", type=int, nargs="+", metavar="EPOCH",
        help="epochs after which the learning rate is halved, each below --epochs "
             "(default 1/3 and 2/3 of the run; date25: 10 20)")
    opt("weight_scheme", "--weight-scheme", choices=("per_channel", "per_tensor"),
        help="weight scales (activations are per tensor) (default per_channel; date25: per_tensor)")
    opt("approximate", "--approximate", choices=("all", "conv"),
        help="layers through the multiplier: all, or conv (Linear layers quantized but exact) "
             "(default all; date25: conv)")
    opt("calibration", "--calibration", choices=("batches", "epoch"),
        help="activation ranges from --calib-batches batches in eval mode, or from one epoch of un-augmented "
             "training data in train mode without backward (also BatchNorm statistics) "
             "(default batches; date25: epoch)")
    opt("augment", "--augment", choices=("none", "crop-flip"),
        help="training augmentation: pad-4 random crop and horizontal flip (default none; date25: crop-flip "
             "on CIFAR)")
    _add_run_options(opt)
    p.set_defaults(func=run)


def _check_resumable(out: str) -> None:
    """``--resume`` needs a run in ``out`` (as ``appmult explore --resume`` does); without one the
    run would quietly start afresh. A path that is not a directory is left to the run's own check.

    Raises:
        appmult.errors.UsageError: ``out`` holds no retraining run.
    """
    from pathlib import Path

    from ..errors import UsageError
    from ..flows.retrain_mode import existing_run
    from ..flows.retrain_results import RESULT_FILES
    path = Path(out)
    if path.exists() and not path.is_dir():
        return
    if not path.is_dir() or not existing_run(path, finished=(path / RESULT_FILES[0]).is_file()):
        raise UsageError(f"Cannot resume: no retraining run in {path}; leave out --resume to start one")


def _add_run_options(opt) -> None:
    """Gradient modes, half window, output, alternatives and the RTL check."""
    opt("seed", "--seed", type=int, help="seed of split, weights, batch order (default %(default)s)")
    opt("grads", "--grad", nargs="+", metavar="MODE",
        help="one or more of ste lut2d lut1d, each retrained from the same start (default %(default)s)")
    opt("half_window", "--half-window", metavar="H|auto|stored",
        help="LUT-2D/LUT-1D half window 1,2,4,...,64, 'auto' (short training trials, lowest "
             "training loss) or 'stored' (the LUT file's tables) (default stored; date25: auto)")
    opt("trial_model", "--trial-model", metavar="MODEL",
        help="network of the --half-window auto trials (default the run's model; date25: lenet5)")
    opt("trial_epochs", "--trial-epochs", type=int, metavar="N",
        help="epochs per --half-window auto trial (default 1; date25: 5)")
    opt("trial_batches", "--trial-batches", type=int, metavar="N",
        help="batches per epoch of a --half-window auto trial (default whole epochs)")
    opt("out", "--out", metavar="DIR", help="output directory (default %(default)s)")
    opt("resume", "--resume", action="store_true", help="continue an interrupted run in --out")
    opt("overwrite", "--overwrite", action="store_true",
        help="replace the run already in --out (its checkpoints and results); without it, or --resume, "
             "a run found there is refused")
    opt("exact_last", "--exact-last", type=int, metavar="N",
        help="hybrid training: exact products (same quantization) in the last N epochs (default %(default)s)")
    opt("simulated_error", "--simulated-error", action="store_true",
        help="also train with simulated error (exact products plus per-product noise of the "
             "LUT's mean relative error; Hammad et al.), evaluated on the real LUT")
    opt("mre", "--mre", type=float, metavar="X",
        help="MRE of --simulated-error as a fraction in 0..1, e.g. 0.05 (default: the LUT's)")
    opt("noise_operands", "--noise-operands", choices=("codes", "values"),
        help="products the simulated error applies to: the multiplier's operand codes or the "
             "zero-point-corrected values x*w (default %(default)s)")
    opt("checkpoint", "--checkpoint", metavar="FILE", help="start from this FP32 model instead of pretraining")
    opt("pretrained_dir", "--pretrained-dir", metavar="DIR", help="FP32 model cache (default OUT/pretrained)")
    opt("calib_batches", "--calib-batches", type=int, help="calibration batches (default %(default)s)")
    opt("threads", "--threads", type=int, metavar="N", help="CPU threads (torch's and the numba kernels')")
    opt("time_exact", "--no-time-exact", action="store_false",
        help="skip timing one exact-quantized epoch for the comparison")
    opt("progress", "--no-progress", action="store_false", help="no progress bars or stage messages")
    opt("verify_rtl", "--verify-rtl", action="store_true",
        help="after each mode, recompute the first approximate conv layer's integer accumulators "
             "on a few test images with the RTL MAC of the LUT's circuit (Icarus Verilog) and "
             "compare them with the layer's; exit status 1 on a mismatch")
    opt("rtl_positions", "--rtl-positions", type=int, metavar="N",
        help="output positions per RTL check (default %(default)s)")
    opt("rtl_sim", "--rtl-sim", choices=("icarus", "verilator"), help="simulator of the RTL check (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..flows import results_markdown, run_retrain
    cfg = build_config(RetrainConfig, args)
    if cfg.spec is not None:
        from ._lut_widths import check_lut_widths
        check_lut_widths(cfg.spec, "retraining needs one")
    if cfg.resume:
        _check_resumable(cfg.out)
    results = run_retrain(cfg)
    main_rank = os.environ.get("RANK", "0") == "0"
    if cfg.progress and main_rank:
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
