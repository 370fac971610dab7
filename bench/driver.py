"""Federated rounds in one process through the real ClientApp handler and server strategy.

What a simulation round does minus Ray and gRPC: the ServerApp's strategy aggregates replies
that the ClientApp's ``train`` handler built from a training message. The benchmark uses it to
profile the runtime and to compare uplink codecs on equal terms (same clients, seeds, data).
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import train as client_train_handler
from strategies.records import model_bytes
from strategies.registry import build_strategy, check_run
from task.adapters import initial_adapter_state, set_adapter_state, shared_lora_model
from task.config import RunConfig


def federate(cfg: RunConfig, num_partitions: int, partitions_per_round: list[list[int]],
             on_round=None) -> dict:
    """Rounds of ``cfg.strategy.name`` over the given partitions; returns bytes, times and arrays."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    _, entry = check_run(cfg)
    if not entry.caps.full_model:
        # a fresh server process starts from the seeded initial adapter; the shared model of
        # this process still holds the last client's adapter of an earlier federation
        set_adapter_state(shared_lora_model(cfg), initial_adapter_state(cfg))
    arrays = ArrayRecord(entry.module.server_initial_state(cfg))
    strategy = build_strategy(cfg, arrays)
    run_config = cfg.flat()
    contexts = {}
    stats = {"upload_bytes": [], "download_bytes": [], "client_s": [], "server_s": []}
    for rnd, partitions in enumerate(partitions_per_round, start=1):
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
        strategy._sent_arrays, strategy._reference = arrays, None  # what configure_train records
        stats["download_bytes"].append(model_bytes(content) * len(partitions))
        replies = []
        for pid in partitions:
            ctx = contexts.setdefault(pid, Context(run_id=1, node_id=pid + 1, node_config={
                "partition-id": pid, "num-partitions": num_partitions}, state=RecordDict(),
                run_config=run_config))
            msg = Message(content, dst_node_id=pid + 1, message_type=MessageType.TRAIN)
            t = time.perf_counter()
            replies.append(client_train_handler(msg, ctx))
            stats["client_s"].append(time.perf_counter() - t)
            stats["upload_bytes"].append(model_bytes(replies[-1].content))
        t = time.perf_counter()
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        stats["server_s"].append(time.perf_counter() - t)
        arrays = new_arrays if new_arrays is not None else arrays
        if on_round is not None:
            on_round(rnd, arrays)
    stats["arrays"] = arrays
    stats["rounds"] = strategy.round_stats.rounds
    stats["rejected"] = sum(s.get("rejected", 0) for s in strategy.round_stats.rounds.values())
    return stats
