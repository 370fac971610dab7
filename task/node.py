"""What a SuperNode brings of its own: its data, its state folder and its caches.

A SuperNode is configured with ``flower-supernode --node-config "k=v ..."`` (the simulation
engine sets ``partition-id`` and ``num-partitions`` itself). Keys:

- ``partition-id``, ``num-partitions``: benchmarks: the node trains on that partition of the
  run's corpus (``dataset`` / ``partitioner``), exactly as a simulated client does.
- ``data-path``: real use: a folder of the device's own UTF-8 ``.txt`` files (searched
  recursively); see :func:`task.lm.data.local_text_blocks` for how they become train and test data.
- ``state-dir``: where the node keeps its state (default ``$FEDGEN_EDGE_HOME/node`` for a
  ``data-path`` node; without it a partition node keeps the simulation layout under
  ``output-dir``): ``run-<run id>/personal-adapter/`` (peft format, rewritten after each round
  the node trains in, read back by evaluate and the inference command) and, for a
  ``data-path`` node, ``blocks/`` (the tokenized files, so a fresh ClientApp process does not
  tokenize again; partitions are cached by the task).
- ``cache-dir``: the device's own backbone / tokenizer / corpus cache, overriding the run
  config's ``cache-dir`` (a path on the server's machine means nothing on a device).
- ``lora-rank`` or ``memory-mb``: the device profile heterogeneous-rank strategies (hetlora,
  flora) serve an adapter rank by (:func:`task.lora_ops.client_rank`).
- ``device-worker``: the absolute path of a warm ``fedgen-device`` worker's Unix socket
  (client_app/device_worker.py): the ClientApp forwards every message to it instead of
  importing torch and loading the backbone itself.

Each message runs in a fresh ClientApp process under the deployment engine, so everything a
node needs between rounds is on disk in these folders (or held by its device worker), never in
the ClientApp's memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from task import get_task
from task.config import ConfigError, RunConfig, _resolve, fedgen_home

NODE_KEYS = ("partition-id", "num-partitions", "data-path", "state-dir", "cache-dir",
             "lora-rank", "memory-mb", "device-worker")


@dataclass(frozen=True)
class NodeConfig:
    partition_id: int = -1   # -1: the node trains on its own files (data-path)
    num_partitions: int = 0
    data_path: str = ""
    state_dir: str = ""
    cache_dir: str = ""
    lora_rank: int = 0       # device profile (0: none); read by task.lora_ops.client_rank
    memory_mb: float = 0.0
    device_worker: str = ""  # the warm worker's socket ("": handle messages in the ClientApp)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeConfig":
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise ConfigError(f"unknown node-config key(s) {unknown}; valid keys: {list(NODE_KEYS)}")
        values = {k.replace("-", "_"): v for k, v in node_config.items()}
        for key in ("partition-id", "num-partitions", "lora-rank"):
            v = values.get(key.replace("-", "_"))
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"node-config key '{key}' = {v!r}: must be an integer")
        for key in ("data-path", "state-dir", "cache-dir", "device-worker"):
            v = values.get(key.replace("-", "_"))
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"node-config key '{key}' = {v!r}: must be a string (quote it)")
        memory = values.get("memory_mb")
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                   or memory <= 0):
            raise ConfigError(f"node-config key 'memory-mb' = {memory!r}: must be a positive number")
        worker = values.get("device_worker")
        if worker is not None and not Path(worker).is_absolute():
            raise ConfigError(f"node-config key 'device-worker' = {worker!r}: must be the absolute "
                              "path of the worker's socket (fedgen-device --socket)")
        node = cls(**values)
        if node.data_path:
            if not Path(node.data_path).expanduser().is_dir():
                raise ConfigError(f"node-config key 'data-path' = {node.data_path!r}: "
                                  "not a folder on this node")
        elif not 0 <= node.partition_id < node.num_partitions:
            raise ConfigError("node-config needs 'data-path' (the node's own files) or "
                              f"'partition-id' in [0, 'num-partitions'); got {dict(node_config)}")
        return node

    def run_config(self, cfg: RunConfig) -> RunConfig:
        """The run config as this node uses it (its own cache folder, if it has one)."""
        return dataclasses.replace(cfg, cache_dir=self.cache_dir) if self.cache_dir else cfg

    @property
    def state_path(self) -> Path | None:
        """The node's state folder; None: the simulation layout under output-dir."""
        if self.state_dir:
            return _resolve(self.state_dir)
        return fedgen_home() / "node" if self.data_path else None

    def run_state_path(self, run_id: int) -> Path | None:
        """State of one run: a new run starts from a clean personal adapter, a restarted
        SuperNode (same run) finds its own again."""
        return self.state_path / f"run-{run_id}" if self.state_path else None


def node_data(cfg: RunConfig, node: NodeConfig):
    """(train, local-test) data of this node: its partition of the run's dataset (cached on disk
    by the task) or its own files (cached in its state folder)."""
    task = get_task(cfg)
    if not node.data_path:
        return task.client_data(cfg, node.partition_id, node.num_partitions)
    if not task.caps.own_files:
        raise ConfigError(f"node-config key 'data-path' = {node.data_path!r}: task {cfg.task!r} "
                          "trains on partitions of the run's dataset only (give partition-id)")
    return task.own_data(cfg, node.data_path, node.state_path / "blocks")
