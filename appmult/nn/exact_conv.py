"""Convolutions of integer-valued float tensors that return their exact sums on every device.

The fused and unfused conv paths compute LUT sums as float32 (or float64) convolutions of
integer-valued operands: exact as long as every partial sum stays below ``2**24`` (``2**53``),
whatever the order of the additions. On the CPU, torch's convolution sums products
directly. On CUDA, cuDNN chooses its algorithm by heuristics, and Winograd and FFT
algorithms transform the operands into non-integers (and TF32, on by default for cuDNN,
rounds operands to 10 mantissa bits): the sums may come back rounded. Without cuDNN, torch's
own CUDA convolution is exact but loops over the batch (an unfold and a GEMM per sample).

:func:`conv2d` therefore takes ``F.conv2d`` on the CPU and, on CUDA, one strided view of
the padded input per chunk of the batch (the receptive fields, copied once into columns)
and one batched float GEMM (cuBLAS, TF32 off) against the weights: the products and sums of
the definition, in some order, so exact below the bounds the callers check.
:data:`CUDNN` = ``True`` hands CUDA convolutions to cuDNN instead (``benchmarks/bench_cuda.py``
checks whether its results still agree on a given GPU and times both).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["CUDNN", "columns_conv2d", "conv2d"]

#: ``True``: CUDA convolutions through ``F.conv2d`` (cuDNN, TF32 off): faster, but exact only
#: where cuDNN's chosen algorithm sums products directly. ``False`` (default): columns + GEMM.
CUDNN = False

#: Largest columns tensor made at once (bytes); the batch is cut into chunks below it.
COLS_BYTES = 256 << 20


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@contextlib.contextmanager
def _full_precision(device_type: str):
    """TF32 and autocast off for the GEMM (on CUDA; nothing to do elsewhere)."""
    if device_type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    prev = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        matmul.allow_tf32 = prev


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, w, bias, stride, padding, dilation, groups)`` with exact sums of
    integer-valued operands on CUDA too (see the module); zero padding, numeric
    ``padding`` only; autograd flows through either form."""
    if x.device.type != "cuda" or CUDNN:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    return columns_conv2d(x, w, bias, stride, padding, dilation, groups)


def columns_conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                   dilation=1, groups: int = 1) -> torch.Tensor:
    """The columns + GEMM form of :func:`conv2d` on any device (what CUDA runs; the CPU
    tests compare it with ``F.conv2d``). Anything but a 4-D input with numeric padding
    goes to ``F.conv2d``."""
    if x.dim() != 4 or isinstance(padding, str) or x.numel() == 0:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, _, _ = x.shape
    co, cg, kh, kw = w.shape
    if groups < 1 or c != cg * groups or co % groups or x.dtype != w.dtype:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)  # torch's own error message
    xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    xp = xp.contiguous()
    hp, wp = xp.shape[2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    s_n, s_c, s_h, s_w = xp.stride()
    k = cg * kh * kw
    wm = w.reshape(1, groups, co // groups, k)
    per_item = c * kh * kw * ho * wo * xp.element_size()
    chunk = max(1, COLS_BYTES // max(1, per_item))
    outs = []
    with _full_precision(x.device.type):
        for n0 in range(0, n, chunk):
            xs = xp[n0:n0 + chunk]
            m = xs.shape[0]
            cols = xs.as_strided((m, c, kh, kw, ho, wo), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w),
                                 xs.storage_offset())
            cols = cols.reshape(m, groups, k, ho * wo)
            outs.append(torch.matmul(wm, cols).reshape(m, co, ho, wo))
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y if bias is None else y + bias.reshape(1, co, 1, 1)
