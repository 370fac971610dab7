"""scripts/netlab.py: device namespaces joined to the server's by shaped links, memory caps,
and nothing left behind. Needs root (ip netns, tc); skipped elsewhere."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from netlab import NetworkLab, lab_available, lab_leftovers, measure_transfer  # noqa: E402

pytestmark = pytest.mark.skipif(bool(lab_available()), reason=lab_available() or "lab available")

def test_links_are_shaped_per_direction_and_the_lab_cleans_up():
    nbytes = 250_000  # 2 Mbit: 2 s at the weak uplink's 1 Mbit/s, 0.4 s down at 5 Mbit/s
    with NetworkLab("t1", 2, links=["weak", "wifi"]) as lab:
        assert lab.links == ["weak", "wifi"]
        up = measure_transfer(lab, 0, "link", nbytes)
        down = measure_transfer(lab, "link", 0, nbytes)
        wifi_up = measure_transfer(lab, 1, "link", nbytes)
        # devices are their own hosts: device 1 cannot reach device 0's link
        probe = f"import socket; s = socket.socket(); s.settimeout(1); print(s.connect_ex(({lab.device_ip(0)!r}, 22)))"
        reach = subprocess.run(lab.wrap(1, [sys.executable, "-c", probe]), capture_output=True, text=True)
    assert 1.6 < up < 3.0, up
    assert 0.25 < down < 0.8, down
    assert wifi_up < 0.25, wifi_up
    assert reach.returncode == 0 and int(reach.stdout) != 0  # no route: not even a refusal
    assert not [x for x in lab_leftovers() if "fget1" in x]


def test_a_memory_cap_holds_a_device_and_is_removed():
    cap = 256 * 2**20
    grab = "b = bytearray(160 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    too_much = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    with NetworkLab("t2", 1, memory_caps={0: cap}) as lab:
        fits = subprocess.run(lab.wrap(0, [sys.executable, "-c", grab]), capture_output=True, text=True)
        peak = lab.peak_memory(0)
        killed = subprocess.run(lab.wrap(0, [sys.executable, "-c", too_much]), capture_output=True, text=True)
        group = lab.cgroup(0)
    assert fits.stdout.strip() == "ok" and 160 * 2**20 < peak <= cap
    assert killed.returncode != 0 and "ok" not in killed.stdout  # OOM-killed inside the group
    assert not group.exists() and not [x for x in lab_leftovers() if "fget2" in x]


def test_bad_profiles_and_caps_are_refused():
    with pytest.raises(ValueError, match="unknown link profile 'dialup'"):
        NetworkLab("t3", 1, links=["dialup"])
    with pytest.raises(ValueError, match="memory cap for device 3"):
        NetworkLab("t3", 2, memory_caps={3: 2**30})
