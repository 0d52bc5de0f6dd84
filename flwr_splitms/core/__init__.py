"""The SplitFed math free of Flower: the client half, the server half and round accounting.

Both engines drive these pieces: the Flower adapters (``flwr_splitms.client`` and
``flwr_splitms.strategy``) move their inputs and outputs through messages, and the local engine
(``flwr_splitms.local``) calls them directly in one process. Nothing here imports Flower.
"""

from flwr_splitms.core.accounting import RoundAccumulator
from flwr_splitms.core.aggregation import fedavg
from flwr_splitms.core.client_half import ClientState, EncodedBatch, SplitClientCore
from flwr_splitms.core.schedule import lr_at_round, plan_blocks
from flwr_splitms.core.server_half import (
    SplitServerCore,
    StepOutcome,
    UplinkError,
    evaluate_split,
    server_step,
)
from flwr_splitms.core.settings import StepSettings

__all__ = [
    "ClientState",
    "EncodedBatch",
    "RoundAccumulator",
    "SplitClientCore",
    "SplitServerCore",
    "StepOutcome",
    "StepSettings",
    "UplinkError",
    "evaluate_split",
    "fedavg",
    "lr_at_round",
    "plan_blocks",
    "server_step",
]
