"""HetLoRA: heterogeneous client ranks by zero-padding and truncation.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024.

The server keeps one adapter of rank R = ``lora.rank``. Each client declares a device profile
(node config ``lora-rank`` or ``memory-mb``; in simulation its share of ``lora.rank-mix``, see
task.lora_ops.client_rank) and receives the first r_i rank components (A[:r_i], B[:, :r_i]),
trains them as a rank-r_i peft adapter on the shared backbone (same scale alpha / R for every
rank), and uploads them. The server zero-pads every update to R and averages each rank component
over the clients that hold it (weighted by examples; a component no client holds keeps its
value), so low-rank clients do not shrink the components only high-rank clients train. With one
rank for everyone it is fedavg-lora exactly. Not exact: mean(B) mean(A) != mean(B A) as for
fedavg-lora (measured as ``aggregation_error``).

Shared: rank-r_i adapters, both ways (a rank-2 client moves a quarter of a rank-8 one). Stays on
the client: data, backbone, its latest adapter (zero-padded to R, standard peft format).
"""

from __future__ import annotations

import numpy as np

from strategies.base import train_local
from strategies.fedavg_lora import State, client_eval_states, server_global_state, server_initial_state  # noqa: F401
from strategies.lora_aggregation import RankAwareLoRA, rank_aware_kwargs
from task.lora_ops import (
    A_SUFFIX,
    B_SUFFIX,
    active_adapter,
    pad_rank,
    products,
    rank_adapter,
    rank_of,
    truncate_rank,
)
from task.adapters import get_adapter_state, personal_adapter_dir, save_adapter, set_adapter_state, shared_lora_model


class HetLoRA(RankAwareLoRA):
    def payload(self, state, rank):
        return truncate_rank(state, rank)

    def aggregate_lora(self, states, weights):
        ranks = [rank_of(s) for s in states]
        # weight of the clients that hold rank component j
        coverage = np.array([sum(w for w, r in zip(weights, ranks) if r > j)
                             for j in range(self.max_rank)])
        padded = [pad_rank(s, self.max_rank) for s in states]
        new = {}
        for k, current in self.current.items():
            total = sum(w * p[k].astype(np.float64) for p, w in zip(padded, weights))
            if k.endswith(A_SUFFIX):
                cov = coverage[:, None]
            elif k.endswith(B_SUFFIX):
                cov = coverage[None, :]
            else:
                raise KeyError(f"not a LoRA key: {k}")
            new[k] = np.where(cov > 0, total / np.maximum(cov, 1e-300), current).astype(np.float32)
        return new, products(new)


def flower_kwargs(cfg) -> dict:
    return rank_aware_kwargs(cfg, heterogeneous=True)


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    rank = int(config.get("lora-rank", cfg.lora.rank))
    model = shared_lora_model(cfg)
    name = rank_adapter(model, cfg, rank)
    with active_adapter(model, name):
        set_adapter_state(model, received, name)
        loss = train_local(cfg, model, blocks, seed)
        trained = get_adapter_state(model, name)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), pad_rank(trained, cfg.lora.rank))
    return trained, loss
