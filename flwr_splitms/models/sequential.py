"""Splitting the user's own network into a client part and a server part.

``split_sequential`` cuts a model that is a plain list of stages, run one after the other:

* an ``nn.Sequential`` whose ``forward`` is ``nn.Sequential.forward`` (a subclass that overrides
  ``forward`` may do work between its children, so it is refused), or
* an ``nn.ModuleList`` / ``nn.ModuleDict`` whose stages are applied in order.

Any other module may do work in ``forward`` that is no child (``torch.flatten`` in torchvision's
ResNet, a residual sum, a mask): list its stages yourself in an ``nn.Sequential``, adding modules
for that work (``nn.Flatten()``), and check ``seq(x) == model(x)`` once.

The two parts hold the model's very modules (no copy), under the model's child names, so
``server(client(x))`` runs exactly the operations of ``model(x)``, and the parts' ``state_dict``
keys are the model's keys.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["split_sequential"]


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        if type(model).forward is not nn.Sequential.forward:
            raise TypeError(
                f"{type(model).__name__} overrides nn.Sequential.forward, so its children alone "
                "may not reproduce its output; list its stages in a plain nn.Sequential"
            )
    elif not isinstance(model, nn.ModuleList | nn.ModuleDict):
        raise TypeError(
            f"split_sequential needs an nn.Sequential (or nn.ModuleList/nn.ModuleDict of stages "
            f"run in order), got {type(model).__name__}; its forward may do work outside its "
            "children: list its stages in an nn.Sequential (e.g. add nn.Flatten() where forward "
            "flattens) and check that it gives the model's output"
        )
    stages = list(model.named_children())
    if len(stages) < 2:
        raise ValueError(
            f"the model has {len(stages)} stage(s); a split needs at least 2 (one per side)"
        )
    return stages


def _cut(stages: list[tuple[str, nn.Module]], at: int | str) -> int:
    """Number of stages that go to the client (1 .. len - 1)."""
    n = len(stages)
    names = [name for name, _ in stages]
    if isinstance(at, str):
        if at not in names[:-1]:
            what = (
                "is the last stage (the server would get nothing)"
                if at == names[-1]
                else ("is not a child of the model")
            )
            raise ValueError(
                f"at={at!r} {what}; the client can end after one of: {', '.join(names[:-1])}"
            )
        return names.index(at) + 1
    if isinstance(at, bool) or not isinstance(at, int):
        raise TypeError(f"at must be an int index or a child name, got {type(at).__name__}")
    cut = at + n if at < 0 else at
    if not 1 <= cut <= n - 1:
        raise ValueError(
            f"at={at} is out of range for a model of {n} stages; use 1..{n - 1} (the number of "
            f"stages the client runs; -{n - 1}..-1 count from the end) or a child name: "
            f"{', '.join(names[:-1])}"
        )
    return cut


def split_sequential(model: nn.Module, at: int | str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split ``model`` into ``(client_net, server_net)`` with ``server(client(x)) == model(x)``.

    ``at`` is either the number of stages the client runs (``1 .. len(model) - 1``; a negative
    int counts from the end, like a slice bound), or a child's name: the client ends *with*
    that child, whose output is the cut-layer activation sent to the server.
    ``split_sequential(m, "relu2")`` equals ``split_sequential(m, index_of("relu2") + 1)``.

    ``model``: see the module docstring for what qualifies. The parts share the model's modules
    and keep its child names, so the parts' parameters are the model's parameters.
    """
    stages = _stages(model)
    cut = _cut(stages, at)
    return nn.Sequential(OrderedDict(stages[:cut])), nn.Sequential(OrderedDict(stages[cut:]))
