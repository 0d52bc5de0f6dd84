"""The cut registry: which networks exist, where they may be cut, and how to split them.

Every network is an ``nn.Sequential`` of named stages (see :mod:`.resnet`, :mod:`.vgg`). Cut
index ``i`` (``1 <= i < len(stages)``) gives the client ``stages[:i]`` and the server
``stages[i:]``; the server part always ends with pooling, flatten and the classifier. The two
parts hold the very module objects of the full network, so ``server(client(x))`` runs exactly the
operations of ``full(x)`` and their ``state_dict`` keys are the full model's keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from .resnet import resnet18_cifar, resnet34_imagenet
from .vgg import vgg19_bn_cifar

__all__ = [
    "ARCHS",
    "CUT_NAMES",
    "cut_index",
    "describe_cuts",
    "full_model",
    "input_shape",
    "num_stages",
    "split_model",
]

CUT_NAMES: tuple[str, ...] = ("shallow", "medium", "deep")


@dataclass(frozen=True)
class _ArchSpec:
    build: Callable[..., nn.Sequential]
    input_shape: tuple[int, int, int]
    num_classes: int  # the paper's dataset for this network
    num_stages: int
    cuts: Mapping[str, int]


# Named cuts are the paper's Sec. 5.1 cut points at these activation shapes (the README's
# "Models and cut points"):
#   vgg19:    after conv 2 (+pool) 64x16x16, conv 8 (+pool) 256x4x4, conv 15 512x2x2
#   resnet18: after stem+layer1[0] 64x32x32, layer2 128x16x16, layer3 256x8x8
#   resnet34: after stem+layer1[0] 64x56x56, layer2 128x28x28, layer3 256x14x14
_REGISTRY: dict[str, _ArchSpec] = {
    "vgg19": _ArchSpec(
        vgg19_bn_cifar, (3, 32, 32), 10, 17, {"shallow": 2, "medium": 8, "deep": 15}
    ),
    "resnet18": _ArchSpec(
        resnet18_cifar, (3, 32, 32), 100, 10, {"shallow": 2, "medium": 5, "deep": 7}
    ),
    "resnet34": _ArchSpec(
        resnet34_imagenet, (3, 224, 224), 1000, 18, {"shallow": 2, "medium": 8, "deep": 14}
    ),
}

ARCHS: tuple[str, ...] = tuple(_REGISTRY)


def _spec(arch: str) -> _ArchSpec:
    try:
        return _REGISTRY[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}") from None


def input_shape(arch: str) -> tuple[int, int, int]:
    """Per-sample input shape (C, H, W) the network is built for."""
    return _spec(arch).input_shape


def num_stages(arch: str) -> int:
    """Number of stages of the full network; valid cut indices are ``1 .. num_stages - 1``."""
    return _spec(arch).num_stages


def cut_index(arch: str, cut: str | int) -> int:
    """Resolve a cut name (``shallow``/``medium``/``deep``) or stage index to a stage index.

    Raises ``ValueError`` naming the valid names and index range.
    """
    spec = _spec(arch)
    last = spec.num_stages - 1
    valid = f"use one of {', '.join(repr(n) for n in spec.cuts)} or an index in 1..{last}"
    if isinstance(cut, str):
        name = cut.strip().lower()
        if name in spec.cuts:
            return spec.cuts[name]
        if name.isdigit():
            cut = int(name)
        else:
            raise ValueError(f"unknown cut {cut!r} for {arch}; {valid}")
    if isinstance(cut, bool) or not isinstance(cut, int):
        raise ValueError(f"cut must be a name or an int, got {type(cut).__name__}; {valid}")
    if not 1 <= cut <= last:
        raise ValueError(f"cut index {cut} out of range for {arch}; {valid}")
    return cut


def full_model(arch: str, num_classes: int | None = None, **kwargs: Any) -> nn.Sequential:
    """The unsplit network as an ``nn.Sequential`` of named stages.

    ``num_classes`` defaults to the paper's dataset for the network (vgg19: 10, resnet18: 100,
    resnet34: 1000). ``kwargs`` go to the torchvision constructor (ResNets only).
    """
    spec = _spec(arch)
    n = spec.num_classes if num_classes is None else num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = spec.build(n, **kwargs)
    assert len(model) == spec.num_stages, (arch, len(model))
    return model


def split_model(
    arch: str,
    cut: str | int,
    num_classes: int | None = None,
    *,
    model: nn.Sequential | None = None,
    **kwargs: Any,
) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a network at ``cut`` into ``(client_net, server_net)``.

    The parts are plain ``nn.Sequential`` modules: ``client_net = stages[:i]``,
    ``server_net = stages[i:]``. They are built from ``full_model(arch, num_classes, **kwargs)``
    (so under the same seed they carry the same parameters as a full model), or, when ``model``
    is given, share the modules of that already built full model.
    """
    i = cut_index(arch, cut)
    if model is None:
        model = full_model(arch, num_classes, **kwargs)
    elif kwargs:
        raise ValueError(f"model= is already built; drop the build options {sorted(kwargs)}")
    elif len(model) != num_stages(arch):
        raise ValueError(
            f"model has {len(model)} stages, {arch} has {num_stages(arch)}; "
            f"pass a model built by full_model({arch!r}, ...)"
        )
    return model[:i], model[i:]


def describe_cuts(arch: str, num_classes: int | None = None) -> pd.DataFrame:
    """One row per possible cut: name (or ""), index, activation shape, parameter counts.

    ``activation_bytes_per_sample`` is the uncompressed float32 size of one sample's
    cut-layer activation. Shapes are traced on the ``meta`` device, so this is cheap.
    """
    with torch.device("meta"):
        model = full_model(arch, num_classes)
        x = torch.empty(1, *input_shape(arch))
    model.eval()
    names = {index: name for name, index in _spec(arch).cuts.items()}
    counts = [sum(p.numel() for p in stage.parameters()) for stage in model]
    total = sum(counts)
    rows = []
    with torch.no_grad():
        for i in range(1, len(model)):
            x = model[i - 1](x)
            shape = tuple(x.shape[1:])
            client = sum(counts[:i])
            rows.append(
                {
                    "cut": names.get(i, ""),
                    "index": i,
                    "activation_shape": "x".join(str(s) for s in shape),
                    "client_params": client,
                    "server_params": total - client,
                    "activation_bytes_per_sample": float(4 * math.prod(shape)),
                }
            )
    return pd.DataFrame(rows)
