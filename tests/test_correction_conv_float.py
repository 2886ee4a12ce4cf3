"""Control-variate correction in ``ApproxConv2d``'s float output (not only its integer path).

The layer's integer form is ``int_forward_corrected = int_forward - c`` with ``c`` the
per-output correction (:mod:`appmult.nn.correction`). The dequantized output must apply
the same ``c`` with the same sign: ``forward(x) = plain forward(x) - sx * sw * c``, where
the plain layer has the same weights and quantizers and no correction.
"""

from __future__ import annotations

import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.flows import characterize
from appmult.nn import ApproxConfig, ApproxConv2d

_LUTS: dict[str, LutFile] = {}


def lut_of(spec: str) -> LutFile:
    if spec not in _LUTS:
        _LUTS[spec] = characterize(spec, gradients=(), progress=False, cost=False).to_lutfile()
    return _LUTS[spec]


def _pair(spec: str, exact_accumulate: bool, **geom):
    """A plain and a corrected conv with identical weights and activation ranges."""
    lut = lut_of(spec)
    torch.manual_seed(0)
    plain = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, exact_accumulate=exact_accumulate), **geom).eval()
    corr = ApproxConv2d(4, 6, 3, config=ApproxConfig(lut, exact_accumulate=exact_accumulate,
                                                     correction="control_variate", correction_frac_bits=6),
                        **geom).eval()
    corr.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 7, 7)  # negative inputs: a non-zero activation zero point (padding holds it)
    plain(x)                     # first batch initializes the (eval-mode) observers
    corr.act_quant.load_state_dict(plain.act_quant.state_dict())
    return plain, corr, x


@pytest.mark.parametrize("spec", ["drum:width=6,k=3", "perforated:width=6,rows=[0,1]",
                                  "truncated:width=6,columns=5,signed=true"])
@pytest.mark.parametrize("geom", [dict(padding=1), dict(padding=1, stride=2, groups=2)])
def test_corrected_conv_float_output_subtracts_the_integer_correction(spec, geom):
    plain, corr, x = _pair(spec, True, **geom)
    c = (corr.int_forward(x) - corr.int_forward_corrected(x)).to(torch.float64)
    assert c.abs().sum() > 0, "the test needs a non-zero correction"
    _, sx = corr.act_quant(x)[:2]
    _, sw, _ = corr.weight_quant(corr.weight)
    want = plain(x).double() - sx.double() * sw.double().reshape(1, -1, 1, 1) * c
    got = corr(x).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the correction is visible: the corrected output differs from the plain one
    assert not torch.allclose(got, plain(x).double(), rtol=1e-5, atol=1e-5)


def test_corrected_conv_float_output_default_accumulation():
    """The default (float32, training-path) accumulation applies the same correction."""
    plain, corr, x = _pair("drum:width=6,k=3", False, padding=1)
    c = (corr.int_forward(x) - corr.int_forward_corrected(x)).to(torch.float64)
    _, sx = corr.act_quant(x)[:2]
    _, sw, _ = corr.weight_quant(corr.weight)
    want = plain(x).double() - sx.double() * sw.double().reshape(1, -1, 1, 1) * c
    torch.testing.assert_close(corr(x).double(), want, rtol=1e-4, atol=1e-4)


def test_corrected_conv_with_exact_multiplication_is_plain():
    """Exact products need no correction: in exact-multiplication mode both layers agree."""
    plain, corr, x = _pair("drum:width=6,k=3", True, padding=1)
    plain.exact_multiplication = corr.exact_multiplication = True
    torch.testing.assert_close(corr(x), plain(x))
