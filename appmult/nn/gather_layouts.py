"""The layouts of activation indices that the CPU gather kernels read.

A quantized convolution's activations become uint8 table indices (``value - lo_x``),
padded with the padding value's index, in one of three layouts: ``(N, C*kh*kw, Ho*Wo)``
(:func:`unfold_uint8`: the scalar row kernel of :mod:`appmult.nn.gather_loops`),
``(C*kh*kw, N*Ho*Wo)`` padded to a multiple of 64 (:func:`unfold_uint8_kp`: the byte-shuffle
kernel for any batch) and the padded image ``(C, Hp, Wp, Nb)`` with offsets that make each
receptive field's 64-image block a contiguous run (:func:`batch_inner_fields`: the
byte-shuffle kernel without an unfold). Every one checks the values first
(:func:`check_activations`; weight and other index tensors: :func:`check_indices`): the
compiled loops do not bounds-check.
"""

from __future__ import annotations

import numpy as np
import torch

from .byte_shuffle import LANES


def check_indices(idx: torch.Tensor, n: int, what: str) -> None:
    """Raise ``IndexError`` unless every entry of the integer tensor ``idx`` lies in ``0 .. n-1``.

    The compiled loops do not bounds-check (that would cost in their innermost loops), and
    the torch path's flat index ``a * ncols + b`` can land inside the table for a wrong
    ``a`` or ``b``: so every entry point checks here, before any dtype conversion (a cast
    to uint8 would wrap a bad index into range). uint8 indices into a table of 256 or more
    entries are in range by their type, which spares the check on the common 8-bit path.
    """
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{what} indices must be an integer tensor, not {idx.dtype}")
    if (idx.dtype == torch.uint8 and n >= 256) or idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = torch.stack((lo, hi)).tolist()  # one host sync
    if lo < 0 or hi >= n:
        dim = "rows" if what == "Activation" else "columns"
        raise IndexError(f"{what} indices outside the table's {n} {dim}: values in [{lo}, {hi}]")


def check_activations(q: torch.Tensor, lo_x: int, na: int, pad_value: int) -> None:
    """Raise ``IndexError`` unless ``pad_value`` and every activation value of ``q`` index the
    table's ``na`` rows (values ``lo_x .. lo_x + na - 1``; NaN fails)."""
    if not 0 <= pad_value - lo_x < na:
        raise IndexError(f"Padding value {pad_value} outside the LUT's range")
    if q.numel():
        lo_q, hi_q = (float(v) for v in torch.aminmax(q))
        if not (lo_q >= lo_x and hi_q <= lo_x + na - 1):  # also catches NaN
            raise IndexError(f"Quantized activations outside the LUT's range [{lo_x}, {lo_x + na - 1}]")


def unfold_cols(q: torch.Tensor, lo_x: int, na: int, pad_value: int, kernel_size, padding, stride,
                 dilation) -> torch.Tensor:
    """The receptive fields of ``q``'s uint8 indices: a ``(N, C, Ho, Wo, kh, kw)`` view.

    Raises:
        IndexError: ``pad_value`` or an activation outside the table's ``na`` values.
    """
    kh, kw = kernel_size
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    zidx = pad_value - lo_x
    check_activations(q, lo_x, na, pad_value)
    # torch's pad/unfold copy measured faster than a numba im2col loop (1.8 vs 3.7 ms, ResNet-20 size)
    idx = (q if lo_x == 0 else q - lo_x).to(torch.uint8)
    if ph or pw:
        idx = torch.nn.functional.pad(idx, (pw, pw, ph, ph), value=zidx)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    return idx.unfold(2, eh, sh).unfold(3, ew, sw)[..., ::dh, ::dw]       # (N, C, Ho, Wo, kh, kw)


def unfold_uint8(q: torch.Tensor, lo_x: int, na: int, pad_value: int, kernel_size, padding, stride,
                  dilation) -> np.ndarray:
    """``(N, C, H, W)`` activation values -> ``(N, C*kh*kw, L)`` uint8 indices, padded with
    ``pad_value``'s index, in :func:`torch.nn.functional.unfold` order.

    Raises:
        IndexError: ``pad_value`` or an activation outside the table's ``na`` values.
    """
    n, c = q.shape[:2]
    kh, kw = kernel_size
    cols = unfold_cols(q, lo_x, na, pad_value, kernel_size, padding, stride, dilation)
    ho, wo = cols.shape[2], cols.shape[3]
    return cols.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo).contiguous().numpy()


def unfold_uint8_kp(q: torch.Tensor, lo_x: int, na: int, pad_value: int, kernel_size, padding, stride,
                     dilation) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`unfold_uint8` laid out ``(C*kh*kw, N*Ho*Wo)`` (the positions of all images in
    one row, image-major), the row padded with zeros to a multiple of 64; and ``(Ho, Wo)``."""
    n, c = q.shape[:2]
    kh, kw = kernel_size
    cols = unfold_cols(q, lo_x, na, pad_value, kernel_size, padding, stride, dilation)
    ho, wo = cols.shape[2], cols.shape[3]
    npos = n * ho * wo
    lanes = LANES
    ai = torch.empty((c * kh * kw, -(-npos // lanes) * lanes), dtype=torch.uint8)
    ai[:, :npos].view(c, kh, kw, n, ho, wo).copy_(cols.permute(1, 4, 5, 0, 2, 3))
    ai[:, npos:] = 0
    return ai.numpy(), (ho, wo)


def batch_inner_fields(q: torch.Tensor, lo_x: int, na: int, pad_value: int, kernel_size, padding, stride,
                       dilation):
    """The batch-inner layout of :func:`appmult.nn.shuffle_gather.conv_zp`: ``(src, koff, poff, (Ho, Wo), Nb)``
    -- the padded uint8 image ``(C, Hp, Wp, Nb)`` flattened (images ``N .. Nb-1`` zero), the
    offsets of the ``C*kh*kw`` reduction steps and of the ``Ho*Wo*Nb/64`` position blocks.

    Raises:
        IndexError: ``pad_value`` or an activation outside the table's ``na`` values.
    """
    check_activations(q, lo_x, na, pad_value)
    n, c, h, w = q.shape
    kh, kw = kernel_size
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    lanes = LANES
    nbp = -(-n // lanes) * lanes
    img = torch.empty((c, hp, wp, nbp), dtype=torch.uint8)
    idx = (q if lo_x == 0 else q - lo_x).to(torch.uint8)
    if ph or pw:
        idx = torch.nn.functional.pad(idx, (pw, pw, ph, ph), value=pad_value - lo_x)
    img[..., :n].copy_(idx.permute(1, 2, 3, 0))
    img[..., n:] = 0
    ci, ii, jj = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
    koff = (((ci * hp + ii * dh) * wp + jj * dw) * nbp).reshape(-1).astype(np.int64)
    oh, ow, nb = np.meshgrid(np.arange(ho), np.arange(wo), np.arange(nbp // lanes), indexing="ij")
    poff = (((oh * sh) * wp + ow * sw) * nbp + nb * lanes).reshape(-1).astype(np.int64)
    return img.numpy().reshape(-1), koff, poff, (ho, wo), nbp
