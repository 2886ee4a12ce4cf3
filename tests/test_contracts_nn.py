"""Contracts of the quantizers, LUT tables and kernels, pinned where mutation testing
(``make mutate``, tests/README.md) found them unchecked.

References are independent: plain loops and numpy written from the definitions in
DESIGN.md and the module docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.nn import quant_range


@pytest.mark.parametrize("width", [2, 4, 8])
def test_quant_range_by_definition(width):
    assert quant_range(width, True) == (-(1 << (width - 1)), (1 << (width - 1)) - 1)
    assert quant_range(width, False) == (0, (1 << width) - 1)


# -- quantizers ----------------------------------------------------------------------------

from appmult.nn import ActivationQuantizer, WeightQuantizer, calibrating, frozen  # noqa: E402


def _unit_scale_quantizer() -> ActivationQuantizer:
    """4-bit unsigned, range [0, 15]: scale 1, zero point 0, so t = x exactly."""
    q = ActivationQuantizer(4, False, "minmax")
    q.observe(torch.tensor([0.0, 15.0]))
    q.eval()
    s, z = q.scale_zero_point()
    assert float(s) == 1.0 and float(z) == 0.0
    return q


def test_clipped_ste_boundaries():
    """dq/dx = 1/s where round() can still reach a code: -0.5 <= x/s + Z <= qmax + 0.5."""
    q = _unit_scale_quantizer()
    x = torch.tensor([-0.6, -0.5, -0.4999, 0.0, 7.3, 15.0, 15.4999, 15.5, 15.6], requires_grad=True)
    y, _, _ = q(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 7.0, 15.0, 15.0, 15.0, 15.0]


def test_quantizer_reprs():
    assert ActivationQuantizer(8, False, "minmax").extra_repr() == "8-bit unsigned asymmetric, minmax"
    assert ActivationQuantizer(6, True).extra_repr() == "6-bit signed symmetric, moving_average"
    assert WeightQuantizer(4, True, "per_tensor").extra_repr() == "4-bit signed symmetric, per_tensor"


def test_reset_forgets_the_range():
    q = _unit_scale_quantizer()
    q.reset()
    assert not bool(q.initialized) and float(q.min_val) == 0.0 and float(q.max_val) == 0.0
    q(torch.tensor([-3.0, 12.0]))            # eval mode: a fresh observer takes its first batch
    assert (float(q.min_val), float(q.max_val)) == (-3.0, 12.0)


def test_calibrating_resets_by_default_and_restores_the_setting():
    q = ActivationQuantizer(4, False, "minmax")
    model = torch.nn.Sequential(q)
    q.observe(torch.tensor([-10.0, 10.0]))
    q.observing = None
    with calibrating(model):
        assert q.observing is True
        model(torch.tensor([0.0, 1.0]))
    assert (float(q.min_val), float(q.max_val)) == (0.0, 1.0)     # the old range is forgotten
    assert q.observing is None
    with calibrating(model, reset=False):
        model(torch.tensor([2.0, 3.0]))
    assert (float(q.min_val), float(q.max_val)) == (0.0, 3.0)     # minmax over both batches


def test_frozen_observers_do_not_update_even_in_training():
    q = ActivationQuantizer(4, False, "minmax")
    model = torch.nn.Sequential(q).train()
    q.observe(torch.tensor([-1.0, 1.0]))
    with frozen(model):
        assert q.observing is False
        model(torch.tensor([-100.0, 100.0]))
    assert (float(q.min_val), float(q.max_val)) == (-1.0, 1.0)
    assert q.observing is None
    with pytest.raises(RuntimeError, match="^boom$"):
        with frozen(model):
            raise RuntimeError("boom")
    assert q.observing is None
    model(torch.tensor([-100.0, 100.0]))                          # training mode updates again
    assert (float(q.min_val), float(q.max_val)) == (-100.0, 100.0)


@pytest.mark.parametrize("manager, name", [(calibrating, "calibrating"), (frozen, "frozen")])
def test_observer_context_managers_need_a_module(manager, name):
    with pytest.raises(TypeError, match=f"^{name} needs a torch.nn.Module, not int$"):
        with manager(3):
            pass


def test_values_below_the_range_clamp_to_the_lowest_code_with_and_without_grad():
    q = _unit_scale_quantizer()
    x = torch.tensor([-3.0, -0.6, 20.0])
    with torch.no_grad():
        assert q(x)[0].tolist() == [0.0, 0.0, 15.0]
    assert q(x.clone().requires_grad_(True))[0].tolist() == [0.0, 0.0, 15.0]
    s = ActivationQuantizer(4, True, "minmax")
    s.observe(torch.tensor([-8.0, 8.0]))
    s.eval()
    with torch.no_grad():
        assert s(torch.tensor([-20.0, -8.0, 7.0, 20.0]))[0].tolist() == [-8.0, -8.0, 7.0, 7.0]


@pytest.mark.parametrize("width", [4, 8])
def test_signed_most_negative_code_is_reached(width):
    """s = max|x| / 2**(w-1): -max|x| maps to exactly -2**(w-1), +max|x| clamps one step low."""
    w = torch.tensor([[-1.0, 0.25, 1.0], [0.5, -0.125, 0.0]])
    q, s, z = WeightQuantizer(width, True, "per_channel")(w)
    half = 1 << (width - 1)
    assert s.reshape(-1).tolist() == [1.0 / half, 0.5 / half] and z.abs().sum() == 0
    assert q[0].tolist() == [-half, 0.25 * half, half - 1]
    assert q[1].tolist() == [half - 1, -0.125 * half / 0.5, 0.0]


def test_all_zero_tensor_quantizes_to_zero_with_finite_parameters():
    for signed in (False, True):
        q, s, z = WeightQuantizer(4, signed, "per_tensor")(torch.zeros(3, 2))
        assert float(s) == 1.0 and float(z) == 0.0 and q.abs().sum() == 0
    a = ActivationQuantizer(4, False, "minmax")
    q, s, z = a(torch.zeros(5))
    assert torch.isfinite(s) and float(z) == 0.0 and q.abs().sum() == 0


def test_moving_average_default_momentum():
    q = ActivationQuantizer(4, False)
    assert q.momentum == 0.1 and q.initialized.dtype == torch.bool
    q.observe(torch.tensor([0.0, 10.0]))
    q.observe(torch.tensor([-10.0, 20.0]))
    assert float(q.min_val) == pytest.approx(-1.0) and float(q.max_val) == pytest.approx(11.0)
