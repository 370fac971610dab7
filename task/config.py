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
    # Image task (task="image"): conditional DCGAN, LoRA on the generator, FID.
    gan_generator_width: int = 32
    gan_discriminator_width: int = 32
    gan_discriminator_learning_rate: float = 2e-4
    pretrain_steps: int = 1500
    pretrain_fraction: float = 0.1
    fid_images: int = 128
    client_fid_images: int = 64
    image_torch_threads: int = 1

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

    # Paths: relative ones resolve under FEDGEN_EDGE_HOME (default ~/.fedgen-edge), because the
    # apps run from a bundle copy whose working directory is not the user's checkout.
    @property
    def output_path(self) -> Path:
        return _resolve(self.output_dir)

    @property
    def cache_path(self) -> Path:
        return _resolve(self.cache_dir or "cache")


def fedgen_home() -> Path:
    return Path(os.environ.get("FEDGEN_EDGE_HOME", Path.home() / ".fedgen-edge")).expanduser()


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else fedgen_home() / p


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
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
