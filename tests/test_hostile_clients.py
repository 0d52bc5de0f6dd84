"""A client that sends garbage costs only itself: it is dropped, the server never trains on it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from flwr.app import Message
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms import protocol as P
from flwr_splitms.codecs import Payload, get_codec
from flwr_splitms.config import SplitConfig

BAD_NODE = 1001


def _replace_batch(reply: Message, blob: bytes | None = None, labels=None) -> Message:  # type: ignore[no-untyped-def]
    record = reply.content.array_records[P.SMASHED]
    if blob is not None:
        record["activations.0"] = P.payload_array(blob)
    if labels is not None:
        record["labels.0"] = P.tensor_array(labels)
    return reply


def _raw(tensor: torch.Tensor) -> bytes:
    return Payload(
        codec="none",
        params={},
        shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        sections=(tensor.numpy().tobytes(),),
    ).to_bytes()


def _original(reply: Message) -> tuple[bytes, torch.Tensor]:
    upload = P.read_smashed(reply.content)
    return upload.blobs[0], upload.labels[0]


def garbage(reply: Message) -> Message:
    return _replace_batch(reply, blob=b"FSMS" + bytes(range(60)))


def longer(reply: Message) -> Message:
    blob, _ = _original(reply)
    return _replace_batch(reply, blob=blob + b"\0" * 16)


def wrong_shape(reply: Message) -> Message:
    blob, _ = _original(reply)
    x = get_codec("none").decode(Payload.from_bytes(blob))
    return _replace_batch(reply, blob=_raw(x[:, :, :16, :16].contiguous()))


def not_finite(reply: Message) -> Message:
    blob, _ = _original(reply)
    x = get_codec("none").decode(Payload.from_bytes(blob)).clone()
    x[0, 0, 0, 0] = float("nan")
    return _replace_batch(reply, blob=_raw(x))


def bad_labels(reply: Message) -> Message:
    _, labels = _original(reply)
    return _replace_batch(reply, labels=labels + 1000)


CASES: dict[str, tuple[Callable[[Message], Message], str]] = {
    "garbage": (garbage, "payload does not decode"),
    "longer": (longer, "payload does not decode"),
    "shape": (wrong_shape, "per example, expected"),
    "nan": (not_finite, "NaN or Inf"),
    "labels": (bad_labels, "labels outside the classes"),
}


def _run(config: SplitConfig, grid: InProcessGrid):  # type: ignore[no-untyped-def]
    client_net, strat = strategy(config)
    result = strat.start(grid, P.state_to_record(client_net.state_dict()), num_rounds=1, timeout=2)
    return result, strat


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_upload_drops_only_that_client(
    tiny_config: SplitConfig, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    tamper, reason = CASES[case]
    config = tiny_config.replace(codec="none", num_server_rounds=1, steps_per_round=3)

    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    grid.tamper = lambda node, reply: (
        tamper(reply) if node == BAD_NODE and reply.metadata.message_type == P.SPLIT_STEP else reply
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result, strat = _run(config, grid)
    warnings = [line for line in caplog.text.splitlines() if "sent an unusable upload" in line]
    assert len(warnings) == 1 and f"Node {BAD_NODE} " in warnings[0] and reason in warnings[0]
    assert result.history["steps"].iloc[0] == 3 and result.train_metrics_clientapp

    # Reference: the same client goes silent at the same message instead of sending garbage.
    reference_grid = InProcessGrid(client_app(), 2, config.to_run_config())
    reference_grid.silent_after[BAD_NODE] = 1
    reference, reference_strat = _run(config, reference_grid)
    for key, value in reference_strat.server_model.state_dict().items():
        assert torch.equal(strat.server_model.state_dict()[key], value), key
    for key, value in P.record_to_state(reference.arrays).items():
        assert torch.equal(P.record_to_state(result.arrays)[key], value), key
