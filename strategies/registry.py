"""Every strategy, what it can do (stated once, in its entry), and the one table of refusals.

A strategy module holds the server side (a Flower strategy class with FedGenStrategy mixed in)
and the client side as plain functions:
- ``server_initial_state(cfg)``: what the server starts from and sends (empty: nothing),
- ``client_train(cfg, received, partition_id, data, seed, config) -> (upload | None, loss)``,
- ``client_eval_states(cfg, received, partition_id) -> (global, personal | None)``,
- ``server_global_state(cfg, arrays)``: the model the server evaluates on the global test set.

:func:`check_run` is the start-up check both apps run after parsing the config: the task and
the strategy exist, and every option that is on is one the task and the strategy can honour
(``REFUSALS``, derived from the capability flags); otherwise the run stops, naming the key.
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
from strategies.records import array_spec
from task import Task, get_task
from task.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Capabilities:
    """What a strategy can do. Every refusal of a strategy-dependent option derives from it."""
    shares: str                      # what travels: "adapter" | "adapter part" | "full model" | "nothing"
    personal_model: bool = False     # its own personal model starts the personalization protocol
    full_model: bool = False         # every backbone weight trains (no adapter)
    federated: bool = True           # False: centralized training in the ServerApp
    rank_aware: bool = False         # serves per-rank adapters and aggregates them itself
    heterogeneous_ranks: bool = False  # clients may train different ranks (lora.rank-mix)
    linear_lora_only: bool = False   # works on B @ A of linear layers (not convolutions)
    norm_screen: bool = True         # each update's change is checked against a norm limit
    retries: bool = True             # a round with too few valid replies is retried or skipped
    robust_aggregation: bool = True  # robust.aggregation other than the mean
    dp: bool = True                  # DP-FedAvg clipping and noise
    compression: bool = True         # compressed uploads, decoded before validation
    secure_aggregation: bool = True  # SecAgg+ (one fixed-shape adapter, summed masked)
    resume: bool = True              # its whole server state is in the checkpoint

    @property
    def uploads(self) -> bool:
        """Clients upload a model (what a simulated attacker could poison)."""
        return self.federated and self.shares != "nothing"


@dataclass(frozen=True)
class Entry:
    module: ModuleType
    server: type | None  # the Flower strategy class; None: not federated (centralized)
    caps: Capabilities
    flower_kwargs: Callable[[RunConfig], dict] = field(default=lambda cfg: {})


LORA = Capabilities(shares="adapter")
_RANK_AWARE = dict(rank_aware=True, linear_lora_only=True, norm_screen=False, retries=False,
                   robust_aggregation=False, dp=False, compression=False,
                   secure_aggregation=False, resume=False)
_NOT_FEDERATED = dict(federated=False, norm_screen=False, retries=False, robust_aggregation=False, dp=False,
                      compression=False, secure_aggregation=False, resume=False)

STRATEGIES: dict[str, Entry] = {
    "fedavg-lora": Entry(fedavg_lora, fedavg_lora.FedAvgLoRA, LORA),
    "fedavg-full": Entry(fedavg_full, fedavg_full.FedAvgFull,
                         Capabilities(shares="full model", full_model=True,
                                      secure_aggregation=False)),
    "fedper": Entry(fedper, fedper.FedPer, Capabilities(shares="adapter part", personal_model=True)),
    "ditto": Entry(ditto, ditto.Ditto, Capabilities(shares="adapter", personal_model=True)),
    "local-only": Entry(local_only, local_only.LocalOnly,
                        Capabilities(shares="nothing", personal_model=True, norm_screen=False,
                                     robust_aggregation=False, dp=False, compression=False,
                                     secure_aggregation=False)),
    "fedprox": Entry(fedprox, fedprox.FedProxLoRA, LORA,
                     lambda cfg: {"proximal_mu": cfg.strategy.proximal_mu}),
    "fedadam": Entry(fedopt_lora, fedopt_lora.FedAdamLoRA, LORA,
                     lambda cfg: {"eta": cfg.strategy.server_learning_rate}),
    "fedyogi": Entry(fedopt_lora, fedopt_lora.FedYogiLoRA, LORA,
                     lambda cfg: {"eta": cfg.strategy.server_learning_rate}),
    "centralized-full": Entry(centralized, None,
                              Capabilities(shares="nothing", full_model=True, **_NOT_FEDERATED)),
    "centralized-lora": Entry(centralized, None, Capabilities(shares="nothing", **_NOT_FEDERATED)),
    # Exact and heterogeneous-rank LoRA aggregation: products B @ A of linear layers.
    "ffa-lora": Entry(ffa_lora, ffa_lora.FFALoRA,
                      Capabilities(shares="adapter part", linear_lora_only=True),
                      ffa_lora.flower_kwargs),
    "fedex-lora": Entry(fedex_lora, fedex_lora.FedExLoRA,
                        Capabilities(shares="adapter", **_RANK_AWARE), fedex_lora.flower_kwargs),
    "flora": Entry(flora, flora.FLoRA,
                   Capabilities(shares="adapter", heterogeneous_ranks=True, **_RANK_AWARE),
                   flora.flower_kwargs),
    "fedsa-lora": Entry(fedsa_lora, fedsa_lora.FedSALoRA,
                        Capabilities(shares="adapter part", personal_model=True,
                                     linear_lora_only=True)),
    "hetlora": Entry(hetlora, hetlora.HetLoRA,
                     Capabilities(shares="adapter", heterogeneous_ranks=True, **_RANK_AWARE),
                     hetlora.flower_kwargs),
}

# An option that is on (not at its default) needs the capability named beside it.
# (key, strategy capability it needs, why a strategy without it cannot honour it)
REFUSALS: tuple[tuple[str, str, str], ...] = (
    ("lora.rank-mix", "heterogeneous_ranks", "it trains one rank for every client"),
    ("robust.aggregation", "robust_aggregation", "its server aggregates the updates itself"),
    ("robust.max-update-norm", "norm_screen", "its updates are not screened one by one"),
    ("robust.min-replies", "retries", "its rounds are not retried or skipped"),
    ("robust.on-too-few-replies", "retries", "its rounds are not retried or skipped"),
    ("threats.attack", "uploads", "its clients upload no model an attacker could poison"),
    ("threats.client-failure-rate", "federated", "no client trains"),
    ("dp.noise-multiplier", "dp", "its server aggregation is not the clipped, noised mean"),
    ("upload.compression", "compression", "its server does not decode compressed updates"),
    ("secagg.enabled", "secure_aggregation",
     "SecAgg+ sums one adapter of fixed shape; this strategy moves full weights, per-rank "
     "adapters or nothing"),
    ("resume", "resume", "its server-side state is not in the checkpoint"),
)

# Options that exclude each other whatever the strategy: (key that is on, key, why).
CONFLICTS: tuple[tuple[str, str, str], ...] = (
    ("dp.noise-multiplier", "robust.aggregation",
     "differential privacy needs aggregation 'mean' (the noise is calibrated to the mean of "
     "clipped updates)"),
    ("dp.noise-multiplier", "upload.compression",
     "DP clips the plain adapter change; compress without DP"),
    # SecAgg+ gives the server only the masked sum: whatever needs one client's update in the
    # clear cannot run with it.
    ("secagg.enabled", "robust.aggregation", "the server never sees one client's update"),
    ("secagg.enabled", "robust.max-update-norm", "the server never sees one client's update"),
    ("secagg.enabled", "dp.noise-multiplier", "the server never sees one client's update"),
    ("secagg.enabled", "upload.compression", "the server never sees one client's update"),
    ("secagg.enabled", "robust.on-too-few-replies", "the server never sees one client's update"),
)


def _refuse(cfg: RunConfig, key: str, why: str) -> None:
    raise ConfigError(f"run-config key '{key}' = {cfg.get(key)!r}: {why}")


def strategy_entry(cfg: RunConfig) -> Entry:
    if cfg.strategy.name not in STRATEGIES:
        _refuse(cfg, "strategy.name", f"must be one of {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.strategy.name]


def check_run(cfg: RunConfig) -> tuple[Task, Entry]:
    """The start-up check of a run: its task and strategy, or ConfigError naming the key of
    the first option the task or the strategy cannot honour."""
    task, entry = get_task(cfg), strategy_entry(cfg)
    caps, name = entry.caps, cfg.strategy.name
    if cfg.data.dataset not in task.caps.datasets:
        _refuse(cfg, "data.dataset", f"task {task.name!r} needs one of {task.caps.datasets}")
    if cfg.data.partitioner not in task.caps.partitioners:
        _refuse(cfg, "data.partitioner", f"task {task.name!r} needs one of {task.caps.partitioners}")
    if caps.linear_lora_only and not task.caps.linear_lora:
        _refuse(cfg, "strategy.name", f"its LoRA products are defined for linear layers; task "
                                      f"{task.name!r} adapts convolutions")
    if cfg.threats.attack not in task.caps.attacks:
        _refuse(cfg, "threats.attack", f"task {task.name!r} simulates {task.caps.attacks}")
    if caps.full_model and cfg.threats.attack_learning_rate:
        _refuse(cfg, "threats.attack-learning-rate", f"strategy {name!r} trains the whole model at "
                "train.full-learning-rate; the attacker's rate is an adapter learning rate")
    if caps.full_model and cfg.robust.aggregation == "multikrum":
        _refuse(cfg, "robust.aggregation", f"multikrum compares every pair of updates in memory; "
                f"strategy {name!r} uploads whole models (use median or trimmed-mean)")
    if caps.personal_model and cfg.threats.boost == "poison-difference":
        _refuse(cfg, "threats.boost", f"the clean twin would train strategy {name!r}'s personal "
                "model too, so the poisoned run would start from another personal state")
    if cfg.model.precision != "auto" and cfg.model.precision not in task.caps.precisions:
        _refuse(cfg, "model.precision", f"task {task.name!r} trains in {task.caps.precisions}")
    if cfg.model.gradient_checkpointing and not task.caps.gradient_checkpointing:
        _refuse(cfg, "model.gradient-checkpointing", f"task {task.name!r}'s backbone has none")
    for key, capability, why in REFUSALS:
        if not cfg.is_default(key) and not getattr(caps, capability):
            _refuse(cfg, key, f"not supported with strategy {name!r} ({why})")
    for on, key, why in CONFLICTS:
        if not cfg.is_default(on) and not cfg.is_default(key):
            _refuse(cfg, key, f"not supported with {on} = {cfg.get(on)!r} ({why})")
    return task, entry


def build_strategy(cfg: RunConfig, initial_arrays: ArrayRecord, *, node_order=(), privacy=None,
                   round_offset: int = 0):
    """The run's Flower strategy, with everything it needs given to its constructor."""
    entry = strategy_entry(cfg)
    return entry.server(
        spec=array_spec(initial_arrays) if len(initial_arrays) else None, seed=cfg.seed,
        num_rounds=cfg.num_server_rounds, fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        evaluate_every=cfg.server.evaluate_every,
        min_available_nodes=cfg.server.min_available_nodes, robust=cfg.robust, dp=cfg.dp,
        secure=cfg.secagg if cfg.secagg.enabled else None, privacy=privacy,
        node_order=node_order, round_offset=round_offset, round_timeout=cfg.server.round_timeout,
        **entry.flower_kwargs(cfg))
