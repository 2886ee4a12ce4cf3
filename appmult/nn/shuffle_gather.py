"""The layers' gather by the byte-shuffle kernel (:mod:`appmult.nn.byte_shuffle`): tables,
layouts, zero-point start values.

Called by :mod:`appmult.nn.kernels` where :func:`byte_shuffle.available` (an AVX-512 VBMI
CPU, the switches unset) and the table spans fewer than ``2**16`` values; each function
returns the same integers as the scalar path it replaces (tests:
``tests/test_nn_byte_shuffle.py`` against numpy brute force and the scalar loops).
"""

from __future__ import annotations

import numpy as np
import torch

from . import byte_shuffle
from .gather_layouts import batch_inner_fields, check_indices, unfold_uint8_kp
from .offset_tables import offset_tables


def table_planes(table: torch.Tensor, kg: int) -> tuple[np.ndarray, int] | None:
    """The byte planes of ``(table - min)`` and ``min`` (cached per table:
    :mod:`appmult.nn.offset_tables`), or ``None`` where the entries span ``2**16`` values or
    more, or ``kg`` offset entries could overflow int32 (as :func:`appmult.nn.kernels._table16`)."""
    ot = offset_tables(table)
    if ot is None or kg * (ot.hi - ot.lo) >= 1 << 31:
        return None
    return ot.planes, ot.lo


def forward(a: torch.Tensor, b: torch.Tensor, shuffle: tuple[np.ndarray, int]) -> torch.Tensor:
    """:func:`appmult.nn.kernels.gather_forward` (one group, int32) by the byte-shuffle kernel.

    Reads ``a`` in place where each batch item's row length ``L`` is a multiple of 64
    (blocks of 64 positions never straddle two items); otherwise copies it to ``(K, nb*L)``
    padded to a multiple of 64.
    """
    nbatch, kk, length = a.shape
    nout = b.shape[0]
    planes, base = shuffle
    lanes = byte_shuffle.LANES
    ai = a.to(torch.uint8)
    bi = b.to(torch.uint8).contiguous().numpy()
    c0 = np.full(nout, byte_shuffle.wrap32(kk * base), np.int32)  # modulo 2**32, like the sums
    zeros = np.zeros(nout, np.int32)
    if length % lanes == 0:
        src = ai.contiguous().numpy().reshape(-1)
        koff = np.arange(kk, dtype=np.int64) * length
        poff = (np.arange(nbatch, dtype=np.int64)[:, None] * (kk * length)
                + np.arange(0, length, lanes, dtype=np.int64)[None, :]).reshape(-1)
        out = byte_shuffle.accumulate_at(src, koff, poff, bi, planes, c0, zeros, np.zeros(nbatch * length, np.int32))
        return torch.from_numpy(out).view(nout, nbatch, length).permute(1, 0, 2)
    npos = nbatch * length
    flat = torch.empty((kk, -(-npos // lanes) * lanes), dtype=torch.uint8)
    flat[:, :npos].view(kk, nbatch, length).copy_(ai.permute(1, 0, 2))
    flat[:, npos:] = 0
    out = byte_shuffle.accumulate(flat.numpy(), bi, planes, c0, zeros, np.zeros(flat.shape[1], np.int32))
    return torch.from_numpy(out[:, :npos]).view(nout, nbatch, length).permute(1, 0, 2)


def linear_zp(q: torch.Tensor, lo_x: int, bi: np.ndarray, const: np.ndarray, zwv: np.ndarray,
                       planes: np.ndarray) -> torch.Tensor:
    """:func:`appmult.nn.kernels.gather_linear_zp` by the byte-shuffle kernel: ``(M, N)`` int32 (a transposed view).

    The activation indices are laid out ``(K, M)`` with ``M`` padded to a multiple of 64
    (the padded columns' outputs are dropped); the cross term ``-Zw_j sum_k value(x_mk)``
    starts each accumulator with ``const_j`` (both wrap in int32 like the sums: the bound of
    :func:`appmult.nn.kernels.gather_linear_prep` holds for every final value).
    """
    m, k = q.shape
    mp = -(-m // byte_shuffle.LANES) * byte_shuffle.LANES
    ai = torch.empty((k, mp), dtype=torch.uint8)
    ai[:, :m] = (q.detach() if lo_x == 0 else q.detach() - lo_x).to(torch.uint8).t()
    ai[:, m:] = 0
    xs = np.zeros(mp, np.int32)
    if np.any(zwv):
        # the values' row sums, exact in float64 (integers below 2**53)
        xs[:m] = q.detach().sum(1, dtype=torch.float64).numpy().astype(np.int64).astype(np.int32)
    out = byte_shuffle.accumulate(ai.numpy(), bi, planes, const.astype(np.int32), (-zwv).astype(np.int32), xs)
    return torch.from_numpy(out[:, :m]).t()


def conv_zp(q: torch.Tensor, lo_x: int, na: int, b: torch.Tensor, lo_w: int, shuffle: tuple[np.ndarray, int],
                     kernel_size, padding, stride, dilation, zx: int, zwv: np.ndarray, pad_value: int) -> torch.Tensor:
    """:func:`appmult.nn.kernels.gather_conv_zp` (one group) by the byte-shuffle kernel: ``(N, Co, Ho, Wo)`` int32
    (a permuted view of the kernel's output).

    Two layouts of the activation indices, each giving the kernel 64 contiguous bytes per
    reduction step and block of positions:

    * **batch inner** (a batch of a multiple of 64 images, or 256 or more): the padded image
      is stored ``(C, Hp, Wp, Nb)`` (``Nb``: the batch rounded up to 64) and the kernel reads
      each receptive field in place -- positions are ``(Ho, Wo, Nb)``, a block is 64 images
      at one output pixel, step ``(c, i, j)`` of it starts ``((c Hp + i dh) Wp + j dw) Nb``
      bytes further: no unfold (1.6 ms of a 12 ms ResNet-20 layer);
    * **unfolded** otherwise: ``(K, N*Ho*Wo)``, padded to a multiple of 64.

    Each accumulator starts at ``K base + K Zx Zw_j - Zx sum_k value(w_jk)`` plus ``-Zw_j``
    times the position's sum of activation values (:func:`byte_shuffle.field_sums`). All terms wrap in
    int32 like the kernel's sums: the caller's bound on every final value makes the result
    exact.
    """
    n, c, h, w = q.shape
    nout, kg = b.shape
    planes, base = shuffle
    q = q.detach()
    lanes = byte_shuffle.LANES
    batch_inner = n % lanes == 0 or n >= 4 * lanes
    if batch_inner:  # each layout checks the activations first
        src, koff, poff, (ho, wo), nbp = batch_inner_fields(q, lo_x, na, pad_value, kernel_size, padding, stride,
                                                            dilation)
    else:
        ai, (ho, wo) = unfold_uint8_kp(q, lo_x, na, pad_value, kernel_size, padding, stride, dilation)
        src, nbp = ai.reshape(-1), None
        koff = np.arange(kg, dtype=np.int64) * ai.shape[1]
        poff = np.arange(ai.shape[1] // lanes, dtype=np.int64) * lanes
    npos = n * ho * wo
    bi = b.to(torch.uint8).contiguous().numpy()
    wsum = bi.astype(np.int64).sum(1) + kg * lo_w
    c0 = kg * base + kg * zx * zwv - zx * wsum
    xs = np.zeros(poff.shape[0] * lanes, np.int32)
    if np.any(zwv):  # each field's sum of activation values, by the kernel on the identity table
        xs = byte_shuffle.field_sums(src, koff, poff, lo_x)
    out = torch.from_numpy(byte_shuffle.accumulate_at(src, koff, poff, bi, planes, c0.astype(np.int32),
                                                      (-zwv).astype(np.int32), xs))
    if batch_inner:
        return out.view(nout, ho, wo, nbp)[..., :n].permute(3, 0, 1, 2)
    return out[:, :npos].reshape(nout, n, ho, wo).permute(1, 0, 2, 3)


def bmm(ia: torch.Tensor, ib: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """``acc[b, m, n] = sum_k table[ia[b, m, k], ib[b, k, n]]`` (int32, a transposed view) by
    one batched byte-shuffle call (attention's products: each item its own second operand),
    or ``None`` where it does not apply: the kernel unavailable, operands not on the CPU, a
    table over 8 bits or spanning ``2**16`` values or more, a sum that could leave int32, or
    fewer than ``byte_shuffle.MIN_LOOKUPS`` look-ups. The indices are checked only where it
    applies (a cast to uint8 would wrap a bad one; the callers' torch gather checks its own).

    Raises:
        IndexError: an index outside the table (only where the kernel would run).
    """
    if ia.device.type != "cpu" or ib.device.type != "cpu" or not byte_shuffle.available():
        return None
    bsz, m, k = ia.shape
    n = ib.shape[-1]
    if table.shape[0] > 256 or table.shape[1] > 256 or bsz * m * k * n < byte_shuffle.MIN_LOOKUPS:
        return None
    ot = offset_tables(table)
    if ot is None or k * max(abs(ot.lo), abs(ot.hi)) >= 1 << 31:
        return None
    check_indices(ia, table.shape[0], "Activation")
    check_indices(ib, table.shape[1], "Weight")
    lanes = byte_shuffle.LANES
    mp = -(-m // lanes) * lanes
    a = torch.empty((bsz, k, mp), dtype=torch.uint8)
    a[..., :m] = ia.transpose(1, 2)
    a[..., m:] = 0
    b = ib.transpose(1, 2).to(torch.uint8).contiguous()
    c0 = np.full(n, byte_shuffle.wrap32(k * ot.lo), np.int32)  # modulo 2**32, like the sums
    out = byte_shuffle.accumulate_batched(a.numpy(), b.numpy(), ot.planes, c0)
    return torch.from_numpy(out)[..., :m].transpose(1, 2)
