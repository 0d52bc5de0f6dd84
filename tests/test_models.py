"""Split networks: cut shapes, exact split equivalence, parameter bookkeeping, cut errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flwr_splitms.models import (
    ARCHS,
    CUT_NAMES,
    cut_index,
    describe_cuts,
    full_model,
    input_shape,
    num_stages,
    split_model,
)

# The README's "Models and cut points": per-sample activation shapes of the named cuts.
EXPECTED_SHAPES = {
    ("vgg19", "shallow"): (64, 16, 16),
    ("vgg19", "medium"): (256, 4, 4),
    ("vgg19", "deep"): (512, 2, 2),
    ("resnet18", "shallow"): (64, 32, 32),
    ("resnet18", "medium"): (128, 16, 16),
    ("resnet18", "deep"): (256, 8, 8),
    ("resnet34", "shallow"): (64, 56, 56),
    ("resnet34", "medium"): (128, 28, 28),
    ("resnet34", "deep"): (256, 14, 14),
}
NUM_CLASSES = {"vgg19": 10, "resnet18": 100, "resnet34": 1000}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Sequential]:
    """One seeded full model per arch (seed 0), built once for the module."""
    models = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        models[arch] = full_model(arch, NUM_CLASSES[arch])
    return models


def _input(arch: str, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *input_shape(arch), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_parameters(arch: str, full_models: dict[str, nn.Sequential]) -> None:
    """split_model under a seed = full_model under that seed, stage for stage, key for key."""
    torch.manual_seed(0)
    client, server = split_model(arch, "medium", num_classes=NUM_CLASSES[arch])
    full = full_models[arch]
    split_state = {**client.state_dict(), **server.state_dict()}
    full_state = full.state_dict()
    assert list(split_state) == list(full_state)
    assert all(torch.equal(split_state[k], full_state[k]) for k in full_state)


@pytest.fixture(scope="module")
def references(
    full_models: dict[str, nn.Sequential],
) -> dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Per (arch, train mode): input, full-model output, full-model state after the pass."""
    refs = {}
    for arch, full in full_models.items():
        x = _input(arch, batch=1 if arch == "resnet34" else 2)
        for train in (False, True):
            f = copy.deepcopy(full).train(train)
            with torch.no_grad():
                refs[(arch, train)] = (x, f(x), f.state_dict())
    return refs


@pytest.mark.parametrize(("arch", "cut"), sorted(EXPECTED_SHAPES))
def test_named_cut_shapes_and_exact_split(
    arch: str,
    cut: str,
    full_models: dict[str, nn.Sequential],
    references: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
) -> None:
    full = full_models[arch]
    client, server = split_model(arch, cut, model=full)
    assert _params(client) + _params(server) == _params(full)
    assert not any(isinstance(m, nn.Linear) for m in client.modules())
    assert isinstance(server.get_submodule("head.fc"), nn.Linear)

    for train in (False, True):
        x, ref, ref_state = references[(arch, train)]
        # A fresh copy of the same full model: train-mode BatchNorm updates running
        # statistics, so both paths must start from identical buffers.
        c, s = split_model(arch, cut, model=copy.deepcopy(full).train(train))
        with torch.no_grad():
            act = c(x)
            out = s(act)
        assert tuple(act.shape) == (x.shape[0], *EXPECTED_SHAPES[(arch, cut)])
        assert out.shape == (x.shape[0], NUM_CLASSES[arch])
        assert torch.equal(out, ref), (arch, cut, train)
        moved = {**c.state_dict(), **s.state_dict()}  # running statistics moved identically
        assert all(torch.equal(moved[k], v) for k, v in ref_state.items())


@pytest.mark.parametrize("arch", ["vgg19", "resnet18"])
def test_every_integer_cut_is_exact(arch: str, full_models: dict[str, nn.Sequential]) -> None:
    full = copy.deepcopy(full_models[arch]).eval()
    x = _input(arch)
    with torch.no_grad():
        ref = full(x)
        for i in range(1, num_stages(arch)):
            client, server = split_model(arch, i, model=full)
            assert len(client) == i and len(server) == num_stages(arch) - i
            assert client[0] is full[0] and server[-1] is full[-1]  # shares, does not copy
            assert torch.equal(server(client(x)), ref), (arch, i)


def test_split_gradients_match_full_model(full_models: dict[str, nn.Sequential]) -> None:
    """Backward through client and server = backward through the full network."""
    full = copy.deepcopy(full_models["resnet18"]).train()
    client, server = split_model("resnet18", "medium", model=copy.deepcopy(full))
    x, y = _input("resnet18"), torch.tensor([3, 7])
    nn.functional.cross_entropy(full(x), y).backward()
    act = client(x)
    act_in = act.detach().requires_grad_(True)  # what a split server receives
    nn.functional.cross_entropy(server(act_in), y).backward()
    act.backward(act_in.grad)
    grads = {n: p.grad for part in (client, server) for n, p in part.named_parameters()}
    for name, p in full.named_parameters():
        split_grad = grads[name]
        assert p.grad is not None and split_grad is not None, name
        assert torch.allclose(split_grad, p.grad, atol=1e-6), name


def test_state_dict_round_trip_between_parts() -> None:
    torch.manual_seed(0)
    client_a, server_a = split_model("vgg19", "medium")
    torch.manual_seed(1)
    client_b, server_b = split_model("vgg19", "medium")
    client_b.load_state_dict(client_a.state_dict())
    server_b.load_state_dict(server_a.state_dict())
    x = _input("vgg19")
    client_a.eval(), server_a.eval(), client_b.eval(), server_b.eval()
    with torch.no_grad():
        assert torch.equal(server_a(client_a(x)), server_b(client_b(x)))


def test_default_num_classes_and_input_shapes() -> None:
    assert ARCHS == ("vgg19", "resnet18", "resnet34")
    assert input_shape("vgg19") == input_shape("resnet18") == (3, 32, 32)
    assert input_shape("resnet34") == (3, 224, 224)
    cases: list[tuple[str, str | int, int | None, int]] = [
        ("vgg19", "deep", None, 10),
        ("resnet18", 7, 7, 7),
        ("resnet34", "shallow", None, 1000),
    ]
    for arch, cut, classes, expected in cases:
        _, server = split_model(arch, cut, num_classes=classes)
        fc = server.get_submodule("head.fc")
        assert isinstance(fc, nn.Linear) and fc.out_features == expected


def test_resnet_stems() -> None:
    cifar = full_model("resnet18").get_submodule("stem")
    conv = cifar.get_submodule("conv1")
    assert isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride) == ((3, 3), (1, 1))
    assert not hasattr(cifar, "maxpool")
    imagenet = full_model("resnet34").get_submodule("stem")
    conv = imagenet.get_submodule("conv1")
    assert isinstance(conv, nn.Conv2d) and (conv.kernel_size, conv.stride) == ((7, 7), (2, 2))
    assert isinstance(imagenet.get_submodule("maxpool"), nn.MaxPool2d)


@pytest.mark.parametrize("arch", ARCHS)
def test_cut_index_names_and_integers(arch: str) -> None:
    last = num_stages(arch) - 1
    assert [cut_index(arch, name) for name in CUT_NAMES] == sorted(
        cut_index(arch, name) for name in CUT_NAMES
    )
    assert cut_index(arch, 1) == 1 and cut_index(arch, last) == last
    assert cut_index(arch, " Shallow ") == cut_index(arch, "shallow")
    assert cut_index(arch, "3") == 3
    for bad in (0, last + 1, -1):
        with pytest.raises(ValueError, match=rf"1\.\.{last}") as info:
            split_model(arch, bad)
        assert "'shallow', 'medium', 'deep'" in str(info.value)
    for bad_cut in ("middle", 2.0, True, None):
        with pytest.raises(ValueError, match="shallow"):
            cut_index(arch, bad_cut)  # type: ignore[arg-type]


def test_paper_layer_counts(full_models: dict[str, nn.Sequential]) -> None:
    """Named cuts sit where the paper's Sec. 5.1 counts its layers (conv layers before the cut)."""
    assert [cut_index("vgg19", c) for c in CUT_NAMES] == [2, 8, 15]  # one stage per conv

    def convs(arch: str, cut: str) -> int:
        # Count the main path's convolutions (not the 1x1 downsample shortcuts).
        client, _ = split_model(arch, cut, model=full_models[arch])
        return sum(
            isinstance(m, nn.Conv2d) and "downsample" not in name
            for name, m in client.named_modules()
        )

    assert [convs("resnet18", c) for c in CUT_NAMES] == [3, 9, 13]  # paper: 2, 9, 13
    assert [convs("resnet34", c) for c in CUT_NAMES] == [3, 15, 27]  # paper: 2, 15, 27


def test_unknown_arch_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vgg19, resnet18, resnet34"):
        split_model("resnet50", "shallow")
    with pytest.raises(ValueError, match="vgg19"):
        describe_cuts("alexnet")
    with pytest.raises(ValueError, match="num_classes"):
        full_model("resnet18", 0)
    resnet18 = full_model("resnet18")
    with pytest.raises(ValueError, match="stages"):
        split_model("resnet34", "deep", model=resnet18)
    with pytest.raises(ValueError, match="zero_init_residual"):
        split_model("resnet18", "deep", model=resnet18, zero_init_residual=True)
    client, _ = split_model("resnet18", 1, zero_init_residual=True)  # kwargs reach torchvision
    assert len(client) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_cuts(arch: str, full_models: dict[str, nn.Sequential]) -> None:
    table = describe_cuts(arch, NUM_CLASSES[arch])
    assert list(table.columns) == [
        "cut",
        "index",
        "activation_shape",
        "client_params",
        "server_params",
        "activation_bytes_per_sample",
    ]
    assert list(table["index"]) == list(range(1, num_stages(arch)))
    total = _params(full_models[arch])
    assert ((table["client_params"] + table["server_params"]) == total).all()
    assert table["client_params"].is_monotonic_increasing
    named = table[table["cut"] != ""]
    assert list(named["cut"]) == list(CUT_NAMES)
    for _, row in named.iterrows():
        shape = EXPECTED_SHAPES[(arch, row["cut"])]
        assert row["activation_shape"] == "x".join(map(str, shape))
        assert row["activation_bytes_per_sample"] == 4.0 * shape[0] * shape[1] * shape[2]
        client, _ = split_model(arch, row["cut"], model=full_models[arch])
        assert row["client_params"] == _params(client)
