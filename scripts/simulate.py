"""Run `flwr run .` under the simulation engine against a SuperLink this script owns.

It writes a Flower home (``FLWR_HOME``, default ``.flwr/`` here) with a connection named
``fedgen``, starts ``flower-superlink --simulation`` on free loopback ports (so it never collides
with another run or Flower's detached ``:local:`` SuperLink), runs the app, and stops the
SuperLink and everything it started, by process group, whatever happens.

    python scripts/simulate.py [--num-supernodes 100] [--run-config conf/x.toml] [--run-config "k=v"]
"""

from __future__ import annotations

import argparse
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
from task.config import flatten_tables  # noqa: E402  (stdlib only: the launcher stays light)


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


def write_flower_home(home: Path, port: int, num_supernodes: int, cpus: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f"""[superlink]
default = "fedgen"

[superlink.fedgen]
address = "127.0.0.1:{port}"
insecure = true

[superlink.fedgen.options]
num-supernodes = {num_supernodes}

[superlink.fedgen.options.backend.client-resources]
num-cpus = {cpus}
""")


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


class PeakMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (SuperLink, ServerApp, Ray)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_bytes = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(self.interval):
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)


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


def stop(proc: subprocess.Popen, flwr_home: Path | None = None) -> None:
    """Stop the SuperLink and every process under it, by PID.

    SuperExec starts its own session (so a process-group kill misses it and the simulation and
    Ray processes under it): collect the whole tree first, then TERM, wait, KILL what is left.
    With ``flwr_home``, processes of that Flower home that are no longer in the tree (a parent
    that exited first leaves its children to init) are stopped too.
    """
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    if flwr_home is not None:
        procs += [p for p in _with_flwr_home(flwr_home) if p not in procs]
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
        late = _with_flwr_home(flwr_home)
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
    """

    def __init__(self, home: Path, num_cpus: int = os.cpu_count() or 1,
                 report_memory: bool = False) -> None:
        self.home = home.resolve()
        self.num_cpus = min(num_cpus, os.cpu_count() or 1)
        self.report_memory = report_memory
        self.port = free_port()  # Flower 1.41 serves runtime, control and fleet APIs on one port
        self.bin_dir = Path(sys.executable).parent
        # The SuperLink starts flower-superexec / flwr-simulation by name: put them on PATH.
        # RAY_worker_niceness: Ray starts its workers, the client actor that trains included, at
        # nice +15, so any other process on the machine (or the run's own ServerApp) starves it.
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "RAY_worker_niceness": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def __enter__(self) -> "LocalSuperLink":
        write_flower_home(self.home, self.port, 2, self.num_cpus)
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
            stop(self.proc, self.home)
            raise
        return self

    def run(self, run_config: dict, num_supernodes: int, timeout: float | None = None) -> int:
        """``flwr run . fedgen --stream`` with this run config; returns its exit code."""
        write_flower_home(self.home, self.port, num_supernodes, self.num_cpus)
        cmd = [str(self.bin_dir / "flwr"), "run", str(ROOT), "fedgen", "--stream"]
        if run_config:
            path = self.home / "run-config.toml"
            path.write_text(tomli_w.dumps(run_config))
            cmd += ["--run-config", str(path)]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, env=self.env, cwd=ROOT, timeout=timeout).returncode

    def __exit__(self, *exc) -> None:
        self.watcher.done.set()
        if self.report_memory:
            print(f"peak RSS of all run processes: {self.watcher.peak_bytes / 2**30:.2f} GiB; "
                  f"wall {time.time() - self.t0:.0f} s", flush=True)
        stop(self.proc, self.home)


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
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a CI timeout) must still stop the SuperLink on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with LocalSuperLink(Path(args.flwr_home), args.num_cpus, args.report_memory) as link:
        return link.run(merge_run_config(args.run_config), args.num_supernodes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
