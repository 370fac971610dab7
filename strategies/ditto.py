"""Ditto: a global adapter by FedAvg plus a personal adapter pulled toward it.

Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021.

Two named adapters on the one frozen backbone: "default" (the global w) and "personal" (v).
Each round a client (1) trains w from the received global adapter and uploads it, exactly as
FedAvg-LoRA, and (2) trains v for the same budget on the loss plus lambda/2 * ||v - w_global||^2
(``ditto-lambda``), starting from its saved v (or from the global adapter the first time).
Shared: w. Stays on the client: v (saved in peft format), data, backbone. With lambda = 0 the
personal step is plain local training of v.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State, client_eval_states, server_global_state, server_initial_state  # noqa: F401
from task.adapters import (
    proximal_penalty,
    adapter_parameters,
    ensure_adapter,
    get_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)

PERSONAL = "personal"


class Ditto(FedGenStrategy, FedAvg):
    pass


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    ensure_adapter(model, cfg, PERSONAL)
    set_adapter_state(model, received)
    loss = train_local(cfg, model, blocks, seed)
    upload = get_adapter_state(model)

    personal = load_adapter_file(personal_adapter_dir(cfg, partition_id)) or received
    model.set_adapter(PERSONAL)
    try:
        set_adapter_state(model, personal, PERSONAL)
        penalty = proximal_penalty(adapter_parameters(model, PERSONAL), received, cfg.strategy.ditto_lambda)
        train_local(cfg, model, blocks, seed, penalty=penalty)
        personal = get_adapter_state(model, PERSONAL)
    finally:
        model.set_adapter("default")
    save_adapter(model, personal_adapter_dir(cfg, partition_id), personal)
    return upload, loss
