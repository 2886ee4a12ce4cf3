"""Mutation review of the re-run after the review fixes (session 12): the eval plan's
rank-1 prep per activation zero point, a zero point of exactly 1, and a mapped LUT whose prep
refuses the layer. References: the numpy brute force and the general path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import eval_plan
from test_nn_eval_plan import brute, bits, general, make, planned, weight_side
from test_nn_rank1_mapped_conv import drum


@pytest.mark.numba
def test_rank1_plan_follows_a_new_zero_point_for_a_weight_side_lut():
    """``x * V[w]`` with ``V != value``: the shifted conv's bias ``Zx sum (V[w] - w)``
    depends on ``Zx`` (for the exact product it is 0 whatever ``Zx``), so the plan's prep
    must be the one for the current zero point."""
    table = weight_side()
    layer, x = make(table, shift=-0.3)
    y0, ran0 = planned(layer, x)
    zx0 = float(layer.act_quant._kept_scale_zero_point()[1])
    layer.act_quant.min_val.data.mul_(3.0)   # a new range and zero point
    y1, ran1 = planned(layer, x)
    assert ran0 and ran1 and float(layer.act_quant._kept_scale_zero_point()[1]) != zx0
    assert torch.equal(bits(y1), bits(brute(layer, x, table, False, 0)))


@pytest.mark.numba
def test_rank1_plan_with_a_zero_point_of_exactly_one():
    """``Zx = 1``: the plan's input is ``q - 1`` (the look-up table), not the codes themselves."""
    table = weight_side()
    layer, x = make(table)
    x = torch.rand(2, 4, 9, 9) * 2.54
    x[0, 0, 0, 0], x[1, 3, 8, 8] = -0.01, 2.54          # scale 0.01, Zx = round(0.01 / 0.01) = 1
    layer.act_quant.reset()
    layer.act_quant.observing = True
    with torch.no_grad():
        layer(x)
    layer.act_quant.observing = False
    assert float(layer.act_quant._kept_scale_zero_point()[1]) == 1.0
    y, ran = planned(layer, x)
    assert ran and torch.equal(bits(y), bits(brute(layer, x, table, False, 0)))


def test_mapped_plan_steps_aside_where_the_mapped_prep_refuses():
    """A DRUM conv too long for the mapped path's float32 bound (300 input channels, 3x3):
    no plan, the general path's result (its unfused float32 sum, as documented)."""
    layer, x = make(drum(), cin=300, cout=2, k=3, batch=1, shift=-0.2)
    y, ran = planned(layer, x)
    assert not ran
    assert torch.equal(bits(y), bits(general(layer, x)))
