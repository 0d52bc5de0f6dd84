"""Where an exchange's time went: client handlers queued on one worker add up, handlers on their
own machines overlap; and min-nodes is the nodes to wait for, not the nodes to sample."""

from __future__ import annotations

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model
from flwr_splitms.protocol import CLIENT_FINISHED, CLIENT_SECONDS, CLIENT_STARTED, METRICS
from flwr_splitms.strategy import MSSplitStrategy
from flwr_splitms.transport import Exchange


def _reply(started: float | None, seconds: float) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    metrics: dict[str, float] = {CLIENT_SECONDS: seconds}
    if started is not None:
        metrics |= {CLIENT_STARTED: started, CLIENT_FINISHED: started + seconds}
    content = RecordDict({METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize(
    ("spans", "busy"),
    [
        ([(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)], 3.0),  # one actor: one after another
        ([(0.0, 1.0), (0.0, 1.0), (0.5, 1.0)], 1.5),  # overlapping: counted once
        ([(0.0, 1.0), (5.0, 0.5)], 1.5),  # a gap between them is not client time
        ([(None, 2.0), (None, 1.0)], 2.0),  # no intervals reported: the slowest handler
    ],
)
def test_client_time_is_the_union_of_the_handlers(
    spans: list[tuple[float | None, float]], busy: float
) -> None:
    replies = {node: _reply(start, length) for node, (start, length) in enumerate(spans)}
    assert Exchange(replies=replies, seconds=10.0).client_seconds() == pytest.approx(busy)


def test_min_nodes_waits_for_nodes_but_does_not_force_sampling_them() -> None:
    config = SplitConfig(dataset="synthetic", num_classes=10, min_nodes=1000, fraction_train=0.01)
    strategy = MSSplitStrategy.from_config(config, build_split_model(config)[1])
    assert strategy.min_available_nodes == 1000
    assert strategy.aggregator.min_train_nodes == 2  # type: ignore[attr-defined]
    single = config.replace(min_nodes=1)
    one = MSSplitStrategy.from_config(single, build_split_model(single)[1])
    assert one.aggregator.min_train_nodes == 1  # type: ignore[attr-defined]  # never waits for 2
