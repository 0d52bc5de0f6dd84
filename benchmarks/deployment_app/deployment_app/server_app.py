"""ServerApp: MSSplitStrategy on a grid that time-stamps every push and pull.

It writes ``timing-file`` (JSON): per exchange the message type, when the server started to
push, when the push returned, and per reply when it was pulled and the client's metrics (which
carry the client process's own marks, see ``client_app.py``). All stamps are ``time.time()`` on
one machine (the benchmark runs on loopback), so they can be compared across processes.
"""

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_splitms import protocol as P
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model
from flwr_splitms.strategy import MSSplitStrategy
from flwr_splitms.transport import Exchange, Transport

app = ServerApp()


class StampedGrid:
    """A Grid proxy that records when each reply was pulled."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.arrived: dict[str, float] = {}

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        got = list(self._grid.pull_messages(message_ids))
        now = time.time()
        for reply in got:
            self.arrived.setdefault(reply.metadata.reply_to_message_id, now)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class TimedTransport(Transport):
    """The strategy's transport, keeping a record of every exchange's timing."""

    exchanges: list[dict[str, Any]]

    def exchange(self, messages: Mapping[int, Message]) -> Exchange:
        grid = self.grid
        record: dict[str, Any] = {"type": "", "entered": time.time(), "replies": {}}
        if messages:
            record["type"] = next(iter(messages.values())).metadata.message_type
        pushed: list[str] = []
        push = grid.push_messages

        def stamped_push(msgs):  # type: ignore[no-untyped-def]
            ids = list(push(msgs))
            record["pushed"] = time.time()
            pushed.extend(ids)
            return ids

        grid.push_messages = stamped_push  # type: ignore[method-assign]
        try:
            result = super().exchange(messages)
        finally:
            del grid.push_messages
        record["returned"] = time.time()
        by_node = dict(zip(list(messages), pushed, strict=False))
        for node, reply in result.replies.items():
            metrics = reply.content.metric_records.get(P.METRICS, MetricRecord())
            record["replies"][str(node)] = {
                "arrived": grid.arrived.get(by_node.get(node, ""), record["returned"]),  # type: ignore[attr-defined]
                **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
            }
        self.exchanges.append(record)
        return result


class TimedStrategy(MSSplitStrategy):
    """MSSplitStrategy whose transport keeps a record of every exchange's timing."""

    exchanges: list[dict[str, Any]]

    def transport(self, grid: Grid) -> Transport:
        timed = TimedTransport(
            grid, self.wait, poll_interval=self.poll_interval, drop_slow=self.drop_slow
        )
        timed.exchanges = self.exchanges
        return timed


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One training run; the timing JSON is written even if the run fails half way."""
    config = SplitConfig.from_run_config(context.run_config, strict=False)
    client_net, server_net = build_split_model(config)
    strategy = TimedStrategy.from_config(config, server_net)
    strategy.exchanges = []
    started = time.time()
    try:
        strategy.start(
            StampedGrid(grid),  # type: ignore[arg-type]
            P.state_to_record(client_net.state_dict()),
            num_rounds=config.num_server_rounds,
            timeout=config.step_timeout,
        )
    finally:
        out = Path(str(config.extra.get("timing-file", ""))).expanduser()
        out.write_text(
            json.dumps(
                {
                    "started": started,
                    "finished": time.time(),
                    "steps-per-message": config.steps_per_message,
                    "steps-per-round": config.steps_per_round,
                    "history": [dict(row) for row in strategy.run.rows],
                    "exchanges": strategy.exchanges,
                },
                indent=1,
            )
        )
