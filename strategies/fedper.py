"""FedPer on LoRA adapters: shared base layers, personal last layers.

Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv:1912.00818 (2019).

Shared: the LoRA adapters of the first L - k transformer layers, averaged with FedAvg.
Stays on the client: the adapters of the last k layers (``fedper-personal-layers``, default 1),
which are trained locally every round and never uploaded; data; backbone. With k = 0 every
layer is shared and FedPer is FedAvg-LoRA exactly. The global model the server evaluates is
the shared layers plus the initial (identity, B = 0) adapter on the personal layers.
"""

from __future__ import annotations

import re

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

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


class FedPer(FedGenStrategy, FedAvg):
    pass


def personal_keys(cfg, keys) -> set[str]:
    """Adapter keys of the last ``fedper-personal-layers`` transformer layers."""
    indices = {k: int(m.group(1)) for k in keys if (m := _LAYER.search(k))}
    if not indices:
        raise ValueError("no transformer layer index found in the adapter keys")
    first_personal = max(indices.values()) + 1 - cfg.strategy.fedper_personal_layers
    return {k for k, i in indices.items() if i >= first_personal}


def shared_state(cfg, state: State) -> State:
    personal = personal_keys(cfg, state)
    return {k: v for k, v in state.items() if k not in personal}


def _merged(cfg, received: State, partition_id: int) -> tuple[State, bool]:
    state = {**initial_adapter_state(cfg), **received}
    own = load_adapter_file(personal_adapter_dir(cfg, partition_id))
    if own is not None:
        state.update({k: own[k] for k in personal_keys(cfg, state)})
    return state, own is not None


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    state, _ = _merged(cfg, received, partition_id)
    set_adapter_state(model, state)
    loss = train_local(cfg, model, blocks, seed)
    trained = get_adapter_state(model)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), trained)
    return shared_state(cfg, trained), loss


def client_eval_states(cfg, received: State, partition_id: int):
    state, has_own = _merged(cfg, received, partition_id)
    return server_global_state(cfg, received), (state if has_own else None)


def server_global_state(cfg, arrays: State) -> State:
    return {**initial_adapter_state(cfg), **arrays}


def server_initial_state(cfg) -> State:
    return shared_state(cfg, initial_adapter_state(cfg))
