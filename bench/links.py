"""What a round costs on a device link: payload bytes, transfer seconds over shaped links, compute.

    sudo .venv/bin/python -m bench.links [--backbone smollm2-135m] [--profiles wifi,lte,weak]
        [--curves outputs/suite-compare] [--out docs/deploy/links] [--curves-only]

For each method's payload (fedavg-lora with the fp32 and the int8 uplink, fedavg-full) this
1. serializes the real messages' model payloads as Flower does (``wire_bytes`` of the
   ArrayRecord: arrays, keys and headers; TLS and gRPC framing not included) for the backbone;
2. pushes that many bytes over TCP through each link profile of scripts/netlab.py (a device's
   network namespace behind a ``tbf``-shaped veth; measured, both directions). fedavg-full's
   payload is measured on the fastest profile only and extrapolated to the others by its measured
   share of the nominal rate (the measured lora payloads show how well that holds);
3. times one client's local training on this machine (``train.max-steps`` x batch x seq-len of the
   curve's run config, warm backbone, median of ``--repeats``);
4. round wall time on a link = download + compute + upload (devices train in parallel on their own
   hardware; the server's aggregation is milliseconds); and, with ``--curves`` (a suite output
   folder whose runs hold per-round global perplexities), time to a target global perplexity =
   the first round that reaches it x the round wall time.

Writes ``<out>.json`` (every raw figure) and ``<out>.md`` (the tables). Needs root (namespaces).
``--curves-only`` keeps the measured figures of an existing ``<out>.json`` and recomputes only
the time-to-target table from ``--curves`` (e.g. once a suite run has finished);
``--compute-only`` keeps its payloads and transfers and times the compute again (e.g. on a quiet
machine: a neighbour's load inflates compute, not the link-bound transfers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from strategies.base import train_local
from strategies.records import wire_bytes
from task.adapters import get_adapter_state, get_full_state, shared_full_model, shared_lora_model
from task.compression import encode_update
from task.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from netlab import LINK_PROFILES, NetworkLab, lab_available, measure_transfer  # noqa: E402

METHODS = {  # name -> (curve run in --curves, upload codec, full model)
    "fedavg-lora fp32": ("fedavg-lora-s42", "none", False),
    "fedavg-lora int8 uplink": ("fedavg-lora-s42", "int8", False),
    "fedavg-full": ("fedavg-full-s42", "none", True),
}


def payload_bytes(cfg) -> dict[str, dict[str, int]]:
    """Wire bytes of one client's download (the global model) and upload, per method."""
    received = get_adapter_state(shared_lora_model(cfg))
    trained = {k: v + 1e-3 * torch.randn_like(v) for k, v in received.items()}
    # a steady-state round's global adapter (round 1's is smaller: its zero-initialized B
    # matrices are identical objects that Flower sends once)
    lora_down = wire_bytes(ArrayRecord({k: v + 1e-3 for k, v in trained.items()}))
    int8, _ = encode_update(trained, received, "int8", seed=0)
    out = {"fedavg-lora fp32": {"down": lora_down, "up": wire_bytes(ArrayRecord(trained))},
           "fedavg-lora int8 uplink": {"down": lora_down, "up": wire_bytes(ArrayRecord(int8))}}
    full = wire_bytes(ArrayRecord(get_full_state(shared_full_model(cfg), copy=False)))
    out["fedavg-full"] = {"down": full, "up": full}
    return out


def compute_seconds(cfg, full_model: bool, repeats: int) -> float:
    """Median seconds of one client's local training (the run config's budget), warm."""
    model = shared_full_model(cfg) if full_model else shared_lora_model(cfg)
    vocab = model.config.vocab_size
    blocks = torch.randint(0, vocab, (cfg.train.max_steps * cfg.train.batch_size, cfg.train.seq_len),
                           generator=torch.Generator().manual_seed(0))
    train_local(cfg, model, blocks, seed=0, full_model=full_model)  # warm-up (allocations, kernels)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        train_local(cfg, model, blocks, seed=i + 1, full_model=full_model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transfers(sizes: dict[str, dict[str, int]], profiles: list[str]) -> dict:
    """Measured seconds per method, profile and direction (fedavg-full: fastest profile only)."""
    fastest = max(profiles, key=lambda p: LINK_PROFILES[p].up_mbit)
    out: dict = {}
    with NetworkLab("bench", len(profiles), links=profiles) as lab:
        for i, profile in enumerate(profiles):
            for method, size in sizes.items():
                if method == "fedavg-full" and profile != fastest:
                    continue
                down = measure_transfer(lab, "link", i, size["down"])
                up = measure_transfer(lab, i, "link", size["up"])
                out.setdefault(method, {})[profile] = {"down_s": down, "up_s": up, "measured": True}
                print(f"  {method} on {profile}: down {down:.2f}s, up {up:.2f}s", flush=True)
    full = out.get("fedavg-full", {}).get(fastest)
    if full:  # the measured share of the nominal rate, applied to the slower links
        p = LINK_PROFILES[fastest]
        eff_down = sizes["fedavg-full"]["down"] * 8 / (p.down_mbit * 1e6) / full["down_s"]
        eff_up = sizes["fedavg-full"]["up"] * 8 / (p.up_mbit * 1e6) / full["up_s"]
        for profile in profiles:
            if profile != fastest:
                q = LINK_PROFILES[profile]
                out["fedavg-full"][profile] = {
                    "down_s": sizes["fedavg-full"]["down"] * 8 / (q.down_mbit * 1e6) / eff_down,
                    "up_s": sizes["fedavg-full"]["up"] * 8 / (q.up_mbit * 1e6) / eff_up,
                    "measured": False}
    return out


def rounds_to(curve: list[dict], target: float) -> int | None:
    for r in curve:
        if r["round"] > 0 and r.get("global_ppl") is not None and r["global_ppl"] <= target:
            return r["round"]
    return None


def markdown(res: dict) -> str:
    lines = [f"# Rounds on device links ({res['backbone']})", "",
             f"Measured {res['measured_at']} on {res['machine']}. Payloads: one client's model "
             "payload as Flower serializes it (wire bytes of the ArrayRecord; TLS/gRPC framing not "
             "included). Transfers: that many bytes over TCP through scripts/netlab.py's shaped veth "
             "links (tbf; no added delay or loss: this kernel has no netem), measured unless marked "
             "'extrapolated' (fedavg-full off the fastest link: its measured share of the nominal rate). "
             f"Compute: one client's local training, {res['budget']}, warm, median of "
             f"{res['repeats']}, on this 2-core CPU (a device's own compute differs; the table "
             "shows how much of a round is the link).", "",
             "| method | download | upload | " + " | ".join(
                 f"{p} ({LINK_PROFILES[p].up_mbit:g} up / {LINK_PROFILES[p].down_mbit:g} down Mbit/s): "
                 "down + compute + up = round" for p in res["profiles"]) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in res["profiles"]) + " |"]
    for method, row in res["methods"].items():
        cells = []
        for p in res["profiles"]:
            t = row["links"][p]
            mark = "" if t["measured"] else " (extrapolated)"
            cells.append(f"{t['down_s']:.2f} + {row['compute_s']:.2f} + {t['up_s']:.2f} = "
                         f"**{t['round_s']:.1f} s**{mark}")
        lines.append(f"| {method} | {row['down_bytes'] / 1e6:,.2f} MB | {row['up_bytes'] / 1e6:,.2f} MB | "
                     + " | ".join(cells) + " |")
    if res.get("target"):
        lines += ["", f"## Time to global perplexity <= {res['target']['ppl']:.1f}", "",
                  f"Rounds to the target from {res['target']['source']} (the first round whose "
                  "per-round global perplexity reaches it), times the round wall time above. The "
                  "int8 uplink run is assumed to take fedavg-lora's rounds (the codec's unbiased "
                  "rounding: docs/bench for its measured effect on the curve).", "",
                  "| method | rounds | " + " | ".join(res["profiles"]) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in res["profiles"]) + " |"]
        for method, row in res["methods"].items():
            if "curve_rounds" not in row:
                lines.append(f"| {method} | no curve in {res['target']['source']} | "
                             + " | ".join("n/a" for _ in res["profiles"]) + " |")
                continue
            r = row.get("rounds_to_target")
            cells = [f"{r * row['links'][p]['round_s'] / 60:.1f} min" if r else "not reached"
                     for p in res["profiles"]]
            lines.append(f"| {method} | {r if r else 'not reached in ' + str(row.get('curve_rounds'))} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--profiles", default="wifi,lte,weak")
    parser.add_argument("--curves", type=Path, default=None,
                        help="a suite output folder with fedavg-lora-s42 / fedavg-full-s42 runs")
    parser.add_argument("--target-ppl", type=float, default=None,
                        help="default: 1.25 x fedavg-lora's final global perplexity in --curves")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "deploy" / "links")
    parser.add_argument("--curves-only", action="store_true",
                        help="recompute the time-to-target table of an existing <out>.json")
    parser.add_argument("--compute-only", action="store_true",
                        help="time the compute again, keeping an existing <out>.json's transfers")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # leave the lab's namespaces clean
    curves = {}
    for method, (run, _, _) in METHODS.items():
        path = args.curves / run / "results.json" if args.curves else None
        if path and path.exists():
            curves[method] = json.loads(path.read_text())
    base = curves.get("fedavg-lora fp32")
    if args.curves_only:
        res = json.loads(args.out.with_suffix(".json").read_text())
        add_targets(res, curves, args)
        return write(res, args.out)
    why = lab_available()
    if why and not args.compute_only:
        raise SystemExit(f"bench.links {why}")
    profiles = args.profiles.split(",")
    overrides = {"model.name": args.backbone}
    if base:  # the curve's own local budget, so that compute matches the rounds it counts
        overrides.update({k: base["config"][k] for k in ("train.max-steps", "train.batch-size", "train.seq-len")})
    else:
        overrides.update({"train.max-steps": 2, "train.batch-size": 8, "train.seq-len": 32})
    cfg = RunConfig.from_run_config(overrides)
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.compute_only else None
    print("payloads ...", flush=True)
    sizes = ({m: {"down": r["down_bytes"], "up": r["up_bytes"]} for m, r in previous["methods"].items()}
             if previous else payload_bytes(cfg))
    print("compute ...", flush=True)
    compute = {m: compute_seconds(cfg, full, args.repeats) for m, (_, _, full) in METHODS.items()
               if m != "fedavg-lora int8 uplink"}
    compute["fedavg-lora int8 uplink"] = compute["fedavg-lora fp32"]
    load = os.getloadavg()[0]  # a neighbour's load inflates compute (not the link-bound transfers)
    print(f"  {compute}\ntransfers ...", flush=True)
    if previous:
        profiles = previous["profiles"]
    links = ({m: r["links"] for m, r in previous["methods"].items()} if previous
             else transfers(sizes, profiles))
    res = {"backbone": args.backbone, "profiles": profiles, "repeats": args.repeats,
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, load average {load:.1f} "
                      "while computing",
           "budget": f"{cfg.train.max_steps} steps x batch {cfg.train.batch_size} x seq-len {cfg.train.seq_len}",
           "methods": {}}
    for method in METHODS:
        row = {"down_bytes": sizes[method]["down"], "up_bytes": sizes[method]["up"],
               "compute_s": compute[method], "links": links[method]}
        for t in row["links"].values():
            t["round_s"] = t["down_s"] + compute[method] + t["up_s"]
        res["methods"][method] = row
    add_targets(res, curves, args)
    return write(res, args.out)


def add_targets(res: dict, curves: dict, args) -> None:
    """Rounds to the target perplexity per method, from the suite's curves (where they exist)."""
    base = curves.get("fedavg-lora fp32")
    if not base:
        return
    target = args.target_ppl or round(1.25 * base["final"]["global_ppl"], 1)
    res["target"] = {"ppl": target, "source": f"{args.curves.name} (seed 42)"}
    for method, row in res["methods"].items():
        curve = curves.get(method) or (base if "lora" in method else None)
        row.pop("rounds_to_target", None)
        if curve:
            row["rounds_to_target"] = rounds_to(curve["rounds"], target)
            row["curve_rounds"] = curve["rounds"][-1]["round"]


def write(res: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
