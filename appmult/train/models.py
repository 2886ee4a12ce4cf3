"""Reference networks for retraining experiments: MLP, LeNet-5, CIFAR-style ResNet.

Every multiplication sits in an ``nn.Conv2d`` or ``nn.Linear`` module — no functional
convolutions, no parameter tensors used directly — because approximate conversion
(``approximate_(model, config)``) works by replacing exactly those modules. Anything
else (ReLU, pooling, BatchNorm, the residual addition) stays exact, as it would in an
accelerator whose multipliers alone are approximate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ..errors import InvalidTypeError, InvalidValueError
from ._checks import positive_int
from .vit import ViT
from .cifar_models import CIFAR_MODELS, TORCHVISION_PREFIX, torchvision_model

__all__ = ["MLP", "LeNet5", "MODEL_NAMES", "ResNet", "build_model"]


class MLP(nn.Module):
    """Fully connected network on flattened images: ``Linear -> ReLU`` per hidden layer.

    Args:
        in_features: Input features (``C * H * W`` for images; inputs are flattened).
        hidden: Widths of the hidden layers (may be empty: a linear classifier).
        num_classes: Output logits.

    Raises:
        TypeError: If a size is not a positive integer.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 64),
                 num_classes: int = 10):
        super().__init__()
        positive_int("Input feature count", in_features)
        positive_int("Class count", num_classes)
        widths = [in_features] + [positive_int("Hidden width", h) for h in hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, FC 120, FC 84, FC classes), ReLU.

    The original network took 32x32 images (MNIST was padded to 32x32); the convolutions
    are unpadded. To fit other sizes without changing the layer structure:

    * ``conv1`` is padded by 2 when ``input_size < 32``, so 28x28 MNIST gives the same
      28x28 first feature map as the 32x32 original, and 8x8 digits stay 8x8;
    * ``conv2`` is padded by 2 when the pooled map is smaller than 10x10 (8x8 digits:
      4x4), so its 5x5 kernel still fits;
    * the first FC layer takes whatever the second pooling leaves
      (``16*5*5`` for 28x28 and 32x32, ``16*2*2`` for 8x8).

    Sizing the FC layer exactly (rather than adaptive pooling) keeps MNIST/CIFAR identical
    to the textbook network. Max pooling and ReLU keep activations non-negative, which
    suits unsigned activation quantization.

    Args:
        in_channels: Image channels.
        num_classes: Output logits.
        input_size: Image height and width, at least 4.

    Raises:
        TypeError: If a size is not a positive integer, or ``input_size < 4``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        positive_int("Input channel count", in_channels)
        positive_int("Class count", num_classes)
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 4:
            raise InvalidTypeError(f"Input size must be an integer of at least 4, not {input_size!r}")
        pad1 = 2 if input_size < 32 else 0
        size1 = (input_size + 2 * pad1 - 4) // 2
        pad2 = 2 if size1 < 10 else 0
        size2 = (size1 + 2 * pad2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * size2 * size2, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut; ReLU after the addition."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # He et al.'s CIFAR ResNets pad the identity with zero channels ("option A"),
        # which needs a functional slice-and-pad; a 1x1 projection ("option B") is an
        # ordinary Conv2d, so the conversion treats it like every other multiplier user.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): 3 stages of BasicBlocks, 16/32/64 channels.

    ``depth = 6n + 2`` with ``n`` blocks per stage: ResNet-8 (n=1), -20 (n=3), -32, ...
    Stages 2 and 3 halve the feature map; global average pooling (adaptive, to 1x1)
    makes the network accept any input size of at least 4x4 (8x8 digits end at 2x2,
    32x32 CIFAR at 8x8).

    Args:
        depth: Total depth, ``6n + 2`` (8, 14, 20, 32, ...).
        in_channels: Image channels.
        num_classes: Output logits.
        width: Channels of the first stage (doubled per stage).

    Raises:
        TypeError: If a size is not a positive integer.
        ValueError: If ``depth`` is not of the form ``6n + 2``.
    """

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 width: int = 16):
        super().__init__()
        positive_int("Depth", depth)
        positive_int("Input channel count", in_channels)
        positive_int("Class count", num_classes)
        positive_int("Width", width)
        if depth < 8 or (depth - 2) % 6:
            raise InvalidValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), "
                             f"not {depth}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        in_planes = width
        for stage in range(3):
            planes = width << stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class _HasShape(Protocol):
    in_channels: int
    input_size: int
    num_classes: int


MODEL_NAMES = ("mlp", "lenet5", "resnet8", "resnet20", "vit-tiny", *CIFAR_MODELS)
_RESNET = re.compile(r"resnet(\d+)")


def build_model(name: str, dataset_info: _HasShape) -> nn.Module:
    """Build a named network sized for a dataset.

    Args:
        name: ``"mlp"``, ``"lenet5"``, ``"resnet<depth>"`` with depth ``6n + 2``
            (``"resnet8"``, ``"resnet20"``, ...), a CIFAR network of the published results
            (``"vgg19_bn"``, ``"resnet18"``, ``"resnet34"``, ``"resnet50"``: see
            :mod:`appmult.train.cifar_models`; these names take precedence over the
            ``6n + 2`` family, whose depth 50 is not reachable by name), or
            ``"torchvision:<name>"`` (needs torchvision), or ``"vit-tiny"`` (a 2-block
            Vision Transformer on a 4x4 patch grid, :class:`appmult.train.vit.ViT`).
        dataset_info: Anything with ``in_channels``, ``input_size`` and ``num_classes``,
            usually :class:`appmult.train.DatasetInfo` (``Loaders.info``).

    Returns:
        The untrained model (initialized from the global torch RNG: seed it first).

    Raises:
        ValueError: For an unknown name or an invalid ResNet depth.
    """
    channels, size, classes = (dataset_info.in_channels, dataset_info.input_size,
                               dataset_info.num_classes)
    if name == "mlp":
        return MLP(channels * size * size, (128, 64), classes)
    if name == "lenet5":
        return LeNet5(channels, classes, size)
    if name == "vit-tiny":
        return ViT(channels, classes, size)
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](channels, classes, size)
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_model(name, channels, classes)
    match = _RESNET.fullmatch(name)
    if match:
        return ResNet(int(match.group(1)), channels, classes)
    raise InvalidValueError(f"Model must be one of {', '.join(map(repr, MODEL_NAMES))} "
                     f"(or 'resnet<6n+2>'), not {name!r}")
