import copy

import pytest
import torch
from flwr.app import RecordDict

from flwr_splitms.client import (
    ClientState,
    SplitClientCore,
    StepSettings,
    augment_generator,
    batch_positions,
    take_batch,
)
from flwr_splitms.codecs import decode_bytes
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model, client_data


def settings(config: SplitConfig, server_round: int = 1) -> StepSettings:
    return StepSettings(
        server_round=server_round,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=config.batch_size,
        seed=config.seed,
        augment=True,
        codec_name="ms",
        codec_params={"ratio": 0.9, "bits": 2},
    )


def test_step_settings_travel_in_a_config_record(tiny_config: SplitConfig) -> None:
    original = settings(tiny_config, server_round=4)
    assert StepSettings.from_config(original.to_config()) == original


def test_client_state_round_trips_through_context_state() -> None:
    state = ClientState(
        weights={"w": torch.randn(3, 2), "n": torch.tensor(5)},
        momentum={"w": torch.randn(3, 2)},
        epoch=2,
        position=12,
        pending=(2, 8, 3, 1),
    )
    records = RecordDict()
    for key, record in state.to_records().items():
        records[key] = record
    back = ClientState.from_records(records)
    assert back is not None
    assert (back.epoch, back.position, back.pending) == (2, 12, (2, 8, 3, 1))
    assert torch.equal(back.weights["w"], state.weights["w"])
    assert torch.equal(back.weights["n"], state.weights["n"])
    assert torch.equal(back.momentum["w"], state.momentum["w"])
    assert ClientState.from_records(RecordDict()) is None


def test_recomputed_backward_equals_one_autograd_pass(tiny_config: SplitConfig) -> None:
    """Forward now, backward one message later: same weights and BN statistics as a live graph."""
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    step = settings(tiny_config)
    core = SplitClientCore(copy.deepcopy(client_net), train, client_id=0)
    state = core.start_round(client_net.state_dict(), None)
    batch = core.forward(state, step, step=0)
    gradient = torch.randn_like(decode_bytes(batch.blob))
    core.backward(state, step, gradient)

    # Reference: the same batch through one live autograd graph.
    reference = copy.deepcopy(client_net)
    positions = batch_positions(len(train), step.batch_size, step.seed, 0, 0, 0)
    x, y = train.batch(positions, augment=True, generator=augment_generator(step.seed, 0, 1, 0))
    assert torch.equal(y, batch.labels)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference.train()
    reference(x).backward(gradient)
    optimizer.step()
    for key, value in reference.state_dict().items():
        assert torch.equal(state.weights[key], value), key
    tracked = [v for k, v in state.weights.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 1 for t in tracked)  # BN statistics updated once
    assert state.pending is None and set(state.momentum) == {
        k for k, _ in reference.named_parameters()
    }


def test_gradient_without_a_pending_batch_is_refused(tiny_config: SplitConfig) -> None:
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    core = SplitClientCore(client_net, train, client_id=0)
    state = core.start_round(client_net.state_dict(), None)
    with pytest.raises(ValueError, match="no pending batch"):
        core.backward(state, settings(tiny_config), torch.zeros(4, 64, 32, 32))


def test_gradient_of_the_wrong_shape_is_refused(tiny_config: SplitConfig) -> None:
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    core = SplitClientCore(client_net, train, client_id=0)
    state = core.start_round(client_net.state_dict(), None)
    core.forward(state, settings(tiny_config), step=0)
    with pytest.raises(ValueError, match="does not match the activations"):
        core.backward(state, settings(tiny_config), torch.zeros(2, 2))


def test_data_order_walks_epochs_and_drops_the_short_tail() -> None:
    assert take_batch(10, 4, 0, 0) == (0, 0)
    assert take_batch(10, 4, 0, 4) == (0, 4)
    assert take_batch(10, 4, 0, 8) == (1, 0)  # 2 left < 4: next epoch
    with pytest.raises(ValueError, match="fewer than batch-size 4"):
        take_batch(3, 4, 0, 0, client_id=7)
    first = batch_positions(10, 4, seed=1, client_id=0, epoch=0, position=0)
    again = batch_positions(10, 4, seed=1, client_id=0, epoch=0, position=0)
    other = batch_positions(10, 10, seed=1, client_id=0, epoch=1, position=0)
    assert torch.equal(first, again) and sorted(other.tolist()) == list(range(10))
