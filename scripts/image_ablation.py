"""Kept vs fresh client discriminators on the image task, federated in one process.

Runs the real ClientApp ``train`` handler and the server strategy (bench/driver.py: a simulation
round minus Ray and gRPC) over the same seeded client samples, once per setting, and prints the
global FID after every round. This is how docs/image/report.md's ablation was measured:

    python scripts/image_ablation.py conf/image.toml --rounds 4
    python scripts/image_ablation.py conf/image.toml --rounds 4 --set gan-keep-discriminator=false
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.driver import federate  # noqa: E402
from task.config import RunConfig  # noqa: E402
from task.image_data import global_test_rows, load_images  # noqa: E402
from task.image_train import RowsFid  # noqa: E402
from task.model import set_adapter_state, shared_lora_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("conf", help="a conf/*.toml with task = 'image'")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=TOML",
                        help="run-config overrides, e.g. gan-keep-discriminator=false")
    args = parser.parse_args()
    run_config = tomllib.loads(Path(args.conf).read_text())
    for item in args.set:
        run_config.update(tomllib.loads(item))
    run_config.setdefault("cache-dir", str(ROOT / ".cache" / "fedgen"))
    with tempfile.TemporaryDirectory(prefix="image-ablation-") as out:  # the clients' kept state
        run_config["output-dir"] = out
        ablate(RunConfig.from_run_config(run_config), args)


def ablate(cfg: RunConfig, args: argparse.Namespace) -> None:
    if cfg.task != "image":
        raise SystemExit(f"{args.conf}: task must be 'image'")
    per_round = max(1, int(args.num_clients * cfg.fraction_train))
    rng = np.random.default_rng(cfg.seed)
    samples = [sorted(rng.choice(args.num_clients, per_round, replace=False).tolist())
               for _ in range(args.rounds)]
    model = shared_lora_model(cfg)
    fid = RowsFid(global_test_rows(cfg), load_images(cfg).channels, cfg.seed)
    t0 = time.time()
    scores = [fid(model)]
    print(f"round 0: global FID {scores[0]:.2f}", flush=True)

    def on_round(rnd: int, arrays) -> None:
        set_adapter_state(model, arrays.to_torch_state_dict())
        scores.append(fid(model))
        print(f"round {rnd}: global FID {scores[-1]:.2f} ({time.time() - t0:.0f}s)", flush=True)

    federate(cfg, args.num_clients, samples, on_round=on_round)
    print(json.dumps({"set": args.set, "clients_per_round": per_round, "max_steps": cfg.max_steps,
                      "global_fid": [round(s, 2) for s in scores]}))


if __name__ == "__main__":
    main()
