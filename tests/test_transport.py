"""Model arrays travel packed: one Array per message instead of one per tensor (Flower moves
every Array with its own calls at every hop), unpacked exactly before anything else sees them."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from client_app.flower_app import packed_arrays_mod
from server_app.app import PromptGrid
from strategies.records import PACKED_KEY, pack_arrays, unpack_arrays


@pytest.fixture(autouse=True)
def stamped(monkeypatch):
    """Messages are stamped with the run/task of the process (a SuperNode or ServerApp sets these)."""
    for key, value in (("_run_id", 5), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"layer.0.lora_A": Array(rng.normal(size=(4, 16)).astype(np.float32)),
                        "layer.0.lora_B": Array(rng.normal(size=(16, 4)).astype(np.float32)),
                        "codec.q": Array(rng.integers(-127, 127, size=(33,), dtype=np.int8)),
                        "scalar": Array(np.array(2.5, dtype=np.float64))})


def _content() -> RecordDict:
    return RecordDict({"arrays": _arrays(), "config": ConfigRecord({"server-round": 3})})


def _exact(record: ArrayRecord) -> list:
    return [(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in record.items()]


def test_packing_is_one_array_and_unpacking_gives_back_the_same_bytes():
    content = _content()
    assert pack_arrays(content)
    assert set(content.array_records) == {PACKED_KEY} and len(content[PACKED_KEY]) == 1
    assert content["config"]["server-round"] == 3  # other records untouched
    assert unpack_arrays(content)
    assert _exact(content["arrays"]) == _exact(_arrays())  # names, order, dtypes, bytes
    # nothing to gain: a single array or no arrays stay as they are
    single = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})})
    assert not pack_arrays(single) and "arrays" in single
    assert not unpack_arrays(RecordDict({"config": ConfigRecord({"a": 1})}))
    # a full model goes as it is: its time is the bytes, and a packed copy would double memory
    big = RecordDict({"arrays": ArrayRecord({f"w{i}": Array(np.zeros(2**22, dtype=np.float32))
                                             for i in range(5)})})  # 80 MiB
    assert not pack_arrays(big) and len(big["arrays"]) == 5


def test_a_layout_that_does_not_match_its_buffer_is_refused():
    content = _content()
    pack_arrays(content)
    content["packed-layout"] = ConfigRecord({"layout": '[["w", "float32", [2], "numpy.ndarray", 7]]'})
    with pytest.raises(ValueError, match="layout covers 7 bytes"):
        unpack_arrays(content)
    for bad in ("not json", '{"w": 1}', '[["w", "float32"]]', '[["w", "float32", [2], "numpy.ndarray", "8"]]'):
        content["packed-layout"] = ConfigRecord({"layout": bad})
        with pytest.raises(ValueError, match="malformed packed arrays"):
            unpack_arrays(content)


def test_the_client_mod_hands_plain_arrays_to_the_handler_and_packs_the_reply():
    content = _content()
    pack_arrays(content)
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    seen = {}

    def handler(m: Message, ctx: Context) -> Message:
        seen["arrays"] = _exact(m.content["arrays"])
        doubled = {k: Array(np.asarray(a.numpy() * 2)) for k, a in m.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(doubled), "metrics": MetricRecord({"n": 1})}),
                       reply_to=m)

    reply = packed_arrays_mod(msg, Context(1, 1, {}, RecordDict(), {}), handler)
    assert seen["arrays"] == _exact(_arrays())
    assert PACKED_KEY in reply.content.array_records and reply.content["metrics"]["n"] == 1
    unpack_arrays(reply.content)
    np.testing.assert_array_equal(reply.content["arrays"]["codec.q"].numpy(),
                                  _arrays()["codec.q"].numpy() * 2)


class _LoopbackGrid:
    """Pushed messages are answered by ``answer`` (packed as the client mod packs them)."""

    def __init__(self, answer):
        self.answer, self.pushed, self.replies = answer, [], []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            self.pushed.append(m)
            self.replies.append(self.answer(m, i))
            ids.append(f"id{i}")
        return ids

    def pull_messages(self, ids):
        out = []
        for i in list(ids):
            reply = self.replies[int(i[2:])]
            reply.metadata.__dict__["_reply_to_message_id"] = i
            out.append(reply)
        return out


def test_the_server_grid_sends_packed_and_hands_back_unpacked_replies(caplog):
    record = _content()

    def answer(m: Message, i: int) -> Message:
        assert PACKED_KEY in m.content.array_records  # what crosses the wire
        reply = Message(RecordDict({"arrays": _arrays(), "metrics": MetricRecord({"i": i})}), reply_to=m)
        pack_arrays(reply.content)
        if i == 1:  # a node whose packed reply is malformed
            reply.content["packed-layout"] = ConfigRecord({"layout": "[]"})
        return reply

    grid = PromptGrid(_LoopbackGrid(answer), poll_s=0.0)
    messages = [Message(record, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    replies = {r.content["metrics"]["i"]: r for r in grid.send_and_receive(messages)}
    assert "arrays" in record and PACKED_KEY not in record  # the strategy's record as built
    assert grid._grid.pushed[0].content is grid._grid.pushed[1].content  # one packed copy, shared
    assert _exact(replies[0].content["arrays"]) == _exact(_arrays())
    # the malformed one stays without arrays, so the strategy rejects it; the log names the node
    assert "arrays" not in replies[1].content.array_records
    assert "malformed packed arrays" in caplog.text
