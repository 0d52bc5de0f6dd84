"""The proof that the protocol is right: Flower and the local engine give the same training.

The local engine keeps each batch's autograd graph alive; the ClientApp recomputes the forward pass
one message later, restores BatchNorm statistics and round-trips its state through
``context.state``. Same seeds, same order of operations: the weights must agree.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms import protocol as P
from flwr_splitms.config import SplitConfig
from flwr_splitms.local import run_local


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), key


def assert_same_run(result, strat, local) -> None:  # type: ignore[no-untyped-def]
    """Bit for bit: weights of both halves, losses, bytes and errors."""
    assert_same_state(P.record_to_state(result.arrays), local.client_weights, atol=0)
    assert_same_state(strat.server_model.state_dict(), local.server_weights, atol=0)
    for column in ("train_loss", "uplink_bytes", "downlink_bytes", "total_bytes", "steps"):
        assert result.history[column].tolist() == local.history[column].tolist(), column
    assert result.history["compression_error"].tolist() == pytest.approx(
        local.history["compression_error"].tolist(), nan_ok=True
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"codec": "none"},
        {"codec": "ms"},
        {"codec": "rt"},
        {"codec": "ms", "steps_per_round": 5, "steps_per_message": 2, "error_every": 2},
        {"codec": "ms", "steps_per_round": 0, "steps_per_message": 3, "synthetic_size": 96},
        {"codec": "ms", "grad_codec": "fp16"},
        {"codec": "ms", "grad_codec": "mask"},
        {"codec": "ms", "grad_codec": "rt", "grad_codec_ratio": 0.9},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_message_protocol_equals_local_engine(tiny_config: SplitConfig, changes: dict) -> None:  # type: ignore[type-arg]
    config = tiny_config.replace(**changes)
    local = run_local(config, 2, evaluate=False)
    client_net, strat = strategy(config)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    result = strat.start(grid, P.state_to_record(client_net.state_dict()), num_rounds=2)
    assert_same_run(result, strat, local)


def test_flower_simulation_equals_local_engine(tiny_config: SplitConfig) -> None:
    """Two rounds through Flower's simulation engine (Ray) against the local engine."""
    config = tiny_config.replace(codec="none")
    out: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        client_net, strat = strategy(config)
        out["result"] = strat.start(
            grid, P.state_to_record(client_net.state_dict()), num_rounds=2, timeout=300
        )
        out["server"] = strat.server_model.state_dict()

    run_simulation(
        server_app=server,
        client_app=client_app(config),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    local = run_local(config, 2, evaluate=False)
    result = out["result"]
    assert_same_state(P.record_to_state(result.arrays), local.client_weights, atol=1e-5)  # type: ignore[attr-defined]
    assert_same_state(out["server"], local.server_weights, atol=1e-5)  # type: ignore[arg-type]
    assert result.history["train_loss"].tolist() == pytest.approx(  # type: ignore[attr-defined]
        local.history["train_loss"].tolist(), rel=1e-5
    )
