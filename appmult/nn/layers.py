"""``ApproxLinear`` and ``ApproxConv2d``: torch layers whose products go through a LUT.

Each layer quantizes its input (activation quantizer with an observer) and its weight
(per channel or per tensor) to the LUT's operand widths, accumulates
``sum LUT[qx, qw]`` exactly as the hardware would (see :mod:`appmult.nn.functional`),
applies the zero-point cross terms exactly and dequantizes. Submodules: ``act_quant``,
``weight_quant`` and ``lut`` (a :class:`~appmult.nn.functional.LutTables`, whose buffers
carry the LUT and its derived tables through ``.to(device)`` and ``state_dict``).

What the layers guarantee, whatever the input:

* Every index into a table is in range by construction: inputs and weights are checked
  finite (weights once per weight change: their quantization is cached) and the
  quantizers clamp to the LUT's operand range.
* The integer sums are exact in any dtype: layers compute in float32 (float64 for a
  float64 model) with autocast off, and return the input's dtype.
* Inputs as torch accepts them: empty batches, unbatched ``(C, H, W)`` convolution input.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from ..errors import InvalidTypeError, InvalidValueError
from .autograd import _autocast_off
from .config import ApproxConfig
from . import eval_plan, exact_conv, quant_loops, train_plan
from .correction import ControlVariate
from .functional import _approx_conv2d, _approx_linear, _pair
from .kernels import numba_available
from .operands import LayerOperands, QuantizedOperands, _conv_operands, _linear_operands, _pad
from .quant import ActivationQuantizer, WeightQuantizer, frozen
from .tables import LutTables

__all__ = ["ApproxConv2d", "ApproxLinear", "layer_operands"]



def _adopt_trained(new: nn.Module, module: nn.Module) -> nn.Module:
    """Give a freshly built approximate layer the float module's trained weights, bias and mode."""
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.train(module.training)
    return new


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype and shape hold the same bits (so the same values).

    Contiguous tensors are compared as 8-byte words where their bytes allow it: on the CPU
    by one numba loop (:func:`~appmult.nn.quant_loops.same_words`; for a 512x512 linear
    layer's weight, checked at every eval forward, 25 us against torch.equal's 90 us),
    elsewhere by ``torch.equal`` on the words (twice as fast as on float32).
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous() and a.device == b.device and (a.numel() * a.element_size()) % 8 == 0 \
            and (a.storage_offset() * a.element_size()) % 8 == 0 and (b.storage_offset() * b.element_size()) % 8 == 0:
        wa, wb = a.detach().reshape(-1).view(torch.int64), b.detach().reshape(-1).view(torch.int64)
        if a.device.type == "cpu" and quant_loops.AVAILABLE and numba_available():
            return bool(quant_loops.same_words(wa.numpy(), wb.numpy()))
        return torch.equal(wa, wb)
    return torch.equal(a, b)


def _words(t: torch.Tensor):
    """``t``'s bytes as a numpy int64 array where :func:`_unchanged` can compare them by
    :func:`~appmult.nn.quant_loops.same_words` (a contiguous CPU tensor, whole 8-byte words,
    aligned), else ``None``."""
    if t.device.type != "cpu" or not t.is_contiguous() or (t.numel() * t.element_size()) % 8 \
            or (t.storage_offset() * t.element_size()) % 8 or not quant_loops.AVAILABLE:
        return None
    return t.reshape(-1).view(torch.int64).numpy()


def _finite_values(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` (a weight scale: one or one per channel) is finite: by
    numpy for a float32/float64 CPU tensor (5 us for 512 scales, against 12 for the torch
    reduction and its host read, paid by every training forward), else by torch."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t.sum()))


def _unchanged(c: dict, w: torch.Tensor) -> bool:
    """Whether the weight ``w`` (at the storage address of the cache key) holds the bits of
    the weight cache ``c``'s private copy.

    Both are kept as numpy words (``c["words"]``, ``c["live"]``): the live view holds the
    weight's storage, so while the key's address, shape and strides match it is the same
    memory read the same way (no other storage can be allocated there; a transposed view of
    it has other strides) and no view need be made per forward (~8 us of a 1-us compare).
    """
    words, live = c["words"], c["live"]
    if words is not None and live is not None and numba_available():
        return bool(quant_loops.same_words(words, live))
    return _same_bits(c["w"], w.detach())


def _computes_exactly(method):
    """Run a layer method taking an input ``x`` with autocast off, after refusing inputs it
    cannot compute with (not a tensor; the meta device). A parametrized layer
    (``torch.nn.utils.parametrize``) runs it with the parametrizations' values cached: the
    layer reads its weight in several places a forward (checks, the weight cache's key, the
    plans), and each read of a parametrized weight would compute it again."""
    called = method.__name__ == "forward"  # through ``__call__``, which runs the forward pre-hooks

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        if not called and self._forward_pre_hooks:
            _refresh_pruned(self, x)
        if "parametrizations" in self._modules:
            with parametrize.cached():
                return _run_exactly(method, self, x, args, kwargs)
        return _run_exactly(method, self, x, args, kwargs)
    return wrapper


def _run_exactly(method, layer, x, args, kwargs):
    # Autocast goes off before the checks: they read the weight, and a parametrized one is
    # computed (a matmul for ``orthogonal``) and cached for the whole call at that first read.
    if not isinstance(x, torch.Tensor) or x.is_meta:
        layer._check_input_device(x)  # refused (autocast knows no 'meta' device)
    with _autocast_off(x.device.type):
        layer._check_input_device(x)
        return method(layer, x, *args, **kwargs)


def _refresh_pruned(layer, x) -> None:
    """Recompute a pruned weight (``torch.nn.utils.prune``) as the next forward would.

    Pruning keeps ``weight = weight_orig * weight_mask`` as a plain attribute that its forward
    pre-hook refreshes; :meth:`int_forward`, :meth:`quantize` and :meth:`operands` are not
    called through ``__call__``, so after an optimizer step they would read the weight of the
    previous forward. (The deprecated hook of ``torch.nn.utils.weight_norm`` is not re-run
    here; its replacement, ``torch.nn.utils.parametrizations.weight_norm``, is always current.)
    """
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            hook(layer, (x,))


class _ApproxMixin:
    """Shared set-up of the quantizers and tables from a config."""

    def _setup(self, config: ApproxConfig) -> None:
        if not isinstance(config, ApproxConfig):
            raise InvalidTypeError(f"{type(self).__name__} needs an ApproxConfig, not {type(config).__name__}")
        self.config = config
        lut = config.load()
        self.lut = LutTables(lut, grad=config.grad, kernel=config.kernel,
                             activation_operand=config.activation_operand,
                             compute_missing_gradients=config.compute_missing_gradients,
                             half_window=config.half_window)
        self.act_quant = ActivationQuantizer(self.lut.width_x, self.lut.signed, config.act_observer,
                                             config.momentum)
        self.weight_quant = WeightQuantizer(self.lut.width_w, self.lut.signed, config.weight_scheme)
        #: Multiply exactly (same quantization) instead of through the LUT; see ``exact_``.
        self.exact_multiplication = False
        #: Control-variate correction (``config.correction``), ``None`` when off.
        self.correction = None
        if config.correction == "control_variate":
            self.correction = ControlVariate(lut, config.correction_hist, frac_bits=config.correction_frac_bits,
                                             activation_operand=config.activation_operand)
        p = self.weight
        self.lut.to(p.device)
        self.act_quant.to(p.device)
        if self.correction is not None:
            self.correction.to(p.device)

    def _compute_dtype(self) -> torch.dtype:
        """float32, or the weight's dtype when wider: float16/bfloat16 would round the integer sums."""
        return torch.promote_types(self._weight_bias()[0].dtype, torch.float32)

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the forward computes with: the module's own parameters (its
        dict read directly: an ``nn.Module`` attribute look-up costs about a microsecond, and
        this runs at every forward), or the tensors that replaced them -- a parametrization
        (``torch.nn.utils.parametrize``) or pruning (``torch.nn.utils.prune``) computes the
        weight from other parameters -- read as attributes."""
        params = self._parameters
        w = params.get("weight")
        if w is None:
            w = self.weight
        b = params["bias"] if "bias" in params else self.bias
        return w, b

    def _check_input_device(self, x) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise InvalidTypeError(f"{name} needs a torch.Tensor input, not {type(x).__name__}")
        # (the module's dicts read directly: each ``nn.Module`` attribute look-up costs about a
        # microsecond, and this runs at every forward)
        if x.is_meta or self._weight_bias()[0].is_meta or self._modules["lut"]._buffers["prod"].is_meta:
            raise InvalidValueError(
                f"{name} cannot run on the 'meta' device: its outputs are sums of LUT entries picked by the "
                f"data. Materialize the model first: model.to_empty(device=...), then load_state_dict(...)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The LUT is checked before the weight and bias are copied: a refused load changes nothing.
        self.lut.check_state_dict(state_dict, prefix + "lut.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _quantize(self, x: torch.Tensor):
        """Quantized operands in the compute dtype; checks first, so a refused input changes no observer."""
        x = x.to(self._compute_dtype())
        (qw, sw, zw), _ = self._quantized_weight()
        qx, sx, zx = self.act_quant(x, type(self).__name__)  # refuses NaN/Inf, no observer changed
        return qx, sx, zx, qw, sw, zw

    def _weight_codes(self, w: torch.Tensor, ct: torch.dtype):
        """``(qw, sw, zw)`` of ``w`` in ``ct``, refused where a code could be NaN: NaN/Inf
        weights (found by the weight quantizer) or a range wider than ``ct`` holds (an
        infinite scale; with finite weights and finite scales the codes are bounded
        integers). A NaN code would become an arbitrary table index."""
        q = self.weight_quant(w.to(ct), type(self).__name__)
        self._check_weight_scale(q[1], ct)
        return q

    def _check_weight_scale(self, scale: torch.Tensor, ct: torch.dtype) -> None:
        """Refuse a weight whose range is wider than ``ct`` holds (an infinite ``scale``)."""
        if not _finite_values(scale):
            lo, hi = torch.stack(torch.aminmax(self.weight.detach().to(ct))).tolist()
            raise InvalidValueError(f"{type(self).__name__} weight range [{lo:g}, {hi:g}] is too wide to "
                                    f"quantize in {ct}")

    def _quantized_weight(self):
        """``((qw, sw, zw), cache)``: the quantized weight and a dict for weight-side tables.

        Where no gradient can reach the weight (``torch.no_grad()``, or a frozen weight) both
        are kept between forwards and reused while the weight is unchanged: same storage,
        same version counter (bumped by every in-place update: optimizer steps,
        ``load_state_dict``) and, against writes through ``.data`` that bypass the counter,
        the same values as a private copy (one pass over the weight, small next to the
        activations). Another tensor holding the same bits -- a parametrized weight is computed
        afresh at each forward -- reuses them too (one comparison with the copy). Otherwise
        they are computed afresh and ``cache`` is ``None``.
        """
        w, wq = self._weight_bias()[0], self._modules["weight_quant"]  # (not nn.Module's ~1 us look-ups)
        ct = torch.promote_types(w.dtype, torch.float32)  # (_compute_dtype)
        if (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():
            # (an inference tensor -- a pruned or parametrized weight computed under
            # torch.inference_mode() -- has no version counter to key a cache by)
            return self._weight_codes(w, ct), None  # (a kept cache stays valid: it is checked when used)
        # the LUT tables object itself: other tables (``layer.lut = ...``) start a new cache,
        # and holding them keeps their id from being reused
        key = (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype, w.device, id(wq), wq.scheme, wq.width,
               wq.signed, self._modules["lut"])
        c = self.__dict__.get("_wcache")
        if c is None or c["key"] != key or not _unchanged(c, w):
            if c is not None and c["key"][2:] == key[2:] and _same_bits(c["w"], w.detach()):
                # another tensor with the cached bits (a parametrized weight is computed afresh at
                # each forward): the same codes and tables, now checked at its address
                c["key"], c["live"] = key, _words(w.detach())
                return c["q"], c["tables"]
            with torch.no_grad():
                q = self._weight_codes(w, ct)  # checked once per weight change, not per forward
            copy = w.detach().clone()
            live = _words(w.detach())
            c = {"key": key, "w": copy, "words": None if live is None else _words(copy), "live": live, "q": q,
                 "tables": {}}
            self.__dict__["_wcache"] = c
        return c["q"], c["tables"]

    def _weight_cache(self):
        """The weight-side table cache of the current forward (``None`` when not cached)."""
        c = self.__dict__.get("_wcache")
        w = self.weight
        if (c is None or (torch.is_grad_enabled() and w.requires_grad) or w.is_inference()
                or c["key"][:2] != (w.data_ptr(), w._version)):
            return None
        return c["tables"]

    def _int_quantize(self, x: torch.Tensor):
        """:meth:`_quantize` with the activation observer frozen (the analysis passes' quantizer)."""
        with frozen(self):
            return self._quantize(x)

    def _correction(self, act_sum: torch.Tensor, qw: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Integer correction ``c`` per output (int64); ``act_sum`` holds each output's ``sum a``."""
        alpha_fx, beta = self.correction.channel_params(qw)
        shape = [1] * act_sum.dim()
        shape[channel_dim] = -1
        return self.correction.term(act_sum.to(torch.int64), alpha_fx.reshape(shape), beta.reshape(shape))

    def _corrects(self) -> bool:
        return self.correction is not None and not self.exact_multiplication

    def _mode_repr(self) -> str:
        mode = "exact multiplication" if self.exact_multiplication else self.lut.describe()
        acc = "exact" if self.config.exact_accumulate else "fp32"
        corr = "" if self.correction is None else f", correction=control_variate(F={self.correction.frac_bits})"
        return f"{mode}, accumulate={acc}, weights={self.config.weight_scheme}{corr}"


class ApproxLinear(_ApproxMixin, nn.Linear):
    """``nn.Linear`` whose products are computed by an approximate multiplier's LUT.

    Args:
        in_features: input size.
        out_features: output size.
        bias: learn an additive bias.
        config: the approximation (LUT, grad mode, quantization, kernel).
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config: ApproxConfig,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(config)

    @classmethod
    def from_float(cls, module: nn.Linear, config: ApproxConfig) -> "ApproxLinear":
        """An approximate copy of a trained ``nn.Linear`` (weights and bias copied).

        Args:
            module: the float layer.
            config: the approximation.

        Returns:
            A new ``ApproxLinear`` on the module's device, in its training mode.
        """
        if not isinstance(module, nn.Linear):
            raise InvalidTypeError(f"ApproxLinear.from_float needs an nn.Linear, not {type(module).__name__}")
        new = cls(module.in_features, module.out_features, module.bias is not None, config=config,
                  device=module.weight.device, dtype=module.weight.dtype)
        return _adopt_trained(new, module)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = "a scalar" if x.dim() == 0 else x.shape[-1]
            raise InvalidValueError(f"ApproxLinear expects {self.in_features} input features, got {got}")
        return x.reshape(-1, self.in_features)

    @_computes_exactly
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize, accumulate through the LUT (or exactly), dequantize, add bias.

        Computed in float32 (float64 for a float64 layer) whatever the input's dtype or
        autocast, returned in the input's dtype. An empty batch gives an empty output (and
        zero gradients), as ``nn.Linear`` does.
        """
        lead = x.shape[:-1]
        xf = self._flat(x)
        if xf.numel() == 0:
            ct = self._compute_dtype()
            return F.linear(x.to(ct), self.weight.to(ct), None if self.bias is None else self.bias.to(ct)).to(x.dtype)
        if (y := eval_plan.linear_forward(self, xf)) is not None:
            return y.reshape(*lead, self.out_features)  # inference on the int8 path: the same bits, set-up kept
        if (y := train_plan.linear_forward(self, xf)) is not None:
            return y.reshape(*lead, self.out_features)  # a training step on the int8 path: one node, the same bits
        qx, sx, zx, qw, sw, zw = self._quantize(xf)
        tabs = None if self.exact_multiplication else self.lut
        y = _approx_linear(qx, sx, zx, qw, sw, zw, self.bias, tabs, exact=self.config.exact_accumulate,
                           cache=self._weight_cache())
        if self._corrects():
            # The correction is a constant of the inference pass (no gradient through it).
            c = self._correction(self._act_sum_linear(qx), qw, 1)
            y = y - (sx * sw.reshape(1, -1) * c.to(y.dtype)).detach()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @staticmethod
    def _act_sum_linear(qx: torch.Tensor) -> torch.Tensor:
        # float64 sums of integers below 2**53 are exact.
        return qx.detach().to(torch.float64).sum(-1, keepdim=True).to(torch.int64)

    @torch.no_grad()
    @_computes_exactly
    def int_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The raw integer accumulators ``sum_k LUT[qx_k, qw_k]`` (int64, bit-exact).

        No zero-point cross terms, scales or bias: this is what a MAC array built from the
        multiplier accumulates. Observers are not updated.
        """
        from .functional import lut_linear
        q = self.quantize(x)
        acc = lut_linear(q.qx, q.qw, self.lut, exact=True)
        return acc.to(torch.int64).reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    @_computes_exactly
    def int_forward_corrected(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`int_forward` minus the control-variate correction, bit for bit as the MAC computes it.

        ``acc - (floor((alpha_fx * S + 2**(F-1)) / 2**F) + B)`` with ``S`` the sum of the
        activation values of each output's inputs (see :mod:`appmult.nn.correction`).

        Raises:
            RuntimeError: the layer's config has no correction.
        """
        if self.correction is None:
            raise RuntimeError("ApproxLinear.int_forward_corrected needs ApproxConfig(correction='control_variate')")
        acc = self.int_forward(x)
        q = self.quantize(x)
        c = self._correction(self._act_sum_linear(q.qx), q.qw, 1)
        return acc - c.reshape(acc.shape)

    @torch.no_grad()
    @_computes_exactly
    def quantize(self, x: torch.Tensor) -> QuantizedOperands:
        """The quantized operands :meth:`int_forward` multiplies (observer frozen, no gradient).

        Args:
            x: input, ``(..., in_features)``.

        Returns:
            :class:`~appmult.nn.QuantizedOperands` with ``qx`` flattened to ``(M, in_features)``.

        Raises:
            InvalidValueError: wrong feature count, or a non-finite input or weight.
        """
        qx, sx, zx, qw, sw, zw = self._int_quantize(self._flat(x))
        return QuantizedOperands(qx, sx, zx, qw, sw, zw)

    @torch.no_grad()
    @_computes_exactly
    def operands(self, x: torch.Tensor, *, positions=None) -> LayerOperands:
        """The operand codes each output's MAC receives: one row of ``in_features`` pairs per output.

        Args:
            x: input, ``(..., in_features)``.
            positions: ``None`` for every output, or ``(row, out)`` index tuples (or an int64
                ``(P, 2)`` tensor) of the outputs wanted; rows index the flattened leading dims.

        Returns:
            :class:`~appmult.nn.LayerOperands` with ``out_shape = (M, out_features)``.

        Raises:
            InvalidValueError: wrong feature count, a non-finite input, or a position outside
                the output.
        """
        return _linear_operands(self.quantize(x), width_x=self.lut.width_x, width_w=self.lut.width_w,
                                activation_operand=self.lut.activation_operand, positions=positions)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._mode_repr()}"


class ApproxConv2d(_ApproxMixin, nn.Conv2d):
    """``nn.Conv2d`` whose products are computed by an approximate multiplier's LUT.

    Supports stride, dilation, groups (depthwise included) and zero padding; padded
    positions hold the activation zero point (a code), so they contribute
    ``LUT[Zx, qw]`` as in hardware. ``padding_mode`` must be ``"zeros"``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as :class:`torch.nn.Conv2d` (``padding`` as integers).
        config: the approximation.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, config: ApproxConfig, device=None, dtype=None):
        if isinstance(padding, str):
            raise InvalidValueError(f"ApproxConv2d padding must be integers, not {padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self._setup(config)

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: ApproxConfig) -> "ApproxConv2d":
        """An approximate copy of a trained ``nn.Conv2d`` (weights and bias copied).

        Raises:
            TypeError: not an ``nn.Conv2d``.
            ValueError: a padding mode other than ``"zeros"`` or string padding.
        """
        if not isinstance(module, nn.Conv2d):
            raise InvalidTypeError(f"ApproxConv2d.from_float needs an nn.Conv2d, not {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise InvalidValueError(f"ApproxConv2d supports padding_mode 'zeros' only, not {module.padding_mode!r}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, config=config,
                  device=module.weight.device, dtype=module.weight.dtype)
        return _adopt_trained(new, module)

    def _padding(self) -> tuple[int, int]:
        return _pair(self.padding)

    def _geom(self) -> dict:
        return dict(stride=self.stride, padding=self._padding(), dilation=self.dilation, groups=self.groups)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(N, C, H, W)`` (an unbatched ``(C, H, W)`` input becomes a batch of one),
        checked as ``nn.Conv2d`` checks it, in the user's terms."""
        if x.dim() not in (3, 4):
            raise InvalidValueError(f"Expected 3D (unbatched) or 4D (batched) input to ApproxConv2d, but got input "
                                    f"of size: {list(x.shape)}")
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if x.shape[1] != self.in_channels:
            raise InvalidValueError(f"Given groups={self.groups}, weight of size {list(self.weight.shape)}, expected "
                                    f"input{list(x.shape)} to have {self.in_channels} channels, but got "
                                    f"{x.shape[1]} channels instead")
        return x

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        # torch's own convolution: its output shape, its checks, zero gradients
        ct = self._compute_dtype()
        return F.conv2d(x.to(ct), self.weight.to(ct), None if self.bias is None else self.bias.to(ct),
                        self.stride, self._padding(), self.dilation, self.groups).to(x.dtype)

    @_computes_exactly
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize, accumulate through the LUT (or exactly), dequantize, add bias.

        Takes ``(N, C, H, W)`` or unbatched ``(C, H, W)`` input, as ``nn.Conv2d`` does.
        Computed in float32 (float64 for a float64 layer) whatever the input's dtype or
        autocast, returned in the input's dtype. An empty batch gives an empty output (and
        zero gradients).
        """
        x4 = self._batched(x)
        if x4.numel() == 0:
            y = self._empty_output(x4)
        elif (y := eval_plan.conv_forward(self, x4)) is not None:
            pass  # inference on the rank-1 path: the same bits by its kept set-up
        elif (y := train_plan.conv_forward(self, x4)) is not None:
            pass  # a training step on the fused rank-1 path: one node, the same bits
        else:
            qx, sx, zx, qw, sw, zw = self._quantize(x4)
            tabs = None if self.exact_multiplication else self.lut
            y = _approx_conv2d(qx, sx, zx, qw, sw, zw, self.bias, tabs, exact=self.config.exact_accumulate,
                               cache=self._weight_cache(), **self._geom())
            if self._corrects():
                c = self._correction(self._act_sum_conv(_pad(qx.detach(), self._padding(), zx)), qw, 1)
                y = y - (sx * sw.reshape(1, -1, 1, 1) * c.to(y.dtype)).detach()
            y = y.to(x.dtype)
        return y.squeeze(0) if x.dim() == 3 else y

    def _act_sum_conv(self, qx: torch.Tensor) -> torch.Tensor:
        """``sum a`` over each output's receptive field of the padded ``qx`` (padding holds ``Zx``), int64."""
        import torch.nn.functional as F
        qx = qx.detach().to(torch.float64)
        g = self.groups
        ones = torch.ones(g, self.in_channels // g, *self.kernel_size, dtype=torch.float64, device=qx.device)
        # One sum per group, shared by that group's output channels; float64 is exact here.
        s = exact_conv.conv2d(qx, ones, stride=self.stride, dilation=self.dilation, groups=g)
        return s.repeat_interleave(self.out_channels // g, dim=1).to(torch.int64)

    @torch.no_grad()
    @_computes_exactly
    def int_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The raw integer accumulators ``sum LUT[qx, qw]`` per output (int64, bit-exact).

        Padded positions contribute ``LUT[Zx, qw]``. No cross terms, scales or bias.
        Observers are not updated. An unbatched ``(C, H, W)`` input gives ``(Co, Ho, Wo)``.
        """
        from .functional import lut_conv2d
        q = self.quantize(x)
        acc = lut_conv2d(q.qx, q.qw, self.lut, stride=self.stride, dilation=self.dilation, groups=self.groups,
                         exact=True)
        acc = acc.to(torch.int64)
        return acc.squeeze(0) if x.dim() == 3 else acc

    @torch.no_grad()
    @_computes_exactly
    def int_forward_corrected(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`int_forward` minus the control-variate correction, bit for bit as the MAC computes it.

        ``S`` sums the activation values of each receptive field, padded positions
        contributing ``Zx`` (see :mod:`appmult.nn.correction`).

        Raises:
            RuntimeError: the layer's config has no correction.
        """
        if self.correction is None:
            raise RuntimeError("ApproxConv2d.int_forward_corrected needs ApproxConfig(correction='control_variate')")
        acc = self.int_forward(x)
        q = self.quantize(x)
        c = self._correction(self._act_sum_conv(q.qx), q.qw, 1)
        return acc - (c.squeeze(0) if x.dim() == 3 else c)

    @torch.no_grad()
    @_computes_exactly
    def quantize(self, x: torch.Tensor) -> QuantizedOperands:
        """The quantized operands :meth:`int_forward` multiplies (observer frozen, no gradient).

        Args:
            x: input, ``(N, C, H, W)`` (an unbatched ``(C, H, W)`` input is a batch of one).

        Returns:
            :class:`~appmult.nn.QuantizedOperands` with ``qx`` padded with the activation
            zero point (the code that padded positions carry in hardware).

        Raises:
            InvalidValueError: a non-finite input or weight, or the wrong channel count.
        """
        qx, sx, zx, qw, sw, zw = self._int_quantize(self._batched(x))
        padding = self._padding()
        return QuantizedOperands(_pad(qx, padding, zx), sx, zx, qw, sw, zw, padding)

    @torch.no_grad()
    @_computes_exactly
    def operands(self, x: torch.Tensor, *, positions=None) -> LayerOperands:
        """The operand codes each output's MAC receives: one row of ``K = Cin/groups*kh*kw`` pairs per output.

        Rows follow ``weight.reshape(Cout, -1)`` (channel-major); padded positions carry the
        activation zero point's code and are marked in ``is_padding``.

        Args:
            x: input, ``(N, C, H, W)`` (an unbatched ``(C, H, W)`` input is a batch of one).
            positions: ``None`` for every output, or ``(n, cout, y, x)`` index tuples (or an
                int64 ``(P, 4)`` tensor) of the outputs wanted: only their rows are gathered.

        Returns:
            :class:`~appmult.nn.LayerOperands` with ``out_shape = (N, Cout, Ho, Wo)``.

        Raises:
            InvalidValueError: a non-finite input, or a position outside the output.
        """
        return _conv_operands(self.quantize(x), kernel_size=self.kernel_size, stride=self.stride,
                              dilation=self.dilation, groups=self.groups, width_x=self.lut.width_x,
                              width_w=self.lut.width_w, activation_operand=self.lut.activation_operand,
                              positions=positions)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._mode_repr()}"


def layer_operands(layer: ApproxConv2d | ApproxLinear, x: torch.Tensor, *, positions=None) -> LayerOperands:
    """``layer.operands(x, positions=positions)`` for either approximate layer, type-checked.

    For analysis code that walks a model's modules.

    Raises:
        InvalidTypeError: not an :class:`ApproxConv2d` or :class:`ApproxLinear`.
    """
    if not isinstance(layer, (ApproxConv2d, ApproxLinear)):
        raise InvalidTypeError(f"layer_operands needs an ApproxConv2d or ApproxLinear, not {type(layer).__name__}")
    return layer.operands(x, positions=positions)
