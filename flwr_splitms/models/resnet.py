"""ResNet18 (CIFAR stem) and ResNet34 (ImageNet stem) as flat sequences of blocks.

The networks are torchvision's own ``resnet18``/``resnet34`` (``weights=None``), re-arranged into
an ``nn.Sequential`` of named stages -- ``stem``, one entry per ``BasicBlock`` (``layer1_0``,
``layer1_1``, ...), ``head`` -- so that a cut point is simply an index into that sequence and the
forward pass of the sequence is, operation for operation, torchvision's ``ResNet.forward``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torchvision
from torch import nn

__all__ = ["resnet18_cifar", "resnet34_imagenet"]


def _as_blocks(model: torchvision.models.ResNet, *, max_pool: bool) -> nn.Sequential:
    """Flatten a torchvision ResNet into ``stem, layerX_Y..., head`` (same modules, same order)."""
    stem: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=model.conv1, bn1=model.bn1, relu=model.relu
    )
    if max_pool:
        stem["maxpool"] = model.maxpool
    stages: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(stem))
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer: nn.Sequential = getattr(model, layer_name)
        for j, block in enumerate(layer):
            stages[f"{layer_name}_{j}"] = block
    stages["head"] = nn.Sequential(
        OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(1), fc=model.fc)
    )
    return nn.Sequential(stages)


def resnet18_cifar(num_classes: int = 100, **kwargs: Any) -> nn.Sequential:
    """ResNet18 for 32x32 inputs: 3x3 stride-1 stem convolution and no max-pool.

    ``kwargs`` go to ``torchvision.models.resnet18`` (e.g. ``zero_init_residual=True``).
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs)
    conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation torchvision gives every other convolution of the network.
    nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv1
    return _as_blocks(model, max_pool=False)


def resnet34_imagenet(num_classes: int = 1000, **kwargs: Any) -> nn.Sequential:
    """Standard ResNet34 (7x7 stride-2 stem + max-pool) for 224x224 inputs.

    ``kwargs`` go to ``torchvision.models.resnet34``.
    """
    model = torchvision.models.resnet34(weights=None, num_classes=num_classes, **kwargs)
    return _as_blocks(model, max_pool=True)
