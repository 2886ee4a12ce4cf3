"""Tests written for surviving mutants of appmult.nn.tables and appmult.nn.quant (mutmut).

Each test checks behaviour against an independent reference (numpy brute-force sums of
``LUT[qa, qb]``, gradients written out as sums of gradient-table entries, the tables of
:func:`appmult.lut_gen.gradients.lut2d_gradients` re-indexed by hand, values derived by
reasoning) and its docstring names the behaviour the surviving mutants broke.

Uninitialised storage (``to_empty``) is made deterministic by patching ``torch.empty_like``
to fill with a constant: a stale value then shows instead of depending on the allocator.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.lut_gen.gradients import lut2d_gradients
from appmult.nn import ActivationQuantizer, Kernel, LutTables, lut_bmm, lut_linear
from appmult.nn import kernels as K

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Every tensor LutTables keeps (``None`` where a table does not apply).
TABLE_NAMES = ("table", "prod", "u", "v", "u_f32", "v_f32", "gx1", "gw1", "gx2", "gw2",
               "gx_p", "gx_q", "gw_p", "gw_q")


def values(width: int, signed: bool) -> np.ndarray:
    """Operand value of each code."""
    c = np.arange(1 << width)
    return np.where(c >= (1 << (width - 1)), c - (1 << width), c) if signed else c


def codes(v, width: int) -> np.ndarray:
    return np.asarray(v).astype(np.int64) & ((1 << width) - 1)


def garbage_empty_like(monkeypatch, fill=3):
    """``torch.empty_like`` (what ``Module.to_empty`` allocates with) returning storage that
    holds ``fill``: stale "uninitialised" values, the same on every run."""
    def empty_like(t, **kw):
        return torch.full_like(t, fill, **kw)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def unsigned_exact(width: int) -> np.ndarray:
    v = values(width, False)
    return np.outer(v, v)


def bmm_operands(rng, width: int, signed: bool, shape_a, shape_b):
    lo, hi = (-(1 << (width - 1)), 1 << (width - 1)) if signed else (0, 1 << width)
    return rng.integers(lo, hi, size=shape_a), rng.integers(lo, hi, size=shape_b)


def bmm_ref(p: np.ndarray, width: int, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """``sum_k LUT[code(a_bmk), code(b_bkn)]`` in int64 (object-free: |entries| < 2**40)."""
    return p[codes(ca, width)[:, :, :, None], codes(cb, width)[:, None, :, :]].sum(2)


def lut2d_grads_ref(ga: np.ndarray, gb: np.ndarray, width: int, ca, cb, g):
    """LUT-2D backward of ``acc = sum_k LUT[a, b]``: ``dL/da[b,m,k] = sum_n G[b,m,n] ga[a, b]``,
    ``dL/db[b,k,n] = sum_m G[b,m,n] gb[a, b]`` (tables indexed by codes)."""
    ia, ib = codes(ca, width)[:, :, :, None], codes(cb, width)[:, None, :, :]     # (B,M,K,1), (B,1,K,N)
    da = (ga[ia, ib] * g[:, :, None, :]).sum(3)
    db = (gb[ia, ib] * g[:, :, None, :]).sum(1)
    return da, db


# -- LutTables.__init__: operand values, product dtype, default half window ---------------------

def test_ste_backward_of_a_signed_lut_uses_the_signed_operand_values():
    """STE through ``lut_bmm`` (the tables' ``gx1``/``gw1`` = operand values): for a signed
    LUT ``dL/da = G @ b.T`` and ``dL/db = a.T @ G`` with two's-complement *values*, negative
    ones included (mutant: the weight side's values read unsigned, ``-3`` as ``13``)."""
    rng = np.random.default_rng(1)
    w = 4
    p = rng.integers(-60, 61, size=(16, 16))
    tabs = LutTables(LutFile(p, width_a=w, width_b=w, signed=True), grad="ste", kernel="gather")
    ca, cb = bmm_operands(rng, w, True, (2, 3, 5), (2, 5, 4))
    ca.flat[0], cb.flat[0] = -8, -8
    qa = torch.tensor(ca, dtype=torch.float32, requires_grad=True)
    qb = torch.tensor(cb, dtype=torch.float32, requires_grad=True)
    out = lut_bmm(qa, qb, tabs, exact=True)
    np.testing.assert_array_equal(out.detach().numpy(), bmm_ref(p, w, ca, cb))
    g = rng.standard_normal((2, 3, 4))
    out.backward(torch.from_numpy(g))
    np.testing.assert_allclose(qa.grad.numpy(), g @ cb.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qb.grad.numpy(), ca.transpose(0, 2, 1) @ g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top", [1 << 31, (1 << 31) + 12345, (1 << 32) - 1])
def test_products_from_two_to_the_31_are_gathered_exactly(top):
    """A LUT whose largest product is ``2**31`` or more keeps its products in int64: the
    gather sums (``lut_linear`` and ``lut_bmm``, exact) equal the int64 brute-force sums
    (mutants: int32 for every LUT, for ``max|p| <= 2**31`` or ``< 2**32``: ``2**31`` wraps
    to ``-2**31``)."""
    rng = np.random.default_rng(2)
    w = 2
    p = rng.integers(0, 1000, size=(4, 4))
    p[3, 2] = top
    p[1, 3] = top - 7
    tabs = LutTables(LutFile(p, width_a=w, width_b=w, signed=False), kernel="gather")
    ca, cb = bmm_operands(rng, w, False, (1, 3, 6), (1, 6, 5))
    ca[0, 0, :2], cb[0, :2, 0] = (3, 1), (2, 3)
    ref = bmm_ref(p, w, ca, cb)
    assert ref.max() > 1 << 32
    got = lut_bmm(torch.tensor(ca, dtype=torch.float32), torch.tensor(cb, dtype=torch.float32), tabs, exact=True)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), ref)
    lin = lut_linear(torch.tensor(ca[0], dtype=torch.float32), torch.tensor(cb[0].T, dtype=torch.float32),
                     tabs, exact=True)
    np.testing.assert_array_equal(lin.numpy().astype(np.int64), ref[0])


def test_computed_lut2d_tables_default_to_the_automatic_half_window():
    """``compute_missing_gradients`` without a half window computes the LUT-2D tables with
    ``"auto"`` (mutants: the default spelled ``"XXautoXX"``/``"AUTO"``, which the gradient
    code refuses)."""
    rng = np.random.default_rng(3)
    p = rng.integers(0, 200, size=(16, 16))
    tabs = LutTables(LutFile(p, width_a=4, width_b=4, signed=False), grad="lut2d",
                     compute_missing_gradients=True)
    ga, gb = lut2d_gradients(p, 4, 4, False, "auto")
    np.testing.assert_array_equal(tabs.gx2.numpy(), ga)  # unsigned: value offset == code
    np.testing.assert_array_equal(tabs.gw2.numpy(), gb)


# -- LutTables._apply / to_empty: rebuilding from the LUT ---------------------------------------

def _buffers(tabs: LutTables) -> dict[str, torch.Tensor | None]:
    return {name: getattr(tabs, name) for name in TABLE_NAMES}


def _assert_same_tables(got: LutTables, want: LutTables) -> None:
    for name, t in _buffers(want).items():
        g = getattr(got, name)
        if t is None:
            assert g is None, name
        else:
            assert g is not None and g.dtype == t.dtype and not g.is_meta, name
            assert torch.equal(g, t), name


def test_to_empty_from_meta_rebuilds_computed_tables_of_operand_b(monkeypatch):
    """A table set moved to ``meta`` and materialized with ``to_empty`` is rebuilt from the
    LUT with *all* its constructor arguments: activations on operand ``b`` (the product and
    gradient tables transposed), LUT-2D tables computed with half window 1 (not the
    automatic one). Checked against the tables re-indexed by hand. (Mutants: the rebuild
    arguments dropped, renamed or ``None``; the meta check or the buffer lookup broken, so
    the fresh storage keeps its stale contents; half window 1 not passed to the gradient
    computation.)"""
    rng = np.random.default_rng(4)
    p = rng.integers(0, 200, size=(16, 16))
    ga1, gb1 = lut2d_gradients(p, 4, 4, False, 1)
    gaa, _ = lut2d_gradients(p, 4, 4, False, "auto")
    assert not np.array_equal(ga1, gaa)  # the half window matters for this LUT
    args = dict(grad="lut2d", kernel="gather", activation_operand="b", compute_missing_gradients=True,
                half_window=1)
    lut = LutFile(p, width_a=4, width_b=4, signed=False)
    tabs = LutTables(lut, **args)
    # activations are operand b: [x, w] = [b, a]; unsigned value offsets are the codes
    np.testing.assert_array_equal(tabs.prod.numpy(), p.T)
    np.testing.assert_array_equal(tabs.gx2.numpy(), gb1.T)
    np.testing.assert_array_equal(tabs.gw2.numpy(), ga1.T)
    twin = LutTables(lut, **args)
    tabs.to("meta")
    assert tabs.prod.is_meta and tabs.gx2.is_meta
    garbage_empty_like(monkeypatch)
    tabs.to_empty(device="cpu")
    _assert_same_tables(tabs, twin)
    np.testing.assert_array_equal(tabs.prod.numpy(), p.T)
    np.testing.assert_array_equal(tabs.gx2.numpy(), gb1.T)
    np.testing.assert_array_equal(tabs.table.numpy(), p)


def test_to_empty_from_meta_rebuilds_forced_lowrank_gradient_factors(monkeypatch):
    """``kernel="lowrank"`` on a LUT whose exact rank (15: ``min(a, b)``) is above
    ``AUTO_MAX_RANK`` forces the low-rank forward and with it the low-rank gradient factors
    of rank-16 LUT-2D tables, where ``auto`` would take the gather for both; the rebuild
    after ``to_empty`` keeps them (mutants: the kernel or grad mode left out of the rebuild
    arguments: the rebuilt set has no factors for the buffers to take)."""
    rng = np.random.default_rng(5)
    v = values(4, False)
    p = np.minimum(v[:, None], v[None, :])
    ga = rng.standard_normal((16, 16)).astype(np.float32)
    gb = rng.standard_normal((16, 16)).astype(np.float32)
    lut = LutFile(p, width_a=4, width_b=4, signed=False, gradients={"lut2d": (ga, gb)})
    assert LutTables(lut, grad="lut2d").grad_kernel is Kernel.GATHER  # what auto picks
    tabs = LutTables(lut, grad="lut2d", kernel="lowrank")
    assert tabs.rank == 15 > K.AUTO_MAX_RANK
    assert tabs.grad_kernel is Kernel.LOWRANK and tabs.gx_p.shape[1] == 16
    twin = LutTables(lut, grad="lut2d", kernel="lowrank")
    tabs.to("meta")
    garbage_empty_like(monkeypatch)
    tabs.to_empty(device="cpu")
    _assert_same_tables(tabs, twin)
    p, q = tabs.gx_p.double().numpy(), tabs.gx_q.double().numpy()
    np.testing.assert_allclose(p @ q.T, ga, atol=1e-4)


def test_share_memory_shares_every_table_in_place():
    """``share_memory()`` moves each table's storage to shared memory in place (for
    DataLoader workers / multiprocessing), values unchanged (mutants: every buffer is
    replaced by a freshly rebuilt, unshared copy on any ``_apply``)."""
    rng = np.random.default_rng(6)
    ga = rng.integers(-3, 4, size=(16, 1)) * rng.integers(-3, 4, size=(1, 16))
    lut = LutFile(unsigned_exact(4), width_a=4, width_b=4, signed=False,
                  gradients={"lut2d": (ga.astype(np.float32), ga.T.astype(np.float32))})
    tabs = LutTables(lut, grad="lut2d")
    before = {k: t.clone() for k, t in _buffers(tabs).items() if t is not None}
    tabs.share_memory()
    for name, t in before.items():
        now = getattr(tabs, name)
        assert now.is_shared(), name
        assert torch.equal(now, t), name


def test_meta_with_a_dtype_moves_every_table_and_keeps_dtypes():
    """``.to("meta", torch.float16)`` moves every table (the low-rank gradient factors
    included) to ``meta`` and changes no dtype (mutants: the kept-dtype copy made with
    ``device=None``, i.e. left on the CPU; the gradient factors registered under other
    names, so plain attributes that ``.to`` never moves)."""
    rng = np.random.default_rng(7)
    ga = (rng.integers(-3, 4, size=(16, 2)) @ rng.integers(-3, 4, size=(2, 16))).astype(np.float32)
    lut = LutFile(unsigned_exact(4), width_a=4, width_b=4, signed=False, gradients={"lut2d": (ga, ga.T.copy())})
    tabs = LutTables(lut, grad="lut2d")
    assert tabs.grad_kernel is Kernel.LOWRANK
    dtypes = {k: t.dtype for k, t in _buffers(tabs).items() if t is not None}
    assert {"gx_p", "gx_q", "gw_p", "gw_q", "u_f32", "gx2"} <= set(dtypes)
    tabs.to("meta", torch.float16)
    for name, dt in dtypes.items():
        t = getattr(tabs, name)
        assert t.is_meta, name
        assert t.dtype == dt, name


# -- LutTables._register_gradient_factors ------------------------------------------------------

def test_lowrank_gradient_factors_are_not_persistent_state():
    """The persistent state is the product table and the LUT identity only: a state_dict of
    tables with low-rank LUT-2D gradient factors loads into STE tables of the same LUT
    (mutants: the factors registered persistent, so they appear in the state_dict and a
    strict load reports them as unexpected)."""
    rng = np.random.default_rng(8)
    ga = (rng.integers(-3, 4, size=(16, 2)) @ rng.integers(-3, 4, size=(2, 16))).astype(np.float32)
    lut = LutFile(unsigned_exact(4), width_a=4, width_b=4, signed=False, gradients={"lut2d": (ga, ga.T.copy())})
    tabs = LutTables(lut, grad="lut2d")
    assert tabs.grad_kernel is Kernel.LOWRANK
    sd = tabs.state_dict()
    assert set(sd) == {"table", "_extra_state"}
    ste = LutTables(lut, grad="ste")
    ste.load_state_dict(sd)  # strict
    np.testing.assert_array_equal(ste.table.numpy(), unsigned_exact(4))


def _lut2d_bmm_case(ga, gb, width, kernel, seed):
    rng = np.random.default_rng(seed)
    p = unsigned_exact(width)
    lut = LutFile(p, width_a=width, width_b=width, signed=False, gradients={"lut2d": (ga, gb)})
    tabs = LutTables(lut, grad="lut2d", kernel=kernel)
    ca, cb = bmm_operands(rng, width, False, (2, 3, 5), (2, 5, 4))
    qa = torch.tensor(ca, dtype=torch.float32, requires_grad=True)
    qb = torch.tensor(cb, dtype=torch.float32, requires_grad=True)
    out = lut_bmm(qa, qb, tabs)
    g = rng.standard_normal((2, 3, 4))
    out.backward(torch.from_numpy(g).float())
    da, db = lut2d_grads_ref(ga.astype(np.float64), gb.astype(np.float64), width, ca, cb, g)
    np.testing.assert_allclose(qa.grad.numpy(), da, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(qb.grad.numpy(), db, rtol=1e-4, atol=1e-4)
    return tabs


@pytest.mark.parametrize("rank, want", [(K.AUTO_MAX_RANK, Kernel.LOWRANK), (K.AUTO_MAX_RANK + 1, Kernel.GATHER)])
def test_gradient_tables_of_rank_auto_max_rank_take_the_lowrank_kernel(rank, want):
    """With the gather forward kernel, LUT-2D tables of float rank ``AUTO_MAX_RANK`` still
    take the low-rank gradient kernel, one more rank the gather (mutant: ``r <
    AUTO_MAX_RANK``); both give the LUT-2D gradient."""
    rng = np.random.default_rng(9)
    ga = (rng.integers(-4, 5, size=(16, rank)) @ rng.integers(-4, 5, size=(rank, 16))).astype(np.float32)
    gb = (rng.integers(-4, 5, size=(16, 3)) @ rng.integers(-4, 5, size=(3, 16))).astype(np.float32)
    assert np.linalg.matrix_rank(ga.astype(np.float64)) == rank
    tabs = _lut2d_bmm_case(ga, gb, 4, "gather", 10)
    assert tabs.grad_kernel is want
    assert f"grad=lut2d/{want.value}" in tabs.describe()


def test_one_gradient_table_without_lowrank_factors_takes_the_gather():
    """A LUT-2D pair where only ``g_a`` has low-rank factors (``g_b`` is a full-rank 64x64
    table, beyond the 32-rank search) uses the gather gradient kernel and gives the LUT-2D
    gradient (mutant: ``fx is not None or fw is not None`` reads the missing factors and
    fails to build the tables)."""
    rng = np.random.default_rng(11)
    ga = np.outer(rng.integers(1, 5, 64), rng.integers(-3, 4, 64)).astype(np.float32)
    gb = rng.standard_normal((64, 64)).astype(np.float32)
    assert K.float_factorization(ga) is not None and K.float_factorization(gb) is None
    tabs = _lut2d_bmm_case(ga, gb, 6, "auto", 12)
    assert tabs.grad_kernel is Kernel.GATHER


# -- ActivationQuantizer._apply -----------------------------------------------------------------

def test_activation_quantizer_to_empty_from_meta_forgets_the_range(monkeypatch):
    """An observer materialized from ``meta`` has observed nothing, whatever the new storage
    held: in eval mode its first batch sets the range (mutants: the reset skipped, so the
    stale storage reads as an initialized range ``[3, 3]``)."""
    q = ActivationQuantizer(4, False)
    q.to("meta")
    garbage_empty_like(monkeypatch)
    q.to_empty(device="cpu")
    assert not bool(q.initialized)
    assert float(q.min_val) == 0.0 and float(q.max_val) == 0.0
    q.eval()
    c = torch.arange(16, dtype=torch.float32)
    x = c * 0.5                       # range [0, 7.5]: scale 7.5 / 15 = 0.5, zero point 0
    qx, s, z = q(x)
    assert float(s) == 0.5 and float(z) == 0.0
    assert torch.equal(qx, c)


def test_activation_quantizer_moved_with_a_narrow_dtype_follows_the_device():
    """``.to(device, torch.float16)`` moves the range statistics to the new device and keeps
    them float32 (mutants: the float32 copy made on the old device, so the statistics would
    stay behind on the CPU while the model moves; ``meta`` is the second device here)."""
    q = ActivationQuantizer(8, False, "minmax")
    q.to("meta", torch.float16)
    for name in ("min_val", "max_val"):
        t = getattr(q, name)
        assert t.is_meta and t.dtype == torch.float32, name


def test_activation_quantizer_half_after_double_keeps_float64_statistics():
    """``.half()`` after ``.double()`` leaves the statistics in float64, the wider type they
    already had (mutant: every narrow move makes them float32, rounding the range)."""
    q = ActivationQuantizer(8, False, "minmax")
    q.double()
    q.min_val.fill_(0.1)
    q.half()
    assert q.min_val.dtype == torch.float64 and q.max_val.dtype == torch.float64
    assert float(q.min_val) == 0.1


def test_activation_quantizer_keeps_its_range_through_moves_and_follows_float():
    """Moving an observer (``.cpu()``, ``.double()``) keeps the observed range; ``.float()``
    after ``.double()`` brings the statistics back to float32 (rounded), while ``.half()``
    leaves them in float32 (mutants: the range reset on every move; float32 treated like a
    narrow type, so ``.float()`` leaves float64)."""
    q = ActivationQuantizer(8, False, "minmax")
    q.train()
    q(torch.tensor([-1.0, 3.0]))
    q.cpu()
    assert bool(q.initialized) and float(q.min_val) == -1.0 and float(q.max_val) == 3.0
    q.double()
    assert q.min_val.dtype == torch.float64
    assert bool(q.initialized) and float(q.min_val) == -1.0 and float(q.max_val) == 3.0
    q(torch.tensor([-0.1, 0.3], dtype=torch.float64))  # minmax: the range stays [-1, 3]
    q.reset()
    q(torch.tensor([-0.1, 0.3], dtype=torch.float64))
    assert float(q.min_val) == -0.1
    q.float()
    assert q.min_val.dtype == q.max_val.dtype == torch.float32
    assert q.min_val.item() == float(np.float32(-0.1)) != -0.1
    q.half()
    assert q.min_val.dtype == torch.float32
    assert q.min_val.item() == float(np.float32(-0.1))


def test_to_empty_between_real_devices_keeps_the_tables(monkeypatch):
    """``to_empty`` on a table set that is not on ``meta`` (CPU to CPU) allocates fresh,
    uninitialized storage for every buffer; the tables must keep their values, not the
    storage's (before the fix: the stale contents, so a forward summed garbage silently and
    ``load_state_dict`` blamed a different LUT)."""
    rng = np.random.default_rng(6)
    p = rng.integers(-300, 300, size=(16, 16))
    lut = LutFile(p, width_a=4, width_b=4, signed=False)
    tabs = LutTables(lut, grad="lut2d", kernel="gather", compute_missing_gradients=True)
    twin = LutTables(lut, grad="lut2d", kernel="gather", compute_missing_gradients=True)
    garbage_empty_like(monkeypatch)
    tabs.to_empty(device="cpu")
    _assert_same_tables(tabs, twin)
    np.testing.assert_array_equal(tabs.prod.numpy(), p)


def test_layer_to_empty_on_cpu_then_load_state_dict_is_exact(monkeypatch):
    """The same through a layer: ``to_empty`` + ``load_state_dict`` (the usual way to
    materialize a model) gives the brute-force sum of LUT entries."""
    from appmult.nn import ApproxConfig, ApproxLinear
    rng = np.random.default_rng(7)
    p = rng.integers(0, 250, size=(16, 16))
    lut = LutFile(p, width_a=4, width_b=4, signed=False)
    torch.manual_seed(0)
    layer = ApproxLinear(5, 3, config=ApproxConfig(lut, kernel="gather")).eval()
    x = torch.rand(4, 5) * 3
    layer(x)  # calibrates the activation range
    state = copy.deepcopy(layer.state_dict())
    garbage_empty_like(monkeypatch)
    layer.to_empty(device="cpu")
    monkeypatch.undo()
    layer.load_state_dict(state)
    q = layer.quantize(x)
    qx, qw = q.qx.numpy().astype(np.int64), q.qw.numpy().astype(np.int64)
    ref = p[qx[:, None, :], qw[None, :, :]].sum(-1)
    np.testing.assert_array_equal(layer.int_forward(x).numpy(), ref)
