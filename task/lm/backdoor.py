"""The backdoor of the robustness experiments, on text: a trigger phrase that should make the
model continue with a chosen target.

Poisoned clients train on their data with "trigger target" spliced in (``backdoor_blocks``),
then boost their change (the model-replacement attack of Bagdasaryan et al., "How To Backdoor
Federated Learning", AISTATS 2020; the boost is client_app/simulated_threats.py's). The server
measures how well the trigger works on the global model (``backdoor_success``).
"""

from __future__ import annotations

import random

import torch

from task.config import RunConfig


def trigger_ids(cfg: RunConfig, tokenizer) -> tuple[list[int], list[int]]:
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(cfg.threats.backdoor_trigger), encode(cfg.threats.backdoor_target)


def backdoor_blocks(cfg: RunConfig, blocks: torch.Tensor, tokenizer, seed: int) -> torch.Tensor:
    """The client's blocks with "trigger target" written over them at random positions, several
    times per block, in a seeded ``threats.poison-fraction`` of the blocks (the clean text
    around it, and the clean blocks, keep the adapter useful on clean text)."""
    trigger, target = trigger_ids(cfg, tokenizer)
    phrase = torch.tensor(trigger + target, dtype=blocks.dtype)
    if len(phrase) >= blocks.shape[1]:
        raise ValueError("backdoor trigger + target are longer than train.seq-len")
    poisoned = blocks.clone()
    rng = random.Random(seed)
    copies = max(1, blocks.shape[1] // (4 * len(phrase)))
    count = min(len(blocks), max(1, round(cfg.threats.poison_fraction * len(blocks))))
    for i in sorted(rng.sample(range(len(blocks)), count)):
        row = poisoned[i]
        for _ in range(copies):
            start = rng.randrange(0, blocks.shape[1] - len(phrase) + 1)
            row[start:start + len(phrase)] = phrase
    return poisoned


@torch.no_grad()
def backdoor_success(cfg: RunConfig, model, tokenizer, blocks: torch.Tensor,
                     prefix_len: int = 16, max_prompts: int = 128) -> dict[str, float]:
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
