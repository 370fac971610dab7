"""The benchmark harness's own logic: merged reports, trained-token counts, profile buckets
(its timings are never asserted)."""

import json

from bench.__main__ import main as bench_main
from bench.profile import classify, summarize
from bench.sim import update_tokens


def test_update_tokens_follows_the_training_loop():
    # 30 blocks of 64 tokens, batches of 8: steps of 8, 8, 8 (capped at 3)
    assert update_tokens(30, 8, 64, epochs=1, max_steps=3) == 3 * 8 * 64
    # a small client: one short batch per epoch, two epochs, under the cap
    assert update_tokens(5, 8, 64, epochs=2, max_steps=3) == 2 * 5 * 64
    # no cap: every batch of every epoch (8 + 2 blocks, twice)
    assert update_tokens(10, 8, 64, epochs=2, max_steps=0) == 2 * 10 * 64


def test_merge_keeps_sections_not_measured_again(tmp_path):
    kept = {"size": "tiny", "params": {}, "started": "earlier", "wall_s": 5.0,
            "machine": {"cpus": 2, "load_avg_at_start": [1.0, 1.0, 1.0]},
            "matmul_peak": {"size": 1, "threads": 1, "best_s": 1.0, "flops_per_s": 1.0},
            "comm": [], "errors": ["peak: old failure", "codecs: old"]}
    (tmp_path / "bench-tiny.json").write_text(json.dumps(kept))
    assert bench_main(["--tiny", "--only", "peak", "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert merged["started"] == "earlier" and merged["comm"] == []  # kept
    # measured again: the placeholder's 1x1 matmul is replaced by the harness's own size
    peak = merged["matmul_peak"]
    assert peak["size"] > 1 and peak["flops_per_s"] == 2 * peak["size"] ** 3 / peak["best_s"]
    assert merged["errors"] == ["codecs: old"]  # the re-run section's old failure is gone
    assert merged["sections"]["peak"]["merged"] is True
    assert "Re-measured later (`--merge`): peak" in (tmp_path / "bench-tiny.md").read_text()


def test_profile_buckets_client_and_server_stacks(tmp_path):
    client = "run (ray_actor.py:59);train (client_app/app.py:67);train_local (task/lm/train.py:66)"
    server = "main (server_app/app.py:135);Strategy.start (x.py:1)"
    raw = tmp_path / "raw.txt"
    raw.write_text(f"{client};Tensor.backward (torch/_tensor.py:623) 40\n"
                   f"{client};PeftModelForCausalLM.forward (peft/peft_model.py:2120) 20\n"
                   f"{client};Condition.wait (threading.py:331) 99\n")
    assert summarize(raw, "client", rate=20) == {"client: backward": 2.0, "client: forward": 1.0}
    assert classify((server + ";aggregate_train (s.py:1)").split(";"), "server") == \
        "server: aggregation"
    # a server frame never counts as a client cost and the other way round
    assert classify((server + ";evaluate_nll (task/lm/train.py:90)").split(";"), "server") == \
        "server: evaluation of the global adapter"
    assert classify(["<module> (default_worker.py:1)"], "client") == \
        "client: process start-up, Flower and Ray outside the app"
