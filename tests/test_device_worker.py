"""The warm device worker (client_app/device_worker.py) and the thin ClientApp path
(client_app/flower_app.py, node config device-worker): same replies as in-process, strict wire
format (client_app/worker_protocol.py), a worker that survives bad requests and lost
ClientApps, clear errors when it is gone. The worker runs as a real subprocess, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app import flower_app
from client_app.device_worker import open_listener
from client_app.flower_app import DeviceWorkerError, WorkerConnection
from client_app.worker_protocol import (
    DTYPES, HEADER, MAGIC, PROTOCOL_VERSION, SOCKET_NAME, ProtocolError, code_fingerprint,
    decode_arrays, encode, read_frame, send_frame)
from task.config import ConfigError
from task.node import NodeConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUEST_BYTES = 8 * 2**20
READ_TIMEOUT_S = 2.0
LINE = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him {}."


# --------------------------------------------------------------------------- helpers
class WorkerProcess:
    """``python -m client_app.device_worker`` in a subprocess, its log in a file."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / SOCKET_NAME
        self.log = state_dir.parent / f"{state_dir.name}-worker.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "client_app.device_worker", "--state-dir", str(state_dir),
                 *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                WorkerConnection(str(self.socket)).close()
                return
            except DeviceWorkerError:
                if time.time() > deadline:
                    self.stop()
                    raise TimeoutError(f"worker not listening after 180 s:\n{self.log.read_text()}")
                time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc = WorkerProcess(tmp_path_factory.mktemp("node") / "state",
                         "--max-request-bytes", str(MAX_REQUEST_BYTES),
                         "--read-timeout", str(READ_TIMEOUT_S))
    yield proc
    proc.stop()
    assert not proc.socket.exists(), "a stopped worker removes its socket"


@pytest.fixture
def stamped(monkeypatch):
    """Messages are stamped with the run/task of the process (a SuperNode sets these)."""
    for key, value in (("_run_id", 5), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _text_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in range(2):
        (folder / f"file{f}.txt").write_text("\n".join(LINE.format(f * 1000 + i) for i in range(200)))
    return folder


def _message(kind: str, arrays=None, config: dict | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1, **(config or {})})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, dst_node_id=1, message_type=kind)


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=5, node_id=1, state=RecordDict(), run_config=run_config,
                   node_config=node_config)


def _query_request(node_config: dict | None = None) -> dict:
    return {"type": "query", "run-id": 5, "node-id": 1, "run-config": {},
            "node-config": node_config or {"partition-id": 3, "num-partitions": 4}, "config": None,
            "arrays": None}


def _assert_serves(worker: WorkerProcess) -> None:
    """The worker is alive and answers a good request."""
    assert worker.alive()
    with WorkerConnection(str(worker.socket)) as conn:
        reply, arrays = conn.call(_query_request(), None)
    assert reply["metrics"]["partition-id"] == 3 and arrays is None


def _raw(worker: WorkerProcess, greet: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(120)
    sock.connect(str(worker.socket))
    if greet:
        send_frame(sock, encode({"type": "hello", "code": code_fingerprint()}))
        assert read_frame(sock, 2**20)[0]["type"] == "hello"
    return sock


def _frame(message, buffer: bytes = b"", version: int = PROTOCOL_VERSION, magic: bytes = MAGIC,
           body: bytes | None = None) -> bytes:
    body = json.dumps(message).encode() if body is None else body
    return HEADER.pack(magic, version, 0, len(body), len(buffer)) + body + buffer


def _error_reply(sock: socket.socket) -> str:
    reply, _ = read_frame(sock, 2**20)
    assert reply["type"] == "error", reply
    return reply["error"]


# --------------------------------------------------------------------------- same replies
def test_worker_and_in_process_give_the_same_replies(worker, tiny_cfg, tmp_path, stamped):
    """Train, evaluate, the personalization protocol (an evaluate message with ``personalize``),
    then query, through the whole ClientApp with its mods: in this process, and forwarded to the
    worker subprocess."""
    from task.adapters import initial_adapter_state

    folder = _text_folder(tmp_path / "data")
    initial = initial_adapter_state(tiny_cfg)
    replies = {}
    for path in ("in-process", "worker"):
        node_config = {"data-path": str(folder), "state-dir": str(tmp_path / path)}
        if path == "worker":
            node_config["device-worker"] = str(worker.socket)
        context = _context(tiny_cfg.flat(), node_config)
        personalize = {"personalize": True, "personalize-partitions": "-1"}
        replies[path] = [flower_app.app(_message(kind, initial if kind != MessageType.QUERY else None,
                                                 config), context)
                         for kind, config in ((MessageType.TRAIN, None), (MessageType.EVALUATE, None),
                                              (MessageType.EVALUATE, personalize),
                                              (MessageType.QUERY, None))]
    for ours, theirs in zip(replies["in-process"], replies["worker"]):
        assert not ours.has_error() and not theirs.has_error()
        assert dict(ours.content["metrics"]) == dict(theirs.content["metrics"])
        assert list(ours.content) == list(theirs.content)
        if "arrays" in ours.content:
            a, b = ours.content["arrays"], theirs.content["arrays"]
            assert list(a) == list(b) and a
            assert all(a[k].data == b[k].data and a[k].dtype == b[k].dtype for k in a)
    train, evaluate, personalized, query = replies["worker"]
    assert train.content["metrics"]["num-examples"] > 0 and "arrays" in train.content
    assert evaluate.content["metrics"]["global-tokens"] > 0
    assert personalized.content["metrics"]["personal-tokens"] > 0
    assert personalized.content["metrics"]["protocol-total-steps"] > 0
    assert query.content["metrics"]["partition-id"] == -1
    assert train.metadata.reply_to_message_id == "" and train.metadata.message_type == MessageType.TRAIN
    # the personal adapter landed in the node's state folder, the same bytes both ways
    for name in ("personal-adapter", "personalized-adapter"):
        adapters = [(tmp_path / p / "run-5" / name / "adapter_model.safetensors").read_bytes()
                    for p in ("in-process", "worker")]
        assert adapters[0] == adapters[1]


def test_the_thin_path_imports_no_torch():
    code = ("import sys, client_app.flower_app; "
            "print([m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"


# --------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("frame,needle", [
    (_frame(_query_request() | {"extra": 1}), "unknown field(s) ['extra']"),
    (_frame(_query_request() | {"arrays": [{"name": "w", "dtype": "float32", "shape": [2, 2],
                                             "offset": 0, "nbytes": 12}]}, b"\0" * 12), "nbytes says 12"),
    (_frame(_query_request() | {"arrays": [{"name": "w", "dtype": "float32", "shape": [4],
                                             "offset": 0, "nbytes": 16}]}, b"\0" * 8), "outside the 8-byte buffer"),
    (_frame(_query_request() | {"arrays": [{"name": "w", "dtype": "float32", "shape": [1],
                                             "offset": 0, "nbytes": 4}]}, b"\0" * 12), "cover 4 bytes of a 12-byte"),
    (_frame(_query_request() | {"arrays": [{"name": "w", "dtype": "object", "shape": [1],
                                             "offset": 0, "nbytes": 8}]}, b"\0" * 8), "dtype 'object' not allowed"),
    (_frame(_query_request() | {"arrays": [{"name": "w", "dtype": "uint8", "shape": [1], "offset": 0,
                                             "nbytes": 1, "pickle": True}]}, b"\0"), "fields must be"),
    (_frame(_query_request() | {"config": {"k": [1, 2]}}), "config value 'k'"),
    (_frame(_query_request(), version=PROTOCOL_VERSION + 1), f"request version {PROTOCOL_VERSION + 1}"),
    (_frame(_query_request(), magic=b"HTTP"), "not a device-worker frame"),
    (_frame(None, body=b"{not json"), "not valid JSON"),
    (HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, 2, MAX_REQUEST_BYTES), "exceeds the maximum"),
], ids=["unknown-field", "wrong-nbytes", "short-buffer", "long-buffer", "wrong-dtype",
        "unknown-descriptor-field", "list-config-value", "wrong-version", "bad-magic", "not-json",
        "oversized"])
def test_a_malformed_request_gets_an_error_reply_and_the_worker_keeps_serving(worker, frame, needle):
    with _raw(worker) as sock:
        sock.sendall(frame)
        assert needle in _error_reply(sock)
    _assert_serves(worker)


def test_hello_comes_first_and_a_stale_worker_is_named(worker):
    with _raw(worker, greet=False) as sock:
        sock.sendall(_frame(_query_request()))
        assert "before hello" in _error_reply(sock)
    with _raw(worker, greet=False) as sock:
        send_frame(sock, encode({"type": "hello", "code": "0" * 16}))
        assert "stale device worker" in _error_reply(sock)
    _assert_serves(worker)


def test_a_handler_exception_is_an_error_reply_the_client_app_raises(worker, tiny_cfg, tmp_path,
                                                                     stamped):
    """A failing handler (here the simulated client failure) fails this node's message only."""
    run_config = tiny_cfg.replace(**{"threats.client-failure-rate": 1.0}).flat()
    context = _context(run_config, {"data-path": str(_text_folder(tmp_path / "data")),
                                    "state-dir": str(tmp_path / "state"),
                                    "device-worker": str(worker.socket)})
    with pytest.raises(DeviceWorkerError, match="train handler failed: RuntimeError: simulated "
                                                "failure of client -1 in round 1"):
        flower_app.app(_message(MessageType.TRAIN, {"w": Array(np.zeros(2, np.float32))}), context)
    _assert_serves(worker)


def test_an_oversized_request_is_refused_before_it_is_sent(worker):
    with WorkerConnection(str(worker.socket)) as conn:
        assert conn.max_request_bytes == MAX_REQUEST_BYTES
        with pytest.raises(DeviceWorkerError, match="exceeds the device worker's maximum"):
            conn.call(_query_request(), {"w": np.zeros(MAX_REQUEST_BYTES // 4, np.float32)})
    _assert_serves(worker)


# --------------------------------------------------------------------------- lost ClientApps
def test_a_client_app_gone_mid_request_leaves_the_worker_serving(worker, tiny_cfg, tmp_path):
    # killed while sending: half a frame, then the connection closes
    frame = b"".join(bytes(p) for p in encode(_query_request(), {"w": np.ones(1000, np.float32)}))
    with _raw(worker) as sock:
        sock.sendall(frame[: len(frame) // 2])
    _assert_serves(worker)
    # killed while the worker trains: the reply finds nobody
    request = {"type": "train", "run-id": 5, "node-id": 1, "run-config": tiny_cfg.flat(),
               "node-config": {"data-path": str(_text_folder(tmp_path / "data")),
                               "state-dir": str(tmp_path / "state")}, "config": {"server-round": 1}}
    from task.adapters import initial_adapter_state

    initial = {k: v.numpy() for k, v in initial_adapter_state(tiny_cfg).items()}
    with _raw(worker) as sock:
        send_frame(sock, encode(request, initial))
    _assert_serves(worker)
    # stalled (e.g. SIGSTOPped) mid-frame: the worker gives up on it after --read-timeout
    with _raw(worker) as stalled:
        stalled.sendall(frame[:10])
        t0 = time.time()
        _assert_serves(worker)  # queued behind the stalled connection until its timeout
        assert READ_TIMEOUT_S * 0.9 <= time.time() - t0 < READ_TIMEOUT_S + 60


def test_a_new_run_frees_the_models_of_earlier_runs(worker, tiny_cfg, tmp_path):
    from task.adapters import initial_adapter_state

    initial = {k: v.numpy() for k, v in initial_adapter_state(tiny_cfg).items()}
    train = {"type": "train", "run-id": 7, "node-id": 1, "run-config": tiny_cfg.flat(),
             "node-config": {"data-path": str(_text_folder(tmp_path / "data")),
                             "state-dir": str(tmp_path / "state")}, "config": {"server-round": 1}}
    with WorkerConnection(str(worker.socket)) as conn:
        reply, upload = conn.call(train, initial)
    assert reply["metrics"]["num-examples"] > 0 and set(upload) == set(initial)
    _assert_serves(worker)  # a query of run 5: run 7's model is dropped
    assert "run 5: dropped 1 model(s) of earlier runs" in worker.log.read_text()


# --------------------------------------------------------------------------- no worker
def test_no_worker_or_a_killed_worker_is_a_clear_error_naming_the_socket(tmp_path, tiny_cfg,
                                                                         stamped):
    missing = tmp_path / "nowhere" / SOCKET_NAME
    context = _context(tiny_cfg.flat(), {"partition-id": 0, "num-partitions": 2,
                                         "device-worker": str(missing)})
    with pytest.raises(DeviceWorkerError, match=f"no device worker listens on {missing}"):
        flower_app.app(_message(MessageType.QUERY), context)

    killed = WorkerProcess(tmp_path / "state")
    try:
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait(timeout=20)
        assert killed.socket.exists()  # a killed worker leaves its socket file behind
        context = _context(tiny_cfg.flat(), {"partition-id": 0, "num-partitions": 2,
                                             "device-worker": str(killed.socket)})
        with pytest.raises(DeviceWorkerError, match=f"no device worker listens on {killed.socket}"):
            flower_app.app(_message(MessageType.QUERY), context)
    finally:
        killed.stop()


def test_a_worker_that_dies_mid_request_is_a_clear_error(tmp_path):
    """Here the 'worker' is a bare listener that accepts, greets and then closes."""
    listener = open_listener(tmp_path / SOCKET_NAME)

    def greet_and_die():
        conn, _ = listener.accept()
        read_frame(conn, 2**20)
        send_frame(conn, encode({"type": "hello", "code": code_fingerprint(), "pid": 1,
                                 "max-request-bytes": 2**20}))
        read_frame(conn, 2**20)
        conn.close()

    thread = threading.Thread(target=greet_and_die, daemon=True)
    thread.start()
    try:
        with WorkerConnection(str(tmp_path / SOCKET_NAME)) as conn:
            with pytest.raises(DeviceWorkerError, match="closed the connection before replying"):
                conn.call(_query_request(), None)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_worker_of_another_protocol_version_is_named_stale(tmp_path):
    """Here the 'worker' is a bare listener that answers the hello in version + 1."""
    listener = open_listener(tmp_path / SOCKET_NAME)

    def answer_in_a_newer_version():
        conn, _ = listener.accept()
        with conn:
            read_frame(conn, 2**20)
            conn.sendall(_frame({"type": "hello", "code": code_fingerprint()},
                                version=PROTOCOL_VERSION + 1))

    thread = threading.Thread(target=answer_in_a_newer_version, daemon=True)
    thread.start()
    try:
        with pytest.raises(DeviceWorkerError, match=f"speaks protocol version {PROTOCOL_VERSION + 1}"
                                                    ".*restart fedgen-device"):
            WorkerConnection(str(tmp_path / SOCKET_NAME))
    finally:
        thread.join(timeout=10)
        listener.close()


# --------------------------------------------------------------------------- the socket
def test_the_socket_is_mode_0600_in_a_folder_others_cannot_write(worker, tmp_path):
    mode = worker.socket.lstat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not worker.socket.parent.stat().st_mode & stat.S_IWOTH
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="world-writable"):
        open_listener(shared / SOCKET_NAME)


def test_a_stale_socket_file_is_replaced_a_live_one_is_not(tmp_path, worker):
    stale = tmp_path / SOCKET_NAME
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(stale))  # bound, then its process is gone: nobody listens
    crashed.close()
    open_listener(stale).close()
    with pytest.raises(FileExistsError, match="another device worker already listens"):
        open_listener(worker.socket)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        open_listener(tmp_path / "file")


# --------------------------------------------------------------------------- wire format, config
def test_arrays_round_trip_for_every_allowed_dtype():
    arrays = {name: (np.arange(6) % 2).astype(dtype).reshape(2, 3) for name, dtype in DTYPES.items()}
    arrays["empty"] = np.zeros((0, 4), np.float32)
    arrays["scalar"] = np.float64(2.5).reshape(())
    frame = encode({"type": "reply", "metrics": {"a": 1}, "compute-s": 0.1}, arrays)
    message = json.loads(bytes(frame[1]))
    buffer = bytearray(b"".join(bytes(p) for p in frame[2:]))
    decoded = decode_arrays(message["arrays"], buffer)
    assert list(decoded) == list(arrays)
    assert all(decoded[k].dtype == arrays[k].dtype and np.array_equal(decoded[k], arrays[k])
               for k in arrays)
    with pytest.raises(ProtocolError, match="cannot travel"):
        encode({"type": "reply", "metrics": {}, "compute-s": 0.0},
               {"c": np.zeros(1, np.complex64)})


def test_device_worker_node_config_key():
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1,
                                        "device-worker": "/run/fedgen/device-worker.sock"})
    assert node.device_worker == "/run/fedgen/device-worker.sock"
    assert NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1}).device_worker == ""
    for bad in ("relative/device-worker.sock", 3, ""):
        with pytest.raises(ConfigError, match="'device-worker'"):
            NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 1, "device-worker": bad})


def test_the_worker_trains_on_the_threads_it_is_given(tmp_path):
    one = WorkerProcess(tmp_path / "state", "--threads", "1")
    try:
        deadline = time.time() + 180  # the log line comes once torch/peft are imported
        while "handlers imported" not in one.log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert "torch on 1 threads" in one.log.read_text()
    finally:
        one.stop()
    out = subprocess.run([sys.executable, "-m", "client_app.device_worker", "--state-dir",
                          str(tmp_path / "state"), "--threads", "-1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "--threads must be >= 0" in out.stderr


def test_fedgen_device_is_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fedgen-device"].partition(":")
    assert module == "client_app.device_worker" and function == "main"
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "--state-dir" in out.stdout
