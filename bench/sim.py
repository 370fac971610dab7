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


def update_tokens(n_blocks: int, batch_size: int, seq_len: int, epochs: int,
                  max_steps: int) -> int:
    """Tokens one client update trains on (task.train.train_local's loop: batches of the
    client's blocks, ``epochs`` times, stopped after ``max_steps``)."""
    batches = [min(batch_size, n_blocks - start) for start in range(0, n_blocks, batch_size)]
    batches = batches * epochs
    return seq_len * sum(batches[:max_steps] if max_steps else batches)


def trained_tokens(config: dict, num_supernodes: int, server_round: int) -> tuple[int, int]:
    """(client updates, tokens trained) of one round of a simulation run, recomputed from its
    seeded sample: simulation nodes are ordered by partition id (FedGenStrategy.node_order), so
    sample position = partition id; each client's block count comes from its cached blocks."""
    # deferred: the harness process that drives `flwr run` imports torch only for this figure
    from strategies.base import sample_node_ids
    from task.config import RunConfig
    from task.lm.data import client_blocks

    cfg = RunConfig.from_run_config(config)
    partitions = sample_node_ids(range(num_supernodes), cfg.strategy.fraction_train, 1, cfg.seed,
                                 server_round)
    tokens = sum(update_tokens(len(client_blocks(cfg, p, num_supernodes)[0]), cfg.train.batch_size,
                               cfg.train.seq_len, cfg.train.local_epochs, cfg.train.max_steps) for p in partitions)
    return len(partitions), tokens


def simulate(backbone: str, num_supernodes: int, clients_per_round: int, rounds: int,
             work_dir: Path, timeout: float = 600, on_start=None, **overrides) -> dict:
    """One federated run; rounds 2..R-1 are the steady state (round 1 also starts the client
    process and loads everything; round R adds the client evaluation). ``on_start(link)`` runs
    once the SuperLink is up (bench.profile attaches its sampler there)."""
    name = f"{backbone}-{num_supernodes}x{clients_per_round}"
    out = work_dir / name
    run_config = {
        "model.name": backbone, "output-dir": str(out), "cache-dir": str(ROOT / ".cache" / "fedgen"),
        "num-server-rounds": rounds, "strategy.fraction-train": clients_per_round / num_supernodes,
        "strategy.fraction-evaluate": 1 / num_supernodes, "server.evaluate-every": rounds,
        "server.checkpoint-every": rounds, "server.personalize-clients": 0, "eval.server-round-tokens": 512, **overrides}
    t = time.time()
    with LocalSuperLink(work_dir / f"flwr-home-{name}",
                        report_memory=True) as link:
        if on_start is not None:
            on_start(link)
        code = link.run(run_config, num_supernodes, timeout=timeout)
    wall = time.time() - t
    if code != 0:
        raise RuntimeError(f"flwr run of {backbone} with {num_supernodes} clients exited {code}")
    results = json.loads((out / "results.json").read_text())
    steady = [r for r in results["rounds"] if 2 <= r["round"] < rounds] or results["rounds"][1:]
    updates = sum(r["num_updates"] for r in steady)
    seconds = sum(r["wall_s"] for r in steady)
    sampled = [trained_tokens(results["config"], num_supernodes, r["round"]) for r in steady]
    if sum(n for n, _ in sampled) != updates:  # a failed or rejected update: tokens unknown
        raise RuntimeError(f"{name}: {updates} updates in rounds {[r['round'] for r in steady]}, "
                           f"{sum(n for n, _ in sampled)} sampled")
    tokens = sum(t for _, t in sampled)
    return {"backbone": backbone, "num_supernodes": num_supernodes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)),
            "clients_per_round": clients_per_round, "rounds": rounds,
            "peak_rss_gib": link.watcher.peak_bytes / 2**30, "wall_s": wall,
            "round_wall_s": [r["wall_s"] for r in results["rounds"]],
            "steady_rounds": [r["round"] for r in steady],
            "updates_per_min": 60 * updates / seconds if seconds else float("nan"),
            "trained_tokens_per_s": tokens / seconds if seconds else float("nan"),
            "max_steps": results["config"]["train.max-steps"],
            "final_global_ppl": results["rounds"][-1]["global_ppl"]}


def default_run(precision: str, work_dir: Path, timeout: float = 3600) -> dict:
    """The offline default run (`bash scripts/run.sh`: pyproject's run config, 100 clients) with
    ``model.precision`` = ``precision``: wall time, peak RSS of all its processes, the final
    global perplexity on the whole global test set and the precision it chose."""
    out = work_dir / f"default-{precision}"
    run_config = {"output-dir": str(out), "cache-dir": str(ROOT / ".cache" / "fedgen"),
                  "model.precision": precision}
    t = time.time()
    with LocalSuperLink(work_dir / f"flwr-home-default-{precision}", report_memory=True) as link:
        code = link.run(run_config, 100, timeout=timeout)
    wall = time.time() - t
    if code != 0:
        raise RuntimeError(f"the default run with model.precision={precision} exited {code}")
    results = json.loads((out / "results.json").read_text())
    first, last = results["rounds"][0], results["rounds"][-1]
    return {"precision": precision, "chosen": results.get("precision", {}), "wall_s": wall,
            "peak_rss_gib": link.watcher.peak_bytes / 2**30, "rounds": len(results["rounds"]),
            "rss_at_peak_mib": [(name, rss / 2**20) for name, rss in link.watcher.at_peak],
            "global_test_tokens": results.get("global_test_tokens"),
            "initial_global_ppl": results.get("initial_global_ppl", first.get("global_ppl")),
            "final_global_ppl": last["global_ppl"],
            "round_wall_s": [r["wall_s"] for r in results["rounds"]],
            "personalization": results.get("personalization")}
