"""The ClientApp adapter: Flower messages <-> the client half of SplitFed.

The math lives in :class:`flwr_splitms.core.SplitClientCore`; this module reads the round
settings and gradients out of messages, keeps the node's state in ``context.state`` (the only
thing that survives between messages in a deployment) and answers with the compressed
activations or, at round end, the client weights for FedAvg.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from flwr_splitms.capacity import CLIENT_CACHE_BYTES
from flwr_splitms.core.client_half import ClientState, EncodedBatch, SplitClientCore
from flwr_splitms.data import BatchSource
from flwr_splitms.protocol import (
    ARRAYS,
    BUDGET,
    BUDGET_BITS,
    BUDGET_SAMPLE,
    BUILD_SECONDS,
    CLIENT_FINISHED,
    CLIENT_ID,
    CLIENT_SECONDS,
    CLIENT_STARTED,
    CONFIG,
    MAX_EXAMPLES,
    METRICS,
    NUM_BATCHES,
    NUM_EXAMPLES,
    PROCESS_SECONDS,
    SMASHED,
    SPLIT_BEGIN,
    STATE_MOMENTUM,
    STATE_WEIGHTS,
    STEP,
    client_cursor_from_records,
    client_cursor_records,
    client_state_from_records,
    client_state_records,
    config_int,
    config_value,
    cursor_from_table,
    cursor_metrics,
    failure_kind,
    measurements_record,
    only_record,
    read_gradients,
    record_to_state,
    settings_from_config,
    smashed_metrics,
    smashed_record,
    state_to_record,
)

ModelFn = Callable[[Context], nn.Module]
DataFn = Callable[[Context], tuple[BatchSource, BatchSource | None]]
Handler = Callable[["SplitClient", Message, Context], Message]

log = logging.getLogger("flwr")
CLIENT_ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
MAX_CACHED_CORES = 256  # nodes whose model and data one process keeps (oldest dropped first)
CACHE_ENV = "FLWR_SPLITMS_CLIENT_CACHE_MB"
_REPORTED: set[str] = set()  # errors whose traceback this process has logged once


def cache_bytes_from_env() -> int:
    """The per-process bound of cached client halves: ``$FLWR_SPLITMS_CLIENT_CACHE_MB`` MiB.

    Default :data:`flwr_splitms.capacity.CLIENT_CACHE_BYTES` (512 MiB); 0 keeps no idle node.
    """
    value = os.environ.get(CACHE_ENV, "").strip()
    if not value:
        return CLIENT_CACHE_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(
            f"{CACHE_ENV}={value!r} is not a number; set it to the MiB one client process may "
            f"keep for idle nodes (default {CLIENT_CACHE_BYTES // 2**20})"
        ) from None
    if not math.isfinite(megabytes) or megabytes < 0:
        raise ValueError(f"{CACHE_ENV}={value!r} must be a finite number >= 0 (MiB)")
    return int(megabytes * 2**20)


def held_nbytes(*objects: object, depth: int = 4) -> int:
    """Bytes of the tensors and arrays reachable from ``objects`` (attributes, containers).

    Each storage counts once; parameters and buffers of a module count through its
    ``state_dict``. Used to size cache entries, so it errs on the side of counting.
    """
    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def visit(obj: object, level: int) -> None:
        nonlocal total
        if id(obj) in visited or level > depth:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            if id(base) not in seen:
                seen.add(id(base))
                total += int(obj.nbytes if base is obj else getattr(base, "nbytes", obj.nbytes))
        elif isinstance(obj, nn.Module):
            for tensor in obj.state_dict().values():
                visit(tensor, level)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, level + 1)
        elif isinstance(obj, list | tuple | set):
            for value in obj:
                visit(value, level + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                visit(value, level + 1)

    for obj in objects:
        visit(obj, 0)
    return total


class CoreCache:
    """The client halves this process keeps, least recently used first out, bounded twice.

    At most ``max_cores`` entries and ``max_bytes`` bytes (each entry sized once, when it is
    added: its model, the state it holds and its data). The entry just added or used is never
    dropped, so one node always fits; a dropped node is rebuilt from its factories (the
    partition from the disk cache) and recomputes its forward pass if it was mid-block.
    """

    def __init__(self, max_cores: int = MAX_CACHED_CORES, max_bytes: int | None = None) -> None:
        self.max_cores = max_cores
        self.max_bytes = cache_bytes_from_env() if max_bytes is None else max_bytes
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0
        self.evicted = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable) -> Any | None:
        """The entry for ``key`` (now the most recently used), or None."""
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key][0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Add ``value`` (``nbytes`` bytes); drop the least recently used until the bounds hold."""
        if key in self.entries:
            self.nbytes -= self.entries.pop(key)[1]
        self.entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_cores or self.nbytes > self.max_bytes
        ):
            _, (_, dropped) = self.entries.popitem(last=False)
            self.nbytes -= dropped
            if not self.evicted:
                log.info(
                    "Client cache of process %d is full (%d client halves, %.0f MiB; bounds %d "
                    "and %.0f MiB, %s): the least recently used nodes are dropped and rebuilt "
                    "when sampled again",
                    os.getpid(),
                    len(self.entries) + 1,
                    (self.nbytes + dropped) / 2**20,
                    self.max_cores,
                    self.max_bytes / 2**20,
                    CACHE_ENV,
                )
            self.evicted += 1


_CORES = CoreCache()


def answers_errors(handler: Handler) -> Handler:
    """Turn an exception in a handler into an error reply with a one-line reason.

    The strategy drops the node (or stops the run when every client fails the same way); the
    traceback is logged once per distinct error and process, not once per client and round.
    """

    @functools.wraps(handler)
    def wrapped(self: SplitClient, msg: Message, context: Context) -> Message:
        try:
            return handler(self, msg, context)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            if failure_kind(reason) not in _REPORTED:
                _REPORTED.add(failure_kind(reason))
                log.error(
                    "%s failed on node %s", msg.metadata.message_type, context.node_id, exc_info=err
                )
            return Message(Error(code=CLIENT_ERROR_CODE, reason=reason), reply_to=msg)

    return wrapped


def client_id_of(context: Context) -> int:
    """The participant's stable id: its ``partition-id`` when the node has one, else node id."""
    partition = context.node_config.get("partition-id")
    return int(partition) if partition is not None else int(context.node_id)


def _process_age() -> float:
    """Seconds since this process started (a deployment starts one per message); NaN off Linux.

    Read from ``/proc`` in clock ticks: psutil's start time is rounded to whole seconds.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as stat, open("/proc/uptime") as up:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            uptime = float(up.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class SplitClient:
    """Registers the split protocol's handlers on a ``ClientApp``.

    ``model_fn(context)`` builds the client-side network (its weights are replaced by the global
    ones at every round start); ``data_fn(context)`` returns the node's training data and an
    optional local test split. Both are called once per node and process, then cached in a
    :class:`CoreCache` bounded by :data:`MAX_CACHED_CORES` nodes and
    ``$FLWR_SPLITMS_CLIENT_CACHE_MB`` MiB (default 512) per process.
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``;
    None reads the run-config key ``device`` (default ``"auto"``).
    """

    def __init__(self, model_fn: ModelFn, data_fn: DataFn, *, device: str | None = None) -> None:
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.device = device
        self.token = uuid.uuid4().hex  # survives pickling: copies of this app share its cores

    def core(self, context: Context) -> tuple[SplitClientCore, float]:
        """The node's cached core and the seconds spent building it now (0 when cached).

        The cache lives in this module, not on the instance: Flower's simulation engine unpickles
        the ClientApp for every message, and the model, data and live autograd graph must
        survive that within a process.
        """
        key = (self.token, int(context.run_id), int(context.node_id))
        with _CORES.lock:
            cached = _CORES.get(key)
            if cached is not None:
                return cached, 0.0
            started = time.perf_counter()
            train, test = self.data_fn(context)
            device = self.device or str(context.run_config.get("device", "auto"))
            core = SplitClientCore(
                self.model_fn(context), train, test, client_id=client_id_of(context), device=device
            )
            # sized as it will sit idle: the model, the weights and momentum it holds, its data
            model_bytes = held_nbytes(core.model)
            _CORES.put(key, core, 3 * model_bytes + held_nbytes(train, test))
            return core, time.perf_counter() - started

    def register(self, app: ClientApp) -> ClientApp:
        """Add the ``train.split_*`` and ``evaluate.split`` handlers to ``app``."""
        app.train("split_probe")(self.on_probe)
        app.train("split_begin")(self.on_begin)
        app.train("split_step")(self.on_step)
        app.train("split_end")(self.on_end)
        app.evaluate("split")(self.on_evaluate)
        return app

    # -- handlers -----------------------------------------------------------------------------
    @answers_errors
    def on_probe(self, msg: Message, context: Context) -> Message:
        """codec = "budget": measure the candidate codecs on the round's first batch."""
        core, _ = self.core(context)
        config = _config(msg)
        weights = record_to_state(only_record(msg.content.array_records, ARRAYS, "array"))
        cursor = cursor_from_table(config, core.client_id)
        measured = core.probe(
            weights,
            cursor or client_cursor_from_records(context.state),
            settings_from_config(config),
            budget_bits=float(config_value(config, BUDGET_BITS)),
            sample=config_int(config, BUDGET_SAMPLE),
        )
        metrics = MetricRecord({CLIENT_ID: core.client_id})
        content = RecordDict({BUDGET: measurements_record(measured), METRICS: metrics})
        return Message(content, reply_to=msg)

    @answers_errors
    def on_begin(self, msg: Message, context: Context) -> Message:
        """Round start: adopt the global weights and send the first batches' activations."""
        age, started = _process_age(), time.perf_counter()
        core, build = self.core(context)
        config = _config(msg)
        settings = settings_from_config(config)
        weights = record_to_state(only_record(msg.content.array_records, ARRAYS, "array"))
        cursor = cursor_from_table(config, core.client_id)
        state = core.start_round(weights, cursor or client_cursor_from_records(context.state))
        count = config_int(config, NUM_BATCHES, 1)
        batches = core.forward(state, settings, range(count))
        return self._smashed_reply(msg, context, core, state, batches, (age, build, started))

    @answers_errors
    def on_step(self, msg: Message, context: Context) -> Message:
        """A step: apply the gradients of the pending batches, then send the next batches."""
        age, started = _process_age(), time.perf_counter()
        core, build = self.core(context)
        config = _config(msg)
        settings = settings_from_config(config)
        state = self._state(msg, context)
        core.backward(state, settings, read_gradients(msg.content))
        first, count = config_int(config, STEP), config_int(config, NUM_BATCHES, 1)
        batches = core.forward(state, settings, range(first, first + count))
        return self._smashed_reply(msg, context, core, state, batches, (age, build, started))

    @answers_errors
    def on_end(self, msg: Message, context: Context) -> Message:
        """Round end: apply the last gradients and return the weights for FedAvg."""
        age, started = _process_age(), time.perf_counter()
        core, build = self.core(context)
        config = _config(msg)
        settings = settings_from_config(config)
        state = self._state(msg, context)
        core.backward(state, settings, read_gradients(msg.content), round_end=True)
        for key in (STATE_WEIGHTS, STATE_MOMENTUM):  # the next round brings its weights
            if key in context.state:
                del context.state[key]
        for key, record in client_cursor_records(core.cursor(state)).items():
            context.state[key] = record
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: config_int(config, STEP) * settings.batch_size,
                **cursor_metrics(core.cursor(state)),
                **_timing(core, (age, build, started)),
            }
        )
        content = RecordDict({ARRAYS: state_to_record(state.weights), METRICS: metrics})
        return Message(content, reply_to=msg)

    @answers_errors
    def on_evaluate(self, msg: Message, context: Context) -> Message:
        """Federated evaluation: compressed activations of the local test split."""
        age, started = _process_age(), time.perf_counter()
        core, build = self.core(context)
        config = _config(msg)
        settings = settings_from_config(config)
        weights = record_to_state(only_record(msg.content.array_records, ARRAYS, "array"))
        batches = core.evaluate(weights, settings, config_int(config, MAX_EXAMPLES, 0))
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: sum(len(b.labels) for b in batches),
                **_timing(core, (age, build, started)),
            }
        )
        content = RecordDict({SMASHED: smashed_record(batches), METRICS: metrics})
        return Message(content, reply_to=msg)

    # -- helpers ------------------------------------------------------------------------------
    def _state(self, msg: Message, context: Context) -> ClientState:
        state = client_state_from_records(context.state)
        if state is None:
            raise ValueError(
                f"node {context.node_id} got {msg.metadata.message_type} before "
                f"{SPLIT_BEGIN}; its state was lost (node restarted?)"
            )
        return state

    def _store(self, context: Context, state: ClientState) -> None:
        for key, record in client_state_records(state).items():
            context.state[key] = record

    def _smashed_reply(
        self,
        msg: Message,
        context: Context,
        core: SplitClientCore,
        state: ClientState,
        batches: Sequence[EncodedBatch],
        timing: tuple[float, float, float],
    ) -> Message:
        self._store(context, state)
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: len(core.train_data),
                **smashed_metrics(batches),
                **_timing(core, timing),
            }
        )
        content = RecordDict({SMASHED: smashed_record(batches), METRICS: metrics})
        return Message(content, reply_to=msg)


def _config(msg: Message) -> ConfigRecord:
    config: ConfigRecord = only_record(msg.content.config_records, CONFIG, "config")
    return config


def _timing(core: SplitClientCore, timing: tuple[float, float, float]) -> dict[str, float]:
    age, build, started = timing
    seconds = time.perf_counter() - started
    finished = time.time()
    return {
        CLIENT_ID: core.client_id,
        CLIENT_SECONDS: seconds,
        CLIENT_STARTED: finished - seconds,  # wall clock: the strategy merges the intervals
        CLIENT_FINISHED: finished,
        BUILD_SECONDS: build,
        PROCESS_SECONDS: age,
    }


def make_client_app(model_fn: ModelFn, data_fn: DataFn, *, device: str | None = None) -> ClientApp:
    """A ClientApp that speaks the split protocol, from a model factory and a data factory.

    ``device`` as in :class:`SplitClient` (None: the run-config's ``device``, else ``"auto"``).
    """
    return SplitClient(model_fn, data_fn, device=device).register(ClientApp())


__all__ = [
    "CoreCache",
    "SplitClient",
    "cache_bytes_from_env",
    "client_id_of",
    "held_nbytes",
    "make_client_app",
]
