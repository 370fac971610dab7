"""FedAvg on LoRA adapters: the FedGen-Edge method.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, applied to the LoRA adapters (Hu et al., ICLR 2022) of a frozen backbone.

Shared: the LoRA A and B matrices on the attention query and value projections. The server sends
the global adapter to the sampled clients and replaces it with the mean of their returned
adapters weighted by ``num-examples`` (training sequences).
Stays on the client: the data, the frozen backbone (never sent: every party already holds the
same pre-trained weights), and the client's personalized adapter (its adapter after its latest
local training), which is evaluated beside the global one.

Each reply is validated (keys, shapes, dtypes, finite values, a positive ``num-examples``);
a malformed one is logged with its node id and left out, and the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.common import (
    ARRAYS_KEY,
    ArraySpec,
    log,
    sample_node_ids,
    split_replies,
    summarize_client_evals,
    weighted_mean,
    wire_bytes,
)


class FedAvgLoRA(FedAvg):
    def __init__(self, *, spec: ArraySpec, seed: int, num_rounds: int, fraction_train: float,
                 fraction_evaluate: float, evaluate_every: int = 1) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                         arrayrecord_key=ARRAYS_KEY)
        self.spec = spec
        self.seed = seed
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        # Per-round accounting read by the server app after each round.
        self.round_stats: dict[int, dict] = {}
        self.client_evals: dict[int, list[dict]] = {}

    def _stats(self, server_round: int) -> dict:
        return self.round_stats.setdefault(server_round, {
            "upload_bytes": 0, "download_bytes": 0, "eval_upload_bytes": 0,
            "eval_download_bytes": 0, "num_updates": 0, "failures": 0, "rejected": 0,
            "train_loss": math.nan})

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid, fraction: float, message_type: str) -> list[Message]:
        nodes = sample_node_ids(grid.get_node_ids(), fraction, 1, self.seed, server_round,
                                salt=0 if message_type == MessageType.TRAIN else 1)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        # Every sampled node receives this same payload.
        key = "download_bytes" if message_type == MessageType.TRAIN else "eval_download_bytes"
        self._stats(server_round)[key] += wire_bytes(record) * len(nodes)
        log.info("round %d %s: %d nodes sampled", server_round, message_type, len(nodes))
        return [Message(content=record, message_type=message_type, dst_node_id=n) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, self.fraction_train,
                              MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round % self.evaluate_every and server_round != self.num_rounds:
            return []
        return self._messages(server_round, arrays, config, grid, self.fraction_evaluate,
                              MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = self._stats(server_round)
        stats["upload_bytes"] += sum(wire_bytes(m.content) for m in replies if not m.has_error())
        valid, stats["failures"], stats["rejected"] = split_replies(replies, self.spec,
                                                                    "aggregate_train")
        stats["num_updates"] = len(valid)
        if not valid:
            log.warning("round %d: no valid update, the global adapter is unchanged", server_round)
            return None, None
        weights = [w for _, _, w in valid]
        mean = weighted_mean([arrays for _, arrays, _ in valid], weights)
        losses = [float(next(iter(m.content.metric_records.values())).get("train-loss", math.nan))
                  for m, _, _ in valid]
        stats["train_loss"] = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
        metrics = MetricRecord({"train-loss": stats["train_loss"], "num-updates": len(valid)})
        return ArrayRecord({k: Array(v) for k, v in mean.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Token-weighted local-test perplexity of the global and the personalized adapters."""
        replies = list(replies)
        self._stats(server_round)["eval_upload_bytes"] += sum(
            wire_bytes(m.content) for m in replies if not m.has_error())
        valid, _, _ = split_replies(replies, None, "aggregate_evaluate")
        rows = []
        for msg, _, _ in valid:
            m = next(iter(msg.content.metric_records.values()))
            rows.append({k: float(v) for k, v in m.items() if not isinstance(v, list)})
        self.client_evals[server_round] = rows
        return MetricRecord(summarize_client_evals(rows)) if rows else None

