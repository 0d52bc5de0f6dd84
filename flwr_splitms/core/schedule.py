"""Schedules: the learning rate of a round and of a step, and how a round's steps form messages.

The learning-rate rule: ``lr`` is the rate at a reference batch of :data:`LR_REFERENCE_BATCH`
examples (the paper's 0.1 at 64) and scales with the square root of the batch size
(``lr-scaling="sqrt"``, the default: Krizhevsky, 2014; Hoffer et al., 2017, keeping the gradient
noise's scale), and the first ``warmup-steps`` steps of a run ramp up to it linearly.
``"linear"`` scales with the batch size itself (Goyal et al., 2017, "Accurate, Large Minibatch
SGD"): the same rate at batch 64, a smaller one below it (too small to learn in a short run at
batch 8) and a larger one above. The server model's output layer trains
at ``head-lr-scale`` (0.1) times that rate (applied by the server half's optimizer): at the
full rate ResNet18's loss first climbs far above its start, at batch 8 and at 64 alike (the
output layer's updates push every input's logits towards the current batch's classes).
``lr-scaling="none"`` with ``warmup-steps=0`` and ``head-lr-scale=1`` is the paper's exact
setting (lr 0.1 at batch 64); its evaluation also used PyTorch's running BatchNorm statistics
(``reestimate-bn=false``, :mod:`~flwr_splitms.core.norm_stats`).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "step")
LR_SCALINGS = ("linear", "sqrt", "none")
LR_REFERENCE_BATCH = 64
"""Batch size at which ``lr`` is taken as given (the paper's batch)."""


def scaled_lr(lr: float, batch_size: int, scaling: str) -> float:
    """``lr`` for ``batch_size`` examples per client and step under the rule ``scaling``."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"unknown lr scaling {scaling!r}; choose one of {LR_SCALINGS}")
    if scaling == "sqrt":  # Krizhevsky (2014), Hoffer et al. (2017): the gradient noise's scale
        return lr * math.sqrt(batch_size / LR_REFERENCE_BATCH)
    if scaling == "linear":  # Goyal et al. (2017)
        return lr * batch_size / LR_REFERENCE_BATCH
    return lr


def describe_lr(lr: float, batch_size: int, scaling: str) -> str:
    """The rate a run trains at, in words (the strategy's start-up log, the config check)."""
    if scaling == "none":
        return f'lr {lr:g} as given (lr-scaling="none")'
    rate = scaled_lr(lr, batch_size, scaling)
    return (
        f"lr {lr:g} is the rate at batch {LR_REFERENCE_BATCH}: {rate:.4g} at batch-size "
        f'{batch_size} (lr-scaling="{scaling}")'
    )


def warmup_factor(global_step: int, warmup_steps: int) -> float:
    """Share of the round's rate used at the run's ``global_step`` (0-based): a linear ramp."""
    if warmup_steps <= 0 or global_step >= warmup_steps:
        return 1.0
    return (global_step + 1) / warmup_steps


def lr_at_round(base_lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """Learning rate of a round: constant, cosine from ``base_lr`` to 0, or x0.1 at 50% and 75%."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    progress = (server_round - 1) / max(num_rounds, 1)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return base_lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    return base_lr


def first_block(steps_per_round: int, steps_per_message: int) -> int:
    """Batches the round-start message asks for.

    When the round length is set (``steps_per_round`` > 0) the first message already carries a
    full block; when it is one local epoch, the server learns the partition sizes from the first
    reply, so that reply carries one batch.
    """
    return min(steps_per_message, steps_per_round) if steps_per_round > 0 else 1


def plan_blocks(steps: int, steps_per_message: int, first: int) -> list[int]:
    """Sizes of the message blocks of a round of ``steps`` steps: ``first``, then K at a time.

    ``steps_per_message`` = K = 1 is the exact SplitFed algorithm (one round trip per step).
    """
    if steps < 1 or steps_per_message < 1 or first < 1:
        raise ValueError(
            f"steps ({steps}), steps-per-message ({steps_per_message}) and the first block "
            f"({first}) must all be >= 1"
        )
    blocks = [min(first, steps)]
    while sum(blocks) < steps:
        blocks.append(min(steps_per_message, steps - sum(blocks)))
    return blocks
