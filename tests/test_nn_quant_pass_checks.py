"""Non-finite inputs found by the quantizing pass itself (issue 12, rank-1 overhead).

The layers refused NaN and Inf by a reduction of their own over the input before
quantizing it; now the numba fake quantization reports them from the block it has just
read (``quant_loops.fake_quant``'s return value), the observer's min/max where it updates,
and :func:`appmult.nn.quant.check_finite` only where neither runs. References here:
``torch.isfinite`` on the same tensor, and the layers' observable state (observer range,
output) before and after a refused call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appmult.errors import InvalidValueError
from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn import quant as Q
from appmult.nn import quant_loops as L
from test_nn_luts import exact

needs_numba = pytest.mark.numba   # skipped without numba or under APPMULT_NO_NUMBA (conftest)

#: Bit patterns: every exponent but all-ones is finite; all-ones is Inf (mantissa 0) or NaN.
FINITE_BITS = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x3F800000, 0x7F000000, 0x7F7FFFFF,
               0xFF7FFFFF, 0xFEFFFFFF, 0x80800000]
NON_FINITE_BITS = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF]


def from_bits(pattern: int) -> float:
    return float(np.array([pattern], np.uint32).view(np.float32)[0])


@needs_numba
@pytest.mark.parametrize("rows, length", [(1, 40), (3, L.BLOCK + 5), (1, 2 * L.BLOCK), (5, 7)])
def test_pass_reports_each_non_finite_pattern_anywhere(rows, length):
    """One odd value at the first, last and a block-boundary position of some row: found;
    the extreme finite patterns alone: not found; the codes are still the formula's."""
    gen = torch.Generator().manual_seed(rows * 7 + length)
    base = torch.randn(rows, length, generator=gen)
    s, z = torch.full((rows, 1), 0.05), torch.full((rows, 1), 3.0)
    spots = {(0, 0), (rows - 1, length - 1), (rows // 2, min(L.BLOCK, length - 1)), (rows // 2, min(L.BLOCK - 1, length - 1))}
    for pattern in FINITE_BITS:
        x = base.clone()
        for r, i in spots:
            x[r, i] = from_bits(pattern)
        q, _, finite = Q._fused_fake_quant(x, s, z, 0, 255, mask=False)
        assert finite is True, hex(pattern)
    for pattern in NON_FINITE_BITS:
        for r, i in spots:
            x = base.clone()
            x[r, i] = from_bits(pattern)
            for mask in (False, True):
                q, _, finite = Q._fused_fake_quant(x, s, z, 0, 255, mask=mask)
                assert finite is False and finite is bool(torch.isfinite(x).all()), (hex(pattern), r, i, mask)
                want = torch.clamp(torch.round(x / s + z), 0, 255)
                assert torch.equal(q.view(torch.int32), want.view(torch.int32))


@needs_numba
def test_fused_entry_points_raise_naming_the_caller_and_step_aside_without_a_name():
    x = torch.rand(4, 30)
    x[2, 17] = float("inf")
    s, z = torch.tensor(0.01), torch.tensor(0.0)
    with pytest.raises(InvalidValueError, match=r"^Mine input contains NaN or Inf; approximate layers"):
        Q._fake_quant_nograd(x, s, z, 0, 255, "Mine")
    with pytest.raises(InvalidValueError, match=r"^Mine input contains NaN or Inf"):
        Q._fake_quant(x.requires_grad_(True), s, z, 0, 255, "Mine")
    # without a name nothing is checked: Inf clamps to the top code as before
    assert Q._fake_quant_nograd(x.detach(), s, z, 0, 255)[2, 17].item() == 255.0
    assert Q._fake_quant(x, s, z, 0, 255)[2, 17].item() == 255.0


@pytest.mark.parametrize("numba_on", [True, False])
def test_torch_path_checks_first(monkeypatch, numba_on):
    """float64 (no numba kernel) and numba switched off: ``check_finite`` before quantizing."""
    if not numba_on:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    for dt in (torch.float64, torch.float32):
        x = torch.rand(3, 9, dtype=dt)
        x[1, 4] = float("nan")
        s, z = torch.tensor(0.01, dtype=dt), torch.tensor(2.0, dtype=dt)
        with pytest.raises(InvalidValueError, match="^T input contains NaN or Inf"):
            Q._fake_quant_nograd(x, s, z, 0, 255, "T")
        with pytest.raises(InvalidValueError, match="^T input contains NaN or Inf"):
            Q._fake_quant(x.clone().requires_grad_(True), s, z, 0, 255, "T")
        x[1, 4] = 0.5
        torch.testing.assert_close(Q._fake_quant_nograd(x, s, z, 0, 255, "T"),
                                   torch.clamp(torch.round(x / s + z), 0, 255), rtol=0, atol=0)


def _layers():
    lut = LutFile(exact(8, False), width_a=8, width_b=8, signed=False)
    torch.manual_seed(0)
    conv = ApproxConv2d(3, 4, 3, padding=1, config=ApproxConfig(lut))
    lin = ApproxLinear(12, 5, config=ApproxConfig(lut))
    return [(conv, lambda: torch.rand(2, 3, 6, 6)), (lin, lambda: torch.rand(4, 12))]


@pytest.mark.parametrize("mode", ["eval", "frozen_train", "observing_train", "observing_eval"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("numba_on", [True, False])
def test_layers_refuse_non_finite_inputs_in_every_mode_and_change_nothing(monkeypatch, mode, bad, numba_on):
    if not numba_on:
        monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    for layer, make in _layers():
        layer.train()
        layer(make())  # initialize the observer
        layer.train(mode.endswith("train"))
        layer.act_quant.observing = mode.startswith("observing")
        good = make()
        x = good.clone()
        x.view(-1)[x.numel() // 2] = bad
        lo, hi = layer.act_quant.min_val.clone(), layer.act_quant.max_val.clone()
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                with pytest.raises(InvalidValueError, match=f"^{type(layer).__name__} input contains NaN or Inf"):
                    layer(x.clone().requires_grad_(grad))
            assert torch.equal(layer.act_quant.min_val, lo) and torch.equal(layer.act_quant.max_val, hi)
        with torch.no_grad():  # a finite input still runs
            y = layer(good)
        assert torch.isfinite(y).all()


def test_observe_refuses_before_changing_the_range():
    q = Q.ActivationQuantizer(8, False)
    q(torch.tensor([0.0, 1.0]))
    lo, hi = q.min_val.clone(), q.max_val.clone()
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidValueError, match="^Obs input contains NaN or Inf"):
            q.observe(torch.tensor([0.5, bad, 2.0]), "Obs")
        assert torch.equal(q.min_val, lo) and torch.equal(q.max_val, hi)
    q.observe(torch.tensor([0.5, 3e38, -3e38]), "Obs")  # finite extremes are a range, not an error
    assert q.max_val.item() > 1e37 and q.min_val.item() < -1e37
