"""The per-forward shortcuts of an eval forward (issue 12): each must give the result of
doing the work afresh.

* the weight cache compares the weight with its private copy as 8-byte words where it can
  (``layers._same_bits``): a single changed weight, written where the version counter
  does not see it, at any position and for any byte count, must still miss the cache;
* a frozen activation quantizer keeps its scale and zero point while its range holds the
  same values (``ActivationQuantizer._kept_scale_zero_point``);
* ``functional._broadcasts_into`` replaces ``torch.broadcast_shapes`` in the dequantization.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxLinear, ActivationQuantizer
from appmult.nn import functional as FN
from appmult.nn.layers import _same_bits
from test_nn_overhead_paths import exact


def _fresh(layer, x):
    """The output with nothing cached (a gradient flows to the weight)."""
    with torch.enable_grad():
        return layer(x).detach()


@pytest.mark.parametrize("shape, dtype", [((5, 12), torch.float32), ((5, 3), torch.float32),
                                          ((7, 9), torch.float64), ((1, 1), torch.float32)])
def test_one_weight_changed_through_data_misses_the_cache(shape, dtype):
    """Even (8-byte words) and odd byte counts, float32 and float64; first, middle and last weight."""
    n, k = shape
    torch.manual_seed(n * k)
    layer = ApproxLinear.from_float(torch.nn.Linear(k, n).to(dtype),
                                    ApproxConfig(LutFile(exact(8, False), width_a=8, width_b=8, signed=False)))
    layer.eval()
    x = torch.rand(4, k, dtype=dtype) - 0.2
    for pos in sorted({0, n * k // 2, n * k - 1}):
        with torch.no_grad():
            layer(x)
            assert layer._weight_cache() is not None
            flat = layer.weight.data.view(-1)
            flat[pos] = flat[pos] * -3.0 + 0.5  # through .data: no version bump
            after = layer(x)
        assert torch.equal(after, _fresh(layer, x)), pos


def _exact_linear(k: int, n: int, seed: int):
    """An eval ``k -> n`` layer over the exact 8x8 product and an input with negative values."""
    torch.manual_seed(seed)
    layer = ApproxLinear.from_float(torch.nn.Linear(k, n),
                                    ApproxConfig(LutFile(exact(8, False), width_a=8, width_b=8, signed=False)))
    return layer.eval(), torch.rand(4, k) - 0.2


@pytest.mark.parametrize("change", ["new storage through .data", "a write through a numpy view",
                                    "new storage twice"])
def test_weight_changes_the_version_counter_misses_are_seen(change):
    """The cache compares the live weight's words, kept as a view holding its storage, with
    its private copy: a weight given new storage (``.data = ...``: another address) or
    written through numpy (no version bump) is quantized afresh."""
    layer, x = _exact_linear(16, 8, 3)
    with torch.no_grad():
        before = layer(x)
        old = layer.weight.data
        if change == "new storage through .data":
            layer.weight.data = old * 0.5 - 0.01
        elif change == "a write through a numpy view":
            layer.weight.detach().numpy()[3, 5] = 2.0
        else:
            layer.weight.data = old.clone()
            layer(x)
            layer.weight.data = (old * 2).clone()
        after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _fresh(layer, x))


def test_same_bits_compares_bits():
    a = torch.randn(6, 5)
    for b in (a.clone(), a.t().contiguous().t()):  # equal values, contiguous or not
        assert _same_bits(a, b)
    for make in (lambda t: t.add(0.0).index_put_((torch.tensor([5]), torch.tensor([4])), torch.tensor(1e-30)),
                 lambda t: t.double(), lambda t: t.reshape(5, 6)):
        assert not _same_bits(a, make(a.clone()))
    z = torch.zeros(4)
    assert not _same_bits(z, -z)  # -0.0: other bits (a harmless cache miss)
    assert _same_bits(torch.arange(6.0)[1:5], torch.arange(1.0, 5.0))  # an offset view


def _quantizer(width=8, signed=False):
    q = ActivationQuantizer(width, signed)
    q.eval()
    q(torch.linspace(-0.4, 2.0, 50))
    q.observing = False
    return q


def _fresh_scale_zero_point(q):
    return q.scale_zero_point()


@pytest.mark.parametrize("signed", [False, True])
def test_frozen_quantizer_follows_every_range_change(signed):
    q = _quantizer(signed=signed)
    x = torch.linspace(-1.0, 3.0, 37)
    first = q(x)
    assert all(torch.equal(a, b) for a, b in zip(q(x), first))  # kept: the same results
    changes = [
        lambda: q.min_val.data.fill_(-2.8),                        # through .data (no version bump)
        lambda: q.max_val.data.mul_(1.5),
        lambda: q.load_state_dict({**q.state_dict(), "max_val": torch.tensor(0.7)}),
        lambda: (q.reset(), q.observe(x * 2)),
    ]
    for change in changes:
        before = q(x)
        change()
        got = q(x)
        s, z = _fresh_scale_zero_point(q)
        assert torch.equal(got[1], s) and torch.equal(got[2], z)
        assert torch.equal(got[0], torch.clamp(torch.round(x / s + z), q.qmin, q.qmax))
        assert not torch.equal(got[0], before[0])


def test_observing_quantizer_does_not_keep_a_stale_range():
    q = _quantizer()
    q(torch.linspace(0, 1, 9))  # frozen: kept
    q.observing = True
    x = torch.linspace(0, 5, 9)
    _, s, _ = q(x)
    assert torch.equal(s, _fresh_scale_zero_point(q)[0]) and float(q.max_val) > 1.5
    q.observing = False
    assert torch.equal(q(x)[1], s)


SHAPES = [(), (1,), (3,), (1, 3), (2, 3), (3, 1), (2, 1, 3), (0,), (2, 0), (1, 0), (4, 2, 3)]


def test_broadcasts_into_matches_torch():
    for a, b in itertools.product(SHAPES, repeat=2):
        try:
            want = torch.broadcast_shapes(a, b) == torch.Size(b)
        except RuntimeError:
            want = False
        assert FN._broadcasts_into(torch.empty(a), torch.empty(b)) == want, (a, b)


def test_weight_given_a_transposed_view_of_its_own_storage_misses_the_cache():
    """Same address, same shape, other strides (a square weight transposed through
    ``.data``): the values read differ though the memory does not, so the cache must miss."""
    layer, x = _exact_linear(8, 8, 4)
    with torch.no_grad():
        before = layer(x)
        layer.weight.data = layer.weight.data.t()
        after = layer(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _fresh(layer, x))
