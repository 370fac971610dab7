"""A deployed round against its own compute: real SuperLink + SuperNodes with warm device workers.

    sudo .venv/bin/python -m bench.deploy_round [--backbone smollm2-135m] [--nodes 3] [--rounds 3]
        [--links none] [--memory-cap 2=2] [--out docs/deploy/round]

Starts scripts/deploy_local.py's deployment (TLS, node authentication, one ``fedgen-device``
worker per node; with ``--links`` / ``--memory-cap`` every node on its own namespace, link and
memory cap, scripts/netlab.py), runs ``--rounds`` rounds in which every node trains (federated
evaluation only after the last), and reads back
- each round's wall time (results.json ``wall_s``: from the end of one round's server evaluation
  to the end of the next, so it holds sampling, the messages, every node's training, the
  aggregation and the server's evaluation of ``eval.server-round-tokens`` tokens),
- each node's compute for its training message of that round (the worker's log: the handler's
  own seconds), and the server's own seconds (results.json ``train_phase_s``, ``aggregate_s``,
  ``server_eval_s``),
- with a memory cap, the capped device's memory (its cgroup: worker, SuperNode and the ClientApp
  processes): the peak of resident memory (anonymous + mapped files, sampled every 0.2 s) and the
  cgroup's own peak (page cache included, which fills up to the cap).
Overhead = round wall / the round's compute (the slowest node's training + the server's
aggregation + its evaluation, which run one after the other), over rounds 2..N-1 (round 1
includes the workers' first backbone load, round N the final evaluation on the whole global test
set). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from deploy_local import LocalDeployment, default_threads_per_node  # noqa: E402
from simulate import merge_run_config  # noqa: E402

TRAIN_LINE = re.compile(r" train run \d+: ([0-9.]+)s compute")


def round_breakdown(row: dict, node_compute: list[float]) -> dict:
    """One results.json round against its compute: the slowest node's training, then the
    server's aggregation and evaluation (they run one after the other)."""
    slowest = max(node_compute) if node_compute else None
    server = [row.get(k) for k in ("aggregate_s", "server_eval_s")]
    compute = (slowest + sum(v for v in server if v is not None and math.isfinite(v))
               if slowest is not None else None)
    phase = row.get("train_phase_s")
    return {"round": row["round"], "wall_s": row["wall_s"], "node_compute_s": node_compute,
            "train_phase_s": phase, "aggregate_s": server[0], "server_eval_s": server[1],
            "compute_s": compute,
            "flower_s": phase - slowest if slowest is not None and phase is not None else None,
            "ratio": row["wall_s"] / compute if compute else None}


def _s(v, digits: int = 1) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--links", default="", help="link profiles per node (scripts/netlab.py)")
    parser.add_argument("--memory-cap", action="append", default=[], metavar="I=GIB")
    parser.add_argument("--run-config", default="train.max-steps=2 train.batch-size=8 train.seq-len=32 "
                        "eval.server-round-tokens=1024 eval.client-tokens=1024")
    parser.add_argument("--threads-per-node", type=int, default=None,
                        help="torch threads per node (default: the cores divided among the nodes)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "deploy" / "round")
    args = parser.parse_args(argv)
    threads = args.threads_per_node or default_threads_per_node(args.nodes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    caps = {int(i): int(float(g) * 2**30) for i, g in (x.split("=") for x in args.memory_cap)}
    links = [x for x in args.links.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="fedgen-round-") as tmp:
        work = Path(tmp)
        config = merge_run_config([
            f"model.name='{args.backbone}' num-server-rounds={args.rounds} output-dir='{work / 'out'}' "
            f"cache-dir='{ROOT / '.cache' / 'fedgen'}' strategy.fraction-train=1.0 "
            f"strategy.fraction-evaluate=1.0 server.evaluate-every={args.rounds} "
            f"server.personalize-clients=0 server.min-available-nodes={args.nodes}", args.run_config])
        t0 = time.time()
        with LocalDeployment(work / "deploy", args.nodes, device_workers=True, links=links,
                             memory_caps=caps, threads_per_node=threads) as dep:
            up = time.time() - t0
            resident = {i: 0 for i in caps}
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    for i in caps:
                        resident[i] = max(resident[i], dep.lab.resident_memory(i))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                code = dep.run(config, timeout=3600)
            finally:
                done.set()
                sampler.join()
            peaks = {i: dep.lab.peak_memory(i) for i in caps}
            logs = [(dep.node_dir(i) / "device-worker.log").read_text() for i in range(args.nodes)]
        if code != 0:
            raise SystemExit(f"the deployment run failed (code {code})")
        results = json.loads((work / "out" / "results.json").read_text())
    compute = [[float(s) for s in TRAIN_LINE.findall(log)] for log in logs]  # node -> per round
    rounds = [round_breakdown(r, [c[r["round"] - 1] for c in compute if r["round"] - 1 < len(c)])
              for r in results["rounds"][1:]]
    steady = [x["ratio"] for x in rounds[1:-1] if x["ratio"]]
    res = {"backbone": args.backbone, "nodes": args.nodes, "links": links or ["loopback"],
           "threads_per_node": threads, "cpu_count": os.cpu_count(),
           "memory_caps_bytes": caps, "peak_memory_bytes": peaks, "peak_resident_bytes": resident,
           "deployment_up_s": round(up, 1), "run_config": config, "rounds": rounds,
           "steady_ratio_mean": sum(steady) / len(steady) if steady else None,
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = [f"# A deployed round vs its compute ({args.backbone}, {args.nodes} nodes, TLS + auth, warm workers)", "",
             f"Measured {res['measured_at']}; links {', '.join(res['links'])}; deployment up in {up:.1f} s; "
             f"{args.nodes} nodes on this machine's {os.cpu_count()} cores, torch on {threads} "
             "thread(s) per node.", "",
             "- wall: results.json `wall_s`, from the end of one round's server evaluation to the end "
             "of the next;",
             "- train phase: training messages out to replies in hand (`train_phase_s`); node compute: "
             "each worker's own seconds for its training message (contended: the nodes share the cores);",
             "- compute = the slowest node's training + the server's aggregation (`aggregate_s`) + its "
             "evaluation (`server_eval_s`): the round's own work, done in sequence;",
             "- Flower = train phase - slowest node's training: messages, ClientApp processes, polling.",
             "", "| round | wall (s) | train phase (s) | node compute (s) | aggregate (s) | server eval (s) "
             "| Flower (s) | wall / compute |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rounds:
        nodes = ", ".join(f"{c:.1f}" for c in x["node_compute_s"]) or "n/a"
        lines.append(f"| {x['round']} | {x['wall_s']:.1f} | {_s(x['train_phase_s'])} | {nodes} | "
                     f"{_s(x['aggregate_s'], 2)} | {_s(x['server_eval_s'])} | {_s(x['flower_s'])} | "
                     + (f"{x['ratio']:.2f}x |" if x["ratio"] else "n/a |"))
    if steady:
        lines += ["", f"Rounds 2-{rounds[-2]['round']} (not the first: backbone loads; not the last: the "
                  f"final whole-test evaluation): wall / compute = {res['steady_ratio_mean']:.2f}x (mean)."]
    for i, peak in peaks.items():
        lines += ["", f"Device {i} under a {caps[i] / 2**30:.1f} GiB memory cap finished every round: "
                  f"peak resident {resident[i] / 2**30:.2f} GiB (worker + SuperNode + ClientApp "
                  f"processes, anonymous + mapped files, sampled every 0.2 s); the cgroup's peak with "
                  f"page cache {peak / 2**30:.2f} GiB."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
