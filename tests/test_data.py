"""Data layer: batches and augmentation, synthetic data, partitions, real-dataset loading."""

from __future__ import annotations

import pickle
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from flwr_splitms import data
from flwr_splitms.data import (
    DEFAULT_ROOT,
    BatchSource,
    DatasetUnavailableError,
    DataSplit,
    ImageFolderDataset,
    ImageTensorDataset,
    dataset_num_classes,
    load_dataset,
    load_partition,
    partition,
)


@pytest.fixture(autouse=True)
def _isolated_cache() -> Iterator[None]:
    """Every test starts and ends with an empty per-process dataset cache."""
    data.clear_cache()
    yield
    data.clear_cache()


def _tiny(n: int = 6, size: int = 8, classes: int = 3) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n, dtype=torch.int64) % classes
    return ImageTensorDataset(images, labels, classes, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


# ---------------------------------------------------------------------------------- batches


def test_batch_normalises_exactly() -> None:
    ds = _tiny()
    x, y = ds.batch([4, 1])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    expected = (ds.images[[4, 1]].float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert y.tolist() == [1, 1]
    assert torch.equal(ds.batch(torch.tensor([4, 1]))[0], ds.batch(np.array([4, 1]))[0])


def test_augment_is_crop_of_zero_padded_image_plus_flip() -> None:
    ds = _tiny(n=16)
    g = torch.Generator().manual_seed(3)
    x, _ = ds.batch(torch.arange(16), augment=True, generator=g)
    padded = F.pad(ds.images.float(), (4, 4, 4, 4))
    mean = torch.tensor(ds.mean).view(3, 1, 1)
    std = torch.tensor(ds.std).view(3, 1, 1)
    flips = 0
    for n in range(16):
        raw = (x[n] * std + mean) * 255  # back to pixel values
        candidates = [
            (padded[n, :, i : i + 8, j : j + 8], flip)
            for i in range(9)
            for j in range(9)
            for flip in (False, True)
        ]
        hits = [
            flip
            for c, flip in candidates
            if torch.allclose(raw, c.flip(-1) if flip else c, atol=1e-3)
        ]
        assert hits, f"sample {n} is not a padded crop (+ flip) of its image"
        flips += hits[0]
    assert 0 < flips < 16


def test_augment_deterministic_in_the_generator(tmp_path: Path) -> None:
    ds = load_dataset("synthetic", tmp_path, size=64)
    idx = torch.arange(0, 64, 3)

    def run(seed: int) -> torch.Tensor:
        return ds.batch(idx, augment=True, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), ds.batch(idx)[0])
    # The split protocol recomputes a batch: restoring the generator state reproduces it.
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    first = ds.batch(idx, augment=True, generator=g)[0]
    g.set_state(state)
    assert torch.equal(first, ds.batch(idx, augment=True, generator=g)[0])


def test_data_split_view() -> None:
    ds = _tiny(n=10)
    split = DataSplit(ds, torch.tensor([9, 2, 5]))
    assert len(split) == 3 and split.num_classes == 3
    assert split.labels.tolist() == [0, 2, 2]
    x, y = split.batch([2, 0])
    ref_x, ref_y = ds.batch([5, 9])
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    for source in (ds, split):
        assert isinstance(source, BatchSource)


def test_dataset_validates_tensors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(
            torch.zeros(2, 3, 4, 4),
            torch.zeros(2, dtype=torch.int64),
            2,
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
        )
    with pytest.raises(ValueError, match="int64"):
        ImageTensorDataset(
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            2,
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
        )


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_shape_defaults_and_balance(tmp_path: Path) -> None:
    train = load_dataset("synthetic", tmp_path)
    test = load_dataset("synthetic", tmp_path, train=False)
    assert isinstance(train, ImageTensorDataset)
    assert train.images.shape == (5000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 1000 and train.num_classes == test.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [500] * 10
    small = load_dataset("synthetic", tmp_path, num_classes=7, size=70)
    assert small.num_classes == 7 and torch.bincount(small.labels).tolist() == [10] * 7
    assert load_dataset("synthetic", tmp_path) is train  # cached per process


def _in_memory(ds: object) -> ImageTensorDataset:
    assert isinstance(ds, ImageTensorDataset)
    return ds


def test_synthetic_deterministic_in_seed(tmp_path: Path) -> None:
    a = _in_memory(load_dataset("synthetic", tmp_path, size=200, seed=1, disk_cache=False))
    data.clear_cache()
    b = _in_memory(load_dataset("synthetic", tmp_path, size=200, seed=1, disk_cache=False))
    assert a is not b
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = _in_memory(load_dataset("synthetic", tmp_path, size=200, seed=2))
    assert not torch.equal(a.images, c.images)
    test = _in_memory(load_dataset("synthetic", tmp_path, size=200, seed=1, train=False))
    assert not torch.equal(a.images, test.images)  # different samples, same classes
    assert 0.3 < a.images.float().mean().item() / 255 < 0.7  # not saturated


def test_synthetic_is_learnable(tmp_path: Path) -> None:
    """A tiny CNN beats chance (10%) by a wide margin in a few hundred SGD steps."""
    train = load_dataset("synthetic", tmp_path, size=4000)
    test = load_dataset("synthetic", tmp_path, size=500, train=False)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(train), (32,), generator=g)
        x, y = train.batch(idx, augment=True, generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, y = test.batch(torch.arange(len(test)))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.4, accuracy


# ------------------------------------------------------------------------------- partitions


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(n)), "not disjoint and covering"
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_iid_partition() -> None:
    labels = np.arange(103) % 10
    parts = partition(labels, 10, seed=3)
    _check_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    again = partition(torch.as_tensor(labels), 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 10, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_partition_skews_labels() -> None:
    labels = np.repeat(np.arange(10), 100)

    def skew(parts: list[np.ndarray]) -> float:
        """Mean total-variation distance of a part's label histogram from the global one."""
        dists = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(d - 0.1).sum() for d in dists]))

    parts = partition(labels, 10, scheme="dirichlet", alpha=0.1, seed=0)
    _check_cover(parts, 1000)
    assert all(len(p) > 0 for p in parts)
    again = partition(labels, 10, scheme="dirichlet", alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    iid = partition(labels, 10, scheme="iid")
    assert skew(parts) > 0.5 > 0.15 > skew(iid)
    assert skew(partition(labels, 10, "dirichlet", alpha=100.0)) < 0.15


def test_dirichlet_never_leaves_a_partition_empty() -> None:
    labels = np.zeros(12, dtype=np.int64)  # one class: most Dirichlet draws starve someone
    for seed in range(5):
        parts = partition(labels, 12, scheme="dirichlet", alpha=0.01, seed=seed)
        _check_cover(parts, 12)
        assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "positive int"),
        ({"num_partitions": 21}, "at most 20"),
        ({"num_partitions": 2, "scheme": "shards"}, "iid, dirichlet"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
    ],
)
def test_partition_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        partition(np.arange(20) % 2, **kwargs)  # type: ignore[arg-type]


def test_partition_rejects_non_label_arrays() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="integer"):
        partition(np.linspace(0, 1, 4), 2)


def _global(split: DataSplit) -> torch.Tensor:
    assert split.dataset_indices is not None
    return split.dataset_indices


def test_load_partition_splits_and_caches(tmp_path: Path) -> None:
    kwargs = {"size": 300, "num_classes": 5, "seed": 2, "root": tmp_path}
    splits = [load_partition("synthetic", i, 3, **kwargs) for i in range(3)]  # type: ignore[arg-type]
    assert all(test is None for _, test in splits)
    _check_cover([_global(s).numpy() for s, _ in splits], 300)
    full = load_dataset("synthetic", **kwargs)  # type: ignore[arg-type]
    for split, _ in splits:  # a partition's own dataset serves the full set's very batches
        assert len(split.dataset) == len(split) and torch.equal(
            split.indices, torch.arange(len(split))
        )
        assert torch.equal(split.labels, full.labels[_global(split)])
        pos = torch.tensor([3, 0, 7])
        for seed in (None, 5):
            gen = [None if seed is None else torch.Generator().manual_seed(seed) for _ in "ab"]
            x, y = split.batch(pos, augment=seed is not None, generator=gen[0])
            ref_x, ref_y = full.batch(
                _global(split)[pos], augment=seed is not None, generator=gen[1]
            )
            assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    again = load_partition("synthetic", 0, 3, **kwargs)[0]  # type: ignore[arg-type]
    assert again.dataset is splits[0][0].dataset  # cached per process

    train, test = load_partition("synthetic", 1, 3, test_fraction=0.2, **kwargs)  # type: ignore[arg-type]
    assert test is not None and len(test) == 20 and len(train) == 80
    assert train.dataset is test.dataset is splits[1][0].dataset
    own = _global(splits[1][0])
    joined = torch.cat([_global(train), _global(test)]).sort().values
    assert torch.equal(joined, own)
    assert torch.equal(_global(test), own[test.indices])
    again_train, again_test = load_partition("synthetic", 1, 3, test_fraction=0.2, **kwargs)  # type: ignore[arg-type]
    assert again_test is not None
    assert torch.equal(again_train.indices, train.indices)
    assert torch.equal(again_test.indices, test.indices)

    skewed = load_partition("synthetic", 0, 3, scheme="dirichlet", alpha=0.05, **kwargs)[0]  # type: ignore[arg-type]
    share = torch.bincount(skewed.labels, minlength=5).max().item() / len(skewed)
    assert share > 0.5  # balanced labels would give 0.2 per class


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((3, 3), {}, r"0\.\.2"),
        ((-1, 3), {}, r"0\.\.2"),
        ((0, 0), {}, "positive int"),
        ((0, 2), {"test_fraction": 1.0}, "test_fraction"),
        ((0, 2), {"name": "svhn"}, "cifar10, cifar100, mnist, fashion-mnist, synthetic, imagenet"),
    ],
)
def test_load_partition_bad_arguments(
    args: tuple[int, int], kwargs: dict[str, object], message: str
) -> None:
    name = kwargs.pop("name", "synthetic")
    with pytest.raises(ValueError, match=message):
        load_partition(name, *args, size=20, **kwargs)  # type: ignore[arg-type]


def test_dataset_num_classes() -> None:
    assert dataset_num_classes("cifar10") == 10
    assert dataset_num_classes("CIFAR100") == 100
    assert dataset_num_classes("synthetic") == 10
    assert dataset_num_classes("synthetic", 100) == 100
    assert dataset_num_classes("imagenet") == 1000
    assert dataset_num_classes("imagenet", 100) == 100
    with pytest.raises(ValueError, match="10 classes"):
        dataset_num_classes("cifar10", 100)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_num_classes("svhn")


# ---------------------------------------------------------------------------- real datasets


def _assert_one_clear_line(message: str, root: Path) -> None:
    assert "\n" not in message
    assert str(root.resolve()) in message
    assert 'dataset="synthetic"' in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion-mnist"])
def test_missing_dataset_without_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, root=tmp_path, download=False)
    _assert_one_clear_line(str(info.value), tmp_path)
    assert "download=False" in str(info.value) and "data-download" in str(info.value)


@pytest.mark.parametrize("error", [urllib.error.URLError("no network"), OSError("unreachable")])
def test_failed_download(error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def offline(root: str, train: bool = True, download: bool = False) -> None:
        calls.append(download)
        raise error

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", root=tmp_path, download=True)
    assert calls == [True]
    _assert_one_clear_line(str(info.value), tmp_path)
    assert "could not download cifar10" in str(info.value)
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is error


def test_missing_imagenet(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("imagenet", root=tmp_path)
    _assert_one_clear_line(str(info.value), tmp_path)


def _fake_cifar(root: Path, name: str, n_train: int, n_test: int) -> None:
    """Write torchvision's CIFAR pickle layout (the checksum check is patched out)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, label_key, meta = root / "cifar-10-batches-py", "labels", "batches.meta"
        files = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
        meta_content = {"label_names": [f"c{i}" for i in range(10)]}
        classes = 10
    else:
        folder, label_key, meta = root / "cifar-100-python", "fine_labels", "meta"
        files = {"train": n_train, "test": n_test}
        meta_content = {"fine_label_names": [f"c{i}" for i in range(100)]}
        classes = 100
    folder.mkdir(parents=True)
    for file, count in files.items():
        batch = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, count).tolist(),
        }
        (folder / file).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps(meta_content))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_disk(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    _fake_cifar(tmp_path, name, n_train=50, n_test=10)
    train = load_dataset(name, root=tmp_path)
    test = load_dataset(name, root=tmp_path, train=False)
    assert isinstance(train, ImageTensorDataset) and isinstance(test, ImageTensorDataset)
    assert train.images.shape == (50, 3, 32, 32) and len(test) == 10
    assert train.num_classes == dataset_num_classes(name)
    raw = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    reference = raw(str(tmp_path), train=True)
    # torchvision's HWC uint8 image 7 is our CHW image 7; labels match.
    assert torch.equal(train.images[7].permute(1, 2, 0), torch.from_numpy(reference.data[7]))
    assert train.labels.tolist() == list(reference.targets)
    assert load_dataset(name, root=tmp_path) is train  # cached: files are read once
    subset = load_dataset(name, root=tmp_path, size=20, seed=1)
    assert len(subset) == 20 and load_dataset(name, root=tmp_path, size=20, seed=1) is subset
    with pytest.raises(ValueError, match="size=60 exceeds"):
        load_dataset(name, root=tmp_path, size=60)


def write_fake_digits(root: Path, name: str, n_train: int, n_test: int) -> None:
    """Write the four raw idx files torchvision's MNIST/FashionMNIST read (no download)."""
    folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, count in (("train", n_train), ("t10k", n_test)):
        pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        header = (0x0803).to_bytes(4, "big") + b"".join(
            d.to_bytes(4, "big") for d in (count, 28, 28)
        )
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + pixels.tobytes())
        header = (0x0801).to_bytes(4, "big") + count.to_bytes(4, "big")
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_digits_from_disk(name: str, tmp_path: Path) -> None:
    write_fake_digits(tmp_path, name, n_train=12, n_test=5)
    train = _in_memory(load_dataset(name, root=tmp_path))
    test = _in_memory(load_dataset(name, root=tmp_path, train=False))
    assert train.images.shape == (12, 3, 32, 32) and len(test) == 5
    assert train.num_classes == dataset_num_classes(name) == 10
    raw_cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    reference = raw_cls(str(tmp_path), train=True)
    # 2 px of zero padding around the untouched 28x28 image, the same in all three channels.
    assert torch.equal(
        train.images[:, :, 2:30, 2:30], reference.data[:, None].expand(-1, 3, -1, -1)
    )
    border = train.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.abs().sum()) == 0
    assert train.labels.tolist() == reference.targets.tolist()
    assert train.flip == (name != "mnist")  # a mirrored digit is another symbol
    # The statistics are those of the padded images: a typical-looking set normalises near 0/1.
    mean = train.mean[0] * 255
    assert (mean < 0.1307 * 255) if name == "mnist" else (mean < 0.2860 * 255)
    x, _ = train.batch(torch.arange(12), augment=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert load_dataset(name.upper(), root=tmp_path) is train
    assert len(load_partition(name, 0, 3, root=tmp_path)[0]) == 4


def test_imagenet_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, sizes in {"n01": [(300, 260), (256, 256)], "n02": [(260, 400), (512, 300)]}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{k}.png")
    ds = load_dataset("imagenet", root=tmp_path)
    assert isinstance(ds, ImageFolderDataset) and isinstance(ds, BatchSource)
    assert len(ds) == 4 and ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 1, 1]
    x, y = ds.batch([3, 0])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == [1, 0]

    def aug(seed: int) -> torch.Tensor:
        return ds.batch([0, 1, 2, 3], augment=True, generator=torch.Generator().manual_seed(seed))[
            0
        ]

    assert torch.equal(aug(5), aug(5)) and not torch.equal(aug(5), aug(6))
    with pytest.raises(ValueError, match="2 classes"):
        load_dataset("imagenet", root=tmp_path, num_classes=1000)
    with pytest.raises(DatasetUnavailableError, match="val"):
        load_dataset("imagenet", root=tmp_path, train=False)
    assert len(load_dataset("imagenet", root=tmp_path, size=3)) == 3


def test_default_root_is_a_user_cache() -> None:
    assert DEFAULT_ROOT.is_absolute() and "flwr-splitms" in str(DEFAULT_ROOT)
