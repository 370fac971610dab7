"""What every strategy needs: update validation, wire bytes, seeded sampling, client-eval
summaries, and the FedGenStrategy mixin that applies them around a Flower strategy."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

log = logging.getLogger("flwr.fedgen_edge")  # shown by Flower's log handlers

ARRAYS_KEY = "arrays"
NUM_EXAMPLES = "num-examples"

# name -> (shape, dtype string) of what a valid update must carry
ArraySpec = dict[str, tuple[tuple[int, ...], str]]


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


def check_update(content: RecordDict, spec: ArraySpec,
                 weight_key: str = NUM_EXAMPLES) -> tuple[dict[str, np.ndarray], float]:
    """The update's arrays and weight, or ValueError saying what is wrong with it."""
    if len(content.array_records) != 1:
        raise ValueError(f"expected one ArrayRecord, got {len(content.array_records)}")
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
    arrays = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"'{weight_key}' must be a positive number, got {weight!r}")
    missing, extra = sorted(set(spec) - set(arrays)), sorted(set(arrays) - set(spec))
    if missing or extra:
        raise ValueError(f"keys differ from the global adapter: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, extra {extra[:3]}")
    out = {}
    for key, (shape, dtype) in spec.items():
        array = arrays[key]
        if tuple(array.shape) != shape:
            raise ValueError(f"'{key}' has shape {tuple(array.shape)}, expected {shape}")
        if str(array.dtype) != dtype:
            raise ValueError(f"'{key}' has dtype {array.dtype}, expected {dtype}")
        value = array.numpy()
        if not np.isfinite(value).all():
            raise ValueError(f"'{key}' holds NaN or Inf")
        out[key] = value
    return out, float(weight)


def local_training_kwargs(cfg, seed: int, full_model: bool = False) -> dict:
    """The local-training budget of one client call, from the run config (full fine-tuning
    takes its own, much smaller, learning rate)."""
    return dict(epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                lr=cfg.full_learning_rate if full_model else cfg.learning_rate,
                weight_decay=cfg.weight_decay, max_steps=cfg.max_steps, seed=seed)


def wire_bytes(obj) -> int:
    """Bytes of the serialized objects Flower transfers for a record (arrays, metrics, config).

    Flower ships a message as a tree of deflated objects (RecordDict -> records -> arrays);
    summing their serialized sizes counts exactly the payload that crosses the wire, headers
    and keys included (transport framing excluded).
    """
    return len(obj.deflate()) + sum(wire_bytes(child) for child in obj.children.values()) \
        if obj.children else len(obj.deflate())


def model_bytes(content: RecordDict) -> int:
    """Wire bytes of the model payload (the ArrayRecords) of a message's content."""
    return sum(wire_bytes(r) for r in content.array_records.values() if len(r))


def sample_node_ids(nodes: Iterable[int], fraction: float, minimum: int,
                    seed: int, server_round: int, salt: int = 0) -> list[int]:
    """A seeded sample of positions in ``nodes`` (Flower's own sampler is unseeded).

    ``nodes`` should be in a run-independent order (by partition id, see
    FedGenStrategy.node_order): simulation node ids are drawn anew each run, so sampling by
    position makes every run of a comparison train the same clients in the same rounds.
    """
    nodes = list(nodes)
    size = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
    rng = random.Random(seed * 1_000_003 + server_round * 7919 + salt)
    return sorted(nodes[i] for i in rng.sample(range(len(nodes)), size))


def split_replies(replies: Iterable[Message], spec: ArraySpec | None, stage: str
                  ) -> tuple[list[tuple[Message, dict[str, np.ndarray] | None, float]], int, int]:
    """Valid replies (with their arrays when ``spec`` is given), #failed, #rejected.

    A reply that carries an error, or whose update is malformed, is logged with its node id and
    left out; the round goes on with the others.
    """
    valid, failed, rejected = [], 0, 0
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed += 1
            log.warning("%s: node %s failed: %s", stage, node, msg.error.reason)
            continue
        try:
            if spec is None:
                metrics = _single_metrics(msg.content)
                arrays, weight = None, float(metrics[NUM_EXAMPLES])
            else:
                arrays, weight = check_update(msg.content, spec)
        except (ValueError, KeyError, TypeError) as err:
            rejected += 1
            log.warning("%s: rejected update from node %s: %s", stage, node, err)
            continue
        valid.append((msg, arrays, weight))
    return valid, failed, rejected


def _single_metrics(content: RecordDict) -> MetricRecord:
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    if not isinstance(metrics.get(NUM_EXAMPLES), (int, float)):
        raise ValueError(f"missing '{NUM_EXAMPLES}'")
    return metrics


def summarize_client_evals(rows: list[dict]) -> dict:
    """Token-weighted perplexities over client evaluation replies.

    ``local_global_ppl``: the global adapter on every evaluated client's local test set;
    ``personalized_ppl`` / ``personalized_global_ppl``: the personal vs the global adapter on
    the clients that already hold a personal adapter (same clients, same tokens).
    """
    if rows and "global-fid" in rows[0]:  # the image task reports FID instead of NLL
        from task.image_train import summarize_client_fids

        return summarize_client_fids(rows)

    def ppl(rs: list[dict], which: str) -> float:
        tokens = sum(r[f"{which}-tokens"] for r in rs)
        return math.exp(sum(r[f"{which}-nll"] for r in rs) / tokens) if tokens else math.nan

    personal = [r for r in rows if r.get("personal-tokens", 0) > 0]
    return {"local_global_ppl": ppl(rows, "global"), "personalized_ppl": ppl(personal, "personal"),
            "personalized_global_ppl": ppl(personal, "global"), "eval_clients": len(rows),
            "personalized_clients": len(personal)}


class FedGenStrategy:
    """What every FedGen-Edge strategy adds to the Flower strategy it is mixed into.

    Put it first in the bases (``class X(FedGenStrategy, flwr.serverapp.strategy.FedAvg)``) so
    that Flower's own logic (FedProx's config, FedOpt's server optimizer, FedAvg's weighted mean)
    still runs through ``super()``, and this class adds around it:
    - seeded client sampling (Flower's sampler is unseeded),
    - per-reply validation: a malformed update is logged with its node id and left out,
    - exact byte accounting of what crosses the wire, per round,
    - client evaluations of global vs personal models, kept per round for the results.

    ``spec`` describes the arrays a valid training reply carries (None: replies carry none, as
    in local-only training).
    """

    def __init__(self, *, spec: ArraySpec | None, seed: int, num_rounds: int,
                 evaluate_every: int = 1, **flower_kwargs) -> None:
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                         arrayrecord_key=ARRAYS_KEY, **flower_kwargs)
        self.spec = spec
        self.seed = seed
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.round_stats: dict[int, dict] = {}
        self.client_evals: dict[int, list[dict]] = {}
        self.node_order: list[int] = []  # node ids by partition id (set by the ServerApp)

    def _ordered_nodes(self, grid) -> list[int]:
        """Connected nodes, in partition order where known, then by node id."""
        connected = set(grid.get_node_ids())
        known = [n for n in self.node_order if n in connected]
        return known + sorted(connected - set(known))

    def _stats(self, server_round: int) -> dict:
        return self.round_stats.setdefault(server_round, {
            "upload_bytes": 0, "download_bytes": 0, "eval_upload_bytes": 0,
            "eval_download_bytes": 0, "num_updates": 0, "failures": 0, "rejected": 0,
            "train_loss": math.nan})

    def _resample(self, messages, server_round: int, fraction: float, grid, train: bool):
        """Flower built the messages; send the same payload to a seeded sample instead."""
        messages = list(messages)
        if not messages:
            return []
        record = messages[0].content
        nodes = sample_node_ids(self._ordered_nodes(grid), fraction, 1, self.seed, server_round,
                                salt=0 if train else 1)
        # Every sampled node receives this same payload.
        if train:
            self._stats(server_round)["download_bytes"] += model_bytes(record) * len(nodes)
        else:
            self._stats(server_round)["eval_download_bytes"] += wire_bytes(record) * len(nodes)
        log.info("round %d %s: %d nodes sampled", server_round, "train" if train else "evaluate",
                 len(nodes))
        return [Message(content=record, message_type=messages[0].metadata.message_type,
                        dst_node_id=n) for n in nodes]

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._resample(messages, server_round, self.fraction_train, grid, train=True)

    def configure_evaluate(self, server_round, arrays, config, grid):
        if server_round % self.evaluate_every and server_round != self.num_rounds:
            return []
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._resample(messages, server_round, self.fraction_evaluate, grid, train=False)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        stats = self._stats(server_round)
        stats["upload_bytes"] += sum(model_bytes(m.content) for m in replies if not m.has_error())
        valid, stats["failures"], stats["rejected"] = split_replies(replies, self.spec,
                                                                    "aggregate_train")
        stats["num_updates"] = len(valid)
        if not valid:
            log.warning("round %d: no valid update, the global model is unchanged", server_round)
            return None, None
        weights = [w for _, _, w in valid]
        losses = [float(_single_metrics(m.content).get("train-loss", math.nan)) for m, _, _ in valid]
        stats["train_loss"] = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
        metrics = MetricRecord({"train-loss": stats["train_loss"], "num-updates": len(valid)})
        if self.spec is None:  # nothing to aggregate
            return None, metrics
        arrays, _ = super().aggregate_train(server_round, [m for m, _, _ in valid])
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self._stats(server_round)["eval_upload_bytes"] += sum(
            wire_bytes(m.content) for m in replies if not m.has_error())
        valid, _, _ = split_replies(replies, None, "aggregate_evaluate")
        rows = [{k: float(v) for k, v in _single_metrics(m.content).items()
                 if not isinstance(v, list)} for m, _, _ in valid]
        self.client_evals[server_round] = rows
        return MetricRecord(summarize_client_evals(rows)) if rows else None
