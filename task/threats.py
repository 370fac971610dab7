"""Simulated threats for robustness experiments: poisoning clients and failing clients.

Malicious clients (``attack-fraction`` of the partitions, a seeded choice) train honestly and
then change what they upload (``attack``), with ``s`` = ``attack-scale`` and g the global
adapter they received, u their trained adapter:
- ``scaled``: g + s (u - g), an exaggerated update that drags the mean;
- ``sign-flip``: g - s (u - g), gradient ascent on the clients' loss;
- ``backdoor``: train on the client's data with a trigger phrase followed by a target
  continuation spliced in, then boost: g + s (u - g), the model-replacement attack of
  Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020.
Failing clients raise in a round with probability ``client-failure-rate``, seeded by round and
partition, so a rerun (or a resumed run) fails the same way.
"""

from __future__ import annotations

import random

import torch

from task.config import RunConfig

State = dict[str, torch.Tensor]


def malicious_partitions(cfg: RunConfig, num_partitions: int) -> set[int]:
    if cfg.attack == "none" or cfg.attack_fraction <= 0:
        return set()
    count = int(round(cfg.attack_fraction * num_partitions))
    return set(random.Random(cfg.seed * 7 + 13).sample(range(num_partitions), count))


def attacked_upload(cfg: RunConfig, received: State, upload: State) -> State:
    """What a malicious client uploads instead of its honest adapter ``upload``."""
    sign = -1.0 if cfg.attack == "sign-flip" else 1.0
    return {k: received[k] + sign * cfg.attack_scale * (upload[k] - received[k]) for k in upload}


def trigger_ids(cfg: RunConfig, tokenizer) -> tuple[list[int], list[int]]:
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(cfg.backdoor_trigger), encode(cfg.backdoor_target)


def backdoor_blocks(cfg: RunConfig, blocks: torch.Tensor, tokenizer, seed: int) -> torch.Tensor:
    """The client's blocks with "trigger target" written over them at random positions, several
    times per block (the clean text around it keeps the adapter useful)."""
    trigger, target = trigger_ids(cfg, tokenizer)
    phrase = torch.tensor(trigger + target, dtype=blocks.dtype)
    if len(phrase) >= blocks.shape[1]:
        raise ValueError("backdoor trigger + target are longer than seq-len")
    poisoned = blocks.clone()
    rng = random.Random(seed)
    copies = max(1, blocks.shape[1] // (4 * len(phrase)))
    for row in poisoned:
        for _ in range(copies):
            start = rng.randrange(0, blocks.shape[1] - len(phrase) + 1)
            row[start:start + len(phrase)] = phrase
    return poisoned


@torch.no_grad()
def backdoor_success(cfg: RunConfig, model, tokenizer, blocks: torch.Tensor,
                     prefix_len: int = 16, max_prompts: int = 32) -> dict[str, float]:
    """On clean test text + the trigger: the share of prompts whose top-1 next token is the
    target's first token, and the mean NLL of the whole target continuation (nats/token)."""
    trigger, target = trigger_ids(cfg, tokenizer)
    prompts = blocks[:max_prompts, :prefix_len]
    tail = torch.tensor(trigger + target, dtype=blocks.dtype).expand(len(prompts), -1)
    inputs = torch.cat([prompts, tail], dim=1)
    model.eval()
    logits = model(input_ids=inputs).logits
    first = prefix_len + len(trigger) - 1  # the position that predicts the first target token
    hits = (logits[:, first].argmax(-1) == target[0]).float().mean().item()
    logp = torch.log_softmax(logits[:, first:first + len(target)].float(), dim=-1)
    nll = -logp.gather(-1, torch.tensor(target).expand(len(prompts), -1).unsqueeze(-1)).mean().item()
    return {"backdoor_success": hits, "backdoor_target_nll": nll}


def fails_this_round(cfg: RunConfig, server_round: int, partition_id: int) -> bool:
    if cfg.client_failure_rate <= 0:
        return False
    return random.Random(cfg.seed * 1_000_003 + server_round * 7919 + partition_id * 31 + 5
                         ).random() < cfg.client_failure_rate
