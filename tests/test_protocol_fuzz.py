"""Message readers refuse malformed records with ValueError, never a crash or a huge allocation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from flwr_splitms import protocol as P
from flwr_splitms.core import SplitServerCore, StepSettings
from flwr_splitms.core.client_half import EncodedBatch
from flwr_splitms.core.link import link_for

SETTINGS = StepSettings(
    server_round=1,
    lr=0.1,
    momentum=0.0,
    weight_decay=0.0,
    batch_size=4,
    seed=0,
    augment=False,
    codec_name="ms",
    codec_params={"ratio": 0.9},
    grad_codec_name="mask",
)


def _valid_reply() -> tuple[RecordDict, torch.Tensor]:
    link = link_for(SETTINGS)
    x = torch.relu(torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    payload = link.uplink.encode(x)
    batch = EncodedBatch(payload.to_bytes(), torch.tensor([0, 1, 2, 1]), payload.raw_nbytes, 0.1)
    content = RecordDict(
        {
            P.SMASHED: P.smashed_record([batch]),
            P.METRICS: MetricRecord(P.smashed_metrics([batch])),  # type: ignore[arg-type]
        }
    )
    return content, x


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    kind = rng.randrange(4)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:  # extend
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # overwrite a header field with a huge value
        pos = rng.randrange(min(len(data), 40))
        data[pos : pos + 4] = b"\xff\xff\xff\x7f"
    return bytes(data)


def test_uplink_reader_and_server_check_refuse_mutated_records() -> None:
    rng = random.Random(1)
    content, _ = _valid_reply()
    link = link_for(SETTINGS)
    server = SplitServerCore(
        nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), lr=0.1, momentum=0.0, weight_decay=0.0
    )
    blob = P.payload_bytes(content.array_records[P.SMASHED]["activations.0"])
    refused = 0
    for _ in range(3000):
        record = ArrayRecord(
            {
                "activations.0": P.payload_array(_mutate(blob, rng)),
                "labels.0": content.array_records[P.SMASHED]["labels.0"],
            }
        )
        if rng.random() < 0.1:  # structural damage: a missing or foreign entry
            choice = rng.randrange(4)
            if choice == 0:
                del record["labels.0"]
            elif choice == 1:
                record["activations.0"] = Array(np.zeros(3, np.float32))
            elif choice == 2:
                record["labels.0"] = Array(np.array([9.5, 1.0, 0.0, 1.0]))
            else:
                record["labels.0"] = Array(np.array(3))  # 0-d labels
        try:
            upload = P.read_smashed(RecordDict({P.SMASHED: record}))
            server.decode_upload(link, upload.blobs[0], upload.labels[0])
        except ValueError:
            refused += 1
    assert refused > 2500  # almost every mutation is caught (a flip in a value may still decode)


def test_gradient_reader_refuses_mutated_records() -> None:
    rng = random.Random(2)
    link = link_for(SETTINGS)
    _, x = _valid_reply()
    payload = link.uplink.encode(x)
    support = link.support(payload)
    blob = link.downlink.encode(torch.randn_like(x), support=support)
    content = RecordDict({P.GRADIENT: P.gradient_record([blob])})
    assert P.read_gradients(content)[0] == blob
    refused = 0
    for _ in range(3000):
        mutated = _mutate(blob, rng)
        try:
            blobs = P.read_gradients(RecordDict({P.GRADIENT: P.gradient_record([mutated])}))
            gradient = link.downlink.decode(blobs[0], support=support, shape=x.shape)
            assert gradient.shape == x.shape
        except ValueError:
            refused += 1
    assert refused > 2000  # value bytes of the mask blob may be flipped and still decode
    with pytest.raises(ValueError, match=r"lacks gradient\.0"):
        P.read_gradients(RecordDict({P.GRADIENT: ArrayRecord({"other": P.payload_array(blob)})}))
    with pytest.raises(ValueError, match="stype"):
        P.read_gradients(
            RecordDict({P.GRADIENT: ArrayRecord({"gradient.0": Array(np.zeros(2, np.float32))})})
        )
