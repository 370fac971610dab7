"""What every strategy needs: update validation, exact weighted means, wire bytes, sampling."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

log = logging.getLogger("flwr.fedgen_edge")  # shown by Flower's log handlers

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
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


def weighted_mean(updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64, returned in each array's dtype."""
    total = float(sum(weights))
    out = {}
    for key, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for update, w in zip(updates, weights):
            acc += update[key].astype(np.float64) * (w / total)
        out[key] = acc.astype(first.dtype)
    return out


def wire_bytes(obj) -> int:
    """Bytes of the serialized objects Flower transfers for a record (arrays, metrics, config).

    Flower ships a message as a tree of deflated objects (RecordDict -> records -> arrays);
    summing their serialized sizes counts exactly the payload that crosses the wire, headers
    and keys included (transport framing excluded).
    """
    return len(obj.deflate()) + sum(wire_bytes(child) for child in obj.children.values()) \
        if obj.children else len(obj.deflate())


def sample_node_ids(node_ids: Iterable[int], fraction: float, minimum: int,
                    seed: int, server_round: int, salt: int = 0) -> list[int]:
    """A seeded sample (Flower's own sampler is unseeded): reproducible runs."""
    nodes = sorted(node_ids)
    size = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
    return sorted(random.Random(seed * 1_000_003 + server_round * 7919 + salt).sample(nodes, size))


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
    def ppl(rs: list[dict], which: str) -> float:
        tokens = sum(r[f"{which}-tokens"] for r in rs)
        return math.exp(sum(r[f"{which}-nll"] for r in rs) / tokens) if tokens else math.nan

    personal = [r for r in rows if r.get("personal-tokens", 0) > 0]
    return {"local_global_ppl": ppl(rows, "global"), "personalized_ppl": ppl(personal, "personal"),
            "personalized_global_ppl": ppl(personal, "global"), "eval_clients": len(rows),
            "personalized_clients": len(personal)}
