"""PyTorch layers that reproduce an approximate multiplier's LUT exactly.

Quantize activations and weights to the LUT's operand widths (activations -> operand
``a``, weights -> operand ``b`` by default, as in the RTL MAC), accumulate
``sum LUT[qx, qw]`` with a low-rank or gather kernel, and backpropagate with STE, LUT-2D
or LUT-1D gradients. Never imports Amaranth: the LUT file is the only interface to the
hardware half.

Example:
    >>> cfg = ApproxConfig("trunc8.npz", grad="lut1d")          # doctest: +SKIP
    >>> approximate_(model, cfg)                                 # doctest: +SKIP
    >>> calibrate(model, loader, num_batches=8)                  # doctest: +SKIP

Also here: offline datasets and reference models (``make_loaders``, ``build_model``), the
training loop (``fit``), the retraining workflow (``run_retrain``), the RTL check of a
trained layer (``verify_layer_rtl``), control-variate correction, the noise surrogate,
the output-error model and heterogeneous assignment.
"""

from .assign import AssignConfig, AssignError, assign, choose, load_candidate, plan_configs, run_assign
from .config import ApproxConfig, load_lut
from .convert import approximate_, approximate_layers, exact_, exact_multiplication
from .correction import ControlVariate, fit_error_model
from .data import DATASETS, DatasetFormatError, load_cifar10, load_digits_dataset, load_mnist5k, load_mnist_idx, make_loaders
from .error_model import OperandStats, Prediction, measure_error, predict_global, predict_population, predict_sigma, record_operands
from .functional import (GradMode, Kernel, LutMismatchError, LutTables, MissingGradientError, approx_conv2d,
                         approx_linear, approx_matmul, lut_conv2d, lut_linear)
from .layers import ApproxConv2d, ApproxLinear
from .models import MLP, LeNet5, ResNet, build_model
from .noise import SimulatedError, attach_simulated_error
from .quant import ActivationQuantizer, Observer, WeightQuantizer, WeightScheme, calibrate, calibrating, quant_range
from .retrain import RetrainConfig, run_retrain
from .rtlcheck import RtlCheckError, layer_operands, verify_layer_rtl
from .surrogate import attach_noise_surrogate, learned_sigmas, surrogate_loss, train_surrogate
from .training import CheckpointError, evaluate, fit, load_checkpoint, plot_history, pretrain_fp32

__all__ = [
    "ActivationQuantizer",
    "ApproxConfig",
    "ApproxConv2d",
    "ApproxLinear",
    "AssignConfig",
    "AssignError",
    "CheckpointError",
    "ControlVariate",
    "DATASETS",
    "DatasetFormatError",
    "GradMode",
    "Kernel",
    "LeNet5",
    "LutMismatchError",
    "LutTables",
    "MLP",
    "MissingGradientError",
    "Observer",
    "OperandStats",
    "Prediction",
    "ResNet",
    "RetrainConfig",
    "RtlCheckError",
    "SimulatedError",
    "WeightQuantizer",
    "WeightScheme",
    "approx_conv2d",
    "approx_linear",
    "approx_matmul",
    "approximate_",
    "approximate_layers",
    "assign",
    "attach_noise_surrogate",
    "attach_simulated_error",
    "build_model",
    "calibrate",
    "calibrating",
    "choose",
    "evaluate",
    "exact_",
    "exact_multiplication",
    "fit",
    "fit_error_model",
    "layer_operands",
    "learned_sigmas",
    "load_candidate",
    "load_checkpoint",
    "load_cifar10",
    "load_digits_dataset",
    "load_lut",
    "load_mnist5k",
    "load_mnist_idx",
    "lut_conv2d",
    "lut_linear",
    "make_loaders",
    "measure_error",
    "plan_configs",
    "plot_history",
    "predict_global",
    "predict_population",
    "predict_sigma",
    "pretrain_fp32",
    "quant_range",
    "record_operands",
    "run_assign",
    "run_retrain",
    "surrogate_loss",
    "train_surrogate",
    "verify_layer_rtl",
]
