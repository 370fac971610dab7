"""The groups of run-config keys, one frozen dataclass each, with the checks of their values.

``[tool.flwr.app.config.lora]`` in pyproject.toml is :class:`AdapterConfig` here, and so on;
task/config.py puts them together into the RunConfig the apps parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

BACKBONES_BUILTIN = ("smollm2-135m", "tiny-gpt2")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("auto", "fp32", "bf16")  # task/precision.py
UPLOAD_CODECS = ("none", "bf16", "int8", "int8-row", "topk")  # task/compression.py CODECS
AGGREGATIONS = ("mean", "norm-bound", "median", "trimmed-mean", "multikrum")
ATTACKS = ("none", "scaled", "sign-flip", "backdoor")

Need = Callable[[bool, str, str], None]  # need(condition, field name, why)


class ConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the frozen backbone and where and how it runs."""
    name: str = "smollm2-135m"
    device: str = "cpu"
    precision: str = "auto"
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
    dirichlet_alpha: float = 0.1
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
    personalize_clients: int = 20
    personalize_epochs: int = 1
    personalize_learning_rate: float = 1e-3
    personalize_validation_fraction: float = 0.2
    personalize_checks: int = 8
    personalize_max_steps: int = 0
    personalize_validation_cap: int = 256

    def validate(self, need: Need) -> None:
        for key in ("evaluate_every", "checkpoint_every", "min_available_nodes",
                    "personalize_epochs", "personalize_checks"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.round_timeout > 0, "round_timeout", "must be > 0")
        need(self.personalize_clients >= 0, "personalize_clients", "must be >= 0")
        for key in ("personalize_max_steps", "personalize_validation_cap"):
            need(getattr(self, key) >= 0, key, "must be >= 0 (0 = no cap)")
        need(self.personalize_learning_rate > 0, "personalize_learning_rate", "must be > 0")
        need(0.0 < self.personalize_validation_fraction < 1.0, "personalize_validation_fraction",
             "must be in (0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: how much test data an evaluation reads (text task). Round 0 and the final
    round always read the whole global test set."""
    server_round_tokens: int = 16384
    client_tokens: int = 0

    def validate(self, need: Need) -> None:
        for key in ("server_round_tokens", "client_tokens"):
            need(getattr(self, key) >= 0, key, "must be >= 0 (0 = the whole set)")


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
    krum_malicious: int = 1
    krum_select: int = 0
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
        need(self.krum_malicious >= 0, "krum_malicious", "must be >= 0")
        need(self.krum_select >= 0, "krum_select", "must be >= 0 (0 = n - krum-malicious)")
        for key, default in (("krum_malicious", 1), ("krum_select", 0)):
            need(self.aggregation == "multikrum" or getattr(self, key) == default, key,
                 "has no effect unless aggregation = 'multikrum'")
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
    attack_steps: int = 0
    attack_learning_rate: float = 0.0
    attack_until: int = 0
    poison_fraction: float = 1.0
    boost: str = "change"
    backdoor_trigger: str = " thou art cursed"
    backdoor_target: str = " banana"
    client_failure_rate: float = 0.0

    def validate(self, need: Need) -> None:
        need(self.attack in ATTACKS, "attack", f"must be one of {ATTACKS}")
        need(self.attack_scale >= 0, "attack_scale", "must be >= 0 (0 = 1 / attack-fraction)")
        need(self.attack_scale > 0 or self.attack == "none" or self.attack_fraction > 0,
             "attack_scale", "0 (the automatic boost 1 / attack-fraction) needs attack-fraction > 0")
        need(self.attack_steps >= 0, "attack_steps", "must be >= 0 (0 = train.max-steps)")
        need(self.attack_learning_rate >= 0, "attack_learning_rate",
             "must be >= 0 (0 = train.learning-rate)")
        need(self.attack_until >= 0, "attack_until", "must be >= 0 (0 = every round)")
        need(0.0 < self.poison_fraction <= 1.0, "poison_fraction", "must be in (0, 1]")
        need(self.boost in ("change", "poison-difference"), "boost",
             "must be 'change' or 'poison-difference'")
        for key, default in (("attack_scale", 10.0), ("attack_steps", 0), ("attack_learning_rate", 0.0),
                             ("attack_until", 0)):  # an attacker's knobs do nothing without one
            need(self.attack != "none" or getattr(self, key) == default, key,
                 "has no effect with attack = 'none'")
        need(self.attack == "backdoor" or self.poison_fraction == 1.0, "poison_fraction",
             "only a backdoor poisons data: it needs attack = 'backdoor'")
        need(self.boost == "change" or self.attack == "backdoor", "boost",
             "'poison-difference' boosts what the poison changed: it needs attack = 'backdoor'")
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
    client_clip_norm: float = 0.0

    def validate(self, need: Need) -> None:
        need(self.client_clip_norm >= 0, "client_clip_norm", "must be >= 0 (0 = off)")
        need(self.client_clip_norm == 0 or self.enabled, "client_clip_norm",
             "needs secagg.enabled = true (without SecAgg+ the server can bound updates itself: "
             "robust.aggregation = \"norm-bound\")")
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
    """[image]: the image task's conditional DCGAN, its pre-training and its scores (task/image/)."""
    generator_width: int = 32
    discriminator_width: int = 32
    discriminator_learning_rate: float = 2e-4
    keep_discriminator: bool = True
    discriminator_warmup_steps: int = 0
    pretrain_steps: int = 1500
    pretrain_fraction: float = 0.1
    lora_layers: str = "all"
    lora_norms: bool = False
    torch_threads: int = 1
    # scores (task/image/scores.py, classifier.py)
    real_feature_images: int = 5000
    fid_images: int = 2048
    kid_images: int = 1000
    round_kid_images: int = 200
    client_kid_images: int = 100
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    accuracy_per_class: int = 100
    classifier_steps: int = 3000
    inception_bf16: bool = False

    def validate(self, need: Need) -> None:
        for key in ("generator_width", "discriminator_width", "pretrain_steps"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.fid_images >= 2, "fid_images", "must be >= 2")
        need(self.real_feature_images >= 2 * self.fid_images, "real_feature_images",
             f"must be >= 2 * image.fid-images ({2 * self.fid_images}): the FID floor compares "
             "two disjoint real sets of fid-images")
        for key in ("kid_images", "round_kid_images", "client_kid_images", "kid_subset_size"):
            need(getattr(self, key) >= 4, key, "must be >= 4 (KID subsets of half of them, >= 2)")
        for key in ("kid_subsets", "accuracy_per_class", "classifier_steps"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.discriminator_learning_rate > 0, "discriminator_learning_rate", "must be > 0")
        need(self.discriminator_warmup_steps >= 0, "discriminator_warmup_steps", "must be >= 0 (0 = none)")
        need(0.0 < self.pretrain_fraction < 1.0, "pretrain_fraction", "must be in (0, 1)")
        need(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")
        layers = self.lora_layer_indices()
        need(layers is not None, "lora_layers",
             f"must be 'all' or distinct comma-separated generator layers of 0-4, not {self.lora_layers!r}")
        need(not self.lora_norms or bool(layers and set(layers) - {4}), "lora_norms",
             "needs a covered layer of 0-3 (layer 4, the output conv, has no norm)")

    def lora_layer_indices(self) -> list[int] | None:
        """The generator layers LoRA covers (0-4), or None for a malformed ``lora-layers``."""
        if self.lora_layers.strip() == "all":
            return list(range(5))
        try:
            layers = [int(x) for x in self.lora_layers.split(",")]
        except ValueError:
            return None
        return sorted(layers) if layers and len(set(layers)) == len(layers) and all(
            0 <= i <= 4 for i in layers) else None


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
