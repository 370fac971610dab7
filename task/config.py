"""The run configuration, parsed once into a typed, frozen object.

Every knob lives in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case, with a comment
each); ``conf/*.toml`` files override only what they change. Both apps call
:func:`RunConfig.from_run_config` first, so a wrong key or value stops the run at start with a
message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

BACKBONES_BUILTIN = ("smollm2-135m", "tiny-gpt2")
DATASETS = ("shakespeare", "ptb")
IMAGE_DATASETS = ("fashion-mnist", "cifar10")  # image task (task/image_data.py)
PARTITIONERS = ("lda-dirichlet", "iid", "role")
DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
UPLOAD_CODECS = ("none", "bf16", "int8", "int8-row", "topk")  # task/compression.py CODECS
AGGREGATIONS = ("mean", "norm-bound", "median", "trimmed-mean")
ATTACKS = ("none", "scaled", "sign-flip", "backdoor")
IMAGE_PARTITIONERS = ("dirichlet", "iid")  # image task: label Dirichlet or IID
TASKS = ("lm", "image")


class ConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


@dataclass(frozen=True)
class RunConfig:
    # What is trained, on what.
    task: str = "lm"
    backbone: str = "smollm2-135m"
    dataset: str = "shakespeare"
    partitioner: str = "lda-dirichlet"
    strategy: str = "fedavg-lora"
    # Federation.
    num_server_rounds: int = 6
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.1
    evaluate_every: int = 3
    checkpoint_every: int = 3
    round_timeout: float = 3600.0
    # Strategy knobs.
    fedper_personal_layers: int = 1
    ditto_lambda: float = 0.1
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    personalize_clients: int = 10
    # LoRA.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # Local training.
    local_epochs: int = 1
    max_steps: int = 3
    batch_size: int = 8
    seq_len: int = 64
    learning_rate: float = 3e-3
    full_learning_rate: float = 1e-4
    weight_decay: float = 0.0
    # Data and partitioning.
    lda_topics: int = 10
    dirichlet_alpha: float = 0.5
    chunk_words: int = 200
    vocab_size: int = 10000
    test_fraction: float = 0.2
    global_test_fraction: float = 0.05
    # Evaluation.
    eval_max_batches: int = 4
    client_eval_max_batches: int = 1
    # Reproducibility and files.
    seed: int = 42
    output_dir: str = "outputs/default"
    cache_dir: str = ""
    # Heterogeneous LoRA ranks (hetlora, flora): "rank:share,..." assigned to partitions, seeded.
    rank_mix: str = ""
    # Deployment: where and how a device trains, and how many devices a run waits for.
    device: str = "cpu"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    min_available_nodes: int = 1
    # Uplink compression (task/compression.py).
    upload_compression: str = "none"
    upload_topk_fraction: float = 0.1
    # Robustness and privacy (issue 6): see strategies/robust.py, task/attacks.py, task/privacy.py.
    max_update_norm: float = 0.0
    aggregation: str = "mean"
    norm_bound: float = 1.0
    trim_fraction: float = 0.2
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    backdoor_trigger: str = " thou art cursed"
    backdoor_target: str = " banana"
    client_failure_rate: float = 0.0
    min_replies: int = 1
    on_too_few_replies: str = "skip"
    max_retries: int = 2
    resume: bool = False
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    # Image task (task="image"): conditional DCGAN, LoRA on the generator, FID.
    gan_generator_width: int = 32
    gan_discriminator_width: int = 32
    gan_discriminator_learning_rate: float = 2e-4
    gan_keep_discriminator: bool = True
    pretrain_steps: int = 1500
    pretrain_fraction: float = 0.1
    fid_images: int = 128
    client_fid_images: int = 64
    image_torch_threads: int = 1
    # Secure aggregation (issue 6): Flower's SecAgg+, see strategies/secagg.py.
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.5
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 16777216
    secagg_max_weight: float = 10000.0

    @staticmethod
    def key_of(field_name: str) -> str:
        return field_name.replace("_", "-")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys)."""
        fields = {cls.key_of(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; valid keys: {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = fields[key]
            values[field.name] = _coerce(key, value, field.type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run-config key '{key}' = {getattr(self, key.replace('-', '_'))!r}: {why}")

        need(self.task in TASKS, "task", f"must be one of {TASKS}")
        need(bool(self.backbone), "backbone", f"must be one of {BACKBONES_BUILTIN} or a Hugging Face hub id")
        if self.task == "image":
            need(self.dataset in IMAGE_DATASETS, "dataset", f"task 'image' needs one of {IMAGE_DATASETS}")
            need(self.partitioner in IMAGE_PARTITIONERS, "partitioner",
                 f"task 'image' needs one of {IMAGE_PARTITIONERS}")
            for key in ("gan-generator-width", "gan-discriminator-width", "pretrain-steps",
                        "fid-images", "client-fid-images"):
                need(getattr(self, key.replace("-", "_")) >= (2 if "fid" in key else 1), key,
                     "must be >= 2" if "fid" in key else "must be >= 1")
            need(self.gan_discriminator_learning_rate > 0, "gan-discriminator-learning-rate", "must be > 0")
            need(0.0 < self.pretrain_fraction < 1.0, "pretrain-fraction", "must be in (0, 1)")
            need(self.image_torch_threads >= 0, "image-torch-threads", "must be >= 0 (0 = torch's default)")
        else:
            need(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
            need(self.partitioner in PARTITIONERS, "partitioner", f"must be one of {PARTITIONERS}")
        need(
            self.partitioner != "role" or self.dataset == "shakespeare",
            "partitioner",
            "'role' (a client is a speaking role) exists only for dataset 'shakespeare'",
        )
        # 'strategy' is checked against the registry by strategies.build_strategy (task/ has no flwr).
        for key in ("num-server-rounds", "evaluate-every", "checkpoint-every", "lora-rank",
                    "local-epochs", "batch-size", "seq-len", "lda-topics", "chunk-words",
                    "vocab-size", "eval-max-batches", "client-eval-max-batches"):
            need(getattr(self, key.replace("-", "_")) >= 1, key, "must be >= 1")
        need(self.max_steps >= 0, "max-steps", "must be >= 0 (0 = no cap)")
        for key in ("fedper-personal-layers", "personalize-clients"):
            need(getattr(self, key.replace("-", "_")) >= 0, key, "must be >= 0")
        for key in ("ditto-lambda", "proximal-mu"):
            need(getattr(self, key.replace("-", "_")) >= 0, key, "must be >= 0")
        need(self.server_learning_rate > 0, "server-learning-rate", "must be > 0")
        for key in ("fraction-train", "fraction-evaluate"):
            need(0.0 < getattr(self, key.replace("-", "_")) <= 1.0, key, "must be in (0, 1]")
        for key in ("test-fraction", "global-test-fraction"):
            need(0.0 < getattr(self, key.replace("-", "_")) < 1.0, key, "must be in (0, 1)")
        need(0.0 <= self.lora_dropout < 1.0, "lora-dropout", "must be in [0, 1)")
        need(self.lora_alpha > 0, "lora-alpha", "must be > 0")
        need(self.learning_rate > 0, "learning-rate", "must be > 0")
        need(self.full_learning_rate > 0, "full-learning-rate", "must be > 0")
        need(self.weight_decay >= 0, "weight-decay", "must be >= 0")
        need(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(bool(self.output_dir), "output-dir", "must not be empty")
        try:
            mix = parse_rank_mix(self.rank_mix)
        except ValueError as err:
            need(False, "rank-mix", str(err))
        need(all(r <= self.lora_rank for r in mix), "rank-mix",
             f"ranks must be <= lora-rank ({self.lora_rank}), the server's adapter rank")
        need(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.min_available_nodes >= 1, "min-available-nodes", "must be >= 1")
        need(self.upload_compression in UPLOAD_CODECS, "upload-compression",
             f"must be one of {UPLOAD_CODECS}")
        need(0.0 < self.upload_topk_fraction <= 1.0, "upload-topk-fraction", "must be in (0, 1]")
        self._validate_robustness(need)
        self._validate_secure_aggregation(need)

    def _validate_robustness(self, need) -> None:
        """Issue 6 keys: defences, attacks, failures, DP."""
        need(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        need(self.attack in ATTACKS, "attack", f"must be one of {ATTACKS}")
        need(self.on_too_few_replies in ("skip", "retry"), "on-too-few-replies",
             "must be 'skip' or 'retry'")
        for key in ("max-update-norm", "dp-noise-multiplier", "attack-scale"):
            need(getattr(self, key.replace("-", "_")) >= 0, key, "must be >= 0")
        for key in ("norm-bound", "dp-clipping-norm"):
            need(getattr(self, key.replace("-", "_")) > 0, key, "must be > 0")
        need(0.0 <= self.trim_fraction < 0.5, "trim-fraction", "must be in [0, 0.5)")
        for key in ("attack-fraction", "client-failure-rate"):
            need(0.0 <= getattr(self, key.replace("-", "_")) <= 1.0, key, "must be in [0, 1]")
        need(self.min_replies >= 1, "min-replies", "must be >= 1")
        need(self.max_retries >= 0, "max-retries", "must be >= 0")
        need(0.0 < self.dp_delta < 1.0, "dp-delta", "must be in (0, 1)")
        need(self.attack != "backdoor" or bool(self.backdoor_trigger.strip()
                                                and self.backdoor_target.strip()),
             "backdoor-trigger", "backdoor-trigger and backdoor-target must not be empty")
        need(self.dp_noise_multiplier == 0 or self.aggregation == "mean", "aggregation",
             "differential privacy (dp-noise-multiplier > 0) needs aggregation 'mean' "
             "(the noise is calibrated to the mean of clipped updates)")

    def _validate_secure_aggregation(self, need) -> None:
        """Issue 6's SecAgg+ keys (the combinations with other options: strategies/__init__.py)."""
        need(0.0 < self.secagg_num_shares <= 1.0, "secagg-num-shares",
             "must be in (0, 1]: a share of the round's sampled clients")
        need(0.0 < self.secagg_reconstruction_threshold <= 1.0, "secagg-reconstruction-threshold",
             "must be in (0, 1]: a share of secagg-num-shares")
        need(self.secagg_clipping_range > 0, "secagg-clipping-range", "must be > 0")
        need(2 <= self.secagg_quantization_range < 2**31, "secagg-quantization-range",
             "must be in [2, 2**31) (masked sums of every client live modulo 2**32)")
        need(self.secagg_max_weight > 0, "secagg-max-weight", "must be > 0")

    # Paths: relative ones resolve under FEDGEN_EDGE_HOME (default ~/.fedgen-edge), because the
    # apps run from a bundle copy whose working directory is not the user's checkout.
    @property
    def output_path(self) -> Path:
        return _resolve(self.output_dir)

    @property
    def cache_path(self) -> Path:
        return _resolve(self.cache_dir or "cache")


def parse_rank_mix(text: str) -> dict[int, float]:
    """``"2:0.5,8:0.3,16:0.2"`` -> {rank: share of clients}; "" -> {} (every client lora-rank)."""
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


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
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
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be true or false")
        return value
    if type_name == "str":
        if not isinstance(value, str):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be a string")
        return value
    raise AssertionError(f"unhandled config type {type_name}")
