"""``fedgen-device``: the warm device worker, one long-lived process per device.

    fedgen-device --state-dir DIR [--socket PATH] [--max-request-bytes N] [--read-timeout S]

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message, which
would re-import torch/transformers/peft (about 6 s) and reload the backbone each time. This
process imports them once and keeps the backbone resident (task/adapters.py's per-process
``shared_lora_model`` / ``shared_full_model``); the ClientApp of a SuperNode whose node config
has ``device-worker=<socket>`` (client_app/flower_app.py) only forwards each message's run
config, node config, config record and arrays here and builds its reply from the answer.

It listens on a Unix domain socket, ``<state-dir>/device-worker.sock`` by default, mode 0600 in
a folder that is not world-writable, and accepts only peers of its own user (SO_PEERCRED). It
serves one connection and one request at a time (the SuperNode sends one message at a time) by
calling the same handlers the in-process ClientApp calls (client_app/app.py) on a Message and
Context rebuilt from the request. A malformed, oversized or other-version request gets an error
reply, a handler exception an error reply (the ClientApp raises it: Flower counts the node as
failed for that message and the round goes on); a peer that disconnects or stalls mid-request
only ends its own connection. The personal adapter and other client state live in the node
config's ``state-dir``, as without the worker. The first request of a new run frees the models
earlier runs loaded (one run's backbone resident, not one per config ever served). SIGTERM /
Ctrl-C: stop and remove the socket.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from pathlib import Path

from flwr.app import (DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message,
                      Metadata, MetricRecord, RecordDict)

from client_app.worker_protocol import (
    DEFAULT_MAX_REQUEST_BYTES, HANDLER_TYPES, PROTOCOL_VERSION, SOCKET_NAME, ConnectionClosed,
    ProtocolError, VersionMismatch, code_fingerprint, encode, read_frame, send_frame)

log = logging.getLogger("fedgen-device")

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


# --------------------------------------------------------------------------- the socket
def open_listener(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, in a folder that is not world-writable
    (a world-writable folder would let another user replace the socket file)."""
    path = path.expanduser().absolute()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is {len(os.fsencode(path))} bytes; a Unix socket "
                         f"path holds at most {MAX_SOCKET_PATH}: give a shorter --socket")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder_mode = path.parent.stat().st_mode
    if folder_mode & stat.S_IWOTH:
        raise PermissionError(f"{path.parent} is world-writable (mode {stat.filemode(folder_mode)}): "
                              "put the worker's socket in a folder only its user can write")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # left by a worker that crashed
        else:
            raise FileExistsError(f"another device worker already listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is born 0600: no window where others connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(8)
    return listener


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# --------------------------------------------------------------------------- requests
def handle(request: dict, arrays) -> tuple[dict, dict | None]:
    """One train / evaluate / query request, through the ClientApp's own handler, as
    (reply message, reply arrays)."""
    # deferred: torch/transformers/peft, imported once at start-up (import_handlers)
    from client_app.app import evaluate, query, train

    handler = {"train": train, "evaluate": evaluate, "query": query}[request["type"]]
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if request["config"] is not None:
        content["config"] = ConfigRecord(request["config"])
    # The message as the SuperNode delivered it to the ClientApp (ids do not travel: the
    # reply's metadata is made by the ClientApp from the original message).
    metadata = Metadata(run_id=request["run-id"], message_id="", src_node_id=0,
                        dst_node_id=request["node-id"], reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=DEFAULT_TTL, message_type=request["type"])
    context = Context(run_id=request["run-id"], node_id=request["node-id"],
                      node_config=request["node-config"], state=RecordDict(),
                      run_config=request["run-config"])
    start = time.perf_counter()
    reply = handler(Message(metadata=metadata, content=content), context)
    compute_s = time.perf_counter() - start
    unknown = set(reply.content) - {"metrics", "arrays"}
    if unknown or not isinstance(reply.content.get("metrics"), MetricRecord) or \
            not isinstance(reply.content.get("arrays", ArrayRecord()), ArrayRecord):
        raise TypeError(f"the {request['type']} handler replied with records "
                        f"{ {k: type(v).__name__ for k, v in reply.content.items()} }; the device "
                        "worker carries one MetricRecord 'metrics' and one ArrayRecord 'arrays'")
    upload = reply.content.get("arrays")
    return ({"type": "reply", "metrics": dict(reply.content["metrics"]), "compute-s": compute_s},
            None if upload is None else {k: a.numpy() for k, a in upload.items()})


def drop_models_of_earlier_runs(run_id: int) -> None:
    """Before a new run's first request: free the backbones earlier runs loaded (a worker
    lives for many runs; a small device has room for one)."""
    # deferred: torch/peft, imported once at start-up (import_handlers)
    from task.adapters import drop_shared_models
    from task.memory import release_freed_memory

    dropped = drop_shared_models()
    gc.collect()
    release_freed_memory()
    log.info("run %d: dropped %d model(s) of earlier runs", run_id, dropped)


def import_handlers() -> None:
    """Pay the heavy imports once, before accepting the first connection."""
    # deferred: torch/transformers/peft (about 6 s), only in the worker process
    import client_app.app  # noqa: F401


class DeviceWorker:
    """The accept loop: one connection at a time, each a hello and then requests."""

    def __init__(self, socket_path: Path, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 read_timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path).expanduser().absolute()
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.code = code_fingerprint()
        self.listener = open_listener(self.socket_path)
        self._inode = self.socket_path.stat().st_ino
        self._run_id: int | None = None  # of the last request served

    def serve_forever(self) -> None:
        log.info("device worker (pid %d, protocol %d, code %s) serving on %s", os.getpid(),
                 PROTOCOL_VERSION, self.code, self.socket_path)
        while True:
            conn, _ = self.listener.accept()
            with conn:
                try:
                    self.serve_connection(conn)
                except (ConnectionError, TimeoutError) as err:
                    # a ClientApp killed, stalled or gone mid-request: serve the next one
                    log.warning("connection ended: %s", err or type(err).__name__)
                except Exception:  # noqa: BLE001 - one bad connection never stops the worker
                    log.exception("connection failed; serving the next one")

    def _send(self, conn: socket.socket, message: dict, arrays=None) -> None:
        send_frame(conn, encode(message, arrays))

    def _send_error(self, conn: socket.socket, text: str, trace: str = "") -> None:
        log.warning("error reply: %s", text)
        self._send(conn, {"type": "error", "error": text, **({"traceback": trace} if trace else {})})

    def serve_connection(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (this worker serves uid %d)", uid, os.getuid())
            return
        conn.settimeout(self.read_timeout)
        greeted = False
        while True:
            try:
                request, arrays = read_frame(conn, self.max_request_bytes)
            except ConnectionClosed as err:
                if greeted and not err.mid_frame:
                    return  # the ClientApp is done
                raise
            except VersionMismatch as err:
                # its header is not ours: answer in our version, which it can still tell
                self._send_error(conn, f"the device worker speaks protocol version "
                                 f"{PROTOCOL_VERSION}, this request version {err.theirs}: run a "
                                 "worker and an app of the same FedGen-Edge version")
                return
            except ProtocolError as err:
                self._send_error(conn, f"malformed request: {err}")
                return  # the framing may be lost: drop the connection
            if request["type"] == "hello":
                if request["code"] != self.code:
                    self._send_error(conn, f"stale device worker: it runs code {self.code} "
                                     f"(pid {os.getpid()}), the ClientApp code {request['code']}: "
                                     "restart fedgen-device with the app's current code")
                    return
                greeted = True
                self._send(conn, {"type": "hello", "code": self.code, "pid": os.getpid(),
                                  "max-request-bytes": self.max_request_bytes})
                continue
            if not greeted or request["type"] not in HANDLER_TYPES:
                self._send_error(conn, f"malformed request: a {request['type']!r} message "
                                 f"{'before hello' if not greeted else 'is not a request'}")
                return
            conn.settimeout(None)  # the ClientApp waits for the handler, however long it takes
            if self._run_id is not None and request["run-id"] != self._run_id:
                drop_models_of_earlier_runs(request["run-id"])
            self._run_id = request["run-id"]
            try:
                reply, reply_arrays = handle(request, arrays)
                frame = encode(reply, reply_arrays)
            except Exception as err:  # noqa: BLE001 - every handler failure becomes a reply
                self._send_error(conn, f"{request['type']} handler failed: "
                                 f"{type(err).__name__}: {err}", traceback.format_exc())
            else:
                log.info("%s run %d: %.2fs compute", request["type"], request["run-id"],
                         reply["compute-s"])
                send_frame(conn, frame)
            conn.settimeout(self.read_timeout)

    def close(self) -> None:
        self.listener.close()
        try:  # only our own socket file: a newer worker may have taken the path over
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedgen-device", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="the node's state folder (the SuperNode's node-config state-dir); "
                             f"the socket goes here as {SOCKET_NAME} unless --socket")
    parser.add_argument("--socket", type=Path, default=None,
                        help="the Unix socket to listen on (the node config's device-worker)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger requests get an error reply (default 1 GiB)")
    parser.add_argument("--read-timeout", type=float, default=60.0,
                        help="seconds a connected ClientApp may stay silent mid-request")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for training and evaluation (default 0: torch's own, "
                             "one per core; give a share of the cores when other work runs there)")
    args = parser.parse_args(argv)
    if args.max_request_bytes <= 0 or args.read_timeout <= 0:
        parser.error("--max-request-bytes and --read-timeout must be positive")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0 = torch's default)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # systemd stop: clean up the socket
    try:
        worker = DeviceWorker(args.socket or args.state_dir / SOCKET_NAME, args.max_request_bytes,
                              args.read_timeout)
    except (OSError, ValueError) as err:
        parser.exit(2, f"fedgen-device: error: {err}\n")
    try:
        # Listening already: a ClientApp that connects during the imports waits in the backlog
        # instead of failing.
        t0 = time.perf_counter()
        import_handlers()
        import torch  # the handlers imported it: free here

        if args.threads:
            torch.set_num_threads(args.threads)
        log.info("handlers imported in %.1fs; torch on %d threads", time.perf_counter() - t0,
                 torch.get_num_threads())
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
