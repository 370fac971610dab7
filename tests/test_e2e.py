"""`flwr run .` end to end under the simulation engine (the smoke config, 10 clients, 2 rounds)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from task.config import RunConfig
from task.lm.model import load_backbone
from task.precision import fast_bf16

ROOT = Path(__file__).resolve().parents[1]


def _processes_with_flwr_home(home: Path) -> list[int]:
    """PIDs still alive that inherited this run's FLWR_HOME (SuperLink, SuperExec, Ray...)."""
    import psutil

    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == str(home):
                pids.append(p.pid)
        except (psutil.Error, OSError):
            pass
    return pids


@pytest.mark.slow
def test_smoke_run_completes_learns_and_writes_results(tmp_path):
    out = tmp_path / "out"
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "10",
         "--flwr-home", str(tmp_path / "flwr"), "--timeout", "600",
         "--run-config", "conf/smoke.toml",
         "--run-config", f"output-dir='{out}' cache-dir='{cache}'"],
        cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _processes_with_flwr_home(tmp_path / "flwr"), "every process started is stopped"
    # the connection is in the current format: Flower warns about nothing deprecated
    assert "deprecated" not in proc.stdout + proc.stderr
    # each log line once (no second, timestamped copy), and the results folder named at the end
    assert (proc.stdout + proc.stderr).count("round 2/2: global ppl") == 1
    assert proc.stdout.rstrip().splitlines()[-1] == f"results: {out}"

    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert results["num_clients"] == 10 and results["clients_per_round"] == 5
    # model.precision = auto (the default): bf16 exactly where this CPU has it natively
    has_bf16, _ = fast_bf16(torch.device("cpu"))
    assert results["precision"]["requested"] == "auto" and results["precision"]["fast_bf16"] == has_bf16
    assert results["precision"]["server"] == ("bf16" if has_bf16 else "fp32")
    assert rounds[-1]["global_ppl"] < rounds[0]["global_ppl"], "perplexity must drop"
    for r in rounds[1:]:
        assert r["num_updates"] == 5 and r["rejected"] == 0 and r["failures"] == 0
        # only adapters travel: 5 uploads of about adapter_params float32 each, not the backbone
        adapter_bytes = 4 * results["adapter_params"]
        assert 5 * adapter_bytes < r["upload_bytes"] < 5 * 4 * results["backbone_params"] / 100
    final = results["final"]
    assert final["upload_bytes_total"] == sum(r["upload_bytes"] for r in rounds)
    # on the clients' own (whole) test sets too, the global adapter improves by round;
    # fedavg-lora has no personal model of its own, so no in-round personalized figure
    assert rounds[2]["local_global_ppl"] < rounds[1]["local_global_ppl"]
    assert rounds[2]["personalized_ppl"] is None
    assert final["local_global_ppl"] == rounds[2]["local_global_ppl"]
    # round 0 and the final round on the whole global test set, token- and word-level
    assert final["global_ppl"] == rounds[2]["whole_ppl"] < final["initial_global_ppl"] == rounds[0]["whole_ppl"]
    assert final["global_test_tokens"] == results["global_test_tokens"] > results["round_eval_tokens"] >= 1024
    assert 0 < final["global_test_words"] < final["global_test_tokens"]
    assert final["global_word_ppl"] > final["global_ppl"]
    # the personalization protocol: 5 clients, per-client choices, statistics, peft adapters
    assert final["protocol_clients"] == 5 and math.isfinite(final["protocol_personalized_ppl"])
    assert final["protocol_words"] > 0 and math.isfinite(final["protocol_personalized_word_ppl"])
    assert len(results["personalization"]) == 5
    assert all(c["total_steps"] > 0 and 0 <= c["chosen_steps"] <= c["total_steps"]
               for c in results["personalization"])
    assert results["personalization_stats"]["clients"] == 5
    assert (out / "personalization.png").stat().st_size > 0
    personalized = list((out / "clients").glob("client-*/personalized-adapter"))
    assert len(personalized) == 5
    assert (out / "metrics.csv").read_text().count("\n") == 4  # header + rounds 0..2
    assert (out / "perplexity.png").stat().st_size > 0
    assert json.loads((out / "state.json").read_text())["round"] == 2

    # The global adapter is a standard peft checkpoint.
    cfg = RunConfig.from_run_config({"model.name": "tiny-gpt2", "train.seq-len": 32, "cache-dir": str(cache)})
    model = PeftModel.from_pretrained(load_backbone(cfg), out / "global-adapter")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    PeftModel.from_pretrained(load_backbone(cfg), personalized[0])  # peft format too
    # Personal adapters stayed with the clients that trained.
    assert list((out / "clients").glob("client-*/personal-adapter/adapter_model.safetensors"))


@pytest.mark.slow
def test_simulate_exits_non_zero_when_the_run_fails(tmp_path):
    """`flwr run` exits 0 on a run that failed; scripts/simulate.py must not (here a run-config
    value the ServerApp refuses at start)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "2",
         "--flwr-home", str(tmp_path / "flwr"), "--timeout", "300",
         "--run-config", "conf/smoke.toml",
         "--run-config", f"output-dir='{tmp_path / 'out'}' lora.rank=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "did not complete" in proc.stderr and "finished:failed" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    assert not _processes_with_flwr_home(tmp_path / "flwr"), "every process started is stopped"


@pytest.mark.slow
def test_plain_flwr_run_as_the_readme_says(tmp_path):
    """README's plain Flower path: the venv on PATH, runtime dependency installation off, `flwr
    run .` with a conf file and a federation size, Flower's own detached local SuperLink (on
    ports of its own here). Each log line shows once, and the run gets its own results folder."""
    import re
    import signal
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    home = Path(os.environ["FEDGEN_EDGE_HOME"])
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
           "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:
        proc = subprocess.run(
            ["flwr", "run", ".", "--run-config", "conf/smoke.toml",
             "--federation-config", "num-supernodes=10", "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:  # Flower leaves its local SuperLink and SuperExec running: stop them
        for pid in _processes_with_flwr_home(tmp_path / "flwr"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "deprecated" not in log
    # each line once: the round summary, the metric and the bytes on one line
    summaries = re.findall(r"round 2/2: global ppl [\d.]+, train loss [\d.]+, up \d+ B, down \d+ B", log)
    assert len(summaries) == 1, log[-3000:]
    found = re.search(r"FedGen-Edge finished: results in (\S+)", log)
    assert found, log[-3000:]
    out = Path(found.group(1))
    assert out.parent == home / "outputs" / "smoke" and out.name.isdigit(), "outputs/smoke/<run id>"
    assert (out.parent / "latest").resolve() == out
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["num_clients"] == 10
