"""Moving split messages over a Flower ``Grid``: push, pull, how long to wait, and who is dropped.

Flower's ``send_and_receive`` sleeps 3 s between pulls on the HTTP grid, far longer than a split
step, so :class:`Transport` pushes one message per node and pulls with a short backoff. A node is
dropped from the round when its push fails, when it answers with an error, or, in a deployment
only, when it does not answer within the adaptive wait (:class:`AdaptiveWait`). In Flower's
simulation engine nodes share Ray actors, so a late reply is work queued behind other nodes, not
a lost node: there a node is dropped only when it fails (``step-timeout`` still bounds a step).
Every drop is returned with its reason, so that the round's history counts it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from flwr_splitms.flower_internals import is_simulation_grid
from flwr_splitms.protocol import (
    CLIENT_FINISHED,
    CLIENT_SECONDS,
    CLIENT_STARTED,
    failure_kind,
    reply_metric,
)

log = logging.getLogger("flwr")

NODE_WAIT_REPORT = 10.0
"""Seconds between the 'waiting for nodes' lines."""


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected than the run needs, after waiting ``node-wait`` seconds."""


class ClientsFailedError(RuntimeError):
    """Every client of an exchange failed with the same error: retrying cannot help."""


class AdaptiveWait:
    """How long a deployment waits for the replies of a step: a multiple of recent slow replies.

    Each exchange reports its slowest reply; the wait is ``factor`` x the slowest of the last
    ``window`` exchanges, at least ``floor`` seconds and at most ``ceiling`` (``step-timeout``).
    Basing it on the slowest replies, not the median, allows for replies queued behind other
    work. Until ``warmup`` exchanges have been seen, the ceiling applies.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        factor: float = 5.0,
        floor: float = 10.0,
        warmup: int = 3,
        window: int = 20,
    ) -> None:
        self.ceiling, self.factor, self.floor, self.warmup = ceiling, factor, floor, warmup
        self.slowest: deque[float] = deque(maxlen=window)

    def budget(self) -> float:
        """Seconds to wait for the next exchange."""
        if len(self.slowest) < self.warmup:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.factor * max(self.slowest)))

    def observe(self, slowest_seconds: float) -> None:
        """An exchange's slowest reply came ``slowest_seconds`` after its messages were pushed."""
        self.slowest.append(slowest_seconds)


@dataclass
class Exchange:
    """What one push-and-pull brought back."""

    replies: dict[int, Message] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> why it was dropped
    seconds: float = 0.0  # from the push to the last reply (or the deadline)

    def client_seconds(self) -> float:
        """Seconds of the exchange during which a client handler ran (what it spent computing).

        The union of the handlers' wall-clock intervals: clients that share a worker (Flower's
        simulation runs many nodes on each Ray actor) run one after another and their handler
        times add up; clients on their own machines overlap and count once. At least the
        slowest handler (clients that report no interval, clocks that disagree), at most the
        exchange.
        """
        replies = self.replies.values()
        slowest = max((reply_metric(r, CLIENT_SECONDS, 0.0) for r in replies), default=0.0)
        spans = sorted(
            (reply_metric(r, CLIENT_STARTED, math.nan), reply_metric(r, CLIENT_FINISHED, math.nan))
            for r in replies
        )
        busy, end = 0.0, -math.inf
        for start, finish in spans:
            if not (math.isfinite(start) and math.isfinite(finish)) or finish < start:
                continue
            busy += max(finish - max(start, end), 0.0)
            end = max(end, finish)
        return min(max(busy, slowest), self.seconds) if self.seconds else max(busy, slowest)


class Transport:
    """Push one message per node, pull the replies, drop the nodes that fail (or, deployed, stall).

    ``drop_slow``: drop nodes that do not answer within the adaptive wait; None = only outside
    Flower's simulation engine (see the module docstring).
    """

    def __init__(
        self,
        grid: Grid,
        wait: AdaptiveWait,
        *,
        poll_interval: float = 0.01,
        drop_slow: bool | None = None,
    ) -> None:
        self.grid, self.wait, self.poll_interval = grid, wait, poll_interval
        self.drop_slow = not is_simulation_grid(grid) if drop_slow is None else drop_slow

    def exchange(self, messages: Mapping[int, Message]) -> Exchange:
        """Send ``messages`` (node -> message) and collect the replies."""
        result = Exchange()
        if not messages:
            return result
        nodes = list(messages)
        started = time.monotonic()
        ids = list(self.grid.push_messages([messages[n] for n in nodes]))
        ids += [""] * (len(nodes) - len(ids))  # the grid returns one id per message, in order
        pushed = time.monotonic()
        waiting = {mid: node for node, mid in zip(nodes, ids, strict=True) if mid}
        for node, mid in zip(nodes, ids, strict=True):
            if not mid:
                result.dropped[node] = "could not be reached (its message was not pushed)"
        budget = self.wait.budget() if self.drop_slow else self.wait.ceiling
        failures = self._pull(waiting, result, pushed + budget)
        result.seconds = time.monotonic() - started
        _report_failures(failures, result.replies, len(nodes))
        result.dropped.update(failures)
        for node in waiting.values():
            result.dropped[node] = f"did not answer within {budget:.1f}s"
        for node, reason in result.dropped.items():
            if node not in failures:
                log.warning("Node %d %s; dropped from the round", node, reason)
        return result

    def _pull(self, waiting: dict[str, int], result: Exchange, deadline: float) -> dict[int, str]:
        """Pull until every message is answered or ``deadline``; error replies are returned."""
        failures: dict[int, str] = {}
        pause, slowest, started = self.poll_interval, 0.0, time.monotonic()
        while waiting:  # pulls at least once, however long the push took
            got = list(self.grid.pull_messages(list(waiting)))
            for reply in got:
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                slowest = time.monotonic() - started
                if reply.has_error():
                    failures[node] = str(reply.error.reason)
                else:
                    result.replies[node] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            if got:
                pause = self.poll_interval
            else:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.1)
        if not waiting:
            self.wait.observe(slowest)
        return failures


def sample(grid: Grid, rng: random.Random, fraction: float, minimum: int) -> list[int]:
    """A ``fraction`` of the connected nodes, at least ``minimum``, drawn with ``rng``; sorted."""
    nodes = sorted(grid.get_node_ids())
    size = min(max(int(len(nodes) * fraction), minimum), len(nodes))
    return sorted(rng.sample(nodes, size))


def wait_for_nodes(grid: Grid, minimum: int, wait: float) -> int:
    """Wait up to ``wait`` seconds for ``minimum`` connected nodes; returns how many connected.

    Logs ``waiting for nodes: 1/2 connected, 45 s left`` about every 10 s, and raises
    :class:`NotEnoughNodesError` saying how to start more, instead of waiting forever.
    """
    deadline = time.monotonic() + wait
    connected = len(list(grid.get_node_ids()))
    next_report = time.monotonic()
    while connected < minimum:
        now = time.monotonic()
        if now >= deadline:
            raise NotEnoughNodesError(
                f"{connected} node(s) connected after waiting {wait:g}s, the run needs {minimum} "
                "(min-nodes). Fix: start more SuperNodes, or in simulation run with "
                '--federation-config "num-supernodes=N", or lower min-nodes'
            )
        if now >= next_report:
            log.info(
                "waiting for nodes: %d/%d connected, %.0f s left",
                connected,
                minimum,
                deadline - now,
            )
            next_report = now + NODE_WAIT_REPORT
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        connected = len(list(grid.get_node_ids()))
    return connected


def _report_failures(
    failures: Mapping[int, str], replies: Mapping[int, Message], sent: int
) -> None:
    """One warning per kind of failure; stop the run when every node failed the same way."""
    if not failures:
        return
    kinds: dict[str, list[int]] = {}
    for node in sorted(failures):
        kinds.setdefault(failure_kind(failures[node]), []).append(node)
    if not replies and len(failures) == sent and len(kinds) == 1:
        raise ClientsFailedError(
            f"all {sent} clients failed the same way, so the run stops: {failures[min(failures)]}"
        )
    for nodes in kinds.values():
        log.warning(
            "Node%s %s failed (%s); dropped from the round",
            "s" if len(nodes) > 1 else "",
            ", ".join(map(str, nodes)),
            failures[nodes[0]],
        )
