"""Simulation-engine runs (a real ``flwr run`` on a SuperLink of our own, scripts/simulate.py):
peak memory of all run processes and client updates per minute."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from simulate import LocalSuperLink  # noqa: E402


def simulate(backbone: str, num_supernodes: int, clients_per_round: int, rounds: int,
             work_dir: Path, timeout: float = 600, **overrides) -> dict:
    """One federated run; rounds 2..R-1 are the steady state (round 1 also starts the client
    process and loads everything; round R adds the client evaluation)."""
    name = f"{backbone}-{num_supernodes}x{clients_per_round}"
    out = work_dir / name
    run_config = {
        "backbone": backbone, "output-dir": str(out), "cache-dir": str(ROOT / ".cache" / "fedgen"),
        "num-server-rounds": rounds, "fraction-train": clients_per_round / num_supernodes,
        "fraction-evaluate": 1 / num_supernodes, "evaluate-every": rounds,
        "checkpoint-every": rounds, "personalize-clients": 0, "eval-max-batches": 1, **overrides}
    t = time.time()
    with LocalSuperLink(work_dir / f"flwr-home-{name}",
                        report_memory=True) as link:
        code = link.run(run_config, num_supernodes, timeout=timeout)
    wall = time.time() - t
    if code != 0:
        raise RuntimeError(f"flwr run of {backbone} with {num_supernodes} clients exited {code}")
    results = json.loads((out / "results.json").read_text())
    steady = [r for r in results["rounds"] if 2 <= r["round"] < rounds] or results["rounds"][1:]
    updates = sum(r["num_updates"] for r in steady)
    seconds = sum(r["wall_s"] for r in steady)
    return {"backbone": backbone, "num_supernodes": num_supernodes,
            "clients_per_round": clients_per_round, "rounds": rounds,
            "peak_rss_gib": link.watcher.peak_bytes / 2**30, "wall_s": wall,
            "round_wall_s": [r["wall_s"] for r in results["rounds"]],
            "steady_rounds": [r["round"] for r in steady],
            "updates_per_min": 60 * updates / seconds if seconds else float("nan"),
            "max_steps": run_config.get("max-steps", 3),
            "final_global_ppl": results["rounds"][-1]["global_ppl"]}
