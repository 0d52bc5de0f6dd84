"""Evaluating a split network in a Flower run: on the server's test set, or on the clients'.

Central evaluation (:func:`central_evaluator`, Flower's ``evaluate_fn``) runs the global client
half and the server half on a test set the server holds, through the uplink codec. Federated
evaluation sends ``evaluate.split`` messages (:func:`evaluation_content`); each client answers
with the compressed activations of its local test split, which the server half scores
(:func:`score_replies`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from flwr_splitms.codecs import Codec
from flwr_splitms.core.link import Link
from flwr_splitms.core.server_half import SplitServerCore, evaluate_split
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.data import BatchSource
from flwr_splitms.protocol import MAX_EXAMPLES, METRICS, read_smashed, record_to_state
from flwr_splitms.remote_clients import split_config

log = logging.getLogger("flwr")


def central_evaluator(
    client_model: nn.Module,
    server_model: nn.Module,
    codec: Callable[[], Codec],
    test_data: BatchSource,
    *,
    batch_size: int,
    max_examples: int,
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """An ``evaluate_fn``: the global client weights and ``server_model`` on ``test_data``,
    through the uplink codec ``codec()`` returns (the current one, under a byte budget)."""
    client_model.to(next(server_model.parameters()).device)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        client_model.load_state_dict(record_to_state(arrays))
        result = evaluate_split(
            client_model,
            server_model,
            codec(),
            test_data,
            batch_size=batch_size,
            max_examples=max_examples,
        )
        return MetricRecord(result)  # type: ignore[arg-type]

    return evaluate


def evaluation_content(
    settings: StepSettings,
    arrays: ArrayRecord,
    extra: Mapping[str, Any] | None,
    *,
    keys: tuple[str, str],
    max_examples: int,
) -> RecordDict:
    """What an ``evaluate.split`` message carries: the weights and the inference settings."""
    arrays_key, config_key = keys
    config = split_config(settings, extra, {MAX_EXAMPLES: max_examples})
    return RecordDict({arrays_key: arrays, config_key: config})


def score_replies(
    server: SplitServerCore, link: Link, replies: Iterable[Message]
) -> tuple[list[RecordDict], int]:
    """Each usable reply scored by the server half (records for metric aggregation); examples."""
    scored, examples = [], 0
    for reply in replies:
        try:
            scores = server.score_uploads(link, [read_smashed(reply.content)])
        except ValueError as err:
            log.warning("An evaluation reply is unusable (%s); ignored", err)
            continue
        if scores["num-examples"]:
            examples += int(scores["num-examples"])
            scored.append(RecordDict({METRICS: MetricRecord(scores)}))  # type: ignore[arg-type]
    return scored, examples
