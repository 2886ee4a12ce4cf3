"""Two pieces of the LUT-2D conv backward (issue 12, LUT-2D training speed).

* ``kernels.fold``: the gradient columns summed back into the image by a numba loop, torch's
  ``col2im`` order -- so ``F.fold``'s bits -- on several threads;
* ``autograd._zero_point_input_term``: the input gradient of the ``- qx Zw`` cross term by a
  one-channel-per-group transposed convolution, against ``conv2d_input`` of the full
  constant weight (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from appmult.nn import autograd as AG
from appmult.nn import kernels as K

FOLDS = [  # (n, c, (hp, wp), (kh, kw), stride, dilation)
    (2, 3, (9, 9), (3, 3), (1, 1), (1, 1)), (3, 2, (10, 7), (2, 3), (2, 1), (1, 1)),
    (1, 4, (11, 12), (3, 2), (1, 2), (2, 1)), (2, 1, (5, 5), (5, 5), (1, 1), (1, 1)),
    (1, 2, (8, 9), (1, 1), (3, 2), (1, 1)), (2, 2, (12, 12), (3, 3), (2, 2), (2, 2)),
]


@pytest.mark.parametrize("n, c, size, kernel, stride, dilation", FOLDS)
def test_fold_is_torch_fold_bit_for_bit(n, c, size, kernel, stride, dilation):
    (hp, wp), (kh, kw), (sh, sw), (dh, dw) = size, kernel, stride, dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    cols = torch.randn(n, c * kh * kw, ho * wo, generator=torch.Generator().manual_seed(hp * wp))
    want = F.fold(cols, size, kernel, dilation=dilation, padding=0, stride=stride)
    got = K.fold(cols, size, kernel, stride, dilation)
    assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_fold_falls_back_to_torch(monkeypatch):
    cols = torch.randn(2, 2 * 9, 49, dtype=torch.float64)
    want = F.fold(cols, (9, 9), (3, 3))
    assert torch.equal(K.fold(cols, (9, 9), (3, 3), (1, 1), (1, 1)), want)  # float64: torch
    monkeypatch.setenv("APPMULT_NO_NUMBA", "1")
    c32 = cols.float()
    assert torch.equal(K.fold(c32, (9, 9), (3, 3), (1, 1), (1, 1)), F.fold(c32, (9, 9), (3, 3)))
    monkeypatch.delenv("APPMULT_NO_NUMBA")
    with pytest.raises(RuntimeError):  # a column count that does not match: torch's own error
        K.fold(torch.randn(2, 18, 50), (9, 9), (3, 3), (1, 1), (1, 1))


@pytest.mark.parametrize("groups, per_channel", [(1, True), (1, False), (2, True), (4, True)])
@pytest.mark.parametrize("stride, dilation", [((1, 1), (1, 1)), ((2, 1), (1, 2))])
def test_zero_point_input_term_is_conv_input_of_the_constant_weight(groups, per_channel, stride, dilation):
    gen = torch.Generator().manual_seed(groups)
    n, c, co, hp, wp, kh, kw = 2, 4 * groups, 3 * groups, 9, 8, 3, 2
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    grad = torch.randn(n, co, ho, wo, dtype=torch.float64, generator=gen)
    zw = torch.randint(0, 255, (co,), generator=gen).double() if per_channel else torch.tensor(37.0).double()
    zwr = zw.reshape(co, 1, 1, 1) if per_channel else zw.reshape(())
    zmap = torch.ones((co, c // groups, kh, kw), dtype=torch.float64) * zwr
    want = torch.nn.grad.conv2d_input((n, c, hp, wp), zmap, grad, stride, 0, dilation, groups)
    got = AG._zero_point_input_term(grad, zwr, (n, c, hp, wp), (kh, kw), stride, dilation, groups)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
