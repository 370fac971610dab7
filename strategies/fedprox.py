"""FedProx on LoRA adapters.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. Flower's FedProx
sends ``proximal-mu``; each client adds mu/2 * ||w - w_global||^2 over its adapter to the loss,
which keeps non-IID local updates close to the global adapter.

Shared: the LoRA adapter, averaged as in FedAvg. Stays on the client: data, backbone, and its
latest locally trained adapter (its personal one).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State, client_eval_states, server_global_state, server_initial_state  # noqa: F401
from task.adapters import (
    proximal_penalty,
    adapter_parameters,
    get_adapter_state,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)


class FedProxLoRA(FedGenStrategy, FedProx):
    pass


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    set_adapter_state(model, received)
    mu = float(config["proximal-mu"])
    penalty = proximal_penalty(adapter_parameters(model), received, mu)
    loss = train_local(cfg, model, blocks, seed, penalty=penalty)
    state = get_adapter_state(model)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), state)
    return state, loss
