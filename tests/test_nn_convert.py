"""Config validation, model conversion, exact mode, state_dict identity, error messages."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from appmult.lut_gen import LutFile, LutFileError
from appmult.nn import (ApproxConfig, ApproxConv2d, ApproxLinear, LutMismatchError, MissingGradientError,
                        approx_matmul, approximate_, calibrate, exact_, exact_multiplication)
from test_nn_luts import codes, exact, mitchell_like, truncated


@pytest.fixture
def lut():
    return LutFile(mitchell_like(6, False), width_a=6, width_b=6, signed=False, metadata={"spec": "mitchell6"})


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5))


def test_config_is_frozen_hashable_and_validated(lut, tmp_path):
    cfg = ApproxConfig(lut, grad="lut1d")
    assert hash(cfg) == hash(ApproxConfig(lut, grad="lut1d"))
    with pytest.raises(AttributeError):
        cfg.grad = "ste"
    path = lut.save(tmp_path / "m.npz")
    assert ApproxConfig(path).lut == str(path)


def test_config_wrong():
    with pytest.raises(ValueError, match=re.escape("ApproxConfig grad must be one of 'ste', 'lut2d', 'lut1d', not 'lut3d'")):
        ApproxConfig("x.npz", grad="lut3d")
    with pytest.raises(ValueError, match=re.escape("ApproxConfig kernel must be one of 'auto', 'lowrank', 'gather', not 'fast'")):
        ApproxConfig("x.npz", kernel="fast")
    with pytest.raises(TypeError, match=re.escape("ApproxConfig lut must be a LUT file path or a LutFile, not int")):
        ApproxConfig(3)
    with pytest.raises(ValueError, match=re.escape("ApproxConfig momentum must be a number in (0, 1], not 0")):
        ApproxConfig("x.npz", momentum=0)


def test_lut_width_mismatch_wrong(lut):
    with pytest.raises(LutFileError, match=re.escape(
            f"LUT {lut.lut_id} is 6x6 unsigned but the requested quantization needs 8x8 signed")):
        ApproxLinear(3, 2, config=ApproxConfig(lut, bits=8, signed=True))


def test_missing_gradients_wrong(lut):
    with pytest.raises(MissingGradientError, match=re.escape(
            f"LUT {lut.lut_id} has no 'lut2d' gradient tables (it has: none); produce them with "
            f"`appmult characterize ... --gradients lut2d` or pass ApproxConfig(compute_missing_gradients=True) "
            f"to compute them with appmult.lut_gen.gradients")):
        ApproxLinear(3, 2, config=ApproxConfig(lut, grad="lut2d"))


def test_missing_gradients_computed(lut):
    layer = ApproxLinear(3, 2, config=ApproxConfig(lut, grad="lut1d", compute_missing_gradients=True, half_window=2))
    assert layer.lut.gx1 is not None


def test_nan_input_wrong(lut):
    layer = ApproxConv2d(3, 2, 3, config=ApproxConfig(lut))
    x = torch.rand(1, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape(
            "ApproxConv2d input contains NaN or Inf; approximate layers quantize their inputs and cannot "
            "represent non-finite values")):
        layer(x)


def test_approximate_converts_and_keeps_weights(lut):
    model = small_model()
    ref = [p.detach().clone() for p in model.parameters()]
    approximate_(model, ApproxConfig(lut))
    assert isinstance(model[0], ApproxConv2d) and isinstance(model[3], ApproxLinear)
    assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    calibrate(model, [torch.rand(2, 3, 4, 4)])
    assert model(torch.rand(2, 3, 4, 4)).shape == (2, 5)
    r = repr(model[0])
    assert lut.lut_id in r and "mitchell6" in r and "kernel=" in r and "grad=ste" in r


def test_approximate_filter_and_dict(lut):
    model = approximate_(small_model(), ApproxConfig(lut), filter_fn=lambda m, name: isinstance(m, nn.Conv2d))
    assert isinstance(model[0], ApproxConv2d) and type(model[3]) is nn.Linear
    other = LutFile(truncated(8, 4), width_a=8, width_b=8, signed=False)
    model = approximate_(small_model(), {"0": ApproxConfig(lut), "3": ApproxConfig(other)})
    assert model[0].lut.sha256 == lut.sha256 and model[3].lut.sha256 == other.sha256
    with pytest.raises(KeyError, match="no nn.Linear/nn.Conv2d layer named 'fc'"):
        approximate_(small_model(), {"fc": ApproxConfig(lut)})


def test_exact_mode_and_context_manager(lut):
    model = approximate_(small_model(), ApproxConfig(lut)).eval()
    x = torch.rand(2, 3, 4, 4)
    calibrate(model, [x])
    y_approx = model(x)
    with exact_multiplication(model):
        assert model[0].exact_multiplication
        y_exact = model(x)
    assert not model[0].exact_multiplication
    assert not torch.allclose(y_approx, y_exact)
    exact_(model)
    torch.testing.assert_close(model(x), y_exact)
    exact_(model, False)
    torch.testing.assert_close(model(x), y_approx)


def test_state_dict_round_trip(lut, tmp_path):
    model = approximate_(small_model(), ApproxConfig(lut)).eval()
    x = torch.rand(2, 3, 4, 4)
    calibrate(model, [x])
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = approximate_(small_model(), ApproxConfig(lut)).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    torch.testing.assert_close(fresh(x), model(x))
    assert "0.lut.table" in model.state_dict() and "0.lut._extra_state" in model.state_dict()


def test_state_dict_wrong_lut(lut):
    model = approximate_(small_model(), ApproxConfig(lut))
    other = LutFile(exact(6, False), width_a=6, width_b=6, signed=False)
    fresh = approximate_(small_model(), ApproxConfig(other))
    before = fresh.state_dict()["0.lut.table"].clone()
    with pytest.raises(LutMismatchError, match=re.escape(
            f"Layer '0' uses LUT {other.lut_id} but the state_dict was saved with LUT {lut.lut_id}; "
            f"build the model with the LUT file it was trained with")):
        fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.state_dict()["0.lut.table"], before)


def test_buffers_follow_dtype_and_device(lut):
    layer = ApproxLinear(4, 2, config=ApproxConfig(lut, grad="ste")).double()
    names = {n for n, _ in layer.named_buffers()}
    assert {"lut.table", "lut.prod", "lut.gx1", "act_quant.min_val"} <= names
    y = layer(torch.rand(3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_approx_matmul_matches_brute_force(lut):
    torch.manual_seed(0)
    a = torch.rand(2, 3, 5)
    b = torch.rand(2, 5, 4)
    y = approx_matmul(a, b, lut, exact=True)
    assert y.shape == (2, 3, 4)
    # Reference: the same dynamic min-max quantization, then the LUT sum in numpy.
    sa, sb = a.max() / 63, b.max() / 63
    qa = torch.clamp(torch.round(a / sa), 0, 63).long().numpy()
    qb = torch.clamp(torch.round(b / sb), 0, 63).long().numpy()
    p = lut.product
    ref = np.einsum("bmkn->bmn", p[codes(qa, 6)[:, :, :, None], codes(qb, 6)[:, None, :, :]]) * float(sa * sb)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5)


def test_import_leaves_amaranth_out():
    code = "import sys, appmult.nn; assert 'amaranth' not in sys.modules, 'amaranth imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
