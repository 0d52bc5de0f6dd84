"""The paper's split networks (Sec. 5.1) and their cut points.

>>> client_net, server_net = split_model("resnet18", cut="shallow", num_classes=100)

Plain PyTorch modules, nothing Flower-specific.
"""

from .resnet import resnet18_cifar, resnet34_imagenet
from .split import (
    ARCHS,
    CUT_NAMES,
    cut_index,
    describe_cuts,
    full_model,
    input_shape,
    num_stages,
    split_model,
)
from .vgg import vgg19_bn_cifar

__all__ = [
    "ARCHS",
    "CUT_NAMES",
    "cut_index",
    "describe_cuts",
    "full_model",
    "input_shape",
    "num_stages",
    "resnet18_cifar",
    "resnet34_imagenet",
    "split_model",
    "vgg19_bn_cifar",
]
