"""PyTorch layers that reproduce an approximate multiplier's LUT exactly.

Quantize activations and weights to the LUT's operand widths (activations -> operand
``a``, weights -> operand ``b`` by default, as in the RTL MAC), accumulate
``sum LUT[qx, qw]`` with a low-rank or gather kernel, and backpropagate with STE, LUT-2D
or LUT-1D gradients. ``layer.operands(x)`` returns the operand codes each output's MAC
receives (what ``int_forward`` sums); ``frozen(model)`` keeps activation observers still.
Never imports Amaranth: the LUT file is the only interface to the hardware half.

Example:
    >>> cfg = ApproxConfig("trunc8.npz", grad="lut1d")          # doctest: +SKIP
    >>> approximate_(model, cfg)                                 # doctest: +SKIP
    >>> calibrate(model, loader, num_batches=8)                  # doctest: +SKIP

Data sets, models and the training loop are in :mod:`appmult.train`; the published
methods built on these layers in :mod:`appmult.methods`; the retraining workflow and the
RTL check of a trained layer in :mod:`appmult.flows`.
"""

from ..heap import keep_freed_memory

keep_freed_memory()  # a training step's tensors stay in the heap (see appmult.heap)

from .attention import (ApproxMultiheadAttention, AttentionOperands, LutAttention, attention_modules, lut_bmm,
                        lut_sdpa)
from .config import PARTS, ApproxConfig, load_lut
from .convert import approximate_, approximate_layers, exact_, exact_multiplication
from .correction import ControlVariate, fit_error_model
from .functional import approx_conv2d, approx_linear, approx_matmul, lut_conv2d, lut_linear
from .layers import ApproxConv2d, ApproxLinear, layer_operands
from .numba_support import cpu_threads
from .operands import LayerOperands, QuantizedOperands
from .quant import (ActivationQuantizer, Observer, WeightQuantizer, WeightScheme, calibrate, calibrating, frozen,
                    quant_range)
from .tables import GradMode, Kernel, LutMismatchError, LutTables, MissingGradientError

__all__ = [
    "ActivationQuantizer",
    "ApproxConfig",
    "ApproxConv2d",
    "ApproxLinear",
    "ApproxMultiheadAttention",
    "AttentionOperands",
    "ControlVariate",
    "GradMode",
    "Kernel",
    "LayerOperands",
    "LutAttention",
    "LutMismatchError",
    "LutTables",
    "MissingGradientError",
    "Observer",
    "PARTS",
    "QuantizedOperands",
    "WeightQuantizer",
    "WeightScheme",
    "approx_conv2d",
    "approx_linear",
    "approx_matmul",
    "approximate_",
    "approximate_layers",
    "attention_modules",
    "calibrate",
    "calibrating",
    "cpu_threads",
    "exact_",
    "exact_multiplication",
    "fit_error_model",
    "frozen",
    "layer_operands",
    "load_lut",
    "lut_sdpa",
    "lut_bmm",
    "lut_conv2d",
    "lut_linear",
    "quant_range",
]
