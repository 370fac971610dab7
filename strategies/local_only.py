"""Local-only training: the no-collaboration lower bound.

Each client trains its own adapter, from the shared initial adapter, only on its own data, and
keeps it (peft format). Nothing is aggregated; no model bytes are uploaded or downloaded (the
server sends an empty record to trigger training, and replies carry only metrics).
Shared: nothing. Stays on the client: everything.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State
from task.adapters import (
    get_adapter_state,
    initial_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)


class LocalOnly(FedGenStrategy, FedAvg):
    pass


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    own = load_adapter_file(personal_adapter_dir(cfg, partition_id))
    set_adapter_state(model, own if own is not None else initial_adapter_state(cfg))
    loss = train_local(cfg, model, blocks, seed)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), get_adapter_state(model))
    return None, loss


def client_eval_states(cfg, received: State, partition_id: int):
    return initial_adapter_state(cfg), load_adapter_file(personal_adapter_dir(cfg, partition_id))


def server_global_state(cfg, arrays: State) -> State:
    return initial_adapter_state(cfg)


def server_initial_state(cfg) -> State:
    return {}
