"""Control-variate correction: the error-model fit, its fixed-point form, and the layers' option."""

from __future__ import annotations

from fractions import Fraction
from math import floor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appmult.codes import codes_to_values, values_to_codes
from appmult.hdl import from_spec
from appmult.lut_gen import LutFile
from appmult.flows import characterize
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from appmult.nn.correction import channel_correction, fit_error_model, quantize_error_model
from appmult.reference import correct_accumulator

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = characterize(from_spec(spec), gradients=(), progress=False).to_lutfile()
    return _LUTS[spec]


# -- fit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rows", [[0], [0, 1], [0, 1, 2]])
def test_weight_perforation_is_linear_exactly(signed, rows):
    lut = lut_of(f"perforated:width=8,rows={rows},signed={str(signed).lower()}")
    alpha, beta = fit_error_model(lut)
    m = len(rows)
    assert np.array_equal(alpha, -(np.arange(256) % (1 << m)).astype(float))
    assert np.array_equal(beta, np.zeros(256))


def brute_force_fit(lut: LutFile, hist, operand: str):
    """Weighted least squares per weight code with numpy's lstsq."""
    prod = lut.product if operand == "a" else lut.product.T
    wx, ww = prod.shape[0].bit_length() - 1, prod.shape[1].bit_length() - 1
    x = codes_to_values(np.arange(1 << wx), wx, lut.signed).astype(float)
    w = codes_to_values(np.arange(1 << ww), ww, lut.signed).astype(float)
    sq = np.sqrt(np.ones(1 << wx) if hist is None else np.asarray(hist, float))
    design = np.stack([x, np.ones_like(x)], 1) * sq[:, None]
    alpha, beta = np.empty(1 << ww), np.empty(1 << ww)
    for j in range(1 << ww):
        e = prod[:, j] - x * w[j]
        (alpha[j], beta[j]), *_ = np.linalg.lstsq(design, e * sq, rcond=None)
    return alpha, beta


@pytest.mark.parametrize("spec", ["drum:width=5,k=3", "truncated:width=5,columns=4,signed=true",
                                  "mitchell:width=5", "broken_array:width=5,hbl=3,vbl=2,signed=true"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("operand", ["a", "b"])
def test_fit_matches_brute_force(spec, weighted, operand):
    lut = lut_of(spec)
    hist = np.random.default_rng(0).integers(0, 9, 32) if weighted else None
    alpha, beta = fit_error_model(lut, hist, activation_operand=operand)
    ra, rb = brute_force_fit(lut, hist, operand)
    np.testing.assert_allclose(alpha, ra, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(beta, rb, rtol=1e-9, atol=1e-7)


def test_fit_single_code_histogram_has_no_slope():
    lut = lut_of("drum:width=5,k=3")
    hist = np.zeros(32)
    hist[7] = 5
    alpha, beta = fit_error_model(lut, hist)
    assert np.array_equal(alpha, np.zeros(32))
    assert np.array_equal(beta, lut.product[7].astype(float) - 7 * np.arange(32))


def test_fit_wrong():
    lut = lut_of("drum:width=5,k=3")
    with pytest.raises(TypeError, match="^fit_error_model needs a LutFile, not ndarray$"):
        fit_error_model(lut.product)
    with pytest.raises(ValueError, match=r"^Activation histogram must have 32 entries \(one per code of operand a\), "
                                         r"not shape \(16,\)$"):
        fit_error_model(lut, np.ones(16))
    with pytest.raises(ValueError, match="^Activation histogram must hold finite non-negative counts"):
        fit_error_model(lut, -np.ones(32))
    with pytest.raises(ValueError, match="^Activation operand must be 'a' or 'b', not 'x'$"):
        fit_error_model(lut, activation_operand="x")
    with pytest.raises(TypeError, match="^Correction fractional bits must be an integer in 0..24, not 25$"):
        quantize_error_model(np.zeros(2), np.zeros(2), 25)


# -- fixed point -------------------------------------------------------------------------------

def test_fixed_point_rounding_by_hand():
    aq, bq = quantize_error_model([1.3, -1.3, 0.125, -0.125], [0.5, -0.5, 2.0, -2.0], 2)
    assert aq.tolist() == [5, -5, 1, 0]            # round half up: 0.5 -> 1, -0.5 -> 0
    assert bq.tolist() == [2, -2, 8, -8]
    # Channel of codes [0, 1, 2]: alpha sum 5 - 5 + 1 = 1 over K = 3 -> round(1/3) = 0;
    # beta sum 2 - 2 + 8 = 8 -> 8 / 4 = 2.
    fx, b = channel_correction(aq, bq, np.array([[0, 1, 2], [0, 0, 3]]), 2)
    # Codes [0, 0, 3]: alpha (5 + 5 + 0) / 3 = 3.33 -> 3; beta (2 + 2 - 8) / 4 = -1.
    assert fx.tolist() == [0, 3] and b.tolist() == [2, -1]
    # c = floor((alpha_fx * S + 2**(F-1)) / 2**F) + B: 3 * 5 / 4 = 3.75 -> 4; 3 * -5 / 4 = -3.75 -> -4;
    # 3 * -2 / 4 = -1.5 -> -1 (half up).
    assert correct_accumulator(np.array([0, 0, 0]), np.array([5, -5, -2]), 3, 1, 2).tolist() == [-5, 3, 0]


# -- layers ------------------------------------------------------------------------------------

def cv_config(lut: LutFile, frac: int = 8, hist=None, **kw) -> ApproxConfig:
    return ApproxConfig(lut, correction="control_variate", correction_frac_bits=frac, correction_hist=hist, **kw)


def residue_weights(shape, m: int, seed: int) -> torch.Tensor:
    """Unsigned weights whose per-channel codes are exactly the values, all = 2**m - 1 mod 2**m.

    Each channel holds 255 (its maximum, so scale 1 and zero point 0 with min >= 0).
    """
    rng = np.random.default_rng(seed)
    step = 1 << m
    q = rng.integers(0, 256 // step, shape) * step + step - 1
    q.reshape(shape[0], -1)[:, 0] = 255
    return torch.from_numpy(q.astype(np.float32))


@pytest.mark.parametrize("frac", [0, 8])
def test_weight_perforation_corrected_linear_is_exact(frac):
    lut = lut_of("perforated:width=8,rows=[0,1]")
    layer = ApproxLinear(20, 5, config=cv_config(lut, frac)).eval()
    with torch.no_grad():
        layer.weight.copy_(residue_weights((5, 20), 2, 0))
    x = torch.rand(7, 20) * 3 - 1
    layer(x)
    qx, _, _, qw, sw, zw = layer._int_quantize(x)
    assert float(sw.max()) == 1.0 and float(zw.abs().max()) == 0.0
    exact = (qx.double() @ qw.double().T).to(torch.int64)
    assert not torch.equal(layer.int_forward(x), exact)          # the multiplier errs
    assert torch.equal(layer.int_forward_corrected(x), exact)    # the correction removes it, bit for bit


def test_weight_perforation_corrected_conv_with_padding_is_exact():
    lut = lut_of("perforated:width=8,rows=[0,1,2]")
    layer = ApproxConv2d(3, 4, 3, padding=1, stride=2, config=cv_config(lut)).eval()
    with torch.no_grad():
        layer.weight.copy_(residue_weights((4, 3, 3, 3), 3, 1))
    x = torch.randn(2, 3, 7, 7)          # negative inputs: a non-zero activation zero point pads
    layer(x)
    qx, _, zx, qw, _, _ = layer._int_quantize(x)
    assert float(zx) > 0
    exact = F.conv2d(F.pad(qx.double(), (1, 1, 1, 1), value=float(zx)), qw.double(), stride=2).to(torch.int64)
    assert torch.equal(layer.int_forward_corrected(x), exact)


def brute_force_corrected(lut: LutFile, qx_fields: np.ndarray, qw: np.ndarray, frac: int, hist=None):
    """``acc - c`` per (field, channel) from first principles, with Python integers and Fractions.

    Args:
        qx_fields: activation values ``(N, K)`` (each row one receptive field).
        qw: weight values ``(C, K)``.
    """
    wa, wb = lut.width_a, lut.width_b
    alpha, beta = brute_force_fit(lut, hist, "a")
    aq = [floor(Fraction(float(v)) * (1 << frac) + Fraction(1, 2)) for v in alpha]
    bq = [floor(Fraction(float(v)) * (1 << frac) + Fraction(1, 2)) for v in beta]
    xc = values_to_codes(qx_fields, wa, lut.signed)
    wc = values_to_codes(qw, wb, lut.signed)
    k = qw.shape[1]
    out = np.empty((qx_fields.shape[0], qw.shape[0]), dtype=np.int64)
    for c in range(qw.shape[0]):
        afx = floor(Fraction(sum(aq[int(w)] for w in wc[c]), k) + Fraction(1, 2))
        b = floor(Fraction(sum(bq[int(w)] for w in wc[c]), 1 << frac) + Fraction(1, 2))
        for n in range(qx_fields.shape[0]):
            acc = sum(int(lut.product[xc[n, i], wc[c, i]]) for i in range(k))
            s = sum(int(v) for v in qx_fields[n])
            out[n, c] = acc - (floor(Fraction(afx * s, 1 << frac) + Fraction(1, 2)) + b)
    return out


@pytest.mark.parametrize("spec,frac", [("drum:width=6,k=3", 8), ("truncated:width=6,columns=5,signed=true", 3),
                                       ("mitchell:width=6", 0)])
def test_corrected_linear_matches_brute_force(spec, frac):
    lut = lut_of(spec)
    hist = np.random.default_rng(2).integers(1, 50, 64)
    torch.manual_seed(0)
    layer = ApproxLinear(12, 4, config=cv_config(lut, frac, hist)).eval()
    x = torch.randn(6, 12)
    layer(x)
    qx, _, _, qw, _, _ = layer._int_quantize(x)
    want = brute_force_corrected(lut, qx.numpy().astype(np.int64), qw.detach().numpy().astype(np.int64), frac, hist)
    assert layer.int_forward_corrected(x).tolist() == want.tolist()


def test_corrected_conv_matches_brute_force():
    lut = lut_of("drum:width=6,k=3")
    torch.manual_seed(0)
    layer = ApproxConv2d(4, 4, 3, padding=1, groups=2, dilation=1, stride=1, config=cv_config(lut, 6)).eval()
    x = torch.randn(1, 4, 4, 4)
    layer(x)
    qx, _, zx, qw, _, _ = layer._int_quantize(x)
    fields = F.unfold(F.pad(qx.double(), (1, 1, 1, 1), value=float(zx)), 3)   # (1, 4*9, 16)
    got = layer.int_forward_corrected(x)
    for g in range(2):
        cols = fields[0, g * 18:(g + 1) * 18].T.numpy().astype(np.int64)       # (16, 18)
        w = qw.detach()[g * 2:(g + 1) * 2].reshape(2, -1).numpy().astype(np.int64)
        want = brute_force_corrected(lut, cols, w, 6)
        assert got[0, g * 2:(g + 1) * 2].reshape(2, -1).T.tolist() == want.tolist()


def test_float_forward_applies_the_integer_correction():
    lut = lut_of("drum:width=6,k=3")
    torch.manual_seed(0)
    plain = ApproxLinear(10, 3, config=ApproxConfig(lut, exact_accumulate=True)).eval()
    corr = ApproxLinear(10, 3, config=cv_config(lut, exact_accumulate=True)).eval()
    corr.load_state_dict(plain.state_dict())
    x = torch.randn(5, 10)
    plain(x)
    corr(x)
    corr.act_quant.load_state_dict(plain.act_quant.state_dict())
    _, sx, _, _, sw, _ = corr._int_quantize(x)
    c = corr.int_forward(x) - corr.int_forward_corrected(x)
    torch.testing.assert_close(corr(x), plain(x) - sx * sw.reshape(1, -1) * c, rtol=1e-5, atol=1e-5)
    corr.exact_multiplication = True
    plain.exact_multiplication = True
    torch.testing.assert_close(corr(x), plain(x))      # exact products need no correction
    assert "correction=control_variate(F=8)" in repr(corr)


def test_correction_config_and_layer_wrong():
    lut = lut_of("drum:width=6,k=3")
    with pytest.raises(ValueError, match="^ApproxConfig correction must be 'none' or 'control_variate', not 'cv'$"):
        ApproxConfig(lut, correction="cv")
    with pytest.raises(TypeError, match="^Correction fractional bits must be an integer in 0..24, not -1$"):
        ApproxConfig(lut, correction="control_variate", correction_frac_bits=-1)
    with pytest.raises(ValueError, match="^ApproxConfig correction_hist must be a sequence of non-negative counts$"):
        ApproxConfig(lut, correction="control_variate", correction_hist=[1, -2])
    assert ApproxConfig(lut, correction=None).correction == "none"
    cfg = cv_config(lut, hist=np.ones(64))
    assert isinstance(cfg.correction_hist, tuple) and hash(cfg) == hash(cv_config(lut, hist=np.ones(64)))
    with pytest.raises(ValueError, match=r"^Activation histogram must have 64 entries \(one per code of operand a\)"):
        ApproxLinear(4, 2, config=cv_config(lut, hist=np.ones(256)))
    with pytest.raises(RuntimeError, match=r"^ApproxLinear.int_forward_corrected needs ApproxConfig\(correction="):
        ApproxLinear(4, 2, config=ApproxConfig(lut)).int_forward_corrected(torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match=r"^ApproxConv2d.int_forward_corrected needs ApproxConfig\(correction="):
        ApproxConv2d(1, 1, 1, config=ApproxConfig(lut)).int_forward_corrected(torch.zeros(1, 1, 2, 2))
