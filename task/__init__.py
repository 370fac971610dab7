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
    figures: tuple[str, ...]         # what figures(...) reports, the metric first ("ppl", "word_ppl")
    counts: tuple[str, ...]          # the counts it reports them over ("tokens", "words")
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
    def partition_stats(self, cfg, num_partitions: int) -> dict: ...  # how non-IID (task/partition_stats.py)

    # -- local training and evaluation
    def train(self, model, data, *, epochs: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, max_steps: int = 0, seed: int = 0,
              penalty: Callable | None = None, after_step: Callable | None = None,
              precision: str | None = None) -> float: ...  # None: the model's own
    # scope: "round" (the server's per-round curve), "whole" (round 0 and the final round),
    # "client" (a local test set), "validation" (a personalization validation share)
    def evaluator(self, cfg, data, *, seed: int, scope: str) -> Callable[[Any], dict]: ...
    def summarize(self, rows: list[dict], which: str) -> float: ...  # the metric of the rows
    def figures(self, rows: list[dict], which: str) -> dict: ...  # every figure, with counts
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
    (``local_global_<figure>``), and personal vs global on the clients that hold a personal
    model (``personalized_<figure>`` / ``personalized_global_<figure>``: same clients, same
    test data), each figure with its counts (``..._tokens``, ``..._words``)."""
    count = task.caps.count
    personal = [r for r in rows if r.get(f"personal-{count}", 0) > 0]
    out: dict = {}
    for prefix, which, subset in (("local_global", "global", rows), ("personalized", "personal", personal),
                                  ("personalized_global", "global", personal)):
        out.update({f"{prefix}_{k}": v for k, v in task.figures(subset, which).items()})
    return {**out, "eval_clients": len(rows), "personalized_clients": len(personal)}


# What the personalization protocol reports per client (client_app/app.py, task/personalization.py)
PROTOCOL_FIELDS = ("chosen-steps", "total-steps", "kept-global", "validation-blocks")


def client_row(task: Task, row: dict) -> dict:
    """One client's evaluation as a clients.csv row: its figures for the global and (when it
    has one) the personal model, the counts, and what the protocol chose."""
    has_personal = row.get(f"personal-{task.caps.count}", 0) > 0
    global_figures = task.figures([row], "global")
    personal_figures = task.figures([row], "personal") if has_personal else {}
    out = {"partition_id": int(row.get("partition-id", -1))}
    for name in task.caps.figures:
        out[f"global_{name}"] = global_figures[name]
        out[f"personal_{name}"] = personal_figures.get(name, "")
    out.update({name: global_figures[name] for name in task.caps.counts})
    out.update({k.replace("-", "_"): int(row[f"protocol-{k}"]) for k in PROTOCOL_FIELDS
                if f"protocol-{k}" in row})
    return out
