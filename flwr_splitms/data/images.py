"""In-memory image sets, the ImageFolder reader, index views, and their batch construction.

Training augmentation (random crop with zero padding + horizontal flip) is vectorised over the
batch and draws *all* its randomness from an explicit ``torch.Generator``: the split protocol
recomputes a batch's forward pass in a later message and must see identical pixels, so the same
generator state gives the same batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BatchSource",
    "DataSplit",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "Indices",
    "Stats",
]

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


@runtime_checkable
class BatchSource(Protocol):
    """What the split client and server need from a dataset: size, labels and batches.

    ``batch(indices, augment=..., generator=...)`` must return the same tensors whenever it is
    called again with the same indices and a generator in the same state: the client recomputes
    a batch's forward pass in a later message.
    """

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


def as_index(indices: Indices) -> torch.Tensor:
    """``indices`` as a 1-D int64 CPU tensor."""
    if isinstance(indices, torch.Tensor):
        return indices.to(dtype=torch.long, device="cpu").reshape(-1)
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1)


def crop(
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


def augment_images(
    images: torch.Tensor,
    out_hw: tuple[int, int],
    padding: int,
    generator: torch.Generator | None,
    flip: bool = True,
) -> torch.Tensor:
    """Random crop to ``out_hw`` (after zero ``padding``) + random horizontal flip (if ``flip``).

    Randomness is drawn from ``generator`` in a fixed order (row offsets, column offsets, flips),
    so the same generator state yields the same crops and flips.
    """
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    n, _, h, w = images.shape
    oh, ow = out_hw
    oy = torch.randint(0, h - oh + 1, (n,), generator=generator)
    ox = torch.randint(0, w - ow + 1, (n,), generator=generator)
    out = crop(images, torch.arange(n), oy, ox, oh, ow)
    if not flip:
        return out
    flips = torch.rand(n, generator=generator) < 0.5
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


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
    ``padding``) and, if ``flip``, horizontal flip, drawing randomness only from ``generator``.
    The tensors may be backed by memory-mapped files (the disk cache of :func:`load_partition`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: Stats
    std: Stats
    padding: int = CIFAR_PADDING
    name: str = ""
    flip: bool = True

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

    def select(self, indices: Indices) -> ImageTensorDataset:
        """A copy holding only the samples at ``indices`` (same statistics and augmentation)."""
        idx = as_index(indices)
        return replace(self, images=self.images[idx], labels=self.labels[idx])

    def batch(
        self,
        indices: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32, normalised) and labels (int64) at ``indices``."""
        idx = as_index(indices)
        images = self.images[idx]
        if augment:
            hw = (int(images.shape[-2]), int(images.shape[-1]))
            images = augment_images(images, hw, self.padding, generator, self.flip)
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
        idx = as_index(indices)
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
        idx = as_index(indices)
        images = torch.stack([self._decode(int(i)) for i in idx])
        hw = (self.crop, self.crop)
        images = augment_images(images, hw, 0, generator) if augment else _center_crop(images, hw)
        return _normalize(images, self.mean, self.std), self._labels[idx]


@dataclass(eq=False)
class DataSplit:
    """A view of a dataset by indices (a client's partition, or its local test part).

    ``dataset_indices``, when known, are the samples' positions in the full dataset the split
    was cut from (``load_partition`` hands out a per-partition ``dataset``, so ``indices`` are
    positions in that, not in the full set).
    """

    dataset: BatchSource
    indices: torch.Tensor  # int64 positions into ``dataset``
    dataset_indices: torch.Tensor | None = None

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
        idx = self.indices[as_index(positions)]
        return self.dataset.batch(idx, augment=augment, generator=generator)
