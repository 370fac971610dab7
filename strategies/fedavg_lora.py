"""FedAvg on LoRA adapters: the FedGen-Edge method.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, applied to the LoRA adapters (Hu et al., ICLR 2022) of a frozen backbone.

Shared: the LoRA A and B matrices on the attention query and value projections. The server sends
the global adapter to the sampled clients and replaces it with the mean of their returned
adapters weighted by ``num-examples`` (training sequences): Flower's FedAvg does the mean.
Stays on the client: the data, the frozen backbone (never sent: every party already holds the
same pre-trained weights), and the client's latest local adapter (saved in peft format). That one
is not a personal model (it is as stale as the client's last sampled round), so no in-round
personalized figure is reported for it; the personalized adapter is what the personalization
protocol (task/personalization.py) makes from the final global one.
"""

from __future__ import annotations

import torch

from strategies.base import FedGenStrategy, train_local
from strategies.lora_aggregation import MeasuredFedAvg
from task.config import RunConfig
from task.adapters import (
    get_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)

State = dict[str, torch.Tensor]


class FedAvgLoRA(FedGenStrategy, MeasuredFedAvg):
    """FedAvg that also records its aggregation error (mean(B) mean(A) vs mean(B A))."""


def client_train(cfg: RunConfig, received: State, partition_id: int, blocks: torch.Tensor,
                 seed: int, config) -> tuple[State | None, float]:
    """Train the received global adapter locally; upload it, keep it as the personal one."""
    model = shared_lora_model(cfg)
    set_adapter_state(model, received)
    loss = train_local(cfg, model, blocks, seed)
    state = get_adapter_state(model)
    save_adapter(model, personal_adapter_dir(cfg, partition_id), state)
    return state, loss


def client_eval_states(cfg: RunConfig, received: State, partition_id: int
                       ) -> tuple[State, State | None]:
    """(global, personal) adapters as this client evaluates them."""
    return received, load_adapter_file(personal_adapter_dir(cfg, partition_id))


def server_global_state(cfg: RunConfig, arrays: State) -> State:
    """The adapter the server evaluates on the global test set."""
    return arrays


def server_initial_state(cfg: RunConfig) -> State:
    return get_adapter_state(shared_lora_model(cfg))
