"""Robustness report: attacks vs defences, DP runs with their epsilon, failures and resume.

Every row is a real `flwr run` of the app (scripts/simulate.py's SuperLink, one for all runs):

    python scripts/robustness.py [--out docs/robustness] [--backbone tiny-gpt2] [--quick]

It writes ``report.md`` (the table) and ``runs.json`` (every run's results.json final block and
per-round rows) under ``--out``; run outputs go to ``--work`` (default outputs/robustness).
A run that loads smollm2-135m must hold the shared lock: ``flock /tmp/fedgen-heavy.lock python
scripts/robustness.py --backbone smollm2-135m``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate import ROOT, LocalSuperLink  # noqa: E402

# Every client trains every round (10 of 10), so 10% = 1 attacker and 30% = 3 in each round.
BASE = {"num-server-rounds": 2, "strategy.fraction-train": 1.0, "strategy.fraction-evaluate": 0.3,
        "server.evaluate-every": 3, "server.checkpoint-every": 1, "server.personalize-clients": 0, "train.max-steps": 2,
        "train.batch-size": 4, "train.seq-len": 32, "train.learning-rate": 0.03, "data.chunk-words": 400,
        "eval.server-round-tokens": 2048, "threats.attack-scale": 10.0, "robust.norm-bound": 0.5, "robust.trim-fraction": 0.3}
NUM_SUPERNODES = 10


FAILURES = {"threats.client-failure-rate": 0.3, "strategy.fraction-train": 0.5, "robust.min-replies": 4,
            "robust.on-too-few-replies": "retry", "robust.max-retries": 2}


def plan(quick: bool, dp_noise: tuple[float, ...] = (1.0,)) -> list[tuple[str, dict]]:
    """(name, overrides) of the runs, most telling first (the report is rewritten after each
    run, so a report cut short still covers most items): clean, SecAgg+, attackers (10%, then
    30%), DP, failures, kill/resume."""
    runs = [(f"clean / {d}", {"robust.aggregation": d}) for d in ("mean", "median")]
    runs.append(("clean / mean, SecAgg+", {"secagg.enabled": True}))
    attacks = (("scaled", ("mean", "median")), ("sign-flip", ("mean", "trimmed-mean")),
               ("backdoor", ("mean", "norm-bound")))
    for fraction in (0.3,) if quick else (0.1, 0.3):
        for attack, defences in attacks:
            for d in defences:
                runs.append((f"{attack} {fraction:.0%} / {d}",
                             {"threats.attack": attack, "threats.attack-fraction": fraction,
                              "robust.aggregation": d}))
    for z in dp_noise:
        runs.append((f"DP z={z} clip=0.5", {"dp.noise-multiplier": z, "dp.clipping-norm": 0.5}))
    runs.append(("30% clients fail, retry", FAILURES))
    runs.append(("killed + resumed", {}))
    return runs


def run_one(link: LocalSuperLink, work: Path, name: str, overrides: dict, common: dict,
            clients: int = NUM_SUPERNODES) -> dict:
    out = work / name.replace(" ", "").replace("/", "_").replace("%", "pct").replace("=", "")
    config = {**BASE, **common, **overrides, "output-dir": str(out)}
    if not overrides.get("resume"):
        shutil.rmtree(out, ignore_errors=True)  # nothing from an earlier report run
    t0 = time.time()
    code = link.run(config, clients, timeout=900)
    if code != 0:
        raise RuntimeError(f"run {name!r} failed with exit code {code}")
    results = json.loads((out / "results.json").read_text())
    return {"name": name, "overrides": overrides, "out": str(out),
            "wall_s": round(time.time() - t0, 1), "final": results["final"],
            "rounds": results["rounds"]}


def kill_and_resume(link: LocalSuperLink, work: Path, common: dict, reference: dict,
                    clients: int = NUM_SUPERNODES) -> dict:
    """The failure run again, on a SuperLink of its own that is stopped (with the ServerApp
    and every client process under it: a crash) once round 1 is checkpointed; then the run is
    restarted with resume = true and its final adapter compared with the uninterrupted one."""
    out = work / "resume"
    config = {**BASE, **common, **FAILURES, "output-dir": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    killed_at = None
    with LocalSuperLink(work / "flwr-killed") as doomed:
        proc = subprocess.Popen(doomed.command(config, clients), env=doomed.env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 900:
            state = out / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= 1:
                killed_at = json.loads(state.read_text())["round"]
                break
            time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=60)
    if killed_at is None:
        raise RuntimeError("the run to kill ended before its round 1 checkpoint")
    resumed = run_one(link, work, "resume", {**FAILURES, "resume": True}, common, clients)
    resumed["overrides"] = {**FAILURES, "resume": True}
    a = load_file(str(Path(reference["out"]) / "global-adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "global-adapter" / "adapter_model.safetensors"))
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    resumed.update(killed_after_round=killed_at, max_abs_diff_vs_uninterrupted=max_diff,
                   rounds_recorded=[r["round"] for r in resumed["rounds"]])
    return resumed


def _assignment(text: str) -> dict:
    """``key=value`` with a TOML value (a bare word is a string)."""
    key, _, value = text.partition("=")
    try:
        return {key.strip(): tomllib.loads(f"v = {value}")["v"]}
    except tomllib.TOMLDecodeError:
        return {key.strip(): value}


def _f(x, digits=2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(runs: list[dict], clean_ppl: float) -> str:
    lines = ["| run | defence | final global ppl | vs clean mean | backdoor top-1 | backdoor target NLL | "
             "rejected | failures / retries / skipped | DP epsilon (delta) | MB up / down | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        f, o = r["final"], r["overrides"]
        eps = f"{f['dp_epsilon']:.2f} ({o.get('dp.delta', 1e-5):g})" if f.get("dp_epsilon") is not None else "—"
        lines.append(
            f"| {r['name']} | {o.get('aggregation', 'mean')} | {_f(f['global_ppl'], 1)} | "
            f"{f['global_ppl'] / clean_ppl:.2f}x | {_f(f.get('backdoor_success'))} | "
            f"{_f(f.get('backdoor_target_nll'))} | {f.get('rejected_total', 0)} | "
            f"{f.get('failures_total', 0)} / {f.get('retries_total', 0)} / {f.get('skipped_rounds', 0)} | "
            f"{eps} | {f['upload_bytes_total'] / 1e6:.2f} / {f['download_bytes_total'] / 1e6:.2f} | "
            f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "robustness"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "robustness"))
    parser.add_argument("--backbone", default="tiny-gpt2")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "fedgen"))
    parser.add_argument("--rounds", type=int, default=BASE["num-server-rounds"],
                        help="federated rounds of every run")
    parser.add_argument("--clients", type=int, default=NUM_SUPERNODES,
                        help="SuperNodes (clients) of every run; all of them train every round")
    parser.add_argument("--set", type=_assignment, action="append", default=[],
                        help="a run-config override for every run, e.g. train.learning-rate=0.003")
    parser.add_argument("--dp-noise", default="1.0",
                        help="comma-separated DP noise multipliers, one DP run each")
    parser.add_argument("--quick", action="store_true", help="30%% attackers only (fewer runs)")
    parser.add_argument("--only", default="", help="comma-separated run-name prefixes to run "
                        "(e.g. '30%% clients fail,killed' for the failure and resume rows)")
    args = parser.parse_args(argv)
    args.set = {k: v for item in args.set for k, v in item.items()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out, work = Path(args.out), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"model.name": args.backbone, "cache-dir": str(Path(args.cache_dir).resolve()),
              "num-server-rounds": args.rounds, **args.set}
    t0 = time.time()
    runs: list[dict] = []
    todo = plan(args.quick, tuple(float(z) for z in args.dp_noise.split(",")))
    if args.only:
        todo = [(n, o) for n, o in todo if any(n.startswith(p) for p in args.only.split(","))]
    with LocalSuperLink(work / "flwr") as link:
        for name, overrides in todo:
            if name == "killed + resumed":
                failure = next(r for r in runs if r["overrides"] == FAILURES)
                run = kill_and_resume(link, work, common, failure, args.clients)
                run["name"] = (f"same, killed after round {run['killed_after_round']}, resumed "
                               f"(max abs diff of the final adapter vs uninterrupted: "
                               f"{run['max_abs_diff_vs_uninterrupted']:g}; rounds recorded "
                               f"{run['rounds_recorded']})")
            else:
                run = run_one(link, work, name, overrides, common, args.clients)
            runs.append(run)
            write_report(out, args, runs, len(todo), time.time() - t0, argv)
    print((out / "report.md").read_text())
    return 0


def write_report(out: Path, args, runs: list[dict], planned: int, seconds: float, argv) -> None:
    clean = next((r for r in runs if r["name"] == "clean / mean"), runs[0])["final"]["global_ppl"]
    status = "" if len(runs) == planned else f" — partial: {len(runs)} of {planned} runs"
    (out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    (out / "report.md").write_text(REPORT.format(
        backbone=args.backbone, clients=args.clients, base=json.dumps({**BASE, **args.set, "num-server-rounds": args.rounds}),
        rounds=args.rounds, c10=round(0.1 * args.clients), c30=round(0.3 * args.clients),
        table=table(runs, clean), minutes=seconds / 60, status=status,
        command=" ".join(["python scripts/robustness.py"] + list(argv or sys.argv[1:]))))


REPORT = """# Robustness report

`{command}` ({minutes:.1f} min on 2 shared CPU cores{status}): {backbone}, Shakespeare (LDA non-IID), {clients}
clients, every client trains every round (so 10% = {c10} and 30% = {c30} malicious clients in
every round), {rounds} rounds; base run config `{base}`.

- Attacks (client_app/simulated_threats.py, task/lm/backdoor.py): `scaled` uploads g + 10 (u - g); `sign-flip` g - 10 (u - g);
  `backdoor` trains on its data with " thou art cursed banana" written into every block, then
  boosts its change 10x (model replacement). Backdoor top-1: share of 32 clean global-test
  prefixes + trigger whose next-token argmax is the target's first token; target NLL: mean NLL
  of the target tokens after the trigger (nats). Both on the final global adapter.
- Defences (strategies/defences.py): `mean` is the strategy's own FedAvg (no defence);
  `norm-bound` clips every change to L2 0.5; `median` coordinate-wise; `trimmed-mean` drops 30%
  at each end per coordinate.
- DP rows: clients clip their change to 0.5 (Flower's fixedclipping_mod), the server adds
  Gaussian noise z * 0.5 / n to the unweighted mean; epsilon from opacus' RDP accountant at
  sampling rate 1.0 (every client every round), delta 1e-5. The utility cost is the ppl column.
- SecAgg+ row (strategies/secagg.py): every round's training runs through Flower's SecAgg+
  (secaggplus_mod + SecAggPlusWorkflow); the server gets only the masked, quantized sum
  (clipping range 1.0, 2**24 grid points). Its cost: the bytes of the four protocol stages
  (masked integer vectors, keys, shares) and their wall time; its ppl vs `clean / mean` is the
  quantization's effect.
- Failure row: 30% of the sampled clients (half of the clients per round) raise in every round; the server
  wants 4 valid replies and retries with clients not asked yet (max 2 retries). Resume row: the
  same run, its SuperLink killed once round 1 is checkpointed, restarted with `resume=true`:
  every round is in results.json (nothing lost) and the final adapter is compared bit for bit.

{table}
"""


if __name__ == "__main__":
    sys.exit(main())
