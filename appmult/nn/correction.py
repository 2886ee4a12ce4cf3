"""Control-variate correction of an approximate multiplier's accumulated error (no retraining).

After Zervakis et al. (DAC 2021; arXiv 2412.16757). For a multiplier whose error is close
to linear in the activation operand,

    e(a, w) = LUT[a, w] - a*w  ~  alpha(w) * a + beta(w),

one output's accumulated error over its fan-in ``K`` is ``sum_k alpha(w_k) a_k + beta(w_k)``.
Weights are fixed at inference, so per output channel we precompute
``alpha_bar = mean_k alpha(w_k)`` and ``B = sum_k beta(w_k)``; at run time one extra
accumulator sums the activations and the output is corrected by
``-(alpha_bar * sum_k a_k + B)``. This is a *control variate*: it removes the error's
expected value (and its part that follows ``sum a``), not each product's error -- unless
``alpha(w)`` is the same for every weight of a channel, ``sum_k alpha(w_k) a_k`` differs
from ``alpha_bar * sum_k a_k`` by ``sum_k (alpha(w_k) - alpha_bar) a_k``.

**Value convention.** ``a`` and ``w`` are the operand *values the multiplier sees*: the
codes read with the LUT's signedness -- two's complement values for a signed LUT; for an
unsigned LUT the codes themselves (``0 .. 2**w - 1``), *not* ``code - zero_point``.
The layers accumulate the raw ``sum LUT[qx, qw]`` and subtract the zero-point cross terms
exactly afterwards (``- qx Zw - Zx qw + Zx Zw``); the multiplier's error lives entirely in
the raw accumulator and depends only on the raw codes, so the correction is applied to the
raw accumulator, with ``sum a`` the sum of the raw activation codes. A padded position of a
convolution holds the code ``Zx`` and contributes ``LUT[Zx, w]``, so it is counted in ``K``
and contributes ``Zx`` to ``sum a``. (Fitting against ``a - Zx`` instead would only move
a constant between ``alpha`` and ``beta``.)

**Fit.** Per weight code ``w``, least squares of ``e(., w)`` on ``a`` over all activation
codes, optionally weighted by an activation histogram ``p(a)``:
``alpha = cov_p(a, e) / var_p(a)``, ``beta = mean_p(e) - alpha * mean_p(a)``. A histogram
with a single occupied code has no slope: then ``alpha = 0`` and ``beta = e(a0, w)``.
For weight-side perforation (partial-product rows ``j < m`` of the weight omitted)
``e = -a * (w mod 2**m)``: the fit is exact, ``alpha(w) = -(w mod 2**m)``, ``beta = 0``.

**Fixed point (what the hardware holds; ``F`` = ``frac_bits``).** ``round(x)`` means
round half up, ``floor(x + 1/2)``, in exact integer arithmetic wherever the operand is
already an integer ratio:

1. per weight code: ``alpha_q(w) = round(alpha(w) * 2**F)`` and
   ``beta_q(w) = round(beta(w) * 2**F)`` (int64; the only floating-point step);
2. per output channel with weight codes ``w_1 .. w_K``:
   ``alpha_fx = round(sum_k alpha_q(w_k) / K)`` -- a signed integer, ``alpha_bar`` with
   ``F`` fractional bits -- and ``B = round(sum_k beta_q(w_k) / 2**F)`` -- an integer;
3. per output, with ``S = sum_k a_k``: ``c = floor((alpha_fx * S + 2**(F-1)) / 2**F) + B``
   (for ``F = 0``: ``c = alpha_fx * S + B``), i.e. an arithmetic right shift by ``F`` after
   adding half an LSB; the corrected accumulator is ``acc - c``.

Steps 2 and 3 are integer-only, so the layer (:meth:`~appmult.nn.ApproxLinear.int_forward_corrected`),
the numpy reference :func:`correct_accumulator` and the RTL MAC
(:class:`appmult.hdl.MacUnit` with ``correction=True``) agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..codes import codes_to_values
from ..errors import InvalidTypeError, InvalidValueError
from ..lut_gen.lutfile import LutFile
from ..reference import check_frac_bits, correction_term, round_half_up_div

__all__ = [
    "ControlVariate",
    "channel_correction",
    "fit_error_model",
    "quantize_error_model",
]



def _histogram(hist, n: int, operand: str) -> np.ndarray | None:
    if hist is None:
        return None
    p = np.asarray(hist, dtype=np.float64)
    if p.shape != (n,):
        raise InvalidValueError(f"Activation histogram must have {n} entries (one per code of operand {operand}), "
                         f"not shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise InvalidValueError("Activation histogram must hold finite non-negative counts with a positive sum")
    return p


def fit_error_model(lut: LutFile, hist_a=None, *, activation_operand: str = "a"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit ``LUT[a, w] - a*w ~ alpha(w) * a + beta(w)`` for every weight code.

    Args:
        lut: the multiplier's LUT.
        hist_a: optional weights over the *activation operand's codes* (length
            ``2**width`` of that operand), e.g. a histogram of a layer's quantized inputs;
            ``None`` weighs every code equally.
        activation_operand: which LUT operand receives activations, ``"a"`` (default, the
            RTL MAC's order) or ``"b"``; the other one is the weight.

    Returns:
        ``(alpha, beta)``: float64 arrays indexed by the weight operand's *code*
        (``2**width_w`` entries each).

    Raises:
        TypeError: ``lut`` is not a LutFile.
        ValueError: a bad operand name or histogram.
    """
    if not isinstance(lut, LutFile):
        raise InvalidTypeError(f"fit_error_model needs a LutFile, not {type(lut).__name__}")
    if activation_operand not in ("a", "b"):
        raise InvalidValueError(f"Activation operand must be 'a' or 'b', not {activation_operand!r}")
    prod = lut.product if activation_operand == "a" else lut.product.T
    wx, ww = (lut.width_a, lut.width_b) if activation_operand == "a" else (lut.width_b, lut.width_a)
    x = codes_to_values(np.arange(1 << wx), wx, lut.signed).astype(np.float64)
    w = codes_to_values(np.arange(1 << ww), ww, lut.signed).astype(np.float64)
    err = prod.astype(np.float64) - np.outer(x, w)          # [x_code, w_code]
    p = _histogram(hist_a, 1 << wx, activation_operand)
    p = np.full(1 << wx, 1.0) if p is None else p
    p = p / p.sum()
    mx = p @ x
    dx = x - mx
    var = p @ (dx * dx)
    me = p @ err                                             # per w code
    if var <= 0:
        # One occupied activation code: no slope to fit, only the offset.
        return np.zeros(1 << ww), me
    alpha = (p * dx) @ (err - me) / var
    beta = me - alpha * mx
    return alpha, beta


def quantize_error_model(alpha, beta, frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the fixed-point format: ``round(alpha * 2**F)``, ``round(beta * 2**F)`` (int64).

    Raises:
        TypeError: bad ``frac_bits``.
        ValueError: non-finite coefficients.
    """
    f = check_frac_bits(frac_bits)
    out = []
    for name, v in (("alpha", alpha), ("beta", beta)):
        v = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise InvalidValueError(f"Error model {name} must be finite")
        out.append(np.floor(v * float(1 << f) + 0.5).astype(np.int64))
    return out[0], out[1]


def channel_correction(alpha_q, beta_q, w_codes, frac_bits: int):
    """Step 2: per output channel ``(alpha_fx, B)`` from the weight codes ``(C, K)``.

    Args:
        alpha_q: int64 ``alpha_q`` per weight code (from :func:`quantize_error_model`).
        beta_q: int64 ``beta_q`` per weight code.
        w_codes: integer weight codes, shape ``(C, K)`` (numpy or torch).
        frac_bits: ``F``.

    Returns:
        ``(alpha_fx, B)``, each ``(C,)`` int64, of the same array library as ``w_codes``.
    """
    f = check_frac_bits(frac_bits)
    k = int(w_codes.shape[1])
    if k < 1:
        raise InvalidValueError("A channel needs a fan-in of at least 1")
    sa = alpha_q[w_codes].sum(1)
    sb = beta_q[w_codes].sum(1)
    return round_half_up_div(sa, k), round_half_up_div(sb, 1 << f)


class ControlVariate(nn.Module):
    """A layer's control-variate correction: the fitted model as buffers, and its application.

    Buffers ``alpha_q`` and ``beta_q`` (int64, indexed by weight code) follow
    ``.to(device)``; they are derived from the LUT, so they are not saved in a state_dict.

    Args:
        lut: the multiplier's LUT.
        hist: optional activation histogram over the activation operand's codes.
        frac_bits: fractional bits ``F`` of ``alpha`` (0..24).
        activation_operand: ``"a"`` or ``"b"``.

    Raises:
        TypeError: bad ``frac_bits``.
        ValueError: a histogram that does not fit the LUT.
    """

    def __init__(self, lut: LutFile, hist=None, *, frac_bits: int = 8, activation_operand: str = "a"):
        super().__init__()
        self.frac_bits = check_frac_bits(frac_bits)
        self.width_w = lut.width_b if activation_operand == "a" else lut.width_a
        self._init_args = (lut, hist, dict(frac_bits=frac_bits, activation_operand=activation_operand))
        alpha, beta = fit_error_model(lut, hist, activation_operand=activation_operand)
        aq, bq = quantize_error_model(alpha, beta, self.frac_bits)
        self.register_buffer("alpha_q", torch.from_numpy(aq), persistent=False)
        self.register_buffer("beta_q", torch.from_numpy(bq), persistent=False)

    def _apply(self, fn, recurse=True):
        # Leaving the meta device (to_empty) the new storage holds no values: refit from the LUT.
        fresh: dict[str, torch.Tensor] = {}

        def refit(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_meta and not out.is_meta:
                if not fresh:
                    lut, hist, kw = self._init_args
                    fresh.update(ControlVariate(lut, hist, **kw)._buffers)
                name = next(k for k, b in self._buffers.items() if b is t)
                return fresh[name].to(device=out.device)
            return out

        return super()._apply(refit, recurse)

    def channel_params(self, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_fx, B)`` per output channel (int64, ``(C,)``) from quantized weight values.

        Args:
            qw: integer-valued weights ``(C, ...)`` (any dtype), values of the weight operand.
        """
        codes = torch.remainder(qw.detach().reshape(qw.shape[0], -1).to(torch.int64), 1 << self.width_w)
        return channel_correction(self.alpha_q, self.beta_q, codes, self.frac_bits)

    def term(self, act_sum: torch.Tensor, alpha_fx: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``c`` per output; ``act_sum`` int64 broadcast against per-channel parameters."""
        return correction_term(act_sum, alpha_fx, beta, self.frac_bits)

    def extra_repr(self) -> str:
        return f"control variate, alpha with {self.frac_bits} fractional bits"
