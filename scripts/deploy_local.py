"""A real deployment on loopback: one SuperLink and N SuperNodes, with TLS and node authentication.

    python scripts/deploy_local.py --num-supernodes 3 --run-config conf/smoke.toml [--run-config "k=v"]

makes a CA, a server certificate and N node keys (scripts/certs.py), starts
``flower-superlink`` with TLS and ``--enable-supernode-auth`` on a free loopback port, registers
the N node public keys, starts N ``flower-supernode`` processes (each with its own Flower home,
``--node-config "partition-id=i num-partitions=N state-dir=..."`` and key), waits until all are
online, runs ``flwr run . fedgen --stream`` against them with runtime dependency installation
off, checks that the run finished, and stops every process it started, by PID (whole process
trees; also on Ctrl-C and SIGTERM). ``--insecure`` (no TLS, no node authentication) exists only
for local experiments. ``--device-worker`` starts one warm ``fedgen-device`` worker per node
(client_app/device_worker.py) and names its socket in the node's node config, as a device
would run it.

``--links wifi,lte,weak`` (root) puts the SuperLink and each SuperNode (with its worker) on its own
host: a network namespace per device, joined to the SuperLink's by a veth link shaped to the
named profile (scripts/netlab.py: ``tbf`` per direction), the SuperNode dialling the SuperLink's
address on its link; ``--memory-cap I=GiB`` runs device I's processes under a cgroup memory limit,
as a small board. The namespaces, qdiscs and cgroups are removed on the way out.

All devices share this machine's cores, so every node's torch runs on ``--threads-per-node``
threads (default: the cores divided among the nodes, at least 1; ``OMP_NUM_THREADS`` for the
SuperNode's ClientApp processes, ``fedgen-device --threads`` for a worker): three nodes at torch's
default of one thread per core each would put 3 x 2 OpenMP threads on 2 cores, and oversubscribed
OpenMP threads spin-wait on each other (rounds measured 2.1x their compute that way).

Every SuperNode (and the SuperLink) runs with ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` =
``TASK_POLL_INTERVAL_S``: Flower's SuperExec asks for a new task (a message to start a ClientApp
process for) that often, 1 s by default, sleeping that long after every launch too.

Everything lands under ``--work-dir`` (default ``.flwr/deploy/``): ``certs/``, ``superlink/``
(the Flower home of the CLI and the SuperLink log) and ``nodes/node-i/`` (a SuperNode's Flower
home, its log, and ``state/``, where the node keeps its personal adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certs import make_certificates  # noqa: E402
from netlab import NetworkLab  # noqa: E402
from simulate import ROOT, free_port, merge_run_config, stop, wait_for_port  # noqa: E402

from client_app.flower_app import DeviceWorkerError, WorkerConnection  # noqa: E402
from client_app.worker_protocol import SOCKET_NAME  # noqa: E402

CONNECTION = "fedgen"
# Seconds between SuperExec polls for a task (flwr 1.41: default 1.0, allowed 0.01 to 60): each
# poll is one local gRPC call, so 0.1 s costs nothing and saves up to 0.9 s per message.
TASK_POLL_INTERVAL_S = 0.1


def default_threads_per_node(num_supernodes: int) -> int:
    """This machine's cores shared among the nodes it runs, at least one thread each."""
    return max(1, (os.cpu_count() or 1) // max(1, num_supernodes))


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it at once, as a power cut would (for tests)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    proc.wait(timeout=10)


class LocalDeployment:
    """``flower-superlink`` + N ``flower-supernode`` processes on loopback, owned by this process.

    ``with LocalDeployment(work_dir, 3) as dep: dep.run({...})``. Nodes can be killed and started
    again (``kill_node`` / ``start_node``) while a run goes on; leaving the block stops everything.
    ``data_paths`` gives node i the folder ``data_paths[i]`` (its own text files) instead of a
    partition of the benchmark corpus. ``links`` (one profile per node, see scripts/netlab.py)
    or ``memory_caps`` (node -> bytes) give every process its own host: the SuperLink and the
    CLI in the lab's server namespace, node i's SuperNode and worker in namespace i.
    """

    def __init__(self, work_dir: Path, num_supernodes: int, insecure: bool = False,
                 data_paths: list[str] = (), extra_hosts: list[str] = (),
                 device_workers: bool = False, links: list[str] = (),
                 memory_caps: dict[int, int] | None = None,
                 threads_per_node: int | None = None) -> None:
        self.work = work_dir.resolve()
        self.threads_per_node = threads_per_node or default_threads_per_node(num_supernodes)
        self.num_supernodes = num_supernodes
        self.insecure = insecure
        self.data_paths = [str(Path(p).resolve()) for p in data_paths]
        self.extra_hosts = list(extra_hosts)
        self.device_workers = device_workers
        self.certs = self.work / "certs"
        self.home = self.work / "superlink"
        self.bin_dir = Path(sys.executable).parent
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name: put them on PATH.
        self.env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL_S),
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.link: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.workers: dict[int, subprocess.Popen] = {}
        self.node_ids: dict[int, int] = {}
        self.lab = (NetworkLab(f"{os.getpid() % 10**6}", num_supernodes, list(links), memory_caps)
                    if links or memory_caps else None)

    def _in(self, where: int | str, cmd: list[str]) -> list[str]:
        """``cmd`` on the SuperLink's host ("link") or on node ``where``'s (as is without a lab)."""
        return self.lab.wrap(where, cmd) if self.lab else cmd

    def superlink_address(self, i: int) -> str:
        """Where node i dials the SuperLink."""
        return f"{self.lab.server_ip(i) if self.lab else '127.0.0.1'}:{self.port}"

    # ------------------------------------------------------------------ processes
    def _node_env(self) -> dict:
        """A device's processes: torch (and its OpenMP) on the node's share of the cores."""
        return {**self.env, "OMP_NUM_THREADS": str(self.threads_per_node)}

    def _cli_env(self) -> dict:
        return {**self.env, "FLWR_HOME": str(self.home)}

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self._in("link", [str(self.bin_dir / "flwr"), *args]), env=self._cli_env(),
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def __enter__(self) -> "LocalDeployment":
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        if self.lab:
            self.lab.__enter__()
        self.port = free_port()  # Flower 1.41 serves Fleet, Control and Runtime APIs on one port
        self.home.mkdir(parents=True, exist_ok=True)
        connection = {"address": f"127.0.0.1:{self.port}"}  # the CLI runs on the SuperLink's host
        host = "0.0.0.0" if self.lab else "127.0.0.1"  # with a lab: every device link's address
        cmd = [str(self.bin_dir / "flower-superlink"), "--host", host, "--port", str(self.port),
               "--disable-runtime-dependency-installation",
               "--log-file", str(self.home / "superlink.log")]
        if self.insecure:
            cmd.append("--insecure")
            connection["insecure"] = True
        else:
            make_certificates(self.certs, self.extra_hosts + (self.lab.server_ips() if self.lab else []),
                              self.num_supernodes)
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                    "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
            connection["root-certificates"] = str(self.certs / "ca.crt")
        (self.home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        self.link = subprocess.Popen(self._in("link", cmd), env=self._cli_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        if self.lab:
            self.lab.wait_port("link", "127.0.0.1", self.port, self.link)
        else:
            wait_for_port(self.port, self.link)
        if not self.insecure:
            for i in range(self.num_supernodes):
                self.node_ids[i] = self.register(self.certs / f"node-{i}.pub", f"node-{i}")
        for i in range(self.num_supernodes if self.device_workers else 0):
            self.start_worker(i)
        for i in range(self.num_supernodes if self.device_workers else 0):
            self.wait_worker(i)
        for i in range(self.num_supernodes):
            self.start_node(i)
        self.wait_online(self.num_supernodes)

    def register(self, public_key: Path, name: str) -> int:
        """``flwr supernode register``: only registered keys may join the federation."""
        res = self._flwr("supernode", "register", str(public_key), CONNECTION, "--name", name,
                         "--format", "json")
        if res.returncode != 0:
            raise RuntimeError(f"registering {public_key} failed:\n{res.stdout}{res.stderr}")
        return int(json.loads(res.stdout)["node-id"])

    def node_dir(self, i: int) -> Path:
        return self.work / "nodes" / f"node-{i}"

    def worker_socket(self, i: int) -> Path:
        return self.node_dir(i) / "state" / SOCKET_NAME

    def node_config(self, i: int) -> str:
        state = self.node_dir(i) / "state"
        worker = f' device-worker="{self.worker_socket(i)}"' if self.device_workers else ""
        if self.data_paths:
            return f'data-path="{self.data_paths[i]}" state-dir="{state}"{worker}'
        return f'partition-id={i} num-partitions={self.num_supernodes} state-dir="{state}"{worker}'

    def start_worker(self, i: int) -> subprocess.Popen:
        """Node i's warm device worker (``fedgen-device``); its log is nodes/node-i/device-worker.log."""
        home = self.node_dir(i)
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "device-worker.log", "ab") as log_file:
            proc = subprocess.Popen(self._in(i, [sys.executable, "-m", "client_app.device_worker",
                                                 "--state-dir", str(home / "state"),
                                                 "--threads", str(self.threads_per_node)]),
                                    env={**self._node_env(), "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers[i] = proc
        return proc

    def wait_worker(self, i: int, timeout: float = 180) -> None:
        """Until node i's worker answers a hello (it imports torch/peft first)."""
        deadline = time.time() + timeout
        while True:
            if self.workers[i].poll() is not None:
                raise RuntimeError(f"device worker {i} exited with code {self.workers[i].returncode}; "
                                   f"see {self.node_dir(i) / 'device-worker.log'}")
            try:
                WorkerConnection(str(self.worker_socket(i))).close()
                return
            except DeviceWorkerError:
                if time.time() > deadline:
                    raise TimeoutError(f"device worker {i} not listening after {timeout}s") from None
                time.sleep(0.5)

    def node_command(self, i: int, private_key: Path | None = None) -> list[str]:
        cmd = [str(self.bin_dir / "flower-supernode"), "--superlink", self.superlink_address(i),
               "--port", str(free_port()), "--node-config", self.node_config(i)]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--root-certificates", str(self.certs / "ca.crt"),
                      "--auth-supernode-private-key",
                      str(private_key or self.certs / f"node-{i}")]

    def start_node(self, i: int, private_key: Path | None = None) -> subprocess.Popen:
        """Start SuperNode i (again); its log is appended to nodes/node-i/supernode.log."""
        home = self.node_dir(i)
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "supernode.log", "ab") as log_file:
            proc = subprocess.Popen(self._in(i, self.node_command(i, private_key)),
                                    env={**self._node_env(), "FLWR_HOME": str(home)}, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[i] = proc
        return proc

    def kill_node(self, i: int) -> None:
        kill_tree(self.nodes.pop(i))

    def wait_offline(self, i: int, timeout: float = 180) -> None:
        """Wait until the SuperLink no longer counts SuperNode i as online.

        A node killed without saying goodbye stays online at the SuperLink until its heartbeat
        expires (at most 2 x 30 s), and activating it again is refused until then (the SuperNode
        exits with Flower's code 305).
        """
        deadline = time.time() + timeout
        while i in self.node_ids:
            statuses = self.node_statuses()
            # None: the CLI did not answer; ask again rather than guess.
            if statuses is not None and statuses.get(self.node_ids[i]) != "online":
                return
            if time.time() > deadline:
                raise TimeoutError(f"SuperNode {i} still online after {timeout}s")
            time.sleep(1)

    def restart_node(self, i: int, timeout: float = 180) -> subprocess.Popen:
        """Start a crashed SuperNode again, as its device would after a reboot, once the
        SuperLink has seen it go offline; return when it is online again."""
        self.wait_offline(i, timeout)
        proc = self.start_node(i)
        self.wait_online(len(self.nodes), timeout)
        return proc

    def node_statuses(self) -> dict[int, str] | None:
        """Node id -> status at the SuperLink (registered, online, offline, ...); None if the
        CLI could not ask."""
        res = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        if res.returncode != 0:
            return None
        return {int(n["node-id"]): n["status"] for n in json.loads(res.stdout)["nodes"]}

    def online_nodes(self) -> int:
        return sum(status == "online" for status in (self.node_statuses() or {}).values())

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"SuperNode {i} exited with code {proc.returncode}; see "
                                       f"{self.node_dir(i) / 'supernode.log'}")
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} SuperNodes were not online after {timeout}s")

    # ------------------------------------------------------------------ runs
    def start_run(self, run_config: dict, log_path: Path | None = None) -> subprocess.Popen:
        """``flwr run . fedgen --stream`` in the background; its output goes to ``log_path``
        (else to our stdout)."""
        cmd = [str(self.bin_dir / "flwr"), "run", str(ROOT), CONNECTION, "--stream"]
        if run_config:
            path = self.home / "run-config.toml"
            path.write_text(tomli_w.dumps(run_config))
            cmd += ["--run-config", str(path)]
        print("+", " ".join(cmd), flush=True)
        cmd = self._in("link", cmd)
        if log_path is None:
            return subprocess.Popen(cmd, env=self._cli_env(), cwd=ROOT)
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(cmd, env=self._cli_env(), cwd=ROOT, stdout=log_file,
                                    stderr=subprocess.STDOUT)

    def last_run_status(self) -> str:
        """Status of the latest run on this SuperLink, e.g. 'finished:completed'."""
        res = self._flwr("ls", CONNECTION, "--format", "json")
        runs = json.loads(res.stdout).get("runs", []) if res.returncode == 0 else []
        return max(runs, key=lambda r: r.get("pending-at", ""))["status"] if runs else "unknown"

    def run(self, run_config: dict, timeout: float | None = None) -> int:
        """Run the app to the end; 0 only if the run finished as completed."""
        proc = self.start_run(run_config)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                stop(proc)
        status = self.last_run_status()
        print(f"run status: {status}", flush=True)
        return code or (0 if status == "finished:completed" else 1)

    def __exit__(self, *exc) -> None:
        for i in list(self.nodes):
            stop(self.nodes.pop(i))
        for i in list(self.workers):
            stop(self.workers.pop(i))
        if self.link is not None:
            stop(self.link)
            self.link = None
        if self.lab is not None:
            self.lab.__exit__()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=3)
    parser.add_argument("--run-config", action="append", default=[],
                        help="a conf/*.toml file or \"k=v\" pairs (repeatable, later ones win)")
    parser.add_argument("--data-path", action="append", default=[],
                        help="node i trains on its own folder of .txt files (give one per node) "
                             "instead of partition i of the benchmark corpus")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".flwr" / "deploy")
    parser.add_argument("--host", action="append", default=[],
                        help="extra name/IP for the server certificate")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (local experiments only)")
    parser.add_argument("--device-worker", action="store_true",
                        help="one warm fedgen-device worker per node (node config device-worker): "
                             "messages skip the torch/peft import and backbone load")
    parser.add_argument("--links", default="",
                        help="comma-separated link profile per node (wifi, lte, weak, none; a shorter "
                             "list repeats its last): every node on its own host and shaped link (root)")
    parser.add_argument("--memory-cap", action="append", default=[], metavar="I=GIB",
                        help="node I's processes under a memory cap of GIB GiB, as a small board (root)")
    parser.add_argument("--threads-per-node", type=int, default=None,
                        help="torch threads of each node's training (default: this machine's "
                             "cores divided among the nodes, at least 1)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the run")
    args = parser.parse_args(argv)
    if args.threads_per_node is not None and args.threads_per_node < 1:
        parser.error("--threads-per-node must be >= 1")
    try:
        memory_caps = {int(i): int(float(gib) * 2**30)
                       for i, gib in (item.split("=") for item in args.memory_cap)}
    except ValueError:
        parser.error(f"--memory-cap takes I=GIB, e.g. 2=2.0, not {args.memory_cap}")
    if args.data_path and len(args.data_path) != args.num_supernodes:
        parser.error("give one --data-path per SuperNode")
    name = next((Path(i).stem for i in args.run_config if i.endswith(".toml")), "default")
    run_config = merge_run_config(  # the run waits for every SuperNode (server.min-available-nodes)
        [f"output-dir='{ROOT / 'outputs' / f'deploy-{name}'}' cache-dir='{ROOT / '.cache' / 'fedgen'}'",
         f"server.min-available-nodes={args.num_supernodes}", *args.run_config])
    # SIGTERM (e.g. a CI timeout) must still stop every process on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    with LocalDeployment(args.work_dir, args.num_supernodes, args.insecure, args.data_path,
                         args.host, args.device_worker, [x for x in args.links.split(",") if x],
                         memory_caps, args.threads_per_node) as deployment:
        print(f"SuperLink on 127.0.0.1:{deployment.port} and {args.num_supernodes} SuperNodes "
              f"online ({'INSECURE' if args.insecure else 'TLS + node authentication'}) "
              f"after {time.time() - t0:.1f}s", flush=True)
        code = deployment.run(run_config, args.timeout)
    print(f"results in {run_config['output-dir']}; wall {time.time() - t0:.1f}s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
