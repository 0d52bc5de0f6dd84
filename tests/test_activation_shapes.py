"""Activations that are not the paper's images: the whole protocol for any rank and dtype.

The local engine and the ClientApp + strategy (on the in-process grid) must train the same
weights, bit for bit, when the cut-layer activation is ``batch x features`` (an MLP over tabular
data) or ``batch x tokens x hidden`` (a transformer), and when it is float16 or bfloat16 (a
client net that casts its output, or runs under ``torch.autocast``), for every codec. The
ClientApp is rebuilt for every message, as a deployment's process per message does, so the
client recomputes each forward pass instead of keeping its autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from inprocess_grid import InProcessGrid
from test_equivalence import assert_same_run
from torch import nn
from torch.utils.data import TensorDataset

from flwr_splitms import protocol as P
from flwr_splitms.client import make_client_app
from flwr_splitms.config import SplitConfig
from flwr_splitms.data import BatchSource, DataSplit, from_torch_dataset, partition
from flwr_splitms.local import LocalResult, run_local
from flwr_splitms.strategy import MSSplitStrategy, SplitResult

NUM_CLIENTS, NUM_CLASSES, SAMPLES, TOKENS, VOCAB = 2, 3, 32, 5, 20
CODECS = ("none", "ms", "sp", "qu", "rt")
DTYPES = ("float32", "float16", "bfloat16", "autocast")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "autocast": 2}


class CastTo(nn.Module):
    """The client's last stage: send the activations in ``dtype`` (half the bytes of float32)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class Autocast(nn.Module):
    """Runs ``body`` under CPU bfloat16 autocast (its Linear layers then output bfloat16)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = self.body(x)
        return out


class MeanOverTokens(nn.Module):
    """``batch x tokens x hidden`` -> ``batch x hidden`` (the server's first stage)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def build_nets(rank: int, dtype: str, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """A (client, server) pair whose cut activation has ``rank`` dims and the given dtype."""
    torch.manual_seed(0)
    client: nn.Module
    if rank == 2:
        client = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        server = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
    else:
        client = nn.Sequential(
            nn.Embedding(VOCAB, 8),
            nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True),
        )
        server = nn.Sequential(MeanOverTokens(), nn.Linear(8, NUM_CLASSES))
    if dtype == "autocast":  # a last Linear: autocast's LayerNorm alone would give float32
        client = Autocast(client if rank == 2 else nn.Sequential(client, nn.Linear(8, 8)))
    elif dtype != "float32":
        client = nn.Sequential(client, CastTo(getattr(torch, dtype)))
    return client, server


def client_sets(rank: int) -> list[BatchSource]:
    """One IID part per client of a seeded tensor data set (features, or token ids)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (SAMPLES,), generator=g)
    inputs = (
        torch.randn(SAMPLES, 6, generator=g)
        if rank == 2
        else torch.randint(0, VOCAB, (SAMPLES, TOKENS), generator=g)
    )
    source = from_torch_dataset(TensorDataset(inputs, labels), num_classes=NUM_CLASSES)
    parts = partition(source.labels, NUM_CLIENTS, seed=0)
    return [DataSplit(source, torch.from_numpy(p)) for p in parts]


class FreshAppPerMessage:
    """A new ClientApp for every message, like a deployment's process per message."""

    def __init__(self, make: Callable[[], ClientApp]) -> None:
        self.make = make

    def __call__(self, message: Message, context: Context) -> Message:
        return self.make()(message, context)


def run_both(
    config: SplitConfig, nets: Callable[[], tuple[nn.Module, nn.Module]], rank: int
) -> tuple[SplitResult, MSSplitStrategy, LocalResult]:
    """The same training by the local engine and by Flower messages on the in-process grid."""
    local = run_local(
        config, NUM_CLIENTS, evaluate=False, models=nets(), client_data=client_sets(rank)
    )
    parts = client_sets(rank)

    def app() -> ClientApp:
        return make_client_app(
            lambda context: nets()[0],
            lambda context: (parts[int(context.node_config["partition-id"])], None),
            device="cpu",
        )

    client_net, server_net = nets()
    strategy = MSSplitStrategy.from_config(config, server_net)
    grid = InProcessGrid(FreshAppPerMessage(app), NUM_CLIENTS)  # type: ignore[arg-type]
    result = strategy.start(
        grid, P.state_to_record(client_net.state_dict()), num_rounds=config.num_server_rounds
    )
    return result, strategy, local


def config_for(codec: str, **changes: object) -> SplitConfig:
    """Two rounds of two steps, batches of 4, on the CPU."""
    settings: dict[str, object] = {
        "batch_size": 4,
        "steps_per_round": 2,
        "num_server_rounds": 2,
        "lr": 0.05,
        "seed": 3,
        "device": "cpu",
    }
    return SplitConfig(codec=codec, **{**settings, **changes})


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [2, 3], ids=["batch-x-features", "batch-x-tokens-x-hidden"])
def test_protocol_equals_local_engine_for_any_rank_and_dtype(
    rank: int, dtype: str, codec: str
) -> None:
    result, strategy, local = run_both(config_for(codec), lambda: build_nets(rank, dtype), rank)
    assert_same_run(result, strategy, local)
    # The activations travel in their own dtype: float16/bfloat16 cost half of float32's bytes.
    per_example = 16 if rank == 2 else TOKENS * 8
    raw = NUM_CLIENTS * 2 * 4 * per_example * ITEMSIZE[dtype]  # clients x steps x batch
    assert result.history["uplink_raw_bytes"].tolist() == [raw, raw]
    assert local.history["uplink_raw_bytes"].tolist() == [raw, raw]


@pytest.mark.parametrize("grad_codec", ["fp16", "bf16", "mask"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_activations_with_gradient_codecs(dtype: str, grad_codec: str) -> None:
    """A half-precision cut with a compressed downlink (gradients cast to the activations')."""
    config = config_for("ms", grad_codec=grad_codec)
    result, strategy, local = run_both(config, lambda: build_nets(3, dtype), 3)
    assert_same_run(result, strategy, local)


def test_k_steps_per_message_with_bfloat16_tokens() -> None:
    """Blocks of K steps per round trip recompute K pending rank-3 bfloat16 forwards."""
    config = config_for("ms", steps_per_round=3, steps_per_message=2)
    result, strategy, local = run_both(config, lambda: build_nets(3, "bfloat16"), 3)
    assert_same_run(result, strategy, local)


def test_dropout_in_the_client_net_replays() -> None:
    """Expected behaviour: a client net with dropout trains the same in both engines.

    The recomputed forward must draw the dropout mask the sent activations were made with,
    or the client's update is the gradient of another network than the one the server saw.
    """
    result, strategy, local = run_both(
        config_for("none"), lambda: build_nets(3, "float32", dropout=0.1), 3
    )
    assert_same_run(result, strategy, local)
