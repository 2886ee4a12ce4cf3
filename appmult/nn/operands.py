"""What the MAC of an approximate layer sees: its operand codes, one row of ``K`` pairs per output.

The operand path of :class:`~appmult.nn.ApproxConv2d` and :class:`~appmult.nn.ApproxLinear`
lives here once: the layer quantizes with its own quantizers (observers frozen,
:meth:`quantize`), pads a convolution's input with the activation zero point (``_pad``,
the one padding helper, also used by ``int_forward``), and the functions below cut the
result into the rows of ``K`` code pairs that one output's MAC multiplies and sums. Their
``sum LUT[a, b]`` over a row is that output's ``int_forward`` by construction.

Rows are gathered per *receptive field* (sample, group, output position): all output
channels of a group read the same field, so for ``groups == 1`` and depthwise convolutions
the per-output activation rows are broadcast views, not copies, and the memory is that of
an im2col of the input. ``positions`` picks a few outputs and gathers only their rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError

__all__ = ["LayerOperands", "QuantizedOperands"]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedOperands:
    """A layer's quantized operands before they are cut into MAC rows.

    Values are integers held in the layer's float dtype, as the layer computes with them;
    for an unsigned LUT they equal the operand codes, for a signed one they are the
    two's-complement values (see :class:`LayerOperands` for codes).

    Attributes:
        qx: activations: ``(N, C, H + 2*ph, W + 2*pw)`` for a conv layer, padded with
            ``zero_x``; ``(M, in_features)`` for a linear layer (leading dims flattened).
        scale_x: activation scale, shape ``()``.
        zero_x: activation zero point, shape ``()`` (0 for a signed LUT).
        qw: weights, ``(Cout, Cin/groups, kh, kw)`` or ``(out_features, in_features)``.
        scale_w: weight scale, ``(Cout, 1, ...)`` per channel or ``()`` per tensor.
        zero_w: weight zero point, shaped like ``scale_w``.
        padding: ``(ph, pw)`` already applied to ``qx`` (``(0, 0)`` for a linear layer).
    """

    qx: torch.Tensor
    scale_x: torch.Tensor
    zero_x: torch.Tensor
    qw: torch.Tensor
    scale_w: torch.Tensor
    zero_w: torch.Tensor
    padding: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerOperands:
    """The operand codes the MAC of each output receives (see :meth:`ApproxConv2d.operands`).

    Row ``[..., k]`` is the ``k``-th product of one output: ``sum_k LUT[a, b]`` over a row
    is that output's :meth:`~appmult.nn.ApproxConv2d.int_forward`. ``x``, ``w`` and
    ``is_padding`` may be broadcast views (stride 0) of smaller tensors: read them, do not
    write into them (``.contiguous()`` makes a copy). Compared and hashed by identity.

    Attributes:
        x: int64 activation codes (bit patterns, ``0 .. 2**width - 1``), ``(*shape, K)``.
        w: int64 weight codes, ``(*shape, K)``.
        is_padding: bool, ``(*shape, K)``: the activation is padding (the zero-point code).
        weight_codes: int64 ``(Cout, K)``: each output channel's weight row.
        out_shape: the layer's output, ``(N, Cout, Ho, Wo)`` for a conv layer,
            ``(M, out_features)`` for a linear one (leading dims flattened).
        activation_operand: the LUT operand that receives activations, ``"a"`` or ``"b"``.
        quantized: the :class:`QuantizedOperands` the rows were cut from (scales, zero points).
        positions: ``None`` when ``shape`` is ``out_shape`` (every output); else int64
            ``(P, len(out_shape))``, the output index of each of the ``P`` rows (``shape = (P,)``).
    """

    x: torch.Tensor
    w: torch.Tensor
    is_padding: torch.Tensor
    weight_codes: torch.Tensor
    out_shape: tuple[int, ...]
    activation_operand: str
    quantized: QuantizedOperands
    positions: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        """Codes on the LUT's operand ``a``."""
        return self.w if self.activation_operand == "b" else self.x

    @property
    def b(self) -> torch.Tensor:
        """Codes on the LUT's operand ``b``."""
        return self.x if self.activation_operand == "b" else self.w

    @property
    def fan_in(self) -> int:
        """Products per output, ``K``."""
        return int(self.x.shape[-1])

    @property
    def padded(self) -> torch.Tensor:
        """int64 ``shape``: how many of each row's ``K`` activations are padding."""
        return self.is_padding.sum(-1)


def _codes(values: torch.Tensor, width: int) -> torch.Tensor:
    """Integer operand values as ``width``-bit codes (two's complement for negatives), int64."""
    return torch.remainder(values.to(torch.int64), 1 << width)


def _pad(t: torch.Tensor, padding: tuple[int, int], value) -> torch.Tensor:
    """``t`` (``(..., H, W)``) with ``padding = (ph, pw)`` rows and columns of ``value`` on each side."""
    ph, pw = padding
    if not (ph or pw):
        return t
    return F.pad(t, (pw, pw, ph, ph), value=float(value))


def _positions(positions, out_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``positions`` as int64 ``(P, len(out_shape))``, every index inside ``out_shape``."""
    p = torch.as_tensor(positions, dtype=torch.int64).to(device)
    if p.numel() == 0:
        p = p.reshape(0, len(out_shape))
    if p.dim() != 2 or p.shape[1] != len(out_shape):
        raise InvalidValueError(f"positions must be index tuples of length {len(out_shape)} (the output has shape "
                                f"{out_shape}), not shape {tuple(p.shape)}")
    bad = ((p < 0) | (p >= torch.tensor(out_shape, device=device))).any(1)
    if bool(bad.any()):
        first = tuple(int(v) for v in p[bad][0])
        raise InvalidValueError(f"Position {first} is outside the layer's output of shape {out_shape}")
    return p


def _fields(t: torch.Tensor, n, g, y, x, *, group_channels: int, kernel_size, stride, dilation) -> torch.Tensor:
    """Receptive fields of the padded ``t`` (``(N, C, Hp, Wp)``) at broadcastable index tensors.

    Field ``(n, g, y, x)`` holds the ``K = group_channels * kh * kw`` inputs of group ``g``
    that output position ``(y, x)`` of sample ``n`` reads, channel-major as
    ``weight.reshape(Cout, -1)``. Returns ``broadcast(n, g, y, x).shape + (K,)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    dev = t.device
    ci = torch.arange(group_channels, device=dev).view(-1, 1, 1)
    i = torch.arange(kh, device=dev).view(1, -1, 1) * dh
    j = torch.arange(kw, device=dev).view(1, 1, -1) * dw
    e = (..., None, None, None)
    out = t[n[e], (g * group_channels)[e] + ci, (y * sh)[e] + i, (x * sw)[e] + j]
    return out.reshape(*out.shape[:-3], -1)


def _conv_operands(q: QuantizedOperands, *, kernel_size: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int], groups: int, width_x: int, width_w: int, activation_operand: str,
                  positions: Sequence[Sequence[int]] | torch.Tensor | None = None) -> LayerOperands:
    """MAC rows of a convolution from its quantized, padded operands.

    Args:
        q: the layer's :class:`QuantizedOperands` (``qx`` padded).
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        dilation: ``(dh, dw)``.
        groups: convolution groups.
        width_x: activation operand width.
        width_w: weight operand width.
        activation_operand: ``"a"`` or ``"b"``.
        positions: ``None`` for every output, else ``(n, cout, y, x)`` index tuples.

    Returns:
        The :class:`LayerOperands`.

    Raises:
        InvalidValueError: the padded input is smaller than the dilated kernel, or a
            position outside the output.
    """
    xp, qw = q.qx, q.qw
    n_, c_, hp, wp = xp.shape
    cout = qw.shape[0]
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise InvalidValueError(f"Padded input of {hp}x{wp} is smaller than the dilated {kh}x{kw} kernel")
    out_shape = (n_, cout, ho, wo)
    per_group = cout // groups
    geom = dict(group_channels=c_ // groups, kernel_size=kernel_size, stride=stride, dilation=dilation)
    xc = _codes(xp, width_x)
    # 1 where the padded input is real: the same padding helper, so the mask cannot drift.
    real = _pad(torch.ones(1, 1, hp - 2 * q.padding[0], wp - 2 * q.padding[1], device=xp.device),
               q.padding, 0.0).to(torch.bool).expand(n_, c_, hp, wp)
    wcodes = _codes(qw.reshape(cout, -1), width_w)
    k = wcodes.shape[1]
    if positions is None:
        dev = xp.device
        idx = (torch.arange(n_, device=dev).view(-1, 1, 1, 1), torch.arange(groups, device=dev).view(1, -1, 1, 1),
               torch.arange(ho, device=dev).view(1, 1, -1, 1), torch.arange(wo, device=dev).view(1, 1, 1, -1))

        def per_output(f: torch.Tensor) -> torch.Tensor:
            # (N, G, Ho, Wo, K) fields -> (N, Cout, Ho, Wo, K); a view when G == 1 or Cout == G.
            f = f.unsqueeze(2).expand(n_, groups, per_group, ho, wo, k)
            return f.reshape(n_, cout, ho, wo, k)

        x_rows = per_output(_fields(xc, *idx, **geom))
        pad_rows = per_output(~_fields(real, *idx, **geom))
        w_rows = wcodes.view(1, cout, 1, 1, k).expand(n_, cout, ho, wo, k)
        p = None
    else:
        p = _positions(positions, out_shape, xp.device)
        idx = (p[:, 0], p[:, 1] // per_group, p[:, 2], p[:, 3])
        x_rows = _fields(xc, *idx, **geom)
        pad_rows = ~_fields(real, *idx, **geom)
        w_rows = wcodes[p[:, 1]]
    return LayerOperands(x=x_rows, w=w_rows, is_padding=pad_rows, weight_codes=wcodes, out_shape=out_shape,
                         activation_operand=activation_operand, quantized=q, positions=p)


def _linear_operands(q: QuantizedOperands, *, width_x: int, width_w: int, activation_operand: str,
                    positions: Sequence[Sequence[int]] | torch.Tensor | None = None) -> LayerOperands:
    """MAC rows of a linear layer from its quantized operands (``q.qx`` is ``(M, in_features)``).

    Args:
        q: the layer's :class:`QuantizedOperands`.
        width_x: activation operand width.
        width_w: weight operand width.
        activation_operand: ``"a"`` or ``"b"``.
        positions: ``None`` for every output, else ``(row, out)`` index tuples.

    Returns:
        The :class:`LayerOperands` (``is_padding`` all false).

    Raises:
        InvalidValueError: a position outside the output.
    """
    xc, wcodes = _codes(q.qx, width_x), _codes(q.qw, width_w)
    (m, k), nout = xc.shape, wcodes.shape[0]
    out_shape = (m, nout)
    if positions is None:
        p = None
        x_rows = xc[:, None, :].expand(m, nout, k)
        w_rows = wcodes[None, :, :].expand(m, nout, k)
    else:
        p = _positions(positions, out_shape, xc.device)
        x_rows, w_rows = xc[p[:, 0]], wcodes[p[:, 1]]
    pad_rows = torch.zeros((), dtype=torch.bool, device=xc.device).expand(x_rows.shape)
    return LayerOperands(x=x_rows, w=w_rows, is_padding=pad_rows, weight_codes=wcodes, out_shape=out_shape,
                         activation_operand=activation_operand, quantized=q, positions=p)

