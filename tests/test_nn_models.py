"""Reference networks: output shapes for 8x8, 28x28 and 32x32 inputs; only module multipliers."""

from __future__ import annotations


import pytest
from conftest import exact

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from appmult.train.data import DATASETS  # noqa: E402
from appmult.train.models import MLP, LeNet5, ResNet, build_model  # noqa: E402



SHAPES = [(1, 8), (1, 28), (3, 32)]  # digits, MNIST, CIFAR-10


@pytest.mark.parametrize("channels,size", SHAPES)
def test_lenet5(channels, size):
    model = LeNet5(channels, 10, size)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_lenet5_matches_textbook():
    # 28x28 (padded conv1) and 32x32 (unpadded) both reach the classic 16*5*5 features.
    for channels, size in [(1, 28), (3, 32)]:
        assert LeNet5(channels, 10, size).classifier[1].in_features == 400
    assert LeNet5(1, 10, 8).classifier[1].in_features == 64


def test_lenet5_wrong():
    with pytest.raises(TypeError, match=exact("Input size must be an integer of at least 4, not 3")):
        LeNet5(1, 10, 3)
    with pytest.raises(TypeError, match=exact("Class count must be a positive integer, not 0")):
        LeNet5(1, 0, 28)


@pytest.mark.parametrize("depth", [8, 20])
@pytest.mark.parametrize("channels,size", SHAPES)
def test_resnet(depth, channels, size):
    model = ResNet(depth, channels, 10).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # stem + 2 per block + 2 projection shortcuts (stages 2 and 3)
    assert len(convs) == 1 + 2 * 3 * (depth - 2) // 6 + 2


def test_resnet20_size():
    # He et al. report 0.27 M parameters for ResNet-20; the 1x1 projections add ~3 k.
    params = sum(p.numel() for p in ResNet(20, 3, 10).parameters())
    assert 270_000 < params < 275_000


def test_resnet_wrong():
    with pytest.raises(ValueError, match=exact(
            "ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), not 18")):
        ResNet(18)
    with pytest.raises(TypeError, match=exact("Depth must be a positive integer, not 8.0")):
        ResNet(8.0)


@pytest.mark.parametrize("channels,size", SHAPES)
def test_mlp(channels, size):
    model = MLP(channels * size * size, (32, 16), 10)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [32, 16, 10]


def test_mlp_linear_classifier():
    assert MLP(64, (), 10)(torch.zeros(1, 64)).shape == (1, 10)


def test_mlp_wrong():
    with pytest.raises(TypeError, match=exact("Hidden width must be a positive integer, not -4")):
        MLP(64, (-4,), 10)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet8", "resnet20", "resnet14"])
@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar10"])
def test_build_model(name, dataset):
    info = DATASETS[dataset]
    model = build_model(name, info).eval()
    x = torch.zeros(1, info.in_channels, info.input_size, info.input_size)
    assert model(x).shape == (1, info.num_classes)


def test_build_model_wrong():
    with pytest.raises(ValueError, match=exact(
            "Model must be one of 'mlp', 'lenet5', 'resnet8', 'resnet20', 'vit-tiny', 'vgg19_bn', 'resnet18', "
            "'resnet34', 'resnet50' (or 'resnet<6n+2>'), not 'vgg19'")):
        build_model("vgg19", DATASETS["digits"])


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet8"])
def test_every_multiplication_is_a_module(name):
    # Conversion replaces nn.Conv2d / nn.Linear modules; a weight used through a
    # functional call would silently stay exact. So: every weight belongs to a Conv2d,
    # Linear or BatchNorm (an exact per-channel affine), and every Conv2d/Linear runs once.
    model = build_model(name, DATASETS["digits"]).eval()
    owners = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert owners <= {nn.Conv2d, nn.Linear, nn.BatchNorm2d}
    multipliers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    calls = []
    for module in multipliers:
        module.register_forward_hook(lambda m, i, o: calls.append(m))
    model(torch.zeros(1, 1, 8, 8))
    assert len(calls) == len(multipliers) and set(map(id, calls)) == set(map(id, multipliers))
