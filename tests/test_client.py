import copy

import pytest
import torch
from flwr.app import RecordDict

from flwr_splitms import protocol as P
from flwr_splitms.codecs.downlink import get_grad_codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.core import ClientState, SplitClientCore, StepSettings
from flwr_splitms.core.batches import augment_generator, batch_positions, take_batch
from flwr_splitms.experiment import build_split_model, client_data


def settings(config: SplitConfig, server_round: int = 1, codec: str = "ms") -> StepSettings:
    return StepSettings(
        server_round=server_round,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=config.batch_size,
        seed=config.seed,
        augment=True,
        codec_name=codec,
        codec_params={"ratio": 0.9, "bits": 2} if codec == "ms" else {},
    )


def raw_gradients(batches: list, seed: int = 0) -> list[bytes]:  # type: ignore[type-arg]
    """Random gradients of the activations' shape, sent as grad codec ``none`` does."""
    codec = get_grad_codec("none")
    torch.manual_seed(seed)
    shape = (len(batches[0].labels), 64, 32, 32)
    return [codec.encode(torch.randn(shape)) for _ in batches]


def test_step_settings_travel_in_a_config_record(tiny_config: SplitConfig) -> None:
    original = settings(tiny_config, server_round=4)
    assert P.settings_from_config(P.settings_to_config(original)) == original


def test_client_state_round_trips_through_context_state() -> None:
    state = ClientState(
        weights={"w": torch.randn(3, 2), "n": torch.tensor(5)},
        momentum={"w": torch.randn(3, 2)},
        epoch=2,
        position=12,
        updates=9,
        pending=[(2, 8, 3, 1), (2, 12, 3, 2)],
    )
    records = RecordDict()
    for key, record in P.client_state_records(state).items():
        records[key] = record
    back = P.client_state_from_records(records)
    assert back is not None
    assert (back.epoch, back.position, back.updates, back.pending) == (
        2,
        12,
        9,
        [(2, 8, 3, 1), (2, 12, 3, 2)],
    )
    assert torch.equal(back.weights["w"], state.weights["w"])
    assert torch.equal(back.weights["n"], state.weights["n"])
    assert torch.equal(back.momentum["w"], state.momentum["w"])
    assert P.client_state_from_records(RecordDict()) is None


def test_recomputed_backward_equals_one_autograd_pass(tiny_config: SplitConfig) -> None:
    """Forward now, backward in a fresh process: same weights and BN statistics as a live graph."""
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    step = settings(tiny_config)
    core = SplitClientCore(copy.deepcopy(client_net), train, client_id=0, keep_graph=False)
    state = core.start_round(client_net.state_dict(), None)
    batches = core.forward(state, step, [0])
    gradients = raw_gradients(batches)
    core.backward(state, step, gradients)

    # Reference: the same batch through one live autograd graph.
    reference = copy.deepcopy(client_net)
    positions = batch_positions(len(train), step.batch_size, step.seed, 0, 0, 0)
    x, y = train.batch(positions, augment=True, generator=augment_generator(step.seed, 0, 1, 0))
    assert torch.equal(y, batches[0].labels)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference.train()
    reference(x).backward(get_grad_codec("none").decode(gradients[0]))
    optimizer.step()
    for key, value in reference.state_dict().items():
        assert torch.equal(state.weights[key], value), key
    tracked = [v for k, v in state.weights.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(t) == 1 for t in tracked)  # BN statistics updated once
    assert state.pending == [] and state.updates == 1
    assert set(state.momentum) == {k for k, _ in reference.named_parameters()}


@pytest.mark.parametrize("block", [1, 3])
def test_live_graph_and_recomputation_give_identical_weights(
    tiny_config: SplitConfig, block: int
) -> None:
    """The same node, once with its live graph kept and once as a fresh process per message."""
    config = tiny_config.replace(synthetic_size=128)
    client_net, _ = build_split_model(config)
    train, _ = client_data(config, 0, 2)
    step = settings(config, codec="rt")
    outcomes = []
    for keep_graph in (True, False):
        core = SplitClientCore(copy.deepcopy(client_net), train, client_id=0, keep_graph=keep_graph)
        state = core.start_round(client_net.state_dict(), None)
        blobs = []
        for first in (0, block):
            batches = core.forward(state, step, range(first, first + block))
            blobs.append([b.blob for b in batches])
            if not keep_graph:  # what a fresh process sees: the state read back from records
                records = RecordDict()
                for key, record in P.client_state_records(state).items():
                    records[key] = record
                back = P.client_state_from_records(records)
                assert back is not None
                state = back
            core.backward(state, step, raw_gradients(batches, seed=first))
        outcomes.append((state, blobs))
    (live, live_blobs), (recomputed, recomputed_blobs) = outcomes
    assert live_blobs == recomputed_blobs
    assert live.updates == recomputed.updates == 2 * block
    for key, value in live.weights.items():
        assert torch.equal(recomputed.weights[key], value), key
    for key, value in live.momentum.items():
        assert torch.equal(recomputed.momentum[key], value), key


def test_gradient_without_a_pending_batch_is_refused(tiny_config: SplitConfig) -> None:
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    core = SplitClientCore(client_net, train, client_id=0)
    state = core.start_round(client_net.state_dict(), None)
    blob = get_grad_codec("none").encode(torch.zeros(4, 64, 32, 32))
    with pytest.raises(ValueError, match="no pending batch"):
        core.backward(state, settings(tiny_config), [blob])


def test_gradient_of_the_wrong_shape_or_count_is_refused(tiny_config: SplitConfig) -> None:
    client_net, _ = build_split_model(tiny_config)
    train, _ = client_data(tiny_config, 0, 2)
    core = SplitClientCore(client_net, train, client_id=0)
    state = core.start_round(client_net.state_dict(), None)
    core.forward(state, settings(tiny_config), [0])
    wrong = get_grad_codec("none").encode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not match the activations"):
        core.backward(state, settings(tiny_config), [wrong])
    with pytest.raises(ValueError, match="2 gradients for 1 pending"):
        core.backward(state, settings(tiny_config), [wrong, wrong])


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


def test_client_app_pickles_and_copies_share_the_process_cache(tiny_config: SplitConfig) -> None:
    """Ray unpickles the ClientApp for every message: the node's core must survive that."""
    from flwr.app import Context
    from ray import cloudpickle  # how Ray ships the ClientApp

    from flwr_splitms.client import SplitClient

    calls: list[int] = []

    def model_fn(context: Context):  # type: ignore[no-untyped-def]
        calls.append(1)
        return build_split_model(tiny_config)[0]

    client = SplitClient(model_fn, lambda context: client_data(tiny_config, 0, 2))
    context = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    core, built = client.core(context)
    copy_ = cloudpickle.loads(cloudpickle.dumps(client))
    again, rebuilt = copy_.core(context)
    assert again is core and rebuilt == 0.0 and built >= 0.0 and len(calls) == 1
    other = SplitClient(model_fn, lambda context: client_data(tiny_config, 0, 2))
    assert other.core(context)[0] is not core  # another app (another config) has its own cores
