"""FedSA-LoRA: share A, keep B personal.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025.

A learns what is general across clients, B what is client-specific: clients train both, upload
only the A matrices (averaged with FedAvg) and keep their B (an adapter-level FedPer). Shared:
A. Stays on the client: B (inside its personal adapter, peft format), data, backbone. The global
model the server evaluates is the shared A with the initial B = 0, i.e. the backbone itself:
fedsa-lora is judged on its personalized perplexity.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State
from task.lora_ops import A_SUFFIX
from task.adapters import (
    get_adapter_state,
    initial_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)


class FedSALoRA(FedGenStrategy, FedAvg):
    pass


def shared_part(state: State) -> State:
    return {k: v for k, v in state.items() if k.endswith(A_SUFFIX)}


def _merged(cfg, received: State, partition_id: int) -> tuple[State, bool]:
    """The received A with this client's own B (the initial B before its first round)."""
    own = load_adapter_file(personal_adapter_dir(cfg, partition_id))
    return {**initial_adapter_state(cfg), **(own or {}), **received}, own is not None


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    set_adapter_state(model, _merged(cfg, received, partition_id)[0])
    loss = train_local(cfg, model, blocks, seed)
    trained = get_adapter_state(model)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), trained)
    return shared_part(trained), loss


def client_eval_states(cfg, received: State, partition_id: int):
    state, has_own = _merged(cfg, received, partition_id)
    return server_global_state(cfg, received), (state if has_own else None)


def server_global_state(cfg, arrays: State) -> State:
    return {**initial_adapter_state(cfg), **arrays}


def server_initial_state(cfg) -> State:
    return shared_part(initial_adapter_state(cfg))
