"""Run `flwr run .` under the simulation engine against a SuperLink this script owns.

It writes a Flower home (``FLWR_HOME``, default ``.flwr/`` here) with a connection named
``fedgen``, starts ``flower-superlink --simulation`` on free loopback ports (so it never collides
with another run or Flower's detached ``:local:`` SuperLink), runs the app, and stops the
SuperLink and everything it started, by process group, whatever happens.

    python scripts/simulate.py [--num-supernodes 100] [--run-config conf/x.toml] [--run-config "k=v"]

With ``--ray-address HOST:PORT`` (default: ``$RAY_ADDRESS``) the client actors run on an existing
Ray cluster (``ray start --head`` / ``ray start --address``) instead of a private local Ray; the
cluster's processes are left running (README, "Running one simulation over several machines").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from task.config import ConfigError, RunConfig, flatten_tables  # noqa: E402  (stdlib only: the launcher stays light)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not open port {port} in {timeout}s")


def write_flower_home(home: Path, port: int) -> None:
    """The Flower home's one connection, ``fedgen``, to our SuperLink (the simulation's size goes
    with each run as ``--federation-config``: the connection's old ``options.`` are deprecated)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f"""[superlink]
default = "fedgen"

[superlink.fedgen]
address = "127.0.0.1:{port}"
insecure = true
""")


def federation_config(num_supernodes: int, cpus: int) -> str:
    """``flwr run --federation-config``: simulated nodes and CPUs per client actor."""
    return f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"


def merge_run_config(items: list[str]) -> dict:
    """TOML files and "k=v k2='s'" strings (dotted keys: "lora.rank=4"), later ones win
    (flwr run takes one kind only); the result has flat dotted keys, as Flower's run config."""
    merged: dict = {}
    for item in items:
        path = Path(item)
        if path.suffix == ".toml" and (path.exists() or (ROOT / path).exists()):
            merged.update(flatten_tables(tomllib.loads((path if path.exists() else ROOT / path).read_text())))
        else:
            for key, value in re.findall(r"([\w.-]+)=('[^']*'|\"[^\"]*\"|\S+)", item):
                merged[key] = tomllib.loads(f"v = {value}")["v"]
    return merged


def results_folder(run_config: dict, run_id: int) -> Path | None:
    """The output folder the apps resolved for this run (output-dir with {run-name}, {run-id}),
    if the run wrote results there."""
    try:
        out = RunConfig.from_run_config(run_config).for_run(run_id).output_path
    except ConfigError:  # the ServerApp refused the run config: it wrote nothing
        return None
    return out if (out / "results.json").exists() else None


class PeakMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (SuperLink, ServerApp, Ray);
    ``at_peak`` holds each process's share at the peak sample (what the peak is made of)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_bytes = pid, interval, 0
        self.at_peak: list[tuple[str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(self.interval):
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            shares = []
            for p in procs:
                try:
                    shares.append((_process_name(p), p.memory_info().rss))
                except psutil.Error:
                    pass
            total = sum(rss for _, rss in shares)
            if total > self.peak_bytes:
                self.peak_bytes, self.at_peak = total, sorted(shares, key=lambda x: -x[1])


def _process_name(p) -> str:
    """A short name: the program (flower-superlink, raylet, ...) or a Ray worker's title."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::") or "python" not in Path(cmd[0]).name:
        return Path(cmd[0]).name.split()[0]
    script = next((c for c in cmd[1:] if not c.startswith("-")), cmd[0])
    return Path(script).name


class RayClusterError(RuntimeError):
    """The Ray cluster given by --ray-address cannot be used (unreachable, too small)."""


# Runs in a child process: ray.init replaces the caller's SIGTERM handler and leaves threads.
_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "nodes": [
    {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0)}
    for n in ray.nodes() if n["Alive"] and n["Resources"]]}))
ray.shutdown()
"""


def probe_ray_cluster(address: str, num_cpus: int, timeout: float = 90.0) -> dict:
    """The alive nodes of the Ray cluster at ``address`` and the client actors of ``num_cpus``
    CPUs each that Flower's pool will put on them: per node int(CPUs / num_cpus), as
    flwr.simulation.ray_transport.ray_actor.pool_size_from_resources counts (node totals, not
    what is free). Raises RayClusterError when nothing answers or no actor fits."""
    if address.startswith("ray://"):
        raise RayClusterError(f"--ray-address {address}: Ray Client addresses are not supported; "
                              "give the head's GCS address HOST:PORT (run this on a cluster node)")
    host, _, port = address.rpartition(":")
    if port.isdigit():  # fail in seconds, not after Ray's connection retries
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as e:
            raise RayClusterError(f"no Ray cluster answers at {address} ({e}); start one with "
                                  "`ray start --head --port PORT`") from None
    try:
        proc = subprocess.run([sys.executable, "-c", _RAY_PROBE, address], check=False,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RayClusterError(f"connecting to the Ray cluster at {address} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RayClusterError(f"cannot attach to the Ray cluster at {address} (is this machine a "
                              f"node of it?):\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for node in info["nodes"]:
        node["actors"] = int(node["cpus"] / num_cpus)
    info["actors"] = sum(n["actors"] for n in info["nodes"])
    if info["actors"] == 0:
        raise RayClusterError(f"no node of the Ray cluster at {address} has {num_cpus} CPUs for one "
                              f"client actor (nodes: {[n['cpus'] for n in info['nodes']]} CPUs); "
                              "lower --num-cpus")
    return info


def _is_ray_process(p) -> bool:
    """A Ray daemon or worker (raylet, gcs_server, ray::..., python -m ray..., ray's scripts)."""
    import psutil

    try:
        name, cmd = p.name(), p.cmdline()
    except (psutil.Error, OSError):
        return False
    if name in ("raylet", "gcs_server") or name.startswith("ray::") or (cmd and cmd[0].startswith("ray::")):
        return True
    ray_dir = f"site-packages{os.sep}ray{os.sep}"
    return any(ray_dir in a for a in cmd) or any(
        a == "-m" and b.startswith("ray.") for a, b in itertools.pairwise(cmd))


def _with_flwr_home(home: Path) -> list:
    """Processes that inherited this FLWR_HOME (Ray workers re-parented away from the tree)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == str(home):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def stop(proc: subprocess.Popen, flwr_home: Path | None = None, spare_ray: bool = False) -> None:
    """Stop the SuperLink and every process under it, by PID.

    SuperExec starts its own session (so a process-group kill misses it and the simulation and
    Ray processes under it): collect the whole tree first, then TERM, wait, KILL what is left.
    With ``flwr_home``, processes of that Flower home that are no longer in the tree (a parent
    that exited first leaves its children to init) are stopped too.

    ``spare_ray`` (the run attached to an external Ray cluster): a Ray process outside the tree
    is the cluster's, never ours (its raylets start the workers with their own environment, so
    none inherits FLWR_HOME unless the user started Ray with it); it is left alone. The run's
    client actors end when its driver (flwr-simulation, in the tree) disconnects.
    """
    import psutil

    def outside(found: list) -> list:
        return [p for p in found if not (spare_ray and _is_ray_process(p))]

    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    if flwr_home is not None:
        procs += [p for p in outside(_with_flwr_home(flwr_home)) if p not in procs]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)
    if flwr_home is not None:  # stragglers started while the tree was being stopped
        late = outside(_with_flwr_home(flwr_home))
        for p in late:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(late, timeout=5)


class LocalSuperLink:
    """A ``flower-superlink --simulation`` on a free loopback port, owned by this process.

    ``with LocalSuperLink(home) as link: link.run({...}, num_supernodes=10)``; several runs may
    share it; leaving the block stops it and every process under it.

    ``ray_address``: None leaves Ray's choice as it is (Flower's ``ray.init()`` reads
    RAY_ADDRESS, else attaches to a ``ray start`` cluster of this machine if
    /tmp/ray/ray_current_cluster names one, else starts a private local Ray); ``"local"`` forces
    a private local Ray;
    HOST:PORT (a head's GCS address) attaches the run's client actors to that existing cluster:
    checked and printed at start, ``num_cpus`` not capped at this machine's cores, and its
    processes are never stopped.
    """

    def __init__(self, home: Path, num_cpus: int = os.cpu_count() or 1,
                 report_memory: bool = False, ray_address: str | None = None) -> None:
        self.home = home.resolve()
        self.ray_address = ray_address
        self.attached = ray_address not in (None, "", "local")
        self.results: Path | None = None  # the run's output folder, printed at the end
        # a cluster's nodes may have more cores than this machine: Flower sizes the pool per node
        self.num_cpus = num_cpus if self.attached else min(num_cpus, os.cpu_count() or 1)
        self.report_memory = report_memory
        self.port = free_port()  # Flower 1.41 serves runtime, control and fleet APIs on one port
        self.bin_dir = Path(sys.executable).parent
        # The SuperLink starts flower-superexec / flwr-simulation by name: put them on PATH.
        # RAY_worker_niceness: Ray starts its workers, the client actor that trains included, at
        # nice +15, so any other process on the machine (or the run's own ServerApp) starves it.
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "RAY_worker_niceness": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        if ray_address:  # flwr-simulation's ray.init() takes the address from the environment
            self.env["RAY_ADDRESS"] = ray_address

    def __enter__(self) -> "LocalSuperLink":
        if self.attached:
            info = probe_ray_cluster(self.ray_address, self.num_cpus)
            per_node = ", ".join(f"{n['ip']} {n['id'][:8]}: {n['actors']}" for n in info["nodes"])
            print(f"Ray: attaching to the existing cluster at {self.ray_address} (GCS "
                  f"{info['gcs']}), {len(info['nodes'])} alive nodes; client actors of "
                  f"{self.num_cpus} CPU(s) per node: {per_node}; {info['actors']} in all",
                  flush=True)
        write_flower_home(self.home, self.port)
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port),
             "--log-file", str(self.home / "superlink.log")],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.watcher = PeakMemory(self.proc.pid)
        if self.report_memory:
            self.watcher.start()
        self.t0 = time.time()
        try:
            wait_for_port(self.port, self.proc)
        except BaseException:
            stop(self.proc, self.home, spare_ray=self.attached)
            raise
        return self

    def command(self, run_config: dict, num_supernodes: int) -> list[str]:
        """``flwr run . fedgen --stream`` with this run config and federation size."""
        cmd = [str(self.bin_dir / "flwr"), "run", str(ROOT), "fedgen", "--stream",
               "--federation-config", federation_config(num_supernodes, self.num_cpus)]
        if run_config:
            path = self.home / "run-config.toml"
            path.write_text(tomli_w.dumps(run_config))
            cmd += ["--run-config", str(path)]
        return cmd

    def runs(self) -> dict[str, str]:
        """{run id: status} of every run this SuperLink has seen (``flwr ls``)."""
        out = subprocess.run([str(self.bin_dir / "flwr"), "ls", "fedgen", "--format", "json"],
                             env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        try:
            return {r["run-id"]: r["status"] for r in json.loads(out.stdout)["runs"]}
        except (ValueError, KeyError) as e:
            raise RuntimeError(f"flwr ls gave no run list ({e}): {out.stdout[-500:]}{out.stderr[-500:]}") from None

    def run(self, run_config: dict, num_supernodes: int, timeout: float | None = None) -> int:
        """Run the app and return 0 only if the run finished completed: `flwr run` itself exits 0
        on a run that failed (a bad run-config key, a ServerApp error), so its status is read
        back from the SuperLink."""
        cmd = self.command(run_config, num_supernodes)
        before = self.runs()
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, env=self.env, cwd=ROOT, timeout=timeout).returncode
        new = {k: v for k, v in self.runs().items() if k not in before}
        if len(new) == 1:
            self.results = results_folder(run_config, int(next(iter(new))))
        if code == 0 and (len(new) != 1 or next(iter(new.values())) != "finished:completed"):
            print(f"the run did not complete: {new or 'no run was started'}", file=sys.stderr,
                  flush=True)
            return 1
        return code

    def __exit__(self, *exc) -> None:
        self.watcher.done.set()
        if self.report_memory:
            print(f"peak RSS of all run processes: {self.watcher.peak_bytes / 2**30:.2f} GiB; "
                  f"wall {time.time() - self.t0:.0f} s", flush=True)
            print("  at the peak: " + ", ".join(f"{name} {rss / 2**20:.0f} MiB"
                                                for name, rss in self.watcher.at_peak[:8]), flush=True)
        if self.results is not None:
            print(f"results: {self.results}", flush=True)
        stop(self.proc, self.home, spare_ray=self.attached)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs per simulated client (all cores = one client at a time, "
                             "no thread oversubscription)")
    parser.add_argument("--run-config", action="append", default=[])
    parser.add_argument("--flwr-home", default=str(ROOT / ".flwr"))
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    parser.add_argument("--report-memory", action="store_true",
                        help="print the peak summed RSS of every process of the run")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="run the client actors on the existing Ray cluster whose head is at "
                             "HOST:PORT (`ray start --head --port PORT`; run this on one of its "
                             "nodes); 'local': a private local Ray even if this machine runs a "
                             "`ray start` cluster. Default: $RAY_ADDRESS, else Ray's own choice "
                             "(a private local Ray unless `ray start` ran here)")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a CI timeout) must still stop the SuperLink on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with LocalSuperLink(Path(args.flwr_home), args.num_cpus, args.report_memory,
                            ray_address=args.ray_address) as link:
            return link.run(merge_run_config(args.run_config), args.num_supernodes, args.timeout)
    except RayClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
