"""A LUT and every table derived from it, as a module of buffers; index helpers.

Operand roles. A layer multiplies an *activation* by a *weight*. By default the
activation is the LUT's operand ``a`` and the weight its operand ``b`` -- the order of the
RTL MAC unit (``appmult.hdl``'s MAC takes the activation on ``a``); set
``activation_operand="b"`` for hardware wired the other way round. Internally every
table is re-indexed ``[x, w]`` (activation first) and by *value offset* (``value -
min_value``) instead of by code, so quantized integers index tables directly: the index
helpers here turn integer-valued tensors into those offsets (and lay them out for the
kernels), the rest of :mod:`appmult.nn` reads the tables through :class:`LutTables`.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codes import codes_by_value, codes_to_values
from ..errors import InvalidTypeError, InvalidValueError, UserError
from ..lut_gen import lut1d_gradients, lut2d_gradients
from ..lut_gen.lutfile import LutFile, LutFileError
from . import kernels as K

__all__ = [
    "GradMode",
    "Kernel",
    "LutMismatchError",
    "LutTables",
    "MissingGradientError",
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
        kernel: forward kernel (``auto``: timed once per layer shape among the kernels
            that apply, see :func:`appmult.nn.kernels.probe_choice`; the guess by exact
            integer rank, :func:`appmult.nn.kernels.choose_kernel`, where nothing is timed).
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
        # to rebuild every table from the LUT (leaving the meta device: see _apply)
        self._init_args = dict(grad=grad, kernel=kernel, activation_operand=activation_operand,
                               compute_missing_gradients=compute_missing_gradients, half_window=half_window)
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
        #: Kernels the automatic choice times per layer shape (:func:`appmult.nn.kernels.probe_choice`);
        #: empty when the kernel is forced or only the gather applies (no exact factorization).
        self.auto_candidates: tuple[str, ...] = ()
        #: Whether the kernel is the guess by rank (``auto``): then it follows the tables' device.
        self._guessed = kern is Kernel.AUTO
        if kern is Kernel.AUTO:
            kern = Kernel(K.choose_kernel(self.rank))
            if fac is not None:
                # the rank-based guess first: it wins ties
                self.auto_candidates = (kern.value,) + tuple(c for c in ("lowrank", "gather") if c != kern.value)
        if kern is Kernel.LOWRANK and fac is None:
            raise InvalidValueError(f"LUT {lut.lut_id} has no exact integer factorization of rank <= 32; "
                                    f"use kernel='gather' or kernel='auto'")
        self._kernel = kern
        self._register_factors(fac, vx, vw)
        gx1, gw1, gx2, gw2 = _gradient_tables(lut, self.grad, swap, (cx, cw), (vx, vw),
                                              compute_missing_gradients, half_window)
        for name, arr in (("gx1", gx1), ("gw1", gw1), ("gx2", gx2), ("gw2", gw2)):
            self.register_buffer(name, None if arr is None else torch.from_numpy(np.ascontiguousarray(arr)),
                                 persistent=False)
        self._register_gradient_factors(gx2, gw2)

    def _register_factors(self, fac: K.LowRank | None, vx: np.ndarray, vw: np.ndarray) -> None:
        """The integer low-rank factors (float64 and float32 copies) and what the fused paths read."""
        #: Integer ``c`` with ``U @ c == value(x)`` exactly (or ``None``): lets the activation
        #: zero-point cross term ``-x * Zw`` fold into the low-rank weights (``V - c Zw``).
        self.value_coef: tuple[int, ...] | None = None
        self.u_is_value = False
        self.v_is_value = False
        if fac is None:
            for name in ("u", "v", "u_f32", "v_f32"):
                self.register_buffer(name, None, persistent=False)
            return
        self.register_buffer("u", torch.from_numpy(fac.u.astype(np.float64)), persistent=False)
        self.register_buffer("v", torch.from_numpy(fac.v.astype(np.float64)), persistent=False)
        self.register_buffer("u_f32", torch.from_numpy(fac.u.astype(np.float32)), persistent=False)
        self.register_buffer("v_f32", torch.from_numpy(fac.v.astype(np.float32)), persistent=False)
        self.value_coef = _value_coefficients(fac.u, vx)
        #: U is the single column value(x): the low-rank conv maps activations to themselves.
        self.u_is_value = fac.u.shape[1] == 1 and np.array_equal(fac.u[:, 0], vx)
        #: V is the single column value(w) as well (the exact product): the folded weights
        #: are the quantized weights themselves, shifted by the zero point.
        self.v_is_value = self.u_is_value and np.array_equal(fac.v[:, 0], vw)
        self._u_absmax = np.abs(fac.u).max(axis=0).astype(np.float64)
        self._v_min = fac.v.min(axis=0).astype(np.float64)
        self._v_max = fac.v.max(axis=0).astype(np.float64)

    def _register_gradient_factors(self, gx2: np.ndarray | None, gw2: np.ndarray | None) -> None:
        """Float low-rank factors of full (LUT-2D) gradient tables, when they are small enough."""
        self.grad_kernel = None
        for name in ("gx_p", "gx_q", "gw_p", "gw_q"):
            self.register_buffer(name, None, persistent=False)
        if gx2 is None:
            return
        self.grad_kernel = Kernel.GATHER
        fx = K.float_factorization(gx2)
        fw = K.float_factorization(gw2)
        if fx is not None and fw is not None:
            r = max(fx[0].shape[1], fw[0].shape[1])
            if self._kernel is Kernel.LOWRANK or r <= K.AUTO_MAX_RANK:
                self.grad_kernel = Kernel.LOWRANK
                self.gx_p, self.gx_q = (torch.from_numpy(a.astype(np.float32)) for a in fx)
                self.gw_p, self.gw_q = (torch.from_numpy(a.astype(np.float32)) for a in fw)

    @property
    def kernel(self) -> Kernel:
        """The forward kernel: the one forced for this table on the current thread (the
        automatic choice's probe and its result, see :func:`appmult.nn.kernels.forced_kernel`),
        else the configured kernel (for ``auto``: the guess by rank for the tables' device)."""
        forced = K.forced(self)
        if forced is not None:
            return Kernel(forced)
        prod = self._buffers["prod"]  # (read at every forward: not through nn.Module's slow look-up)
        if self._guessed and prod.device.type != "cpu":
            return Kernel(K.choose_kernel(self.rank, prod.device))
        return self._kernel

    @kernel.setter
    def kernel(self, value: str | Kernel) -> None:
        self._kernel = Kernel(value)
        self._guessed = False

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
            raise LutMismatchError(
                f"Layer '{_layer_name(prefix)}' uses LUT {self.lut_id} but the state_dict was saved with LUT "
                f"{str(theirs)[:16]}; build the model with the LUT file it was trained with")
        if state.get("activation_operand", "a") != self.activation_operand:
            raise LutMismatchError(
                f"State_dict maps activations to LUT operand {state.get('activation_operand')!r} "
                f"but the layer maps them to {self.activation_operand!r}")

    def check_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Refuse a state_dict whose entries under ``prefix`` belong to another LUT; change nothing.

        Both the LUT identity (extra state) and the ``table`` buffer are checked, so a
        state_dict stripped of its extra state cannot load another multiplier's table
        into a layer that computes with its own.

        Raises:
            LutMismatchError: another LUT (hash, activation operand or table).
        """
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_state(state_dict[key], prefix)
        theirs = state_dict.get(prefix + "table")
        if theirs is None or self.table.is_meta or (isinstance(theirs, torch.Tensor) and theirs.is_meta):
            return
        ours = self.table
        if not (isinstance(theirs, torch.Tensor) and tuple(theirs.shape) == tuple(ours.shape)
                and not theirs.dtype.is_floating_point
                and torch.equal(theirs.to(device=ours.device, dtype=ours.dtype), ours)):
            raise LutMismatchError(
                f"Layer '{_layer_name(prefix)}' uses LUT {self.lut_id} but the state_dict holds a different "
                f"LUT table; build the model with the LUT file it was trained with")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Check identity before any buffer is overwritten, so a refused load changes nothing.
        self.check_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.to_empty()``, ...: tables change device only, never dtype
        (integer tables, exact integer factors in float32/float64, float32 gradient tables: a
        float16 copy would break the exact sums, a float64 one the kernels' dtypes). Leaving
        the meta device (``to_empty``) rebuilds every table from the LUT, since the new
        storage holds no values; any other new storage gets the table's values copied in,
        so ``to_empty`` between real devices (uninitialized storage) keeps them too."""
        names = {id(t): k for k, t in self._buffers.items() if t is not None}
        fresh: dict[str, torch.Tensor] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_meta and not out.is_meta and id(t) in names:
                if not fresh:
                    fresh.update(LutTables(self.lut_file, **self._init_args)._buffers)
                return fresh[names[id(t)]].to(device=out.device)
            if out.dtype != t.dtype:
                return t.to(device=out.device)
            return out if out is t or t.is_meta or out.is_meta else out.copy_(t)

        return super()._apply(keep, recurse)

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


def _layer_name(prefix: str) -> str:
    """The layer a LutTables' state_dict prefix belongs to (``'features.3.lut.'`` -> ``'features.3'``)."""
    prefix = prefix.rstrip(".")
    if prefix == "lut" or prefix.endswith(".lut"):
        prefix = prefix[:-3].rstrip(".")
    return prefix or "<root>"


def _gradient_tables(lut: LutFile, grad: GradMode, swap: bool, codes: tuple[np.ndarray, np.ndarray],
                     values: tuple[np.ndarray, np.ndarray], compute_missing: bool, half_window: int | str):
    """``(gx1, gw1, gx2, gw2)``, all ``[x, w]`` / value-offset indexed (``None`` where absent).

    ``gx1``/``gw1``: one value per weight (resp. activation) value -- the STE's operand values
    or the compact LUT-1D tables; ``gx2``/``gw2``: the full LUT-2D tables.
    """
    (cx, cw), (vx, vw) = codes, values
    if grad is GradMode.STE:
        return vw.astype(np.float32), vx.astype(np.float32), None, None
    method = grad.value
    if method in lut.gradients:
        ga, gb = lut.gradient(method)
    elif compute_missing:
        make = lut2d_gradients if method == "lut2d" else lut1d_gradients
        ga, gb = make(lut.product, lut.width_a, lut.width_b, lut.signed, half_window)
    else:
        raise _missing_gradients(lut, method)
    ga, gb = np.asarray(ga, np.float32), np.asarray(gb, np.float32)
    if ga.ndim == 1:
        if grad is GradMode.LUT2D:
            raise LutFileError(f"LUT {lut.lut_id} stores compact (1-D) tables under 'lut2d'; "
                               f"LUT-2D needs full tables")
        ca = codes_by_value(lut.width_a, lut.signed)
        cb = codes_by_value(lut.width_b, lut.signed)
        # ga: one value per code of b; gb: one per code of a.
        gx1, gw1 = (gb[ca], ga[cb]) if swap else (ga[cb], gb[ca])
        return gx1, gw1, None, None
    if grad is GradMode.LUT1D:
        raise LutFileError(f"LUT {lut.lut_id} stores full tables under 'lut1d'; "
                           f"LUT-1D needs compact (1-D) tables")
    if swap:
        return None, None, gb.T[np.ix_(cx, cw)], ga.T[np.ix_(cx, cw)]
    return None, None, ga[np.ix_(cx, cw)], gb[np.ix_(cx, cw)]


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
# Index helpers: integer-valued tensors -> value offsets, laid out for the kernels
# ------------------------------------------------------------------------------------------

def _idx(q: torch.Tensor, lo: int) -> torch.Tensor:
    return (q.detach() - lo).to(torch.long)


def _idx32(q: torch.Tensor, lo: int) -> torch.Tensor:
    q = q.detach()
    return (q if lo == 0 else q - lo).to(torch.int32)


def _small_idx(idx: torch.Tensor, size: int) -> torch.Tensor:
    # uint8 indices take an eighth of the memory of int64 in the unfolded operand (widths <= 8).
    return idx.to(torch.uint8) if size <= 256 else idx.to(torch.int32)


def lookup_rows(idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``F.embedding(idx, table)``: the rows ``table[idx]``, shaped ``idx.shape + (r,)``. For
    one-column tables (rank 1) a gather of the flat column instead: ``embedding`` copies each
    4-byte row on its own (350 vs 150 us for the 262,144 weights of a 512x512 layer, 2 cores).
    The same values either way; an index outside the table raises ``IndexError`` either way."""
    if table.dim() == 2 and table.shape[1] == 1:
        flat = table.reshape(-1)
        return flat.index_select(0, idx.reshape(-1)).reshape(*idx.shape, 1)
    return F.embedding(idx, table)


def _map_channels(table: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, C, H, W)`` indices -> ``(N, C*r, H, W)`` values, the r factors of a channel adjacent.

    Gathers in NHWC order with ``embedding`` (a row gather, much faster than advanced
    indexing) so that the result is already a channels-last NCHW tensor: no permute copy,
    and oneDNN convolutions prefer that layout anyway.
    """
    n, c, h, w = idx.shape
    r = table.shape[1]
    t = lookup_rows(idx.permute(0, 2, 3, 1), table.to(dtype))       # (N, H, W, C, r)
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
