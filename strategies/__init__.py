"""Federated strategies, one module each, picked by the ``strategy`` config key.

A strategy module holds the server side (a Flower strategy class with FedGenStrategy mixed in)
and the client side as plain functions:
- ``server_initial_state(cfg)``: what the server starts from and sends (empty: nothing),
- ``client_train(cfg, received, partition_id, blocks, seed, config) -> (upload | None, loss)``,
- ``client_eval_states(cfg, received, partition_id) -> (global, personal | None)``,
- ``server_global_state(cfg, arrays)``: the model the server evaluates on the global test set.
``FULL_MODEL = True`` marks strategies that move the whole model instead of an adapter;
``PERSONAL_MODEL = True`` those whose personal model (not the global one) is the starting point
of the final personalization protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from flwr.app import ArrayRecord

from strategies import (
    centralized,
    ditto,
    fedavg_full,
    fedavg_lora,
    fedex_lora,
    fedopt_lora,
    fedper,
    fedprox,
    fedsa_lora,
    ffa_lora,
    flora,
    hetlora,
    local_only,
)
from strategies.common import Robustness, array_spec
from task.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Entry:
    module: ModuleType
    server: type | None  # None: not federated (centralized upper bounds)
    flower_kwargs: Callable[[RunConfig], dict] = field(default=lambda cfg: {})


STRATEGIES: dict[str, Entry] = {
    "fedavg-lora": Entry(fedavg_lora, fedavg_lora.FedAvgLoRA),
    "fedavg-full": Entry(fedavg_full, fedavg_full.FedAvgFull),
    "fedper": Entry(fedper, fedper.FedPer),
    "ditto": Entry(ditto, ditto.Ditto),
    "local-only": Entry(local_only, local_only.LocalOnly),
    "fedprox": Entry(fedprox, fedprox.FedProxLoRA, lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    "fedadam": Entry(fedopt_lora, fedopt_lora.FedAdamLoRA,
                     lambda cfg: {"eta": cfg.server_learning_rate}),
    "fedyogi": Entry(fedopt_lora, fedopt_lora.FedYogiLoRA,
                     lambda cfg: {"eta": cfg.server_learning_rate}),
    "centralized-full": Entry(centralized, None),
    "centralized-lora": Entry(centralized, None),
    # Exact and heterogeneous-rank LoRA aggregation (issue 8)
    "ffa-lora": Entry(ffa_lora, ffa_lora.FFALoRA, ffa_lora.flower_kwargs),
    "fedex-lora": Entry(fedex_lora, fedex_lora.FedExLoRA, fedex_lora.flower_kwargs),
    "flora": Entry(flora, flora.FLoRA, flora.flower_kwargs),
    "fedsa-lora": Entry(fedsa_lora, fedsa_lora.FedSALoRA),
    "hetlora": Entry(hetlora, hetlora.HetLoRA, hetlora.flower_kwargs),
}


# Issue 8's methods work on B @ A of linear layers (the text task's q and v projections).
LINEAR_LORA_ONLY = ("ffa-lora", "fedex-lora", "flora", "fedsa-lora", "hetlora")


def strategy_entry(cfg: RunConfig) -> Entry:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"run-config key 'strategy' = {cfg.strategy!r}: must be one of "
                          f"{sorted(STRATEGIES)}")
    if cfg.rank_mix and not getattr(STRATEGIES[cfg.strategy].module, "HETEROGENEOUS_RANKS", False):
        raise ConfigError(f"run-config key 'rank-mix' = {cfg.rank_mix!r}: strategy "
                          f"{cfg.strategy!r} trains one rank; heterogeneous ranks need one of "
                          f"{sorted(n for n, e in STRATEGIES.items() if getattr(e.module, 'HETEROGENEOUS_RANKS', False))}")
    _check_combination(cfg, STRATEGIES[cfg.strategy])
    return STRATEGIES[cfg.strategy]


def _check_combination(cfg: RunConfig, entry: Entry) -> None:
    """Options that a strategy's own server aggregation does not implement stop the run at
    start, naming the key, instead of being silently ignored."""
    from strategies.lora_aggregation import RankAwareLoRA

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"run-config key '{key}' = {getattr(cfg, key.replace('-', '_'))!r}: "
                          f"not supported with strategy {cfg.strategy!r} ({why})")

    if cfg.task == "image" and cfg.strategy in LINEAR_LORA_ONLY:
        refuse("strategy", "its LoRA products are defined for linear layers; the image task "
                           "adapts convolutions")
    if entry.server is not None and issubclass(entry.server, RankAwareLoRA):
        why = "its server aggregates per-rank adapters itself"
        for key, off in (("aggregation", "mean"), ("dp-noise-multiplier", 0.0),
                         ("upload-compression", "none"), ("max-update-norm", 0.0),
                         ("min-replies", 1)):
            if getattr(cfg, key.replace('-', '_')) != off:
                refuse(key, why)
        if cfg.resume:
            refuse("resume", "its server-side state is not in the checkpoint")
    if cfg.dp_noise_multiplier and cfg.upload_compression != "none":
        refuse("upload-compression", "DP clips the plain adapter change; compress without DP")
    if cfg.secure_aggregation:
        _check_secure_aggregation(cfg, entry)


def _check_secure_aggregation(cfg: RunConfig, entry: Entry) -> None:
    """SecAgg+ gives the server only the masked sum of the updates: whatever needs one
    client's update in the clear cannot run with it (strategies/secagg.py)."""
    from strategies.lora_aggregation import RankAwareLoRA

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"run-config key '{key}' = {getattr(cfg, key.replace('-', '_'))!r}: "
                          f"not supported with secure-aggregation = true ({why})")

    if cfg.task != "lm":
        refuse("task", "the image task's server loop does not run SecAgg+")
    if entry.server is None or cfg.strategy == "local-only":
        refuse("strategy", "nothing is aggregated")
    if getattr(entry.module, "FULL_MODEL", False) or issubclass(entry.server, RankAwareLoRA):
        refuse("strategy", "SecAgg+ sums one adapter of fixed shape within its clipping "
                           "range; this strategy moves full weights or per-rank adapters")
    why = "the server never sees one client's update, only the masked sum"
    for key, off in (("aggregation", "mean"), ("max-update-norm", 0.0),
                     ("dp-noise-multiplier", 0.0), ("upload-compression", "none"),
                     ("on-too-few-replies", "skip")):
        if getattr(cfg, key.replace('-', '_')) != off:
            refuse(key, why)


def is_full_model(cfg: RunConfig) -> bool:
    return getattr(strategy_entry(cfg).module, "FULL_MODEL", False) or cfg.strategy == "centralized-full"


def build_strategy(cfg: RunConfig, initial_arrays: ArrayRecord):
    entry = strategy_entry(cfg)
    strategy = entry.server(
        spec=array_spec(initial_arrays) if len(initial_arrays) else None, seed=cfg.seed,
        num_rounds=cfg.num_server_rounds, fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate, evaluate_every=cfg.evaluate_every,
        min_available_nodes=cfg.min_available_nodes,
        **entry.flower_kwargs(cfg))
    strategy.robustness = Robustness.from_config(cfg)  # issue 6: defences, retries, DP
    if cfg.secure_aggregation:  # issue 6: SecAgg+ (strategies/secagg.py)
        from strategies.secagg import SecAggSettings

        strategy.secure = SecAggSettings.from_config(cfg)
    return strategy
