"""A Grid that delivers messages to ClientApps in this process: fast strategy tests, no Ray.

Each node has its own Context (and so its own ``context.state``), as on a real SuperNode. Nodes
can be told to fail or to go silent from a given message on, to test dropping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(
        self, app: ClientApp, num_nodes: int, run_config: dict | None = None, run_id: int = 7
    ) -> None:
        self.app = app
        # Messages read their run from the process's task identity, set by Flower's runtime.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.fail_after: dict[int, int] = {}  # node -> number of messages before it errors
        self.silent_after: dict[int, int] = {}  # node -> number of messages before it goes silent
        self.silent_messages: dict[int, set[int]] = {}  # node -> indices of messages it drops
        self.seen: dict[int, int] = dict.fromkeys(self.contexts, 0)
        self.message_types: list[str] = []
        self.configs: list[dict] = []  # the config record of every message sent, in order
        self.tamper = None  # optional callable(node, reply) -> reply, to fake a hostile client

    # -- the Grid interface used by the strategy ---------------------------------------------
    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            self.message_types.append(msg.metadata.message_type)
            self.configs.append(dict(next(iter(msg.content.config_records.values()), {})))
            count = self.seen[node]
            self.seen[node] += 1
            ids.append(msg_id)
            if node in self.silent_after and count >= self.silent_after[node]:
                continue
            if count in self.silent_messages.get(node, set()):
                continue
            if node in self.fail_after and count >= self.fail_after[node]:
                reply = Message(Error(code=0, reason="injected failure"), reply_to=msg)
            else:
                try:
                    reply = self.app(msg, self.contexts[node])
                except Exception as err:
                    reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
                if self.tamper is not None and not reply.has_error():
                    reply = self.tamper(node, reply)
            self.replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        ids = self.push_messages(messages)
        return self.pull_messages(ids)
