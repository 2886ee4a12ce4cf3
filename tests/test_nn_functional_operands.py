"""The functional API refuses scales and zero points that broadcasting would misread.

``approx_linear`` and ``approx_conv2d`` take the quantization parameters from the caller. A
weight zero point with two values for a one-output layer used to broadcast into a second,
meaningless output column (``(M, 2)`` for ``(M, 1)``); an activation zero point per element
would mix outputs silently. Both now raise :class:`InvalidValueError` naming the parameter.
The reference for the accepted shapes is the same call with the parameter given as one value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import approx_conv2d, approx_linear
from appmult.nn.tables import LutTables


@pytest.fixture(scope="module")
def tabs() -> LutTables:
    a = np.arange(256)
    return LutTables(LutFile(a[:, None] * a[None, :], width_a=8, width_b=8, signed=False), grad="ste",
                     kernel="lowrank")


def linear_operands(n: int):
    g = torch.Generator().manual_seed(n)
    qx = torch.randint(0, 256, (3, 5), generator=g).float()
    qw = torch.randint(0, 256, (n, 5), generator=g).float()
    return qx, qw


BAD = [("sx", torch.tensor([0.1, 0.2]), r"activation scale must hold one value, got 2 values"),
       ("zx", torch.tensor([1.0, 2.0]), r"activation zero point must hold one value, got 2 values"),
       ("sw", torch.tensor([0.1, 0.2]), r"weight scale must hold one value or one per output \(1\), got 2 values"),
       ("zw", torch.tensor([3.0, 4.0]), r"weight zero point must hold one value or one per output \(1\), got 2 values")]


@pytest.mark.parametrize("name,value,label", BAD)
def test_linear_refuses_parameters_of_the_wrong_size(tabs, name, value, label):
    qx, qw = linear_operands(1)          # one output: two weight values are one too many
    args = {"sx": torch.tensor(0.1), "zx": torch.tensor(0.0), "sw": torch.tensor(0.1), "zw": torch.tensor(3.0)}
    args[name] = value
    with pytest.raises(InvalidValueError, match=f"approx_linear: the {label}$"):
        approx_linear(qx, args["sx"], args["zx"], qw, args["sw"], args["zw"], None, tabs)
    with pytest.raises(InvalidValueError, match=f"approx_linear: the {label}$"):
        approx_linear(qx, args["sx"], args["zx"], qw, args["sw"], args["zw"], None, None)   # exact mode too


@pytest.mark.parametrize("name,value,label", BAD)
def test_conv_refuses_parameters_of_the_wrong_size(tabs, name, value, label):
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256, (1, 2, 4, 4), generator=g).float()
    qw = torch.randint(0, 256, (1, 2, 3, 3), generator=g).float()
    args = {"sx": torch.tensor(0.1), "zx": torch.tensor(0.0), "sw": torch.tensor(0.1), "zw": torch.tensor(3.0)}
    args[name] = value.reshape(-1, 1, 1, 1) if name in ("sw", "zw") else value
    with pytest.raises(InvalidValueError, match=f"approx_conv2d: the {label}$"):
        approx_conv2d(qx, args["sx"], args["zx"], qw, args["sw"], args["zw"], None, tabs)


def test_one_value_per_output_is_the_per_output_broadcast(tabs):
    """Per-output scales and zero points (``(N, 1)`` or ``(N,)``) are accepted, and equal
    the one-value call for every output whose values are the same."""
    qx, qw = linear_operands(3)
    one = approx_linear(qx, torch.tensor(0.1), torch.tensor(2.0), qw, torch.tensor(0.5), torch.tensor(7.0), None, tabs)
    per = approx_linear(qx, torch.tensor(0.1), torch.tensor(2.0), qw, torch.full((3, 1), 0.5),
                        torch.full((3,), 7.0), None, tabs)
    assert per.shape == one.shape == (3, 3)
    assert torch.equal(per, one)


@pytest.mark.parametrize("zx", [-10.0, 256.0, 2.5, float("nan")])
def test_conv_refuses_a_padding_zero_point_outside_the_codes(tabs, zx):
    """Padding inserts ``Zx`` as an activation code: outside the LUT's codes the fused
    rank-1 path computed a number where the plain path raised."""
    g = torch.Generator().manual_seed(1)
    qx = torch.randint(0, 256, (1, 2, 4, 4), generator=g).float()
    qw = torch.randint(0, 256, (3, 2, 3, 3), generator=g).float()
    with pytest.raises(InvalidValueError, match=r"approx_conv2d: padding inserts the activation zero point"):
        approx_conv2d(qx, torch.tensor(0.1), torch.tensor(zx), qw, torch.tensor(0.1), torch.tensor(3.0), None, tabs,
                      padding=1)


def test_conv_without_padding_takes_any_zero_point(tabs):
    """Without padding ``Zx`` is only a cross-term coefficient: an out-of-range one is
    computed, the same on the fused and the plain path."""
    from appmult.nn import functional as FN
    g = torch.Generator().manual_seed(2)
    qx = torch.randint(0, 256, (1, 2, 4, 4), generator=g).float()
    qw = torch.randint(0, 256, (3, 2, 3, 3), generator=g).float()
    args = (qx, torch.tensor(1.0), torch.tensor(-10.0), qw, torch.tensor(1.0), torch.tensor(3.0), None, tabs)
    fused = approx_conv2d(*args)
    prev = FN._FUSED_LOWRANK
    FN._FUSED_LOWRANK = False
    try:
        plain = approx_conv2d(*args)
    finally:
        FN._FUSED_LOWRANK = prev
    xs, ws = qx.double() + 10.0, qw.double() - 3.0
    assert torch.equal(fused, plain)
    assert torch.equal(fused.double(), torch.nn.functional.conv2d(xs, ws))


@pytest.mark.parametrize("width_a,width_b", [(4, 8), (8, 4)])
def test_padding_zero_point_range_is_the_activation_codes(width_a, width_b):
    """The last activation code is a valid padding zero point, one past it is not -- on a
    LUT whose activation and weight widths differ (the range is the activation side's)."""
    a = np.arange(1 << width_a)[:, None]
    b = np.arange(1 << width_b)[None, :]
    tabs = LutTables(LutFile(a * b, width_a=width_a, width_b=width_b, signed=False), grad="ste", kernel="lowrank")
    g = torch.Generator().manual_seed(3)
    top = (1 << width_a) - 1
    qx = torch.randint(0, top + 1, (1, 2, 4, 4), generator=g).float()
    qw = torch.randint(0, 1 << width_b, (3, 2, 3, 3), generator=g).float()
    one = torch.tensor(1.0)
    y = approx_conv2d(qx, one, torch.tensor(float(top)), qw, one, torch.tensor(1.0), None, tabs, padding=1)
    xs = torch.nn.functional.pad(qx.double(), (1, 1, 1, 1), value=float(top)) - top
    assert torch.equal(y.double(), torch.nn.functional.conv2d(xs, qw.double() - 1.0))
    with pytest.raises(InvalidValueError, match=rf"must be an integer in \[0, {top}\]"):
        approx_conv2d(qx, one, torch.tensor(float(top + 1)), qw, one, torch.tensor(1.0), None, tabs, padding=1)
