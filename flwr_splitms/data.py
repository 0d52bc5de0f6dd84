"""Datasets for split training: CIFAR-10/100, ImageNet (ImageFolder), and an offline synthetic set.

Design points (see DESIGN.md, "Data" and "The split protocol"):

* Images are held in memory as ``uint8`` tensors (ImageNet excepted) and turned into normalised
  float batches by :meth:`ImageTensorDataset.batch`. Training augmentation (random crop with
  padding + horizontal flip) is vectorised over the batch and draws *all* its randomness from an
  explicit ``torch.Generator``: the split protocol recomputes a batch's forward pass in a later
  message and must see identical pixels, so the same generator state gives the same batch.
* :func:`load_dataset` and :func:`load_partition` cache per process. A Flower ``ClientApp``
  handler runs once per message; it must not rebuild the data (or its partition) every time.
* Without internet (or without ``download``) a missing real dataset raises
  :class:`DatasetUnavailableError` with one line naming the root, the ``data-download`` flag and
  the offline ``dataset="synthetic"`` option.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "BatchSource",
    "DataSplit",
    "DatasetUnavailableError",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "clear_cache",
    "dataset_num_classes",
    "load_dataset",
    "load_partition",
    "partition",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT: Path = Path("~/.cache/flwr-splitms/data").expanduser()
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "synthetic", "imagenet")
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")

Indices = torch.Tensor | np.ndarray | Sequence[int]
Stats = tuple[float, float, float]

# Per-channel statistics used for normalisation.
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
SYNTHETIC_MEAN: Stats = (0.5, 0.5, 0.5)
SYNTHETIC_STD: Stats = (0.2, 0.2, 0.2)

CIFAR_PADDING = 4  # RandomCrop(32, padding=4), the standard CIFAR training augmentation
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224


class DatasetUnavailableError(RuntimeError):
    """A real dataset is not on disk and could not (or was not allowed to) be downloaded."""


@runtime_checkable
class BatchSource(Protocol):
    """What the split client and server need from a dataset: size, labels and batches."""

    @property
    def num_classes(self) -> int: ...

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def batch(
        self,
        indices: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------
# Batch construction: vectorised crop/flip + normalisation
# --------------------------------------------------------------------------------------------


def _as_index(indices: Indices) -> torch.Tensor:
    if isinstance(indices, torch.Tensor):
        return indices.to(dtype=torch.long, device="cpu").reshape(-1)
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1)


def _crop(
    src: torch.Tensor, which: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Per-sample crops ``src[which[n], :, oy[n]:oy[n]+h, ox[n]:ox[n]+w]``.

    Samples are grouped by offset and each group is one strided slice + index: much faster on
    CPU than a per-element gather, and exact (pure copies).
    """
    out = src.new_empty((which.shape[0], src.shape[1], h, w))
    code = oy * src.shape[-1] + ox
    for value in torch.unique(code).tolist():
        rows = (code == value).nonzero().squeeze(1)
        y0, x0 = divmod(int(value), src.shape[-1])
        out[rows] = src[:, :, y0 : y0 + h, x0 : x0 + w][which[rows]]
    return out


def _augment(
    images: torch.Tensor,
    out_hw: tuple[int, int],
    padding: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Random crop to ``out_hw`` (after zero ``padding``) + random horizontal flip.

    Randomness is drawn from ``generator`` in a fixed order (row offsets, column offsets, flips),
    so the same generator state yields the same crops and flips.
    """
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    n, _, h, w = images.shape
    oh, ow = out_hw
    oy = torch.randint(0, h - oh + 1, (n,), generator=generator)
    ox = torch.randint(0, w - ow + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = _crop(images, torch.arange(n), oy, ox, oh, ow)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _center_crop(images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - out_hw[0]) // 2, (w - out_hw[1]) // 2
    return images[..., top : top + out_hw[0], left : left + out_hw[1]]


def _normalize(images_u8: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    x = images_u8.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ImageTensorDataset:
    """An image classification set held in memory (treat the tensors as read-only).

    ``images``: uint8 ``N x C x H x W``; ``labels``: int64 ``N``. :meth:`batch` returns float32
    normalised images; with ``augment=True`` it applies random crop (zero padding
    ``padding``) and horizontal flip, drawing randomness only from ``generator``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: Stats
    std: Stats
    padding: int = CIFAR_PADDING
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError("labels must be int64 with one label per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(
        self,
        indices: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32, normalised) and labels (int64) at ``indices``."""
        idx = _as_index(indices)
        images = self.images[idx]
        if augment:
            hw = (int(images.shape[-2]), int(images.shape[-1]))
            images = _augment(images, hw, self.padding, generator)
        return _normalize(images, self.mean, self.std), self.labels[idx]


class ImageFolderDataset:
    """ImageNet-style folder (``root/<class>/<image>``), decoded on demand, never all in memory.

    Each image is resized (shorter side 256) and center-cropped to 256x256; :meth:`batch` then
    takes the 224x224 center (evaluation) or, with ``augment=True``, a random 224x224 crop and a
    random horizontal flip drawn from ``generator``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        mean: Stats = IMAGENET_MEAN,
        std: Stats = IMAGENET_STD,
        resize: int = IMAGENET_RESIZE,
        crop: int = IMAGENET_CROP,
    ) -> None:
        from torchvision.datasets import ImageFolder

        self.root = Path(root)
        self._folder = ImageFolder(str(self.root))  # scans the directory tree once
        self.classes: list[str] = list(self._folder.classes)
        self.samples: list[tuple[str, int]] = list(self._folder.samples)
        self._labels = torch.tensor([t for _, t in self.samples], dtype=torch.int64)
        self.mean, self.std, self.resize, self.crop = mean, std, resize, crop

    def select(self, indices: Indices) -> ImageFolderDataset:
        """A copy restricted to ``indices`` (same classes, no rescan of the directory)."""
        idx = _as_index(indices)
        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in idx]
        out._labels = self._labels[idx]
        return out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        img = self._folder.loader(self.samples[i][0])
        img = TF.center_crop(TF.resize(img, self.resize), [self.resize, self.resize])
        return TF.pil_to_tensor(img.convert("RGB"))

    def batch(
        self,
        indices: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode, crop (random or center) and normalise the images at ``indices``."""
        idx = _as_index(indices)
        images = torch.stack([self._decode(int(i)) for i in idx])
        hw = (self.crop, self.crop)
        images = _augment(images, hw, 0, generator) if augment else _center_crop(images, hw)
        return _normalize(images, self.mean, self.std), self._labels[idx]


@dataclass(eq=False)
class DataSplit:
    """A view of a dataset by indices (a client's partition, or its local test part)."""

    dataset: BatchSource
    indices: torch.Tensor  # int64 positions into ``dataset``

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def labels(self) -> torch.Tensor:
        return self.dataset.labels[self.indices]

    def batch(
        self,
        positions: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``positions`` (indices into :attr:`indices`, not into the dataset)."""
        idx = self.indices[_as_index(positions)]
        return self.dataset.batch(idx, augment=augment, generator=generator)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def _seed_for(*key: int) -> int:
    """A well-mixed 32-bit seed for a tuple of integers (distinct streams from one user seed)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])


def _synthetic(num_classes: int, size: int, seed: int, train: bool) -> ImageTensorDataset:
    """A learnable CIFAR-shaped (3x32x32) stand-in, deterministic from ``seed``.

    Each class has a smooth random colour pattern (its prototype, drawn from ``seed`` alone, so
    train and test share it). A sample is its class prototype, shifted by up to 8 px, mirrored
    with probability 1/2 and scaled by a random contrast, on top of a smooth random background
    (one of a bank of 1024, also shifted), plus uniform pixel noise. Train and test draw samples
    from different random streams of the same seed. 50,000 images take a few seconds.
    """
    # Shifts of up to 8 px keep it from being linearly separable (a ridge classifier on raw
    # pixels gets ~70% on 10 classes) while a small CNN reaches ~80% in a few hundred steps.
    pad, bank_size = 8, 1024
    side = 32 + 2 * pad

    def smooth(n: int, grid: int, g: torch.Generator) -> torch.Tensor:
        low = torch.randn(n, 3, grid, grid, generator=g)
        x = F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
        return x / x.std(dim=(1, 2, 3), keepdim=True)

    g = torch.Generator().manual_seed(_seed_for(seed, 0))
    protos = smooth(num_classes, 6, g)
    protos = torch.cat([protos, protos.flip(-1)])  # index c + num_classes = mirrored class c
    background = smooth(bank_size, 4, g)

    g = torch.Generator().manual_seed(_seed_for(seed, 1 if train else 2))
    labels = torch.arange(size, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(size, generator=g)]
    images = torch.empty(size, 3, 32, 32, dtype=torch.uint8)
    chunk = 8192
    for start in range(0, size, chunk):
        y = labels[start : start + chunk]
        n = y.shape[0]
        mirrored = torch.randint(0, 2, (n,), generator=g) * num_classes
        shift = torch.randint(0, 2 * pad + 1, (4, n), generator=g)
        x = _crop(protos, y + mirrored, shift[0], shift[1], 32, 32)
        x.mul_(0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))
        bg = torch.randint(0, bank_size, (n,), generator=g)
        x.add_(_crop(background, bg, shift[2], shift[3], 32, 32), alpha=0.8)
        x.add_(torch.rand(n, 3, 32, 32, generator=g).sub_(0.5), alpha=1.7)  # std ~0.5
        # 128 + 40 x, rounded: +0.5 then truncation by the uint8 cast (values are clamped >= 0)
        images[start : start + n] = x.mul_(40.0).add_(128.5).clamp_(0.0, 255.49)
    logger.info("generated %d synthetic images of %d classes (seed %d)", size, num_classes, seed)
    return ImageTensorDataset(
        images, labels, num_classes, SYNTHETIC_MEAN, SYNTHETIC_STD, name="synthetic"
    )


# --------------------------------------------------------------------------------------------
# Real datasets
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _unavailable(name: str, root: Path, download: bool, cause: BaseException | None) -> str:
    offline = 'or run offline with dataset="synthetic"'
    if name == "imagenet":
        return (
            f"imagenet not found under {root} (expected ImageFolder directories "
            f"{root / 'train'} and {root / 'val'}; it cannot be downloaded automatically): "
            f"place it there, {offline}"
        )
    if download:
        why = f": {_one_line(cause)}" if cause is not None else ""
        return (
            f"could not download {name} to {root} with download=True (run-config key "
            f"data-download){why}; fetch it into that root on a machine with internet, {offline}"
        )
    return (
        f"{name} not found (or incomplete) under {root} and download=False (run-config key "
        f"data-download); set data-download=true to fetch it, {offline}"
    )


def _load_cifar(name: str, root: Path, train: bool, download: bool) -> ImageTensorDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=download)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise DatasetUnavailableError(_unavailable(name, root, download, exc)) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    num_classes = 10 if name == "cifar10" else 100
    logger.info(
        "loaded %s (%s, %d images) from %s", name, "train" if train else "test", len(labels), root
    )
    return ImageTensorDataset(images, labels, num_classes, mean, std, name=name)


def _load_imagenet(
    root: Path, train: bool, subset_size: int | None, seed: int
) -> ImageFolderDataset:
    folder = root / ("train" if train else "val")
    if not folder.is_dir():
        raise DatasetUnavailableError(_unavailable("imagenet", root, False, None))
    try:
        ds = ImageFolderDataset(folder)
    except (OSError, RuntimeError) as exc:  # e.g. a folder with no images in it
        raise DatasetUnavailableError(_unavailable("imagenet", root, False, exc)) from exc
    logger.info("indexed %d images of %d classes under %s", len(ds), ds.num_classes, folder)
    if subset_size is not None:
        ds = ds.select(_subset(len(ds), subset_size, seed, "imagenet"))
    return ds


def _subset(n: int, size: int, seed: int, name: str) -> np.ndarray:
    if size > n:
        raise ValueError(f"size={size} exceeds the {n} samples of {name}; pass size <= {n}")
    rng = np.random.default_rng(_seed_for(seed, 3))
    return np.sort(rng.permutation(n)[:size])


# --------------------------------------------------------------------------------------------
# Per-process caches
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.RLock()


def _cached(key: Hashable, build: Callable[[], _T]) -> _T:
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        value: _T = _CACHE[key]
        return value


def clear_cache() -> None:
    """Drop every dataset and partition this process has cached."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def dataset_num_classes(name: str, num_classes: int | None = None) -> int:
    """Number of classes of ``name`` (synthetic and imagenet honour ``num_classes``)."""
    key = _check_name(name)
    fixed = {"cifar10": 10, "cifar100": 100}
    if key in fixed:
        if num_classes is not None and num_classes != fixed[key]:
            raise ValueError(f"{key} has {fixed[key]} classes, got num_classes={num_classes}")
        return fixed[key]
    if num_classes is None:
        return 10 if key == "synthetic" else 1000
    _positive_int(num_classes, "num_classes")
    return int(num_classes)


def load_dataset(
    name: str,
    root: str | Path = DEFAULT_ROOT,
    train: bool = True,
    download: bool = False,
    *,
    num_classes: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> ImageTensorDataset | ImageFolderDataset:
    """Load (once per process) a dataset as a :class:`BatchSource`.

    ``"cifar10"``/``"cifar100"``: torchvision's files under ``root`` (fetched when ``download``),
    converted once to an :class:`ImageTensorDataset`. ``"imagenet"``: an
    :class:`ImageFolderDataset` over ``root/train`` or ``root/val``. ``"synthetic"``: the offline
    stand-in, ``num_classes`` classes (default 10) and ``size`` samples (default 5000 train /
    1000 test), generated from ``seed``. For real datasets ``size`` takes a seeded random
    subset. Raises :class:`DatasetUnavailableError` when a real dataset cannot be had.
    """
    key = _check_name(name)
    n_classes = dataset_num_classes(key, num_classes)
    if size is not None:
        _positive_int(size, "size")
    if key == "synthetic":
        if n_classes < 2:
            raise ValueError(f"synthetic data needs num_classes >= 2, got {n_classes}")
        n = size if size is not None else (5000 if train else 1000)
        return _cached(
            ("dataset", key, None, bool(train), n_classes, n, int(seed)),
            lambda: _synthetic(n_classes, n, int(seed), bool(train)),
        )

    root_path = Path(root).expanduser().resolve()
    if key == "imagenet":
        ds: ImageFolderDataset = _cached(
            ("dataset", key, str(root_path), bool(train), None, size, seed if size else 0),
            lambda: _load_imagenet(root_path, bool(train), size, int(seed)),
        )
        if num_classes is not None and ds.num_classes != num_classes:
            raise ValueError(
                f"the ImageFolder at {root_path} has {ds.num_classes} classes, "
                f"got num_classes={num_classes}"
            )
        return ds

    full: ImageTensorDataset = _cached(
        ("dataset", key, str(root_path), bool(train), None, None, 0),
        lambda: _load_cifar(key, root_path, bool(train), bool(download)),
    )
    if size is None:
        return full

    def build_subset() -> ImageTensorDataset:
        idx = torch.from_numpy(_subset(len(full), size, int(seed), key))
        return ImageTensorDataset(
            full.images[idx], full.labels[idx], full.num_classes, full.mean, full.std, name=key
        )

    return _cached(
        ("dataset", key, str(root_path), bool(train), None, size, int(seed)), build_subset
    )


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def partition(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` disjoint, covering, sorted int64 arrays.

    ``"iid"``: a seeded shuffle cut into near-equal parts. ``"dirichlet"``: for every class, its
    samples are divided by proportions drawn from Dirichlet(``alpha``) (small alpha = more
    label skew); every partition gets at least one sample. Deterministic in ``seed``.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError("labels must be a 1-D array of integer class labels")
    _positive_int(num_partitions, "num_partitions")
    k, n = int(num_partitions), int(y.size)
    if k > n:
        raise ValueError(
            f"num_partitions={k} exceeds the {n} samples; use at most {n} partitions or more data"
        )
    rng = np.random.default_rng(_seed_for(seed, 4))
    scheme_key = str(scheme).strip().lower()
    if scheme_key == "iid":
        parts = np.array_split(rng.permutation(n), k)
    elif scheme_key == "dirichlet":
        if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0 (e.g. 0.5), got {alpha!r}")
        parts = _dirichlet(y, k, float(alpha), rng)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(PARTITION_SCHEMES)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per-class Dirichlet split; retries, then moves single samples, so no part is empty."""
    classes = np.unique(y)
    parts: list[list[np.ndarray]] = []
    for _ in range(20):
        parts = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * idx.size).astype(int)
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
        if all(sum(p.size for p in part) > 0 for part in parts):
            break
    out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    for j in range(k):  # last resort: give each empty part one sample of the largest part
        if out[j].size == 0:
            big = int(np.argmax([o.size for o in out]))
            out[j], out[big] = out[big][-1:], out[big][:-1]
    return out


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
) -> tuple[DataSplit, DataSplit | None]:
    """One client's training split and, if ``test_fraction > 0``, a local test split.

    The partition is :func:`partition` of the training set (cached per process); the local test
    split is a seeded random ``test_fraction`` of that partition (at least one sample), and the
    training split is the rest.
    """
    _positive_int(num_partitions, "num_partitions")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int | np.integer):
        raise ValueError(f"partition_id must be an int, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} must lie in 0..{num_partitions - 1}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    ds = load_dataset(name, root, True, download, num_classes=num_classes, size=size, seed=seed)
    root_key = None if _check_name(name) == "synthetic" else str(Path(root).expanduser().resolve())
    parts: list[np.ndarray] = _cached(
        (
            "partition",
            _check_name(name),
            root_key,
            num_classes,
            size,
            seed,
            num_partitions,
            str(scheme).strip().lower(),
            float(alpha),
        ),
        lambda: partition(ds.labels, num_partitions, scheme, alpha, seed),
    )
    own = parts[int(partition_id)]
    if test_fraction == 0.0:
        return DataSplit(ds, torch.from_numpy(own.copy())), None
    if own.size < 2:
        raise ValueError(
            f"partition {partition_id} has {own.size} sample(s), too few for a local test split; "
            "use test_fraction=0 or fewer partitions"
        )
    rng = np.random.default_rng(_seed_for(seed, 5, int(partition_id)))
    shuffled = rng.permutation(own)
    n_test = min(max(1, round(test_fraction * own.size)), own.size - 1)
    test, train = np.sort(shuffled[:n_test]), np.sort(shuffled[n_test:])
    return DataSplit(ds, torch.from_numpy(train)), DataSplit(ds, torch.from_numpy(test))
