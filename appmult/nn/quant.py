"""Quantizers matched to a LUT: integer operands of the LUT's width and signedness.

* **Signed LUT -> symmetric**: ``q = clamp(round(x / s), -2**(w-1), 2**(w-1) - 1)``,
  zero point 0, ``s = max|x| / 2**(w-1)``. Dividing by a power of two is exact in binary
  floating point, so ``-max|x|`` maps to exactly ``-2**(w-1)``: the most negative code is
  reachable (a signed 8-bit multiplier sees -128, as the hardware does). ``+max|x|``
  clamps to ``2**(w-1) - 1``, one step low -- the price of using all ``2**w`` codes.
  (``s = max|x| / (2**(w-1) - 0.5)`` would reach -128 only when ``x / s`` happens to
  round to ``-127.5`` or below in float32, which it often does not.)
* **Unsigned LUT -> asymmetric**: ``q = clamp(round(x / s) + Z, 0, 2**w - 1)`` with an
  integer zero point ``Z`` (a *code*), range widened to include 0 so that 0 (ReLU
  outputs, padding) is exact: ``s = (max - min) / (2**w - 1)``, ``Z = round(-min / s)``.
  Layers then compute ``sum AM(qx, qw) - qx Zw - Zx qw + Zx Zw`` exactly.

Weights are quantized per output channel (default) or per tensor from their current
values on every forward (they change during training). Activations are quantized per
tensor from an observer: ``"minmax"`` (running min/max) or ``"moving_average"``
(exponential moving average of batch min/max, the usual choice for quantization-aware
training). Observers update in training mode and during :func:`calibrate`; in eval mode
they are frozen (an observer that has never seen data initializes from its first batch).

Gradients: clipped straight-through estimator, ``dq/dx = 1/s`` where ``x`` lies inside
the representable range and 0 outside. Scales are statistics, not learned.
"""

from __future__ import annotations

import contextlib
import enum
import math
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from . import quant_loops as loops
from .kernels import numba_available

__all__ = [
    "ActivationQuantizer",
    "Observer",
    "WeightQuantizer",
    "WeightScheme",
    "calibrate",
    "calibrating",
    "frozen",
    "quant_range",
]


class Observer(str, enum.Enum):
    """How an activation quantizer tracks its range."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"


class WeightScheme(str, enum.Enum):
    """Granularity of the weight scale."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


def quant_range(width: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``width``-bit operand."""
    if signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def _non_finite(what: str) -> InvalidValueError:
    return InvalidValueError(f"{what} input contains NaN or Inf; approximate layers quantize their inputs and "
                             f"cannot represent non-finite values")


def _non_finite_weight(what: str) -> InvalidValueError:
    return InvalidValueError(f"{what} weight contains NaN or Inf; approximate layers quantize their weights and "
                             f"cannot represent non-finite values")


def _all_finite(x: torch.Tensor) -> bool:
    # A NaN or Inf anywhere makes the sum non-finite: one cheap reduction (~3x faster than
    # aminmax). Only when the sum is not finite (or overflowed) do min/max decide.
    return not x.numel() or bool(torch.isfinite(x.sum())) \
        or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse an ``x`` holding NaN or Inf (``what`` names the caller in the error)."""
    if not _all_finite(x):
        raise _non_finite(what)


def _rows(x: torch.Tensor, scale: torch.Tensor) -> int | None:
    """Rows of the ``(C, L)`` view in which :mod:`appmult.nn.quant_loops` quantizes ``x``
    with ``scale`` (one value, or one per index of dim 0), or ``None`` where it cannot: not
    on the CPU, not float32, not contiguous, another broadcast, or no numba."""
    if x.device.type != "cpu" or scale.device.type != "cpu" or x.dtype != torch.float32 \
            or scale.dtype != torch.float32 or not x.is_contiguous() or x.dim() == 0 or not (loops.AVAILABLE and numba_available()):
        return None
    if scale.numel() == 1 and scale.dim() <= x.dim():
        return 1
    if scale.dim() == x.dim() and scale.shape[0] == x.shape[0] and scale.numel() == x.shape[0]:
        return x.shape[0]
    return None


def _fused_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      mask: bool):
    """``(q, inside or None, finite)`` by one numba pass (the torch path's bits; ``finite``:
    whether every input was finite), or ``None``."""
    rows = _rows(x, scale)
    if rows is None or zero_point.dtype != torch.float32 or zero_point.shape != scale.shape:
        return None
    q = torch.empty_like(x)
    inside = torch.empty_like(x, dtype=torch.bool) if mask else None
    # numpy-side reshapes (views of contiguous arrays; a few times cheaper than torch's)
    tops = loops.fake_quant(x.detach().numpy().reshape(rows, -1), _flat_numpy(scale), _flat_numpy(zero_point),
                            qmin, qmax, q.numpy().reshape(rows, -1),
                            inside.numpy().reshape(rows, -1) if mask else _NO_MASK)
    return q, inside, tops < loops.NON_FINITE


#: The empty mask of :func:`appmult.nn.quant_loops.fake_quant` (none written).
_NO_MASK = np.empty((0, 0), dtype=np.bool_)
#: The empty int8 side and table of :func:`appmult.nn.quant_loops.range_fake_quant` (none made).
_NO_SIDE = np.empty(0, dtype=np.int8)
_NO_TABLE = np.empty(0, dtype=np.int8)


def _flat_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 CPU tensor's values as a flat numpy array (a view where contiguous, else a copy)."""
    return t.detach().numpy().reshape(-1)


class _FakeQuantSTE(torch.autograd.Function):
    """Integer-valued quantization with a clipped straight-through gradient (``done``: the
    codes and the mask ``(q, inside)`` already computed without autograd, e.g. by
    :func:`_fused_channel_quant`; the node then only carries the gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int, what: str | None = None, done=None) -> torch.Tensor:
        q, inside = done if done is not None else _codes_and_mask(x, scale, zero_point, qmin, qmax, what)
        ctx.save_for_backward(inside, scale)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inside, scale = ctx.saved_tensors
        return _ste_backward(grad, inside, scale), None, None, None, None, None, None


def _codes_and_mask(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    what: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, inside)``: the codes ``clamp(round(x / s + Z))`` and the straight-through mask
    (where ``x / s + Z`` lies within half a step of the code range), without autograd -- by
    one numba pass where it runs, else by torch. With ``what``, NaN or Inf in ``x`` raises
    :class:`InvalidValueError` naming it."""
    fused = None if scale.requires_grad or zero_point.requires_grad else \
        _fused_fake_quant(x, scale, zero_point, qmin, qmax, mask=True)
    if fused is not None:
        q, inside, finite = fused
        if what is not None and not finite:
            raise _non_finite(what)
        return q, inside
    if what is not None:
        check_finite(x, what)
    t = x.detach() / scale.detach() + zero_point.detach()
    inside = (t >= qmin - 0.5) & (t <= qmax + 0.5)
    return torch.clamp(torch.round(t), qmin, qmax), inside


def _ste_backward(grad: torch.Tensor, inside: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The straight-through gradient ``grad * inside / scale`` (by one numba pass where it
    runs and no graph of the backward is being built, else by torch: the same bits)."""
    rows = _rows(grad, scale)
    if rows is not None and not torch.is_grad_enabled():
        return _ste_rows(grad, inside, scale, rows)
    return grad * inside / scale


def _ste_rows(grad: torch.Tensor, inside: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`_ste_backward` by its numba pass, without its checks: float32 CPU contiguous
    ``grad`` and ``inside`` of one shape, ``scale`` one value (``rows`` 1) or one per index
    of dim 0 (``rows``: that size), no graph being built."""
    out = torch.empty_like(grad)
    loops.ste_grad(grad.numpy().reshape(rows, -1), inside.numpy().reshape(rows, -1), _flat_numpy(scale),
                   out.numpy().reshape(rows, -1))
    return out


def _fused_channel_quant(w: torch.Tensor, wq: "WeightQuantizer", mask: bool):
    """``(q, inside or None, scale, zero_point, finite)`` of a per-channel weight quantization
    by one numba pass (:func:`appmult.nn.quant_loops.channel_fake_quant`: each channel's
    range, scale and zero point, then its codes -- the bits of ``scale_zero_point`` and the
    torch fake quantization), or ``None`` where it does not run (not float32 CPU, no numba,
    fewer than two dimensions, an empty weight)."""
    if w.dim() < 2 or w.numel() == 0 or w.device.type != "cpu" or w.dtype != torch.float32 \
            or not (loops.AVAILABLE and numba_available()):
        return None
    x = w.detach().reshape(w.shape[0], -1).contiguous()
    rows = x.shape[0]
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = torch.empty(rows, dtype=torch.float32)
    zp = torch.empty(rows, dtype=torch.float32)
    q = torch.empty(x.shape, dtype=torch.float32)
    inside = torch.empty(x.shape, dtype=torch.bool) if mask else torch.empty((0, 0), dtype=torch.bool)
    tops = loops.channel_fake_quant(x.numpy(), wq.qmin, wq.qmax, wq.signed, scale.numpy(), zp.numpy(), q.numpy(),
                                    inside.numpy())
    return (q.reshape(w.shape), inside.reshape(w.shape) if mask else None, scale.reshape(shape), zp.reshape(shape),
            tops < loops.NON_FINITE)


def _fake_quant_nograd(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       qmin: int, qmax: int, what: str | None = None) -> torch.Tensor:
    """``_FakeQuantSTE``'s forward without the STE mask or autograd: one new tensor, then in
    place (``x / s``, ``+ Z``, round, clamp -- the same float operations in the same order,
    so bit-identical to ``clamp(round(x / s + Z))``)."""
    fused = _fused_fake_quant(x, scale, zero_point, qmin, qmax, mask=False)
    if fused is not None:
        if what is not None and not fused[2]:
            raise _non_finite(what)
        return fused[0]
    if what is not None:
        check_finite(x, what)
    t = torch.div(x, scale)
    t.add_(zero_point)
    t.round_()
    return t.clamp_(qmin, qmax)


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                what: str | None = None) -> torch.Tensor:
    """Integer-valued quantization; the STE autograd function only where a gradient can flow.

    With ``what``, an ``x`` holding NaN or Inf raises :class:`InvalidValueError` naming
    ``what`` -- found by the quantizing pass itself where the numba kernel runs (no pass of
    its own), else by :func:`check_finite` first.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, what)
    return _fake_quant_nograd(x, scale, zero_point, qmin, qmax, what)


def _scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, width: int, signed: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the range ``[lo, hi]``: by one numba call for a float32 CPU
    scalar range (:func:`_range_scale_zero_point`), else by the torch expressions -- the
    same bits either way."""
    fast = _range_scale_zero_point(lo, hi, width, signed)
    return fast if fast is not None else _torch_scale_zero_point(lo, hi, width, signed)


def _torch_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, width: int, signed: bool
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the range ``[lo, hi]`` (tensors of any shape) by torch ops."""
    qmin, qmax = quant_range(width, signed)
    # Divided by a tensor on the operands' device, never by a Python number: CUDA divides a
    # tensor by a host scalar as a multiplication by its rounded reciprocal, one ulp off
    # the CPU's (and the numba kernels') correctly rounded quotient for some ranges.
    if signed:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / torch.full_like(amax, qmax + 1)
        zp = torch.zeros_like(scale)
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = (hi - lo) / torch.full_like(hi, qmax)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / safe), 0, qmax)
    # A constant-zero tensor has no range; any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zp


def _range_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, width: int, signed: bool
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`_scale_zero_point` of one float32 CPU range (an activation observer's) by
    :func:`appmult.nn.quant_loops.range_scale_zero_point` -- the same float32 operations, so
    the same bits, in one call instead of a dozen scalar torch ops (each a few microseconds,
    paid by every training forward) -- or ``None`` where it does not apply."""
    if lo.dim() != 0 or hi.dim() != 0 or lo.dtype != torch.float32 or hi.dtype != torch.float32 \
            or lo.device.type != "cpu" or hi.device.type != "cpu" or lo.requires_grad or hi.requires_grad \
            or not (loops.AVAILABLE and numba_available()):
        return None
    s, z = loops.range_scale_zero_point(np.float32(lo.item()), np.float32(hi.item()), quant_range(width, signed)[1],
                                        signed)
    return torch.from_numpy(np.array(s, dtype=np.float32)), torch.from_numpy(np.array(z, dtype=np.float32))


class _Quantizer(nn.Module):
    def __init__(self, width: int, signed: bool):
        super().__init__()
        self.width = int(width)
        self.signed = bool(signed)

    @property
    def qmin(self) -> int:
        return quant_range(self.width, self.signed)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.width, self.signed)[1]

    def extra_repr(self) -> str:
        return f"{self.width}-bit {'signed symmetric' if self.signed else 'unsigned asymmetric'}"


class WeightQuantizer(_Quantizer):
    """Quantizes a weight tensor from its own current range (per channel along dim 0, or per tensor).

    Args:
        width: operand width of the LUT side that receives weights.
        signed: LUT signedness (symmetric when signed, asymmetric otherwise).
        scheme: ``"per_channel"`` or ``"per_tensor"``.
    """

    def __init__(self, width: int, signed: bool, scheme: str | WeightScheme = WeightScheme.PER_CHANNEL):
        super().__init__(width, signed)
        self.scheme = WeightScheme(scheme)

    def scale_zero_point(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point, shaped ``(C, 1, ...)`` per channel or ``()`` per tensor."""
        w = w.detach()
        if self.scheme is WeightScheme.PER_CHANNEL:
            flat = w.reshape(w.shape[0], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)  # (min/max with indices: ~10x slower)
            s, z = _scale_zero_point(lo, hi, self.width, self.signed)
            shape = (-1,) + (1,) * (w.dim() - 1)
            return s.reshape(shape), z.reshape(shape)
        return _scale_zero_point(w.min(), w.max(), self.width, self.signed)

    def forward(self, w: torch.Tensor, what: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(q, scale, zero_point)``; ``q`` holds integer values (float dtype, STE gradient).

        With ``what`` (the layer's name), a ``w`` holding NaN or Inf raises
        :class:`InvalidValueError` ("<what> weight contains NaN or Inf"): found by the
        quantizing pass itself where the per-channel numba kernel runs, else by a check first.
        """
        grad = torch.is_grad_enabled() and w.requires_grad
        fused = _fused_channel_quant(w, self, mask=grad) if self.scheme is WeightScheme.PER_CHANNEL else None
        if fused is not None:
            q, inside, s, z, finite = fused
            if what is not None and not finite:
                raise _non_finite_weight(what)
            if grad:
                q = _FakeQuantSTE.apply(w, s, z, self.qmin, self.qmax, None, (q, inside))
            return q, s, z
        if what is not None and not _all_finite(w.detach()):
            raise _non_finite_weight(what)
        s, z = self.scale_zero_point(w)
        return _fake_quant(w, s, z, self.qmin, self.qmax), s, z

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.scheme.value}"


class ActivationQuantizer(_Quantizer):
    """Per-tensor activation quantizer with a range observer.

    Args:
        width: operand width of the LUT side that receives activations.
        signed: LUT signedness.
        observer: ``"moving_average"`` or ``"minmax"``.
        momentum: weight of a new batch in the moving average.

    Attributes:
        observing: ``None`` (update in training mode), ``True`` (always) or ``False`` (frozen).
    """

    def __init__(self, width: int, signed: bool, observer: str | Observer = Observer.MOVING_AVERAGE,
                 momentum: float = 0.1):
        super().__init__(width, signed)
        self.observer = Observer(observer)
        self.momentum = float(momentum)
        self.observing: bool | None = None
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def reset(self) -> None:
        """Forget the observed range."""
        self.min_val.zero_()
        self.max_val.zero_()
        self.initialized.fill_(False)

    def _apply(self, fn, recurse=True):
        # The range statistics stay in float32 or wider (``model.half()`` would round the
        # observed range and its moving average), and storage that leaves the meta device
        # (``to_empty``) holds no range yet.
        leaving_meta = self.initialized.is_meta

        def wide(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                keep = t.dtype if torch.finfo(t.dtype).bits >= 32 else torch.float32
                out = t.to(device=out.device, dtype=keep)
            return out

        super()._apply(wide, recurse)
        if leaving_meta and not self.initialized.is_meta:
            self.reset()
        return self

    @torch.no_grad()
    def observe(self, x: torch.Tensor, what: str | None = None) -> None:
        """Update the range from a batch (an empty batch has none: nothing changes).

        With ``what``, a batch holding NaN or Inf (its min or max is not finite) raises
        :class:`InvalidValueError` naming ``what``, before the range changes.
        """
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)  # one pass (min and max separately were two)
        if what is not None:
            # two host reads on the CPU (~1 us) instead of four scalar ops (~20 us); one
            # read (one synchronization) elsewhere
            finite = math.isfinite(lo.item()) and math.isfinite(hi.item()) if x.device.type == "cpu" \
                else bool(torch.isfinite(lo) & torch.isfinite(hi))
            if not finite:
                raise _non_finite(what)
        # (the buffers read from the module's dict: each nn.Module attribute look-up costs
        # about a microsecond, and this runs at every training forward)
        bufs = self._buffers
        min_val, max_val, initialized = bufs["min_val"], bufs["max_val"], bufs["initialized"]
        if lo.dtype != min_val.dtype:
            lo = lo.to(min_val.dtype)
        if hi.dtype != max_val.dtype:
            hi = hi.to(max_val.dtype)
        if not initialized.item():
            min_val.copy_(lo)
            max_val.copy_(hi)
            initialized.fill_(True)
        elif self.observer is Observer.MINMAX:
            torch.minimum(min_val, lo, out=min_val)
            torch.maximum(max_val, hi, out=max_val)
        else:
            min_val.lerp_(lo, self.momentum)
            max_val.lerp_(hi, self.momentum)

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current scale and zero point (scalars)."""
        return _scale_zero_point(self.min_val, self.max_val, self.width, self.signed)

    def forward(self, x: torch.Tensor, what: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(q, scale, zero_point)``; ``q`` holds integer values (float dtype, STE gradient).

        With ``what``, an ``x`` holding NaN or Inf raises :class:`InvalidValueError` naming
        ``what`` and changes nothing: found by the observer's min/max where it updates, else
        by the quantizing pass (see :func:`_fake_quant`).
        """
        s, z, check = self._current_range(x, what)
        return _fake_quant(x, s, z, self.qmin, self.qmax, check), s, z

    def codes(self, x: torch.Tensor, what: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s codes without autograd, with the straight-through mask:
        ``(q, inside, scale, zero_point)`` (the observer updated as by :meth:`forward`)."""
        fused = self.step_codes(x, what)
        if fused is not None:
            return fused
        s, z, check = self._current_range(x, what)
        q, inside = _codes_and_mask(x, s, z, self.qmin, self.qmax, check)
        return q, inside, s, z

    def step_codes(self, x: torch.Tensor, what: str | None = None, side=None):
        """:meth:`codes` by one numba pass that also makes the scale and zero point
        (:func:`appmult.nn.quant_loops.range_fake_quant`; the same bits), or ``None`` where
        it does not run (then nothing has changed): ``x`` or the range not float32 on the
        CPU, ``x`` not contiguous, no numba. ``side``: ``(a, ox, table, lo_x, centered)``,
        the linear int8 GEMM's activation side made in the same pass (see there)."""
        bufs = self._buffers
        lo, hi = bufs["min_val"], bufs["max_val"]
        if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous() or lo.dtype != torch.float32 \
                or hi.dtype != torch.float32 or lo.device.type != "cpu" or hi.device.type != "cpu" \
                or not (loops.AVAILABLE and numba_available()):
            return None
        observed = self._observes(x, what)
        q, inside, sz = torch.empty_like(x), torch.empty_like(x, dtype=torch.bool), torch.empty(2)
        a, ox, table, lo_x, centered = side or (_NO_SIDE, 0, _NO_TABLE, 0, False)
        tops = loops.range_fake_quant(x.detach().numpy(), np.float32(lo.item()), np.float32(hi.item()), self.qmin,
                                      self.qmax, self.signed, sz.numpy(), q.numpy(), inside.numpy(), ox, table, lo_x,
                                      centered, a)
        if what is not None and not observed and tops >= loops.NON_FINITE:
            raise _non_finite(what)
        return q, inside, sz[0], sz[1]

    def _current_range(self, x: torch.Tensor, what: str | None) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """``(scale, zero_point, what)`` for quantizing ``x``: the range updated from ``x``
        where the observer updates (which checks ``x`` is finite: the returned ``what`` is
        then ``None``), else the kept one (``what`` returned: the quantizing pass checks)."""
        if self._observes(x, what):
            s, z = self.scale_zero_point()
            return s, z, None
        s, z = self._kept_scale_zero_point()
        return s, z, what

    def _observes(self, x: torch.Tensor, what: str | None) -> bool:
        """Update the range from ``x`` where the observer updates (training, or ``observing``
        set; always before a first range) -- refusing NaN and Inf named by ``what`` before it
        changes --, and say whether it did."""
        update = self.training if self.observing is None else self.observing
        if update or not self._buffers["initialized"].item():
            self.observe(x, what)
            return True
        return False

    def _kept_scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`scale_zero_point` of a range that is not being updated, kept between forwards
        while the range holds the same values (a dozen scalar ops saved per eval forward)."""
        lo, hi = self.min_val, self.max_val
        kept = self.__dict__.get("_kept_szp")
        if kept is None or kept[0] != (self.width, self.signed, lo.dtype, lo.device) \
                or not (torch.equal(kept[1], lo) and torch.equal(kept[2], hi)):
            kept = ((self.width, self.signed, lo.dtype, lo.device), lo.clone(), hi.clone(), self.scale_zero_point())
            self.__dict__["_kept_szp"] = kept
        return kept[3]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.observer.value}"


@contextlib.contextmanager
def _observers(module: nn.Module, observing: bool, reset: bool, what: str) -> Iterator[nn.Module]:
    """Set ``observing`` on every activation quantizer in ``module``; restore it on exit, even on errors."""
    if not isinstance(module, nn.Module):
        raise InvalidTypeError(f"{what} needs a torch.nn.Module, not {type(module).__name__}")
    quants = [m for m in module.modules() if isinstance(m, ActivationQuantizer)]
    saved = [q.observing for q in quants]
    try:
        for q in quants:
            if reset:
                q.reset()
            q.observing = observing
        yield module
    finally:
        for q, s in zip(quants, saved):
            q.observing = s


def calibrating(model: nn.Module, *, reset: bool = True) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: activation observers of ``model`` update on every forward (any mode).

    Args:
        model: a model with approximate layers.
        reset: forget previously observed ranges first.

    Returns:
        A context manager that yields ``model``. Observers return to their previous
        setting on exit.

    Raises:
        InvalidTypeError: ``model`` is not a ``torch.nn.Module``.
    """
    return _observers(model, True, reset, "calibrating")


def frozen(module: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: activation observers in ``module`` do not update (any mode).

    For analysis passes that must quantize exactly as the last forward did (``int_forward``,
    operand recording, the RTL check). An observer that has never seen data still takes its
    range from its first batch, as in eval mode.

    Args:
        module: a model, an approximate layer or an :class:`ActivationQuantizer`.

    Returns:
        A context manager that yields ``module``. Every observer's previous ``observing``
        setting is restored on exit, also when the body raises.

    Raises:
        InvalidTypeError: ``module`` is not a ``torch.nn.Module``.

    Example:
        >>> with frozen(model):                                   # doctest: +SKIP
        ...     acc = layer.int_forward(x)
    """
    return _observers(module, False, False, "frozen")


@torch.no_grad()
def calibrate(model: nn.Module, loader: Iterable, num_batches: int | None = None) -> nn.Module:
    """Run batches through ``model`` (eval mode, no gradients) to set activation ranges.

    Args:
        model: a model with approximate layers.
        loader: iterable of inputs, or of ``(inputs, targets, ...)`` tuples.
        num_batches: stop after this many batches (all when ``None``).

    Returns:
        ``model`` (its training flag is restored).
    """
    was_training = model.training
    model.eval()
    try:
        with calibrating(model):
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x)
    finally:
        model.train(was_training)
    return model
