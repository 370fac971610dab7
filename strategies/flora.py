"""FLoRA: stacking aggregation, exact for any mix of client ranks.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024.

Each round every sampled client trains a fresh LoRA adapter of its own rank r_i (the seeded
initial adapter truncated to r_i; ranks from ``lora.rank-mix`` or the node's device profile, see
task.lora_ops.client_rank) on top of the current global model and uploads it. The server stacks
them: [w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K] = sum_i w_i B_i A_i exactly, whatever the ranks,
and adds the stacked product to the global model, which clients apply on top of the frozen base
layers (task.lora_ops.set_base_correction; the shared backbone is not modified).

Shared: each client's rank-r_i adapter up; down: the accumulated stacked modules (stacked rank
sum_i r_i per round: the downlink grows linearly with clients per round, and with rounds until
a layer's factors are larger than its dense matrix, which is then sent instead). Stays on the
client: data, backbone. The personalization protocol fine-tunes the final global model.
"""

from __future__ import annotations

from strategies.base import train_local
from strategies.fedavg_lora import State
from strategies.fedex_lora import apply_correction
from strategies.lora_aggregation import Correction, RankAwareLoRA, rank_aware_kwargs
from task.lora_ops import active_adapter, rank_adapter, stacked, truncate_rank
from task.adapters import get_adapter_state, initial_adapter_state, set_adapter_state, shared_lora_model


class FLoRA(RankAwareLoRA):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.correction = Correction()

    def aggregate_lora(self, states, weights):
        represented = {}
        for p, (b_stack, a_stack) in stacked(states, weights).items():
            before = self.correction.product(p)
            self.correction.add(p, b_stack, a_stack)
            represented[p] = self.correction.product(p) - before
        return self.correction.to_arrays(), represented


def flower_kwargs(cfg) -> dict:
    return rank_aware_kwargs(cfg, heterogeneous=True)


def client_train(cfg, received: State, partition_id: int, blocks, seed: int, config):
    rank = int(config.get("lora-rank", cfg.lora.rank))
    model = shared_lora_model(cfg)
    apply_correction(cfg, received)
    name = rank_adapter(model, cfg, rank)
    with active_adapter(model, name):
        set_adapter_state(model, truncate_rank(initial_adapter_state(cfg), rank), name)
        loss = train_local(cfg, model, blocks, seed)
        trained = get_adapter_state(model, name)
    return trained, loss


def client_eval_states(cfg, received: State, partition_id: int):
    """The global model (stacked products on the base, identity adapter); no personal one."""
    apply_correction(cfg, received)
    return initial_adapter_state(cfg), None


def server_global_state(cfg, arrays: State) -> State:
    apply_correction(cfg, arrays)
    return initial_adapter_state(cfg)


def server_initial_state(cfg) -> State:
    return {}  # clients build the initial adapter from the seed; nothing is stacked yet
