"""VGG19 with BatchNorm for CIFAR (32x32) as a flat sequence of per-convolution blocks.

The feature extractor is torchvision's own (``make_layers(cfgs["E"], batch_norm=True)``, with
torchvision's initialisation). Each stage is one ``conv -> bn -> relu`` triple, plus the max-pool
that follows it where there is one, so cut index ``i`` means "after convolution ``i``" -- the
paper's layer count. The classifier is the CIFAR one used by the authors' code base: global
average pooling (the 32x32 input is 1x1 after five pools) and one ``Linear(512, num_classes)``,
instead of torchvision's 224-px 25088-4096-4096 head.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.vgg import cfgs, make_layers

__all__ = ["vgg19_bn_cifar"]


def vgg19_bn_cifar(num_classes: int = 10) -> nn.Sequential:
    """VGG19-BN for 32x32 inputs as ``conv1 ... conv16, head`` stages."""
    features = make_layers(cfgs["E"], batch_norm=True)
    for m in features.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)

    names = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.MaxPool2d: "pool"}
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    current: OrderedDict[str, nn.Module] | None = None
    for module in features:
        if isinstance(module, nn.Conv2d):
            if current is not None:
                stages[f"conv{len(stages) + 1}"] = nn.Sequential(current)
            current = OrderedDict()
        assert current is not None, "VGG features must start with a convolution"
        current[names[type(module)]] = module
    assert current is not None
    stages[f"conv{len(stages) + 1}"] = nn.Sequential(current)
    stages["head"] = nn.Sequential(
        OrderedDict(
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            fc=nn.Linear(512, num_classes),
        )
    )
    return nn.Sequential(stages)
