"""A :class:`BatchSource` over any map-style ``torch.utils.data.Dataset`` of ``(input, label)``.

The split protocol recomputes a batch's forward pass in a later message and must see the same
inputs. torchvision's transforms (v1 and v2) draw their randomness from torch's global RNG, and
user code often draws from Python's ``random`` or NumPy's global RNG. So a batch is built with
all three global RNGs seeded from the caller's generator, and their previous states are put back
afterwards: the same generator state replays the same random crops and flips, and the caller's
global RNG streams are left as they were.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, default_collate

from .images import Indices, as_index

__all__ = ["TorchDatasetSource", "from_torch_dataset", "replayable_rng"]

_RNG_LOCK = threading.RLock()
_UNSEEDED = 0  # seed of the draws of a batch asked for without a generator (evaluation)


@contextlib.contextmanager
def replayable_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU, Python's and NumPy's global RNGs with ``seed``; restore them after.

    Only the CPU generator of torch is touched (CUDA generators are neither seeded nor read).
    Held under a lock so two threads of one process do not interleave their draws.
    """
    with _RNG_LOCK:
        torch_state = torch.get_rng_state()
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        try:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            yield
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _as_label(value: Any, position: int) -> int:
    if isinstance(value, torch.Tensor | np.ndarray) and math.prod(value.shape) == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"sample {position} has label {value!r} ({type(value).__name__}); "
            "from_torch_dataset needs integer class ids 0..num_classes-1"
        )
    return int(value)


def _stored_labels(dataset: Any) -> torch.Tensor | None:
    """Labels a dataset keeps beside its samples (``targets``/``labels``), without transforms.

    ``Subset``s are followed to their base dataset. Ignored when a ``target_transform`` would
    change the labels ``__getitem__`` returns, or when the attribute is not one integer label
    per sample.
    """
    if isinstance(dataset, Subset):
        base = _stored_labels(dataset.dataset)
        return None if base is None else base[as_index(dataset.indices)]
    if getattr(dataset, "target_transform", None) is not None:
        return None
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is None or callable(values):
            continue
        try:
            labels = torch.as_tensor(np.asarray(values))
        except (TypeError, ValueError, RuntimeError):
            continue
        if (
            labels.dim() == 1
            and labels.shape[0] == len(dataset)
            and not labels.is_floating_point()
            and labels.dtype != torch.bool
            and not labels.is_complex()
        ):
            return labels.to(torch.int64)
    return None


class TorchDatasetSource:
    """A :class:`BatchSource` view of a map-style ``Dataset`` (see :func:`from_torch_dataset`)."""

    def __init__(self, dataset: Dataset[Any], *, num_classes: int | None = None) -> None:
        if isinstance(dataset, IterableDataset) or not (
            isinstance(dataset, Sized) and hasattr(dataset, "__getitem__")
        ):
            raise TypeError(
                f"{type(dataset).__name__} is not a map-style Dataset (it needs __len__ and "
                "__getitem__); wrap an iterable dataset's samples in a list-backed Dataset first"
            )
        if len(dataset) == 0:
            raise ValueError("the dataset is empty; from_torch_dataset needs at least one sample")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.dataset = dataset
        self._num_classes = num_classes
        self._labels = _stored_labels(dataset)
        if self._labels is not None:
            self._check_labels(self._labels)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> torch.Tensor:
        """One int64 label per sample: the dataset's ``targets``/``labels`` when it keeps them,
        else read once through ``__getitem__`` (transforms run under a fixed seed) and cached."""
        if self._labels is None:
            with replayable_rng(_UNSEEDED):
                read = [_as_label(self._item(i)[1], i) for i in range(len(self))]
            labels = torch.tensor(read, dtype=torch.int64)
            self._check_labels(labels)
            self._labels = labels
        return self._labels

    @property
    def num_classes(self) -> int:
        """``num_classes`` as given, else one more than the largest label."""
        if self._num_classes is None:
            self._num_classes = int(self.labels.max()) + 1
        return self._num_classes

    def _check_labels(self, labels: torch.Tensor) -> None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise ValueError(f"labels must be class ids >= 0, the dataset has label {low}")
        if self._num_classes is not None and high >= self._num_classes:
            raise ValueError(
                f"the dataset has label {high} but num_classes={self._num_classes}; "
                f"pass num_classes >= {high + 1} (or None to infer it)"
            )

    def _item(self, i: int) -> tuple[Any, Any]:
        item = self.dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(
                f"sample {i} is a {type(item).__name__}, not an (input, label) pair; "
                "from_torch_dataset needs a Dataset whose __getitem__ returns (input, label)"
            )
        return item[0], item[1]

    def batch(
        self,
        indices: Indices,
        *,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (``default_collate`` of the samples) and int64 labels at ``indices``.

        The dataset's transforms run with the global RNGs seeded from one draw of ``generator``
        (a fixed seed when it is None). ``augment`` is not used: the Dataset's own transform
        decides, so evaluate on a Dataset whose transform is deterministic.
        """
        del augment  # the Dataset's transform decides
        idx = as_index(indices).tolist()
        if generator is None:
            seed = _UNSEEDED
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with replayable_rng(seed):
            items = [self._item(int(i)) for i in idx]
        try:
            inputs = default_collate([x for x, _ in items])
        except (TypeError, RuntimeError) as exc:
            raise TypeError(_not_a_tensor(items, exc)) from exc
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(_not_a_tensor(items, None))
        labels = torch.tensor(
            [_as_label(y, i) for (_, y), i in zip(items, idx, strict=True)], dtype=torch.int64
        )
        return inputs, labels


def _not_a_tensor(items: list[tuple[Any, Any]], cause: BaseException | None) -> str:
    kind = type(items[0][0]).__name__ if items else "nothing"
    why = f" ({' '.join(str(cause).split())})" if cause is not None else ""
    return (
        f"the dataset's inputs ({kind}) do not collate into one tensor{why}; give it a "
        "transform that returns equally shaped tensors (e.g. transforms.ToTensor() for images)"
    )


def from_torch_dataset(
    dataset: Dataset[Any], *, num_classes: int | None = None
) -> TorchDatasetSource:
    """Adapt a map-style ``Dataset`` of ``(input, label)`` pairs to a :class:`BatchSource`.

    * Batches are ``torch.utils.data.default_collate`` of the samples: images, feature vectors,
      token sequences, anything that collates into one tensor.
    * Random transforms replay: the same indices with a generator in the same state give the
      same batch (torch's, Python's and NumPy's global RNGs are seeded from the generator while
      the samples are read, and restored afterwards), as the split protocol requires.
    * Labels (integer class ids) come from the dataset's ``targets``/``labels`` when it has them
      (no transform runs), else from one pass of ``__getitem__``, cached.
    * ``num_classes`` defaults to one more than the largest label.

    >>> source = from_torch_dataset(CIFAR10(root, transform=T.Compose([T.RandomCrop(32, 4),
    ...     T.RandomHorizontalFlip(), T.ToTensor()])))  # doctest: +SKIP
    """
    return TorchDatasetSource(dataset, num_classes=num_classes)
