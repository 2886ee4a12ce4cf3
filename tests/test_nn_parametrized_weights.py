"""Approximate layers whose weight is computed from other parameters: a parametrization
(``torch.nn.utils.parametrize``) or pruning (``torch.nn.utils.prune``) replaces the
``weight`` parameter by a tensor made at each access. The layers read their weight from
the module's dict for speed; they must find the computed one instead (a bare
``KeyError: 'weight'`` before).

Reference: a plain approximate layer of the same configuration whose weight holds the
computed values, fed the same inputs (its own observer in the same state): the same output
bits in training (through the one-node step for the linear layer), evaluation and
``no_grad``, and the gradient of the underlying parameter is the plain layer's weight
gradient through the parametrization's own rule (``* 0.5``, ``* mask``: exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn

from appmult.lut_gen import LutFile
from appmult.nn import ApproxConfig, ApproxConv2d, ApproxLinear
from test_nn_int8_gemm import truncated
from test_nn_train_overhead import drum_table


class Half(nn.Module):
    def forward(self, w):
        return w * 0.5


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def layers(kind: str, table, kernel: str = "lowrank"):
    torch.manual_seed(0)
    lut = LutFile(table, width_a=8, width_b=8, signed=False)
    if kind == "linear":
        ref, shape = nn.Linear(12, 5), (6, 12)
        make = ApproxLinear.from_float
    else:
        ref, shape = nn.Conv2d(3, 4, 3, padding=1), (2, 3, 7, 7)
        make = ApproxConv2d.from_float
    cfg = ApproxConfig(lut, kernel=kernel)
    return make(ref, cfg), make(ref, cfg), shape


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("how", ["parametrize", "prune"])
@pytest.mark.parametrize("table", ["exact", "drum"])
def test_computed_weight_is_the_plain_layer_with_those_values(kind, how, table):
    computed, plain, shape = layers(kind, truncated(0) if table == "exact" else drum_table(False))
    if how == "parametrize":
        parametrize.register_parametrization(computed, "weight", Half())
        underlying = computed.parametrizations.weight.original
        factor = torch.full_like(underlying, 0.5)
    else:
        prune.l1_unstructured(computed, "weight", amount=0.4)
        underlying = computed.weight_orig
        factor = computed.weight_mask
    assert "weight" not in computed._parameters
    gen = torch.Generator().manual_seed(1)
    for mode in ("train", "eval", "no_grad"):
        with torch.no_grad():
            plain.weight.copy_(computed.weight)   # the computed values, as a plain parameter
        getattr(computed, "eval" if mode != "train" else "train")()
        getattr(plain, "eval" if mode != "train" else "train")()
        x = torch.relu(torch.randn(*shape, generator=gen))
        if mode == "no_grad":
            with torch.no_grad():
                assert torch.equal(bits(computed(x)), bits(plain(x)))
            continue
        underlying.grad = None
        plain.weight.grad = None
        yc, yp = computed(x), plain(x)
        assert torch.equal(bits(yc), bits(yp))
        g = torch.randn(yc.shape, generator=gen)
        yc.backward(g)
        yp.backward(g)
        assert torch.equal(bits(underlying.grad), bits(plain.weight.grad * factor))
        assert torch.equal(bits(computed.bias.grad), bits(plain.bias.grad))
        assert torch.equal(computed.act_quant.min_val, plain.act_quant.min_val)


class CountingHalf(nn.Module):
    """``w * 0.5``, counting its evaluations."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return w * 0.5


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("kernel", ["lowrank", "gather"])
def test_a_parametrized_weight_is_computed_once_per_forward(kind, kernel):
    """The layers read their weight in several places a forward (the input checks, the
    weight cache's key and its check, the plans); each read of a parametrized weight
    evaluates the parametrization, so without a cache a forward computed it up to six
    times. Once per forward in every mode, and the output as with a plain layer."""
    computed, plain, shape = layers(kind, truncated(0), kernel)
    counter = CountingHalf()
    parametrize.register_parametrization(computed, "weight", counter)
    gen = torch.Generator().manual_seed(2)
    for mode in ("train", "eval", "eval", "no_grad", "no_grad"):
        with torch.no_grad():
            plain.weight.copy_(computed.weight)
        computed.train(mode == "train")
        plain.train(mode == "train")
        x = torch.relu(torch.randn(*shape, generator=gen))
        counter.calls = 0
        with torch.set_grad_enabled(mode != "no_grad"):
            y = computed(x)
        assert counter.calls == 1, (mode, counter.calls)
        with torch.set_grad_enabled(mode != "no_grad"):
            assert torch.equal(bits(y), bits(plain(x)))
    # outside a forward the parametrization is not cached: a changed original is seen
    with torch.no_grad():
        computed.parametrizations.weight.original.mul_(2)
    assert torch.equal(computed.weight, computed.parametrizations.weight.original * 0.5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inference_keeps_the_weight_cache_of_a_parametrized_weight(kind):
    """A parametrized weight is a new tensor at every forward; where its bits are the cached
    ones, inference reuses the quantized weight and its tables (the eval plan with them)
    instead of building them again -- and a change of the underlying parameter, in place
    or through ``.data``, is still seen: the output is then the plain layer's with the new
    values."""
    computed, plain, shape = layers(kind, truncated(0))
    parametrize.register_parametrization(computed, "weight", Half())
    computed.eval()
    plain.eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(*shape, generator=gen))
    with torch.no_grad():
        computed(x)
        plain(x)
        computed.act_quant.observing = plain.act_quant.observing = False
        kept = computed._wcache["q"], computed._wcache["tables"]
        for _ in range(2):
            computed(x)
            assert computed._wcache["q"] is kept[0] and computed._wcache["tables"] is kept[1]
        original = computed.parametrizations.weight.original
        for change in ("in_place", "data"):
            if change == "in_place":
                original.mul_(1.5)
            else:
                original.data[0].neg_()
            plain.weight.copy_(computed.weight)
            assert torch.equal(bits(computed(x)), bits(plain(x)))
            assert computed._wcache["q"] is not kept[0]
            kept = computed._wcache["q"], computed._wcache["tables"]


class PlusLowRank(nn.Module):
    """``w + a @ b``: a parametrization whose value autocast would compute in bfloat16."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.a = nn.Parameter(torch.randn(rows, 2, generator=gen))
        self.b = nn.Parameter(torch.randn(2, cols, generator=gen))

    def forward(self, w):
        return w + self.a @ self.b


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("how", ["orthogonal", "low_rank"])
@pytest.mark.parametrize("method", ["forward", "int_forward", "quantize"])
def test_autocast_does_not_round_a_computed_weight(kind, how, method):
    # The layers' checks read the weight; a parametrization evaluated there under the caller's
    # autocast ran its matmul in bfloat16, and parametrize.cached() kept that weight for the call:
    # other integer accumulators (48 of 64 for an orthogonal linear layer), no error.
    computed, plain, shape = layers(kind, drum_table(False))
    if how == "orthogonal":
        torch.nn.utils.parametrizations.orthogonal(computed)
    elif kind == "linear":
        parametrize.register_parametrization(computed, "weight", PlusLowRank(5, 12))
    else:
        parametrize.register_parametrization(computed, "weight", Reshaped(PlusLowRank(4, 3 * 3 * 3)))
    with torch.no_grad():
        plain.weight.copy_(computed.weight)   # float32: outside autocast
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(*shape, generator=gen))
    for layer in (computed, plain):
        layer.eval()
        with torch.no_grad():
            layer(x)  # the observer
    with torch.no_grad():
        want = getattr(plain, method)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = getattr(computed, method)(x)
    if method == "quantize":
        assert torch.equal(got.qw, want.qw) and torch.equal(got.scale_w, want.scale_w)
        assert torch.equal(got.qx, want.qx)
    elif method == "int_forward":
        assert torch.equal(got, want)
    else:
        assert torch.equal(bits(got), bits(want))


class Reshaped(nn.Module):
    """A parametrization of a flattened conv weight, shaped back."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, w):
        return self.inner(w.flatten(1)).view_as(w)


def prune_as(layer, how: str) -> None:
    if how in ("l1", "twice"):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    if how == "twice":  # a PruningContainer
        prune.random_unstructured(layer, "weight", amount=0.3)
    if how == "bias":
        prune.l1_unstructured(layer, "weight", amount=0.3)
        prune.l1_unstructured(layer, "bias", amount=0.5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", ["int_forward", "quantize", "operands"])
@pytest.mark.parametrize("how", ["l1", "twice", "bias"])
def test_pruned_weight_after_an_optimizer_step(kind, method, how):
    # Pruning refreshes `weight = weight_orig * weight_mask` in a forward pre-hook; the methods
    # below are not called through __call__ and read the previous forward's weight (an RTL
    # check right after training compared the pre-step weights, on both sides).
    computed, plain, shape = layers(kind, drum_table(False))
    torch.manual_seed(5)
    prune_as(computed, how)
    gen = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(*shape, generator=gen))
    opt = torch.optim.SGD(computed.parameters(), lr=0.5)
    computed.train()
    computed(x).square().sum().backward()
    opt.step()
    computed.eval()
    plain.eval()
    with torch.no_grad():
        plain.weight.copy_(computed.weight_orig * computed.weight_mask)  # what the next forward uses
        plain.bias.copy_(computed.bias_orig * computed.bias_mask if how == "bias" else computed.bias)
        plain.act_quant.load_state_dict(computed.act_quant.state_dict())
        got, want = getattr(computed, method)(x), getattr(plain, method)(x)
    if method == "int_forward":
        assert torch.equal(got, want)
    elif method == "quantize":
        assert torch.equal(got.qw, want.qw) and torch.equal(got.scale_w, want.scale_w)
    else:
        assert torch.equal(got.w, want.w) and torch.equal(got.x, want.x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("method", ["__call__", "int_forward", "quantize"])
def test_computed_weight_under_inference_mode(kind, how, method):
    # A weight computed under torch.inference_mode() is an inference tensor, which has no version
    # counter: the weight cache's key raised "Inference tensors do not track version counter".
    computed, plain, shape = layers(kind, drum_table(False))
    if how == "prune":
        prune.l1_unstructured(computed, "weight", amount=0.5)
    else:
        parametrize.register_parametrization(computed, "weight", Half())
    with torch.no_grad():
        plain.weight.copy_(computed.weight)
    x = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(6)))
    for layer in (computed, plain):
        layer.eval()
        with torch.no_grad():
            layer(x)  # the observer
    with torch.inference_mode():
        for _ in range(2):  # a second call finds whatever the first one left
            got, want = getattr(computed, method)(x), getattr(plain, method)(x)
            if method == "quantize":
                assert torch.equal(got.qw, want.qw) and torch.equal(got.qx, want.qx)
            elif method == "int_forward":
                assert torch.equal(got, want)
            else:
                assert torch.equal(bits(got), bits(want))
