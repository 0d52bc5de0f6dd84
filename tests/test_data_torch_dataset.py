"""from_torch_dataset: any map-style Dataset as a BatchSource, with replayable random transforms."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T
from torchvision.transforms import v2

from flwr_splitms.data import BatchSource, DataSplit, from_torch_dataset, partition


class PilImages(Dataset[tuple[Any, int]]):
    """A CIFAR-like Dataset: PIL images, ``targets`` kept beside them, a user transform."""

    def __init__(self, n: int = 12, transform: Any = None, target_transform: Any = None) -> None:
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 4 for i in range(n)]
        self.transform, self.target_transform = transform, target_transform
        self.reads = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        self.reads += 1
        img: Any = Image.fromarray(self.data[i])
        target = self.targets[i]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def _v1() -> T.Compose:
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])


def _v2() -> v2.Compose:
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def _batch(source: BatchSource, seed: int, idx: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return source.batch(idx or [0, 3, 5, 7, 11], augment=True, generator=g)[0]


@pytest.mark.parametrize("make", [_v1, _v2], ids=["v1", "v2"])
def test_random_transforms_replay_for_the_same_generator(make: Any) -> None:
    source = from_torch_dataset(PilImages(transform=make()))
    assert isinstance(source, BatchSource)
    first = _batch(source, 7)
    assert first.shape == (5, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, _batch(source, 7))
    assert not torch.equal(first, _batch(source, 8))
    # The transforms are random: without replay two draws would differ (probability ~1e-10).
    plain = PilImages(transform=make())
    assert not torch.equal(
        torch.stack([plain[0][0] for _ in range(5)]), plain[0][0].expand(5, -1, -1, -1)
    )
    # A generator restored to an earlier state replays, as the client's recompute does.
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = source.batch([1, 2], augment=True, generator=g)[0]
    g.set_state(state)
    assert torch.equal(a, source.batch([1, 2], augment=True, generator=g)[0])


def test_global_rng_states_are_left_unchanged() -> None:
    source = from_torch_dataset(PilImages(transform=_v1()))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    numpy_next = np.random.get_state()  # compared through the draws it gives
    _batch(source, 1)
    source.batch([0, 1])  # no generator: a fixed seed, still no side effect
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    after = np.random.random(4)
    np.random.set_state(numpy_next)
    assert np.array_equal(after, np.random.random(4))
    assert torch.equal(source.batch([0, 1])[0], source.batch([0, 1])[0])


def test_labels_from_targets_without_running_transforms() -> None:
    ds = PilImages(n=10, transform=_v1())
    source = from_torch_dataset(ds)
    assert source.labels.tolist() == [i % 4 for i in range(10)]
    assert source.labels.dtype == torch.int64 and source.num_classes == 4 and len(source) == 10
    assert ds.reads == 0
    _, y = source.batch([9, 2])
    assert y.tolist() == [1, 2] and y.dtype == torch.int64
    # Subsets follow their base dataset's targets.
    sub = from_torch_dataset(Subset(ds, [3, 4, 5]), num_classes=6)
    assert sub.labels.tolist() == [3, 0, 1] and sub.num_classes == 6 and ds.reads == 2


def test_labels_read_once_through_getitem_when_not_stored() -> None:
    ds = PilImages(n=6, transform=T.ToTensor(), target_transform=lambda t: t + 2)
    source = from_torch_dataset(ds)
    assert ds.reads == 0  # targets are ignored: the target_transform changes them
    assert source.labels.tolist() == [2, 3, 4, 5, 2, 3] and ds.reads == 6
    assert source.num_classes == 6
    source.labels  # noqa: B018  (cached: no second pass)
    assert ds.reads == 6


def test_tabular_and_token_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(20, 7, generator=g)
    tokens = torch.randint(0, 100, (20, 12), generator=g)
    y = torch.arange(20) % 3
    tab = from_torch_dataset(TensorDataset(features, y))
    x, labels = tab.batch(np.array([4, 1]))
    assert torch.equal(x, features[[4, 1]]) and labels.tolist() == [1, 1] and tab.num_classes == 3
    tok = from_torch_dataset(TensorDataset(tokens, y))
    x, _ = tok.batch(torch.tensor([0, 19]))
    assert x.dtype == torch.int64 and torch.equal(x, tokens[[0, 19]])

    class NumpyRows(Dataset[tuple[np.ndarray, int]]):
        """Rows as numpy arrays with a noisy transform drawn from numpy's global RNG."""

        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            row = features[i].numpy() + np.random.normal(size=7).astype(np.float32)
            return row, i % 3

    rows = from_torch_dataset(NumpyRows())
    assert rows.labels.tolist() == y.tolist()
    a, b = _batch(rows, 4, [2, 3]), _batch(rows, 4, [2, 3])
    assert a.shape == (2, 7) and torch.equal(a, b) and not torch.equal(a, _batch(rows, 5, [2, 3]))
    # Partitioning and index views work on the adapter like on the built-in sets.
    parts = partition(tab.labels, 2, seed=0)
    view = DataSplit(tab, torch.from_numpy(parts[1]))
    assert torch.equal(view.batch([0])[0], features[parts[1][:1]])


def test_bad_datasets_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="do not collate into one tensor"):
        from_torch_dataset(PilImages()).batch([0, 1])
    with pytest.raises(ValueError, match="num_classes >= 4"):
        from_torch_dataset(PilImages(), num_classes=3)
    with pytest.raises(TypeError, match="integer class ids"):
        _ = from_torch_dataset(
            TensorDataset(torch.zeros(3, 2), torch.tensor([0.5, 1.0, 2.0]))
        ).labels
    with pytest.raises(TypeError, match=r"\(input, label\)"):
        _ = from_torch_dataset(TensorDataset(torch.zeros(3, 2))).labels
    with pytest.raises(TypeError, match="map-style"):
        from_torch_dataset([1, 2, 3].__iter__())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        from_torch_dataset(TensorDataset(torch.zeros(0, 2), torch.zeros(0)))


def test_torchvision_fakedata() -> None:
    """torchvision's FakeData keeps no targets: labels come from one __getitem__ pass."""
    from torchvision.datasets import FakeData

    transform = T.Compose([T.RandomCrop(16, padding=2), T.RandomHorizontalFlip(), T.ToTensor()])
    fake = FakeData(size=24, image_size=(3, 16, 16), num_classes=5, transform=transform)
    source = from_torch_dataset(fake, num_classes=5)
    assert source.num_classes == 5 and len(source.labels) == 24
    assert source.labels.tolist() == [int(fake[i][1]) for i in range(24)]
    x, y = source.batch([0, 5, 9], generator=torch.Generator().manual_seed(2))
    assert x.shape == (3, 3, 16, 16) and torch.equal(y, source.labels[[0, 5, 9]])
    assert torch.equal(x, source.batch([0, 5, 9], generator=torch.Generator().manual_seed(2))[0])
