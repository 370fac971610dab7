"""What every strategy needs: update validation, wire bytes, seeded sampling, client-eval
summaries, and the FedGenStrategy mixin that applies them around a Flower strategy."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from strategies import robust
from task.compression import decode_update, is_encoded

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


@dataclass(frozen=True)
class Robustness:
    """The defence, failure-handling and DP settings a strategy applies (issue 6); the defaults
    change nothing. ``from_config`` reads them from the run config."""
    max_update_norm: float = 0.0
    aggregation: str = "mean"
    norm_bound: float = 1.0
    trim_fraction: float = 0.2
    min_replies: int = 1
    on_too_few_replies: str = "skip"
    max_retries: int = 0
    round_timeout: float = 3600.0
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "Robustness":
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def norm_limit(self) -> float:
        """Longest accepted update change (0 = none): max-update-norm, and with DP the clipping
        norm the clients were told to apply (the server checks they did)."""
        limits = [x for x in (self.max_update_norm,
                              self.dp_clipping_norm * (1 + 1e-4) if self.dp_noise_multiplier else 0)
                  if x > 0]
        return min(limits) if limits else 0.0


def local_training_kwargs(cfg, seed: int, full_model: bool = False) -> dict:
    """The local-training budget of one client call, from the run config (full fine-tuning
    takes its own, much smaller, learning rate)."""
    return dict(epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                lr=cfg.full_learning_rate if full_model else cfg.learning_rate,
                weight_decay=cfg.weight_decay, max_steps=cfg.max_steps, seed=seed,
                precision=cfg.precision)


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
                 evaluate_every: int = 1, min_available_nodes: int = 1, **flower_kwargs) -> None:
        # min_available_nodes: Flower waits for that many connected nodes before each sampling.
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=min_available_nodes,
                         arrayrecord_key=ARRAYS_KEY, **flower_kwargs)
        self.spec = spec
        self.seed = seed
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.round_stats: dict[int, dict] = {}
        self.client_evals: dict[int, list[dict]] = {}
        self.node_order: list[int] = []  # node ids by partition id (set by the ServerApp)
        self._asked: dict[int, set[int]] = {}  # round -> nodes sent its training payload
        self._grid = self._sent_arrays = self._reference = self._train_record = None
        self.privacy = None  # task.privacy.PrivacyAccountant when DP is on (build_strategy)

    def _ordered_nodes(self, grid) -> list[int]:
        """Connected nodes, in partition order where known, then by node id."""
        connected = set(grid.get_node_ids())
        known = [n for n in self.node_order if n in connected]
        return known + sorted(connected - set(known))

    def _stats(self, server_round: int) -> dict:
        return self.round_stats.setdefault(server_round, {
            "upload_bytes": 0, "download_bytes": 0, "eval_upload_bytes": 0,
            "eval_download_bytes": 0, "num_updates": 0, "failures": 0, "rejected": 0,
            "train_loss": math.nan, "retries": 0, "skipped": 0})

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
            self._train_record, self._asked[server_round] = record, set(nodes)
            self._stats(server_round)["download_bytes"] += model_bytes(record) * len(nodes)
        else:
            self._stats(server_round)["eval_download_bytes"] += wire_bytes(record) * len(nodes)
        log.info("round %d %s: %d nodes sampled", server_round, "train" if train else "evaluate",
                 len(nodes))
        return [Message(content=record, message_type=messages[0].metadata.message_type,
                        dst_node_id=n) for n in nodes]

    def configure_train(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        self._grid, self._sent_arrays, self._reference = grid, arrays, None
        if self.robustness.dp_noise_multiplier:  # clients clip to it (client_app's DP mod)
            config[KEY_CLIPPING_NORM] = self.robustness.dp_clipping_norm
        messages = super().configure_train(server_round, arrays, config, grid)
        messages = self._resample(messages, server_round, self.fraction_train, grid, train=True)
        if self.secure is not None:  # SecAgg+ runs the round's training (strategies/secagg.py)
            from strategies import secagg

            self._secure_round = secagg.run_round(self.secure, grid, server_round, messages) \
                if messages else None
            return []  # nothing goes out in the clear
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        if server_round % self.evaluate_every and server_round != self.num_rounds:
            return []
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._resample(messages, server_round, self.fraction_evaluate, grid, train=False)

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        stats = self._stats(server_round)
        if self.secure is not None:  # only the masked sum came back: no per-client screening
            from strategies import secagg

            return secagg.aggregate_round(self, server_round, stats, self._secure_round,
                                          super().aggregate_train)
        valid = self._collect_replies(server_round, list(replies), stats)
        stats["num_updates"] = len(valid)
        if len(valid) < max(1, self.robustness.min_replies):
            stats["skipped"] = 1
            log.warning("round %d: %d valid update(s), fewer than min-replies %d: round skipped, "
                        "the global model is unchanged", server_round, len(valid),
                        self.robustness.min_replies)
            return None, None
        weights = [w for _, _, w in valid]
        losses = [float(_single_metrics(m.content).get("train-loss", math.nan)) for m, _, _ in valid]
        stats["train_loss"] = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
        metrics = MetricRecord({"train-loss": stats["train_loss"], "num-updates": len(valid)})
        if self.spec is None:  # nothing to aggregate
            return None, metrics
        arrays, _ = super().aggregate_train(server_round, self._defended(server_round, valid))
        return arrays, metrics

    def _decode_upload(self, msg: Message) -> None:
        """Replace a compressed update (upload-compression) by the tensors it encodes, in place.
        One that does not decode is left as it is: validation then rejects it, naming the node."""
        if msg.has_error() or self.spec is None or ARRAYS_KEY not in msg.content.array_records:
            return
        arrays = msg.content.array_records[ARRAYS_KEY]
        if not is_encoded(arrays.keys()):
            return
        sent = self._sent_arrays or {}
        reference = {k: sent[k].numpy() for k in sent.keys()}
        try:
            decoded = decode_update({k: v.numpy() for k, v in arrays.items()},
                                    [(k, s) for k, (s, _) in sorted(self.spec.items())], reference)
        except (ValueError, RuntimeError) as err:
            log.warning("aggregate_train: undecodable update from node %s: %s",
                        msg.metadata.src_node_id, err)
            return
        msg.content[ARRAYS_KEY] = ArrayRecord(
            {k: Array(decoded[k].numpy().astype(self.spec[k][1])) for k in self.spec})

    # ---- Robustness and privacy (issue 6): screening, retries, robust/DP aggregation.
    robustness = Robustness()
    secure = None  # strategies.secagg.SecAggSettings with secure-aggregation = true
    _secure_round = None  # this round's SecAgg+ result (configure_train -> aggregate_train)
    round_offset = 0  # resumed run: Flower counts rounds from 1 again, the real round is offset

    def _collect_replies(self, server_round: int, replies: list[Message], stats: dict) -> list:
        """Valid, norm-screened replies; with on-too-few-replies = retry, ask other clients."""
        valid: list = []
        for attempt in range(self.robustness.max_retries + 1):
            stats["upload_bytes"] += sum(model_bytes(m.content) for m in replies
                                         if not m.has_error())
            for msg in replies:  # compressed uploads (upload-compression): bytes counted as sent
                self._decode_upload(msg)
            ok, failed, rejected = split_replies(replies, self.spec, "aggregate_train")
            ok, too_far = self._screen_norms(ok)
            stats["failures"] += failed
            stats["rejected"] += rejected + too_far
            valid += ok
            if (len(valid) >= self.robustness.min_replies
                    or self.robustness.on_too_few_replies != "retry"
                    or attempt == self.robustness.max_retries):
                break
            replies = self._retry(server_round, attempt + 1)
            if not replies:
                break
            stats["retries"] = attempt + 1
        return valid

    def _retry(self, server_round: int, attempt: int) -> list[Message]:
        """Send the round's training payload to a seeded sample of clients not asked yet."""
        asked = self._asked.setdefault(server_round, set())
        candidates = [n for n in self._ordered_nodes(self._grid) if n not in asked]
        size = min(len(candidates), max(1, len(asked)))
        if not size:
            return []
        rng = random.Random(self.seed * 1_000_003 + server_round * 7919 + 101 * attempt)
        nodes = sorted(rng.sample(candidates, size))
        asked.update(nodes)
        self._stats(server_round)["download_bytes"] += model_bytes(self._train_record) * len(nodes)
        log.warning("round %d: too few valid replies, retry %d asks nodes %s", server_round,
                    attempt, nodes)
        return list(self._grid.send_and_receive(
            [Message(content=self._train_record, message_type=MessageType.TRAIN, dst_node_id=n)
             for n in nodes], timeout=self.robustness.round_timeout))

    def _screen_norms(self, valid: list) -> tuple[list, int]:
        """Reject updates whose change from the sent global model is absurdly long."""
        limit = self.robustness.norm_limit
        if not limit or self.spec is None:
            return valid, 0
        reference = self._reference_arrays()
        kept = []
        for msg, arrays, weight in valid:
            norm = robust.delta_norm(arrays, reference)
            if norm > limit:
                log.warning("aggregate_train: rejected update from node %s: update norm %.4g "
                            "exceeds the limit %.4g", msg.metadata.src_node_id, norm, limit)
                continue
            kept.append((msg, arrays, weight))
        return kept, len(valid) - len(kept)

    def _reference_arrays(self) -> dict[str, np.ndarray]:
        if self._reference is None:
            self._reference = {k: v.numpy() for k, v in self._sent_arrays.items()}
        return self._reference

    def _defended(self, server_round: int, valid: list) -> list[Message]:
        """The replies the Flower strategy aggregates: as they are (aggregation "mean"), or one
        reply carrying the robust aggregate or the noised DP mean."""
        settings = self.robustness
        if settings.aggregation == "mean" and not settings.dp_noise_multiplier:
            return [m for m, _, _ in valid]
        method = "mean" if settings.dp_noise_multiplier else settings.aggregation
        aggregate = robust.aggregate_robust(
            [a for _, a, _ in valid], [w for _, _, w in valid], self._reference_arrays(), method,
            norm_bound=settings.norm_bound, trim_fraction=settings.trim_fraction)
        if settings.dp_noise_multiplier:
            aggregate = self._add_dp_noise(server_round, aggregate, len(valid))
        carrier = valid[0][0]
        carrier.content[ARRAYS_KEY] = ArrayRecord({k: Array(aggregate[k]) for k in self.spec})
        return [carrier]

    def _add_dp_noise(self, server_round: int, mean: dict, num_updates: int) -> dict:
        """Gaussian noise of std z * clip / n on the mean of n clipped updates (DP-FedAvg,
        McMahan et al., ICLR 2018; Flower's compute_stdv), seeded by round (resume is exact);
        the accountant then reports the privacy spent so far."""
        settings = self.robustness
        std = compute_stdv(settings.dp_noise_multiplier, settings.dp_clipping_norm, num_updates)
        rng = np.random.default_rng([self.seed, server_round, 0xD9])
        noised = {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in mean.items()}
        epsilon = self.privacy.step()
        self._stats(server_round)["dp_epsilon"] = epsilon
        log.info("round %d: DP noise std %.3g on %d clipped updates; privacy spent: epsilon "
                 "%.3f at delta %g", server_round, std, num_updates, epsilon, self.privacy.delta)
        return noised

    def aggregate_evaluate(self, server_round, replies):
        server_round += self.round_offset
        replies = list(replies)
        self._stats(server_round)["eval_upload_bytes"] += sum(
            wire_bytes(m.content) for m in replies if not m.has_error())
        valid, _, _ = split_replies(replies, None, "aggregate_evaluate")
        rows = [{k: float(v) for k, v in _single_metrics(m.content).items()
                 if not isinstance(v, list)} for m, _, _ in valid]
        self.client_evals[server_round] = rows
        return MetricRecord(summarize_client_evals(rows)) if rows else None
