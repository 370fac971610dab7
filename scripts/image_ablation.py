"""Kept vs fresh client discriminators on the image task, federated in one process.

Runs the real ClientApp ``train`` handler and the server strategy (bench/driver.py: a simulation
round minus Ray and gRPC) over the same seeded client samples, once per setting, and prints the
global KID after every round. This is how docs/image/report.md's ablation was measured (then
with FID, the task's metric before issue 16):

    python scripts/image_ablation.py conf/image.toml --rounds 4
    python scripts/image_ablation.py conf/image.toml --rounds 4 --set image.keep-discriminator=false
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.driver import federate  # noqa: E402
from simulate import merge_run_config  # noqa: E402
from task import get_task, score  # noqa: E402
from task.adapters import set_adapter_state, shared_lora_model  # noqa: E402
from task.config import RunConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("conf", help="a conf/*.toml with task = 'image'")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=TOML",
                        help="run-config overrides, e.g. image.keep-discriminator=false")
    args = parser.parse_args()
    run_config = merge_run_config([f"cache-dir='{ROOT / '.cache' / 'fedgen'}'", args.conf, *args.set])
    with tempfile.TemporaryDirectory(prefix="image-ablation-") as out:  # the clients' kept state
        run_config["output-dir"] = out
        ablate(RunConfig.from_run_config(run_config), args)


def ablate(cfg: RunConfig, args: argparse.Namespace) -> None:
    task = get_task(cfg)
    if task.caps.metric != "kid":
        raise SystemExit(f"{args.conf}: an image-task config (KID) is needed")
    per_round = max(1, int(args.num_clients * cfg.strategy.fraction_train))
    rng = np.random.default_rng(cfg.seed)
    samples = [sorted(rng.choice(args.num_clients, per_round, replace=False).tolist())
               for _ in range(args.rounds)]
    model = shared_lora_model(cfg)
    evaluate = task.evaluator(cfg, task.global_test_data(cfg), seed=cfg.seed, scope="whole")
    kid = lambda m: score(task, evaluate(m))  # noqa: E731
    t0 = time.time()
    scores = [kid(model)]
    print(f"round 0: global KID {scores[0]:.5f}", flush=True)

    def on_round(rnd: int, arrays) -> None:
        set_adapter_state(model, arrays.to_torch_state_dict())
        scores.append(kid(model))
        print(f"round {rnd}: global KID {scores[-1]:.5f} ({time.time() - t0:.0f}s)", flush=True)

    federate(cfg, args.num_clients, samples, on_round=on_round)
    print(json.dumps({"set": args.set, "clients_per_round": per_round, "max_steps": cfg.train.max_steps,
                      "global_kid": [round(s, 6) for s in scores]}))


if __name__ == "__main__":
    main()
