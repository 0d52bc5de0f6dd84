"""Datasets and client partitions by name, cached per process and on disk.

:func:`load_dataset` and :func:`load_partition` cache per process: a Flower ``ClientApp``
handler runs once per message and must not rebuild the data (or its partition) every time. In a
deployment every message starts a fresh process, so :func:`load_partition` also keeps each
node's partition (its images, labels and indices) in memory-mapped files under
``<root>/.cache/`` (see :mod:`flwr_splitms.data.disk_cache`), as :func:`load_dataset` does for
the synthetic set: a fresh process reads its partition instead of rebuilding the dataset.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import digits, sources
from .disk_cache import entry_path, read_entry, write_entry
from .images import DataSplit, ImageFolderDataset, ImageTensorDataset
from .partition import check_scheme, partition, positive_int
from .synthetic import SYNTHETIC_VERSION, generate_synthetic, seed_for, synthetic_labels

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "MAX_CACHED_PARTITIONS",
    "clear_cache",
    "dataset_num_classes",
    "load_dataset",
    "load_labels",
    "load_partition",
]

DEFAULT_ROOT: Path = Path("~/.cache/flwr-splitms/data").expanduser()
DATASETS: tuple[str, ...] = (
    "cifar10",
    "cifar100",
    "mnist",
    "fashion-mnist",
    "synthetic",
    "imagenet",
    "digits",
)
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
_FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10, "digits": 10}
SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE = 5000, 1000

# --------------------------------------------------------------------------------------------
# Per-process cache
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.RLock()
MAX_CACHED_PARTITIONS = 256
"""Client partitions one process keeps in memory (least recently used dropped first; a dropped
partition is read again from the disk cache, memory-mapped)."""
_PARTITIONS: OrderedDict[Hashable, Any] = OrderedDict()


def _cached(key: Hashable, build: Callable[[], _T]) -> _T:
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        value: _T = _CACHE[key]
        return value


def _cached_partition(key: Hashable, build: Callable[[], _T]) -> _T:
    """Like :func:`_cached`, bounded by :data:`MAX_CACHED_PARTITIONS` entries."""
    with _CACHE_LOCK:
        if key in _PARTITIONS:
            _PARTITIONS.move_to_end(key)
        else:
            _PARTITIONS[key] = build()
            while len(_PARTITIONS) > max(MAX_CACHED_PARTITIONS, 1):
                _PARTITIONS.popitem(last=False)
        value: _T = _PARTITIONS[key]
        return value


def clear_cache() -> None:
    """Drop every dataset and partition this process has cached (the disk cache stays)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _PARTITIONS.clear()


# --------------------------------------------------------------------------------------------
# Names and classes
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def dataset_num_classes(name: str, num_classes: int | None = None) -> int:
    """Number of classes of ``name`` (synthetic and imagenet honour ``num_classes``)."""
    key = _check_name(name)
    if key in _FIXED_CLASSES:
        fixed = _FIXED_CLASSES[key]
        if num_classes is not None and num_classes != fixed:
            raise ValueError(f"{key} has {fixed} classes, got num_classes={num_classes}")
        return fixed
    if num_classes is None:
        return 10 if key == "synthetic" else 1000
    positive_int(num_classes, "num_classes")
    return int(num_classes)


# --------------------------------------------------------------------------------------------
# Disk cache of in-memory image sets
# --------------------------------------------------------------------------------------------


def _to_entry(ds: ImageTensorDataset, **extra: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {"images": ds.images.numpy(), "labels": ds.labels.numpy(), **extra}
    attrs = {
        "num_classes": ds.num_classes,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "padding": ds.padding,
        "name": ds.name,
        "flip": ds.flip,
    }
    return arrays, attrs


def _from_entry(arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> ImageTensorDataset:
    mean, std = tuple(attrs["mean"]), tuple(attrs["std"])
    return ImageTensorDataset(
        torch.from_numpy(arrays["images"]),
        torch.from_numpy(arrays["labels"]),
        int(attrs["num_classes"]),
        mean,
        std,
        padding=int(attrs["padding"]),
        name=str(attrs["name"]),
        flip=bool(attrs["flip"]),
    )


def _synthetic(
    root: Path, num_classes: int, size: int, seed: int, train: bool, use_disk: bool
) -> ImageTensorDataset:
    """The synthetic set, read from the disk cache when an earlier process generated it."""
    key = {
        "dataset": "synthetic",
        "version": SYNTHETIC_VERSION,
        "num_classes": num_classes,
        "size": size,
        "seed": seed,
        "train": train,
    }
    path = entry_path(root, "synthetic", key)
    if use_disk and (entry := read_entry(path, key)) is not None:
        return _from_entry(*entry)
    ds = generate_synthetic(num_classes, size, seed, train)
    if use_disk:
        write_entry(path, key, *_to_entry(ds))
    return ds


def _data_version(key: str, root: Path) -> str | None:
    """What the disk cache keys a dataset's content on; None when it cannot be known yet."""
    if key == "synthetic":
        return f"generator-{SYNTHETIC_VERSION}"
    if key in sources.RAW_FOLDERS:
        return sources.raw_fingerprint(key, root)
    if key == "digits":
        return digits.digits_version()
    return None  # imagenet: decoded on demand, nothing worth caching


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | Path = DEFAULT_ROOT,
    train: bool = True,
    download: bool = False,
    *,
    num_classes: int | None = None,
    size: int | None = None,
    seed: int = 0,
    disk_cache: bool = True,
) -> ImageTensorDataset | ImageFolderDataset:
    """Load (once per process) a dataset as a :class:`BatchSource`.

    ``"cifar10"``/``"cifar100"``: torchvision's files under ``root`` (fetched when ``download``),
    converted once to an :class:`ImageTensorDataset`. ``"mnist"``/``"fashion-mnist"``: likewise,
    each 28x28 gray image zero-padded to 32x32 and copied to 3 channels (see
    :func:`.sources.load_digits`). ``"digits"``: scikit-learn's 8x8 handwritten digits, read
    from its wheel (no download, ``root`` unused), upsampled to 3x32x32, a fixed 1,497 / 300
    train/test split (see :mod:`.digits`). ``"imagenet"``: an :class:`ImageFolderDataset` over
    ``root/train`` or ``root/val``. ``"synthetic"``: the offline stand-in, ``num_classes``
    classes (default 10) and ``size`` samples (default 5000 train / 1000 test), generated from
    ``seed`` and, with ``disk_cache``, kept under ``root/.cache`` for the next process. For real
    datasets ``size`` takes a seeded random subset. Raises :class:`DatasetUnavailableError`
    when a real dataset cannot be had.
    """
    key = _check_name(name)
    n_classes = dataset_num_classes(key, num_classes)
    if size is not None:
        positive_int(size, "size")
    root_path = Path(root).expanduser().resolve()
    if key == "synthetic":
        if n_classes < 2:
            raise ValueError(f"synthetic data needs num_classes >= 2, got {n_classes}")
        n = size if size is not None else (SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE)
        return _cached(
            ("dataset", key, None, bool(train), n_classes, n, int(seed)),
            lambda: _synthetic(root_path, n_classes, n, int(seed), bool(train), disk_cache),
        )

    if key == "imagenet":
        ds: ImageFolderDataset = _cached(
            ("dataset", key, str(root_path), bool(train), None, size, seed if size else 0),
            lambda: sources.load_imagenet(root_path, bool(train), size, int(seed)),
        )
        if num_classes is not None and ds.num_classes != num_classes:
            raise ValueError(
                f"the ImageFolder at {root_path} has {ds.num_classes} classes, "
                f"got num_classes={num_classes}"
            )
        return ds

    if key == "digits":  # inside scikit-learn's wheel: no root, no download
        full: ImageTensorDataset = _cached(
            ("dataset", key, None, bool(train), None, None, 0),
            lambda: digits.load_sklearn_digits(bool(train)),
        )
    else:
        loader = sources.load_cifar if key.startswith("cifar") else sources.load_digits
        full = _cached(
            ("dataset", key, str(root_path), bool(train), None, None, 0),
            lambda: loader(key, root_path, bool(train), bool(download)),
        )
    if size is None:
        return full

    def build_subset() -> ImageTensorDataset:
        return full.select(sources.subset(len(full), size, int(seed), key))

    return _cached(
        ("dataset", key, str(root_path), bool(train), None, size, int(seed)), build_subset
    )


def load_labels(
    name: str,
    root: str | Path = DEFAULT_ROOT,
    train: bool = True,
    download: bool = False,
    *,
    num_classes: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The labels of :func:`load_dataset`'s set, as :func:`partition` needs them.

    The synthetic set's labels are drawn without its images (a ServerApp that only counts
    partition sizes holds no image); other sets are loaded as :func:`load_dataset` does.
    """
    key = _check_name(name)
    if key == "synthetic":
        n_classes = dataset_num_classes(key, num_classes)
        if n_classes < 2:
            raise ValueError(f"synthetic data needs num_classes >= 2, got {n_classes}")
        if size is not None:
            positive_int(size, "size")
        n = size if size is not None else (SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE)
        return synthetic_labels(n_classes, n, int(seed), bool(train))
    ds = load_dataset(
        key, root, train, download, num_classes=num_classes, size=size, seed=seed
    )  # fmt: skip
    return ds.labels


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    root: str | Path = DEFAULT_ROOT,
    download: bool = False,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.0,
    num_classes: int | None = None,
    size: int | None = None,
    disk_cache: bool = True,
) -> tuple[DataSplit, DataSplit | None]:
    """One client's training split and, if ``test_fraction > 0``, a local test split.

    The partition is :func:`partition` of the training set; the local test split is a seeded
    random ``test_fraction`` of it (at least one sample), and the training split is the rest.
    Both splits view one per-partition dataset holding only this client's samples
    (``DataSplit.dataset_indices`` are their positions in the full training set).

    Cached per process and, with ``disk_cache`` (all but imagenet), on disk under
    ``root/.cache``: keyed by dataset, its version (generator version, the files' sizes and
    times, or scikit-learn's version), ``size``, ``num_classes``, ``seed``, scheme, ``alpha``,
    partition id and count, written once atomically and memory-mapped by every later process.
    """
    positive_int(num_partitions, "num_partitions")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int | np.integer):
        raise ValueError(f"partition_id must be an int, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} must lie in 0..{num_partitions - 1}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    key = _check_name(name)
    n_classes = dataset_num_classes(key, num_classes)
    if size is not None:
        positive_int(size, "size")
    scheme_key = check_scheme(scheme, alpha)
    alpha_key = float(alpha) if scheme_key == "dirichlet" else None
    pid, k = int(partition_id), int(num_partitions)
    root_path = Path(root).expanduser().resolve()
    root_key = None if key == "synthetic" else str(root_path)

    def full() -> ImageTensorDataset | ImageFolderDataset:
        return load_dataset(
            key, root, True, download, num_classes=num_classes, size=size, seed=seed,
            disk_cache=disk_cache,
        )  # fmt: skip

    def own_indices() -> np.ndarray:
        ds = full()
        parts: list[np.ndarray] = _cached(
            ("partition", key, root_key, n_classes, size, seed, k, scheme_key, alpha_key),
            lambda: partition(ds.labels, k, scheme_key, alpha, seed),
        )
        return parts[pid]

    def build() -> tuple[ImageTensorDataset | ImageFolderDataset, np.ndarray]:
        use_disk = disk_cache and key != "imagenet"
        entry_key: dict[str, Any] = {
            "dataset": key,
            "size": SYNTHETIC_TRAIN_SIZE if size is None and key == "synthetic" else size,
            "num_classes": n_classes,
            "seed": int(seed),
            "scheme": scheme_key,
            "alpha": alpha_key,
            "partition_id": pid,
            "num_partitions": k,
        }
        version = _data_version(key, root_path) if use_disk else None
        if version is not None:
            entry_key["version"] = version
            entry = read_entry(entry_path(root_path, "partition", entry_key), entry_key)
            if entry is not None:
                arrays, attrs = entry
                return _from_entry(arrays, attrs), np.asarray(arrays["indices"])
        own = own_indices()
        ds = full().select(own)
        if use_disk and isinstance(ds, ImageTensorDataset):
            entry_key["version"] = version or _data_version(key, root_path)  # after a download
            if entry_key["version"] is not None:
                arrays, attrs = _to_entry(ds, indices=own)
                path = entry_path(root_path, "partition", entry_key)
                write_entry(path, entry_key, arrays, attrs)
        return ds, own

    dataset, own = _cached_partition(
        ("partition-data", key, root_key, n_classes, size, seed, k, scheme_key, alpha_key, pid),
        build,
    )
    every = torch.arange(len(own))
    if test_fraction == 0.0:
        return DataSplit(dataset, every, torch.from_numpy(own.copy())), None
    if own.size < 2:
        raise ValueError(
            f"partition {partition_id} has {own.size} sample(s), too few for a local test split; "
            "use test_fraction=0 or fewer partitions"
        )
    rng = np.random.default_rng(seed_for(seed, 5, pid))
    order = rng.permutation(own.size)  # positions in ``own`` (sorted global indices)
    n_test = min(max(1, round(test_fraction * own.size)), own.size - 1)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return (
        DataSplit(dataset, torch.from_numpy(train), torch.from_numpy(own[train].copy())),
        DataSplit(dataset, torch.from_numpy(test), torch.from_numpy(own[test].copy())),
    )
