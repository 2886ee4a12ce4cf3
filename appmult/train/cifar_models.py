"""The CIFAR networks of the published retraining results: VGG19 with BatchNorm, ResNet-18/34/50,
and any torchvision classification model by name.

Module names and parameter shapes follow the widely used CIFAR reference code
(kuangliu/pytorch-cifar: ``features``/``classifier`` for VGG, ``conv1``/``bn1``/``layer1..4``/
``linear`` for the ResNets), so FP32 state_dicts trained with it load with ``--checkpoint``.

VGG19-BN and ResNet-18/34/50 here are the CIFAR variants used throughout the
approximate-computing literature (and by Meng et al., DATE 2025): 3x3 convolutions from
the first layer on, no stem max-pooling, a single linear classifier after global average
pooling. As in :mod:`appmult.train.models`, every multiplication sits in an ``nn.Conv2d``
or ``nn.Linear`` module, so :func:`appmult.nn.approximate_` converts them all.

Smaller inputs than 32x32 (8x8 digits, 28x28 MNIST) are accepted: a VGG max-pooling that
would shrink the map below 1x1 is left out, and the ResNets end in adaptive pooling.

torchvision is optional: ``torchvision:<name>`` models are looked up only when asked for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, InvalidValueError
from ._checks import positive_int

__all__ = ["CIFAR_MODELS", "TORCHVISION_PREFIX", "CifarResNet", "VGG", "check_torchvision_name", "torchvision_model"]

#: ``--model torchvision:<name>``: a torchvision classification model by name.
TORCHVISION_PREFIX = "torchvision:"

# Channels per conv layer, "M" a 2x2 max-pooling (Simonyan & Zisserman, configuration E).
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm for CIFAR: ``conv3x3-BN-ReLU`` blocks, max-pooling, one linear classifier.

    Args:
        layers: channels per conv layer and ``"M"`` for a max-pooling (default: VGG19).
        in_channels: image channels.
        num_classes: output logits.
        input_size: image height and width; poolings that would go below 1x1 are left out.

    Raises:
        TypeError: a size that is not a positive integer.
    """

    def __init__(self, layers: Sequence[int | str] = _VGG19, in_channels: int = 3, num_classes: int = 10,
                 input_size: int = 32):
        super().__init__()
        positive_int("Input channel count", in_channels)
        positive_int("Class count", num_classes)
        size = positive_int("Input size", input_size)
        mods: list[nn.Module] = []
        c = in_channels
        for v in layers:
            if v == "M":
                if size >= 2:
                    mods.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            mods += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


_RESNET_BLOCKS = {18: (_Basic, (2, 2, 2, 2)), 34: (_Basic, (3, 4, 6, 3)), 50: (_Bottleneck, (3, 4, 6, 3))}


class CifarResNet(nn.Module):
    """ResNet-18/34/50 for CIFAR: 3x3 stem of 64 channels, no max-pooling, 4 stages (64..512).

    Args:
        depth: 18, 34 (basic blocks) or 50 (bottleneck blocks).
        in_channels: image channels.
        num_classes: output logits.

    Raises:
        TypeError: a size that is not a positive integer.
        ValueError: another depth.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        positive_int("Input channel count", in_channels)
        positive_int("Class count", num_classes)
        if depth not in _RESNET_BLOCKS:
            raise InvalidValueError(f"CIFAR ResNet depth must be 18, 34 or 50, not {depth!r}")
        block, counts = _RESNET_BLOCKS[depth]
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        for i, n in enumerate(counts):
            planes = 64 << i
            stage = []
            for j in range(n):
                stage.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.pool(x), 1))


#: Name -> ``builder(in_channels, num_classes, input_size)``.
CIFAR_MODELS = {
    "vgg19_bn": lambda c, k, size: VGG(_VGG19, c, k, size),
    "resnet18": lambda c, k, size: CifarResNet(18, c, k),
    "resnet34": lambda c, k, size: CifarResNet(34, c, k),
    "resnet50": lambda c, k, size: CifarResNet(50, c, k),
}


def check_torchvision_name(model: str) -> str:
    """The torchvision model name in ``"torchvision:<name>"``, with torchvision importable.

    Light: looks torchvision up without importing it (configs call it).

    Raises:
        ConfigError: no name after the prefix, or torchvision is not installed.
    """
    name = model[len(TORCHVISION_PREFIX):]
    if not name:
        raise ConfigError(f"Model {model!r} names no torchvision model; write e.g. 'torchvision:resnet18'")
    if importlib.util.find_spec("torchvision") is None:
        raise ConfigError(f"Model {model!r} needs torchvision, which is not installed; install the torchvision "
                          f"build that matches torch {torch.__version__}, or choose a built-in model")
    return name


def torchvision_model(model: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision classification model, ``model = "torchvision:<name>"``, untrained, with ``num_classes`` outputs.

    Raises:
        ConfigError: torchvision missing, an unknown name, or images that are not RGB.
    """
    name = check_torchvision_name(model)
    if in_channels != 3:
        raise ConfigError(f"torchvision models take 3-channel images; this dataset has {in_channels}")
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(f"torchvision has no classification model {name!r}; it has "
                          f"{', '.join(sorted(known)[:8])}, ...")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
