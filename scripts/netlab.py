"""Devices on their own hosts and links, on one machine: network namespaces, shaped veth links and
memory caps (Linux, root).

    with NetworkLab("t1", 3, links=["wifi", "lte", "weak"], memory_caps={2: 2 * 2**30}) as lab:
        subprocess.Popen(lab.wrap("link", ["flower-superlink", ...]))      # the server's host
        subprocess.Popen(lab.wrap(1, ["flower-supernode", "--superlink", f"{lab.server_ip(1)}:9092", ...]))

Every device i gets a namespace ``fge<tag>-node<i>`` joined to the server's namespace
``fge<tag>-link`` by a veth pair on 198.18.i.0/30 (RFC 2544's benchmark range: test hosts only),
the server side 198.18.i.1, the device side 198.18.i.2. A link profile shapes each direction with a
``tbf`` qdisc on the sending side (uplink: the device's end, downlink: the server's end); this
kernel has no ``netem``, so links have rates, not added delay or loss. A memory cap puts the
device's processes in a cgroup v1 memory group of that limit (an edge board's RAM): the kernel
reclaims, then OOM-kills inside the group, as on the board. Leaving the block deletes every
namespace (and with it every veth and qdisc) and every cgroup the lab made; ``lab_leftovers``
lists what is left of any lab.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fge"
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


@dataclass(frozen=True)
class LinkProfile:
    """A device's link: rates in Mbit/s (0 = unshaped)."""
    up_mbit: float
    down_mbit: float


LINK_PROFILES = {
    "none": LinkProfile(0, 0),
    "wifi": LinkProfile(50, 50),    # a good 802.11n/ac link in practice
    "lte": LinkProfile(10, 30),     # a typical LTE cell: uplink the bottleneck
    "weak": LinkProfile(1, 5),      # the edge of coverage
}


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def lab_available() -> str:
    """'' where namespaces and tbf can be made here, else why not (for skipping tests)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return ""


def lab_leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces and memory cgroups of any lab that are still there."""
    names = [line.split()[0] for line in _sh("ip", "netns", "list").stdout.splitlines() if line.strip()]
    left = [f"netns {n}" for n in names if n.startswith(prefix)]
    if CGROUP_MEMORY.is_dir():
        left += [f"cgroup {p}" for p in CGROUP_MEMORY.glob(f"{prefix}*")]
    return left


def _tbf(namespace: str, device: str, mbit: float) -> None:
    """Shape ``device``'s egress to ``mbit``: a bucket of 10 ms of traffic (at least 16 KiB, above
    one tick's worth at any rate) and a queue of at most 200 ms before drops."""
    rate = int(mbit * 1e6)
    burst = max(16 * 1024, rate // 8 // 100)
    _sh("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
        "rate", f"{rate}bit", "burst", str(burst), "latency", "200ms")


class NetworkLab:
    """The server's namespace ("link") and ``num_devices`` device namespaces (0..n-1), each
    with its own shaped link; see the module docstring."""

    def __init__(self, tag: str, num_devices: int, links: list[str] = (),
                 memory_caps: dict[int, int] | None = None) -> None:
        if num_devices > 250:
            raise ValueError("at most 250 devices (one 198.18.i.0/30 each)")
        unknown = [p for p in links if p not in LINK_PROFILES]
        if unknown:
            raise ValueError(f"unknown link profile {unknown[0]!r}: choose from {sorted(LINK_PROFILES)}")
        self.tag = tag
        self.num_devices = num_devices
        # one profile per device; a shorter list repeats its last profile (none: unshaped)
        self.links = [links[min(i, len(links) - 1)] if links else "none" for i in range(num_devices)]
        self.memory_caps = dict(memory_caps or {})
        bad = [i for i in self.memory_caps if not 0 <= i < num_devices]
        if bad:
            raise ValueError(f"memory cap for device {bad[0]}, but devices are 0..{num_devices - 1}")
        self.namespaces: list[str] = []
        self.cgroups: list[Path] = []

    # ------------------------------------------------------------------ names
    @property
    def link_ns(self) -> str:
        return f"{PREFIX}{self.tag}-link"

    def node_ns(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-node{i}"

    def server_ip(self, i: int) -> str:
        """The server's address as device i reaches it."""
        return f"198.18.{i + 1}.1"

    def device_ip(self, i: int) -> str:
        return f"198.18.{i + 1}.2"

    def server_ips(self) -> list[str]:
        return [self.server_ip(i) for i in range(self.num_devices)]

    def cgroup(self, i: int) -> Path:
        return CGROUP_MEMORY / f"{PREFIX}{self.tag}-node{i}"

    # ------------------------------------------------------------------ set-up
    def __enter__(self) -> "NetworkLab":
        why = lab_available()
        if why:
            raise RuntimeError(f"NetworkLab {why}")
        try:
            self._add_namespace(self.link_ns)
            for i in range(self.num_devices):
                self._add_device(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

    def _add_device(self, i: int) -> None:
        ns, server_end, device_end = self.node_ns(i), f"fge{i}s", f"fge{i}d"
        self._add_namespace(ns)
        _sh("ip", "link", "add", server_end, "netns", self.link_ns, "type", "veth",
            "peer", "name", device_end, "netns", ns)
        for where, dev, ip in ((self.link_ns, server_end, self.server_ip(i)),
                               (ns, device_end, self.device_ip(i))):
            _sh("ip", "netns", "exec", where, "ip", "addr", "add", f"{ip}/30", "dev", dev)
            _sh("ip", "netns", "exec", where, "ip", "link", "set", dev, "up")
        profile = LINK_PROFILES[self.links[i]]
        if profile.up_mbit:
            _tbf(ns, device_end, profile.up_mbit)
        if profile.down_mbit:
            _tbf(self.link_ns, server_end, profile.down_mbit)
        if i in self.memory_caps:
            group = self.cgroup(i)
            group.mkdir()
            self.cgroups.append(group)
            (group / "memory.limit_in_bytes").write_text(str(self.memory_caps[i]))

    def __exit__(self, *exc) -> None:
        for group in reversed(self.cgroups):
            self._remove_cgroup(group)
        self.cgroups.clear()
        for name in reversed(self.namespaces):
            self._kill_namespace_processes(name)
            _sh("ip", "netns", "delete", name, check=False)
        self.namespaces.clear()

    @staticmethod
    def _kill_namespace_processes(name: str) -> None:
        """Anything still running in the namespace (a process its owner failed to stop)."""
        pids = _sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)

    @staticmethod
    def _remove_cgroup(group: Path) -> None:
        deadline = time.time() + 10
        while group.exists():
            pids = (group / "cgroup.procs").read_text().split() if (group / "cgroup.procs").exists() else []
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            try:
                group.rmdir()
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    # ------------------------------------------------------------------ use
    def wrap(self, where: int | str, cmd: list[str]) -> list[str]:
        """``cmd`` to run on the server's host (``"link"``) or on device ``where``: inside its
        namespace and, where it has a memory cap, its cgroup. The wrappers exec, so the
        process's PID is the command's."""
        if where == "link":
            return ["ip", "netns", "exec", self.link_ns, *cmd]
        if not (isinstance(where, int) and 0 <= where < self.num_devices):
            raise ValueError(f"no device {where!r} in this lab")
        cmd = ["ip", "netns", "exec", self.node_ns(where), *cmd]
        if where in self.memory_caps:  # join the cgroup first: `ip netns exec` remounts /sys
            procs = self.cgroup(where) / "cgroup.procs"
            cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
        return cmd

    def wait_port(self, where: int | str, host: str, port: int, proc: subprocess.Popen | None = None,
                  timeout: float = 60.0) -> None:
        """Until ``host:port`` accepts a connection from inside ``where``'s namespace."""
        probe = (f"import socket; s = socket.socket(); s.settimeout(2); "
                 f"raise SystemExit(s.connect_ex(({host!r}, {port})))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} "
                                   f"before {host}:{port} opened")
            if subprocess.run(self.wrap(where, [sys.executable, "-c", probe]),
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{host}:{port} not reachable from {where!r} after {timeout}s")

    def peak_memory(self, i: int) -> int:
        """Peak bytes of device i's memory cgroup (its processes' RSS and page cache: at a cap,
        the page cache fills it up to the cap; see resident_memory for the processes' own)."""
        return int((self.cgroup(i) / "memory.max_usage_in_bytes").read_text())

    def resident_memory(self, i: int) -> int:
        """Bytes device i's processes hold now, page cache excluded (``total_rss`` +
        ``total_mapped_file`` of its cgroup's memory.stat: anonymous memory and mapped files)."""
        stat = dict(line.split() for line in (self.cgroup(i) / "memory.stat").read_text().splitlines())
        return int(stat["total_rss"]) + int(stat["total_mapped_file"])


# A receiver that accepts one connection, reads to EOF and prints the byte count; a sender that
# pushes N bytes and prints the seconds until the receiver has them all (it closes on EOF).
_RECEIVE = ("import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(1); print('ready', flush=True); "
            "c, _ = s.accept(); n = 0\n"
            "while True:\n    b = c.recv(1 << 16)\n    if not b: break\n    n += len(b)\nprint(n)")
_SEND = ("import socket, sys, time; s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
         "chunk = b'x' * (1 << 20); n = int(sys.argv[3]); t = time.perf_counter()\n"
         "while n > 0:\n    s.sendall(chunk[:n]); n -= len(chunk)\n"
         "s.shutdown(socket.SHUT_WR); s.recv(1); print(time.perf_counter() - t)")


def measure_transfer(lab: NetworkLab, sender: int | str, receiver: int | str, nbytes: int,
                     timeout: float = 3600.0) -> float:
    """Seconds to push ``nbytes`` over TCP from ``sender``'s host to ``receiver``'s (device
    numbers or "link"), until the receiver holds the last byte."""
    host = (lab.server_ip(sender) if receiver == "link" else
            lab.device_ip(receiver) if sender == "link" else None)
    if host is None:
        raise ValueError("one end of a transfer is the server's host (\"link\")")
    port = free_port_in(lab, receiver)
    rx = subprocess.Popen(lab.wrap(receiver, [sys.executable, "-c", _RECEIVE, str(port)]),
                          stdout=subprocess.PIPE, text=True)
    try:
        if rx.stdout.readline().strip() != "ready":
            raise RuntimeError("the receiver did not start")
        tx = subprocess.run(lab.wrap(sender, [sys.executable, "-c", _SEND, host, str(port), str(nbytes)]),
                            capture_output=True, text=True, timeout=timeout, check=True)
        received = int(rx.communicate(timeout=60)[0])
        if received != nbytes:
            raise RuntimeError(f"sent {nbytes} bytes, {received} arrived")
        return float(tx.stdout)
    finally:
        rx.kill()
        rx.wait()


def free_port_in(lab: NetworkLab, where: int | str = "link") -> int:
    """A TCP port free in ``where``'s namespace (a fresh namespace has every port free: any
    one from the ephemeral range is; asked there so that a reused namespace is honoured)."""
    code = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); print(s.getsockname()[1])"
    return int(subprocess.run(lab.wrap(where, [sys.executable, "-c", code]), capture_output=True,
                              text=True, check=True).stdout)


__all__ = ["LINK_PROFILES", "LinkProfile", "NetworkLab", "free_port_in", "lab_available",
           "lab_leftovers", "measure_transfer"]
