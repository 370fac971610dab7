"""Full-model FedAvg: the classic baseline without adapters.

McMahan et al., AISTATS 2017. Every backbone weight trains on the client and travels both ways
each round (about 538 MB per client and direction for SmolLM2-135M in float32), averaged by
Flower's FedAvg weighted by ``num-examples``.
Shared: the whole model. Stays on the client: data only (no personal model; the personalization
protocol fine-tunes the final global model).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State
from task.adapters import get_full_state, set_full_state, shared_full_model


class FedAvgFull(FedGenStrategy, FedAvg):
    pass


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_full_model(cfg)
    set_full_state(model, received)
    loss = train_local(cfg, model, blocks, seed, full_model=True)
    return get_full_state(model, copy=False), loss  # the ClientApp serializes it at once


def client_eval_states(cfg, received: State, partition_id: int):
    return received, None


def server_global_state(cfg, arrays: State) -> State:
    return arrays


def server_initial_state(cfg) -> State:
    return get_full_state(shared_full_model(cfg))
