"""Federated strategies, one module each, picked by the ``strategy`` config key."""

from __future__ import annotations

from flwr.app import ArrayRecord

from strategies.common import array_spec
from strategies.fedavg_lora import FedAvgLoRA
from task.config import ConfigError, RunConfig

STRATEGIES = {
    "fedavg-lora": FedAvgLoRA,
}


def build_strategy(cfg: RunConfig, initial_arrays: ArrayRecord):
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"run-config key 'strategy' = {cfg.strategy!r}: must be one of "
                          f"{sorted(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](
        spec=array_spec(initial_arrays), seed=cfg.seed, num_rounds=cfg.num_server_rounds,
        fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
        evaluate_every=cfg.evaluate_every)
