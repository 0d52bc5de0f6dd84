"""The paper's split networks (Sec. 5.1) and their cut points, and a splitter for your own.

>>> client_net, server_net = split_model("resnet18", cut="shallow", num_classes=100)
>>> client_net, server_net = split_sequential(my_sequential_model, at="relu2")  # doctest: +SKIP

Plain PyTorch modules, nothing Flower-specific.
"""

from .resnet import resnet18_cifar, resnet34_imagenet
from .sequential import split_sequential
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
    "split_sequential",
    "vgg19_bn_cifar",
]
