"""Centralized training on the pooled client data: the upper bounds of the comparison.

``centralized-full`` fine-tunes every weight, ``centralized-lora`` trains the LoRA adapter; one
process (the ServerApp) trains on the union of all clients' training sets with the same step
budget as a federated run: per round, ``clients-per-round x max-steps`` optimizer steps, one
AdamW state throughout. Shared: nothing crosses a network (all data is pooled, which is exactly
what federated learning avoids). Evaluated like the federated runs: the global test set after
every round, then each sampled client's local test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from task.config import RunConfig
from task.data import client_blocks
from task.model import get_adapter_state, get_full_state, shared_full_model, shared_lora_model
from task.train import train_local

State = dict[str, torch.Tensor]


def server_initial_state(cfg: RunConfig) -> State:
    if cfg.strategy == "centralized-full":
        return get_full_state(shared_full_model(cfg))
    return get_adapter_state(shared_lora_model(cfg))


def server_global_state(cfg: RunConfig, arrays: State) -> State:
    return arrays


def pooled_train_blocks(cfg: RunConfig, num_clients: int) -> torch.Tensor:
    return torch.cat([client_blocks(cfg, p, num_clients)[0] for p in range(num_clients)])


def steps_per_round(cfg: RunConfig, num_clients: int, clients_per_round: int,
                    pooled: torch.Tensor) -> int:
    if cfg.max_steps:
        return clients_per_round * cfg.max_steps
    per_client_blocks = len(pooled) / num_clients  # an average client's epoch
    return clients_per_round * cfg.local_epochs * math.ceil(per_client_blocks / cfg.batch_size)


def train_centralized(cfg: RunConfig, num_clients: int, clients_per_round: int,
                      on_round: Callable[[int, State], None]) -> State:
    """Train for ``num-server-rounds`` round-equivalents; ``on_round(r, state)`` after each."""
    model = (shared_full_model(cfg) if cfg.strategy == "centralized-full"
             else shared_lora_model(cfg))
    state_of = get_full_state if cfg.strategy == "centralized-full" else get_adapter_state
    pooled = pooled_train_blocks(cfg, num_clients)
    per_round = steps_per_round(cfg, num_clients, clients_per_round, pooled)
    total = per_round * cfg.num_server_rounds
    epochs = math.ceil(total * cfg.batch_size / len(pooled)) + 1

    def after_step(step: int) -> None:
        if step % per_round == 0:
            on_round(step // per_round, state_of(model))

    lr = cfg.full_learning_rate if cfg.strategy == "centralized-full" else cfg.learning_rate
    train_local(model, pooled, epochs=epochs, batch_size=cfg.batch_size, lr=lr,
                weight_decay=cfg.weight_decay, max_steps=total, seed=cfg.seed,
                after_step=after_step)
    return state_of(model)
