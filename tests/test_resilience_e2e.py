"""End to end under `flwr run`: 30% of the sampled clients fail every round and the run goes on
(retrying for enough replies), with DP clipping and noise and its epsilon per round; a run killed
mid-way and resumed ends with the same global adapter (and epsilon) as the uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ("num-server-rounds=3 server.checkpoint-every=1 server.evaluate-every=3 server.personalize-clients=0 "
          "train.max-steps=2 train.batch-size=4 "
          "strategy.fraction-train=0.5 threats.client-failure-rate=0.3 robust.min-replies=4 robust.on-too-few-replies='retry' "
          "robust.max-retries=2 dp.noise-multiplier=0.5 dp.clipping-norm=1.0")


def _command(tmp_path: Path, name: str, extra: str = "") -> list[str]:
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    return [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "10",
            "--flwr-home", str(tmp_path / f"flwr-{name}"), "--timeout", "600",
            "--run-config", "conf/smoke.toml",
            "--run-config", f"{CONFIG} output-dir='{tmp_path / name}' cache-dir='{cache}' {extra}"]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "global-adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_failing_clients_and_kill_then_resume_end_at_the_same_adapter(tmp_path):
    _run(_command(tmp_path, "full"))
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    rounds = full["rounds"][1:]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sum(r["failures"] for r in rounds) > 0, "30% failing clients must show up"
    assert full["final"]["failures_total"] == sum(r["failures"] for r in rounds)
    epsilons = [r["dp_epsilon"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] == full["final"]["dp_epsilon"]
    assert all(r["rejected"] == 0 for r in rounds), "clients clipped (the server checks)"
    for r in rounds:  # every round got its 4 replies, retrying when failures left it short
        assert r["num_updates"] >= 4 or r["skipped"] == 1
        assert r["retries"] > 0 or r["num_updates"] + r["failures"] == 5

    # The same run, killed once round 1 is checkpointed, then restarted with resume = true.
    out = tmp_path / "resumed"
    proc = subprocess.Popen(_command(tmp_path, "resumed"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            state = out / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run must still be going when it is killed"
        killed_at = json.loads((out / "state.json").read_text())["round"]
        assert killed_at < 3
    finally:
        proc.send_signal(signal.SIGTERM)  # simulate.py stops its SuperLink tree on SIGTERM
        proc.wait(timeout=60)
    assert not (out / "global-adapter").exists()

    _run(_command(tmp_path, "resumed", "resume=true"))
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["resumed_after_round"] >= killed_at
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]  # nothing lost
    a, b = _adapter(tmp_path / "full"), _adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # bit-identical
    for x, y in zip(full["rounds"], resumed["rounds"]):
        assert x["global_ppl"] == pytest.approx(y["global_ppl"], rel=1e-9)
        assert x["failures"] == y["failures"] and x["num_updates"] == y["num_updates"]
        assert x["dp_epsilon"] == pytest.approx(y["dp_epsilon"]) if x["round"] else True
