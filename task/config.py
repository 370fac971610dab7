"""The run configuration, parsed once into a typed, frozen object made of sub-configs.

Every knob lives in ``[tool.flwr.app.config]`` of pyproject.toml, grouped in nested tables as
flowertune-llm groups them (``[tool.flwr.app.config.lora]`` ``rank = 8`` is the run-config key
``lora.rank``), with a comment each; ``conf/*.toml`` files override only what they change.
Each group is one frozen dataclass below (``cfg.lora.rank``); their defaults equal pyproject's
(a test holds them together). Both apps call :func:`RunConfig.from_run_config` first, so a
wrong key or value stops the run at start with a message naming the key; the checks of what a
task or strategy can honour come right after it (strategies.registry.check_run).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from task.renamed_keys import RENAMED

BACKBONES_BUILTIN = ("smollm2-135m", "tiny-gpt2")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
UPLOAD_CODECS = ("none", "bf16", "int8", "int8-row", "topk")  # task/compression.py CODECS
AGGREGATIONS = ("mean", "norm-bound", "median", "trimmed-mean")
ATTACKS = ("none", "scaled", "sign-flip", "backdoor")

Need = Callable[[bool, str, str], None]  # need(condition, field name, why)


class ConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the frozen backbone and where and how it runs."""
    name: str = "smollm2-135m"
    device: str = "cpu"
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def validate(self, need: Need) -> None:
        need(bool(self.name), "name", f"must be one of {BACKBONES_BUILTIN} or a Hugging Face hub id")
        need(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")


@dataclass(frozen=True)
class DataConfig:
    """[data]: the dataset and how it is split over clients."""
    dataset: str = "shakespeare"
    partitioner: str = "lda-dirichlet"
    lda_topics: int = 10
    dirichlet_alpha: float = 0.5
    chunk_words: int = 200
    vocab_size: int = 10000
    test_fraction: float = 0.2
    global_test_fraction: float = 0.05

    def validate(self, need: Need) -> None:
        # which datasets and partitioners exist is the task's to say (check_run)
        need(self.partitioner != "role" or self.dataset == "shakespeare", "partitioner",
             "'role' (a client is a speaking role) exists only for dataset 'shakespeare'")
        for key in ("lda_topics", "chunk_words", "vocab_size"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
        for key in ("test_fraction", "global_test_fraction"):
            need(0.0 < getattr(self, key) < 1.0, key, "must be in (0, 1)")


@dataclass(frozen=True)
class AdapterConfig:
    """[lora]: the adapters every client trains."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rank_mix: str = ""

    def validate(self, need: Need) -> None:
        need(self.rank >= 1, "rank", "must be >= 1")
        need(self.alpha > 0, "alpha", "must be > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        try:
            mix = parse_rank_mix(self.rank_mix)
        except ValueError as err:
            need(False, "rank_mix", str(err))
        need(all(r <= self.rank for r in mix), "rank_mix",
             f"ranks must be <= lora.rank ({self.rank}), the server's adapter rank")


@dataclass(frozen=True)
class TrainConfig:
    """[train]: one client's local training per round."""
    local_epochs: int = 1
    max_steps: int = 3
    batch_size: int = 8
    seq_len: int = 64
    learning_rate: float = 3e-3
    full_learning_rate: float = 1e-4
    weight_decay: float = 0.0

    def validate(self, need: Need) -> None:
        for key in ("local_epochs", "batch_size", "seq_len"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.full_learning_rate > 0, "full_learning_rate", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass(frozen=True)
class StrategyConfig:
    """[strategy]: which algorithm, how many clients it samples, its own knobs."""
    name: str = "fedavg-lora"
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.1
    fedper_personal_layers: int = 1
    ditto_lambda: float = 0.1
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01

    def validate(self, need: Need) -> None:
        # 'name' is checked against the registry by strategies.registry.check_run
        for key in ("fraction_train", "fraction_evaluate"):
            need(0.0 < getattr(self, key) <= 1.0, key, "must be in (0, 1]")
        for key in ("fedper_personal_layers", "ditto_lambda", "proximal_mu"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.server_learning_rate > 0, "server_learning_rate", "must be > 0")


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the server's schedule, patience and final personalization protocol."""
    evaluate_every: int = 3
    checkpoint_every: int = 3
    round_timeout: float = 3600.0
    min_available_nodes: int = 1
    personalize_clients: int = 10

    def validate(self, need: Need) -> None:
        for key in ("evaluate_every", "checkpoint_every", "min_available_nodes"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.round_timeout > 0, "round_timeout", "must be > 0")
        need(self.personalize_clients >= 0, "personalize_clients", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: how much test data an evaluation reads (text task)."""
    server_max_batches: int = 4
    client_max_batches: int = 1

    def validate(self, need: Need) -> None:
        for key in ("server_max_batches", "client_max_batches"):
            need(getattr(self, key) >= 1, key, "must be >= 1")


@dataclass(frozen=True)
class UploadConfig:
    """[upload]: what the client does to its update before it travels (task/compression.py)."""
    compression: str = "none"
    topk_fraction: float = 0.1

    def validate(self, need: Need) -> None:
        need(self.compression in UPLOAD_CODECS, "compression", f"must be one of {UPLOAD_CODECS}")
        need(0.0 < self.topk_fraction <= 1.0, "topk_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class RobustConfig:
    """[robust]: update screening, robust aggregation, too few replies (strategies/defences.py)."""
    max_update_norm: float = 0.0
    aggregation: str = "mean"
    norm_bound: float = 1.0
    trim_fraction: float = 0.2
    min_replies: int = 1
    on_too_few_replies: str = "skip"
    max_retries: int = 2

    def validate(self, need: Need) -> None:
        need(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        need(self.on_too_few_replies in ("skip", "retry"), "on_too_few_replies",
             "must be 'skip' or 'retry'")
        need(self.max_update_norm >= 0, "max_update_norm", "must be >= 0")
        need(self.norm_bound > 0, "norm_bound", "must be > 0")
        need(0.0 <= self.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")
        need(self.min_replies >= 1, "min_replies", "must be >= 1")
        need(self.max_retries >= 0, "max_retries", "must be >= 0")


@dataclass(frozen=True)
class DPConfig:
    """[dp]: DP-FedAvg, client-level clipping and Gaussian noise on the mean (task/privacy.py)."""
    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def validate(self, need: Need) -> None:
        need(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
        need(self.clipping_norm > 0, "clipping_norm", "must be > 0")
        need(0.0 < self.delta < 1.0, "delta", "must be in (0, 1)")


@dataclass(frozen=True)
class ThreatsConfig:
    """[threats]: simulated attackers and failing clients (client_app/simulated_threats.py)."""
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    backdoor_trigger: str = " thou art cursed"
    backdoor_target: str = " banana"
    client_failure_rate: float = 0.0

    def validate(self, need: Need) -> None:
        need(self.attack in ATTACKS, "attack", f"must be one of {ATTACKS}")
        need(self.attack_scale >= 0, "attack_scale", "must be >= 0")
        for key in ("attack_fraction", "client_failure_rate"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        need(self.attack != "backdoor" or bool(self.backdoor_trigger.strip()
                                               and self.backdoor_target.strip()),
             "backdoor_trigger", "backdoor-trigger and backdoor-target must not be empty")


@dataclass(frozen=True)
class SecAggConfig:
    """[secagg]: Flower's SecAgg+ on the adapter tensors (strategies/secagg.py)."""
    enabled: bool = False
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.5
    clipping_range: float = 1.0
    quantization_range: int = 16777216
    max_weight: float = 10000.0

    def validate(self, need: Need) -> None:
        need(0.0 < self.num_shares <= 1.0, "num_shares",
             "must be in (0, 1]: a share of the round's sampled clients")
        need(0.0 < self.reconstruction_threshold <= 1.0, "reconstruction_threshold",
             "must be in (0, 1]: a share of secagg.num-shares")
        need(self.clipping_range > 0, "clipping_range", "must be > 0")
        need(2 <= self.quantization_range < 2**31, "quantization_range",
             "must be in [2, 2**31) (masked sums of every client live modulo 2**32)")
        need(self.max_weight > 0, "max_weight", "must be > 0")


@dataclass(frozen=True)
class ImageConfig:
    """[image]: the image task's conditional DCGAN, its pre-training and FID (task/image/)."""
    generator_width: int = 32
    discriminator_width: int = 32
    discriminator_learning_rate: float = 2e-4
    keep_discriminator: bool = True
    pretrain_steps: int = 1500
    pretrain_fraction: float = 0.1
    fid_images: int = 128
    client_fid_images: int = 64
    torch_threads: int = 1

    def validate(self, need: Need) -> None:
        for key in ("generator_width", "discriminator_width", "pretrain_steps"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("fid_images", "client_fid_images"):
            need(getattr(self, key) >= 2, key, "must be >= 2")
        need(self.discriminator_learning_rate > 0, "discriminator_learning_rate", "must be > 0")
        need(0.0 < self.pretrain_fraction < 1.0, "pretrain_fraction", "must be in (0, 1)")
        need(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")


@dataclass(frozen=True)
class RunConfig:
    # What is trained (the groups below say on what and how).
    task: str = "lm"
    num_server_rounds: int = 6
    seed: int = 42
    output_dir: str = "outputs/default"
    cache_dir: str = ""
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    threats: ThreatsConfig = field(default_factory=ThreatsConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    # ---------------------------------------------------------------- keys
    @classmethod
    def key_types(cls) -> dict[str, str]:
        """Every run-config key (``lora.rank``) -> its type name."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:  # a group
                for sub in dataclasses.fields(f.default_factory):
                    out[f"{f.name}.{_kebab(sub.name)}"] = _type_name(sub.type)
            else:
                out[_kebab(f.name)] = _type_name(f.type)
        return out

    def flat(self) -> dict[str, Any]:
        """The config as Flower's flat run config (dotted keys), e.g. for results.json."""
        out = {}
        for key in self.key_types():
            out[key] = self.get(key)
        return out

    def get(self, key: str) -> Any:
        """The value of a run-config key (``"lora.rank"``)."""
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part.replace("-", "_"))
        return obj

    def is_default(self, key: str) -> bool:
        """True when ``key`` has its default value (an option that is off)."""
        return self.get(key) == RunConfig().get(key)

    def replace(self, **values: Any) -> "RunConfig":
        """A copy with some keys changed, by run-config key: ``cfg.replace(**{"lora.rank": 4})``."""
        return RunConfig.from_run_config({**self.flat(), **values})

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (dotted, kebab-case keys); keys left out
        take their defaults."""
        types = cls.key_types()
        unknown = sorted(set(run_config) - set(types))
        if unknown:
            hints = [f"'{k}' is now '{RENAMED[k]}'" for k in unknown if k in RENAMED]
            raise ConfigError(f"unknown run-config key(s) {unknown}"
                              + (f" ({'; '.join(hints)})" if hints else "")
                              + f"; valid keys: {sorted(types)}")
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            value = _coerce(key, value, types[key])
            group, _, name = key.rpartition(".")
            if group:
                groups.setdefault(group, {})[name.replace("-", "_")] = value
            else:
                top[name.replace("-", "_")] = value
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING}
        cfg = cls(**top, **{g: factories[g](**v) for g, v in groups.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need_top(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run-config key '{_kebab(name)}' = {getattr(self, name)!r}: {why}")

        need_top(self.num_server_rounds >= 1, "num_server_rounds", "must be >= 1")
        need_top(bool(self.output_dir), "output_dir", "must not be empty")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(_need_in(f.name, sub))

    # Paths: relative ones resolve under FEDGEN_EDGE_HOME (default ~/.fedgen-edge), because the
    # apps run from a bundle copy whose working directory is not the user's checkout.
    @property
    def output_path(self) -> Path:
        return _resolve(self.output_dir)

    @property
    def cache_path(self) -> Path:
        return _resolve(self.cache_dir or "cache")


def flatten_tables(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted run-config keys, as Flower flattens pyproject and conf files."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten_tables(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_rank_mix(text: str) -> dict[int, float]:
    """``"2:0.5,8:0.3,16:0.2"`` -> {rank: share of clients}; "" -> {} (every client lora.rank)."""
    mix: dict[int, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        rank, _, share = item.partition(":")
        try:
            mix[int(rank)] = float(share)
        except ValueError:
            raise ValueError(f"{item!r} is not rank:share (e.g. 2:0.5,8:0.5)") from None
    if mix and (min(mix) < 1 or min(mix.values()) <= 0 or abs(sum(mix.values()) - 1) > 1e-6):
        raise ValueError("ranks must be >= 1 and shares > 0, summing to 1")
    return mix


def fedgen_home() -> Path:
    return Path(os.environ.get("FEDGEN_EDGE_HOME", Path.home() / ".fedgen-edge")).expanduser()


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else fedgen_home() / p


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else t.__name__


def _need_in(group: str, sub: Any) -> Need:
    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"run-config key '{group}.{_kebab(name)}' = {getattr(sub, name)!r}: {why}")

    return need


def _coerce(key: str, value: Any, type_name: str) -> Any:
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be true or false")
        return value
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be an integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be finite")
        return value
    if type_name == "str":
        if not isinstance(value, str):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be a string")
        return value
    raise AssertionError(f"unhandled config type {type_name}")
