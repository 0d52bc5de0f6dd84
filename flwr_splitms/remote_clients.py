"""The sampled nodes of a Flower round, as the round driver's clients: each call is one exchange.

:class:`RemoteClients` implements :class:`flwr_splitms.core.round.RoundClients` over Flower
messages (the schema is :mod:`flwr_splitms.protocol`, the moving is
:class:`flwr_splitms.transport.Transport`): the round start goes out in the messages the
aggregating strategy configured (its sampling, its arrays), each block's gradients go out with
the request for the next block, and the round end brings back the client weights as Flower
``Message`` replies, ready for the aggregator's ``aggregate_train``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flwr_splitms.core.accounting import RoundAccumulator
from flwr_splitms.core.batches import DataCursor
from flwr_splitms.core.round import ClientEnd
from flwr_splitms.core.server_half import ClientUpload
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.protocol import (
    BUDGET_BITS,
    BUDGET_SAMPLE,
    CLIENT_ID,
    CURSORS,
    GRADIENT,
    METRICS,
    NUM_BATCHES,
    NUM_EXAMPLES,
    PROTOCOL_KEYS,
    SPLIT_BEGIN,
    SPLIT_END,
    SPLIT_PROBE,
    SPLIT_STEP,
    STEP,
    cursor_table,
    gradient_record,
    read_cursor,
    read_measurements,
    read_smashed,
    reply_metric,
    settings_to_config,
)
from flwr_splitms.transport import Transport

log = logging.getLogger("flwr")


def split_config(
    settings: StepSettings, extra: Mapping[str, Any] | None, entries: Mapping[str, Any]
) -> ConfigRecord:
    """A split message's config: the round settings, the user's entries, the message's own."""
    config = settings_to_config(settings)
    for key, value in (extra or {}).items():
        if key in PROTOCOL_KEYS:
            raise ValueError(
                f"train_config/evaluate_config key {key!r} is reserved by the split "
                f"protocol; rename it (reserved: {', '.join(PROTOCOL_KEYS)})"
            )
        config[key] = value
    for key, value in entries.items():
        config[key] = value
    return config


def retyped(messages: Iterable[Message], message_type: str, server_round: int) -> list[Message]:
    """The same contents to the same nodes as messages of ``message_type`` (e.g. a Flower
    strategy's ``train`` messages as ``train.split_begin``)."""
    return [
        Message(
            m.content,
            dst_node_id=m.metadata.dst_node_id,
            message_type=message_type,
            group_id=str(server_round),
        )
        for m in messages
    ]


class RemoteClients:
    """The round's nodes: ``begin`` holds the round-start message the aggregator made per node.

    ``extra`` (the user's ``train_config``) reaches the clients in every message; ``cursors``
    is the server's record of each client's data order, sent at the round start.
    """

    def __init__(
        self,
        transport: Transport,
        begin: Mapping[int, Message],
        *,
        configrecord_key: str,
        extra: Mapping[str, Any] | None,
        cursors: Mapping[int, DataCursor],
    ) -> None:
        self.transport, self.begin_messages = transport, begin
        self.configrecord_key, self.extra, self.cursors = configrecord_key, extra, cursors
        self.server_round = 0

    def probe(
        self, settings: StepSettings, budget_bits: float, sample: int, acc: RoundAccumulator
    ) -> list[dict[str, tuple[float, int]]]:
        """codec = "budget": the global weights out, each client's measurements back."""
        entries = {BUDGET_BITS: budget_bits, BUDGET_SAMPLE: sample}
        replies = self._exchange(self._round_start(settings, entries, SPLIT_PROBE), acc)
        measured = []
        for node, reply in replies.items():
            try:
                measured.append(read_measurements(reply.content))
            except ValueError as err:
                log.warning("Node %d sent an unreadable probe (%s); dropped", node, err)
                acc.drop(node, f"unreadable probe: {err}")
        return measured

    def begin(
        self, settings: StepSettings, count: int, acc: RoundAccumulator
    ) -> tuple[dict[int, ClientUpload], dict[int, int]]:
        """Round start: the aggregator's content plus the round settings; the first uploads."""
        entries = {STEP: 0, NUM_BATCHES: count}
        replies = self._exchange(self._round_start(settings, entries, SPLIT_BEGIN), acc)
        uploads = self._uploads(replies, acc)
        sizes = {node: int(reply_metric(replies[node], NUM_EXAMPLES, 0)) for node in uploads}
        return uploads, sizes

    def step(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        step: int,
        count: int,
        acc: RoundAccumulator,
    ) -> dict[int, ClientUpload]:
        """The block's gradients with the request for the next ``count`` batches."""
        messages = self._gradient_messages(settings, gradients, step, count, SPLIT_STEP)
        return self._uploads(self._exchange(messages, acc), acc)

    def end(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        step: int,
        acc: RoundAccumulator,
    ) -> dict[int, ClientEnd[Message]]:
        """The last gradients; the replies (client weights + ``num-examples``) come back whole."""
        messages = self._gradient_messages(settings, gradients, step, 0, SPLIT_END)
        ends = {}
        for node, reply in self._exchange(messages, acc).items():
            metrics = reply.content.metric_records.get(METRICS, MetricRecord())
            ends[node] = ClientEnd(
                client_id=int(reply_metric(reply, CLIENT_ID, node)),
                num_examples=int(reply_metric(reply, NUM_EXAMPLES, 0)),
                cursor=read_cursor(metrics),
                reply=reply,
            )
        return ends

    def _round_start(
        self, settings: StepSettings, entries: Mapping[str, Any], message_type: str
    ) -> dict[int, Message]:
        """The aggregator's round-start content for each node, with the split config merged."""
        self.server_round = settings.server_round
        entries = {**entries, CURSORS: cursor_table(self.cursors)}
        contents: dict[int, RecordDict] = {}  # one content per distinct aggregator content
        messages = {}
        for node, message in self.begin_messages.items():
            original = message.content
            if id(original) not in contents:
                contents[id(original)] = self._with_config(original, settings, entries)
            messages[node] = self._message(contents[id(original)], node, message_type)
        return messages

    # -- messages -----------------------------------------------------------------------------
    def _with_config(
        self, content: RecordDict, settings: StepSettings, entries: Mapping[str, Any]
    ) -> RecordDict:
        """``content`` with the split settings merged into its config record."""
        configs = content.config_records
        key = self.configrecord_key
        if key not in configs and len(configs) == 1:
            key = next(iter(configs))
        base = dict(configs[key]) if key in configs else {}
        merged = split_config(settings, self.extra, entries)
        for name, value in base.items():
            if name not in merged:
                merged[name] = value
        out = RecordDict(dict(content.items()))
        out[key] = merged
        return out

    def _gradient_messages(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        step: int,
        count: int,
        message_type: str,
    ) -> dict[int, Message]:
        config = split_config(settings, self.extra, {STEP: step, NUM_BATCHES: count})
        return {
            node: self._message(
                RecordDict({self.configrecord_key: config, GRADIENT: gradient_record(blobs)}),
                node,
                message_type,
            )
            for node, blobs in gradients.items()
        }

    def _message(self, content: RecordDict, node: int, message_type: str) -> Message:
        return Message(
            content, dst_node_id=node, message_type=message_type, group_id=str(self.server_round)
        )

    # -- replies ------------------------------------------------------------------------------
    def _exchange(
        self, messages: Mapping[int, Message], acc: RoundAccumulator
    ) -> dict[int, Message]:
        """One exchange; drops and the time spent outside the clients' handlers are counted."""
        exchange = self.transport.exchange(messages)
        for node, reason in exchange.dropped.items():
            acc.drop(node, reason)
        compute = exchange.client_seconds()
        acc.client_seconds += compute
        acc.message_seconds += max(exchange.seconds - compute, 0.0)
        return exchange.replies

    def _uploads(
        self, replies: Mapping[int, Message], acc: RoundAccumulator
    ) -> dict[int, ClientUpload]:
        """The clients' uploads; an unreadable reply drops its node."""
        uploads = {}
        for node, reply in replies.items():
            try:
                uploads[node] = read_smashed(
                    reply.content, int(reply_metric(reply, CLIENT_ID, node))
                )
            except ValueError as err:
                log.warning(
                    "Node %d sent an unreadable reply (%s); dropped from the round", node, err
                )
                acc.drop(node, f"unreadable reply: {err}")
        return uploads
