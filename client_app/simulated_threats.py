"""Simulated threats of the robustness experiments (simulation only): poisoning clients and
failing clients, kept out of the ClientApp handlers' main line.

Malicious clients (``attack-fraction`` of the partitions, a seeded choice) train and then
change what they upload (``attack``), with ``s`` = ``attack-scale`` and g the global adapter
they received, u their trained adapter:
- ``scaled``: g + s (u - g), an exaggerated update that drags the mean;
- ``sign-flip``: g - s (u - g), gradient ascent on the clients' loss;
- ``backdoor``: train on data poisoned by the task (``poison_data``; text: a trigger phrase
  followed by a target continuation in ``poison-fraction`` of the blocks, task/lm/backdoor.py),
  then boost: g + s (u - g), the model-replacement attack of Bagdasaryan et al., "How To
  Backdoor Federated Learning", AISTATS 2020. ``attack-scale = 0`` boosts by 1 / attack-fraction:
  when the attackers hold that share of the round's weight, their boosted changes sum to one
  whole change of the mean (their model replaces the global one, the honest clients' changes
  come on top).
``boost = "poison-difference"``: the attacker also trains a clean twin c (same start, budget and
batch order, its data unpoisoned) and uploads c + s (u - c): only what the poison changed is
boosted, its clean learning goes in unboosted, so the global model's clean perplexity moves
little while the trigger is implanted (the stealth that Bagdasaryan et al. get from training
on clean and poisoned data together).
The attacker's own training budget is its business: ``attack-steps`` optimizer steps at
``attack-learning-rate`` (0: the honest budget), as Bagdasaryan et al. train the attacker longer
and harder. ``attack-until`` = T: malicious clients attack in rounds 1..T and train honestly
afterwards, to measure whether a backdoor persists once the attackers stop.
Failing clients raise in a round with probability ``client-failure-rate``, seeded by round and
partition, so a rerun (or a resumed run) fails the same way.
"""

from __future__ import annotations

import random

import torch

from task.config import RunConfig

State = dict[str, torch.Tensor]


def malicious_partitions(cfg: RunConfig, num_partitions: int) -> set[int]:
    if cfg.threats.attack == "none" or cfg.threats.attack_fraction <= 0:
        return set()
    count = int(round(cfg.threats.attack_fraction * num_partitions))
    return set(random.Random(cfg.seed * 7 + 13).sample(range(num_partitions), count))


def attacks_now(cfg: RunConfig, server_round: int, partition_id: int, num_partitions: int) -> bool:
    """Whether this client acts maliciously in this round (``attack-until`` ends the attack)."""
    if cfg.threats.attack_until and server_round > cfg.threats.attack_until:
        return False
    return partition_id in malicious_partitions(cfg, num_partitions)


def boost(cfg: RunConfig) -> float:
    """The factor on a malicious change: ``attack-scale``, or 0 -> 1 / attack-fraction."""
    return cfg.threats.attack_scale or 1.0 / cfg.threats.attack_fraction


def attacked_upload(cfg: RunConfig, received: State, upload: State, clean: State | None = None) -> State:
    """What a malicious client uploads instead of its honest adapter ``upload``: the change from
    ``received`` boosted, or with a clean twin ``clean`` only the poison's difference from it."""
    sign = -1.0 if cfg.threats.attack == "sign-flip" else 1.0
    scale = boost(cfg)
    start = received if clean is None else clean
    return {k: start[k] + sign * scale * (upload[k] - start[k]) for k in upload}


def clean_twin(cfg: RunConfig, train, clean_data, server_round: int, partition_id: int,
               num_partitions: int) -> State | None:
    """``train(clean_data)``'s upload when this client boosts only the poison's difference
    (``boost = "poison-difference"``), else None."""
    if cfg.threats.boost != "poison-difference" or not attacks_now(cfg, server_round, partition_id,
                                                                    num_partitions):
        return None
    upload, _ = train(clean_data)
    # a copy: an upload may be views of the live model (fedavg-full on a CPU), which the
    # poisoned training that follows would overwrite
    return {k: v.clone() for k, v in upload.items()}


def attacker_config(cfg: RunConfig, server_round: int, partition_id: int,
                    num_partitions: int) -> RunConfig:
    """The run config a client trains with: a malicious one's own budget (``attack-steps``,
    ``attack-learning-rate``) in the rounds it attacks, everyone else's as it is."""
    t = cfg.threats
    if not (t.attack_steps or t.attack_learning_rate) or not attacks_now(
            cfg, server_round, partition_id, num_partitions):
        return cfg
    return cfg.replace(**{"train.max-steps": t.attack_steps or cfg.train.max_steps,
                          "train.learning-rate": t.attack_learning_rate or cfg.train.learning_rate})


def fails_this_round(cfg: RunConfig, server_round: int, partition_id: int) -> bool:
    if cfg.threats.client_failure_rate <= 0:
        return False
    return random.Random(cfg.seed * 1_000_003 + server_round * 7919 + partition_id * 31 + 5
                         ).random() < cfg.threats.client_failure_rate


# ---------------------------------------------------------------- what the train handler calls
def raise_if_failing(cfg: RunConfig, server_round: int, partition_id: int) -> None:
    """A simulated crash (``client-failure-rate``): the server sees this client's reply fail."""
    if fails_this_round(cfg, server_round, partition_id):
        raise RuntimeError(f"simulated failure of client {partition_id} in round {server_round}")


def poison_train_data(cfg: RunConfig, task, data, server_round: int, partition_id: int,
                      num_partitions: int, seed: int):
    """A backdoor attacker's training data (the task poisons it); everyone else's as it is."""
    if cfg.threats.attack == "backdoor" and attacks_now(cfg, server_round, partition_id, num_partitions):
        return task.poison_data(cfg, data, seed)
    return data


def poison_upload(cfg: RunConfig, received: State, upload: State | None, server_round: int,
                  partition_id: int, num_partitions: int, clean: State | None = None) -> State | None:
    """A malicious client's upload (``attack``; ``clean``: its clean twin's); everyone else's
    as it is."""
    if upload is None or not attacks_now(cfg, server_round, partition_id, num_partitions):
        return upload
    return attacked_upload(cfg, received, upload, clean)
