"""The split protocol's message schema: message types, record keys, settings, record layouts.

One round (``K`` = ``steps-per-message``; K = 1 is the exact algorithm):

``train.split_begin``  server -> client: global client weights + round config (``num-batches`` = n)
                       client -> server: compressed activations and labels of its next n batches
``train.split_step``   server -> client: one gradient per pending batch; asks for the next n batches
                       client -> server: compressed activations and labels of those batches
``train.split_end``    server -> client: the gradients of the last block
                       client -> server: client weights (one ArrayRecord) + ``num-examples``
``evaluate.split``     server -> client: global client weights; client -> server: compressed
                       activations of its local test split (federated evaluation)

Batch ``j`` of a message travels as ``activations.j`` / ``labels.j`` (uplink, ArrayRecord
``smashed``) and ``gradient.j`` (downlink, ArrayRecord ``gradient``); payloads are codec bytes in an
Array of stype ``flwr_splitms.payload``. This is the only module that knows these keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_splitms.core.batches import BatchKey, DataCursor
from flwr_splitms.core.client_half import ClientState, EncodedBatch
from flwr_splitms.core.server_half import ClientUpload
from flwr_splitms.core.settings import StepSettings

SPLIT_BEGIN = "train.split_begin"
SPLIT_STEP = "train.split_step"
SPLIT_END = "train.split_end"
SPLIT_EVALUATE = "evaluate.split"
SPLIT_PROBE = "train.split_probe"  # codec = "budget": measure the candidate codecs, send nothing
BUDGET = "budget"  # ConfigRecord of a probe reply: "measurements" = JSON {label: [error, bytes]}

# Keys of records inside a message's RecordDict (the strategy's arrayrecord_key and
# configrecord_key replace ARRAYS and CONFIG; clients find the only record of each kind).
ARRAYS = "arrays"  # client weights (FedAvg's default key)
CONFIG = "config"
SMASHED = "smashed"  # ArrayRecord: "activations.j" (codec payload bytes) and "labels.j"
GRADIENT = "gradient"  # ArrayRecord: "gradient.j" (downlink codec bytes)
METRICS = "metrics"

PAYLOAD_STYPE = "flwr_splitms.payload"  # Array.stype of codec payload bytes

# Keys inside the config record the strategy sends.
ROUND = "server-round"
STEP = "step"  # index of the first batch the message asks for; total steps in split_end
NUM_BATCHES = "num-batches"  # batches the message asks for (0 in split_end)
LR = "lr"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
BATCH_SIZE = "batch-size"
SEED = "seed"
AUGMENT = "augment"
CODEC = "codec"  # JSON: {"name": ..., "params": {...}}
GRAD_CODEC = "grad-codec"  # JSON, as CODEC
ERROR_EVERY = "error-every"
WARMUP_STEPS = "warmup-steps"
STEP_OFFSET = "step-offset"  # steps of the run before this round (where the lr warmup stands)
BUDGET_BITS = "budget-bits"  # codec = "budget": the uplink's bits per element, headers included
BUDGET_FALLBACK = "budget-fallback"  # the fixed-size setting an over-budget upload is re-encoded in
REESTIMATE_BN = "reestimate-bn"  # split_end: BatchNorm statistics of the final weights
BUDGET_SAMPLE = "budget-sample"  # split_probe: rows of a batch the candidates are measured on
MAX_EXAMPLES = "max-examples"  # federated evaluation: test examples per client (0 = all)
CURSORS = "cursors"  # split_begin: the server's record of data cursors, [id, epoch, pos, updates]*
PROTOCOL_KEYS = (
    ROUND,
    STEP,
    NUM_BATCHES,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    BATCH_SIZE,
    SEED,
    AUGMENT,
    CODEC,
    GRAD_CODEC,
    ERROR_EVERY,
    WARMUP_STEPS,
    STEP_OFFSET,
    BUDGET_BITS,
    BUDGET_FALLBACK,
    REESTIMATE_BN,
    BUDGET_SAMPLE,
    MAX_EXAMPLES,
    CURSORS,
)

# Keys inside the metric records clients send.
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
CLIENT_SECONDS = "client-seconds"  # handler time
BUILD_SECONDS = "build-seconds"  # building the model and data in this process (0 when cached)
PROCESS_SECONDS = "process-seconds"  # age of the client process when the handler started
CLIENT_STARTED = "client-started"  # wall clock (time.time()) when the handler started
CLIENT_FINISHED = "client-finished"  # wall clock when the handler finished
RAW_BYTES = "raw-bytes"  # bytes the uncompressed activations would take
COMPRESSION_ERROR = "compression-error"  # per batch; NaN where not measured
CURSOR = ("cursor-epoch", "cursor-position", "cursor-updates")  # split_end: the data cursor
CLIENT_ONLY_METRICS = (CLIENT_ID, *CURSOR, CLIENT_STARTED, CLIENT_FINISHED)  # not averaged

# Keys of what a node keeps in ``context.state`` between messages.
STATE_WEIGHTS = "splitms.weights"
STATE_MOMENTUM = "splitms.momentum"  # the SGD momentum of the round under way
STATE_CURSOR = "splitms.cursor"


# -- settings --------------------------------------------------------------------------------
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


def settings_to_config(settings: StepSettings) -> ConfigRecord:
    """The ConfigRecord form of the round settings that travels in a message."""
    return ConfigRecord(
        {
            ROUND: settings.server_round,
            LR: settings.lr,
            MOMENTUM: settings.momentum,
            WEIGHT_DECAY: settings.weight_decay,
            BATCH_SIZE: settings.batch_size,
            SEED: settings.seed,
            AUGMENT: settings.augment,
            CODEC: codec_spec(settings.codec_name, settings.codec_params),
            GRAD_CODEC: codec_spec(settings.grad_codec_name, settings.grad_codec_params),
            ERROR_EVERY: settings.error_every,
            WARMUP_STEPS: settings.warmup_steps,
            STEP_OFFSET: settings.step_offset,
            BUDGET_BITS: settings.budget_bits,
            BUDGET_FALLBACK: settings.budget_fallback,
            REESTIMATE_BN: settings.reestimate_bn,
        }
    )


def settings_from_config(config: ConfigRecord) -> StepSettings:
    """Parse the round settings of a split message."""
    name, params = parse_codec_spec(str(config_value(config, CODEC)))
    grad_name, grad_params = parse_codec_spec(str(config_value(config, GRAD_CODEC)))
    return StepSettings(
        server_round=config_int(config, ROUND),
        lr=float(config_value(config, LR)),
        momentum=float(config_value(config, MOMENTUM)),
        weight_decay=float(config_value(config, WEIGHT_DECAY)),
        batch_size=config_int(config, BATCH_SIZE),
        seed=config_int(config, SEED),
        augment=bool(config_value(config, AUGMENT)),
        codec_name=name,
        codec_params=params,
        grad_codec_name=grad_name,
        grad_codec_params=grad_params,
        error_every=config_int(config, ERROR_EVERY),
        warmup_steps=config_int(config, WARMUP_STEPS, 0),
        step_offset=config_int(config, STEP_OFFSET, 0),
        budget_bits=float(config.get(BUDGET_BITS, 0.0)),  # type: ignore[arg-type]
        budget_fallback=str(config.get(BUDGET_FALLBACK, "")),
        reestimate_bn=bool(config.get(REESTIMATE_BN, False)),
    )


def config_value(config: ConfigRecord, key: str) -> Any:
    """A required config entry, with an error that names the missing key."""
    if key not in config:
        raise ValueError(
            f"split message config lacks {key!r}; client and strategy versions differ?"
        )
    return config[key]


def config_int(config: ConfigRecord, key: str, default: int | None = None) -> int:
    """A required (or defaulted) integer config entry."""
    if default is not None and key not in config:
        return default
    value = config_value(config, key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"config entry {key!r} should be a number, got {value!r}")
    return int(value)


def only_record(records: Mapping[str, Any], default_key: str, what: str) -> Any:
    """The record under ``default_key``, or the only record of its kind (a renamed key)."""
    if default_key in records:
        return records[default_key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise ValueError(f"message holds {len(records)} {what} records and none named {default_key!r}")


def reply_metric(reply: Message, key: str, default: float = math.nan) -> float:
    """A scalar metric of a client's reply (``default`` when absent or not a number)."""
    value = reply.content.metric_records.get(METRICS, MetricRecord()).get(key, default)
    return float(value) if isinstance(value, int | float) else default


def failure_kind(reason: str) -> str:
    """An error reason with its numbers blanked: clients that differ only there fail alike."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def cursor_table(cursors: Mapping[int, DataCursor]) -> list[int]:
    """The server's cursor record as a flat list for a ConfigRecord."""
    return [value for cid in sorted(cursors) for value in (cid, *cursors[cid])]


def cursor_from_table(config: ConfigRecord, client_id: int) -> DataCursor | None:
    """This client's entry of the cursor record in a split_begin config, if any."""
    flat = config.get(CURSORS, [])
    if not isinstance(flat, list) or len(flat) % 4:
        raise ValueError(f"malformed {CURSORS!r} entry in split_begin config")
    for i in range(0, len(flat), 4):
        if int(flat[i]) == client_id:
            return DataCursor(int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
    return None


def cursor_metrics(cursor: DataCursor) -> dict[str, int]:
    """The data cursor a client reports at round end."""
    return dict(zip(CURSOR, cursor, strict=True))


def read_cursor(metrics: Mapping[str, Any]) -> DataCursor | None:
    """Inverse of :func:`cursor_metrics` (None when the reply lacks it)."""
    if not all(key in metrics for key in CURSOR):
        return None
    return DataCursor(*(int(metrics[key]) for key in CURSOR))


def measurements_record(measured: Mapping[str, Sequence[float]]) -> ConfigRecord:
    """A probe reply's measurements: each candidate's (relative error, message bytes)."""
    table = {label: [float(m[0]), int(m[1])] for label, m in measured.items()}
    return ConfigRecord({"measurements": json.dumps(table, sort_keys=True)})


def read_measurements(content: RecordDict) -> dict[str, tuple[float, int]]:
    """Inverse of :func:`measurements_record`, with a clear error for a malformed reply."""
    try:
        table = json.loads(str(content.config_records[BUDGET]["measurements"]))
        return {str(k): (float(v[0]), int(v[1])) for k, v in table.items()}
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"probe reply lacks readable {BUDGET!r} measurements: {err}") from None


# -- arrays ----------------------------------------------------------------------------------
def payload_array(blob: bytes) -> Array:
    """Wrap codec payload bytes as an Array that Flower carries untouched."""
    return Array(dtype="uint8", shape=(len(blob),), stype=PAYLOAD_STYPE, data=blob)


def payload_bytes(array: Array) -> bytes:
    """The payload bytes inside an Array made by :func:`payload_array`."""
    if not isinstance(array, Array) or array.stype != PAYLOAD_STYPE:
        stype = getattr(array, "stype", type(array).__name__)
        raise ValueError(f"expected an Array of stype {PAYLOAD_STYPE!r}, got {stype!r}")
    return bytes(array.data)


def tensor_array(tensor: torch.Tensor) -> Array:
    """A tensor as a numpy-backed Array (weights, labels)."""
    return Array(tensor.detach().cpu().contiguous().numpy())


def array_tensor(array: Array) -> torch.Tensor:
    """The tensor inside an Array made by :func:`tensor_array` (a writable copy)."""
    try:
        return torch.from_numpy(np.array(array.numpy(), copy=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"array does not hold a numpy tensor: {err}") from None


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict (weights, buffers, momentum) as an ArrayRecord, keys kept in order."""
    return ArrayRecord({key: tensor_array(value) for key, value in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_record`."""
    return {key: array_tensor(value) for key, value in record.items()}


# -- uplink and downlink records -------------------------------------------------------------
def smashed_record(batches: Sequence[EncodedBatch]) -> ArrayRecord:
    """The uplink record of a block: compressed activations and labels of each batch."""
    record = ArrayRecord()
    for j, batch in enumerate(batches):
        record[f"activations.{j}"] = payload_array(batch.blob)
        record[f"labels.{j}"] = tensor_array(batch.labels)
    return record


def smashed_metrics(batches: Sequence[EncodedBatch]) -> dict[str, float | list[float]]:
    """The uplink metrics of a block (raw size and per-batch compression errors)."""
    return {
        RAW_BYTES: float(sum(b.raw_nbytes for b in batches)),
        COMPRESSION_ERROR: [b.error for b in batches],
    }


def read_smashed(content: RecordDict, client_id: int = 0) -> ClientUpload:
    """A client's upload from its reply; ValueError naming what is missing or malformed."""
    if SMASHED not in content.array_records:
        raise ValueError(f"reply lacks the {SMASHED!r} ArrayRecord of activations")
    record = content.array_records[SMASHED]
    count = sum(1 for key in record if key.startswith("activations."))
    blobs, labels = [], []
    for j in range(count):
        if f"activations.{j}" not in record or f"labels.{j}" not in record:
            raise ValueError(f"reply lacks activations.{j} or labels.{j}")
        blobs.append(payload_bytes(record[f"activations.{j}"]))
        labels.append(array_tensor(record[f"labels.{j}"]))
    metrics = content.metric_records.get(METRICS, MetricRecord())
    errors = metrics.get(COMPRESSION_ERROR, [])
    errors = [float(e) for e in errors] if isinstance(errors, list) else [float(errors)]
    raw = metrics.get(RAW_BYTES, 0.0)
    return ClientUpload(
        client_id=client_id,
        blobs=blobs,
        labels=labels,
        raw_nbytes=float(raw) if isinstance(raw, int | float) else 0.0,
        errors=errors,
    )


def gradient_record(blobs: Sequence[bytes]) -> ArrayRecord:
    """The downlink record: one gradient (downlink codec bytes) per pending batch."""
    return ArrayRecord({f"gradient.{j}": payload_array(blob) for j, blob in enumerate(blobs)})


def read_gradients(content: RecordDict) -> list[bytes]:
    """The gradients of a split_step/split_end message, in batch order."""
    if GRADIENT not in content.array_records:
        raise ValueError(f"message lacks the {GRADIENT!r} ArrayRecord")
    record = content.array_records[GRADIENT]
    blobs = []
    for j in range(len(record)):
        if f"gradient.{j}" not in record:
            raise ValueError(f"gradient record lacks gradient.{j}; it holds {list(record)}")
        blobs.append(payload_bytes(record[f"gradient.{j}"]))
    return blobs


# -- client state in context.state -----------------------------------------------------------
def client_state_records(state: ClientState) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records a client's state occupies in ``context.state``."""
    cursor = ConfigRecord(
        {
            "epoch": state.epoch,
            "position": state.position,
            "updates": state.updates,
            "pending": [value for key in state.pending for value in key],
        }
    )
    return {
        STATE_WEIGHTS: state_to_record(state.weights),
        STATE_MOMENTUM: state_to_record(state.momentum),
        STATE_CURSOR: cursor,
    }


def client_cursor_records(cursor: DataCursor) -> dict[str, ConfigRecord]:
    """What a node keeps between rounds: only its data cursor (weights come with the round)."""
    epoch, position, updates = cursor
    return {
        STATE_CURSOR: ConfigRecord(
            {"epoch": epoch, "position": position, "updates": updates, "pending": []}
        )
    }


def client_cursor_from_records(records: RecordDict) -> DataCursor | None:
    """The data cursor a node kept, or None on its first round."""
    if STATE_CURSOR not in records.config_records:
        return None
    cursor = records.config_records[STATE_CURSOR]
    return DataCursor(
        config_int(cursor, "epoch"),
        config_int(cursor, "position"),
        config_int(cursor, "updates", 0),
    )


def client_state_from_records(records: RecordDict) -> ClientState | None:
    """Read back what :func:`client_state_records` stored; None when no round is under way."""
    if STATE_WEIGHTS not in records.array_records:
        return None
    cursor = records.config_records[STATE_CURSOR]
    flat = [int(v) for v in cursor.get("pending", [])]  # type: ignore[union-attr]
    pending = [BatchKey(*flat[i : i + 4]) for i in range(0, len(flat), 4)]
    return ClientState(
        weights=record_to_state(records.array_records[STATE_WEIGHTS]),
        momentum=record_to_state(records.array_records[STATE_MOMENTUM]),
        epoch=config_int(cursor, "epoch"),
        position=config_int(cursor, "position"),
        updates=config_int(cursor, "updates", 0),
        pending=pending,
    )
