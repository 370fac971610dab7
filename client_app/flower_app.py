"""The Flower ClientApp (pyproject's ``clientapp`` component): Flower's mods around every
message, then the message is handled in this process or by the device worker.

- In this process (the default): client_app/app.py's handlers, imported on the first message
  (torch/transformers/peft, about 6 s under the deployment engine's fresh process per message).
- Forwarded (node config ``device-worker=<socket>``): the message's run config, node config,
  config record and arrays go to the warm ``fedgen-device`` process on that socket
  (client_app/device_worker.py; wire format client_app/worker_protocol.py), which runs the same
  handlers; the reply is built from its answer. This path imports only flwr and numpy. A worker
  that is not running, crashed, refuses the request or whose handler fails makes the ClientApp
  raise a clear error: Flower reports the node as failed for that message, and the round goes
  on without it.

The mods stay here, around either path: the packed arrays are unpacked (and the reply's packed),
SecAgg+ masks and DP clips what the handler uploads.
"""

from __future__ import annotations

import socket
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client_app.worker_protocol import (
    ConnectionClosed, ProtocolError, VersionMismatch, code_fingerprint, encode, frame_nbytes,
    read_frame, send_frame)
from strategies.records import pack_arrays, unpack_arrays
from strategies.secagg import secure_aggregation_mod
from task.node import NodeConfig

app = ClientApp()


class DeviceWorkerError(RuntimeError):
    """The device worker could not be reached or did not handle the message."""


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """When the server sends a clipping norm (dp.noise-multiplier > 0, or
    secagg.client-clip-norm under SecAgg+), Flower's fixedclipping_mod clips this client's
    adapter change to it before upload (under SecAgg+: before masking)."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def packed_arrays_mod(msg: Message, context: Context, call_next) -> Message:
    """The server ships a message's arrays as one packed Array (strategies/records.py: one
    transfer instead of one per array and hop); unpacked here before the other mods and the
    handler see them, and the reply's arrays packed the same way. A malformed packed message
    raises: Flower reports the node as failed for it."""
    if not unpack_arrays(msg.content):
        return call_next(msg, context)
    reply = call_next(msg, context)
    if not reply.has_error():
        pack_arrays(reply.content)
    return reply


def device_worker_socket(context: Context) -> str:
    """The node config's ``device-worker`` socket ("": handle messages in this process);
    checks the whole node config, as the handlers would."""
    return NodeConfig.from_node_config(context.node_config).device_worker


# --------------------------------------------------------------------------- the thin path
class WorkerConnection:
    """One connection to the device worker: ``hello`` (version and code checked), then calls."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            self.sock.close()
            raise DeviceWorkerError(
                f"no device worker listens on {socket_path} ({err.strerror}): start it with "
                f"`fedgen-device --socket {socket_path} --state-dir ...` (node config "
                "device-worker), or drop device-worker to train in the ClientApp") from None
        except PermissionError:
            self.sock.close()
            raise DeviceWorkerError(f"the device worker socket {socket_path} belongs to another "
                                    "user: run the SuperNode as the worker's user") from None
        hello, _ = self._exchange(encode({"type": "hello", "code": code_fingerprint()}), 2**20,
                                  "hello")
        if "max-request-bytes" not in hello:
            raise DeviceWorkerError(f"malformed hello from the device worker on {socket_path}: "
                                    "no max-request-bytes")
        self.worker_pid = hello.get("pid")
        self.max_request_bytes = hello["max-request-bytes"]

    def _exchange(self, frame: list, max_reply_bytes: int, expected: str):
        try:
            send_frame(self.sock, frame)
            reply, reply_arrays = read_frame(self.sock, max_reply_bytes)
        except VersionMismatch as err:
            raise DeviceWorkerError(f"the device worker on {self.path} speaks {err}: restart "
                                    "fedgen-device with this app's FedGen-Edge version") from None
        except (ConnectionClosed, ConnectionError) as err:
            raise DeviceWorkerError(f"the device worker on {self.path} closed the connection "
                                    f"before replying ({err}); did it crash? see its log") from None
        except ProtocolError as err:
            raise DeviceWorkerError(f"malformed reply from the device worker on {self.path}: "
                                    f"{err}") from None
        if reply["type"] == "error":
            trace = reply.get("traceback", "")
            raise DeviceWorkerError(f"device worker on {self.path}: {reply['error']}"
                                    + (f"\n--- in the worker:\n{trace}" if trace else ""))
        if reply["type"] != expected:
            raise DeviceWorkerError(f"the device worker on {self.path} answered {reply['type']!r} "
                                    f"to a request that expects {expected!r}")
        return reply, reply_arrays

    def call(self, request: dict, arrays) -> tuple[dict, dict | None]:
        frame = encode(request, arrays)
        if (nbytes := frame_nbytes(frame)) > self.max_request_bytes:
            raise DeviceWorkerError(f"a {request['type']} request of {nbytes} bytes exceeds the "
                                    f"device worker's maximum of {self.max_request_bytes} "
                                    "(fedgen-device --max-request-bytes)")
        # replies are no bigger than what the worker itself accepts (it holds the same arrays)
        return self._exchange(frame, max(self.max_request_bytes, 2**20), "reply")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "WorkerConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalars(record, what: str) -> dict:
    """A ConfigRecord as plain str/int/float/bool values (what the wire carries)."""
    values = dict(record)
    bad = {k: type(v).__name__ for k, v in values.items()
           if not isinstance(v, (str, int, float, bool))}
    if bad:
        raise DeviceWorkerError(f"{what} values {bad} cannot be forwarded to the device worker "
                                "(str, int, float and bool only)")
    return values


def worker_request(kind: str, msg: Message, context: Context) -> tuple[dict, dict | None]:
    """What the worker needs of a message: (request, its arrays as numpy; None: no ArrayRecord)."""
    received = msg.content.array_records.get("arrays")
    config = msg.content.config_records.get("config")
    request = {"type": kind, "run-id": context.run_id, "node-id": context.node_id,
               "run-config": dict(context.run_config), "node-config": dict(context.node_config),
               "config": None if config is None else _scalars(config, "config record")}
    return request, None if received is None else {k: a.numpy() for k, a in received.items()}


def reply_message(reply: dict, reply_arrays: dict | None, msg: Message) -> Message:
    """The ClientApp's reply to ``msg`` from the worker's answer."""
    content = RecordDict({"metrics": MetricRecord(reply["metrics"])})
    if reply_arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in reply_arrays.items()})
    return Message(content, reply_to=msg)


def forwarded(kind: str, msg: Message, context: Context, socket_path: str) -> Message:
    """Handle ``msg`` in the device worker on ``socket_path``; its answer as the reply."""
    request, arrays = worker_request(kind, msg, context)
    with WorkerConnection(socket_path) as worker:
        reply, reply_arrays = worker.call(request, arrays)
    return reply_message(reply, reply_arrays, msg)


def _dispatch(kind: str, msg: Message, context: Context) -> Message:
    if (socket_path := device_worker_socket(context)):
        return forwarded(kind, msg, context, socket_path)
    # deferred: torch/transformers/peft, only on the in-process path
    from client_app import app as handlers

    return getattr(handlers, kind)(msg, context)


# Unpacking first (the other mods see plain arrays); then SecAgg+: it masks whatever the handler
# (and the DP mod under it) uploads.
@app.train(mods=[packed_arrays_mod, secure_aggregation_mod, dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return _dispatch("train", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _dispatch("query", msg, context)


@app.evaluate(mods=[packed_arrays_mod])
def evaluate(msg: Message, context: Context) -> Message:
    return _dispatch("evaluate", msg, context)

