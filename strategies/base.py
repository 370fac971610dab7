"""FedGenStrategy: what every strategy adds around the Flower strategy it is mixed into, and
the client-side helper every strategy module's ``client_train`` uses."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from strategies import defences, secagg
from strategies.accounting import RoundLedger
from strategies.records import (
    ARRAYS_KEY,
    ArraySpec,
    Valid,
    log,
    single_metrics,
    split_replies,
    weighted_train_loss,
)
from task import get_task
from task.adapters import compute_precision
from task.compression import decode_update, is_encoded
from task.config import DPConfig, RobustConfig, RunConfig, SecAggConfig


def local_training_kwargs(cfg: RunConfig, seed: int, full_model: bool = False) -> dict:
    """The local-training budget of one client call, from the run config (full fine-tuning
    takes its own, much smaller, learning rate)."""
    t = cfg.train
    return dict(epochs=t.local_epochs, batch_size=t.batch_size,
                lr=t.full_learning_rate if full_model else t.learning_rate,
                weight_decay=t.weight_decay, max_steps=t.max_steps, seed=seed,
                precision=compute_precision(cfg))


def train_local(cfg: RunConfig, model, data, seed: int, *, full_model: bool = False,
                penalty=None) -> float:
    """One client's local training with the run's budget, by its task's training loop."""
    return get_task(cfg).train(model, data, penalty=penalty,
                               **local_training_kwargs(cfg, seed, full_model))


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


class FedGenStrategy:
    """What every FedGen-Edge strategy adds to the Flower strategy it is mixed into.

    Put it first in the bases (``class X(FedGenStrategy, flwr.serverapp.strategy.FedAvg)``) so
    that Flower's own logic (FedProx's config, FedOpt's server optimizer, FedAvg's weighted mean)
    still runs through ``super()``, and this class adds around it:
    - seeded client sampling in partition order (Flower's sampler is unseeded),
    - per-reply validation: a malformed update is logged with its node id and left out,
    - the defences (norm screen, robust or DP aggregation, retries; strategies/defences.py),
    - SecAgg+ rounds (strategies/secagg.py), exact wire bytes per round (RoundLedger),
    - client evaluations of global vs personal models, kept per round for the results.

    Everything it needs comes to the constructor: ``spec`` (the arrays a valid training reply
    carries; None: replies carry none, as in local-only training), the ``robust``, ``dp`` and
    ``secure`` settings of the run config, the DP ``privacy`` accountant, the ``node_order``
    (node ids by partition id) and the ``round_offset`` of a resumed run (Flower counts rounds
    from 1 again).

    Hooks for subclasses: ``train_messages`` (what each sampled node gets), ``spec_for`` (what
    its reply must match) and ``aggregate_valid`` (the aggregation of the valid updates).
    """

    def __init__(self, *, spec: ArraySpec | None, seed: int, num_rounds: int,
                 evaluate_every: int = 1, min_available_nodes: int = 1,
                 robust: RobustConfig = RobustConfig(), dp: DPConfig = DPConfig(),
                 secure: SecAggConfig | None = None, privacy=None,
                 node_order: Iterable[int] = (), round_offset: int = 0,
                 round_timeout: float = 3600.0, **flower_kwargs) -> None:
        # min_available_nodes: Flower waits for that many connected nodes before each sampling.
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=min_available_nodes,
                         arrayrecord_key=ARRAYS_KEY, **flower_kwargs)
        if dp.enabled and privacy is None:
            raise ValueError("dp.noise-multiplier > 0 needs a privacy accountant")
        self.spec = spec
        self.seed = seed
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.robust, self.dp, self.secure, self.privacy = robust, dp, secure, privacy
        self.node_order = list(node_order)
        self.round_offset = round_offset
        self.round_timeout = round_timeout
        self.round_stats = RoundLedger()
        self.client_evals: dict[int, list[dict]] = {}
        self._asked: dict[int, set[int]] = {}  # round -> nodes sent its training payload
        self._grid = self._sent_arrays = self._reference = self._train_record = None
        self._secure_round = None  # this round's SecAgg+ result (configure -> aggregate)

    # ---------------------------------------------------------------- sampling
    def _ordered_nodes(self, grid) -> list[int]:
        """Connected nodes, in partition order where known, then by node id."""
        connected = set(grid.get_node_ids())
        known = [n for n in self.node_order if n in connected]
        return known + sorted(connected - set(known))

    def _sample(self, grid, server_round: int, fraction: float, salt: int) -> list[int]:
        return sample_node_ids(self._ordered_nodes(grid), fraction, 1, self.seed, server_round,
                               salt=salt)

    def train_messages(self, server_round: int, record, nodes: list[int], grid) -> list[Message]:
        """The training message of each node (default: the same payload to every node)."""
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes]

    def spec_for(self, node: int) -> ArraySpec | None:
        """What a node's training reply must carry (default: ``spec`` for every node)."""
        return self.spec

    # ---------------------------------------------------------------- training
    def configure_train(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        self._grid, self._sent_arrays, self._reference = grid, arrays, None
        if self.dp.enabled:  # clients clip to it (client_app's DP mod)
            config[KEY_CLIPPING_NORM] = self.dp.clipping_norm
        elif self.secure is not None and self.secure.client_clip_norm:
            # SecAgg+ hides single updates from the server, so the bound is applied where the
            # update is made: the same clipping mod, under the masking (client_app/flower_app.py)
            config[KEY_CLIPPING_NORM] = self.secure.client_clip_norm
        built = list(super().configure_train(server_round, arrays, config, grid))
        if not built:
            return []
        self._train_record = built[0].content  # Flower's payload, sent to our own sample
        nodes = self._sample(grid, server_round, self.fraction_train, salt=0)
        self._asked[server_round] = set(nodes)
        log.info("round %d train: %d nodes sampled", server_round, len(nodes))
        messages = self.train_messages(server_round, self._train_record, nodes, grid)
        self.round_stats.train_started(server_round)
        if self.secure is not None:  # SecAgg+ runs the round's training
            self._secure_round = secagg.run_round(self.secure, self.round_timeout, grid,
                                                  server_round, messages)
            self.round_stats.protocol(server_round, self._secure_round.sent_bytes,
                                      self._secure_round.received_bytes)
            return []  # nothing goes out in the clear
        self.round_stats.train_sent(server_round, messages)
        return messages

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        self.round_stats.train_done(server_round)
        try:
            return self._aggregate_train(server_round, replies)
        finally:
            self.round_stats.aggregated(server_round)

    def _aggregate_train(self, server_round, replies):
        stats = self.round_stats(server_round)
        if self.secure is not None:  # only the masked sum came back: no per-client screening
            return secagg.aggregate_round(self.robust.min_replies, server_round, stats,
                                          self._secure_round, super().aggregate_train)
        valid = self._collect_replies(server_round, list(replies), stats)
        stats["num_updates"] = len(valid)
        if len(valid) < max(1, self.robust.min_replies):
            stats["skipped"] = 1
            log.warning("round %d: %d valid update(s), fewer than min-replies %d: round skipped, "
                        "the global model is unchanged", server_round, len(valid),
                        self.robust.min_replies)
            return None, None
        stats["train_loss"] = weighted_train_loss(valid)
        if self.spec is not None:  # how far the updates moved: a defence's bound is read off these
            norms = defences.update_norms([a for _, a, _ in valid], self._reference_arrays())
            if norms:
                stats["update_norm_median"], stats["update_norm_max"] = float(np.median(norms)), max(norms)
        metrics = MetricRecord({"train-loss": stats["train_loss"], "num-updates": len(valid)})
        if self.spec is None:  # nothing to aggregate
            return None, metrics
        return self.aggregate_valid(server_round, valid), metrics

    def aggregate_valid(self, server_round: int, valid: list[Valid]) -> ArrayRecord | None:
        """The new global arrays from the valid updates: the Flower strategy's own aggregation
        of them (aggregation "mean"), or of one update carrying the robust aggregate or the
        noised DP mean (so FedAdam/FedYogi still apply their server step)."""
        if self.robust.aggregation == "mean" and not self.dp.enabled:
            replies = [m for m, _, _ in valid]
        elif self.robust.aggregation == "multikrum":
            replies = defences.multikrum_replies([m for m, _, _ in valid], self.robust, log)
            self.round_stats(server_round)["dropped"] = len(valid) - len(replies)
        else:
            updates, reference = [a for _, a, _ in valid], self._reference_arrays()
            if self.dp.enabled:
                aggregate = defences.dp_noised_mean(updates, reference, self.dp, self.seed,
                                                    server_round)
                epsilon = self.privacy.step()
                self.round_stats(server_round)["dp_epsilon"] = epsilon
                log.info("round %d: DP noise on %d clipped updates; privacy spent: epsilon %.3f "
                         "at delta %g", server_round, len(updates), epsilon, self.privacy.delta)
            else:
                aggregate = defences.aggregate_robust(
                    updates, [w for _, _, w in valid], reference, self.robust.aggregation,
                    norm_bound=self.robust.norm_bound, trim_fraction=self.robust.trim_fraction)
            carrier = valid[0][0]
            carrier.content[ARRAYS_KEY] = ArrayRecord({k: Array(aggregate[k]) for k in self.spec})
            replies = [carrier]
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays

    def _collect_replies(self, server_round: int, replies: list[Message], stats: dict) -> list[Valid]:
        """Valid, norm-screened replies; with on-too-few-replies = retry, ask other clients."""
        valid: list = []
        limit = defences.norm_limit(self.robust, self.dp) if self.spec is not None else 0.0
        for attempt in range(self.robust.max_retries + 1):
            self.round_stats.train_received(server_round, replies)
            for msg in replies:  # compressed uploads: bytes counted as sent, then decoded
                self._decode_upload(msg)
            ok, failed, rejected = split_replies(replies, self.spec_for, "aggregate_train")
            ok, too_far = defences.screen_norms(ok, self._reference_arrays() if limit else {},
                                                limit, log)
            stats["failures"] += failed
            stats["rejected"] += rejected + too_far
            valid += ok
            if (len(valid) >= self.robust.min_replies or self.robust.on_too_few_replies != "retry"
                    or attempt == self.robust.max_retries):
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
        nodes = defences.retry_sample(candidates, len(asked), self.seed, server_round, attempt)
        if not nodes:
            return []
        asked.update(nodes)
        messages = self.train_messages(server_round, self._train_record, nodes, self._grid)
        self.round_stats.train_sent(server_round, messages)
        log.warning("round %d: too few valid replies, retry %d asks nodes %s", server_round,
                    attempt, nodes)
        return list(self._grid.send_and_receive(messages, timeout=self.round_timeout))

    def _decode_upload(self, msg: Message) -> None:
        """Replace a compressed update (upload.compression) by the tensors it encodes, in place.
        One that does not decode is left as it is: validation then rejects it, naming the node."""
        if msg.has_error() or self.spec is None or ARRAYS_KEY not in msg.content.array_records:
            return
        arrays = msg.content.array_records[ARRAYS_KEY]
        if not is_encoded(arrays.keys()):
            return
        try:
            decoded = decode_update({k: v.numpy() for k, v in arrays.items()},
                                    [(k, s) for k, (s, _) in sorted(self.spec.items())],
                                    self._reference_arrays())
        except (ValueError, RuntimeError) as err:
            log.warning("aggregate_train: undecodable update from node %s: %s",
                        msg.metadata.src_node_id, err)
            return
        msg.content[ARRAYS_KEY] = ArrayRecord(
            {k: Array(decoded[k].numpy().astype(self.spec[k][1])) for k in self.spec})

    def _reference_arrays(self) -> dict[str, np.ndarray]:
        """The global arrays this round's training started from."""
        if self._reference is None:
            sent = self._sent_arrays or {}
            self._reference = {k: sent[k].numpy() for k in sent.keys()}
        return self._reference

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        if server_round % self.evaluate_every and server_round != self.num_rounds:
            return []
        built = list(super().configure_evaluate(server_round, arrays, config, grid))
        if not built:
            return []
        nodes = self._sample(grid, server_round, self.fraction_evaluate, salt=1)
        log.info("round %d evaluate: %d nodes sampled", server_round, len(nodes))
        messages = [Message(content=built[0].content, message_type=MessageType.EVALUATE,
                            dst_node_id=n) for n in nodes]
        self.round_stats.eval_sent(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round, replies):
        server_round += self.round_offset
        replies = list(replies)
        self.round_stats.eval_received(server_round, replies)
        valid, _, _ = split_replies(replies, lambda node: None, "aggregate_evaluate")
        rows = [{k: float(v) for k, v in single_metrics(m.content).items()
                 if not isinstance(v, list)} for m, _, _ in valid]
        self.client_evals[server_round] = rows
        return MetricRecord({"eval-clients": len(rows)}) if rows else None
