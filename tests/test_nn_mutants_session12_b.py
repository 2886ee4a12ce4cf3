"""Mutation review of ``appmult.nn.eval_plan`` (session 12, part b): the plan's geometry for
unequal strides and dilations, its weight-side entries per LUT, its keeping and rebuilding
(bias added or removed, a plan kept rather than re-derived), a frozen layer in grad mode,
and inputs holding nothing but NaN or Inf.

References as in ``test_nn_eval_plan.py``: the general path (``eval_plan.ENABLED = False``)
bit for bit, the numpy brute force of the LUT sum, the general path's own error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from appmult.errors import InvalidValueError
from appmult.nn import eval_plan
from appmult.nn import quant_loops as L
from test_nn_eval_plan import _spied, bits, brute, general, make, make_linear, or_one, planned
from test_nn_int8_gemm import truncated as gemm_table
from test_nn_luts import exact

pytestmark = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)


def _plan(layer):
    """The plan kept in the layer's weight cache (``None``: none)."""
    return layer.__dict__["_wcache"]["tables"][eval_plan._ENTRY][1]


def test_mapped_plan_with_unequal_strides_and_dilations():
    """The cross term's window sums of the mapped rank-1 plan take the vertical stride and
    dilation from the first elements, the horizontal ones from the second."""
    layer, x = make(or_one(), stride=(2, 1), dilation=(1, 2), padding=(1, 2), shift=-0.3)
    y, ran = planned(layer, x)
    assert ran and _plan(layer).nzw is not None   # the - Zw_j S term is added
    assert y.shape == (3, 6, 5, 9)
    assert torch.equal(bits(y), bits(general(layer, x)))


def test_mapped_plan_follows_a_swapped_mapped_lut():
    """The mapped rank-1 weight side is derived per LUT tables: another DRUM-like LUT
    swapped in (the same weight, the same weight cache) gets its own ``U`` and ``V[w]``."""
    layer, x = make(or_one(), shift=-0.3)
    planned(layer, x)
    v = np.arange(256)
    table = np.outer(v | 3, v)
    other, _ = make(table, shift=-0.3)
    layer.lut = other.lut
    assert not layer.lut.u_is_value
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(brute(layer, x, table, False, 0)))
    assert torch.equal(bits(y), bits(general(layer, x)))


def test_mapped_plan_follows_a_new_activation_zero_point():
    """The mapped rank-1 weight side is derived per activation zero point: a range written
    through ``.data`` that moves ``Zx`` gets its own ``U - U[Zx]`` and constants."""
    layer, x = make(or_one(), shift=-0.3)
    planned(layer, x)
    zx0 = float(layer.act_quant._kept_scale_zero_point()[1])
    layer.act_quant.max_val.data.mul_(1.5)   # no version bump
    assert float(layer.act_quant._kept_scale_zero_point()[1]) != zx0
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(brute(layer, x, or_one(), False, 0)))
    assert torch.equal(bits(y), bits(general(layer, x)))


@pytest.mark.parametrize("bias", [True, False])
def test_frozen_layer_in_grad_mode_runs_the_plan(bias):
    """Grad mode on, but nothing wants a gradient (weights, bias and input frozen): the plan
    runs, with or without a bias, and the output carries no graph."""
    layer, x = make(exact(8, False), shift=-0.2, bias=bias)
    layer.requires_grad_(False)
    ran = []
    with _spied(ran):
        y = layer(x)
    assert ran and not y.requires_grad
    assert torch.equal(bits(y), bits(general(layer, x)))


def _counted(monkeypatch):
    calls = []
    real = eval_plan._conv_plan
    monkeypatch.setattr(eval_plan, "_conv_plan", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_plan_is_made_once_and_kept(monkeypatch, bias):
    """The plan is derived on the first forward and kept for the next ones (same weight,
    range, tables and bias), with or without a bias."""
    layer, x = make(exact(8, False), shift=-0.2, bias=bias)
    calls = _counted(monkeypatch)
    y1, ran1 = planned(layer, x)
    y2, ran2 = planned(layer, x)
    y3, ran3 = planned(layer, x)
    assert ran1 and ran2 and ran3 and len(calls) == 1
    assert torch.equal(bits(y1), bits(y3)) and torch.equal(bits(y2), bits(y3))


def test_no_plan_is_kept_too(monkeypatch):
    """Where no plan applies (a float64 activation range), that answer is kept as well: not
    re-derived on every forward."""
    layer, x = make(exact(8, False), shift=-0.2)
    layer.act_quant.double()
    calls = _counted(monkeypatch)
    for _ in range(3):
        _, ran = planned(layer, x)
        assert not ran
    assert len(calls) == 1


def test_bias_added_after_planning():
    """A bias given to a layer planned without one is added (the plan is rebuilt)."""
    layer, x = make(exact(8, False), shift=-0.2, bias=False)
    planned(layer, x)
    layer.bias = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(brute(layer, x, exact(8, False), False, 0)))
    assert torch.equal(bits(y), bits(general(layer, x)))


def test_one_channel_bias_removed_after_planning():
    """The bias of a one-output-channel layer removed after planning is no longer added."""
    layer, x = make(exact(8, False), shift=-0.2, cout=1)
    y0, _ = planned(layer, x)
    layer.bias = None
    y, ran = planned(layer, x)
    assert ran and not torch.equal(y, y0)
    assert torch.equal(bits(y), bits(brute(layer, x, exact(8, False), False, 0)))
    assert torch.equal(bits(y), bits(general(layer, x)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_input_of_nothing_but_nan_or_inf_is_refused(kind, bad):
    """An input whose every element is NaN (or Inf) is refused by the plan's quantizing pass
    as by the general path (the finiteness word then equals its threshold exactly)."""
    layer, x = make(exact(8, False)) if kind == "conv" else make_linear(gemm_table(0))
    planned(layer, x)
    xb = torch.full_like(x, bad)
    name = type(layer).__name__
    with pytest.raises(InvalidValueError, match=f"{name} input contains NaN or Inf") as plan_err:
        planned(layer, xb)
    with pytest.raises(InvalidValueError) as general_err:
        general(layer, xb)
    assert str(plan_err.value) == str(general_err.value)
