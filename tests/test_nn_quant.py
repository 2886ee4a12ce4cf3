"""Quantizers, observers and calibration."""

from __future__ import annotations

import pytest
import torch

from appmult.nn import ActivationQuantizer, WeightQuantizer, calibrate, calibrating, quant_range


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(6, False) == (0, 63)


@pytest.mark.parametrize("width", [4, 6, 8])
def test_signed_symmetric_reaches_most_negative_code(width):
    q = ActivationQuantizer(width, True, "minmax")
    x = torch.tensor([-3.0, -1.0, 0.0, 1.5, 3.0])
    qx, s, z = q(x)
    assert z.item() == 0
    assert qx[0].item() == -(1 << (width - 1))
    assert qx[-1].item() == (1 << (width - 1)) - 1
    assert qx[2].item() == 0


def test_unsigned_asymmetric_zero_point():
    q = ActivationQuantizer(8, False, "minmax")
    x = torch.linspace(-1.0, 3.0, 101)
    qx, s, z = q(x)
    assert z.item() == round(1.0 / s.item()) and 0 < z.item() < 255
    assert qx.min().item() == 0 and qx.max().item() == 255
    assert q(torch.zeros(3))[0].eq(z).all()  # zero is exact
    assert ((qx - z) * s - x).abs().max() <= s / 2 + 1e-6


def test_clipped_ste():
    q = ActivationQuantizer(8, True, "minmax")
    q(torch.tensor([-1.0, 1.0]))
    q.observing = False
    x = torch.tensor([-2.0, -0.5, 0.3, 2.0], requires_grad=True)
    qx, s, _ = q(x)
    (g,) = torch.autograd.grad(qx.sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 1.0, 0.0]) / s)


def test_weight_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, -0.5], [4.0, 2.0], [0.0, 0.0]])
    qw, s, z = WeightQuantizer(8, True, "per_channel")(w)
    assert s.shape == (3, 1)
    assert qw[0, 0].item() == 127 and qw[1, 0].item() == 127 and (qw[2] == 0).all()
    qt, st, _ = WeightQuantizer(8, True, "per_tensor")(w)
    assert st.shape == () and qt[1, 0].item() == 127 and qt[0, 0].item() == 32


def test_observers():
    mm = ActivationQuantizer(8, False, "minmax").train()
    ma = ActivationQuantizer(8, False, "moving_average", momentum=0.5).train()
    for q in (mm, ma):
        q(torch.tensor([0.0, 1.0]))
        q(torch.tensor([0.0, 3.0]))
    assert mm.max_val.item() == 3.0
    assert ma.max_val.item() == 2.0  # 1 + 0.5 * (3 - 1)
    ma.eval()
    ma(torch.tensor([0.0, 100.0]))
    assert ma.max_val.item() == 2.0  # frozen in eval mode


def test_calibrate_and_context_manager():
    model = torch.nn.Sequential(ActivationQuantizer(8, False, "minmax"))
    loader = [(torch.full((2,), float(i)), 0) for i in range(1, 6)]
    calibrate(model, loader, num_batches=3)
    assert model[0].max_val.item() == 3.0 and model[0].observing is None
    assert model.training  # restored
    model.eval()
    with calibrating(model):
        model(torch.tensor([0.0, 7.0]))
    assert model[0].max_val.item() == 7.0
    model(torch.tensor([0.0, 9.0]))
    assert model[0].max_val.item() == 7.0
