import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from strategies.base import sample_node_ids
from strategies.records import array_spec, wire_bytes
from strategies.fedavg_lora import FedAvgLoRA

@pytest.fixture(autouse=True)
def _serverapp_identity():
    # Messages are stamped with the run/task of the process; a ServerApp sets these at start.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2)}


def _arrays(value_of, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value_of(k), dtype=dtype)) for k, s in SHAPES.items()})


def _reply(node_id: int, arrays: ArrayRecord | None, num_examples=10, loss=1.0) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=instruction)


def _strategy(**kwargs) -> FedAvgLoRA:
    return FedAvgLoRA(spec=array_spec(_arrays(lambda k: 0.0)), seed=1, num_rounds=3,
                      fraction_train=0.1, fraction_evaluate=0.1, **kwargs)


def test_aggregation_equals_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)
    updates = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)]
    weights = [10, 30, 60]
    replies = [_reply(i + 1, ArrayRecord({k: Array(v) for k, v in u.items()}), w, loss=i)
               for i, (u, w) in enumerate(zip(updates, weights))]
    arrays, metrics = _strategy().aggregate_train(1, replies)
    for k in SHAPES:
        expected = (0.1 * updates[0][k].astype(np.float64) + 0.3 * updates[1][k]
                    + 0.6 * updates[2][k])
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-6)
        assert arrays[k].numpy().dtype == np.float32
    assert metrics["train-loss"] == pytest.approx(0.1 * 0 + 0.3 * 1 + 0.6 * 2)


def _bad(kind: str) -> Message:
    good = lambda k: 1.0  # noqa: E731
    if kind == "missing-key":
        return _reply(9, ArrayRecord({"layer.lora_A.weight": Array(np.ones((2, 3), np.float32))}))
    if kind == "extra-key":
        a = _arrays(good)
        a["layer.other.weight"] = Array(np.ones(2, np.float32))
        return _reply(9, a)
    if kind == "wrong-shape":
        a = _arrays(good)
        a["layer.lora_A.weight"] = Array(np.ones((3, 2), np.float32))
        return _reply(9, a)
    if kind == "wrong-dtype":
        return _reply(9, _arrays(good, dtype=np.float64))
    if kind == "nan":
        return _reply(9, _arrays(lambda k: math.nan))
    if kind == "inf":
        return _reply(9, _arrays(lambda k: math.inf))
    if kind == "no-arrays":
        return _reply(9, None)
    if kind == "zero-examples":
        return _reply(9, _arrays(good), num_examples=0)
    if kind == "nan-examples":
        return _reply(9, _arrays(good), num_examples=math.nan)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan",
                                  "inf", "no-arrays", "zero-examples", "nan-examples"])
def test_malformed_update_is_rejected_with_node_id_and_round_goes_on(kind, caplog):
    strategy = _strategy()
    good = [_reply(1, _arrays(lambda k: 1.0), 10), _reply(2, _arrays(lambda k: 3.0), 30)]
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        arrays, _ = strategy.aggregate_train(1, [good[0], _bad(kind), good[1]])
    assert arrays is not None
    for k in SHAPES:  # the mean of the two good updates only
        np.testing.assert_allclose(arrays[k].numpy(), 2.5)
    assert strategy.round_stats[1]["rejected"] == 1
    assert strategy.round_stats[1]["num_updates"] == 2
    assert any("node 9" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


def test_failed_reply_is_counted_and_skipped():
    strategy = _strategy()
    instruction = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    failed = Message(Error(code=0, reason="client crashed"), reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [failed, _reply(1, _arrays(lambda k: 2.0))])
    np.testing.assert_allclose(arrays["layer.lora_A.weight"].numpy(), 2.0)
    assert strategy.round_stats[1]["failures"] == 1


def test_all_updates_bad_keeps_the_global_adapter():
    strategy = _strategy()
    assert strategy.aggregate_train(1, [_bad("nan")]) == (None, None)


def test_upload_bytes_are_the_serialized_payload():
    strategy = _strategy()
    replies = [_reply(1, _arrays(lambda k: 1.0)), _reply(2, _arrays(lambda k: 2.0))]
    strategy.aggregate_train(1, replies)
    counted = strategy.round_stats[1]["upload_bytes"]
    assert counted == sum(wire_bytes(r.content["arrays"]) for r in replies)
    tensor_bytes = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
    # tensors + per-array headers (npy header, dtype, shape, object ids): a few hundred bytes
    assert 2 * tensor_bytes < counted < 2 * (tensor_bytes + len(SHAPES) * 700)


def test_seeded_sampling_is_reproducible_and_sized():
    nodes = list(range(100, 200))
    a = sample_node_ids(nodes, 0.1, 1, seed=3, server_round=4)
    assert a == sample_node_ids(nodes, 0.1, 1, seed=3, server_round=4)
    assert len(a) == 10 and len(set(a)) == 10
    assert a != sample_node_ids(nodes, 0.1, 1, seed=3, server_round=5)


def test_sampling_follows_partition_order_not_node_ids():
    """Two runs with different (random) node ids sample the same partitions."""
    partitions = list(range(20))
    run_a = {p: 1000 + 7 * p for p in partitions}       # partition -> node id
    run_b = {p: 999_999 - 13 * p for p in partitions}
    picked = []
    for run in (run_a, run_b):
        order = [run[p] for p in partitions]             # node ids by partition id
        inverse = {n: p for p, n in run.items()}
        picked.append(sorted(inverse[n] for n in sample_node_ids(order, 0.2, 1, 42, 1)))
    assert picked[0] == picked[1]


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_strategy_orders_connected_nodes_by_partition():
    strategy = _strategy(node_order=[30, 10, 20])  # partitions 0, 1, 2
    assert strategy._ordered_nodes(_Grid([20, 10, 99, 30])) == [30, 10, 20, 99]
