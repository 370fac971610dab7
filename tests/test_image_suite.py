"""scripts/image_suite.py: the image table's plan, its statistics over seeds and issue 16's checks."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_plan_is_every_method_seed_by_seed_on_the_size_config():
    from image_suite import METHODS, base_config, plan

    runs = plan("fashion", seeds=[42, 43])
    assert [n for n, _ in runs][:len(METHODS)] == [f"{m}-s42" for m in METHODS]
    assert len(runs) == 2 * len(METHODS) and dict(runs)["ditto-s43"] == {"strategy.name": "ditto", "seed": 43}
    assert [n for n, _ in plan("fashion")] == METHODS  # one seed: plain method names
    base = base_config("fashion")
    assert base["task"] == "image" and base["data.dirichlet-alpha"] == 0.1 and "image.fid-images" not in base
    with pytest.raises(SystemExit, match="fedprox"):
        plan("fashion", methods=["fedprox"])


def _results(method: str, seed: int, kid: float, accuracy: float = 0.85) -> dict:
    final = {"global_kid": kid, "global_kid_std": kid / 10, "global_fid": 1e4 * kid,
             "global_fid_floor": 5.0, "global_accuracy": accuracy,
             "initial_global_kid": 0.05, "initial_global_kid_std": 0.004, "initial_global_fid": 60.0,
             "initial_global_accuracy": 0.7, "protocol_clients": 2, "protocol_global_kid": 2 * kid,
             "protocol_personalized_kid": 1.5 * kid, "protocol_improved_share": 1.0,
             "protocol_wilcoxon_p": 0.5, "upload_bytes_total": 1000 if "centralized" not in method else 0,
             "wall_s": 120.0}
    return {"backbone": "cdcgan-g32-d32", "dataset": "fashion-mnist", "partitioner": "dirichlet",
            "num_clients": 20, "clients_per_round": 10, "num_rounds": 8, "fid_name": "fid_2048",
            "fid_images": 2048, "pretrain": {"pretrain_steps": 3000, "pretrain_s": 900.0},
            "config": {"seed": seed, "strategy.name": method, "image.pretrain-fraction": 0.1,
                       "data.dirichlet-alpha": 0.1, "train.max-steps": 20, "train.batch-size": 32,
                       "lora.rank": 8},
            "rounds": [{"round": 0, "global_kid": 0.05}, {"round": 8, "global_kid": kid}],
            "personalization_stats": {"clients": 2, "improved_share": 1.0, "mean_gain": 0.25,
                                      "median_gain": 0.25, "wilcoxon_p": 0.5, "gains": [0.2, 0.3]},
            "final": final}


def test_report_gives_mean_and_std_over_seeds_and_the_issue_checks(tmp_path):
    from image_suite import plan, publish, report

    kids = {"centralized-lora": [0.010, 0.012], "fedavg-lora": [0.014, 0.016], "fedavg-full": [0.020, 0.030],
            "local-only": [0.010, 0.010]}
    runs = plan("fashion", methods=list(kids), seeds=[42, 43])
    for name, overrides in runs:
        method, seed = overrides["strategy.name"], overrides["seed"]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps(_results(method, seed, kids[method][seed - 42])))
        (tmp_path / name / "metrics.csv").write_text("round,global_kid\n")
    text = report("fashion", tmp_path, runs, render=False).read_text()
    # KID x 1e-3, mean ± sample std over the two seeds
    assert "| fedavg-lora | 2 | 15.00 ± 1.41 |" in text
    assert "| fedavg-full | 2 | 25.00 ± 7.07 |" in text and "| pre-trained backbone (round 0) | - | 50.00 |" in text
    assert "fedavg-lora vs fedavg-full: KID 15.00 vs 25.00: lower (better)" in text
    # local-only has no global model: held to its clients' own adapters (personalized = 1.5 x kid here)
    assert "| local-only (global = the backbone) | 2 | 10.00 ± 0.00 |" in text
    assert ("fedavg-lora vs local-only (personalized KID on the protocol clients' own classes; local-only "
            "has no global model): 22.50 vs 15.00: NOT lower") in text
    assert "fedavg-lora / centralized-lora KID: 1.36x (within 1.5x)" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean_kid"]["fedavg-lora"] == pytest.approx(0.015) and summary["seeds"] == [42, 43]
    assert (tmp_path / "kid.png").stat().st_size > 0 and (tmp_path / "personalization.png").exists()

    docs = tmp_path / "docs"
    publish(tmp_path, docs, runs)
    assert (docs / "report.md").read_text() == text
    assert json.loads((docs / "fedavg-lora-s43" / "results.json").read_text())["final"]["global_kid"] == 0.016


def test_a_missing_run_is_named_and_left_out_of_the_means(tmp_path):
    from image_suite import plan, report

    runs = plan("fashion", methods=["fedavg-lora", "ditto"], seeds=[42, 43])
    for name in ("fedavg-lora-s42", "ditto-s42", "fedavg-lora-s43"):
        method, seed = name.rsplit("-s", 1)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(method, int(seed), 0.02)))
    text = report("fashion", tmp_path, runs, render=False).read_text()
    assert "Not finished (left out): ditto-s43." in text and "| ditto | 1 | 20.00 |" in text


def test_ablation_runs_fedavg_lora_at_other_ranks_and_placements_and_reports_them(tmp_path):
    from image_suite import ABLATION, plan, report
    from task.config import RunConfig

    runs = plan("fashion", methods=["fedavg-lora"], seeds=[42], ablation=True)
    assert [n for n, _ in runs] == ["fedavg-lora", *ABLATION]
    for name, overrides in runs:  # every point is a valid run config
        RunConfig.from_run_config({"task": "image", "data.dataset": "fashion-mnist",
                                   "data.partitioner": "dirichlet", **overrides})
        results = _results("fedavg-lora", 42, 0.02)
        results["config"].update({"lora.rank": 8, "image.lora-layers": "all", "image.lora-norms": False,
                                  **{k: v for k, v in overrides.items() if k.startswith(("lora.", "image."))}})
        results["adapter_params"] = 100 * results["config"]["lora.rank"]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    text = report("fashion", tmp_path, runs, render=False).read_text()
    assert "| fedavg-lora | 1 | 20.00 |" in text  # the ablation's runs stay out of the table
    assert "| rank-2 | 2 | all | no | 200 | 0.00 MB | 20.00 |" in text
    assert "| layers-all-norms | 8 | all | yes | 800 |" in text and "| layers-0 | 8 | 0 | no |" in text


def test_a_run_of_one_method_is_reported_beside_the_runs_finished_before(tmp_path):
    from image_suite import plan, with_finished

    for name, method, seed in (("fedavg-lora", "fedavg-lora", 42), ("fedper", "fedper", 42),
                               ("fedper-s43", "fedper", 43), ("rank-2", "fedavg-lora", 42),
                               ("other", "fedavg-lora", 42)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(method, seed, 0.02)))
    unfinished = _results("ditto", 42, 0.02)
    unfinished["final"] = {}
    (tmp_path / "ditto").mkdir()
    (tmp_path / "ditto" / "results.json").write_text(json.dumps(unfinished))
    runs = with_finished(tmp_path, plan("fashion", methods=["local-only"]))
    # the planned run (not finished yet: named as missing by the report), the finished runs of the
    # table in its order, the ablation's last; an unfinished or foreign folder is not a row
    assert [n for n, _ in runs] == ["fedavg-lora", "fedper", "fedper-s43", "local-only", "rank-2"]
    assert dict(runs)["fedper-s43"] == {"strategy.name": "fedper", "seed": 43}
