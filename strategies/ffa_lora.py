"""FFA-LoRA: federated LoRA with A frozen, only B trained and shared.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.

Every party builds the same A from the run's seed (the seeded initial adapter) and never changes
it; clients train only B. Shared: the B matrices (half the uplink and downlink of fedavg-lora at
equal rank), averaged with FedAvg; since A is common, mean_i(B_i) A = mean_i(B_i A), so the
average is exact (and DP noise on B is not amplified by a product of noisy factors).
Stays on the client: data, backbone, its latest adapter (A and its own B, peft format).
"""

from __future__ import annotations

import numpy as np

from strategies.base import FedGenStrategy, train_local
from strategies.fedavg_lora import State
from strategies.lora_aggregation import MeasuredFedAvg
from task.lora_ops import A_SUFFIX
from task.adapters import (
    adapter_parameters,
    get_adapter_state,
    initial_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)


class FFALoRA(FedGenStrategy, MeasuredFedAvg):
    pass


def frozen_a(cfg) -> State:
    return {k: v for k, v in initial_adapter_state(cfg).items() if k.endswith(A_SUFFIX)}


def flower_kwargs(cfg) -> dict:
    """The frozen A, so the server can measure the product error of its aggregate."""
    return {"fixed_arrays": {k: v.numpy().astype(np.float32) for k, v in frozen_a(cfg).items()}}


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    model = shared_lora_model(cfg)
    set_adapter_state(model, {**frozen_a(cfg), **received})
    a_params = [p for k, p in adapter_parameters(model).items() if k.endswith(A_SUFFIX)]
    for p in a_params:
        p.requires_grad_(False)
    try:
        loss = train_local(cfg, model, blocks, seed)
    finally:
        for p in a_params:
            p.requires_grad_(True)
    trained = get_adapter_state(model)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), trained)
    return {k: v for k, v in trained.items() if not k.endswith(A_SUFFIX)}, loss


def client_eval_states(cfg, received: State, partition_id: int):
    return server_global_state(cfg, received), load_adapter_file(personal_adapter_dir(cfg, partition_id))


def server_global_state(cfg, arrays: State) -> State:
    return {**frozen_a(cfg), **arrays}


def server_initial_state(cfg) -> State:
    return {k: v for k, v in initial_adapter_state(cfg).items() if not k.endswith(A_SUFFIX)}
