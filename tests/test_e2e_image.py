"""`flwr run .` of the image task end to end (conf/smoke-image.toml: tiny cDCGAN, 10 clients, 2 rounds)."""

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
from task import get_task
from test_e2e import _processes_with_flwr_home

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_image_smoke_run_federates_generator_adapters_and_reports_kid_fid_and_accuracy(tmp_path):
    out = tmp_path / "out"
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "10",
         "--flwr-home", str(tmp_path / "flwr"), "--timeout", "600",
         "--run-config", "conf/smoke-image.toml",
         "--run-config", f"output-dir='{out}' cache-dir='{cache}'"],
        cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _processes_with_flwr_home(tmp_path / "flwr"), "every process started is stopped"

    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert results["task"] == "image" and results["pretrain"]["pretrain_steps"] == 40
    # the federated generator moved, was measured anew, and got better than the backbone it
    # started from (measured: per-round KID 0.491 -> 0.487 -> 0.483, the whole 0.519 -> 0.507,
    # with fixed noise and fixed KID subsets, so the rounds compare pairwise)
    assert len({round(r["global_kid"], 8) for r in rounds}) == 3
    assert rounds[2]["global_kid"] < rounds[0]["global_kid"]
    assert rounds[2]["whole_kid"] < rounds[0]["whole_kid"]
    assert all(math.isfinite(r["global_kid"]) and r["global_kid"] > 0 for r in rounds)
    assert all(0 <= r["global_accuracy"] <= 1 for r in rounds)
    assert results["fid_images"] == results["config"]["image.fid-images"] and "scores" in results
    for r in rounds[1:]:
        assert r["num_updates"] == 5 and r["rejected"] == 0 and r["failures"] == 0
        # only generator adapters travel: 5 uploads of adapter_params float32, far below the generator
        assert 5 * 4 * results["adapter_params"] < r["upload_bytes"] < 5 * 4 * results["backbone_params"] / 4
    final = results["final"]
    assert final["local_global_kid"] > 0 and final["global_kid"] == rounds[2]["whole_kid"] > 0
    assert final["global_fid"] == rounds[2]["whole_fid"] > final["global_fid_floor"] > 0
    assert rounds[2]["whole_fid_images"] == results["fid_images"]
    assert final["protocol_clients"] == 1 and math.isfinite(final["protocol_personalized_kid"])
    assert results["personalization"][0]["total_steps"] > 0
    assert "global_kid" in (out / "metrics.csv").read_text().splitlines()[0]
    assert (out / "kid.png").stat().st_size > 0
    for r in (0, 1, 2):
        assert (out / "checkpoints" / f"round-{r:04d}" / "grid.png").stat().st_size > 0
    # every client that trained keeps its private discriminator; none is ever uploaded
    kept = list((out / "clients").glob("client-*/discriminator.pt"))
    assert 5 <= len(kept) <= 10

    # The global adapter is a peft checkpoint (the transposed-conv LoRA registered on load).
    from task.image.model import LoraConvTranspose2d, image_lora_config

    cfg = RunConfig.from_run_config({"task": "image", "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
                                     "image.generator-width": 8, "image.discriminator-width": 8,
                                     "image.pretrain-steps": 40, "lora.rank": 2, "lora.alpha": 4.0,
                                     "cache-dir": str(cache)})
    model = PeftModel.from_pretrained(get_task(cfg).load_backbone(cfg), out / "global-adapter",
                                      config=image_lora_config(cfg))
    assert any(isinstance(m, LoraConvTranspose2d) for m in model.modules())
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b), "B starts at 0 and was trained"
    with torch.no_grad():
        images = model(torch.randn(4, 100), torch.arange(4))
    assert images.shape == (4, 1, 32, 32) and torch.isfinite(images).all()


def _run_image(tmp_path: Path, name: str, config: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "10",
         "--flwr-home", str(tmp_path / f"flwr-{name}"), "--timeout", "600",
         "--run-config", "conf/smoke-image.toml", "--run-config", config],
        cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_image_run_with_dp_resumes_from_its_checkpoint(tmp_path):
    """The one server flow gives the image task DP accounting and resume: a one-round DP run,
    then the same run resumed to two rounds keeps round 1, the clients' kept discriminators and
    the privacy already spent, and spends it once more."""
    out = tmp_path / "out"
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    common = (f"output-dir='{out}' cache-dir='{cache}' dp.noise-multiplier=0.1 "
              "dp.clipping-norm=1.0 server.checkpoint-every=1 server.evaluate-every=1 "
              "server.personalize-clients=0")
    _run_image(tmp_path, "first", f"{common} num-server-rounds=1")
    first = json.loads((out / "results.json").read_text())
    kept = {p: p.stat().st_mtime_ns for p in (out / "clients").glob("client-*/discriminator.pt")}
    assert len(kept) == 5 and json.loads((out / "state.json").read_text())["round"] == 1

    _run_image(tmp_path, "resumed", f"{common} num-server-rounds=2 resume=true")
    resumed = json.loads((out / "results.json").read_text())
    rounds = resumed["rounds"]
    assert resumed["resumed_after_round"] == 1 and [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1] == first["rounds"][1], "round 1 is the first run's, restored"
    eps1, eps2 = rounds[1]["dp_epsilon"], rounds[2]["dp_epsilon"]
    assert 0 < eps1 < eps2 == resumed["final"]["dp_epsilon"]
    assert rounds[2]["num_updates"] == 5 and rounds[2]["rejected"] == 0  # clients clipped
    # the clients' private discriminators survived the restart (a fresh run deletes them)
    assert all(p.exists() for p in kept)
    assert len(list((out / "clients").glob("client-*/discriminator.pt"))) >= len(kept)
