"""Real flower-superlink / flower-supernode processes on loopback, with TLS and node authentication
(scripts/deploy_local.py), on the smoke config. Every process a test starts is stopped by PID,
and the tests check that none is left."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from certs import make_node_key  # noqa: E402
from deploy_local import LocalDeployment, default_threads_per_node  # noqa: E402
from simulate import merge_run_config, stop  # noqa: E402


def _run_config(tmp_path: Path, *overrides: str) -> dict:
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    # Every node trains and evaluates in every sampled round; no final personalization phase.
    return merge_run_config(["conf/smoke.toml",
                             f"output-dir='{tmp_path / 'out'}' cache-dir='{cache}'",
                             "strategy.fraction-train=1.0 strategy.fraction-evaluate=1.0 server.personalize-clients=0",
                             "server.min-available-nodes=3",  # rounds wait until all 3 are online
                             *overrides])


def _processes_under(folder: Path) -> list[int]:
    """PIDs still alive whose FLWR_HOME lies in ``folder`` (SuperLink, SuperNodes, apps...)."""
    import psutil

    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME", "").startswith(str(folder)):
                pids.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return pids


def _sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.mark.slow
def test_three_supernodes_with_tls_and_auth_run_two_rounds(tmp_path):
    work = tmp_path / "deploy"
    with LocalDeployment(work, num_supernodes=3) as dep:
        # A SuperNode whose key was never registered is refused (Flower exit code 305).
        make_node_key(tmp_path / "stranger")
        stranger = dep.start_node(3, private_key=tmp_path / "stranger")
        assert stranger.wait(timeout=180) != 0
        dep.nodes.pop(3)
        assert "Exit Code: 305" in (dep.node_dir(3) / "supernode.log").read_text()
        assert dep.online_nodes() == 3

        code = dep.run(_run_config(tmp_path, "server.evaluate-every=2"), timeout=900)
    assert not _processes_under(work), "every process started is stopped"
    assert code == 0

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["num_clients"] == 3
    for r in results["rounds"][1:]:
        assert r["num_updates"] == 3 and r["failures"] == 0 and r["rejected"] == 0
    assert results["final"]["local_global_ppl"] > 0
    # Each device keeps its last local adapter (peft format) in its own state folder.
    for i in range(3):
        adapters = list((dep.node_dir(i) / "state").glob("run-*/personal-adapter"))
        assert len(adapters) == 1 and (adapters[0] / "adapter_config.json").exists()
    assert not (tmp_path / "out" / "clients").exists(), "nothing personal is kept by the server"


@pytest.mark.slow
def test_supernode_killed_mid_round_rejoins_with_its_personal_adapter(tmp_path):
    from safetensors.torch import load_file

    work = tmp_path / "deploy"
    out = tmp_path / "out"
    run_log = tmp_path / "run.log"
    with LocalDeployment(work, num_supernodes=3) as dep:
        # round 1: all train; round 2: node 2 is killed while training; once its heartbeat
        # expires the SuperLink answers its message with an error, the round goes on without
        # it, and the node is started again; the round-2 evaluation waits for all 3 nodes
        # (min-available-nodes), so node 2 evaluates the adapter it kept on disk; round 3: it
        # trains again.
        run = dep.start_run(_run_config(tmp_path, "num-server-rounds=3 server.evaluate-every=2"),
                            log_path=run_log)
        try:
            log = dep.node_dir(2) / "supernode.log"
            _wait(lambda: log.read_text().count("Receiving: train message") >= 2, 600,
                  "node 2 never received its round-2 training message")
            dep.kill_node(2)
            adapter = next((dep.node_dir(2) / "state").glob("run-*/personal-adapter"))
            kept = _sha(adapter)
            assert load_file(str(adapter / "adapter_model.safetensors")), "a complete adapter"
            dep.wait_offline(2)
            # The SuperLink writes the error reply only when the ServerApp pulls (every 3 s)
            # while the node is offline: a node back online before that leaves the message
            # unanswered until round-timeout. Its device reboots after the server has seen it.
            _wait(lambda: re.search(r"aggregate_train: node \d+ failed", run_log.read_text()), 300,
                  "the server never saw node 2's failure")
            dep.restart_node(2)

            def evaluated_round_2() -> bool:
                path = out / "results.json"
                return path.exists() and len(json.loads(path.read_text())["rounds"]) >= 3
            _wait(evaluated_round_2, 600, "round 2 never finished")
            after_restart = _sha(adapter)
            assert run.wait(timeout=600) == 0
            status = dep.last_run_status()
        finally:
            if run.poll() is None:
                stop(run)
            print(run_log.read_text(errors="replace"))  # shown by pytest when the test fails
    assert not _processes_under(work), "every process started is stopped"
    assert status == "finished:completed"

    results = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    assert rounds[1]["num_updates"] == 3
    assert rounds[2]["num_updates"] == 2 and rounds[2]["failures"] == 1, \
        "the killed node's update is missing, the round went on"
    assert rounds[3]["num_updates"] == 3, "the restarted node takes part again"
    assert after_restart == kept, "the personal adapter survived the kill and the restart"
    assert _sha(adapter) != kept, "and is updated after the node trains again"
    # At round 2 the restarted node (which had not trained since) evaluated its kept adapter.
    rows = [row.split(",") for row in (out / "clients.csv").read_text().splitlines()[1:]]
    assert sorted(int(r[1]) for r in rows if r[0] == "2" and r[3] != "") == [0, 1, 2]


@pytest.mark.slow
def test_three_supernodes_with_warm_device_workers_run_two_rounds(tmp_path):
    """Each SuperNode forwards its messages to its own fedgen-device worker (node config
    device-worker): the ClientApp processes import no torch, the workers train and keep the
    personal adapters in the nodes' state folders, and every process is stopped afterwards.
    As root, every device is its own host (network namespace) behind a shaped link (wifi, lte,
    weak), TLS and node auth run over the links, and node 2 runs under a 2 GiB memory cap as a
    small board; then no namespace or cgroup of the lab is left either."""
    from netlab import lab_available, lab_leftovers

    work = tmp_path / "deploy"
    cap = 2 * 2**30
    lab = {} if lab_available() else {"links": ["wifi", "lte", "weak"], "memory_caps": {2: cap}}
    t0 = time.time()
    with LocalDeployment(work, num_supernodes=3, device_workers=True, **lab) as dep:
        workers = dict(dep.workers)
        started = time.time()
        code = dep.run(_run_config(tmp_path, "server.evaluate-every=2"), timeout=900)
        print(f"deployment up in {started - t0:.1f}s, run {time.time() - started:.1f}s")
        if lab:
            assert [dep.superlink_address(i).split(":")[0] for i in range(3)] == dep.lab.server_ips()
            peak, tag = dep.lab.peak_memory(2), dep.lab.tag
    assert not _processes_under(work), "every process started is stopped"
    if lab:
        assert not [x for x in lab_leftovers() if f"fge{tag}-" in x], "every namespace and cgroup is removed"
        assert 0 < peak <= cap  # the capped board's worker and SuperNode really ran inside the group
    assert all(proc.poll() is not None for proc in workers.values()), "the workers are stopped"
    assert code == 0

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for r in results["rounds"][1:]:
        assert r["num_updates"] == 3 and r["failures"] == 0 and r["rejected"] == 0
        # the round's time, split: the training messages, the aggregation, the server's evaluation
        assert 0 < r["train_phase_s"] < r["wall_s"] and r["aggregate_s"] >= 0 and r["server_eval_s"] > 0
    for i in range(3):
        log = (dep.node_dir(i) / "device-worker.log").read_text()
        assert log.count(" train run ") == 2 and " evaluate run " in log, log[-2000:]
        # three devices share this machine's cores: each worker trains on its share
        assert f"torch on {default_threads_per_node(3)} threads" in log
        assert not dep.worker_socket(i).exists(), "a stopped worker removes its socket"
        adapters = list((dep.node_dir(i) / "state").glob("run-*/personal-adapter"))
        assert len(adapters) == 1 and (adapters[0] / "adapter_config.json").exists()


def test_nodes_on_one_machine_share_its_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert [default_threads_per_node(n) for n in (1, 2, 3)] == [2, 1, 1]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [default_threads_per_node(n) for n in (1, 3, 20)] == [16, 5, 1]
    dep = LocalDeployment(Path("unused"), 3)  # nothing starts before the with block
    assert dep._node_env()["OMP_NUM_THREADS"] == "5"
    assert LocalDeployment(Path("unused"), 3, threads_per_node=2)._node_env()["OMP_NUM_THREADS"] == "2"


def test_a_rounds_wall_is_held_against_its_compute():
    from bench.deploy_round import round_breakdown

    row = {"round": 2, "wall_s": 24.0, "train_phase_s": 17.0, "aggregate_s": 0.5, "server_eval_s": 3.5}
    x = round_breakdown(row, [10.0, 16.0, 12.0])
    # compute: the slowest node (16) + aggregation (0.5) + evaluation (3.5) = 20; Flower 17 - 16
    assert x["compute_s"] == 20.0 and x["ratio"] == pytest.approx(1.2) and x["flower_s"] == 1.0
    assert round_breakdown(row, [])["ratio"] is None  # no node log for the round: no figure
