"""The LUT backward computes only the gradients autograd needs (``ctx.needs_input_grad``).

A network's first layer gets an input that needs no gradient, a frozen layer a weight that
needs none; torch's own layers then skip that side, and so must the LUT products (the input
gradient of LeNet-5's first approximate conv was 8.4 ms of an 18 ms training step). Reference:
the same product with both sides requiring gradients -- the gradient that is still asked for
must equal it bit for bit, and the helpers return ``None`` for the side not asked for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear, lut_bmm
from appmult.nn import attention as AT
from appmult.nn import autograd as AG
from appmult.nn import functional as FN
from appmult.nn.tables import Kernel, LutTables
from test_nn_luts import exact, random_lut, truncated

TABLES = {"exact": lambda: exact(8, False), "truncated": lambda: truncated(8, 6), "random": lambda: random_lut(8, 3)}
CASES = [  # (table, grad, kernel)
    ("exact", "ste", "lowrank"), ("exact", "ste", "gather"), ("random", "ste", "gather"),
    ("truncated", "lut1d", "gather"), ("truncated", "lut2d", "lowrank"), ("random", "lut2d", "gather"),
]
NEEDS = [(True, False), (False, True)]


def tables(table: str, grad: str, kernel: str, signed: bool = False) -> LutTables:
    lut = TABLES[table]() if not signed else exact(8, True)
    return LutTables(LutFile(lut, width_a=8, width_b=8, signed=signed), grad=grad, kernel=kernel,
                     compute_missing_gradients=True, half_window=2)


def grads(fn, operands, need):
    """Gradients of ``fn(*operands) . g`` w.r.t. the operands that ``need`` marks (others ``None``)."""
    leaves = [torch.tensor(o, requires_grad=n) for o, n in zip(operands, need)]
    y = fn(*leaves)
    g = torch.from_numpy(np.random.default_rng(1).standard_normal(tuple(y.shape))).float()
    y.backward(g)
    return [t.grad for t in leaves]


def check_needed(fn, operands):
    both = grads(fn, operands, (True, True))
    assert all(g is not None for g in both)
    for need in NEEDS:
        got = grads(fn, operands, need)
        for g, ref, n in zip(got, both, need):
            if n:
                assert torch.equal(g, ref)
            else:
                assert g is None


@pytest.mark.parametrize("table, grad, kernel", CASES)
@pytest.mark.parametrize("zx", [0.0, 29.0])
def test_linear_gradient_of_one_side(table, grad, kernel, zx):
    tabs = tables(table, grad, kernel)
    rng = np.random.default_rng(3)
    cx = rng.integers(0, 256, (6, 20)).astype(np.float32)
    cw = rng.integers(0, 256, (5, 20)).astype(np.float32)
    one, zw = torch.tensor(1.0), torch.from_numpy(rng.integers(0, 256, (5, 1)).astype(np.float32))

    def fn(qx, qw):
        return FN._approx_linear(qx, one, torch.tensor(zx), qw, one, zw, None, tabs)
    check_needed(fn, (cx, cw))


@pytest.mark.parametrize("table, grad, kernel", CASES)
@pytest.mark.parametrize("zx, padding", [(0.0, (1, 1)), (17.0, (2, 1)), (17.0, (0, 0))])
def test_conv_gradient_of_one_side(table, grad, kernel, zx, padding):
    tabs = tables(table, grad, kernel)
    rng = np.random.default_rng(4)
    cx = rng.integers(0, 256, (2, 3, 7, 6)).astype(np.float32)
    cw = rng.integers(0, 256, (4, 3, 3, 2)).astype(np.float32)
    one, zw = torch.tensor(1.0), torch.from_numpy(rng.integers(0, 256, (4, 1, 1, 1)).astype(np.float32))

    def fn(qx, qw):
        return FN._approx_conv2d(qx, one, torch.tensor(zx), qw, one, zw, None, tabs, padding=padding)
    check_needed(fn, (cx, cw))


@pytest.mark.parametrize("grad", ["ste", "lut2d"])
@pytest.mark.parametrize("masked", [False, True])
def test_bmm_gradient_of_one_side(grad, masked):
    tabs = tables("random", grad, "gather")
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (2, 5, 4)).astype(np.float32)
    b = rng.integers(0, 256, (2, 4, 3)).astype(np.float32)
    keep = torch.from_numpy(rng.random((2, 5, 4)) > 0.3) if masked else None
    check_needed(lambda qa, qb: lut_bmm(qa, qb, tabs, keep=keep), (a, b))


def test_masked_bmm_split_gradient_of_one_side(monkeypatch):
    """The masked product's activation side from the gradient gathers (large products)."""
    monkeypatch.setattr(AT, "MASKED_SPLIT_MIN_LOOKUPS", 1)
    test_bmm_gradient_of_one_side("lut2d", True)


@pytest.mark.parametrize("table, grad, kernel", CASES)
def test_helpers_return_none_for_the_side_not_needed(table, grad, kernel, monkeypatch):
    """Not computed, not only dropped: the gather kernels of the skipped side are not called."""
    tabs = tables(table, grad, kernel)
    rng = np.random.default_rng(6)
    qx = torch.from_numpy(rng.integers(0, 256, (6, 12)).astype(np.float32))
    qw = torch.from_numpy(rng.integers(0, 256, (5, 12)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32))
    cx = torch.from_numpy(rng.integers(0, 256, (2, 3, 6, 5)).astype(np.float32))
    cw = torch.from_numpy(rng.integers(0, 256, (4, 3, 3, 3)).astype(np.float32))
    cg = torch.from_numpy(rng.standard_normal((2, 4, 4, 3)).astype(np.float32))
    zx, zw = torch.tensor(7.0), torch.tensor(9.0)
    for need in NEEDS:
        called = []
        for name in ("gather_grad_a", "gather_grad_b"):
            real = getattr(AG.K, name)
            monkeypatch.setattr(AG.K, name, lambda *a, _n=name, _r=real, **k: called.append(_n) or _r(*a, **k))
        for args in ((), (zx, zw)):
            gx, gw = AG._linear_backward(g, qx, qw, tabs, *args, need=need)
            assert (gx is not None, gw is not None) == need
            hx, hw = AG._conv_backward(cg, cx, cw, tabs, (1, 1), (1, 1), 1, *args, need=need)
            assert (hx is not None, hw is not None) == need
        if grad == "ste":
            sx, sw = AG._ste_conv_backward(cg, cx[:, :, 1:-1, 1:-1], cw, (1, 1), (1, 1), (1, 1), 1, zx, zw,
                                           need=need)
            assert (sx is not None, sw is not None) == need
        gathers = grad == "lut2d" and tabs.grad_kernel is Kernel.GATHER
        assert gathers == (table == "random" and grad == "lut2d")  # (both backward kinds covered)
        assert ("gather_grad_a" in called) == (need[0] and gathers)
        assert ("gather_grad_b" in called) == (need[1] and gathers)
        monkeypatch.undo()


@pytest.mark.parametrize("table, grad, kernel", [("exact", "ste", "lowrank"), ("random", "lut2d", "gather")])
def test_first_layer_weight_gradient_unchanged(table, grad, kernel):
    """A model's first layer (input without gradient) and a frozen layer (weight without
    gradient) get the gradients of the same layers with everything requiring gradients."""
    lut = LutFile(TABLES[table](), width_a=8, width_b=8, signed=False)
    cfg = ApproxConfig(lut, grad=grad, kernel=kernel, compute_missing_gradients=True)
    torch.manual_seed(0)
    conv = ApproxConv2d.from_float(torch.nn.Conv2d(2, 3, 3, padding=1), cfg)
    lin = ApproxLinear.from_float(torch.nn.Linear(3 * 5 * 5, 4), cfg)
    x = torch.relu(torch.randn(4, 2, 5, 5))

    def run(x_grad: bool, frozen: bool):
        for p in (*conv.parameters(), *lin.parameters()):
            p.grad = None
        lin.weight.requires_grad_(not frozen)
        xi = x.clone().requires_grad_(x_grad)
        lin(conv(xi).flatten(1)).square().sum().backward()
        return xi.grad, conv.weight.grad, lin.weight.grad

    xg, cwg, lwg = run(True, False)
    none, cwg2, lwg2 = run(False, False)
    assert none is None and torch.equal(cwg2, cwg) and torch.equal(lwg2, lwg)
    xg3, cwg3, none = run(True, True)
    assert none is None and torch.equal(xg3, xg) and torch.equal(cwg3, cwg)
