"""Client evaluation of the image task: FID on the client's own classes, global vs personal.

The client's local test images (its one or two classes, in its proportions) are the real set;
each model generates the same labels from the same fixed noise. With ``personalize`` (the final
protocol) the personal model is the final global one fine-tuned one local epoch (capped by
max-steps), or the strategy's own personal model fine-tuned (ditto, fedper, local-only).
"""

from __future__ import annotations

import torch

from strategies import is_full_model, strategy_entry
from task.config import RunConfig
from task.image_train import RowsFid, base_generator
from task.model import set_adapter_state, set_full_state, shared_full_model, shared_lora_model
from task.train import train_local


def evaluate_image(cfg: RunConfig, partition_id: int, received: dict, train_rows: torch.Tensor,
                   test_rows: torch.Tensor, config) -> dict:
    module = strategy_entry(cfg).module
    global_state, personal_state = module.client_eval_states(cfg, received, partition_id)
    full = is_full_model(cfg)
    model = shared_full_model(cfg) if full else shared_lora_model(cfg)
    load = set_full_state if full else set_adapter_state
    real = test_rows[:cfg.client_fid_images]
    fid = RowsFid(real, base_generator(model).config.channels, cfg.seed + partition_id)

    load(model, global_state)
    metrics = {"num-examples": len(real), "partition-id": partition_id, "fid-images": len(real),
               "global-fid": fid(model), "personal-fid": 0.0, "has-personal": 0}
    if config.get("personalize"):
        own = getattr(module, "PERSONAL_MODEL", False) and personal_state is not None
        load(model, personal_state if own else global_state)
        train_local(model, train_rows, epochs=1, batch_size=cfg.batch_size,
                    lr=cfg.full_learning_rate if full else cfg.learning_rate,
                    weight_decay=cfg.weight_decay, max_steps=cfg.max_steps,
                    seed=cfg.seed + partition_id)
        metrics.update({"personal-fid": fid(model), "has-personal": 1})
    elif personal_state is not None:
        load(model, personal_state)
        metrics.update({"personal-fid": fid(model), "has-personal": 1})
    return metrics
