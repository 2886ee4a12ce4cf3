"""The activation quantizer's codes by one numba pass (``ActivationQuantizer.step_codes``,
``quant_loops.range_fake_quant``): its scale and zero point made in the same pass, checked
against the torch path (``numba`` switched off) bit for bit -- codes, mask, scale, zero
point and the observer's range -- for both observers, signed and unsigned, the first
batch, a frozen observer, several shapes; and the int8 GEMM's activation side against
its torch expressions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from appmult.errors import InvalidValueError
from appmult.nn import quant as Q

pytestmark = pytest.mark.numba


def bits(t):
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.uint8).clone()


def torch_codes(aq, x, what):
    """``codes`` by torch operations: the range updated as the observer does, its scale and
    zero point by the torch expressions, the codes and mask by torch."""
    update = aq.training if aq.observing is None else aq.observing
    if update or not aq.initialized.item():
        aq.observe(x, what)
    elif not torch.isfinite(x).all():
        raise Q._non_finite(what)
    s, z = Q._torch_scale_zero_point(aq.min_val, aq.max_val, aq.width, aq.signed)
    t = x / s + z
    inside = (t >= aq.qmin - 0.5) & (t <= aq.qmax + 0.5)
    return torch.clamp(torch.round(t), aq.qmin, aq.qmax), inside, s, z


def batches(shape, signed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(*shape, generator=gen) * (1 + i) + (0 if signed else 0.2) for i in range(3)]
    out[1] = torch.relu(out[1])
    out[1].view(-1)[:3] = -0.0
    return out


@pytest.mark.parametrize("observer", ["moving_average", "minmax"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 9, 9), (2, 20000), (1,)])
@pytest.mark.parametrize("frozen", [False, True])
def test_step_codes_are_the_torch_codes(observer, signed, shape, frozen):
    fused = Q.ActivationQuantizer(8, signed, observer, 0.1).train()
    if frozen:
        fused(torch.randn(*shape) * 2)
        fused.observing = False
    ref = copy.deepcopy(fused)
    for x in batches(shape, signed):
        got = fused.step_codes(x, "L")
        want = torch_codes(ref, x, "L")
        assert got is not None
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(bits(g), bits(w))
        assert torch.equal(bits(fused.min_val), bits(ref.min_val)) and torch.equal(bits(fused.max_val), bits(ref.max_val))
        assert torch.equal(fused.initialized, ref.initialized)


@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("centered", [False, True])
def test_the_int8_side_and_centred_codes(table, centered):
    aq = Q.ActivationQuantizer(8, False).train()
    x = torch.rand(40, 30) * 3
    ref = copy.deepcopy(aq)
    q, inside, s, z = torch_codes(ref, x, "L")
    lut = (np.arange(256) // 3 - 100).astype(np.int8)
    a = np.empty((40, 30), np.int8)
    got = aq.step_codes(x, "L", (a, 128, lut if table else Q._NO_TABLE, 0, centered))
    want_a = lut[q.numpy().astype(np.int64)] if table else (q.numpy() - 128).astype(np.int8)
    assert np.array_equal(a, want_a)
    assert torch.equal(bits(got[0]), bits(q - z if centered else q)) and torch.equal(got[1], inside)
    assert torch.equal(bits(got[2]), bits(s)) and torch.equal(bits(got[3]), bits(z))


@pytest.mark.parametrize("everywhere", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_a_frozen_observer_refuses_non_finite_input_and_an_updating_one_keeps_its_range(fused, everywhere):
    """One Inf, or nothing but NaN (the finiteness word exactly ``2**31``), by the numba pass
    (``fused``) or by ``codes``' torch path (an input that is not contiguous)."""
    for observing in (False, None):
        aq = Q.ActivationQuantizer(8, False).train()
        aq(torch.rand(4, 4))
        aq.observing = observing
        before = (aq.min_val.clone(), aq.max_val.clone())
        x = torch.full((4, 4), float("nan")) if everywhere else torch.rand(4, 4)
        x[1, 1] = float("inf")
        with pytest.raises(InvalidValueError, match="L input contains NaN or Inf"):
            aq.step_codes(x, "L") if fused else aq.codes(x.t(), "L")
        assert torch.equal(before[0], aq.min_val) and torch.equal(before[1], aq.max_val)


def test_codes_takes_the_numba_pass(monkeypatch):
    ran = []
    real = Q.loops.range_fake_quant
    monkeypatch.setattr(Q.loops, "range_fake_quant", lambda *a: ran.append(1) or real(*a))
    aq = Q.ActivationQuantizer(8, False).train()
    aq.codes(torch.rand(3, 5), "L")
    assert ran == [1]


@pytest.mark.parametrize("buffer", ["min_val", "max_val"])
@pytest.mark.parametrize("how", ["float64", "meta"])
def test_it_steps_aside_for_a_range_that_is_not_float32_on_the_cpu(buffer, how):
    aq = Q.ActivationQuantizer(8, False).train()
    setattr(aq, buffer, torch.zeros((), dtype=torch.float64) if how == "float64" else torch.zeros((), device="meta"))
    assert aq.step_codes(torch.rand(4, 6), "L") is None
    assert not aq.initialized  # (nothing changed)


def test_it_steps_aside_where_it_does_not_apply(monkeypatch):
    aq = Q.ActivationQuantizer(8, False).train()
    assert aq.step_codes(torch.rand(4, 6).t(), "L") is None                 # not contiguous
    assert aq.step_codes(torch.rand(4, 6, dtype=torch.float64), "L") is None
    assert not aq.initialized  # (nothing changed)
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    assert aq.step_codes(torch.rand(4, 6), "L") is None
    q, inside, s, z = aq.codes(torch.rand(4, 6), "L")                        # the torch path
    assert aq.initialized and q.shape == (4, 6)
