"""The wire format between the thin ClientApp and the device worker (client_app/device_worker.py).

One frame per request or reply, on a Unix domain socket:

    header (20 bytes, little-endian): magic b"FGDW" | protocol version u16 | reserved u16 (0)
                                      | JSON part length u32 | array buffer length u64
    JSON part (UTF-8): one object, its fields fixed per ``type`` (below); unknown fields are errors
    array buffer: the arrays' raw bytes (C order, little-endian), back to back in the order of
                  their descriptors {name, dtype, shape, offset, nbytes}

Never pickle: config values are str/int/float/bool, metrics int/float (or lists of them), arrays
one of ``DTYPES``; every length is checked against the frame before anything is allocated or
read (``shape`` x itemsize == ``nbytes``, the descriptors tile the buffer exactly, the whole
frame within the receiver's maximum). The header's first 6 bytes (magic, version) never change
between versions, so each side can tell a peer of another version from garbage.

A connection: the ClientApp sends ``hello`` (its code fingerprint), the worker answers ``hello``
(its pid, fingerprint, maximum request size) or ``error``; then ``train`` / ``evaluate`` /
``query`` requests, each answered by ``reply`` or ``error``.

No flwr and no torch here: plain sockets, JSON and numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import struct
from pathlib import Path

import numpy as np

MAGIC = b"FGDW"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sHHIQ")
MAX_JSON_BYTES = 16 * 2**20          # config values and array descriptors: a few KB in practice
DEFAULT_MAX_REQUEST_BYTES = 2**30    # 1 GiB: a fedavg-full SmolLM2-135M message is about 540 MB
SOCKET_NAME = "device-worker.sock"   # default socket in the worker's --state-dir

HANDLER_TYPES = ("train", "evaluate", "query")
# dtype name on the wire -> numpy dtype (little-endian); what the handlers and codecs produce
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in (
    "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
    "int64", "uint64", "bool")}
MAX_NDIM = 8

# Fields of each message type: (required, optional).
FIELDS = {
    "hello": ({"type", "code"}, {"pid", "max-request-bytes"}),
    "train": ({"type", "run-id", "node-id", "run-config", "node-config", "config", "arrays"}, set()),
    "evaluate": ({"type", "run-id", "node-id", "run-config", "node-config", "config", "arrays"}, set()),
    "query": ({"type", "run-id", "node-id", "run-config", "node-config", "config", "arrays"}, set()),
    "reply": ({"type", "metrics", "arrays", "compute-s"}, set()),
    "error": ({"type", "error"}, {"traceback"}),
}
ARRAY_FIELDS = {"name", "dtype", "shape", "offset", "nbytes"}


class ProtocolError(ValueError):
    """A frame that breaks the wire format; the message says which rule."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, theirs: int) -> None:
        super().__init__(f"protocol version {theirs}, expected {PROTOCOL_VERSION}")
        self.theirs = theirs


class ConnectionClosed(ConnectionError):
    """The peer closed the connection: between frames (``mid_frame`` False, the normal end of a
    connection) or in the middle of one."""

    def __init__(self, text: str, mid_frame: bool) -> None:
        super().__init__(text)
        self.mid_frame = mid_frame


# --------------------------------------------------------------------------- frames
def encode(message: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    """The frame of ``message`` (a JSON object) with ``arrays`` (name -> array; None: none) as
    a list of byte buffers to send in order. Descriptors are added under ``"arrays"``."""
    message, views = dict(message), []
    carries_arrays = "arrays" in FIELDS[message["type"]][0]
    if arrays is not None and not carries_arrays:
        raise ProtocolError(f"a {message['type']!r} message carries no arrays")
    if carries_arrays:
        message["arrays"] = None if arrays is None else []
    for name, array in (arrays or {}).items():
        dtype = np.dtype(array.dtype)
        if dtype.name not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype} cannot travel "
                                f"(allowed: {sorted(DTYPES)})")
        array = np.asarray(array, dtype=DTYPES[dtype.name], order="C")  # keeps 0-d shapes
        message["arrays"].append({"name": name, "dtype": dtype.name, "shape": list(array.shape),
                                  "offset": sum(len(v) for v in views), "nbytes": array.nbytes})
        views.append(memoryview(array).cast("B") if array.nbytes else b"")
    try:
        body = json.dumps(message, allow_nan=True).encode()
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"cannot encode {message['type']!r} message: {err}") from None
    if len(body) > MAX_JSON_BYTES:
        raise ProtocolError(f"JSON part of {len(body)} bytes exceeds {MAX_JSON_BYTES}")
    buffer_nbytes = sum(len(v) for v in views)
    return [HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, len(body), buffer_nbytes), body, *views]


def frame_nbytes(frame: list) -> int:
    return sum(len(part) for part in frame)


def send_frame(sock: socket.socket, frame: list) -> None:
    for part in frame:
        if len(part):
            sock.sendall(part)


def _recv_exact(sock: socket.socket, nbytes: int, what: str) -> bytearray:
    buffer = bytearray(nbytes)
    view, got = memoryview(buffer), 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed(f"connection closed after {got} of {nbytes} bytes of the {what}",
                                   mid_frame=what != "header" or got > 0)
        got += n
    return buffer


def read_header(sock: socket.socket, max_bytes: int) -> tuple[int, int]:
    """(JSON length, buffer length) of the next frame, checked before anything else is read."""
    head = _recv_exact(sock, HEADER.size, "header")
    magic, version, reserved, json_nbytes, buffer_nbytes = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"not a device-worker frame (magic {magic!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if reserved != 0:
        raise ProtocolError(f"reserved header field is {reserved}, must be 0")
    if json_nbytes > MAX_JSON_BYTES:
        raise ProtocolError(f"JSON part of {json_nbytes} bytes exceeds {MAX_JSON_BYTES}")
    total = HEADER.size + json_nbytes + buffer_nbytes
    if total > max_bytes:
        raise ProtocolError(f"frame of {total} bytes exceeds the maximum of {max_bytes} bytes "
                            "(fedgen-device --max-request-bytes)")
    return json_nbytes, buffer_nbytes


def read_frame(sock: socket.socket, max_bytes: int) -> tuple[dict, dict[str, np.ndarray] | None]:
    """The next frame as (message, arrays), validated: ProtocolError if it breaks a rule,
    ConnectionClosed if the peer went away."""
    json_nbytes, buffer_nbytes = read_header(sock, max_bytes)
    body = _recv_exact(sock, json_nbytes, "JSON part")
    buffer = _recv_exact(sock, buffer_nbytes, "array buffer")
    try:
        message = json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"JSON part is not valid JSON: {err}") from None
    check_message(message)
    return message, decode_arrays(message.get("arrays"), buffer)


# --------------------------------------------------------------------------- validation
def check_message(message) -> None:
    if not isinstance(message, dict):
        raise ProtocolError(f"JSON part must be an object, got {type(message).__name__}")
    kind = message.get("type")
    if kind not in FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {sorted(FIELDS)}")
    required, optional = FIELDS[kind]
    missing, unknown = required - set(message), set(message) - required - optional
    if unknown:
        raise ProtocolError(f"unknown field(s) {sorted(unknown)} in a {kind!r} message")
    if missing:
        raise ProtocolError(f"missing field(s) {sorted(missing)} in a {kind!r} message")
    if kind in HANDLER_TYPES:
        for key in ("run-id", "node-id"):
            _check_int(message[key], key)
        _check_scalars(message["run-config"], "run-config")
        _check_scalars(message["node-config"], "node-config")
        if message["config"] is not None:
            _check_scalars(message["config"], "config")
    elif kind == "reply":
        _check_metrics(message["metrics"])
        if not _is_number(message["compute-s"]):
            raise ProtocolError(f"compute-s = {message['compute-s']!r}: must be a number")
    elif kind == "hello":
        if not isinstance(message["code"], str):
            raise ProtocolError("hello: code must be a string")
        for key in ("pid", "max-request-bytes"):
            if key in message:
                _check_int(message[key], key)
    elif kind == "error":
        if not isinstance(message["error"], str) or not isinstance(message.get("traceback", ""), str):
            raise ProtocolError("error: error and traceback must be strings")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{key} = {value!r}: must be an integer")


def _check_scalars(values, what: str) -> None:
    """Flower's config values: str, int, float or bool (no lists, no bytes, no None)."""
    if not isinstance(values, dict):
        raise ProtocolError(f"{what} must be an object")
    for key, value in values.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ProtocolError(f"{what} value {key!r} = {value!r}: must be str, int, float or bool")


def _check_metrics(values) -> None:
    """Flower's metric values: int or float, or a list of one of them."""
    if not isinstance(values, dict):
        raise ProtocolError("metrics must be an object")
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if not all(_is_number(v) for v in items) or \
                isinstance(value, list) and len({type(v) for v in items}) > 1:
            raise ProtocolError(f"metric {key!r} = {value!r}: must be an int or float, or a "
                                "list of one of them")


def decode_arrays(descriptors, buffer: bytearray) -> dict[str, np.ndarray] | None:
    """Arrays of a frame (views into ``buffer``), after checking every descriptor against it."""
    if descriptors is None:
        if len(buffer):
            raise ProtocolError(f"{len(buffer)} buffer bytes but no array descriptors")
        return None
    if not isinstance(descriptors, list):
        raise ProtocolError("arrays must be a list of descriptors or null")
    arrays, end = {}, 0
    for i, d in enumerate(descriptors):
        if not isinstance(d, dict) or set(d) != ARRAY_FIELDS:
            fields = sorted(set(d) ^ ARRAY_FIELDS) if isinstance(d, dict) else d
            raise ProtocolError(f"array descriptor {i}: fields must be {sorted(ARRAY_FIELDS)} "
                                f"(unknown or missing: {fields})")
        name, dtype, shape, offset, nbytes = (d[k] for k in ("name", "dtype", "shape", "offset", "nbytes"))
        if not isinstance(name, str) or not name or name in arrays:
            raise ProtocolError(f"array descriptor {i}: name {name!r} must be a new, non-empty string")
        if dtype not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype!r} not allowed (allowed: {sorted(DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ProtocolError(f"array {name!r}: shape {shape!r} must be a list of at most "
                                f"{MAX_NDIM} non-negative integers")
        for key, value in (("offset", offset), ("nbytes", nbytes)):
            _check_int(value, f"array {name!r} {key}")
        if math.prod(shape) * DTYPES[dtype].itemsize != nbytes:
            raise ProtocolError(f"array {name!r}: shape {shape} of {dtype} is "
                                f"{math.prod(shape) * DTYPES[dtype].itemsize} bytes, nbytes says {nbytes}")
        if offset != end:
            raise ProtocolError(f"array {name!r}: offset {offset}, expected {end} (arrays lie "
                                "back to back in descriptor order)")
        end = offset + nbytes
        if end > len(buffer):
            raise ProtocolError(f"array {name!r}: bytes {offset}..{end} lie outside the "
                                f"{len(buffer)}-byte buffer")
        arrays[name] = (np.frombuffer(buffer, DTYPES[dtype], math.prod(shape), offset).reshape(shape)
                        if nbytes else np.zeros(shape, DTYPES[dtype]))
    if end != len(buffer):
        raise ProtocolError(f"the arrays cover {end} bytes of a {len(buffer)}-byte buffer")
    return arrays


# --------------------------------------------------------------------------- stale workers
def code_fingerprint(root: Path | None = None) -> str:
    """A hash of the code the handlers run (client_app, strategies, task: every ``*.py`` Flower
    bundles), so a worker started before the app changed is detected: the ClientApp runs from
    the bundle ``flwr run`` sends, the worker from the code it was started with."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("client_app", "strategies", "task"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name.startswith("test_") or "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
