"""Image-task training settings compared in one process: the global generator's KID per round.

Runs the real ClientApp ``train`` handler and the server strategy (bench/driver.py: a simulation
round minus Ray and gRPC) over the same seeded client samples, and scores the global generator
(KID, its std over subsets, conditioning accuracy) at the chosen rounds. Round 0 is the
pre-trained backbone. ``--ema`` also scores exponential moving averages of the global adapter
over rounds, taken after the fact (clients always train from the raw aggregate, so one run gives
every decay); ``--raw-backbone`` scores the pre-training's raw (non-EMA) generator.

    python scripts/image_ablation.py conf/image.toml --rounds 4
    python scripts/image_ablation.py conf/image.toml --rounds 4 --set image.keep-discriminator=false
    # how docs/image/backbone-gap.md was measured (KID of 1,000 images at rounds 4 and 8):
    python scripts/image_ablation.py conf/image.toml --rounds 8 --score-rounds 4,8 --kid-images 1000 \
        --ema 0.5,0.75 --polyak --raw-backbone
    python scripts/image_ablation.py conf/image.toml --rounds 8 --score-rounds 4,8 --kid-images 1000 \
        --set train.learning-rate=0.0001

Lines starting with ``RESULT`` are JSON, one per score, for a report to collect.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.driver import federate  # noqa: E402
from simulate import merge_run_config  # noqa: E402
from task import get_task  # noqa: E402
from task.adapters import initial_adapter_state, set_adapter_state, shared_lora_model  # noqa: E402
from task.config import RunConfig  # noqa: E402
from task.image.data import load_images  # noqa: E402
from task.image.model import build_generator  # noqa: E402
from task.image.train import backbone_dir  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("conf", help="a conf/*.toml with task = 'image'")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--score-rounds", default="", help="comma-separated rounds to score (default: all)")
    parser.add_argument("--kid-images", type=int, default=0,
                        help="score with KID of this many images and accuracy (the per-round scope) "
                             "instead of the final scope (KID and FID at image.fid-images, costlier)")
    parser.add_argument("--ema", default="", help="comma-separated decays per round of a post-hoc EMA "
                                                  "of the global adapter (from the backbone), scored at the last round")
    parser.add_argument("--polyak", action="store_true",
                        help="also score the uniform average of the global adapters of rounds 1..last")
    parser.add_argument("--raw-backbone", action="store_true",
                        help="also score the pre-training's raw (non-EMA) generator")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=TOML",
                        help="run-config overrides, e.g. image.keep-discriminator=false")
    args = parser.parse_args(argv)
    try:
        decays = [float(d) for d in args.ema.split(",") if d]
        scored = [int(r) for r in args.score_rounds.split(",") if r]
    except ValueError as err:
        parser.error(f"--ema / --score-rounds: {err}")
    if bad := [d for d in decays if not 0.0 <= d < 1.0]:
        parser.error(f"--ema: decays must be in [0, 1), not {bad}")
    if bad := [r for r in scored if not 0 <= r <= args.rounds]:
        parser.error(f"--score-rounds: {bad} not in 0..{args.rounds} (--rounds)")
    extra = [f"image.round-kid-images={args.kid_images}"] if args.kid_images else []
    run_config = merge_run_config([f"cache-dir='{ROOT / '.cache' / 'fedgen'}'", args.conf, *extra, *args.set])
    with tempfile.TemporaryDirectory(prefix="image-ablation-") as out:  # the clients' kept state
        run_config["output-dir"] = out
        ablate(RunConfig.from_run_config(run_config), args)


def ema_states(states: list[dict], decay: float) -> dict:
    """decay * ema + (1 - decay) * state_r over rounds r = 1.. , starting from round 0's state
    (LoRA A and B averaged each on its own, as FedAvg averages them)."""
    ema = {k: v.clone() for k, v in states[0].items()}
    for state in states[1:]:
        for k in ema:
            ema[k].lerp_(state[k], 1.0 - decay)
    return ema


def ablate(cfg: RunConfig, args: argparse.Namespace) -> None:
    task = get_task(cfg)
    if task.caps.metric != "kid":
        raise SystemExit(f"{args.conf}: an image-task config (KID) is needed")
    per_round = max(1, int(args.num_clients * cfg.strategy.fraction_train))
    rng = np.random.default_rng(cfg.seed)
    samples = [sorted(rng.choice(args.num_clients, per_round, replace=False).tolist())
               for _ in range(args.rounds)]
    scored = {int(r) for r in args.score_rounds.split(",") if r} or set(range(args.rounds + 1))
    model = shared_lora_model(cfg)
    evaluate = task.evaluator(cfg, task.global_test_data(cfg), seed=cfg.seed,
                              scope="round" if args.kid_images else "whole")
    t0 = time.time()

    def report(name: str, rnd: int, net) -> None:
        figures = task.figures([{f"global-{k}": v for k, v in evaluate(net).items()}], "global")
        fid = figures.get("fid")  # measured in the final scope only (NaN or absent otherwise)
        row = {"set": args.set, "model": name, "round": rnd, "kid": figures["kid"],
               "kid_std": figures["kid_std"], "accuracy": figures.get("accuracy"),
               "fid": fid if isinstance(fid, float) and math.isfinite(fid) else None,
               "elapsed_s": round(time.time() - t0)}
        print("RESULT " + json.dumps(row), flush=True)

    if args.raw_backbone:
        data = load_images(cfg)
        raw = build_generator(cfg, data.num_classes, data.channels)
        raw.load_state_dict(torch.load(backbone_dir(cfg) / "generator-raw.pt", weights_only=True))
        report("pretrain-raw-generator", 0, raw)
    states = [{k: v.clone() for k, v in initial_adapter_state(cfg).items()}]
    set_adapter_state(model, states[0])
    if 0 in scored:
        report("global", 0, model)

    def on_round(rnd: int, arrays) -> None:
        states.append({k: v.clone() for k, v in arrays.to_torch_state_dict().items()})
        print(f"round {rnd} trained ({time.time() - t0:.0f}s)", flush=True)
        if rnd in scored:
            set_adapter_state(model, states[-1])
            report("global", rnd, model)

    stats = federate(cfg, args.num_clients, samples, on_round=on_round)
    print("RESULT " + json.dumps({"set": args.set, "model": "cost", "rounds": args.rounds,
                                  "adapter_params": task.parameter_counts(model)[0],
                                  "upload_bytes_per_round": sum(stats["upload_bytes"]) / args.rounds,
                                  "train_s": round(sum(stats["client_s"]) + sum(stats["server_s"]), 1)}),
          flush=True)
    averages = {f"ema-{d}": ema_states(states, float(d)) for d in args.ema.split(",") if d}
    if args.polyak:
        averages["polyak"] = {k: torch.stack([s[k] for s in states[1:]]).mean(0) for k in states[0]}
    for name, state in averages.items():
        set_adapter_state(model, state)
        report(name, args.rounds, model)


if __name__ == "__main__":
    main()
