"""Server-side pieces of exact and heterogeneous-rank LoRA aggregation (ffa-lora, fedex-lora,
flora, hetlora; fedavg-lora measures its error with them too).

- ``MeasuredFedAvg``: Flower's FedAvg that also records the aggregation error
  ||B_agg A_agg - mean_i(B_i A_i)|| / ||mean_i(B_i A_i)|| of the round (``aggregation_error``).
- ``Correction``: the server-side correction (fedex-lora's residuals, flora's stacked
  products), accumulated per layer as low-rank factors while they are smaller on the wire than
  the dense matrix, dense afterwards.
- ``RankAwareLoRA``: serves every client an adapter of its own rank (a per-node payload, its
  rank in the train config), has each reply validated against the shapes of that rank, and
  leaves the aggregation itself to ``aggregate_lora`` of the subclass (FedGenStrategy's hooks
  ``train_messages``, ``spec_for``, ``aggregate_valid``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from strategies.base import FedGenStrategy
from strategies.records import ArraySpec, Valid, array_spec, log, single_metrics
from task.adapters import initial_adapter_state
from task.lora_ops import (
    A_SUFFIX,
    B_SUFFIX,
    CORR_A,
    CORR_B,
    CORR_DENSE,
    lora_prefixes,
    mean_of_products,
    product_error,
    products,
)

NpState = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> NpState:
    return {k: v.numpy() for k, v in record.items()}


def to_record(state: NpState) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def _linear(state: NpState) -> NpState:
    """The LoRA pairs of linear layers (2-D A and B): the error is measured on B @ A there; the
    image task's convolution adapters (4-D kernels) are left out of the figure."""
    return {k: v for k, v in state.items() if v.ndim == 2}


class MeasuredFedAvg(FedAvg):
    """FedAvg that records the round's aggregation error. ``fixed_arrays``: adapter tensors that
    are not uploaded but are part of every client's product (ffa-lora's frozen A)."""

    def __init__(self, *, fixed_arrays: NpState | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fixed_arrays = fixed_arrays or {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and isinstance(self, FedGenStrategy):
            states = [_linear({**self.fixed_arrays, **to_numpy(m.content[self.arrayrecord_key])})
                      for m in replies]
            weights = [float(single_metrics(m.content)[self.weighted_by_key]) for m in replies]
            aggregated = _linear({**self.fixed_arrays, **to_numpy(arrays)})
            if lora_prefixes(aggregated):
                self.round_stats(server_round)["aggregation_error"] = product_error(
                    products(aggregated), mean_of_products(states, weights))
        return arrays, metrics


class Correction:
    """Per layer: sum of low-rank terms B_k A_k, kept as stacked factors, or a dense matrix once
    the factors would be larger than it (out x in floats)."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.dense: dict[str, np.ndarray] = {}

    def add(self, prefix: str, b: np.ndarray, a: np.ndarray) -> None:
        if prefix in self.dense:
            self.dense[prefix] += b @ a
            return
        if prefix in self.factors:
            b0, a0 = self.factors[prefix]
            b, a = np.concatenate([b0, b], axis=1), np.concatenate([a0, a], axis=0)
        out, inn = b.shape[0], a.shape[1]
        if b.shape[1] * (out + inn) >= out * inn:
            self.factors.pop(prefix, None)
            self.dense[prefix] = (b.astype(np.float64) @ a).astype(np.float32)
        else:
            self.factors[prefix] = (b.astype(np.float32), a.astype(np.float32))

    def product(self, prefix: str) -> np.ndarray:
        if prefix in self.dense:
            return self.dense[prefix].astype(np.float64)
        b, a = self.factors.get(prefix, (None, None))
        return 0.0 if b is None else b.astype(np.float64) @ a

    def to_arrays(self) -> NpState:
        out = {p + CORR_DENSE: d for p, d in self.dense.items()}
        for p, (b, a) in self.factors.items():
            out[p + CORR_B], out[p + CORR_A] = b, a
        return out


def rank_spec(spec: ArraySpec, rank: int) -> ArraySpec:
    """The shapes a rank-``rank`` adapter has, from the full-rank spec."""
    out = {}
    for k, (shape, dtype) in spec.items():
        if k.endswith(A_SUFFIX):
            shape = (rank,) + tuple(shape[1:])
        elif k.endswith(B_SUFFIX):
            shape = (shape[0], rank)
        out[k] = (shape, dtype)
    return out


class RankAwareLoRA(FedGenStrategy, FedAvg):
    """Per-client adapter ranks on the Flower FedAvg skeleton (sampling, rounds, evaluation).

    ``heterogeneous``: ask each new node its rank (its device profile, see
    task.lora_ops.client_rank) with a query message; otherwise every client trains
    ``max_rank``. ``adapter_spec``: shapes of the full-rank adapter the clients upload.
    """

    def __init__(self, *, adapter_spec: ArraySpec, max_rank: int, heterogeneous: bool = False,
                 query_timeout: float = 3600.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = adapter_spec
        self.max_rank = max_rank
        self.heterogeneous = heterogeneous
        self.query_timeout = query_timeout
        self.node_rank: dict[int, int] = {}
        self.current: NpState = {}

    # ---------------------------------------------------------------- what each client gets
    def payload(self, state: NpState, rank: int) -> NpState:
        """What a rank-``rank`` client receives (default: the global arrays)."""
        return state

    def _learn_ranks(self, grid, nodes: list[int]) -> None:
        unknown = [n for n in nodes if n not in self.node_rank]
        if not unknown:
            return
        if not self.heterogeneous:
            self.node_rank.update({n: self.max_rank for n in unknown})
            return
        record = RecordDict({"config": ConfigRecord({"server-round": 0})})
        replies = grid.send_and_receive(
            [Message(content=record, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown],
            timeout=self.query_timeout)
        for reply in replies:
            if reply.has_error() or not reply.content.metric_records:
                continue
            rank = next(iter(reply.content.metric_records.values())).get("lora-rank")
            if isinstance(rank, int) and 1 <= rank <= self.max_rank:
                self.node_rank[reply.metadata.src_node_id] = rank
        log.info("ranks of %d new nodes: %s", len(unknown),
                 sorted(self.node_rank.get(n, self.max_rank) for n in unknown))

    def train_messages(self, server_round, record, nodes, grid):
        """Each node gets the global arrays cut to its rank, and its rank in the config."""
        self.current = to_numpy(record[self.arrayrecord_key])
        self._learn_ranks(grid, nodes)
        payloads: dict[int, ArrayRecord] = {}
        out = []
        for node in nodes:
            rank = self.node_rank.get(node, self.max_rank)
            if rank not in payloads:
                payloads[rank] = to_record(self.payload(self.current, rank))
            config_record = ConfigRecord({**dict(record[self.configrecord_key]), "lora-rank": rank})
            content = RecordDict({self.arrayrecord_key: payloads[rank],
                                  self.configrecord_key: config_record})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def spec_for(self, node):
        """A reply is checked against the shapes of its node's own rank."""
        return rank_spec(self.spec, self.node_rank.get(node, self.max_rank))

    # ---------------------------------------------------------------- aggregation
    def aggregate_lora(self, states: list[NpState], weights: list[float]
                       ) -> tuple[NpState, dict[str, np.ndarray]]:
        """(new global arrays, the product per layer they stand for); subclasses define it."""
        raise NotImplementedError

    def aggregate_valid(self, server_round: int, valid: list[Valid]) -> ArrayRecord:
        weights = [w for _, _, w in valid]
        states = [arrays for _, arrays, _ in valid]
        new_state, represented = self.aggregate_lora(states, weights)
        self.round_stats(server_round)["aggregation_error"] = product_error(
            represented, mean_of_products(states, weights))
        return to_record(new_state)


def rank_aware_kwargs(cfg, heterogeneous: bool) -> dict:
    """Constructor arguments of a RankAwareLoRA strategy for this run."""
    return {"adapter_spec": array_spec(ArrayRecord(initial_adapter_state(cfg))),
            "max_rank": cfg.lora.rank, "heterogeneous": heterogeneous,
            "query_timeout": cfg.server.round_timeout}
