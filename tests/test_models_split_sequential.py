"""split_sequential: the user's own network, cut anywhere, gives the full model's output exactly."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import nn

from flwr_splitms.models import split_sequential


class MeanOverTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(10, 32),
            bn1=nn.BatchNorm1d(32),
            relu1=nn.ReLU(),
            drop=nn.Dropout(0.3),
            fc2=nn.Linear(32, 16),
            relu2=nn.ReLU(),
            head=nn.Linear(16, 3),
        )
    )


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout2d(0.2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def token_model() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            embed=nn.Embedding(50, 16),
            encoder=nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True),
            pool=MeanOverTokens(),
            head=nn.Linear(16, 4),
        )
    )


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return torch.randn(6, 10, generator=g)
    if name == "cnn":
        return torch.randn(4, 3, 8, 8, generator=g)
    return torch.randint(0, 50, (3, 7), generator=g)


MODELS: dict[str, Callable[[], nn.Sequential]] = {"mlp": mlp, "cnn": cnn, "tokens": token_model}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_split_reproduces_the_model_exactly(name: str, train: bool) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().train(train)
    x = _input(name)
    for at in range(1, len(model)):
        full = copy.deepcopy(model)
        torch.manual_seed(42)  # the same dropout draws on both sides
        expected = full(x)
        expected.float().square().sum().backward()

        client, server = split_sequential(copy.deepcopy(model), at)
        assert len(client) == at and len(client) + len(server) == len(model)
        torch.manual_seed(42)
        out = server(client(x))
        assert torch.equal(out, expected), (name, at)
        out.float().square().sum().backward()
        # The same parameters, keys, gradients and running statistics as the full model.
        split_state = {**client.state_dict(), **server.state_dict()}
        assert list(split_state) == list(full.state_dict())
        assert all(torch.equal(split_state[k], v) for k, v in full.state_dict().items())
        split_params = dict(client.named_parameters()) | dict(server.named_parameters())
        for key, p in full.named_parameters():
            assert p.grad is not None and torch.equal(split_params[key].grad, p.grad), key  # type: ignore[arg-type]


def test_child_names_and_negative_indices() -> None:
    model = mlp()
    client, server = split_sequential(model, "relu1")
    assert list(dict(client.named_children())) == ["fc1", "bn1", "relu1"]
    assert list(dict(server.named_children())) == ["drop", "fc2", "relu2", "head"]
    assert client.fc1 is model.fc1 and server.head is model.head  # shared, not copied
    same = split_sequential(model, 3)
    assert [type(m) for m in same[0]] == [type(m) for m in client]
    assert len(split_sequential(model, -1)[1]) == 1 and len(split_sequential(model, -6)[0]) == 1


def test_module_list_and_dict_are_stage_lists() -> None:
    stages = [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)]
    x = torch.randn(2, 4)
    expected = nn.Sequential(*stages)(x)
    client, server = split_sequential(nn.ModuleList(stages), 2)
    assert torch.equal(server(client(x)), expected)
    client, server = split_sequential(
        nn.ModuleDict({"a": stages[0], "b": stages[1], "c": stages[2]}), "a"
    )
    assert torch.equal(server(client(x)), expected) and list(dict(server.named_children())) == [
        "b",
        "c",
    ]


def test_bad_cuts_name_the_valid_ones() -> None:
    model = mlp()
    for at in (0, 7, -7, 100):
        with pytest.raises(ValueError, match=r"1\.\.6.*fc1, bn1, relu1, drop, fc2, relu2"):
            split_sequential(model, at)
    with pytest.raises(ValueError, match=r"not a child.*fc1, bn1, relu1, drop, fc2, relu2$"):
        split_sequential(model, "conv1")
    with pytest.raises(ValueError, match="last stage"):
        split_sequential(model, "head")
    with pytest.raises(TypeError, match="int index or a child name"):
        split_sequential(model, True)
    with pytest.raises(TypeError, match="float"):
        split_sequential(model, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        split_sequential(nn.Sequential(nn.ReLU()), 1)


def test_modules_that_are_not_stage_lists_are_refused() -> None:
    class Residual(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + super().forward(x)

    with pytest.raises(TypeError, match=r"overrides nn\.Sequential\.forward"):
        split_sequential(Residual(nn.Linear(3, 3), nn.ReLU()), 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flatten(self.a(x), 1))

    with pytest.raises(TypeError, match=r"got Net.*nn\.Flatten"):
        split_sequential(Net(), 1)
