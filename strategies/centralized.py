"""Centralized training on the pooled client data: the upper bounds of the comparison.

``centralized-full`` fine-tunes every weight, ``centralized-lora`` trains the LoRA adapter; one
process (the ServerApp) trains on the union of all clients' training sets with the same step
budget as a federated run: per round, ``clients-per-round x train.max-steps`` optimizer steps, one
AdamW state throughout. Shared: nothing crosses a network (all data is pooled, which is exactly
what federated learning avoids). Evaluated like the federated runs: the global test set after
every round, then each sampled client's local test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from task import get_task
from task.adapters import (
    compute_precision,
    get_adapter_state,
    get_full_state,
    shared_full_model,
    shared_lora_model,
)
from task.config import RunConfig

from strategies.records import log

State = dict[str, torch.Tensor]


def _full(cfg: RunConfig) -> bool:
    """This module serves two registry entries: centralized-full trains every weight."""
    return cfg.strategy.name == "centralized-full"


def server_initial_state(cfg: RunConfig) -> State:
    if _full(cfg):
        return get_full_state(shared_full_model(cfg))
    return get_adapter_state(shared_lora_model(cfg))


def server_global_state(cfg: RunConfig, arrays: State) -> State:
    return arrays


def pooled_train_blocks(cfg: RunConfig, num_clients: int) -> torch.Tensor:
    """Every client's training data in one pool. A partition the task cannot split (e.g. a
    speaking role with fewer tokens than one block) is left out, as it is from federated
    training, where that client's every call fails; the log names them."""
    task = get_task(cfg)
    pooled, unusable = [], []
    for p in range(num_clients):
        try:
            pooled.append(task.client_data(cfg, p, num_clients)[0])
        except ValueError as e:
            unusable.append((p, str(e)))
    if unusable:
        log.warning(
            "centralized pool: %d of %d partitions left out, too small to use (%s)", len(unusable),
            num_clients, "; ".join(f"partition {p}: {e}" for p, e in unusable[:5]))
    if not pooled:
        raise ValueError(f"no usable partition among {num_clients}: {unusable[0][1]}")
    return torch.cat(pooled)


def steps_per_round(cfg: RunConfig, num_clients: int, clients_per_round: int,
                    pooled: torch.Tensor) -> int:
    if cfg.train.max_steps:
        return clients_per_round * cfg.train.max_steps
    per_client_blocks = len(pooled) / num_clients  # an average client's epoch
    return clients_per_round * cfg.train.local_epochs * math.ceil(per_client_blocks / cfg.train.batch_size)


def train_centralized(cfg: RunConfig, num_clients: int, clients_per_round: int,
                      on_round: Callable[[int, State], None]) -> State:
    """Train for ``num-server-rounds`` round-equivalents; ``on_round(r, state)`` after each."""
    model = (shared_full_model(cfg) if _full(cfg)
             else shared_lora_model(cfg))
    state_of = get_full_state if _full(cfg) else get_adapter_state
    pooled = pooled_train_blocks(cfg, num_clients)
    per_round = steps_per_round(cfg, num_clients, clients_per_round, pooled)
    total = per_round * cfg.num_server_rounds
    epochs = math.ceil(total * cfg.train.batch_size / len(pooled)) + 1

    def after_step(step: int) -> None:
        if step % per_round == 0:
            on_round(step // per_round, state_of(model))

    lr = cfg.train.full_learning_rate if _full(cfg) else cfg.train.learning_rate
    get_task(cfg).train(model, pooled, epochs=epochs, batch_size=cfg.train.batch_size, lr=lr,
                        weight_decay=cfg.train.weight_decay, max_steps=total, seed=cfg.seed,
                        after_step=after_step, precision=compute_precision(cfg))
    return state_of(model)
