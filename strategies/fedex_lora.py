"""FedEx-LoRA: FedAvg on A and B plus a server-side residual that makes the update exact.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025.

Each round the server averages A and B (weighted by examples) as fedavg-lora does, and adds the
residual mean_i(B_i A_i) - mean(B) mean(A) to a per-layer correction of the frozen weight, so
the global model W0 + scale * (correction + mean(B) mean(A)) is exactly W0 + scale *
mean_i(B_i A_i) accumulated over rounds. Clients apply the correction as an addition to the
frozen base layer (task.lora_ops.set_base_correction; the shared backbone is not modified) and
go on training mean(B), mean(A).

Shared: A and B up (as fedavg-lora); down: A, B and the correction. The correction is the sum
of every round's residual, sent as stacked factors [w_1 B_1 ... w_K B_K, -mean(B)] and
[A_1; ...; A_K; mean(A)] (rank (K + 1) r per round) while that is smaller than the dense
out x in matrix, dense afterwards: its downlink bytes grow with rounds up to the dense size
(for SmolLM2-135M: 30 layers x (576x576 + 192x576) floats = 53 MB). Stays on the client: data,
backbone. The personalization protocol fine-tunes the final global model.
"""

from __future__ import annotations

import numpy as np

from strategies.base import train_local
from strategies.fedavg_lora import State
from strategies.lora_aggregation import Correction, RankAwareLoRA, rank_aware_kwargs
from task.lora_ops import (
    A_SUFFIX,
    B_SUFFIX,
    correction_scale,
    set_base_correction,
    split_correction,
    stacked,
)
from task.adapters import get_adapter_state, initial_adapter_state, set_adapter_state, shared_lora_model


class FedExLoRA(RankAwareLoRA):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.correction = Correction()

    def aggregate_lora(self, states, weights):
        total = float(sum(weights))
        mean = {k: sum((w / total) * s[k].astype(np.float64) for s, w in zip(states, weights))
                .astype(np.float32) for k in states[0]}
        represented = {}
        for p, (b_stack, a_stack) in stacked(states, weights).items():
            b_mean, a_mean = mean[p + B_SUFFIX], mean[p + A_SUFFIX]
            before = self.correction.product(p)
            # residual = sum_i w_i B_i A_i - mean(B) mean(A), as one product of stacked factors
            self.correction.add(p, np.concatenate([b_stack, -b_mean], axis=1),
                                np.concatenate([a_stack, a_mean], axis=0))
            represented[p] = (b_mean.astype(np.float64) @ a_mean
                              + (self.correction.product(p) - before))
        return {**mean, **self.correction.to_arrays()}, represented


def flower_kwargs(cfg) -> dict:
    return rank_aware_kwargs(cfg, heterogeneous=False)


def apply_correction(cfg, received: State) -> State:
    """Put the received correction on the shared model; the adapter part of ``received``."""
    adapter, correction = split_correction(received)
    set_base_correction(shared_lora_model(cfg), correction, correction_scale(cfg))
    return adapter


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    set_adapter_state(model, apply_correction(cfg, received))
    loss = train_local(cfg, model, blocks, seed)
    return get_adapter_state(model), loss


def client_eval_states(cfg, received: State, partition_id: int):
    """The global model (correction + adapter); no personal model of its own."""
    return apply_correction(cfg, received), None


def server_global_state(cfg, arrays: State) -> State:
    return apply_correction(cfg, arrays)


def server_initial_state(cfg) -> State:
    return initial_adapter_state(cfg)
