"""The split protocol's message types and record keys, shared by the client and the strategy.

One round (see DESIGN.md, "The split protocol over Flower messages"):

``train.split_begin``  server -> client: global client weights (``arrays``) + round config
                       client -> server: compressed activations of batch 0 + labels
``train.split_step``   server -> client: gradient for the previous batch; asks for the next one
                       client -> server: compressed activations of the next batch + labels
``train.split_end``    server -> client: gradient for the last batch
                       client -> server: client weights (one ArrayRecord) + ``num-examples``
``evaluate.split``     server -> client: global client weights; client -> server: compressed
                       activations of its local test split (federated evaluation)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

SPLIT_BEGIN = "train.split_begin"
SPLIT_STEP = "train.split_step"
SPLIT_END = "train.split_end"
SPLIT_EVALUATE = "evaluate.split"

# Keys of records inside a message's RecordDict.
ARRAYS = "arrays"  # client weights (FedAvg's default key)
CONFIG = "config"
SMASHED = "smashed"  # ArrayRecord: "activations" (codec payload bytes) and "labels"
GRADIENT = "gradient"  # ArrayRecord: "gradient" (float tensor w.r.t. decoded activations)
METRICS = "metrics"

PAYLOAD_STYPE = "flwr_splitms.payload"  # Array.stype of codec payload bytes

# Keys inside the config record the strategy sends.
ROUND = "server-round"
STEP = "step"
LR = "lr"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
BATCH_SIZE = "batch-size"
SEED = "seed"
AUGMENT = "augment"
CODEC = "codec"  # JSON: {"name": ..., "params": {...}}

# Keys inside the metric records clients send.
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
CLIENT_SECONDS = "client-seconds"

# Keys of what a node keeps in ``context.state`` between messages.
STATE_WEIGHTS = "splitms.weights"
STATE_OPTIMIZER = "splitms.optimizer"
STATE_CURSOR = "splitms.cursor"


def codec_spec(name: str, params: Mapping[str, Any]) -> str:
    """Encode a codec choice for a ConfigRecord (which holds scalars only)."""
    return json.dumps({"name": name, "params": dict(params)}, sort_keys=True)


def parse_codec_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Inverse of :func:`codec_spec`, with a clear error for a malformed value."""
    try:
        decoded = json.loads(spec)
        return str(decoded["name"]), dict(decoded["params"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed codec spec in message config: {spec!r}") from err


def payload_array(blob: bytes) -> Array:
    """Wrap codec payload bytes as an Array that Flower carries untouched."""
    return Array(dtype="uint8", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)


def payload_bytes(array: Array) -> bytes:
    """The payload bytes inside an Array made by :func:`payload_array`."""
    if array.stype != PAYLOAD_STYPE:
        raise ValueError(f"expected an Array of stype {PAYLOAD_STYPE!r}, got {array.stype!r}")
    return bytes(array.data)


def tensor_array(tensor: torch.Tensor) -> Array:
    """A tensor as a numpy-backed Array (gradients, labels)."""
    return Array(tensor.detach().cpu().contiguous().numpy())


def array_tensor(array: Array) -> torch.Tensor:
    """The tensor inside an Array made by :func:`tensor_array` (a writable copy)."""
    return torch.from_numpy(np.array(array.numpy(), copy=True))


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict (weights, buffers, momentum) as an ArrayRecord, keys kept in order."""
    return ArrayRecord({key: tensor_array(value) for key, value in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_record`."""
    return {key: array_tensor(value) for key, value in record.items()}


def config_value(config: ConfigRecord, key: str) -> Any:
    """A required config entry, with an error that names the missing key."""
    if key not in config:
        raise ValueError(
            f"split message config lacks {key!r}; client and strategy versions differ?"
        )
    return config[key]


def config_int(config: ConfigRecord, key: str) -> int:
    """A required integer config entry."""
    value = config_value(config, key)
    if not isinstance(value, int | float):
        raise ValueError(f"config entry {key!r} should be a number, got {value!r}")
    return int(value)


def smashed_record(blob: bytes, labels: torch.Tensor) -> ArrayRecord:
    """The uplink record of one batch: compressed activations and labels."""
    return ArrayRecord({"activations": payload_array(blob), "labels": tensor_array(labels)})


def read_smashed(content: RecordDict) -> tuple[bytes, torch.Tensor]:
    """The compressed activations and labels of a client's reply."""
    if SMASHED not in content.array_records:
        raise ValueError(f"reply lacks the {SMASHED!r} ArrayRecord of activations")
    record = content.array_records[SMASHED]
    return payload_bytes(record["activations"]), array_tensor(record["labels"]).long()
