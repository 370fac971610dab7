"""One simulation on an existing Ray cluster (scripts/simulate.py --ray-address): a head and a
second Ray node, both started here on this machine, the client actors spread over both, and the
cluster left running by the run's cleanup. Every Ray process the test starts carries a marker in
its environment and is stopped by PID (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from simulate import free_port

RAY = str(Path(sys.executable).parent / "ray")
MARK = "FEDGEN_TEST_RAY_CLUSTER"

# The cluster as Ray's GCS sees it: alive nodes and every ClientAppActor ever created.
_STATE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private.state import actors  # GCS actor table: no dashboard needed (ray[default] is not installed)
print(json.dumps({
    "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    "actors": [{"node": a["Address"]["NodeID"], "state": a["State"], "pid": a["Pid"]}
               for a in actors().values() if a["ActorClassName"] == "ClientAppActor"]}))
ray.shutdown()
"""


def _cluster_state(address: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _STATE, address], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _marked(mark: str) -> list:
    """Processes started by this test's `ray start`s (the marker is inherited: GCS, raylets,
    dashboard, workers), plus their children (the raylets' agents)."""
    import psutil

    found = set()
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                found.add(p)
                found.update(p.children(recursive=True))
        except (psutil.Error, OSError):
            pass
    return list(found)


def _kill(procs: list) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)  # the raylet and GCS wait out TERM 10 s and more
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_cluster(tmp_path):
    """A head with 1 CPU and a second node with 1 CPU on this machine, each with its own temp dir
    (so `ray_current_cluster` is not written to /tmp/ray, where every plain `ray.init()` of other
    runs on this machine would find it and attach) and its own ports where Ray has fixed
    defaults (dashboard 8265, client server 10001, dashboard agent 52365, workers 10002-19999).
    The cluster's environment carries the run's FLWR_HOME on purpose: the run's cleanup, which
    stops processes by FLWR_HOME, must still leave the cluster alone. Yields (address, info)."""
    mark = uuid.uuid4().hex
    home = tmp_path / "flwr"
    # short: Ray's unix sockets live under the temp dir (a socket path has at most 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARK: mark, "FLWR_HOME": str(home), "RAY_worker_niceness": "0"})
    port = free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats", "--min-worker-port", "0",
              "--max-worker-port", "0"]
    head = [RAY, "start", "--head", "--port", str(port), "--temp-dir", str(temp / "head"),
            "--include-dashboard", "false", "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), *common]
    node = [RAY, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(temp / "node"),
            "--dashboard-agent-listen-port", str(free_port()), *common]
    try:
        for cmd in (head, node):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                                  check=False)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 60
        while len(_cluster_state(address)["nodes"]) < 2:
            assert time.time() < deadline, "the second Ray node did not join the head"
            time.sleep(1)
        yield address, {"home": home, "mark": mark, "temp": temp}
    finally:
        _kill(_marked(mark))
        shutil.rmtree(temp, ignore_errors=True)
        assert not _marked(mark), "every Ray process the test started is stopped"


@pytest.mark.slow
def test_simulation_attaches_to_a_two_node_ray_cluster(tmp_path, ray_cluster):
    import psutil

    address, info = ray_cluster
    nodes = _cluster_state(address)["nodes"]
    assert len(nodes) == 2
    cluster_before = _marked(info["mark"])  # GCS, raylets, dashboard, agents, idle workers
    daemons = [p for p in cluster_before if p.name() in ("gcs_server", "raylet")]
    assert len(daemons) == 3  # one GCS, two raylets

    out = tmp_path / "out"
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "4",
         "--num-cpus", "1", "--ray-address", address, "--flwr-home", str(info["home"]),
         "--timeout", "600", "--run-config", "conf/smoke.toml",
         "--run-config", (f"server.personalize-clients=0 train.max-steps=2 "
                          f"output-dir='{out}' cache-dir='{cache}'")],
        cwd=ROOT, capture_output=True, text=True, timeout=700, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"Ray: attaching to the existing cluster at {address}" in proc.stdout
            and "2 alive nodes" in proc.stdout and "2 in all" in proc.stdout), proc.stdout[-3000:]

    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["num_updates"] == 2 and r["failures"] == 0 for r in rounds[1:])

    # One client actor (1 CPU) on each 1-CPU node: the clients ran on both machines' raylets.
    state = _cluster_state(address)
    assert sorted({a["node"] for a in state["actors"]}) == nodes == state["nodes"], state
    assert len(state["actors"]) == 2
    # ... and each node's own log folder holds one ClientAppActor worker's log, named by its pid
    logged = {}
    for node_dir in ("head", "node"):
        logs = (info["temp"] / node_dir).glob("session_latest/logs/worker-*.out")
        logged[node_dir] = [int(f.stem.rsplit("-", 1)[1]) for f in logs
                            if ":actor_name:ClientAppActor" in f.read_text()[:500]]
    assert sorted(logged["head"] + logged["node"]) == sorted(a["pid"] for a in state["actors"])
    assert len(logged["head"]) == len(logged["node"]) == 1, logged
    # Their workers belonged to the cluster; Ray ended them when the run's driver disconnected.
    deadline = time.time() + 30
    while any(a["state"] == "ALIVE" for a in state["actors"]) and time.time() < deadline:
        time.sleep(1)
        state = _cluster_state(address)
    assert all(a["state"] == "DEAD" for a in state["actors"]), state
    assert not any(psutil.pid_exists(a["pid"]) and _cmd(a["pid"]).startswith("ray::ClientAppActor")
                   for a in state["actors"])

    # The run's cleanup stopped its own processes but not the cluster (same FLWR_HOME, spared).
    assert all(p.is_running() for p in daemons), "the cluster's GCS and raylets survive the run"
    leftover = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("FLWR_HOME") == str(info["home"]) and env.get(MARK) != info["mark"]:
            leftover.append(p.pid)
    assert not leftover, "every process of the run is stopped"


def _cmd(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_unreachable_ray_address_fails_fast(tmp_path):
    """Nothing listens there: the launcher says so in seconds, before starting a SuperLink."""
    t = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--ray-address",
         f"127.0.0.1:{free_port()}", "--flwr-home", str(tmp_path / "flwr")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "no Ray cluster answers at 127.0.0.1:" in proc.stderr, proc.stderr
    assert time.time() - t < 30
    assert not (tmp_path / "flwr" / "superlink.log").exists()
