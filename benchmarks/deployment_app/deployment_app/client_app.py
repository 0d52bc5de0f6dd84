"""ClientApp: the example's client (same imports, same factories) plus wall-clock marks.

The marks go into each reply's metrics so that the benchmark can split a message's cost into
process start, app import, build and handler time. ``IMPORT_START`` is taken before the heavy
imports, so ``bench.import-end - bench.import-start`` is what importing the app costs a fresh
``flwr-clientapp`` process.
"""

import time

IMPORT_START = time.time()

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Message, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from torch import nn  # noqa: E402

from flwr_splitms import protocol as P  # noqa: E402
from flwr_splitms.client import SplitClient  # noqa: E402
from flwr_splitms.config import SplitConfig  # noqa: E402
from flwr_splitms.data import BatchSource  # noqa: E402
from flwr_splitms.experiment import build_split_model, client_data  # noqa: E402

IMPORT_END = time.time()


def _created() -> float:
    """When this process started, to ~10 ms (psutil's create_time can be up to 1 s off on
    Linux: it adds the start tick count to the boot time, which /proc/stat has in whole s)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return psutil.Process(os.getpid()).create_time()


CREATED = _created()


def client_model(context: Context) -> nn.Module:
    """The client-side network, as in the example (built on ``meta``, weights arrive later)."""
    with torch.device("meta"):
        config = SplitConfig.from_run_config(context.run_config, strict=False)
        client_net, _ = build_split_model(config)
    return client_net.to_empty(device="cpu")


def node_data(context: Context) -> tuple[BatchSource, BatchSource | None]:
    """This node's partition, as in the example."""
    config = SplitConfig.from_run_config(context.run_config, strict=False)
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return client_data(config, partition_id, num_partitions)


split = SplitClient(client_model, node_data)
app = ClientApp()


def _state_bytes(context: Context) -> int:
    return sum(len(a.data) for rec in context.state.array_records.values() for a in rec.values())


def timed(handler):  # type: ignore[no-untyped-def]
    """Run a SplitClient handler and add the process's marks to its reply's metrics."""

    def run(msg: Message, context: Context) -> Message:
        started = time.time()
        state_in = _state_bytes(context)
        reply = handler(msg, context)
        if not reply.has_error():
            metrics = reply.content.metric_records.get(P.METRICS, MetricRecord())
            metrics.update(
                {
                    "bench.created": CREATED,
                    "bench.import-start": IMPORT_START,
                    "bench.import-end": IMPORT_END,
                    "bench.handler-start": started,
                    "bench.handler-end": time.time(),
                    "bench.state-bytes": float(max(state_in, _state_bytes(context))),
                }
            )
            reply.content[P.METRICS] = metrics
        return reply

    return run


app.train("split_begin")(timed(split.on_begin))
app.train("split_step")(timed(split.on_step))
app.train("split_end")(timed(split.on_end))
