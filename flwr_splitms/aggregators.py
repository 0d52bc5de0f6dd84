"""Which Flower strategies can aggregate the client halves of a split network, and by name.

``MSSplitStrategy(aggregator=...)`` hands node sampling and the aggregation of the returned
client-side weights to a Flower Message-API strategy. That works for every strategy whose work
is all on the server (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan, server-side DP wrappers). Strategies that need the client to do
something the split client does not (FedProx's proximal term, client-side clipping, a training
loss per client, XGBoost trees) are refused at construction, naming why.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flower

__all__ = ["AGGREGATORS", "aggregator_from_name", "check_aggregator"]

_CLIENT_SIDE: dict[str, str] = {
    "FedProx": "adds a proximal term to each client's loss",
    "DifferentialPrivacyClientSideFixedClipping": "clips updates on the client (a client mod)",
    "DifferentialPrivacyClientSideAdaptiveClipping": "clips updates on the client (a mod)",
    "QFedAvg": "needs each client's training loss, which the split server computes, not the client",
    "FedXgbBagging": "aggregates XGBoost trees, not tensors",
    "FedXgbCyclic": "aggregates XGBoost trees, not tensors",
}

AGGREGATORS: dict[str, str] = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "bulyan": "Bulyan",
}
"""Run-config names of the Flower strategies the example app can aggregate with."""


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
