"""The tabular example's ClientApp, with a Flower mod that records the Ray node of each message.

Not imported here: ``test_ray_cluster.py`` copies this file into a copy of ``examples/tabular_mlp``
(as ``tabular_mlp/ray_client_app.py``) and points the copy's ``clientapp`` component at it, so
that the example itself carries no test code. Every handled message appends one JSON line to the
file named by ``SPLITMS_TEST_RAY_RECORD``: the message type, the node's partition, the name the
test gave the Ray node (``SPLITMS_TEST_RAY_NODE``), Ray's node id and the worker's PID. Ray's
worker processes inherit the environment of the ``ray start`` that started their node, so both
variables come from the node that ran the message.
"""

import json
import os

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from tabular_mlp.client_app import client_model, node_rows

from flwr_splitms.client import SplitClient


def record_ray_node(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Handle the message, then append where it ran to the record file."""
    reply = call_next(msg, context)
    entry = {
        "message_type": msg.metadata.message_type,
        "partition_id": int(context.node_config["partition-id"]),
        "node": os.environ.get("SPLITMS_TEST_RAY_NODE"),
        "ray_node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }
    with open(os.environ["SPLITMS_TEST_RAY_RECORD"], "a") as record:  # one short line: atomic
        record.write(json.dumps(entry) + "\n")
    return reply


app = SplitClient(client_model, node_rows).register(ClientApp(mods=[record_ray_node]))
