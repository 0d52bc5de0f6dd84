"""Which Flower strategies can aggregate the client halves of a split network, and by name.

``MSSplitStrategy(aggregator=...)`` hands node sampling and the aggregation of the returned
client-side weights to a Flower Message-API strategy. That works for every strategy whose work
is all on the server (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan, server-side DP wrappers). Strategies that need the client to do
something the split client does not (FedProx's proximal term, client-side clipping, a training
loss per client, XGBoost trees) are refused at construction, naming why.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flower

from flwr_splitms.config import AGGREGATORS
from flwr_splitms.protocol import CLIENT_ONLY_METRICS

__all__ = [
    "AGGREGATORS",
    "aggregate_client_halves",
    "aggregator_from_name",
    "cast_like",
    "check_aggregator",
    "drawing_from",
]

_CLIENT_SIDE: dict[str, str] = {
    "FedProx": "adds a proximal term to each client's loss",
    "DifferentialPrivacyClientSideFixedClipping": "clips updates on the client (a client mod)",
    "DifferentialPrivacyClientSideAdaptiveClipping": "clips updates on the client (a mod)",
    "QFedAvg": "needs each client's training loss, which the split server computes, not the client",
    "FedXgbBagging": "aggregates XGBoost trees, not tensors",
    "FedXgbCyclic": "aggregates XGBoost trees, not tensors",
}


def check_aggregator(aggregator: Any) -> Any:
    """``aggregator`` if it can aggregate split clients (None stays None); else a clear error."""
    if aggregator is None:
        return None
    inner = aggregator
    while inner is not None:
        for cls in type(inner).__mro__:
            if cls.__name__ in _CLIENT_SIDE:
                raise ValueError(
                    f"aggregator {type(inner).__name__} {_CLIENT_SIDE[cls.__name__]}, which the "
                    "split client does not do; use a strategy that works on the server only "
                    f"({', '.join(AGGREGATORS.values())} or a server-side DP wrapper)"
                )
        inner = getattr(inner, "strategy", None)  # the strategy a DP wrapper wraps
    for hook in ("configure_train", "aggregate_train", "summary"):
        if not callable(getattr(aggregator, hook, None)):
            raise TypeError(
                f"aggregator {aggregator!r} has no {hook}(): pass a Flower Message-API "
                "strategy (flwr.serverapp.strategy), e.g. FedMedian()"
            )
    return aggregator


def aggregator_from_name(name: str, **params: Any) -> Any:
    """A Flower strategy by its run-config name (``fedadam``...), built with ``params``."""
    key = name.lower()
    if key not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    return getattr(flower, AGGREGATORS[key])(**params)


def cast_like(arrays: ArrayRecord, reference: Mapping[str, Array | np.dtype]) -> ArrayRecord:
    """Give aggregated arrays the clients' dtypes (FedAvg's sum comes back as float64).

    ``reference`` maps keys to the clients' Arrays (an ArrayRecord) or to their dtypes.
    """
    out = ArrayRecord()
    for key, value in arrays.items():
        ref = reference.get(key)
        dtype = np.dtype(ref.dtype) if isinstance(ref, Array) else ref
        array = value.numpy()
        if dtype is not None and array.dtype != dtype:
            array = np.rint(array) if np.issubdtype(dtype, np.integer) else array
            array = array.astype(dtype)
        out[key] = Array(np.array(array, order="C"))
    return out


@contextlib.contextmanager
def drawing_from(rng: random.Random) -> Iterator[None]:
    """Flower's node sampling draws from the global ``random``: seed it from ``rng`` for the
    call, and give the global state back afterwards."""
    saved = random.getstate()
    random.seed(rng.getrandbits(64))
    try:
        yield
    finally:
        random.setstate(saved)


def aggregate_client_halves(
    aggregate: Callable[[int, list[Message]], tuple[ArrayRecord | None, MetricRecord | None]],
    server_round: int,
    replies: Iterable[Message],
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """``aggregate`` (a strategy's ``aggregate_train``) on the round-end replies, with the
    clients' dtypes kept and the per-client facts (ids, data cursors) left out of the metrics."""
    replies = list(replies)
    dtypes = {
        key: np.dtype(array.dtype)
        for reply in replies[:1]
        if not reply.has_error()
        for key, array in next(iter(reply.content.array_records.values())).items()
    }
    arrays, metrics = aggregate(server_round, replies)
    if arrays is not None:
        arrays = cast_like(arrays, dtypes)
    for key in CLIENT_ONLY_METRICS:
        if metrics is not None and key in metrics:
            del metrics[key]
    return arrays, metrics
