"""What crosses the wire: record keys, exact wire bytes, and the checks a reply must pass.

Imports nothing else of the project (flwr and numpy only), so every other strategy module can
use it without a cycle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

log = logging.getLogger("flwr.fedgen_edge")  # shown by Flower's log handlers

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"

# name -> (shape, dtype string) of what a valid update must carry
ArraySpec = dict[str, tuple[tuple[int, ...], str]]


def array_spec(arrays: ArrayRecord) -> ArraySpec:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


# ---------------------------------------------------------------------------- wire bytes
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


# ---------------------------------------------------------------------------- checks
def single_metrics(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of a reply, with a numeric ``num-examples``."""
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    if not isinstance(metrics.get(NUM_EXAMPLES), (int, float)):
        raise ValueError(f"missing '{NUM_EXAMPLES}'")
    return metrics


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


Valid = tuple[Message, "dict[str, np.ndarray] | None", float]  # (reply, its arrays, its weight)


def split_replies(replies: Iterable[Message], spec_of, stage: str) -> tuple[list[Valid], int, int]:
    """Valid replies (with their arrays when ``spec_of(node)`` gives a spec), #failed, #rejected.

    ``spec_of``: node id -> the ArraySpec its update must match, or None (replies carry no
    arrays, only metrics). A reply that carries an error, or whose update is malformed, is
    logged with its node id and left out; the round goes on with the others.
    """
    valid, failed, rejected = [], 0, 0
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed += 1
            log.warning("%s: node %s failed: %s", stage, node, msg.error.reason)
            continue
        try:
            spec = spec_of(node)
            if spec is None:
                arrays, weight = None, float(single_metrics(msg.content)[NUM_EXAMPLES])
            else:
                arrays, weight = check_update(msg.content, spec)
        except (ValueError, KeyError, TypeError) as err:
            rejected += 1
            log.warning("%s: rejected update from node %s: %s", stage, node, err)
            continue
        valid.append((msg, arrays, weight))
    return valid, failed, rejected


def weighted_train_loss(valid: list[Valid]) -> float:
    """The ``num-examples``-weighted mean of the replies' ``train-loss`` (one place for it)."""
    weights = [w for _, _, w in valid]
    losses = [float(single_metrics(m.content).get(TRAIN_LOSS, float("nan"))) for m, _, _ in valid]
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights)


# ---------------------------------------------------------------------------- packed transport
# Flower moves every Array of a message as its own object, pulled and pushed with one gRPC call
# each at every hop (SuperLink -> SuperNode -> ClientApp and back, then to the ServerApp). A
# SmolLM2 adapter is 120 small arrays: measured on loopback with TLS, the per-object calls cost
# about 8 s of a round whose training took 3 s. So every run ships the model payload as one
# Array: the arrays' exact serialized bytes side by side, plus their layout; unpacked at the
# other end before anything else sees the message (the strategy's accounting, the client mods).
# Payloads above PACK_MAX_BYTES (a full model) go as they are: their time is the bytes, not the
# calls, and a packed copy would double the sender's memory for them.
PACKED_KEY = "packed-arrays"
PACKED_LAYOUT_KEY = "packed-layout"
PACK_MAX_BYTES = 64 * 2**20


def pack_arrays(content: RecordDict) -> bool:
    """In place: ``content[ARRAYS_KEY]`` (two or more arrays, at most PACK_MAX_BYTES) -> one
    uint8 Array under PACKED_KEY with its layout under PACKED_LAYOUT_KEY; False (untouched)
    otherwise."""
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None or len(arrays) < 2 or sum(len(a.data) for a in arrays.values()) > PACK_MAX_BYTES:
        return False
    layout = [[name, a.dtype, list(a.shape), a.stype, len(a.data)] for name, a in arrays.items()]
    buffer = np.frombuffer(b"".join(a.data for a in arrays.values()), dtype=np.uint8)
    del content[ARRAYS_KEY]
    content[PACKED_KEY] = ArrayRecord({"bytes": Array(buffer)})
    content[PACKED_LAYOUT_KEY] = ConfigRecord({"layout": json.dumps(layout)})
    return True


def unpack_arrays(content: RecordDict) -> bool:
    """In place: the inverse of :func:`pack_arrays` (the same Array objects' bytes, names and
    order); False when ``content`` is not packed. A layout that does not match its buffer
    raises ValueError."""
    if PACKED_KEY not in content.array_records:
        return False
    try:
        layout = json.loads(content.config_records[PACKED_LAYOUT_KEY]["layout"])
        buffer = content.array_records[PACKED_KEY]["bytes"].numpy()
        # every entry [name, dtype, shape, stype, nbytes]: a sender's mistake is an error, not a crash
        if not isinstance(layout, list) or not all(
                isinstance(e, list) and len(e) == 5 and isinstance(e[2], list)
                and isinstance(e[4], int) and e[4] >= 0 for e in layout):
            raise ValueError("the layout is not a list of [name, dtype, shape, stype, nbytes]")
        covered = sum(e[4] for e in layout)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed packed arrays: {err}") from None
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or covered != buffer.size:
        raise ValueError(f"malformed packed arrays: the layout covers {covered} "
                         f"bytes of a {buffer.size}-byte {buffer.dtype} buffer")
    data, offset, arrays = buffer.tobytes(), 0, {}
    for name, dtype, shape, stype, nbytes in layout:
        arrays[name] = Array(dtype=dtype, shape=tuple(shape), stype=stype,
                             data=data[offset:offset + nbytes])
        offset += nbytes
    del content[PACKED_KEY]
    del content[PACKED_LAYOUT_KEY]
    content[ARRAYS_KEY] = ArrayRecord(arrays)
    return True
