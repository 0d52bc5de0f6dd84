"""One SplitFed round and the run around it, written once for both engines.

:class:`SplitRun` holds what lives across rounds on the server: the server half, the round plan,
the history rows, each client's data cursor, the sampling RNG and the divergence guard, and it
saves and restores them as a :class:`~flwr_splitms.checkpoint.RunState`. :meth:`SplitRun.round`
is the round loop: round start, one server block per message, round end. An engine plugs in
how it reaches its clients (:class:`RoundClients`): the local engine calls the client halves
directly (``flwr_splitms.local``), the Flower adapter exchanges messages
(``flwr_splitms.remote_clients``). Aggregation of the returned client weights stays with the
engine (FedAvg, or any Flower strategy).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd
import torch

from flwr_splitms.checkpoint import RunState
from flwr_splitms.codecs import get_codec
from flwr_splitms.core.accounting import RoundAccumulator, StepProgress, log_round
from flwr_splitms.core.batches import DataCursor
from flwr_splitms.core.budget import (
    DOWNLINK,
    BudgetError,
    CodecChoice,
    Decision,
    decide,
    measure,
)
from flwr_splitms.core.divergence import DivergenceGuard
from flwr_splitms.core.link import Link, link_for
from flwr_splitms.core.schedule import (
    LR_SCHEDULES,
    first_block,
    lr_at_round,
    plan_blocks,
    scaled_lr,
)
from flwr_splitms.core.server_half import ClientUpload, SplitServerCore
from flwr_splitms.core.settings import StepSettings

log = logging.getLogger("flwr")
BUDGET = "budget"  # the codec name of the byte-budget policy

NodeT = TypeVar("NodeT", bound=Hashable)
ReplyT = TypeVar("ReplyT")


@dataclass(frozen=True)
class RoundPlan:
    """The settings that shape every round of a run (one source for both engines).

    ``lr`` is the rate at a batch of 64 under ``lr_scaling`` ``"sqrt"`` or ``"linear"`` (see
    :mod:`flwr_splitms.core.schedule`); the rest are the run-config keys of the same names.
    """

    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    lr_scaling: str
    warmup_steps: int
    head_lr_scale: float
    reestimate_bn: bool
    batch_size: int
    steps_per_round: int
    steps_per_message: int
    augment: bool
    seed: int
    codec_name: str
    codec_params: Mapping[str, Any]
    grad_codec_name: str
    grad_codec_params: Mapping[str, Any]
    error_every: int
    eval_batch_size: int
    budget_bits: float = 0.0  # codec = "budget": bits per activation element, headers included
    budget_every: int = 1  # rounds between two choices of the codec within the budget
    budget_sample: int = 4  # rows of a batch each client measures the candidates on
    grad_budget_bits: float = 0.0  # the same for the gradients sent back (0 = grad_codec as set)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}"
            )
        scaled_lr(self.lr, self.batch_size, self.lr_scaling)  # an unknown lr_scaling fails here
        for name, low in (
            ("batch_size", 1),
            ("steps_per_round", 0),
            ("steps_per_message", 1),
            ("error_every", 1),
            ("warmup_steps", 0),
            ("eval_batch_size", 1),
            ("budget_every", 1),
            ("budget_sample", 1),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Any) -> RoundPlan:
        """The plan of a :class:`~flwr_splitms.config.SplitConfig`."""
        return cls.from_keywords({key: getattr(config, key) for key in _KEYWORDS.values()})

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> RoundPlan:
        """The plan of settings named as run-config attributes (``codec``, ``grad_codec``...)."""
        return cls(**{f: keywords[_KEYWORDS.get(f, f)] for f in cls.__dataclass_fields__})

    def check_codecs(self) -> None:
        """Fail now, naming the problem, on a codec of either direction that cannot be built."""
        settings = self.settings(0)
        link_for(replace(settings, codec_name="none") if self.codec_name == BUDGET else settings)

    def round_lr(self, server_round: int, num_rounds: int) -> float:
        """The round's rate: batch scaling, then the schedule over ``num_rounds``."""
        base = scaled_lr(self.lr, self.batch_size, self.lr_scaling)
        return lr_at_round(base, self.lr_schedule, server_round, num_rounds)

    def settings(
        self, server_round: int, num_rounds: int = 1, *, step_offset: int = 0, train: bool = True
    ) -> StepSettings:
        """What the clients are told for a round (inference settings with ``train=False``)."""
        if self.codec_name == BUDGET and not self.budget_bits:
            raise BudgetError('codec="budget" needs budget-bits, the bits per element it may send')
        return StepSettings(
            server_round=server_round,
            lr=self.round_lr(server_round, num_rounds) if train else 0.0,
            momentum=self.momentum if train else 0.0,
            weight_decay=self.weight_decay if train else 0.0,
            batch_size=self.batch_size if train else self.eval_batch_size,
            seed=self.seed,
            augment=self.augment and train,
            codec_name=self.codec_name,
            codec_params=dict(self.codec_params),
            grad_codec_name=self.grad_codec_name,
            grad_codec_params=dict(self.grad_codec_params),
            error_every=self.error_every,
            warmup_steps=self.warmup_steps if train else 0,
            step_offset=step_offset,
            reestimate_bn=self.reestimate_bn and train,
        )


_KEYWORDS = {  # RoundPlan field -> run-config attribute, where the names differ
    "codec_name": "codec",
    "grad_codec_name": "grad_codec",
}
_KEYWORDS.update({f: f for f in RoundPlan.__dataclass_fields__ if f not in _KEYWORDS})


@dataclass
class ClientEnd(Generic[ReplyT]):
    """A client's answer to the round end: its data cursor and what the engine aggregates."""

    client_id: int
    num_examples: int
    cursor: DataCursor | None
    reply: ReplyT


class RoundClients(Protocol[NodeT, ReplyT]):
    """The sampled clients of one round, as an engine reaches them.

    Each call returns only the clients that answered usably; an engine records every client it
    loses in ``acc`` (:meth:`RoundAccumulator.drop`), with its client and message seconds.
    """

    def probe(
        self, settings: StepSettings, budget_bits: float, sample: int, acc: RoundAccumulator
    ) -> list[Any]:
        """codec = "budget": each client's measurements of the candidates on its first batch."""
        ...

    def begin(
        self, settings: StepSettings, count: int, acc: RoundAccumulator
    ) -> tuple[dict[NodeT, ClientUpload], dict[NodeT, int]]:
        """Round start: the first ``count`` batches' uploads, and each client's example count."""
        ...

    def step(
        self,
        settings: StepSettings,
        gradients: Mapping[NodeT, Sequence[bytes]],
        step: int,
        count: int,
        acc: RoundAccumulator,
    ) -> dict[NodeT, ClientUpload]:
        """Apply the pending block's gradients, upload the ``count`` batches from ``step``."""
        ...

    def end(
        self,
        settings: StepSettings,
        gradients: Mapping[NodeT, Sequence[bytes]],
        step: int,
        acc: RoundAccumulator,
    ) -> dict[NodeT, ClientEnd[ReplyT]]:
        """Round end after ``step`` steps: the last gradients; the clients' weights back."""
        ...


@dataclass
class RoundOutcome(Generic[ReplyT]):
    """A round's history row, and the client ends to aggregate (empty if it did not finish)."""

    row: dict[str, Any]
    ends: list[ClientEnd[ReplyT]] = field(default_factory=list)


class SplitRun:
    """The server's side of a SplitFed run across rounds, for either engine."""

    def __init__(self, server: SplitServerCore, plan: RoundPlan, *, label: str = "") -> None:
        self.server, self.plan, self.label = server, plan, label
        self.rows: list[dict[str, Any]] = []
        self.cursors: dict[int, DataCursor] = {}  # client id -> where its data order stands
        self.rng = random.Random(plan.seed)  # node sampling
        self.guard = DivergenceGuard(batch_size=plan.batch_size)
        self.started, self.first_round = time.monotonic(), 1
        self.budget: Decision | None = None  # codec = "budget": the current choice
        self.budget_round = 0  # ... made at the start of this round
        self.grad_budget: Decision | None = None  # grad-budget-bits: the gradients' choice
        self.grad_budget_round = 0

    @classmethod
    def build(
        cls,
        server_model: torch.nn.Module,
        plan: RoundPlan,
        *,
        device: str | torch.device = "cpu",
        num_classes: int | None = None,
        label: str = "",
    ) -> SplitRun:
        """A run whose server half trains ``server_model`` with the plan's SGD settings."""
        server = SplitServerCore(
            server_model,
            lr=plan.lr,
            momentum=plan.momentum,
            weight_decay=plan.weight_decay,
            device=device,
            num_classes=num_classes,
            head_lr_scale=plan.head_lr_scale,
            reestimate_bn=plan.reestimate_bn,
        )
        return cls(server, plan, label=label)

    @property
    def steps_done(self) -> int:
        """Steps the run took in the rounds recorded so far (where the lr warmup stands)."""
        return sum(int(row.get("steps", 0)) for row in self.rows)

    def round(
        self, clients: RoundClients[NodeT, ReplyT], server_round: int, num_rounds: int
    ) -> RoundOutcome[ReplyT]:
        """One round: begin, one server block per message, end. Lost clients are dropped."""
        plan = self.plan
        acc = RoundAccumulator(server_round, 0.0)
        if not self._choose_uplink(clients, server_round, acc):
            return RoundOutcome(acc.row())
        settings = self.settings(server_round, num_rounds)
        acc.lr = settings.lr
        self.server.set_lr(settings.lr)
        first = first_block(plan.steps_per_round, plan.steps_per_message)
        uploads, sizes = clients.begin(settings, first, acc)
        acc.num_clients = len(uploads) + len(acc.dropped)
        if not uploads:
            acc.num_clients = 0
            log.warning("Round %d: no client answered the round start; round skipped", server_round)
            return RoundOutcome(acc.row())
        steps = plan.steps_per_round or min(sizes[n] // plan.batch_size for n in uploads)
        blocks = plan_blocks(max(steps, 1), plan.steps_per_message, first)
        ends = self._blocks(clients, settings, uploads, blocks, num_rounds, acc)
        self.guard.end_round(acc.losses, server_round, settings.lr)
        if len(acc.losses) < sum(blocks) or not ends:
            return RoundOutcome(acc.row())
        ordered = sorted(ends.values(), key=lambda end: end.client_id)
        for end in ordered:
            if end.cursor is not None:
                self.cursors[end.client_id] = end.cursor
        return RoundOutcome(acc.row(), ordered)

    def _choose_uplink(
        self, clients: RoundClients[NodeT, ReplyT], server_round: int, acc: RoundAccumulator
    ) -> bool:
        """codec = "budget": probe and choose when due; False if no client answered the probe."""
        plan = self.plan
        if plan.codec_name == BUDGET and self._due(self.budget, self.budget_round, server_round):
            probe = plan.settings(server_round, step_offset=self.steps_done)
            measured = clients.probe(probe, plan.budget_bits, plan.budget_sample, acc)
            if not measured:
                log.warning("Round %d: no client answered the probe; round skipped", server_round)
                return False
            self.budget, self.budget_round = decide(measured), server_round
            log.info(
                "Round %d: codec within the budget: %s", server_round, self.budget.choice.label
            )
        if self.budget is not None:
            acc.extra.update(codec_choice=self.budget.choice.label, budget_error=self.budget.error)
        return True

    def _blocks(
        self,
        clients: RoundClients[NodeT, ReplyT],
        settings: StepSettings,
        uploads: dict[NodeT, ClientUpload],
        blocks: Sequence[int],
        num_rounds: int,
        acc: RoundAccumulator,
    ) -> dict[NodeT, ClientEnd[ReplyT]]:
        """The round's blocks: server steps, gradients back with the next request, the end."""
        server_round, link = acc.server_round, link_for(settings)
        progress = StepProgress(
            self.label,
            sum(blocks),
            server_round=server_round,
            num_rounds=num_rounds,
            run_started=self.started,
            first_round=self.first_round,
        )
        choose_grads = bool(self.plan.grad_budget_bits) and self._due(
            self.grad_budget, self.grad_budget_round, server_round
        )
        step = 0
        for index, count in enumerate(blocks):
            chooser = functools.partial(self._grads, server_round) if choose_grads else None
            last = index == len(blocks) - 1
            gradients = self._block(link, settings, uploads, step, count, acc, chooser, last)
            if chooser is not None:  # the gradients' new codec, from the next message on
                settings, choose_grads = self.settings(server_round, num_rounds), False
                link = link_for(settings)
            if self.grad_budget is not None:
                acc.extra["grad_codec_choice"] = self.grad_budget.choice.label
            step += count
            if acc.losses:
                progress.update(step, acc.losses[-1])
            try:
                if index == len(blocks) - 1:
                    return clients.end(settings, gradients, step, acc) if gradients else {}
                uploads = clients.step(settings, gradients, step, blocks[index + 1], acc)
            except (ValueError, RuntimeError) as err:  # a client half that diverged
                self.guard.check_error(err, server_round, step, settings.lr_at(step))
                raise
            if not uploads:
                log.warning("Round %d: every client dropped out at step %d", server_round, step)
                break
        return {}

    def settings(
        self, server_round: int, num_rounds: int = 1, *, train: bool = True
    ) -> StepSettings:
        """The plan's settings of a round, with the codecs chosen within the byte budgets."""
        settings = self.plan.settings(
            server_round, num_rounds, step_offset=self.steps_done, train=train
        )
        if self.grad_budget is not None:
            grads = self.grad_budget.choice
            settings = replace(
                settings, grad_codec_name=grads.codec, grad_codec_params=grads.kwargs
            )
        if self.plan.codec_name != BUDGET:
            return settings
        if self.budget is None:  # before the first choice: nothing is encoded yet
            return replace(settings, codec_name="none", codec_params={})
        choice, fallback = self.budget.choice, self.budget.fallback
        return replace(
            settings,
            codec_name=choice.codec,
            codec_params=choice.kwargs,
            budget_bits=self.plan.budget_bits if train else 0.0,
            budget_fallback=fallback.label,
        )

    def _grads(self, server_round: int, gradients: list[torch.Tensor]) -> Link:
        """grad-budget-bits: the least-error fixed-size setting for these gradients, decided
        on the server's first step of a choosing round (sizes never depend on the data)."""
        plan = self.plan
        measured = [
            measure(g, plan.grad_budget_bits, sample=plan.budget_sample, grid=DOWNLINK)
            for g in gradients
        ]
        self.grad_budget = decide(measured, fixed_size=True)
        self.grad_budget_round = server_round
        return link_for(self.settings(server_round))

    def _due(self, decision: Decision | None, decided: int, server_round: int) -> bool:
        """A choice within a byte budget is due: none yet, or ``budget-every`` rounds passed."""
        return decision is None or server_round - decided >= self.plan.budget_every

    def _block(
        self,
        link: Any,
        settings: StepSettings,
        uploads: Mapping[NodeT, ClientUpload],
        step: int,
        count: int,
        acc: RoundAccumulator,
        choose_downlink: Callable[[list[torch.Tensor]], Link] | None = None,
        last: bool = False,
    ) -> dict[NodeT, list[bytes]]:
        """The server's steps on a block of uploads; the gradients to send back, counted.

        After the round's ``last`` block the server's BatchNorm statistics are re-estimated
        (``reestimate-bn``), so that evaluation uses the statistics of the weights it scores.
        """
        for upload in uploads.values():
            acc.uplink(upload)
        tic = time.perf_counter()
        try:
            block = self.server.run_block(
                link,
                settings,
                uploads,
                step,
                count,
                choose_downlink,
                round_end=last,
            )
        except (ValueError, RuntimeError) as err:  # gradients that overflowed
            self.guard.check_error(err, acc.server_round, step, settings.lr_at(step))
            raise
        acc.server_seconds += time.perf_counter() - tic
        for node, reason in block.dropped.items():
            log.warning(
                "Node %s sent an unusable upload (%s); dropped from the round", node, reason
            )
            acc.drop(node, f"unusable upload: {reason}")
        lr = settings.lr_at(step)
        self.guard.check_uploads(
            list(block.dropped.values()), len(uploads), acc.server_round, step, lr
        )
        self.guard.check_steps(block.losses, acc.server_round, step, lr)
        acc.losses.extend(block.losses)
        for blobs in block.gradients.values():
            acc.downlink(blobs)
        return block.gradients

    def record(self, row: dict[str, Any], num_rounds: int, engine: str = "ROUND") -> None:
        """Add a finished round's row (with its evaluation columns) and log its line."""
        self.rows.append(row)
        log_round(row, num_rounds, engine=engine)

    def history(self, columns: Sequence[str]) -> pd.DataFrame:
        """The rows so far as a DataFrame: ``columns`` first, then any others in order."""
        extra = [k for row in self.rows for k in row if k not in columns]
        return pd.DataFrame(self.rows, columns=list(dict.fromkeys([*columns, *extra])))

    def run_state(self, server_round: int, client_weights: Mapping[str, torch.Tensor]) -> RunState:
        """Everything needed to continue after ``server_round`` (a checkpoint)."""
        return RunState(
            server_round=server_round,
            client_weights={k: v.detach().cpu().clone() for k, v in client_weights.items()},
            server_weights={
                k: v.detach().cpu().clone() for k, v in self.server.model.state_dict().items()
            },
            server_optimizer=self.server.optimizer.state_dict(),
            history=[dict(row) for row in self.rows],
            cursors=dict(self.cursors),
            sampler_state=self.rng.getstate(),
            budget=self._budget_record(),
        )

    def _budget_record(self) -> dict[str, Any] | None:
        """The current choices within the byte budgets, as a checkpoint keeps them."""
        record: dict[str, Any] = {}
        for prefix, decision, chosen in (
            ("", self.budget, self.budget_round),
            ("grad_", self.grad_budget, self.grad_budget_round),
        ):
            if decision is not None:
                choice, fallback, error, nbytes = decision
                record |= {f"{prefix}round": chosen, f"{prefix}choice": choice.label}
                record |= {f"{prefix}fallback": fallback.label, f"{prefix}error": error}
                record[f"{prefix}nbytes"] = nbytes
        return record or None

    def restore(self, state: RunState) -> dict[str, torch.Tensor]:
        """Adopt a checkpoint: server half, history, cursors, sampler; the global weights."""
        self.server.model.load_state_dict(state.server_weights)
        self.server.load_optimizer_state(state.server_optimizer)
        self.rows = [dict(row) for row in state.history]
        self.cursors = {cid: DataCursor(*cursor) for cid, cursor in state.cursors.items()}
        if state.sampler_state is not None:
            self.rng.setstate(state.sampler_state)
        if self.rows and math.isfinite(float(self.rows[0].get("train_loss", math.nan))):
            self.guard.initial = float(self.rows[0]["train_loss"])
        self.first_round = state.server_round + 1
        record = state.budget or {}
        if "choice" in record:
            self.budget_round, self.budget = int(record["round"]), _decision(record, "")
        if "grad_choice" in record:
            self.grad_budget_round = int(record["grad_round"])
            self.grad_budget = _decision(record, "grad_")
        return {k: v.clone() for k, v in state.client_weights.items()}


def _decision(record: Mapping[str, Any], prefix: str) -> Decision:
    return Decision(
        CodecChoice.parse(record[f"{prefix}choice"]),
        CodecChoice.parse(record[f"{prefix}fallback"]),
        float(record[f"{prefix}error"]),
        int(record[f"{prefix}nbytes"]),
    )


def codec_params_of(codec: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full parameters of ``codec`` (its defaults filled in); none for ``"budget"``."""
    if codec == BUDGET:
        return {}
    return dict(get_codec(codec, **dict(params or {})).params)


def with_scores(row: dict[str, Any], scores: Mapping[str, Any] | None, prefix: str = "") -> None:
    """Add an evaluation's loss/accuracy(/top5) to a history row (NaN when not evaluated)."""
    keys = ("loss", "accuracy", "top5") if not prefix else ("loss", "accuracy")
    for key in keys:
        value = scores.get(key, math.nan) if scores is not None else math.nan
        row[f"{prefix}test_{key}"] = float(value) if isinstance(value, int | float) else math.nan
