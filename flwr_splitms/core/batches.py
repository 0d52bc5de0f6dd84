"""Which examples a client's batch holds and which random draws it uses.

Derived from (seed, client, epoch, round, step) so that a batch recomputed in a later message, in
another process, or in the local engine sees the same examples, pixels and codec draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from flwr_splitms.seeding import derive_seed, generator


class BatchKey(NamedTuple):
    """Which batch a pending step is: where it starts in the data order, and its round and step."""

    epoch: int
    position: int
    server_round: int
    step: int


class DataCursor(NamedTuple):
    """Where a client's data order stands between rounds, and how many SGD steps it has taken."""

    epoch: int
    position: int
    updates: int


def take_batch(
    size: int, batch_size: int, epoch: int, position: int, client_id: int = 0
) -> tuple[int, int]:
    """Where the next full batch starts: (epoch, position); a short epoch tail is dropped."""
    if size < batch_size:
        raise ValueError(
            f"client {client_id} holds {size} training examples, fewer than batch-size "
            f"{batch_size}; lower batch-size or use fewer partitions"
        )
    if position + batch_size > size:
        return epoch + 1, 0
    return epoch, position


def batch_positions(
    size: int, batch_size: int, seed: int, client_id: int, epoch: int, position: int
) -> torch.Tensor:
    """Positions of a batch in the client's data: a per-(seed, client, epoch) shuffle."""
    order = torch.randperm(size, generator=generator(seed, "order", client_id, epoch))
    return order[position : position + batch_size]


def augment_generator(seed: int, client_id: int, server_round: int, step: int) -> torch.Generator:
    """Draws of a batch's augmentation, the same when the batch is recomputed."""
    return generator(seed, "augment", client_id, server_round, step)


def codec_generator(seed: int, client_id: int, server_round: int, step: int) -> torch.Generator:
    """Draws of a randomized codec (RT) for one batch."""
    return generator(seed, "codec", client_id, server_round, step)


def grad_codec_generator(
    seed: int, client_id: int, server_round: int, step: int
) -> torch.Generator:
    """Draws of a randomized downlink codec for one client's gradient of one step."""
    return generator(seed, "grad-codec", client_id, server_round, step)


@contextlib.contextmanager
def replayed_rng(device: torch.device, *parts: int | str) -> Iterator[None]:
    """Run the body with torch's global RNG (and ``device``'s, for CUDA) seeded from ``parts``.

    Dropout draws from the global RNG; seeding it per batch makes a recomputed forward pass draw
    the same masks. The previous RNG state is restored afterwards.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(*parts))
        yield
