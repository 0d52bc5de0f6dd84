"""SplitFed in one process, without Flower: the ground truth and the engine for quick studies.

Same models, codec, seeds, data order and order of operations as the Flower path, but written
independently of the client's message handlers: every client keeps its live model and optimizer,
and the autograd graph of a batch simply survives until the server's gradient comes back. The
equivalence test runs both and compares weights and losses, which checks the protocol's
recomputation, BatchNorm restore and state round trips.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from flwr_splitms.client import augment_generator, batch_positions, codec_generator, take_batch
from flwr_splitms.codecs import compression_error, decode_bytes, get_codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model, client_data, evaluation_data
from flwr_splitms.history import HISTORY_COLUMNS
from flwr_splitms.strategy import (
    StepProgress,
    evaluate_split,
    lr_at_round,
    server_step,
)

log = logging.getLogger("flwr")


@dataclass
class LocalResult:
    """Outcome of :func:`run_local`."""

    history: pd.DataFrame
    client_weights: dict[str, torch.Tensor]
    server_weights: dict[str, torch.Tensor]
    config: SplitConfig = field(repr=False)


@dataclass
class _Client:
    client_id: int
    model: nn.Module
    optimizer: torch.optim.SGD
    data: object
    epoch: int = 0
    position: int = 0


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts, computed as Flower's FedAvg does, cast back to dtype."""
    total = sum(weights)
    factors = [w / total for w in weights]
    out: dict[str, torch.Tensor] = {}
    for key, reference in states[0].items():
        acc = states[0][key].numpy() * factors[0]
        for state, factor in zip(states[1:], factors[1:], strict=True):
            acc += state[key].numpy() * factor
        dtype = reference.numpy().dtype
        if np.issubdtype(dtype, np.integer):
            acc = np.rint(acc)
        out[key] = torch.from_numpy(np.array(acc.astype(dtype), order="C"))
    return out


def run_local(
    config: SplitConfig,
    num_clients: int,
    *,
    device: str = "cpu",
    evaluate: bool = True,
) -> LocalResult:
    """Train ``config`` with ``num_clients`` simulated clients; returns per-round history.

    Clients are sampled per round with ``fraction-train`` (all of them at 1.0), in client-id order.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    codec = get_codec(config.codec, **config.codec_params)
    client_template, server_net = build_split_model(config)
    server_net.to(device)
    global_weights = {k: v.detach().clone() for k, v in client_template.state_dict().items()}
    server_opt = torch.optim.SGD(
        server_net.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    clients = []
    for cid in range(num_clients):
        model = copy.deepcopy(client_template).to(device)
        train, _ = client_data(config, cid, num_clients)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        clients.append(_Client(cid, model, optimizer, train))
    evaluation_set = evaluation_data(config) if evaluate else None
    sampler = random.Random(config.seed)
    rows = []
    for server_round in range(1, config.num_server_rounds + 1):
        started = time.perf_counter()
        lr = lr_at_round(config.lr, config.lr_schedule, server_round, config.num_server_rounds)
        count = max(int(num_clients * config.fraction_train), 1)
        sampled = (
            sorted(sampler.sample(range(num_clients), count))
            if count < num_clients
            else list(range(num_clients))
        )
        active = [clients[c] for c in sampled]
        for group in server_opt.param_groups:
            group["lr"] = lr
        for client in active:
            client.model.load_state_dict(global_weights)
            for group in client.optimizer.param_groups:
                group["lr"] = lr
        steps = config.steps_per_round or min(len(c.data) // config.batch_size for c in active)  # type: ignore[arg-type]
        steps = max(steps, 1)
        totals = dict.fromkeys(("uplink_bytes", "uplink_raw_bytes", "downlink_bytes"), 0.0)
        client_seconds = server_seconds = 0.0
        losses, errors = [], []
        progress = StepProgress(f"[local] round {server_round}", steps)
        for step in range(steps):
            outputs, decoded, labels, slowest = [], [], [], 0.0
            for client in active:
                tic = time.perf_counter()
                size = len(client.data)  # type: ignore[arg-type]
                client.epoch, position = take_batch(
                    size, config.batch_size, client.epoch, client.position, client.client_id
                )
                client.position = position + config.batch_size
                positions = batch_positions(
                    size, config.batch_size, config.seed, client.client_id, client.epoch, position
                )
                x, y = client.data.batch(  # type: ignore[attr-defined]
                    positions,
                    augment=config.augment,
                    generator=augment_generator(config.seed, client.client_id, server_round, step),
                )
                client.model.train()
                activations = client.model(x.to(device))
                payload = codec.encode(
                    activations.detach(),
                    generator=codec_generator(config.seed, client.client_id, server_round, step),
                    train=True,
                )
                blob = payload.to_bytes()
                errors.append(compression_error(activations.detach().cpu(), codec.decode(payload)))
                totals["uplink_bytes"] += len(blob)
                totals["uplink_raw_bytes"] += payload.raw_nbytes
                outputs.append(activations)
                decoded.append(decode_bytes(blob))
                labels.append(y)
                slowest = max(slowest, time.perf_counter() - tic)
            client_seconds += slowest
            tic = time.perf_counter()
            outcome = server_step(server_net, server_opt, decoded, labels)
            server_seconds += time.perf_counter() - tic
            losses.append(outcome.loss)
            progress.update(step + 1, outcome.loss)
            slowest = 0.0
            for client, activations, gradient in zip(
                active, outputs, outcome.gradients, strict=True
            ):
                tic = time.perf_counter()
                totals["downlink_bytes"] += gradient.numel() * gradient.element_size()
                client.optimizer.zero_grad(set_to_none=True)
                activations.backward(
                    gradient.to(device=activations.device, dtype=activations.dtype)
                )
                client.optimizer.step()
                slowest = max(slowest, time.perf_counter() - tic)
            client_seconds += slowest
        states = [{k: v.detach().cpu() for k, v in c.model.state_dict().items()} for c in active]
        global_weights = fedavg(states, [float(steps * config.batch_size)] * len(active))
        row: dict[str, float] = {
            "round": server_round,
            "train_loss": float(np.mean(losses)),
            "compression_error": float(np.mean(errors)),
            "client_seconds": client_seconds,
            "server_seconds": server_seconds,
            "message_seconds": 0.0,
            "lr": lr,
            "steps": steps,
            "num_clients": len(active),
            **totals,
        }
        if evaluation_set is not None:
            client_template.load_state_dict(global_weights)
            scores = evaluate_split(
                client_template.to(device),
                server_net,
                codec,
                evaluation_set,
                batch_size=config.eval_batch_size,
                max_examples=config.eval_max_examples,
            )
            row.update(
                test_loss=scores["loss"], test_accuracy=scores["accuracy"], test_top5=scores["top5"]
            )
        else:
            row.update(test_loss=math.nan, test_accuracy=math.nan, test_top5=math.nan)
        row["round_seconds"] = time.perf_counter() - started
        rows.append(row)
        log.info(
            "[local %d/%d] train loss %.4f | test acc %.2f%% | uplink %.2f MB | %.1fs",
            server_round,
            config.num_server_rounds,
            row["train_loss"],
            100 * row["test_accuracy"] if not math.isnan(row["test_accuracy"]) else float("nan"),
            row["uplink_bytes"] / 1e6,
            row["round_seconds"],
        )
    history = pd.DataFrame(rows, columns=[*HISTORY_COLUMNS, "round_seconds"])
    server_weights = {k: v.detach().cpu().clone() for k, v in server_net.state_dict().items()}
    return LocalResult(history, global_weights, server_weights, config)
