"""Predict the output-error std of a layer for a multiplier from its operand statistics.

For a layer with fan-in ``K`` (products summed per output) and a multiplier's error map
``e(x, w) = LUT[x, w] - x*w`` over operand codes (activation ``x``, weight ``w``, in the
units of the layer's integer accumulator ``sum_k LUT[qx_k, qw_k]``), Trommer et al.
(ICCAD 2022) predict the std of the accumulated error of one output:

* **global**: with the histograms ``p_x``, ``p_w`` of the codes the layer multiplies,
  ``mu = sum e p_x p_w``, ``sigma_op^2 = sum (e - mu)^2 p_x p_w``,
  ``sigma_pred = sqrt(K) sigma_op``; the mean error ``K mu`` (bias) is reported apart.
* **population**: over sampled receptive fields ``j`` (one input patch, paired with the
  layer's weights: the pairs ``(x_jk, w_ck)`` over ``k`` and output channels ``c``),
  ``mu_j``/``sigma_op,j`` as above on field ``j``'s pairs, and
  ``sigma_pred^2 = K^2 Var_j(mu_j) + K mean_j(sigma_op,j^2)``.

Both treat the ``K`` products of one output as independent draws, which they are not
(one output channel always uses the same weights); :func:`measure_error` measures the
real std of ``approximate - exact`` integer outputs for comparison.

Fields are kept as their operand codes (``J x K``) with the weight codes (``C x K``),
rather than as ``J`` joint histograms of ``2**(wx+ww)`` bins: ``C*K`` pairs per field is
far fewer than the bins, and the moments from the pairs are exactly those of the joint
histogram.

Activation codes are counted as the multiplier sees them: for a convolution every input
value once per receptive field that uses it, padding included (padded positions carry the
activation zero point, a code, as in :class:`~appmult.nn.ApproxConv2d`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError
from ..lut_gen.lutfile import LutFile
from ..lut_gen.metrics import exact_product
from ..nn import ApproxConv2d, ApproxLinear, QuantizedOperands

__all__ = [
    "OperandStats",
    "Measured",
    "Prediction",
    "error_map",
    "measure_error",
    "predict_global",
    "predict_population",
    "predict_sigma",
    "record_operands",
]


class Prediction(NamedTuple):
    """Predicted accumulated error of one output (integer-accumulator units)."""

    sigma: float  #: predicted std of the accumulated error
    bias: float   #: predicted mean of the accumulated error, ``K * mu``
    sigma_op: float  #: std of one product's error (global) or ``sqrt(mean_j sigma_op,j^2)`` (population)
    mu: float     #: mean error of one product


class Measured(NamedTuple):
    """Measured ``approximate - exact`` integer outputs of a layer."""

    std: float
    mean: float
    count: int


def error_map(lut: LutFile, activation_operand: str = "a") -> np.ndarray:
    """``e[x_code, w_code] = LUT - exact`` (float64), oriented activation-first.

    Args:
        lut: the multiplier's LUT file.
        activation_operand: LUT operand that receives activations (``"a"`` or ``"b"``).

    Raises:
        ValueError: ``activation_operand`` is neither ``"a"`` nor ``"b"``.
    """
    if activation_operand not in ("a", "b"):
        raise InvalidValueError(f"activation_operand must be 'a' or 'b', not {activation_operand!r}")
    e = (lut.product - exact_product(lut.width_a, lut.width_b, lut.signed)).astype(np.float64)
    return e if activation_operand == "a" else e.T


def _norm(h, n: int, what: str) -> np.ndarray:
    p = np.asarray(h, dtype=np.float64)
    if p.shape != (n,):
        raise InvalidValueError(f"Histogram {what} must have one entry per code ({n},), not shape {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0 or p.sum() <= 0:
        raise InvalidValueError(f"Histogram {what} must be finite, non-negative and not all zeros")
    return p / p.sum()


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidValueError(f"Fan-in K must be a positive integer, not {k!r}")
    return int(k)


def predict_global(e: np.ndarray, p_x, p_w, k: int) -> Prediction:
    """Global model: independent operands from ``p_x``, ``p_w``; ``sigma = sqrt(K) sigma_op``.

    Args:
        e: error map ``[x_code, w_code]``.
        p_x: histogram (counts or probabilities) over activation codes.
        p_w: histogram over weight codes.
        k: fan-in (products per output).

    Returns:
        The :class:`Prediction`.

    Raises:
        ValueError: histogram shapes that do not match ``e``, negative or all-zero
            histograms, or ``k < 1``.
    """
    k = _check_k(k)
    e = np.asarray(e, dtype=np.float64)
    px, pw = _norm(p_x, e.shape[0], "p_x"), _norm(p_w, e.shape[1], "p_w")
    mu = float(px @ e @ pw)
    var = float(px @ (e - mu) ** 2 @ pw)
    sigma_op = math.sqrt(max(var, 0.0))
    return Prediction(math.sqrt(k) * sigma_op, k * mu, sigma_op, mu)


def predict_population(e: np.ndarray, fields: np.ndarray, weights: np.ndarray) -> Prediction:
    """Population model over receptive fields: ``sigma^2 = K^2 Var_j(mu_j) + K mean_j sigma_op,j^2``.

    Args:
        e: error map ``[x_code, w_code]``.
        fields: ``J x K`` activation codes of the sampled receptive fields.
        weights: ``C x K`` weight codes (one row per output channel); field ``j`` is paired
            with every row.

    Returns:
        The :class:`Prediction` (``mu`` is ``mean_j mu_j``).

    Raises:
        ValueError: shapes that do not fit, or codes outside the error map.
    """
    e = np.asarray(e, dtype=np.float64)
    fields, weights = np.asarray(fields), np.asarray(weights)
    if fields.ndim != 2 or weights.ndim != 2 or fields.shape[1] != weights.shape[1] or 0 in fields.shape \
            or 0 in weights.shape:
        raise InvalidValueError(f"Fields (J x K) and weights (C x K) must be non-empty with the same K, "
                         f"not shapes {fields.shape} and {weights.shape}")
    for arr, n, what in ((fields, e.shape[0], "field"), (weights, e.shape[1], "weight")):
        if arr.min() < 0 or arr.max() >= n:
            raise InvalidValueError(f"{what.capitalize()} codes must lie in 0..{n - 1}")
    k = fields.shape[1]
    mus = np.empty(len(fields))
    vars_ = np.empty(len(fields))
    # Chunks of fields keep the J x C x K gather bounded in memory.
    step = max(1, (1 << 22) // (weights.size or 1))
    for s in range(0, len(fields), step):
        ej = e[fields[s:s + step, None, :], weights[None, :, :]]  # (j, C, K)
        flat = ej.reshape(ej.shape[0], -1)
        mus[s:s + step] = flat.mean(axis=1)
        vars_[s:s + step] = flat.var(axis=1)
    var = k * k * float(mus.var()) + k * float(vars_.mean())
    return Prediction(math.sqrt(max(var, 0.0)), k * float(mus.mean()), math.sqrt(float(vars_.mean())),
                      float(mus.mean()))


@dataclasses.dataclass
class OperandStats:
    """Operand statistics of one approximate layer on real data (see :func:`record_operands`).

    Attributes:
        name: qualified layer name.
        fan_in: products per output ``K``.
        ops: MACs per input sample.
        activation_operand: LUT operand that receives activations.
        hist_x: counts over activation codes (as multiplied: per receptive field).
        hist_w: counts over weight codes.
        fields: ``J x K`` activation codes of sampled receptive fields.
        weights: ``C x K`` weight codes.
        exact_std: std of the exact zero-point-corrected accumulators
            ``sum (qx - Zx)(qw - Zw)``: the spread of ``Q(W) Q(x)`` in accumulator units.
        inputs: layer inputs kept for :func:`measure_error`.
    """

    name: str
    fan_in: int
    ops: int
    activation_operand: str
    hist_x: np.ndarray
    hist_w: np.ndarray
    fields: np.ndarray
    weights: np.ndarray
    exact_std: float
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list, repr=False)


def _exact_acc(layer: nn.Module, q: QuantizedOperands, *, centered: bool) -> torch.Tensor:
    """``sum qx*qw`` over each output in float64 (exact for these operand widths and fan-ins).

    ``q`` holds the layer's own padded operands; ``centered`` sums the zero-point-corrected
    values ``(qx - Zx)(qw - Zw)`` instead (padding then contributes 0).
    """
    qx, qw = q.qx.double(), q.qw.double()
    if centered:
        qx, qw = qx - q.zero_x.double(), qw - q.zero_w.double()
    if isinstance(layer, ApproxConv2d):
        return F.conv2d(qx, qw, stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
    return qx @ qw.t()


@torch.no_grad()
def record_operands(model: nn.Module, loader: Iterable, *, num_batches: int | None = None, fields: int = 512,
                    keep_inputs: int = 512, seed: int = 0) -> dict[str, OperandStats]:
    """Record per-layer operand statistics of a calibrated model with approximate layers.

    The model runs in eval mode (observers frozen, no gradients); forward hooks on every
    :class:`~appmult.nn.ApproxConv2d`/:class:`~appmult.nn.ApproxLinear` read the layer's
    own operand codes (:meth:`~appmult.nn.ApproxConv2d.operands`) and count them.

    Args:
        model: model converted with :func:`~appmult.nn.approximate_` and calibrated
            (usually with the exact multiplier's LUT, so the inputs are those of the
            exact-quantized network).
        loader: batches of inputs or ``(inputs, labels)``.
        num_batches: stop after this many batches (all when ``None``).
        fields: receptive fields sampled per layer (uniformly over all outputs seen).
        keep_inputs: layer inputs (samples) kept per layer for :func:`measure_error`.
        seed: seed of the field sampling.

    Returns:
        ``{layer name: OperandStats}`` in model order.

    Raises:
        ValueError: no approximate layer, or an empty loader.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (ApproxConv2d, ApproxLinear))}
    if not layers:
        raise InvalidValueError("record_operands: the model has no approximate layer; convert it with approximate_ first")
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, dict] = {n: {"hx": None, "hw": None, "fields": [], "s1": 0.0, "s2": 0.0, "cnt": 0,
                                "inputs": [], "kept": 0, "ops": 0} for n in layers}

    def hook_for(name: str, layer: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            ops = layer.operands(x)
            a = acc[name]
            wx, ww = layer.lut.width_x, layer.lut.width_w
            # One row per receptive field: the output channels of one group all read the same
            # one, so the first channel of every group stands for its group (groups == 1: channel 0).
            per_group = ops.out_shape[1] // getattr(layer, "groups", 1)
            rows = ops.x[:, ::per_group].reshape(-1, ops.fan_in)
            wcodes = ops.weight_codes
            hx = torch.bincount(rows.reshape(-1), minlength=1 << wx).double()
            a["hx"] = hx if a["hx"] is None else a["hx"] + hx
            a["hw"] = torch.bincount(wcodes.reshape(-1), minlength=1 << ww).double()
            a["weights"] = wcodes
            take = min(fields, rows.shape[0])
            idx = torch.randperm(rows.shape[0], generator=gen)[:take]
            a["fields"].append(rows[idx])
            corrected = _exact_acc(layer, ops.quantized, centered=True)
            a["s1"] += float(corrected.sum())
            a["s2"] += float((corrected ** 2).sum())
            a["cnt"] += corrected.numel()
            a["ops"] = math.prod(ops.out_shape[1:]) * ops.fan_in
            if a["kept"] < keep_inputs:
                part = x[:keep_inputs - a["kept"]]
                a["inputs"].append(part.clone())
                a["kept"] += part.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise InvalidValueError("record_operands: the loader yielded no batches")
    out = {}
    for n, a in acc.items():
        all_fields = torch.cat(a["fields"])
        pick = torch.randperm(all_fields.shape[0], generator=gen)[:fields]
        mean = a["s1"] / a["cnt"]
        var = max(a["s2"] / a["cnt"] - mean * mean, 0.0)
        out[n] = OperandStats(name=n, fan_in=int(all_fields.shape[1]), ops=a["ops"],
                               activation_operand=layers[n].lut.activation_operand,
                               hist_x=a["hx"].numpy(), hist_w=a["hw"].numpy(),
                               fields=all_fields[pick].numpy(), weights=a["weights"].numpy(),
                               exact_std=math.sqrt(var), inputs=a["inputs"])
    return out


def predict_sigma(stats: OperandStats, lut: LutFile, model: str = "population") -> Prediction:
    """Predicted accumulated-error std of one layer for a multiplier.

    Args:
        stats: the layer's operand statistics.
        lut: the candidate multiplier's LUT (same widths as the recorded codes).
        model: ``"global"`` or ``"population"``.

    Returns:
        The :class:`Prediction`.

    Raises:
        ValueError: an unknown model, or a LUT whose widths do not match the statistics.
    """
    if model not in ("global", "population"):
        raise InvalidValueError(f"Error model must be 'global' or 'population', not {model!r}")
    e = error_map(lut, stats.activation_operand)
    if e.shape != (len(stats.hist_x), len(stats.hist_w)):
        raise InvalidValueError(f"LUT operand ranges {e.shape} do not match the recorded codes of layer {stats.name!r} "
                         f"({len(stats.hist_x)}, {len(stats.hist_w)})")
    if model == "global":
        return predict_global(e, stats.hist_x, stats.hist_w, stats.fan_in)
    return predict_population(e, stats.fields, stats.weights)


@torch.no_grad()
def measure_error(layer: nn.Module, stats: OperandStats, lut: LutFile) -> Measured:
    """Measured std and mean of ``approximate - exact`` integer outputs on the kept inputs.

    The approximate accumulators come from the library's own bit-exact path
    (:meth:`~appmult.nn.ApproxConv2d.int_forward` of a copy of ``layer`` that uses ``lut``,
    with the same activation range); the exact ones from a float64 convolution / matmul of
    the same operand values (padding with the zero point, as the layer does).

    Args:
        layer: the calibrated approximate layer the statistics were recorded on.
        stats: its :class:`OperandStats` (with ``inputs``).
        lut: the multiplier to measure.

    Returns:
        :class:`Measured` over every output element of every kept input.

    Raises:
        ValueError: no inputs were kept.
    """
    if not stats.inputs:
        raise InvalidValueError(f"No inputs kept for layer {stats.name!r}; record_operands(..., keep_inputs > 0)")
    cfg = dataclasses.replace(layer.config, lut=lut, grad="ste")
    new = type(layer).from_float(layer, cfg)
    new.act_quant.load_state_dict(layer.act_quant.state_dict())
    new.eval()
    s1 = s2 = 0.0
    n = 0
    for x in stats.inputs:
        approx = new.int_forward(x).double()
        exact = _exact_acc(layer, layer.quantize(x), centered=False).reshape(approx.shape)
        d = approx - exact
        s1 += float(d.sum())
        s2 += float((d ** 2).sum())
        n += d.numel()
    mean = s1 / n
    return Measured(math.sqrt(max(s2 / n - mean * mean, 0.0)), mean, n)
