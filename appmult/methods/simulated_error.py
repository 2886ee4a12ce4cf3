"""Simulated-error training (Hammad, El-Sankary, Gu; ROBIO 2019): a multiplier as its MRE only.

The multiplier is modelled by one number, its mean relative error (MRE): every product
becomes ``x*w*(1 + s*e)`` with a random sign ``s`` and a random magnitude ``e`` around the
MRE, drawn independently **per product**. An output that accumulates ``K`` products is

    y~ = sum_k x_k w_k (1 + s_k e_k) = y + sum_k x_k w_k s_k e_k,

so its noise has variance ``E[e^2] * sum_k (x_k w_k)^2``: it grows like
``sqrt(sum_k (x_k w_k)^2)``, about ``|y| / sqrt(K)`` for same-signed terms of similar size.
Drawing one ``y*(1 + s*e)`` per *output* instead would overstate the error by about
``sqrt(K)``, the mistake this module exists to avoid.

Two ways to draw the per-product noise (:class:`NoiseMethod`):

* ``exact`` -- materialize every product (an unfolded elementwise product for a
  convolution), draw ``s_k e_k`` per product and sum: the true distribution, at a cost of
  ``batch * outputs * K`` elements per layer. Used for small layers and as the reference
  in the tests.
* ``gaussian`` -- the ``s_k e_k`` are independent, zero-mean and bounded, so by the
  central limit theorem the sum is close to ``N(0, E[e^2] * sum_k (x_k w_k)^2)`` once ``K``
  is more than a handful. The variance is one extra GEMM (or conv) on the *squared*
  operands, ``(x*x) @ (w*w).T``, so the cost is that of one exact layer forward whatever K.
* ``auto`` (default) -- ``exact`` where the fan-in is below :data:`GAUSSIAN_MIN_FAN_IN`
  (the normal approximation of a sum of a few uniforms is visibly off in the tails) and the
  layer is small enough, else ``gaussian``.

By default the noise is applied to what the hardware multiplies: the integer operand
codes of the quantized layer (``qx``, ``qw``, padding positions included, which hold the
activation zero point), so a product's relative error refers to the same product the MRE
of the LUT was measured on. In dequantized units the noise is
``sx * sw * sum_k qx_k qw_k s_k e_k``. With unsigned (asymmetric) quantization the code
products contain the zero points, so this noise is large next to the zero-point-corrected
signal; ``operands="values"`` applies the relative error to ``(qx - zx) * (qw - zw)``
instead, the network's ``x * w`` as in the paper's floating-point simulation.

Gradients: the noise is a detached additive term, so the backward pass is the exact
quantized layer's (STE) -- the surrogate trains the weights to tolerate the perturbation,
as in the paper, without differentiating through a random draw.

Randomness comes from torch's global generator (or the one passed), which
:func:`appmult.train.fit` reseeds at every epoch: runs are reproducible and resumable.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ..lut_gen.lutfile import LutFile
from ..lut_gen.metrics import exact_product
from ..nn import ApproxConv2d, ApproxLinear

__all__ = [
    "GAUSSIAN_MIN_FAN_IN",
    "NOISE_OPERANDS",
    "ErrorDistribution",
    "NoiseMethod",
    "SimulatedError",
    "SimulatedErrorHooks",
    "attach_simulated_error",
    "lut_mre",
    "noise_variance_conv2d",
    "noise_variance_linear",
    "product_noise_conv2d",
    "product_noise_linear",
]

#: Below this fan-in, ``auto`` draws the exact per-product noise (when the layer is small).
GAUSSIAN_MIN_FAN_IN = 16
#: Which products the relative error applies to (see :func:`attach_simulated_error`).
NOISE_OPERANDS = ("codes", "values")
#: Largest ``batch * outputs * K`` element count ``auto`` materializes for the exact draw.
EXACT_MAX_ELEMENTS = 1 << 22


class ErrorDistribution(str, enum.Enum):
    """Distribution of a product's relative error magnitude ``e`` (sign ``s`` is +-1 fair)."""

    #: ``e ~ U(0, 2*MRE)``: mean MRE, ``E[e^2] = 4/3 MRE^2``; ``s*e ~ U(-2 MRE, 2 MRE)``.
    UNIFORM = "uniform"
    #: ``e = MRE`` exactly: ``E[e^2] = MRE^2``.
    FIXED = "fixed"


class NoiseMethod(str, enum.Enum):
    """How the per-product noise sum is drawn (see the module docstring)."""

    AUTO = "auto"
    EXACT = "exact"
    GAUSSIAN = "gaussian"


@dataclasses.dataclass(frozen=True)
class SimulatedError:
    """The error model: mean relative error, magnitude distribution and sampling method.

    Args:
        mre: mean relative error as a fraction (0.05 = 5%), e.g. a LUT's ``metrics["mre"]``.
        distribution: ``"uniform"`` (default) or ``"fixed"`` (:class:`ErrorDistribution`).
        method: ``"auto"`` (default), ``"exact"`` or ``"gaussian"`` (:class:`NoiseMethod`).

    Raises:
        ValueError: an MRE that is negative, not finite or not a number, or an unknown
            distribution or method.
    """

    mre: float
    distribution: str = "uniform"
    method: str = "auto"

    def __post_init__(self) -> None:
        mre = self.mre
        if isinstance(mre, bool) or not isinstance(mre, (int, float)) or not math.isfinite(mre) or mre < 0:
            raise InvalidValueError(f"Simulated-error MRE must be a finite number >= 0, not {mre!r}")
        object.__setattr__(self, "mre", float(mre))
        for name, cls in (("distribution", ErrorDistribution), ("method", NoiseMethod)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, cls(value).value)
            except ValueError:
                allowed = ", ".join(repr(e.value) for e in cls)
                raise InvalidValueError(f"Simulated-error {name} must be one of {allowed}, not {value!r}") from None

    @classmethod
    def from_lut(cls, lut: LutFile, **kwargs: Any) -> "SimulatedError":
        """The error model of a LUT file, from its recorded MRE (or computed from its table).

        Args:
            lut: the LUT file.
            **kwargs: ``distribution`` and ``method``.

        Returns:
            A :class:`SimulatedError` with ``mre = lut_mre(lut)``.
        """
        return cls(lut_mre(lut), **kwargs)

    @property
    def second_moment(self) -> float:
        """``E[(s e)^2] = E[e^2]``, the variance of one product's relative error."""
        if self.distribution == ErrorDistribution.FIXED.value:
            return self.mre ** 2
        return 4.0 / 3.0 * self.mre ** 2

    def sample_relative(self, shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Independent draws of ``s*e``, one per element of ``shape``.

        Returns:
            A tensor of the relative errors (zero mean, variance :attr:`second_moment`).
        """
        u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
        if self.distribution == ErrorDistribution.FIXED.value:
            return torch.where(u < 0.5, -self.mre, self.mre).to(dtype)
        # A fair sign times U(0, 2 MRE) is U(-2 MRE, 2 MRE): one uniform draw per product.
        return (2.0 * u - 1.0) * (2.0 * self.mre)


def lut_mre(lut: LutFile) -> float:
    """A LUT's mean relative error: the recorded ``metrics["mre"]``, else computed from the table.

    The computed value uses the EvoApprox convention of :mod:`appmult.lut_gen.metrics`
    (the recorded ``mre``): ``mean(|approx - exact| / |exact|)`` over the input pairs
    whose exact product is not 0 (the model's noise ``x*w*s*e`` is 0 there anyway).

    Args:
        lut: the LUT file.

    Returns:
        The MRE as a fraction.
    """
    recorded = (lut.metadata.get("metrics") or {}).get("mre")
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and math.isfinite(recorded):
        return float(recorded)
    exact = exact_product(lut.width_a, lut.width_b, lut.signed).astype(np.float64)
    err = np.abs(lut.product.astype(np.float64) - exact)
    nonzero = exact != 0
    return float((err[nonzero] / np.abs(exact[nonzero])).mean())


# --- per-product noise of one layer ---------------------------------------------------------

def noise_variance_linear(qx: torch.Tensor, qw: torch.Tensor, sim: SimulatedError) -> torch.Tensor:
    """Per-output variance of the product noise: ``E[e^2] * (qx^2) @ (qw^2).T``.

    Args:
        qx: ``(M, K)`` activation codes (values).
        qw: ``(N, K)`` weight codes (values).
        sim: the error model.

    Returns:
        ``(M, N)`` variances, in squared product units.
    """
    return (qx * qx) @ (qw * qw).t() * sim.second_moment


def noise_variance_conv2d(qx: torch.Tensor, qw: torch.Tensor, sim: SimulatedError, *, stride=1,
                          dilation=1, groups: int = 1) -> torch.Tensor:
    """Per-output variance of the product noise of a convolution (``qx`` already padded).

    Returns:
        ``(N, Co, Ho, Wo)`` variances: one conv of the squared operands times ``E[e^2]``.
    """
    return F.conv2d(qx * qx, qw * qw, None, stride, 0, dilation, groups) * sim.second_moment


def _method(sim: SimulatedError, fan_in: int, elements: int) -> NoiseMethod:
    method = NoiseMethod(sim.method)
    if method is NoiseMethod.AUTO:
        small = fan_in < GAUSSIAN_MIN_FAN_IN and elements <= EXACT_MAX_ELEMENTS
        method = NoiseMethod.EXACT if small else NoiseMethod.GAUSSIAN
    return method


@torch.no_grad()
def product_noise_linear(qx: torch.Tensor, qw: torch.Tensor, sim: SimulatedError, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise ``sum_k qx_k qw_k s_k e_k`` of every output of a linear layer.

    Args:
        qx: ``(M, K)`` activation codes (values).
        qw: ``(N, K)`` weight codes (values).
        sim: the error model (its ``method`` picks exact or Gaussian sampling).
        generator: random generator (default: torch's global one).

    Returns:
        ``(M, N)`` noise in product units (multiply by ``sx * sw`` to dequantize).
    """
    m, k = qx.shape
    n = qw.shape[0]
    if _method(sim, k, m * n * k) is NoiseMethod.EXACT:
        prods = qx[:, None, :] * qw[None, :, :]
        rel = sim.sample_relative(prods.shape, dtype=prods.dtype, device=prods.device, generator=generator)
        return (prods * rel).sum(-1)
    std = noise_variance_linear(qx, qw, sim).sqrt()
    return std * torch.randn(std.shape, dtype=std.dtype, device=std.device, generator=generator)


@torch.no_grad()
def product_noise_conv2d(qx: torch.Tensor, qw: torch.Tensor, sim: SimulatedError, *, stride=1, dilation=1,
                         groups: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-product noise of every output of a convolution (``qx`` already padded).

    Args:
        qx: ``(B, Ci, H, W)`` activation codes, padding applied (zero-point codes).
        qw: ``(Co, Ci/groups, kh, kw)`` weight codes.
        sim: the error model.
        stride: conv stride.
        dilation: conv dilation.
        groups: conv groups (depthwise included): each output sums the products of its
            own group's ``Ci/groups`` input channels.
        generator: random generator (default: torch's global one).

    Returns:
        ``(B, Co, Ho, Wo)`` noise in product units.
    """
    b = qx.shape[0]
    co, cg, kh, kw = qw.shape
    k = cg * kh * kw
    var = noise_variance_conv2d(qx, qw, sim, stride=stride, dilation=dilation, groups=groups)
    ho, wo = var.shape[-2:]
    method = _method(sim, k, b * co * ho * wo * k)
    if method is NoiseMethod.EXACT:
        # unfold orders rows channel-major, so each group's fields are a contiguous block of K rows.
        cols = F.unfold(qx, (kh, kw), dilation=dilation, stride=stride)     # (B, G*K, L)
        cols = cols.reshape(b, groups, 1, k, -1)                            # (B, G, 1, K, L)
        prods = cols * qw.reshape(1, groups, co // groups, k, 1)            # (B, G, Co/G, K, L)
        rel = sim.sample_relative(prods.shape, dtype=prods.dtype, device=prods.device, generator=generator)
        return (prods * rel).sum(3).reshape(b, co, ho, wo)
    return var.sqrt() * torch.randn(var.shape, dtype=var.dtype, device=var.device, generator=generator)


# --- attaching the surrogate to a model -------------------------------------------------------

class SimulatedErrorHooks:
    """Forward hooks that add per-product simulated error to every approximate layer's output.

    Noise is added only while the layer is in training mode and :attr:`enabled` is true,
    so evaluation measures the layer as it is (LUT or exact products). Use
    :func:`attach_simulated_error` to create one; :meth:`remove` detaches the hooks.

    Attributes:
        sim: the error model.
        operands: ``"codes"`` or ``"values"`` (see :func:`attach_simulated_error`).
        enabled: switch the noise on or off without removing the hooks.
        noisy_forwards: how many layer forwards received noise (for bookkeeping and tests).
    """

    def __init__(self, model: nn.Module, sim: SimulatedError, operands: str = "codes",
                 layers: Iterable[nn.Module] | None = None):
        if not isinstance(sim, SimulatedError):
            raise InvalidTypeError(f"attach_simulated_error needs a SimulatedError, not {type(sim).__name__}")
        if operands not in NOISE_OPERANDS:
            raise InvalidValueError(f"Simulated-error operands must be 'codes' or 'values', not {operands!r}")
        self.sim = sim
        self.operands = operands
        self.enabled = True
        self.noisy_forwards = 0
        chosen = None if layers is None else {id(m) for m in layers}
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, (ApproxLinear, ApproxConv2d)) and (chosen is None or id(m) in chosen)]
        if not self._handles:
            raise InvalidValueError("Model has no approximate layers to add simulated error to; "
                             "convert it with approximate_ first")

    def remove(self) -> None:
        """Detach every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not (self.enabled and module.training):
            return None
        # The forward already updated the observer; the layer's quantize() freezes it, so these
        # are exactly the operands the forward used and the range is not observed twice.
        q = module.quantize(inputs[0])
        qx, sx, zx, qw, sw, zw = q.qx, q.scale_x, q.zero_x, q.qw, q.scale_w, q.zero_w
        if self.operands == "values":
            qw = qw - zw
        if isinstance(module, ApproxLinear):
            if self.operands == "values":
                qx = qx - zx
            noise = product_noise_linear(qx, qw, self.sim)
            scale = sx * (sw.reshape(1, -1) if sw.dim() else sw)
            noise = (noise * scale).reshape(output.shape)
        else:  # qx is padded with the zero point, as the layer pads it
            if self.operands == "values":
                qx = qx - zx  # padded positions become value 0: no product, no noise
            noise = product_noise_conv2d(qx, qw, self.sim, stride=module.stride, dilation=module.dilation,
                                         groups=module.groups)
            scale = sx * (sw.reshape(1, -1, 1, 1) if sw.dim() else sw)
            noise = noise * scale
        self.noisy_forwards += 1
        return output + noise.to(output.dtype).detach()


def attach_simulated_error(model: nn.Module, sim: SimulatedError, operands: str = "codes",
                           layers: Iterable[nn.Module] | None = None) -> SimulatedErrorHooks:
    """Add per-product simulated error to the approximate layers of ``model`` in training.

    Typically the layers are switched to exact multiplication (:func:`appmult.nn.exact_`)
    while training with the surrogate, and evaluated on the real LUT afterwards.

    Args:
        model: a model converted with :func:`appmult.nn.approximate_`.
        sim: the error model.
        operands: which products the relative error applies to. ``"codes"`` (default): the
            integer codes the multiplier receives, ``qx * qw`` -- what the hardware
            multiplies and what a LUT's MRE is measured on. With unsigned (asymmetric)
            quantization these products include the zero points, so the noise is large
            compared with the zero-point-corrected signal. ``"values"``: the
            zero-point-corrected products ``(qx - zx) * (qw - zw)``, i.e. ``x * w`` of the
            network, as in the paper's floating-point simulation.
        layers: only these approximate layers of ``model`` (default: all of them).

    Returns:
        The :class:`SimulatedErrorHooks` (call ``.remove()`` to detach).

    Raises:
        TypeError: ``sim`` is not a :class:`SimulatedError`.
        ValueError: the model has no approximate layers, or unknown ``operands``.
    """
    return SimulatedErrorHooks(model, sim, operands, layers)
