"""What a task provides, and :func:`get_task`.

A task is one folder behind one interface: ``task/lm/`` (causal language modeling, perplexity)
and ``task/image/`` (conditional image generation, FID). The apps and the strategies ask
``get_task(cfg)`` for everything task-specific and never branch on the task name; what a task
cannot do is stated once, in its :class:`TaskCapabilities`, from which the start-up checks
(strategies/registry.py) refuse an option it cannot honour, naming the key.

Plain ML only here and below (no flwr): models, data, local training, evaluation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

from task.config import ConfigError

# task name -> the module whose ``TASK`` implements it; imported on first use, so a run pays
# only for its own task's dependencies (torchvision and the FID network for images).
TASK_MODULES = {"lm": "task.lm", "image": "task.image"}


@dataclass(frozen=True)
class TaskCapabilities:
    """What a task can do: every refusal of a task-dependent option is derived from this."""
    metric: str                      # "ppl" | "fid": result fields global_<metric>, ...
    metric_label: str                # axis label of the plot
    count: str                       # what a client evaluation counts: "tokens" | "images"
    datasets: tuple[str, ...]
    partitioners: tuple[str, ...]
    linear_lora: bool                # adapters are B @ A of linear layers (exact / rank-aware LoRA)
    attacks: tuple[str, ...]         # simulated attacks it can run ("none" included)
    precisions: tuple[str, ...]      # compute precisions it implements (task/precision.py)
    own_files: bool                  # a SuperNode may train on its own files (node-config data-path)
    gradient_checkpointing: bool     # the backbone can recompute activations in backward


class Task(Protocol):
    """The interface of a task. ``data`` is one tensor per split: token blocks (N, seq-len) for
    text, image rows [label, pixels...] for images, so strategies treat both alike."""
    name: str
    caps: TaskCapabilities

    # -- backbone and adapters (task/adapters.py shares them per process)
    def backbone_name(self, cfg) -> str: ...
    def load_backbone(self, cfg, dtype=None) -> Any: ...  # frozen, in this dtype (None: float32)
    def lora_config(self, cfg, backbone) -> Any: ...
    def prepare_adapter(self, model, adapter_name: str) -> None: ...
    def model_key(self, cfg) -> tuple: ...
    def parameter_counts(self, model) -> tuple[int, int]: ...

    # -- data
    def prepare(self, cfg) -> dict: ...
    def client_data(self, cfg, partition_id: int, num_partitions: int) -> tuple[Any, Any]: ...
    def own_data(self, cfg, data_path: str, cache_folder) -> tuple[Any, Any]: ...
    def global_test_data(self, cfg) -> Any: ...

    # -- local training and evaluation
    def train(self, model, data, *, epochs: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, max_steps: int = 0, seed: int = 0,
              penalty: Callable | None = None, after_step: Callable | None = None,
              precision: str | None = None) -> float: ...  # None: the model's own
    def evaluator(self, cfg, data, *, seed: int, server: bool) -> Callable[[Any], dict]: ...
    def summarize(self, rows: list[dict], which: str) -> float: ...
    def client_state(self, cfg, client_dir) -> ContextManager: ...

    # -- results
    def header(self, cfg, test_data) -> dict: ...
    def render_samples(self, cfg, model, folder) -> list: ...
    def attack_metrics(self, cfg, model, test_data) -> dict: ...
    def poison_data(self, cfg, data, seed: int) -> Any: ...


def get_task(cfg) -> Task:
    """The task of this run config (``task`` key)."""
    if cfg.task not in TASK_MODULES:
        raise ConfigError(f"run-config key 'task' = {cfg.task!r}: must be one of {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[cfg.task]).TASK


def score(task: Task, stats: dict) -> float:
    """The metric of one evaluation (``evaluator(...)(model)``)."""
    return task.summarize([{f"global-{k}": v for k, v in stats.items()}], "global")


def summarize_client_evals(task: Task, rows: list[dict]) -> dict:
    """Client evaluation replies -> the global model on every evaluated client's local test
    (``local_global_<m>``), and personal vs global on the clients that hold a personal model
    (``personalized_<m>`` / ``personalized_global_<m>``: same clients, same test data)."""
    m, count = task.caps.metric, task.caps.count
    personal = [r for r in rows if r.get(f"personal-{count}", 0) > 0]
    return {f"local_global_{m}": task.summarize(rows, "global"),
            f"personalized_{m}": task.summarize(personal, "personal"),
            f"personalized_global_{m}": task.summarize(personal, "global"),
            "eval_clients": len(rows), "personalized_clients": len(personal)}


def client_row(task: Task, row: dict) -> dict:
    """One client's evaluation as a clients.csv row."""
    m, count = task.caps.metric, task.caps.count
    has_personal = row.get(f"personal-{count}", 0) > 0
    return {"partition_id": int(row.get("partition-id", -1)),
            f"global_{m}": task.summarize([row], "global"),
            f"personal_{m}": task.summarize([row], "personal") if has_personal else "",
            count: int(row.get(f"global-{count}", 0))}
