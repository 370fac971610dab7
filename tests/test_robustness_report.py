"""scripts/robustness.py: the SmolLM2 plan, issue 18's checks on constructed runs, and (slow) the
tiny-gpt2 smoke through real `flwr run`s."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_default_plan_attacks_every_defence_and_runs_dp_with_many_clients():
    from robustness import DEFENCES, DP_CLIENTS, SIZES, plan

    from strategies.registry import check_run
    from task.config import RunConfig

    runs = dict(plan("default"))
    for fraction in ("10%", "30%"):
        for d in DEFENCES:
            o = runs[f"backdoor {fraction} / {d}"]
            assert o["threats.attack"] == "backdoor" and o["robust.aggregation"] == d
        assert runs[f"backdoor {fraction} / multikrum"]["robust.krum-malicious"] == int(fraction[0])
    assert all(f"clean / {d}" in runs for d in DEFENCES)
    dp = {n: o for n, o in runs.items() if n.startswith("DP")}
    assert len(dp) == 4 and all(o["clients"] == DP_CLIENTS for o in dp.values())
    assert dp["DP reference: no clipping, no noise"].get("dp.noise-multiplier", 0) == 0
    # every run's config passes the start-up checks (a refused option would stop the report at its row)
    for size in ("default", "smoke"):
        for name, o in plan(size):
            check_run(RunConfig.from_run_config(
                {**SIZES[size]["base"], **{k: v for k, v in o.items() if k not in ("clients", "resume")}}))
    assert "robust.krum-malicious" not in runs["backdoor 30% / median"]
    assert dict(plan("default", clients=20))["backdoor 30% / multikrum"]["robust.krum-malicious"] == 6
    assert SIZES["default"]["base"]["model.name"] == "smollm2-135m"


def _run(name: str, ppl: float, backdoor: list[float] | None = None, eps: float | None = None,
         aggregation: str = "mean") -> dict:
    rounds = [{"round": i, "global_ppl": ppl, "backdoor_success": b, "num_updates": 10,
               "update_norm_median": 3.0} for i, b in enumerate(backdoor or [None, None])]
    return {"name": name, "overrides": {"robust.aggregation": aggregation}, "clients": 10, "wall_s": 60.0,
            "out": "", "rounds": rounds,
            "final": {"global_ppl": ppl, "backdoor_success": (backdoor or [None])[-1], "dp_epsilon": eps,
                      "upload_bytes_total": 1e6, "download_bytes_total": 1e6}}


def test_checks_say_which_targets_are_met():
    from robustness import checks, table

    runs = [_run("clean / mean", 100.0), _run("clean / median", 104.0, aggregation="median"),
            _run("backdoor 10% / mean", 103.0, [0.0, 0.4, 0.9]),
            _run("backdoor 10% / median", 104.5, [0.0, 0.05, 0.06], aggregation="median"),
            _run("backdoor 10% / multikrum", 108.0, [0.0, 0.0, 0.0], aggregation="multikrum"),
            _run("backdoor 30% / mean", 107.0, [0.0, 0.3, 0.45]),
            _run("DP reference: no clipping, no noise", 200.0),
            _run("DP z=0.7 clip=0.5", 240.0, eps=6.0), _run("DP z=0.5 clip=0.5", 230.0, eps=11.8)]
    text = "\n".join(checks(runs))
    assert "backdoor 10%, no defence: top-1 0.90 (target >= 0.50: met), clean ppl 1.030x (within 5%: met)" in text
    assert "median: top-1 0.06, ppl under attack 1.045x, ppl without attackers 1.040x: holds" in text
    assert "multikrum: top-1 0.00, ppl under attack 1.080x: does not hold" in text
    assert "backdoor 30%, no defence: top-1 0.45 (target >= 0.50: NOT met), clean ppl 1.070x (within 5%: NOT met)" in text
    assert "DP z=0.7 clip=0.5: epsilon 6.00 at delta 1e-5, ppl 1.200x the non-DP run (meets" in text
    assert "DP z=0.5 clip=0.5: epsilon 11.80 at delta 1e-5, ppl 1.150x the non-DP run (misses" in text
    rows = table(runs).splitlines()
    assert "| backdoor 10% / mean | 10 (10) | mean | 103.0 | 1.030x | 0.00 0.40 0.90 |" in rows[4]
    assert "1.200x" in [r for r in rows if r.startswith("| DP z=0.7")][0]  # against the DP reference


@pytest.mark.slow
def test_smoke_report_runs_a_backdoor_and_multikrum_through_flower(tmp_path):
    """tiny-gpt2 (the CI smoke): the clean run and a 30% backdoor under MultiKrum, as real
    `flwr run`s; MultiKrum drops 3 updates a round and the report names every row."""
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "robustness.py"), "--size", "smoke", "--out", str(out),
         "--work", str(tmp_path / "work"), "--only", "clean / mean,backdoor 30% / multikrum"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in runs] == ["clean / mean", "backdoor 30% / multikrum"]
    attacked = runs[1]
    assert [r["dropped"] for r in attacked["rounds"] if r["round"] > 0] == [3, 3]
    assert attacked["final"]["dropped_total"] == 6
    assert all(r["backdoor_success"] is not None for r in attacked["rounds"])
    report = (out / "report.md").read_text()
    assert "| backdoor 30% / multikrum |" in report and (out / "backdoor.png").exists()


def test_only_takes_exact_names_before_prefixes():
    from robustness import plan, select

    names = [n for n, _ in select(plan("default"), ["clean / mean", "backdoor 30%"])]
    assert names == ["clean / mean"] + [n for n, _ in plan("default") if n.startswith("backdoor 30%")]


def test_a_set_value_that_a_row_overrides_stops_the_report(tmp_path):
    from robustness import main

    with pytest.raises(SystemExit, match="threats.attack-steps"):
        main(["--only", "backdoor 30% / mean", "--set", "threats.attack-steps=4",
              "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()  # stopped before any run
