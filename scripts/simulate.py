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
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]


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
    """TOML files and "k=v k2='s'" strings, later ones win (flwr run takes one kind only)."""
    merged: dict = {}
    for item in items:
        path = Path(item)
        if path.suffix == ".toml" and (path.exists() or (ROOT / path).exists()):
            merged.update(tomllib.loads((path if path.exists() else ROOT / path).read_text()))
        else:
            for key, value in re.findall(r"([\w-]+)=('[^']*'|\"[^\"]*\"|\S+)", item):
                merged.update(tomllib.loads(f'"{key}" = {value}'))
    return merged


def stop(proc: subprocess.Popen) -> None:
    """Stop the SuperLink's whole process group (simulation process, Ray) and reap it."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:  # children that outlived the leader keep the group id
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs per simulated client (all cores = one client at a time, "
                             "no thread oversubscription)")
    parser.add_argument("--run-config", action="append", default=[])
    parser.add_argument("--flwr-home", default=str(ROOT / ".flwr"))
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
    args = parser.parse_args(argv)

    home = Path(args.flwr_home).resolve()
    port = free_port()  # Flower 1.41 serves the runtime, control and fleet APIs on one HTTP port
    write_flower_home(home, port, args.num_supernodes, min(args.num_cpus, os.cpu_count() or 1))
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    bin_dir = Path(sys.executable).parent
    log_file = home / "superlink.log"
    superlink = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--simulation",
         "--isolation", "subprocess", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port),
         "--log-file", str(log_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, superlink)
        cmd = [str(bin_dir / "flwr"), "run", str(ROOT), "fedgen", "--stream"]
        if args.run_config:
            run_config = home / "run-config.toml"
            run_config.write_text(tomli_w.dumps(merge_run_config(args.run_config)))
            cmd += ["--run-config", str(run_config)]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout).returncode
    finally:
        stop(superlink)


if __name__ == "__main__":
    sys.exit(main())
