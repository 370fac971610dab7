"""The comparison suite end to end on the tiny configuration (a few minutes, runs in CI)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_suite_plan_covers_methods_and_both_ablations():
    from suite import METHODS, plan

    names = [n for n, _ in plan("quick")]
    assert set(METHODS) <= set(names)
    assert {"rank-2", "rank-4", "rank-16", "rank-32"} <= set(names)  # rank 8 is fedavg-lora
    assert {"epochs-1", "epochs-2", "epochs-5", "epochs-10", "epochs-20"} <= set(names)
    overrides = dict(plan("quick"))
    assert overrides["epochs-20"]["train.max-steps"] == 20 and overrides["epochs-1"]["train.max-steps"] == 1
    assert overrides["rank-32"]["lora.rank"] == 32


def test_sweep_plan_and_section(tmp_path):
    from suite import SWEEP, plan, sweep_section

    overrides = dict(plan("tiny", sweep=True))
    # the alpha points are LDA-topic splits whatever the size's own partitioner (compare: role)
    assert overrides["sweep-alpha-0.1"] == {"strategy.name": "fedavg-lora", "data.partitioner": "lda-dirichlet",
                                            "data.dirichlet-alpha": 0.1}
    assert overrides["sweep-role"]["data.partitioner"] == "role"
    runs = {f"sweep-{name}": {
        "partition": {"labels_per_client": 2.0, "effective_labels": 1.5, "js_divergence_mean": 0.1 * i,
                      "js_divergence_median": 0.1 * i},
        "final": {"global_ppl": 100.0, "protocol_global_ppl": 110.0, "protocol_personalized_ppl": 100.0},
        "personalization_stats": {"clients": 20, "improved_share": 0.9, "mean_gain": 0.05 * i,
                                  "wilcoxon_p": 0.001}} for i, (name, _) in enumerate(SWEEP)}
    lines = "\n".join(sweep_section(runs, tmp_path))
    assert "| alpha-0.1 | 2.0 | 1.5 | 0.000 / 0.000 | 100.0 | 110.0 / 100.0 | 90% | 0.0% | 0.0010 |" in lines
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_suite_tiny_writes_the_report(tmp_path):
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "suite.py"), "--tiny",
                           "--out", str(tmp_path), "--cache", str(cache), "--timeout", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for method in ("centralized-lora", "fedavg-lora", "local-only"):
        assert f"| {method} |" in report
    assert "## Ablation: LoRA rank" in report and "## Ablation: Local epochs" in report
    assert "| method | clients | improved | mean gain | median gain | Wilcoxon p |" in report
    for png in ("convergence.png", "upload.png", "personalization.png", "ablation-rank.png",
                "ablation-epochs.png"):
        assert (tmp_path / png).stat().st_size > 0
    # local-only uploads nothing; fedavg-lora uploads adapters
    import json
    assert json.loads((tmp_path / "local-only" / "results.json").read_text())["final"][
        "upload_bytes_total"] == 0
    assert json.loads((tmp_path / "fedavg-lora" / "results.json").read_text())["final"][
        "upload_bytes_total"] > 0
    # a second call finds every run done and only rewrites the report
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "suite.py"), "--tiny",
                            "--out", str(tmp_path), "--cache", str(cache)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "0 to run" in again.stdout


def test_seeds_give_one_run_per_method_and_seed_and_mean_std():
    from suite import _mean_std, plan

    overrides = dict(plan("tiny", seeds=[1, 2, 3], ablations=False))
    assert set(overrides) == {f"{m}-s{s}" for m in ("centralized-lora", "fedavg-lora", "local-only")
                              for s in (1, 2, 3)}
    assert overrides["fedavg-lora-s2"] == {"strategy.name": "fedavg-lora", "seed": 2}
    assert _mean_std([1.0, 2.0, 3.0]) == "2.0 ± 1.0" and _mean_std([5.0]) == "5.0"
    assert _mean_std([1.0, None]) == "n/a"


def test_p_values_stay_readable_when_tiny():
    from suite import _p_value

    assert _p_value(1.9073e-06) == "1.9e-06" and _p_value(0.0123) == "0.0123"
    assert _p_value(None) == "n/a"
