"""The Triton gather programs (:mod:`appmult.nn.triton_gather`) against the torch fallback
and a numpy brute force.

Triton is not a dependency: without it these tests skip. With a CUDA device they run the
compiled programs there; without one, Triton's interpreter (``TRITON_INTERPRET=1``, set
here before the programs are first built) runs them on CPU tensors, slowly, so shapes
stay small. Run on a GPU machine: ``python -m pytest tests/test_nn_triton_gather.py``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from appmult.nn import kernels as K
from appmult.nn import triton_gather as TG

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (not a dependency; on the GPU image)")
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _programs():
    if not CUDA and HAS_TRITON:
        os.environ["TRITON_INTERPRET"] = "1"
        TG._programs.cache_clear()
    yield
    if not CUDA and HAS_TRITON:
        TG._programs.cache_clear()
        os.environ.pop("TRITON_INTERPRET", None)


def _operands(n, groups, kg, length, ng, na, nb, dtype, seed=0, span=60000):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, na, (n, groups * kg, length), generator=g)
    b = torch.randint(0, nb, (groups * ng, kg), generator=g)
    if dtype.is_floating_point:
        t = torch.randn((na, nb), generator=g, dtype=dtype)
    else:
        t = torch.randint(-span // 2, span - span // 2, (na, nb), generator=g, dtype=dtype)
    return a, b, t


def _brute(a, b, t, groups, grad=None, what="fwd"):
    """float64 / int64 numpy loops over the definition in the module docstring."""
    a, b, t = a.numpy(), b.numpy(), t.numpy()
    n, ktot, length = a.shape
    nout, kg = b.shape
    ng = nout // groups
    acc = np.float64 if grad is not None else np.int64
    out = np.zeros({"fwd": (n, nout, length), "ga": (n, ktot, length), "gb": (nout, kg)}[what], acc)
    gr = None if grad is None else grad.numpy().astype(np.float64)
    for j in range(nout):
        gi = j // ng
        for k in range(kg):
            vals = t[a[:, gi * kg + k, :], b[j, k]].astype(acc)  # (n, L)
            if what == "fwd":
                out[:, j, :] += vals
            elif what == "ga":
                out[:, gi * kg + k, :] += vals * gr[:, j, :]
            else:
                out[j, k] += (vals * gr[:, j, :]).sum()
    return out


SHAPES = [  # (n, groups, kg, L, ng, na, nb)
    (2, 1, 7, 19, 5, 256, 256),     # uint8 indices, L and channels off the tile sizes
    (1, 1, 3, 130, 33, 16, 16),     # several tiles along L and along the outputs
    (3, 2, 5, 4, 3, 40, 300),       # groups; int32 weight indices (more than 256 columns)
    (2, 3, 1, 17, 2, 300, 64),      # one reduction step; int32 activation indices
    (1, 1, 40, 9, 3, 16, 16),       # several tiles along the reduction (activation gradient)
]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("span", [60000, 1 << 16, 1 << 24])  # int16 offsets below 2**16; the table itself above
@pytest.mark.parametrize("table16", [False, True])
def test_forward_equals_brute_force_and_torch_fallback(monkeypatch, shape, dtype, span, table16):
    monkeypatch.setattr(TG, "TABLE16", table16)
    n, groups, kg, length, ng, na, nb = shape
    a, b, t = _operands(n, groups, kg, length, ng, na, nb, dtype, span=span)
    out = TG.forward(a.to(DEV), b.to(DEV), t.to(DEV), groups).cpu()
    assert out.dtype == dtype
    assert np.array_equal(out.numpy(), _brute(a, b, t, groups))
    assert torch.equal(out, K._torch_gather(a, b, t, groups, None, "fwd"))


@needs_triton
@pytest.mark.parametrize("table16", [True, False])
@pytest.mark.parametrize("entry", [2**30 + 7, -2**31])
def test_forward_int32_wraps_like_the_cpu_kernels(monkeypatch, table16, entry):
    """Sums past 2**31 wrap modulo 2**32 in int32 (the callers take int64 where the true sum
    could leave int32; the wrap must still be the same as everywhere else), with the int16
    offsets (whose offset is itself wrapped) and without."""
    monkeypatch.setattr(TG, "TABLE16", table16)
    a = torch.zeros((1, 3, 2), dtype=torch.long)
    b = torch.zeros((1, 3), dtype=torch.long)
    t = torch.full((1, 1), entry, dtype=torch.int32)
    out = TG.forward(a.to(DEV), b.to(DEV), t.to(DEV), 1).cpu()
    want = np.array([3 * entry], np.int64).astype(np.int32)[0]
    assert out.tolist() == [[[int(want)] * 2]]
    assert torch.equal(out, K._torch_gather(a, b, t, 1, None, "fwd"))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_forward_int16_offsets_change_no_bit(monkeypatch, dtype):
    a, b, t = _operands(2, 1, 50, 33, 5, 256, 256, dtype, seed=5, span=(1 << 16) - 1)
    t[0, 0], t[1, 1] = -40000, -40000 + (1 << 16) - 1  # the widest span the offsets take
    outs = []
    for on in (True, False):
        monkeypatch.setattr(TG, "TABLE16", on)
        outs.append(TG.forward(a.to(DEV), b.to(DEV), t.to(DEV), 1).cpu())
    assert torch.equal(outs[0], outs[1])
    assert np.array_equal(outs[0].numpy(), _brute(a, b, t, 1))


def test_table16_is_taken_only_below_a_span_of_2_16(monkeypatch):
    monkeypatch.setattr(TG, "TABLE16", True)
    t = torch.tensor([[5, 5 + (1 << 16) - 1]], dtype=torch.int32)
    tab, off = TG._table16(t, 3)
    assert tab.dtype == torch.int16 and off == 3 * (5 + (1 << 15))
    assert (tab.long() + 5 + (1 << 15)).tolist() == t.tolist()
    t[0, 1] += 1
    tab, off = TG._table16(t, 3)
    assert tab.dtype == torch.int32 and off == 0
    monkeypatch.setattr(TG, "TABLE16", False)
    assert TG._table16(t[:, :1], 3)[0].dtype == torch.int32


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("what", ["ga", "gb"])
def test_gradients_equal_brute_force(shape, what):
    n, groups, kg, length, ng, na, nb = shape
    a, b, t = _operands(n, groups, kg, length, ng, na, nb, torch.float32, seed=1)
    grad = torch.randn((n, groups * ng, length), generator=torch.Generator().manual_seed(2))
    fn, like = (TG.grad_a, a) if what == "ga" else (TG.grad_b, b)
    out = fn(a.to(DEV), b.to(DEV), t.to(DEV), grad.to(DEV), groups).cpu()
    assert out.shape == like.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _brute(a, b, t, groups, grad, what), rtol=1e-5, atol=1e-4)


def test_empty_operands():
    a, b, t = _operands(2, 1, 4, 5, 3, 8, 8, torch.int32)
    assert TG.forward(a[:, :0].to(DEV), b[:, :0].to(DEV), t.to(DEV), 1).cpu().eq(0).all()
    assert TG.forward(a[:0].to(DEV), b.to(DEV), t.to(DEV), 1).shape == (0, 3, 5)
    g = torch.ones((0, 3, 5))
    assert TG.grad_b(a[:0].to(DEV), b.to(DEV), t.float().to(DEV), g.to(DEV), 1).cpu().eq(0).all()


def test_mismatched_shapes_are_refused():
    a, b, t = _operands(1, 1, 4, 5, 3, 8, 8, torch.int32)
    with pytest.raises(ValueError, match="gather shapes do not match"):
        TG.forward(a.to(DEV), b[:, :3].to(DEV), t.to(DEV), 1)
    with pytest.raises(ValueError, match="gather shapes do not match"):
        TG.forward(a.to(DEV), b.to(DEV), t.to(DEV), 2)


def test_usable_only_for_cuda_tensors_and_with_the_switches_on(monkeypatch):
    x = torch.zeros(2, dtype=torch.long)
    assert not TG.usable(x)
    if not CUDA:
        return
    xc = x.cuda()
    assert TG.usable(xc) and not TG.usable(xc, x)
    monkeypatch.setenv("APPMULT_NO_TRITON", "1")
    assert not TG.usable(xc)
    monkeypatch.delenv("APPMULT_NO_TRITON")
    monkeypatch.setattr(TG, "ENABLED", False)
    assert not TG.usable(xc)


@pytest.mark.skipif(not CUDA, reason="the dispatch takes Triton on CUDA tensors only")
def test_kernels_dispatch_cuda_gathers_to_triton(monkeypatch):
    a, b, t = _operands(2, 1, 6, 9, 4, 256, 256, torch.int32)
    calls = []
    for name in ("forward", "grad_a", "grad_b"):
        fn = getattr(TG, name)
        monkeypatch.setattr(TG, name, lambda *args, fn=fn, name=name: calls.append(name) or fn(*args))
    grad = torch.randn((2, 4, 9))
    tf = t.float()
    out = K.gather_forward(a.cuda(), b.cuda(), t.cuda(), 1, torch.int32).cpu()
    assert torch.equal(out, K.gather_forward(a, b, t, 1, torch.int32))
    ga = K.gather_grad_a(a.cuda(), b.cuda(), tf.cuda(), grad.cuda(), 1).cpu()
    torch.testing.assert_close(ga, K.gather_grad_a(a, b, tf, grad, 1), rtol=1e-5, atol=1e-5)
    gb = K.gather_grad_b(a.cuda(), b.cuda(), tf.cuda(), grad.cuda(), 1).cpu()
    torch.testing.assert_close(gb, K.gather_grad_b(a, b, tf, grad, 1), rtol=1e-5, atol=1e-4)
    assert calls == ["forward", "grad_a", "grad_b"]


def test_a_failed_first_launch_warns_and_hands_over_to_torch(monkeypatch):
    """No compiler or an unsupported GPU: the first launch fails, one warning, ``None`` (the
    caller's torch path), and :func:`usable` says no from then on; after a program has
    launched once, a failure is an error."""
    a, b, t = _operands(1, 1, 4, 5, 3, 8, 8, torch.int32)

    class Broken:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise RuntimeError("no C compiler")
            return run
    monkeypatch.setattr(TG, "_programs", lambda fixed: (Broken(), Broken(), Broken()))
    monkeypatch.setattr(TG, "_failed", [])
    monkeypatch.setattr(TG, "_launched", set())
    with pytest.warns(RuntimeWarning, match="'fwd' failed its first launch.*no C compiler.*torch"):
        assert TG.forward(a, b, t, 1) is None
    assert TG._failed and not TG.usable(torch.zeros(1))
    TG._launched.add("ga")
    with pytest.raises(RuntimeError, match="no C compiler"):
        TG.grad_a(a, b, t.float(), torch.ones((1, 3, 5)), 1)


@pytest.mark.skipif(not CUDA, reason="the autotuner runs on CUDA only")
def test_fixed_tiles_and_autotuned_tiles_agree(monkeypatch):
    a, b, t = _operands(3, 2, 37, 70, 20, 256, 256, torch.int32, seed=7)
    gt = torch.randn(t.shape, generator=torch.Generator().manual_seed(9))  # a gradient table of O(1) entries
    grad = torch.randn((3, 40, 70), generator=torch.Generator().manual_seed(8))
    results = []
    for env in ("0", "1"):
        monkeypatch.setenv("APPMULT_TRITON_AUTOTUNE", env)
        assert TG._fixed_tiles() == (env == "0")
        ac, bc, tc, gc, gtc = a.cuda(), b.cuda(), t.cuda(), grad.cuda(), gt.cuda()
        results.append((TG.forward(ac, bc, tc, 2).cpu(), TG.grad_a(ac, bc, gtc, gc, 2).cpu(),
                        TG.grad_b(ac, bc, gtc, gc, 2).cpu()))
    assert torch.equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][0].numpy(), _brute(a, b, t, 2))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(results[1][2].numpy(), _brute(a, b, gt, 2, grad, "gb"), rtol=1e-4, atol=1e-4)


def test_fixed_tiles_under_the_interpreter_or_when_asked(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("APPMULT_TRITON_AUTOTUNE", raising=False)
    assert not TG._fixed_tiles()
    monkeypatch.setenv("APPMULT_TRITON_AUTOTUNE", "0")
    assert TG._fixed_tiles()
    monkeypatch.setenv("APPMULT_TRITON_AUTOTUNE", "1")
    assert not TG._fixed_tiles()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TG._fixed_tiles()
