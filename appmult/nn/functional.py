"""Autograd functions for LUT-exact products: linear, conv2d and matmul.

Operand roles. A layer multiplies an *activation* by a *weight*. By default the
activation is the LUT's operand ``a`` and the weight its operand ``b`` -- the order of the
RTL MAC unit (``appmult.hdl``'s MAC takes the activation on ``a``); set
``activation_operand="b"`` for hardware wired the other way round. Internally every
table is re-indexed ``[x, w]`` (activation first) and by *value offset* (``value -
min_value``) instead of by code, so quantized integers index tables directly.

Forward. Every output accumulates ``sum_k LUT[qx_k, qw_k]`` over its receptive field,
computed by one of the kernels of :mod:`appmult.nn.kernels`:

* ``exact=True`` (or :meth:`~appmult.nn.ApproxLinear.int_forward`): float64 low-rank
  (exact while ``K * S < 2**53``) or int32/int64 gather -- bit for bit the LUT sum.
* default (training): low-rank in float32, which is *also exact* whenever
  ``K * S < 2**24`` (``S`` = largest ``sum_r |U V|`` of one product, e.g. 16384 for the
  exact signed 8x8 product, so every K <= 1024); the gather path is always exact (int32).
  Where ``K * S >= 2**24`` the float32 low-rank sum may round: each of the ``n = K*r``
  additions errs by at most ``2**-24`` times the running sum, so
  ``|error| <= n * 2**-24 * K * S`` (the classical dot-product bound). For an unsigned 8x8
  truncated LUT (S ~ 65216) and K = 400 (r = 5) that is at most ~0.3% of the largest
  possible accumulator, and in practice (random-order errors) about ``sqrt(n)`` times
  smaller: ~1 unit, against the multiplier's own accumulated error of MAE * K (a 4-column
  truncation has MAE ~ 8, so ~3200 per output). ``ApproxConfig(exact_accumulate=True)``
  removes the question.

Backward, with ``y_j = sum_k f(qx_k, qw_kj)``:
``dL/dqx_k = sum_j dL/dy_j df/da(qx_k, qw_kj)`` and
``dL/dqw_kj = sum_batch dL/dy_j df/db(qx_k, qw_kj)``:

* ``ste``: ``df/da = value(b)``, ``df/db = value(a)`` -- two ordinary GEMMs/convs;
* ``lut1d``: ``df/da ~ g_a(b)``, ``df/db ~ g_b(a)`` -- two ordinary GEMMs/convs on weights
  (resp. activations) mapped through the compact tables;
* ``lut2d``: full tables, through a (float) low-rank factorization of each gradient table
  (r GEMMs/convs) or the gather kernels.

Gradients then flow through the zero-point cross terms (ordinary torch ops) and the
quantizers' clipped straight-through estimators.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codes import codes_by_value, codes_to_values
from ..errors import InvalidTypeError, InvalidValueError, UserError
from ..lut_gen.lutfile import LutFile, LutFileError
from . import kernels as K

__all__ = [
    "GradMode",
    "Kernel",
    "LutMismatchError",
    "LutTables",
    "MissingGradientError",
    "approx_conv2d",
    "approx_linear",
    "approx_matmul",
    "lut_conv2d",
    "lut_linear",
]


class GradMode(str, enum.Enum):
    """Backward rule of the approximate product."""

    STE = "ste"
    LUT2D = "lut2d"
    LUT1D = "lut1d"


class Kernel(str, enum.Enum):
    """Forward kernel choice."""

    AUTO = "auto"
    LOWRANK = "lowrank"
    GATHER = "gather"


class MissingGradientError(LutFileError):
    """The LUT file lacks the gradient tables a layer's grad mode needs."""


class LutMismatchError(UserError, RuntimeError):
    """A state_dict was saved with a different LUT than the layer it is loaded into."""


def _gradients_module():
    try:
        from ..lut_gen import gradients
    except ImportError:  # pragma: no cover - depends on the checkout
        return None
    return gradients


def _missing_gradients(lut: LutFile, method: str) -> MissingGradientError:
    have = ", ".join(sorted(lut.gradients)) or "none"
    return MissingGradientError(
        f"LUT {lut.lut_id} has no {method!r} gradient tables (it has: {have}); produce them with "
        f"`appmult characterize ... --gradients {method}` or pass "
        f"ApproxConfig(compute_missing_gradients=True) to compute them with appmult.lut_gen.gradients")


class LutTables(nn.Module):
    """A LUT and every table derived from it, as buffers, re-indexed ``[x, w]`` by value offset.

    Persistent state: the product table as stored in the file (``table``, indexed
    ``[a_code, b_code]``) and, in extra state, the LUT's SHA-256; loading a state_dict
    saved with another LUT raises :class:`LutMismatchError`. Derived tables (value-order
    product, integer low-rank factors, gradient tables and their factors) are
    non-persistent buffers, rebuilt from the LUT, that follow ``.to(device)``.

    Args:
        lut: the LUT file contents.
        grad: backward mode.
        kernel: forward kernel (``auto``: by exact integer rank, see
            :func:`appmult.nn.kernels.choose_kernel`).
        activation_operand: LUT operand that receives activations (``"a"`` or ``"b"``).
        compute_missing_gradients: compute absent ``lut2d``/``lut1d`` tables with
            :mod:`appmult.lut_gen.gradients` instead of raising.
        half_window: LUT-2D half window when computing tables (``"auto"`` or an int).

    Raises:
        MissingGradientError: the grad mode needs tables the file lacks.
        ValueError: ``kernel="lowrank"`` for a LUT without an exact low-rank factorization.
    """

    def __init__(self, lut: LutFile, *, grad: str | GradMode = GradMode.STE,
                 kernel: str | Kernel = Kernel.AUTO, activation_operand: str = "a",
                 compute_missing_gradients: bool = False, half_window: int | str = "auto"):
        super().__init__()
        if not isinstance(lut, LutFile):
            raise InvalidTypeError(f"LutTables needs a LutFile, not {type(lut).__name__}")
        if activation_operand not in ("a", "b"):
            raise InvalidValueError(f"Activation operand must be 'a' or 'b', not {activation_operand!r}")
        self.lut_file = lut
        self.grad = GradMode(grad)
        self.activation_operand = activation_operand
        self.sha256 = lut.sha256
        swap = activation_operand == "b"
        self.width_x, self.width_w = (lut.width_b, lut.width_a) if swap else (lut.width_a, lut.width_b)
        self.signed = lut.signed
        cx = codes_by_value(self.width_x, self.signed)
        cw = codes_by_value(self.width_w, self.signed)
        self.lo_x = int(codes_to_values(cx[:1], self.width_x, self.signed)[0])
        self.lo_w = int(codes_to_values(cw[:1], self.width_w, self.signed)[0])
        vx = codes_to_values(cx, self.width_x, self.signed)
        vw = codes_to_values(cw, self.width_w, self.signed)
        p = lut.product.T if swap else lut.product
        prod = p[np.ix_(cx, cw)]
        self.max_abs = int(np.abs(prod).max(initial=0))
        self.register_buffer("table", torch.from_numpy(lut.product.copy()))
        dt = torch.int32 if self.max_abs < (1 << 31) else torch.int64
        self.register_buffer("prod", torch.from_numpy(prod.copy()).to(dt), persistent=False)

        fac = K.cached_integer_factorization(self.sha256 + activation_operand, prod, vx, vw)
        if fac is not None and fac.rank == 1 and np.array_equal(fac.u[:, 0], -vx):
            # U = -value(x) (the echelon form's sign, e.g. the signed exact product): negate
            # both factors (same product, same bound) so the rank-1 shortcuts apply
            fac = K.LowRank(-fac.u, -fac.v, fac.bound)
        self.rank = None if fac is None else fac.rank
        self.bound = None if fac is None else fac.bound
        kern = Kernel(kernel)
        if kern is Kernel.AUTO:
            kern = Kernel(K.choose_kernel(self.rank))
        if kern is Kernel.LOWRANK and fac is None:
            raise InvalidValueError(f"LUT {lut.lut_id} has no exact integer factorization of rank <= 32; "
                             f"use kernel='gather' or kernel='auto'")
        self.kernel = kern
        #: Integer ``c`` with ``U @ c == value(x)`` exactly (or ``None``): lets the activation
        #: zero-point cross term ``-x * Zw`` fold into the low-rank weights (``V - c Zw``).
        self.value_coef: tuple[int, ...] | None = None
        self.u_is_value = False
        if fac is not None:
            self.register_buffer("u", torch.from_numpy(fac.u.astype(np.float64)), persistent=False)
            self.register_buffer("v", torch.from_numpy(fac.v.astype(np.float64)), persistent=False)
            self.register_buffer("u_f32", torch.from_numpy(fac.u.astype(np.float32)), persistent=False)
            self.register_buffer("v_f32", torch.from_numpy(fac.v.astype(np.float32)), persistent=False)
            self.value_coef = _value_coefficients(fac.u, vx)
            #: U is the single column value(x): the low-rank conv maps activations to themselves.
            self.u_is_value = fac.u.shape[1] == 1 and np.array_equal(fac.u[:, 0], vx)
            self._u_absmax = np.abs(fac.u).max(axis=0).astype(np.float64)
            self._v_min = fac.v.min(axis=0).astype(np.float64)
            self._v_max = fac.v.max(axis=0).astype(np.float64)
        else:
            self.register_buffer("u", None, persistent=False)
            self.register_buffer("v", None, persistent=False)
            self.register_buffer("u_f32", None, persistent=False)
            self.register_buffer("v_f32", None, persistent=False)

        # Gradient tables, all [x, w] / value-offset indexed.
        gx1 = gw1 = gx2 = gw2 = None
        if self.grad is GradMode.STE:
            gx1, gw1 = vw.astype(np.float32), vx.astype(np.float32)
        else:
            method = self.grad.value
            if method not in lut.gradients:
                mod = _gradients_module()
                if not compute_missing_gradients or mod is None:
                    raise _missing_gradients(lut, method)
                args = (lut.product, lut.width_a, lut.width_b, lut.signed, half_window)
                ga, gb = (mod.lut2d_gradients(*args) if method == "lut2d" else mod.lut1d_gradients(*args))
            else:
                ga, gb = lut.gradient(method)
            ga, gb = np.asarray(ga, np.float32), np.asarray(gb, np.float32)
            ca = codes_by_value(lut.width_a, lut.signed)
            cb = codes_by_value(lut.width_b, lut.signed)
            if ga.ndim == 1:
                if self.grad is GradMode.LUT2D:
                    raise LutFileError(f"LUT {lut.lut_id} stores compact (1-D) tables under 'lut2d'; "
                                       f"LUT-2D needs full tables")
                # ga: one value per code of b; gb: one per code of a.
                gx1, gw1 = (gb[ca], ga[cb]) if swap else (ga[cb], gb[ca])
            else:
                if self.grad is GradMode.LUT1D:
                    raise LutFileError(f"LUT {lut.lut_id} stores full tables under 'lut1d'; "
                                       f"LUT-1D needs compact (1-D) tables")
                if swap:
                    gx2, gw2 = gb.T[np.ix_(cx, cw)], ga.T[np.ix_(cx, cw)]
                else:
                    gx2, gw2 = ga[np.ix_(cx, cw)], gb[np.ix_(cx, cw)]
        for name, arr in (("gx1", gx1), ("gw1", gw1), ("gx2", gx2), ("gw2", gw2)):
            self.register_buffer(name, None if arr is None else torch.from_numpy(np.ascontiguousarray(arr)),
                                 persistent=False)
        self.grad_kernel = None
        for name in ("gx_p", "gx_q", "gw_p", "gw_q"):
            self.register_buffer(name, None, persistent=False)
        if gx2 is not None:
            self.grad_kernel = Kernel.GATHER
            fx = K.float_factorization(gx2)
            fw = K.float_factorization(gw2)
            if fx is not None and fw is not None:
                r = max(fx[0].shape[1], fw[0].shape[1])
                if kern is Kernel.LOWRANK or r <= K.AUTO_MAX_RANK:
                    self.grad_kernel = Kernel.LOWRANK
                    self.gx_p, self.gx_q = (torch.from_numpy(a.astype(np.float32)) for a in fx)
                    self.gw_p, self.gw_q = (torch.from_numpy(a.astype(np.float32)) for a in fw)

    # -- identity --------------------------------------------------------------------------
    @property
    def lut_id(self) -> str:
        return self.sha256[:16]

    def get_extra_state(self) -> dict[str, Any]:
        return {"lut_sha256": self.sha256, "activation_operand": self.activation_operand}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_state(state, "")

    def _check_state(self, state: Any, prefix: str) -> None:
        theirs = state.get("lut_sha256") if isinstance(state, dict) else None
        if theirs != self.sha256:
            where = prefix.rstrip(".").removesuffix(".lut") or "<root>"
            raise LutMismatchError(
                f"Layer '{where}' uses LUT {self.lut_id} but the state_dict was saved with LUT "
                f"{str(theirs)[:16]}; build the model with the LUT file it was trained with")
        if state.get("activation_operand", "a") != self.activation_operand:
            raise LutMismatchError(
                f"State_dict maps activations to LUT operand {state.get('activation_operand')!r} "
                f"but the layer maps them to {self.activation_operand!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Check identity before any buffer is overwritten, so a refused load changes nothing.
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_state(state_dict[key], prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def describe(self) -> str:
        """One line for ``extra_repr``: LUT id, spec, widths, kernel, grad mode."""
        md = self.lut_file.metadata
        spec = md.get("spec") or md.get("family") or "custom"
        rank = f"rank={self.rank}" if self.rank is not None else "rank>32"
        g = self.grad.value + (f"/{self.grad_kernel.value}" if self.grad_kernel is not None else "")
        return (f"lut={self.lut_id} ({spec}, {self.lut_file.width_a}x{self.lut_file.width_b} "
                f"{'signed' if self.signed else 'unsigned'}), act=operand {self.activation_operand}, "
                f"kernel={self.kernel.value} ({rank}), grad={g}")

    def fp32_exact(self, k: int) -> bool:
        """Whether a float32 low-rank accumulation of ``k`` products is exact."""
        return self.bound is not None and k * self.bound < K.FP32_EXACT_LIMIT

    def extra_repr(self) -> str:
        return self.describe()


def _value_coefficients(u: np.ndarray, values: np.ndarray) -> tuple[int, ...] | None:
    """Integer ``c`` with ``u @ c == values`` exactly (int64 check), or ``None``."""
    try:
        c, *_ = np.linalg.lstsq(u.astype(np.float64), values.astype(np.float64), rcond=None)
    except np.linalg.LinAlgError:  # pragma: no cover - lstsq of a small finite matrix
        return None
    ci = np.round(c).astype(np.int64)
    if np.abs(ci).max(initial=0) >= 1 << 20 or not np.array_equal(u.astype(np.int64) @ ci, values.astype(np.int64)):
        return None
    return tuple(int(x) for x in ci)


# ------------------------------------------------------------------------------------------
# Index helpers
# ------------------------------------------------------------------------------------------

def _idx(q: torch.Tensor, lo: int) -> torch.Tensor:
    return (q.detach() - lo).to(torch.long)


def _map_channels(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, C, H, W)`` indices -> ``(N, C*r, H, W)`` values, the r factors of a channel adjacent.

    Gathers in NHWC order with ``embedding`` (a row gather, much faster than advanced
    indexing) so that the result is already a channels-last NCHW tensor: no permute copy,
    and oneDNN convolutions prefer that layout anyway.
    """
    n, c, h, w = idx.shape
    r = table.shape[1]
    t = F.embedding(idx.permute(0, 2, 3, 1), table.to(dtype))       # (N, H, W, C, r)
    return t.reshape(n, h, w, c * r).permute(0, 3, 1, 2)


def _unfold_idx(idx: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """``(N, C, Hp, Wp)`` indices -> ``(N, C*kh*kw, L)`` in :func:`torch.nn.functional.unfold` order."""
    n, c = idx.shape[:2]
    kh, kw = kernel_size
    eh, ew = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    p = idx.unfold(2, eh, stride[0]).unfold(3, ew, stride[1])     # (N, C, Ho, Wo, eh, ew)
    p = p[..., ::dilation[0], ::dilation[1]]                         # (N, C, Ho, Wo, kh, kw)
    ho, wo = p.shape[2], p.shape[3]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _small_idx(idx: torch.Tensor, size: int) -> torch.Tensor:
    # uint8 indices take an eighth of the memory of int64 in the unfolded operand (widths <= 8).
    return idx.to(torch.uint8) if size <= 256 else idx.to(torch.int32)


# ------------------------------------------------------------------------------------------
# Linear
# ------------------------------------------------------------------------------------------

def _linear_forward(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, exact: bool) -> torch.Tensor:
    # int32 indices (embedding takes them; a row gather, much faster than advanced indexing)
    ix, iw = _idx32(qx, tabs.lo_x), _idx32(qw, tabs.lo_w)
    m, k = ix.shape
    dtype = torch.float64 if exact else torch.float32
    if tabs.kernel is Kernel.LOWRANK and (not exact or k * tabs.bound < K.FP64_EXACT_LIMIT):
        xu = F.embedding(ix, tabs.u.to(dtype)).reshape(m, -1)
        wv = F.embedding(iw, tabs.v.to(dtype)).reshape(iw.shape[0], -1)
        acc = xu @ wv.t()
        return torch.round(acc) if exact else acc
    out_dt = torch.int32 if k * tabs.max_abs < (1 << 31) else torch.int64
    a = _small_idx(ix, tabs.prod.shape[0]).t().unsqueeze(0)
    acc = K.gather_forward(a, _small_idx(iw, tabs.prod.shape[1]), tabs.prod, 1, out_dt)[0].t()
    return acc.to(device=qx.device, dtype=dtype)


def _linear_backward(grad: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, zx=None, zw=None):
    dt = grad.dtype
    if zx is not None:
        # with the cross terms -qx Zw - Zx qw (see _conv_backward)
        n = qw.shape[0]
        zwc = zw.detach().to(dt).reshape(n, 1) if zw.numel() > 1 else zw.detach().to(dt).reshape(())
        zxs = zx.detach().to(dt).reshape(())
        if tabs.grad is GradMode.STE:
            return grad @ (qw.detach().to(dt) - zwc), grad.t() @ (qx.detach().to(dt) - zxs)
        gx, gw = _linear_backward(grad, qx, qw, tabs)
        gx = gx - (grad @ torch.ones((n, 1), dtype=dt, device=grad.device).mul(zwc)).expand_as(gx)
        gw = gw - zxs * grad.sum(0).reshape(n, 1)
        return gx, gw
    if tabs.grad is GradMode.STE:
        return grad @ qw.detach().to(dt), grad.t() @ qx.detach().to(dt)
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    if tabs.gx1 is not None:
        gx = grad @ tabs.gx1.to(dt)[iw]
        gw = grad.t() @ tabs.gw1.to(dt)[ix]
        return gx, gw
    m, k = ix.shape
    n = iw.shape[0]
    if tabs.grad_kernel is Kernel.LOWRANK:
        ra, rb = tabs.gx_p.shape[1], tabs.gw_p.shape[1]
        t = (grad @ tabs.gx_q.to(dt)[iw].reshape(n, k * ra)).reshape(m, k, ra)
        gx = (t * tabs.gx_p.to(dt)[ix]).sum(-1)
        t2 = (grad.t() @ tabs.gw_p.to(dt)[ix].reshape(m, k * rb)).reshape(n, k, rb)
        gw = (t2 * tabs.gw_q.to(dt)[iw]).sum(-1)
        return gx, gw
    a = _small_idx(ix, tabs.prod.shape[0]).t().unsqueeze(0)
    b = _small_idx(iw, tabs.prod.shape[1])
    g = grad.t().unsqueeze(0)
    gx = K.gather_grad_a(a, b, tabs.gx2, g, 1)[0].t()
    gw = K.gather_grad_b(a, b, tabs.gw2, g, 1)
    return gx.to(device=grad.device, dtype=dt), gw.to(device=grad.device, dtype=dt)


class _LowRankLinearZpFn(torch.autograd.Function):
    """Linear counterpart of :class:`_LowRankConvZpFn`: ``addmm(C, U[qx], (V - c Zw)[qw].T)``."""

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, wv, const):
        m, k = qx.shape
        if tabs.u_is_value and qx.dtype == torch.float32:
            xu = qx.detach()  # rank 1 with U = value(x): the mapped operand is qx itself
        else:
            xu = F.embedding(_idx32(qx, tabs.lo_x), tabs.u_f32)
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs = tabs
        return torch.addmm(const, xu.reshape(m, -1), wv.t())

    @staticmethod
    def backward(ctx, grad):
        qx, qw, zx, zw = ctx.saved_tensors
        zargs = (None, None) if ctx.tabs.signed else (zx, zw)
        gx, gw = _linear_backward(grad.contiguous(), qx, qw, ctx.tabs, *zargs)
        return gx.to(qx.dtype), gw.to(qw.dtype), None, None, None, None, None


class _LutLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, exact: bool) -> torch.Tensor:
        ctx.save_for_backward(qx, qw)
        ctx.tabs = tabs
        return _linear_forward(qx, qw, tabs, exact)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qx, qw = ctx.saved_tensors
        gx, gw = _linear_backward(grad.contiguous(), qx, qw, ctx.tabs)
        return gx.to(qx.dtype), gw.to(qw.dtype), None, None


def lut_linear(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, *, exact: bool = False) -> torch.Tensor:
    """``acc[m, n] = sum_k LUT[qx[m, k], qw[n, k]]`` with the LUT's backward rule.

    Args:
        qx: integer-valued activations ``(M, K)`` (float dtype), in the LUT's value range.
        qw: integer-valued weights ``(N, K)`` (torch ``Linear`` layout).
        tabs: the LUT tables.
        exact: accumulate exactly (float64 / integer); otherwise float32 (see module notes).

    Returns:
        ``(M, N)`` accumulators (float32, or float64 when ``exact``), integer-valued.
    """
    return _LutLinearFn.apply(qx, qw, tabs, exact)


# ------------------------------------------------------------------------------------------
# Conv2d (input already padded with the activation zero point)
# ------------------------------------------------------------------------------------------

def _conv_forward(qx, qw, tabs: LutTables, stride, dilation, groups, exact: bool) -> torch.Tensor:
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    k = qw[0].numel()
    dtype = torch.float64 if exact else torch.float32
    if tabs.kernel is Kernel.LOWRANK and (not exact or k * tabs.bound < K.FP64_EXACT_LIMIT):
        xu = _map_channels(tabs.u, ix, dtype)
        wv = _map_channels(tabs.v, iw, dtype)
        acc = F.conv2d(xu, wv, None, stride, 0, dilation, groups)
        return torch.round(acc) if exact else acc
    n = qx.shape[0]
    kh, kw = qw.shape[2:]
    a = _unfold_idx(_small_idx(ix, tabs.prod.shape[0]), (kh, kw), stride, dilation)
    ho = (qx.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (qx.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out_dt = torch.int32 if k * tabs.max_abs < (1 << 31) else torch.int64
    acc = K.gather_forward(a, _small_idx(iw, tabs.prod.shape[1]).reshape(qw.shape[0], -1), tabs.prod, groups, out_dt)
    return acc.reshape(n, qw.shape[0], ho, wo).to(device=qx.device, dtype=dtype)


def _conv_backward(grad, qx, qw, tabs: LutTables, stride, dilation, groups, zx=None, zw=None):
    """Gradients of ``sum LUT[qx, qw]`` w.r.t. the (padded) ``qx`` and ``qw``.

    With zero points ``zx``/``zw`` (tensors), the gradients of the cross terms
    ``- qx Zw - Zx qw`` are included: for the 1-D grad tables they fold into the mapped
    operands of the two convolutions (``g_a(w) - Zw``, ``g_b(x) - Zx``), otherwise they are
    subtracted.
    """
    dt = grad.dtype
    cin_g = qw.shape[1]
    co = qw.shape[0]
    zp = zx is not None
    if zp:
        zwr = zw.detach().to(dt).reshape(co, 1, 1, 1) if zw.numel() > 1 else zw.detach().to(dt).reshape(())
        zxs = zx.detach().to(dt).reshape(())
    if tabs.grad is GradMode.STE:
        # The STE tables are the operand values: the mapped operands are qw and qx themselves
        # (no index conversion or gather over the activations).
        wmap = qw.detach().to(dt)
        xmap = qx.detach().to(dt)
        if zp:
            wmap = wmap - zwr
            xmap = xmap - zxs
        gx = torch.nn.grad.conv2d_input(qx.shape, wmap, grad, stride, 0, dilation, groups)
        gw = torch.nn.grad.conv2d_weight(xmap, qw.shape, grad, stride, 0, dilation, groups)
        return gx, gw
    ix, iw = _idx(qx, tabs.lo_x), _idx(qw, tabs.lo_w)
    if tabs.gx1 is not None:
        wmap = tabs.gx1.to(dt)[iw]
        xtab = tabs.gw1.to(dt)
        if zp:
            wmap = wmap - zwr
            xtab = xtab - zxs  # shift the 2**w-entry table, not the gathered activations
        xmap = xtab[ix]
        gx = torch.nn.grad.conv2d_input(qx.shape, wmap, grad, stride, 0, dilation, groups)
        gw = torch.nn.grad.conv2d_weight(xmap, qw.shape, grad, stride, 0, dilation, groups)
        return gx, gw
    if zp:
        gx, gw = _conv_backward(grad, qx, qw, tabs, stride, dilation, groups)
        zmap = torch.ones_like(qw, dtype=dt) * zwr
        gx = gx - torch.nn.grad.conv2d_input(qx.shape, zmap, grad, stride, 0, dilation, groups)
        gw = gw - zxs * grad.sum((0, 2, 3)).reshape(co, 1, 1, 1)
        return gx, gw
    n, c, hp, wp = qx.shape
    co, _, kh, kw = qw.shape
    if tabs.grad_kernel is Kernel.LOWRANK:
        ra, rb = tabs.gx_p.shape[1], tabs.gw_p.shape[1]
        t = torch.nn.grad.conv2d_input((n, c * ra, hp, wp), _map_channels(tabs.gx_q, iw, dt), grad,
                                       stride, 0, dilation, groups)
        gx = (t.reshape(n, c, ra, hp, wp) * _map_channels(tabs.gx_p, ix, dt).reshape(n, c, ra, hp, wp)).sum(2)
        t2 = torch.nn.grad.conv2d_weight(_map_channels(tabs.gw_p, ix, dt), (co, cin_g * rb, kh, kw), grad,
                                         stride, 0, dilation, groups)
        gw = (t2.reshape(co, cin_g, rb, kh, kw)
              * _map_channels(tabs.gw_q, iw, dt).reshape(co, cin_g, rb, kh, kw)).sum(2)
        return gx, gw
    a = _unfold_idx(_small_idx(ix, tabs.prod.shape[0]), (kh, kw), stride, dilation)
    b = _small_idx(iw, tabs.prod.shape[1]).reshape(co, -1)
    g = grad.reshape(n, co, -1)
    cols = K.gather_grad_a(a, b, tabs.gx2, g, groups).to(device=grad.device, dtype=dt)
    gx = F.fold(cols, (hp, wp), (kh, kw), dilation=dilation, padding=0, stride=stride)
    gw = K.gather_grad_b(a, b, tabs.gw2, g, groups).reshape(qw.shape)
    return gx, gw.to(device=grad.device, dtype=dt)


class _LutConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qx, qw, tabs: LutTables, stride, dilation, groups: int, exact: bool) -> torch.Tensor:
        ctx.save_for_backward(qx, qw)
        ctx.tabs, ctx.geom = tabs, (stride, dilation, groups)
        return _conv_forward(qx, qw, tabs, stride, dilation, groups, exact)

    @staticmethod
    def backward(ctx, grad):
        qx, qw = ctx.saved_tensors
        gx, gw = _conv_backward(grad.contiguous(), qx, qw, ctx.tabs, *ctx.geom)
        return gx.to(qx.dtype), gw.to(qw.dtype), None, None, None, None, None


def _idx32(q: torch.Tensor, lo: int) -> torch.Tensor:
    q = q.detach()
    return (q if lo == 0 else q - lo).to(torch.int32)


def _folded_lowrank_weights(qw: torch.Tensor, zx: torch.Tensor, zw: torch.Tensor, tabs: LutTables):
    """Low-rank weights with the zero-point cross terms folded in, or ``None``.

    ``sum_k LUT[x, w] - x Zw - Zx w + Zx Zw = sum_k sum_r U[x, r] (V[w, r] - c_r Zw) + C_j``
    with ``U c = value(x)`` and ``C_j = -Zx sum_k (w_jk - Zw_j)``: one convolution with
    bias ``C`` yields the whole integer accumulator. Returned only when every partial sum
    of that convolution is an integer below ``2**24`` (so float32 is exact whatever the
    summation order); otherwise the caller takes the unfused path.

    Returns:
        ``(weights (Co, Cg*r, kh, kw) float32 channels-last, bias (Co,) float32)`` or ``None``.
    """
    if tabs.u is None or (not tabs.signed and tabs.value_coef is None):
        return None
    if zx.requires_grad or zw.requires_grad:
        return None
    co, cg, kh, kw = qw.shape
    k = cg * kh * kw
    r = tabs.u.shape[1]
    zwv = zw.detach().to(torch.float64).reshape(-1).cpu().numpy()
    zwv = np.full(co, zwv[0]) if zwv.size == 1 else zwv
    zxf = float(zx)
    if zwv.size != co or zxf != round(zxf) or not np.array_equal(zwv, np.round(zwv)):
        return None  # integer zero points only (what the quantizers produce)
    coef = np.zeros(r) if tabs.signed else np.asarray(tabs.value_coef, np.float64)
    shift = coef[None, :] * zwv[:, None]                                   # (Co, r)
    vabs = np.maximum(np.abs(tabs._v_max[None] - shift), np.abs(tabs._v_min[None] - shift))
    step = (vabs * tabs._u_absmax[None]).sum(1)                           # (Co,) bound of one k
    q64 = qw.detach().to(torch.float64).reshape(co, k)
    zw_t = torch.as_tensor(np.ascontiguousarray(zwv), dtype=torch.float64, device=qw.device)
    # exact in float64; signed LUTs carry no cross terms (as in the unfused path)
    const = torch.zeros(co, dtype=torch.float64, device=qw.device) if tabs.signed else \
        -zxf * (q64 - zw_t[:, None]).sum(1)
    if float((k * step).max()) + float(const.abs().max()) >= K.FP32_EXACT_LIMIT:
        return None
    vmax = max(float(np.abs(tabs._v_max).max()), float(np.abs(tabs._v_min).max()))
    if vmax + float(np.abs(shift).max(initial=0.0)) < K.FP32_EXACT_LIMIT:
        # every value and shift is an integer below 2**24: float32 is exact; shift only the
        # columns with c_r != 0 (usually just the exact-product column)
        wv = F.embedding(_idx32(qw, tabs.lo_w), tabs.v_f32)                # (Co, Cg, kh, kw, r) f32
        zw32 = zw_t.to(torch.float32).reshape(co, 1, 1, 1)
        for rr in np.nonzero(coef)[0]:
            wv[..., int(rr)] -= float(coef[rr]) * zw32
    else:
        wv = F.embedding(_idx32(qw, tabs.lo_w), tabs.v)                    # float64
        wv = wv - torch.as_tensor(coef, dtype=torch.float64, device=qw.device) * zw_t.reshape(co, 1, 1, 1, 1)
    wv = wv.permute(0, 1, 4, 2, 3).reshape(co, cg * r, kh, kw).to(torch.float32)
    return wv.contiguous(memory_format=torch.channels_last), const.to(torch.float32)


def _rank1_shifted_conv(qx, zx, wv, const, tabs: LutTables, padding, stride, dilation, groups, prep=None):
    """Rank-1 ``U = value(x)`` accumulator as an ordinary zero-padded conv of ``qx - Zx``, or ``None``.

    ``sum_k qx_k wv_k + C = sum_k (qx_k - Zx) wv_k + (C + Zx sum_k wv_k)``; padded positions
    hold ``Zx``, i.e. 0 after the shift, so the convolution pads by itself (no padded copy)
    in the activations' own layout (no layout conversion inside oneDNN), and with
    ``Zx = 0`` (ReLU inputs, symmetric layers) ``qx`` is used as is. Taken only when every
    partial sum is an integer below ``2**24`` (float32 exact in any order).
    """
    q = qx.detach()
    if q.dtype != torch.float32 or q.dim() != 4:
        return None
    prep = _rank1_prep(zx, wv, const, tabs) if prep is None else prep
    if prep is False:
        return None
    wc, bias = prep
    zxf = float(zx)
    xs = q if zxf == 0.0 else q - zxf
    return F.conv2d(xs, wc, bias, stride, padding, dilation, groups)


def _rank1_prep(zx, wv, const, tabs: LutTables):
    """Weights and bias of :func:`_rank1_shifted_conv` (``False`` when not exact in float32)."""
    zxf = float(zx)
    wc = wv.contiguous()
    w64 = wc.to(torch.float64)
    bias = const.to(torch.float64) + zxf * w64.sum((1, 2, 3))
    xmax = max(abs(tabs.lo_x - zxf), abs(tabs.lo_x + tabs.prod.shape[0] - 1 - zxf))
    if float((w64.abs().sum((1, 2, 3)) * xmax + bias.abs()).max()) >= K.FP32_EXACT_LIMIT:
        return False
    return wc, bias.to(torch.float32)


class _LowRankConvZpFn(torch.autograd.Function):
    """The whole integer accumulator ``sum LUT[qx, qw] - qx Zw - Zx qw + Zx Zw`` of a
    padded conv as one float32 low-rank convolution (see :func:`_folded_lowrank_weights`).

    Forward: activation indices (int32) are padded with the zero point's index, mapped
    through ``U`` straight into a channels-last tensor, and convolved with the folded
    weights and bias. Backward: the LUT's grad rule plus the cross terms' gradients.
    """

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, wv, const, padding, stride, dilation, groups, r1=None):
        ph, pw = padding
        zidx = int(round(float(zx))) - tabs.lo_x
        # int32 indices padded with the zero point's index (a numba value -> U-row pass was
        # measured slower than torch's embedding here), mapped straight to channels-last.
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs, ctx.geom = tabs, (padding, stride, dilation, groups)
        if tabs.u_is_value:
            y = _rank1_shifted_conv(qx, zx, wv, const, tabs, padding, stride, dilation, groups, r1)
            if y is not None:
                return y
            # rank 1 with U = value(x) (e.g. the exact product): the mapped operand is qx itself
            q = qx.detach().to(torch.float32)
            xu = F.pad(q, (pw, pw, ph, ph), value=float(zidx + tabs.lo_x)) if (ph or pw) else q
        else:
            idx = _idx32(qx, tabs.lo_x)
            if ph or pw:
                idx = F.pad(idx, (pw, pw, ph, ph), value=zidx)
            xu = _map_channels(tabs.u_f32, idx, torch.float32)
        return F.conv2d(xu, wv, const, stride, 0, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        gx, gw = _zp_conv_backward(ctx, grad)
        return gx, gw, None, None, None, None, None, None, None, None, None, None


def _zp_conv_backward(ctx, grad):
    """Gradients of a fused conv accumulator (LUT sum plus cross terms) w.r.t. unpadded qx, qw."""
    qx, qw, zx, zw = ctx.saved_tensors
    (ph, pw), stride, dilation, groups = ctx.geom
    qxp = F.pad(qx, (pw, pw, ph, ph), value=float(zx)) if (ph or pw) else qx
    zargs = (None, None) if ctx.tabs.signed else (zx, zw)
    gx, gw = _conv_backward(grad.contiguous(), qxp, qw, ctx.tabs, stride, dilation, groups, *zargs)
    if ph or pw:
        gx = gx[:, :, ph:ph + qx.shape[2], pw:pw + qx.shape[3]]
    return gx.to(qx.dtype), gw.to(qw.dtype)


class _GatherConvZpFn(torch.autograd.Function):
    """The whole integer accumulator of a quantized conv from the numba row kernel
    (:func:`appmult.nn.kernels.gather_conv_zp`: cross terms folded into the expanded rows),
    as float; ``acc`` is precomputed by the caller (it decides whether the path applies)."""

    @staticmethod
    def forward(ctx, qx, qw, zx, zw, tabs: LutTables, acc, dtype, padding, stride, dilation, groups):
        ctx.save_for_backward(qx, qw, zx, zw)
        ctx.tabs, ctx.geom = tabs, (padding, stride, dilation, groups)
        return acc.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        gx, gw = _zp_conv_backward(ctx, grad)
        return gx, gw, None, None, None, None, None, None, None, None, None


def _gather_conv_zp(qx, qw, zx, zw, tabs: LutTables, padding, stride, dilation, groups, out_dtype=torch.int32):
    """int32 accumulator with cross terms from the numba kernel, or ``None`` (not applicable)."""
    if zx.requires_grad or zw.requires_grad or qx.dtype != torch.float32:
        return None
    co = qw.shape[0]
    zxf = float(zx)
    if zxf != round(zxf) or not torch.equal(zw.detach(), torch.round(zw.detach())):
        return None  # integer zero points only (what the quantizers produce)
    zpad = int(round(zxf))  # padding inserts the activation zero point, signed or not
    if tabs.signed:
        zxi, zwv = 0, None  # no cross terms for signed LUTs (as in the unfused path)
    else:
        zxi = zpad
        zwv = zw.detach().reshape(-1).to(torch.int64).cpu().numpy()
        if zwv.size not in (1, co):
            return None
    iw = _idx(qw, tabs.lo_w).reshape(co, -1)
    return K.gather_conv_zp(qx.detach(), tabs.lo_x, iw, tabs.lo_w, tabs.prod, groups, tuple(qw.shape[2:]),
                            padding, stride, dilation, zxi, zwv, out_dtype, pad_value=zpad)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def lut_conv2d(qx: torch.Tensor, qw: torch.Tensor, tabs: LutTables, *, stride=1, dilation=1, groups: int = 1,
               exact: bool = False) -> torch.Tensor:
    """``acc[n, j, p] = sum LUT[qx, qw]`` over each receptive field (no padding: pad ``qx`` first).

    Args:
        qx: integer-valued activations ``(N, C, H, W)``, already padded with the zero point.
        qw: integer-valued weights ``(Co, C/groups, kh, kw)``.
        tabs: the LUT tables.
        stride: conv stride.
        dilation: conv dilation.
        groups: conv groups.
        exact: accumulate exactly (float64 / integer).

    Returns:
        ``(N, Co, Ho, Wo)`` accumulators, integer-valued.
    """
    return _LutConv2dFn.apply(qx, qw, tabs, _pair(stride), _pair(dilation), int(groups), exact)


# ------------------------------------------------------------------------------------------
# Quantized layers' arithmetic (shared by the modules and the functional API)
# ------------------------------------------------------------------------------------------

def _check_finite(x: torch.Tensor, what: str) -> None:
    # A NaN or Inf anywhere makes the sum non-finite: one cheap reduction (~3x faster than
    # aminmax). Only when the sum is not finite (or overflowed) do min/max decide.
    if x.numel() and not bool(torch.isfinite(x.sum())) \
            and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        raise InvalidValueError(f"{what} input contains NaN or Inf; approximate layers quantize their "
                         f"inputs and cannot represent non-finite values")


def _cached(cache: dict | None, key, make):
    """``make()``, memoized in ``cache`` (a layer's weight-side cache, cleared when its weight
    changes; ``None``: no caching)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _dequantize(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.Tensor:
    """``scale * acc + bias`` (same operations, same order), in place on the fresh accumulator
    where autograd allows it: each new full-size tensor costs page faults on first touch."""
    if acc.requires_grad or scale.requires_grad or scale.dtype != acc.dtype \
            or acc.shape != torch.broadcast_shapes(acc.shape, scale.shape):
        y = scale * acc
    else:
        y = acc.mul_(scale)
    if bias is not None:
        # y is new here (never a leaf, and mul's backward does not need it): add in place
        if y.shape != torch.broadcast_shapes(y.shape, bias.shape) or y.dtype != torch.promote_types(y.dtype, bias.dtype):
            y = y + bias
        else:
            y.add_(bias)
    return y.to(dtype)


def approx_linear(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  zw: torch.Tensor, bias: torch.Tensor | None, tabs: LutTables | None, *,
                  exact: bool = False, cache: dict | None = None) -> torch.Tensor:
    """Dequantized linear output from quantized operands.

    ``y = sx * sw * sum_k (AM(qx, qw) - qx*zw - zx*qw + zx*zw) + bias``; with ``tabs=None``
    the exact product replaces ``AM`` (exact-multiplication mode).

    Args:
        qx: ``(M, K)`` integer-valued activations; ``sx``/``zx`` their scalar scale/zero point.
        qw: ``(N, K)`` integer-valued weights; ``sw``/``zw`` per tensor or ``(N, 1)`` per channel.
        bias: optional ``(N,)``.
        tabs: LUT tables, or ``None`` for exact multiplication.
        exact: exact accumulation.
        cache: optional dict for weight-side tables derived from ``qw``/``zw`` (and ``zx``);
            the caller must pass a fresh one whenever the weights change.

    Returns:
        ``(M, N)`` output in ``qx``'s dtype.
    """
    dt = torch.float64 if exact else qx.dtype
    zwr = zw.reshape(1, -1) if zw.dim() else zw
    swr = sw.reshape(1, -1) if sw.dim() else sw
    fold = None
    if tabs is not None and not exact and tabs.kernel is Kernel.LOWRANK and _FUSED_LOWRANK and qx.dim() == 2:
        n, k = qw.shape
        fold = _cached(cache, ("fold", id(tabs), float(zx)),
                       lambda: _folded_lowrank_weights(qw.reshape(n, k, 1, 1), zx, zw, tabs))
    if fold is not None:
        acc = _LowRankLinearZpFn.apply(qx, qw, zx, zw, tabs, fold[0].reshape(n, -1), fold[1]).to(dt)
    elif tabs is None:
        acc = (qx.to(dt) - zx) @ (qw.to(dt) - zw).t()
    else:
        acc = lut_linear(qx, qw, tabs, exact=exact).to(dt)
        if not tabs.signed:
            k = qx.shape[1]
            acc = acc - qx.to(dt).sum(1, keepdim=True) * zwr - zx * qw.to(dt).sum(1).reshape(1, -1) + k * zx * zwr
    return _dequantize(acc, (sx * swr).to(dt), None if bias is None else bias.to(dt), qx.dtype)


def approx_conv2d(qx: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  zw: torch.Tensor, bias: torch.Tensor | None, tabs: LutTables | None, *, stride=1,
                  padding=0, dilation=1, groups: int = 1, exact: bool = False, cache: dict | None = None
                  ) -> torch.Tensor:
    """Dequantized conv2d output from quantized operands (see :func:`approx_linear`).

    Padding inserts the activation zero point (a code), not a literal 0: a padded position
    contributes ``LUT[Zx, qw]`` like any other, as it does in the hardware.

    Returns:
        ``(N, Co, Ho, Wo)`` output in ``qx``'s dtype.
    """
    dt = torch.float64 if exact else qx.dtype
    ph, pw = _pair(padding)
    st, dil = _pair(stride), _pair(dilation)
    co = qw.shape[0]
    zwr = zw.reshape(1, co, 1, 1) if zw.dim() else zw
    swr = sw.reshape(1, co, 1, 1) if sw.dim() else sw
    fold = None
    if tabs is not None and not exact and tabs.kernel is Kernel.LOWRANK and _FUSED_LOWRANK:
        fold = _cached(cache, ("fold", id(tabs), float(zx)), lambda: _folded_lowrank_weights(qw, zx, zw, tabs))
    if fold is not None:
        r1 = None
        if tabs.u_is_value:
            r1 = _cached(cache, ("rank1", id(tabs), float(zx)), lambda: _rank1_prep(zx, fold[0], fold[1], tabs))
        acc = _LowRankConvZpFn.apply(qx, qw, zx, zw, tabs, fold[0], fold[1], (ph, pw), st, dil, groups, r1).to(dt)
        return _dequantize(acc, (sx * swr).to(dt), None if bias is None else bias.to(dt).reshape(1, co, 1, 1), qx.dtype)
    if tabs is not None and _FUSED_GATHER and tabs.kernel is Kernel.GATHER:
        acc = _gather_conv_zp(qx, qw, zx, zw, tabs, (ph, pw), st, dil, groups, dt)
        if acc is not None:
            acc = _GatherConvZpFn.apply(qx, qw, zx, zw, tabs, acc, dt, (ph, pw), st, dil, groups)
            return _dequantize(acc, (sx * swr).to(dt), None if bias is None else bias.to(dt).reshape(1, co, 1, 1), qx.dtype)
    if ph or pw:
        qx = F.pad(qx, (pw, pw, ph, ph), value=float(zx))
    if tabs is None:
        acc = F.conv2d(qx.to(dt) - zx, qw.to(dt) - zw, None, st, 0, dil, groups)
    else:
        acc = lut_conv2d(qx, qw, tabs, stride=st, dilation=dil, groups=groups, exact=exact).to(dt)
        if not tabs.signed:
            cg, kh, kw = qw.shape[1:]
            ones = torch.ones((groups, cg, kh, kw), dtype=dt, device=qx.device)
            sum_x = F.conv2d(qx.to(dt), ones, None, st, 0, dil, groups).repeat_interleave(co // groups, dim=1)
            sum_w = qw.to(dt).sum((1, 2, 3)).reshape(1, co, 1, 1)
            acc = acc - sum_x * zwr - zx * sum_w + (cg * kh * kw) * zx * zwr
    return _dequantize(acc, (sx * swr).to(dt), None if bias is None else bias.to(dt).reshape(1, co, 1, 1), qx.dtype)


# ------------------------------------------------------------------------------------------
# Activation x activation
# ------------------------------------------------------------------------------------------

_TABLE_CACHE: dict[tuple, LutTables] = {}

#: Use the fused low-rank conv (zero points folded into one convolution) where it is exact.
_FUSED_LOWRANK = os.environ.get("APPMULT_NO_FUSED_LOWRANK", "") == ""
#: Use the numba gather conv with the cross terms folded into its rows (CPU, 8-bit tables).
_FUSED_GATHER = os.environ.get("APPMULT_NO_FUSED_GATHER", "") == ""


def _tables_for(lut: LutFile | str | os.PathLike, grad: str, kernel: str, device: torch.device) -> LutTables:
    if not isinstance(lut, LutFile):
        from .config import load_lut
        lut = load_lut(lut)
    key = (lut.sha256, GradMode(grad), Kernel(kernel), str(device))
    tabs = _TABLE_CACHE.get(key)
    if tabs is None:
        tabs = LutTables(lut, grad=grad, kernel=kernel).to(device)
        _TABLE_CACHE[key] = tabs
    return tabs


def approx_matmul(a: torch.Tensor, b: torch.Tensor, lut: LutFile | str | os.PathLike, *,
                  grad: str = "ste", kernel: str = "auto", exact: bool = False) -> torch.Tensor:
    """``a @ b`` with every scalar product through the LUT (e.g. attention scores).

    Both operands are quantized per tensor from their own current range (dynamic
    quantization, straight-through gradients); ``a`` goes to the LUT's operand ``a``.

    Args:
        a: ``(..., M, K)`` float tensor.
        b: ``(..., K, N)`` float tensor (batch dimensions broadcast like :func:`torch.matmul`).
        lut: a LUT file or its path.
        grad: backward mode (``ste``, ``lut2d``, ``lut1d``).
        kernel: ``auto``, ``lowrank`` or ``gather``.
        exact: exact accumulation.

    Returns:
        ``(..., M, N)`` tensor.

    Raises:
        ValueError: NaN/Inf inputs or mismatched shapes.
    """
    from .quant import ActivationQuantizer

    _check_finite(a, "approx_matmul")
    _check_finite(b, "approx_matmul")
    if a.shape[-1] != b.shape[-2]:
        raise InvalidValueError(f"approx_matmul shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    tabs = _tables_for(lut, grad, kernel, a.device)
    qa_ = ActivationQuantizer(tabs.width_x, tabs.signed, "minmax").to(a.device)
    qb_ = ActivationQuantizer(tabs.width_w, tabs.signed, "minmax").to(a.device)
    qa, sa, za = qa_(a)
    qb, sb, zb = qb_(b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    qa = qa.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    qb = qb.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    outs = [approx_linear(qa[i], sa, za, qb[i].t(), sb, zb, None, tabs, exact=exact) for i in range(qa.shape[0])]
    return torch.stack(outs).reshape(*batch, a.shape[-2], b.shape[-1])
