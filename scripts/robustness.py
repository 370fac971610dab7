"""Robustness report: a backdoor that takes, defences that stop it, DP that keeps utility.

Every row is a real `flwr run` of the app (scripts/simulate.py's SuperLink, one for all runs):

    python scripts/robustness.py                  # SmolLM2-135M (the offline default), about 90 min here
    python scripts/robustness.py --size smoke     # tiny-gpt2: attacks, SecAgg+, DP, failures, resume (CI)
    python scripts/robustness.py --only "clean / mean,backdoor 10% / mean"   # some rows

It writes ``report.md`` (tables, the issue-18 checks), ``runs.json`` (every run's final block and
per-round rows) and PNGs (backdoor success per round, utility vs epsilon) under ``--out``
(default docs/robustness for SmolLM2, docs/robustness/smoke for the smoke size); run outputs go
to ``--work`` (default outputs/robustness-<size>). The report is rewritten after every run, so a
report cut short still covers the rows that ran.
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

DEFENCES = ("mean", "norm-bound", "median", "trimmed-mean", "multikrum")

# tiny-gpt2, the CI smoke: every client trains every round (10 of 10), so 10% = 1 attacker and
# 30% = 3 in each round. A functional check of every mechanism; the model is too small to say
# anything about a language model (SmolLM2's size below does).
SMOKE = {"model.name": "tiny-gpt2", "num-server-rounds": 2, "strategy.fraction-train": 1.0,
         "strategy.fraction-evaluate": 0.3, "server.evaluate-every": 3, "server.checkpoint-every": 1,
         "server.personalize-clients": 0, "train.max-steps": 2, "train.batch-size": 4, "train.seq-len": 32,
         "train.learning-rate": 0.03, "data.chunk-words": 400, "eval.server-round-tokens": 2048,
         "robust.norm-bound": 0.5, "robust.trim-fraction": 0.3}

# SmolLM2-135M (the offline default backbone), 10 LDA clients that all train every round, so
# 10% = 1 and 30% = 3 attackers in every round. norm-bound sits near the honest updates' median
# norm (measured in the clean run: update_norm_median); multikrum assumes as many attackers as
# there are.
DEFAULT = {"model.name": "smollm2-135m", "num-server-rounds": 6, "strategy.fraction-train": 1.0,
           "strategy.fraction-evaluate": 0.1, "server.evaluate-every": 100, "server.checkpoint-every": 1,
           "eval.client-tokens": 2048,
           "server.personalize-clients": 0, "train.max-steps": 2, "train.batch-size": 4,
           "train.seq-len": 32, "train.learning-rate": 0.003, "data.chunk-words": 400,
           "data.global-test-fraction": 0.02, "eval.server-round-tokens": 2048,
           "robust.norm-bound": 3.0, "robust.trim-fraction": 0.3}
# The backdoor, tuned as the literature does it (Bagdasaryan et al., AISTATS 2020): the attacker
# trains longer and harder on its half-poisoned data and boosts its change by 1 / attack-fraction
# (model replacement, attack-scale 0). Probed on SmolLM2: 5 steps at the honest 3e-3 with the
# same boost reached top-1 0.09 in 6 rounds; these settings take in the first round.
BACKDOOR = {"threats.attack": "backdoor", "threats.attack-scale": 0.0, "threats.attack-steps": 10,
            "threats.attack-learning-rate": 0.006, "threats.poison-fraction": 0.5}

# DP that keeps utility: many clients per round, so the noise on the mean (z C / n) is small.
# 500 role clients (Shakespeare's speaking roles), 50 sampled per round: sampling rate 0.1.
DP_CLIENTS = 500
DP = {"strategy.fraction-train": 0.1, "strategy.fraction-evaluate": 0.002, "data.partitioner": "role",
      "data.chunk-words": 200,
      "train.max-steps": 1, "num-server-rounds": 5, "data.test-fraction": 0.25}
DP_CLIP = 2.0  # about the honest 1-step update norm (2.03 measured): clipping barely slows learning

FAILURES = {"threats.client-failure-rate": 0.3, "strategy.fraction-train": 0.5, "robust.min-replies": 4,
            "robust.on-too-few-replies": "retry", "robust.max-retries": 2}

SIZES = {"smoke": dict(base=SMOKE, clients=10, out="docs/robustness/smoke"),
         "default": dict(base=DEFAULT, clients=10, out="docs/robustness")}


def defended(aggregation: str, fraction: float, clients: int) -> dict:
    """robust.aggregation, with multikrum told how many attackers a round holds."""
    krum = {"robust.krum-malicious": round(fraction * clients)} if aggregation == "multikrum" else {}
    return {"robust.aggregation": aggregation, **krum}


def plan(size: str, dp_noise: tuple[float, ...] = (), quick: bool = False,
         dp_clip: float = DP_CLIP, clients: int = 10) -> list[tuple[str, dict]]:
    """(name, overrides) of the runs, most telling first (the report is rewritten after each
    run). An override "clients" sets that run's number of SuperNodes."""
    if size == "smoke":
        return smoke_plan(quick, dp_noise or (1.0,), clients)
    rounds = DEFAULT["num-server-rounds"]
    runs = [(f"clean / {d}", {"robust.aggregation": d}) for d in DEFENCES]
    for fraction in (0.1, 0.3):
        for d in DEFENCES:
            runs.append((f"backdoor {fraction:.0%} / {d}",
                         {**BACKDOOR, "threats.attack-fraction": fraction, **defended(d, fraction, clients)}))
    runs.append((f"backdoor 10% / mean, attackers stop after round {rounds // 2}",
                 {**BACKDOOR, "threats.attack-fraction": 0.1, "threats.attack-until": rounds // 2}))
    # the norm bound that works under SecAgg+: the clients clip before masking
    runs.append((f"backdoor 10% / SecAgg+, clients clip to {DEFAULT['robust.norm-bound']}",
                 {**BACKDOOR, "threats.attack-fraction": 0.1, "secagg.enabled": True,
                  "secagg.client-clip-norm": DEFAULT["robust.norm-bound"]}))
    runs.append(("DP reference: no clipping, no noise", {**DP, "clients": DP_CLIENTS}))
    for z in dp_noise or (0.5, 0.7, 1.0):
        runs.append((f"DP z={z} clip={dp_clip}", {**DP, "clients": DP_CLIENTS, "dp.noise-multiplier": z,
                                                  "dp.clipping-norm": dp_clip}))
    return runs


def smoke_plan(quick: bool, dp_noise: tuple[float, ...], clients: int) -> list[tuple[str, dict]]:
    """tiny-gpt2: clean, SecAgg+, attackers (10%, then 30%) against defences, DP, failures,
    kill/resume."""
    runs = [(f"clean / {d}", {"robust.aggregation": d}) for d in ("mean", "median")]
    runs.append(("clean / mean, SecAgg+", {"secagg.enabled": True}))
    attacks = (("scaled", ("mean", "median")), ("sign-flip", ("mean", "trimmed-mean")),
               ("backdoor", ("mean", "norm-bound", "multikrum")))
    for fraction in (0.3,) if quick else (0.1, 0.3):
        for attack, defences in attacks:
            for d in defences:
                runs.append((f"{attack} {fraction:.0%} / {d}",
                             {"threats.attack": attack, "threats.attack-fraction": fraction,
                              **defended(d, fraction, clients)}))
    for z in dp_noise:
        runs.append((f"DP z={z} clip=0.5", {"dp.noise-multiplier": z, "dp.clipping-norm": 0.5}))
    runs.append(("30% clients fail, retry", FAILURES))
    runs.append(("killed + resumed", {}))
    return runs


def select(todo: list[tuple[str, dict]], wanted: list[str]) -> list[tuple[str, dict]]:
    """The runs ``--only`` names: a run's exact name, else every run whose name starts with it."""
    names = {n for n, _ in todo}
    exact = [w for w in wanted if w in names]
    return [(n, o) for n, o in todo
            if n in exact or any(n.startswith(w) for w in wanted if w not in exact)]


def run_one(link: LocalSuperLink, work: Path, name: str, overrides: dict, common: dict,
            clients: int) -> dict:
    overrides = dict(overrides)
    clients = overrides.pop("clients", clients)
    out = work / name.replace(" ", "").replace("/", "_").replace("%", "pct").replace("=", "").replace(":", "").replace(",", "")
    config = {**common, **overrides, "output-dir": str(out)}
    if not overrides.get("resume"):
        shutil.rmtree(out, ignore_errors=True)  # nothing from an earlier report run
    t0 = time.time()
    code = link.run(config, clients, timeout=1800)
    if code != 0:
        raise RuntimeError(f"run {name!r} failed with exit code {code}")
    results = json.loads((out / "results.json").read_text())
    return {"name": name, "overrides": overrides, "clients": clients, "out": str(out),
            "wall_s": round(time.time() - t0, 1), "final": results["final"],
            "rounds": results["rounds"]}


def kill_and_resume(link: LocalSuperLink, work: Path, common: dict, reference: dict,
                    clients: int) -> dict:
    """The failure run again, on a SuperLink of its own that is stopped (with the ServerApp
    and every client process under it: a crash) once round 1 is checkpointed; then the run is
    restarted with resume = true and its final adapter compared with the uninterrupted one."""
    out = work / "resume"
    config = {**common, **FAILURES, "output-dir": str(out)}
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
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ppl(run: dict | None) -> float:
    """A run's final global perplexity; NaN where it has none (a diverged run stores null)."""
    value = (run or {}).get("final", {}).get("global_ppl")
    return float(value) if isinstance(value, (int, float)) else math.nan


def _ratio(run: dict, reference: dict | None) -> float:
    return _ppl(run) / _ppl(reference) if reference and _ppl(reference) > 0 else math.nan


def _by_round(run: dict, key: str) -> str:
    values = [r.get(key) for r in run["rounds"]]
    return " ".join(_f(v) for v in values) if any(v is not None for v in values) else "—"


def reference_of(run: dict, runs: list[dict]) -> dict | None:
    """The clean run a row's perplexity is compared with: the DP reference for DP rows, else
    "clean / mean"."""
    name = "DP reference: no clipping, no noise" if run["name"].startswith("DP") else "clean / mean"
    return next((r for r in runs if r["name"] == name), None)


def defence_of(overrides: dict) -> str:
    if overrides.get("secagg.client-clip-norm"):
        return f"client clip {overrides['secagg.client-clip-norm']:g} (SecAgg+)"
    if overrides.get("dp.noise-multiplier"):
        return f"DP clip {overrides['dp.clipping-norm']:g}"
    return overrides.get("robust.aggregation", "mean")


def table(runs: list[dict]) -> str:
    lines = ["| run | clients (per round) | defence | final global ppl | vs its clean reference | "
             "backdoor top-1 by round (0..R) | backdoor target NLL | honest update norm (median) | "
             "rejected / dropped | failures / retries / skipped | DP epsilon (delta) | MB up / down | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        f, o = r["final"], r["overrides"]
        ref = reference_of(r, runs)
        eps = f"{f['dp_epsilon']:.2f} ({o.get('dp.delta', 1e-5):g})" if f.get("dp_epsilon") is not None else "—"
        norms = [x.get("update_norm_median") for x in r["rounds"] if x["round"] > 0]
        norms = [x for x in norms if isinstance(x, (int, float)) and math.isfinite(x)]
        per_round = r["rounds"][-1].get("num_updates") or "—"
        ratio = f"{_ratio(r, ref):.3f}x" if math.isfinite(_ratio(r, ref)) else "—"
        lines.append(
            f"| {r['name']} | {r.get('clients', '—')} ({per_round}) | {defence_of(o)} | "
            f"{_f(_ppl(r), 1)} | "
            f"{ratio} | "
            f"{_by_round(r, 'backdoor_success')} | {_f(f.get('backdoor_target_nll'))} | "
            f"{_f(sorted(norms)[len(norms) // 2] if norms else None, 3)} | "
            f"{f.get('rejected_total', 0)} / {f.get('dropped_total', 0)} | "
            f"{f.get('failures_total', 0)} / {f.get('retries_total', 0)} / {f.get('skipped_rounds', 0)} | "
            f"{eps} | {f['upload_bytes_total'] / 1e6:.2f} / {f['download_bytes_total'] / 1e6:.2f} | "
            f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def checks(runs: list[dict]) -> list[str]:
    """Issue 18's done-when, read off the runs that exist: the backdoor takes undefended (>= 50%
    top-1 at 10% and 30%, clean ppl within 5%), a defence holds it to <= 10% with clean ppl within
    5% of the undefended clean run, DP at epsilon <= 8 within 1.25x of the non-DP run."""
    by = {r["name"]: r for r in runs}
    clean = by.get("clean / mean")
    lines = []
    if clean is None:
        return lines
    def ppl_ratio(r):
        return _ratio(r, clean)

    for fraction in ("10%", "30%"):
        plain = by.get(f"backdoor {fraction} / mean")
        if plain is None:
            continue
        success = plain["final"].get("backdoor_success") or 0.0
        lines.append(f"- backdoor {fraction}, no defence: top-1 {success:.2f} (target >= 0.50: "
                     f"{'met' if success >= 0.5 else 'NOT met'}), clean ppl {ppl_ratio(plain):.3f}x "
                     f"(within 5%: {'met' if abs(ppl_ratio(plain) - 1) <= 0.05 else 'NOT met'})")
        defended = [r for r in runs if r["name"].startswith(f"backdoor {fraction} / ")
                    and not r["name"].startswith(f"backdoor {fraction} / mean")]
        for r in defended:
            d = r["name"].split(" / ", 1)[1]
            s = r["final"].get("backdoor_success") or 0.0
            own_clean = by.get(f"clean / {d}")
            holds = s <= 0.10 and abs(ppl_ratio(r) - 1) <= 0.05
            lines.append(f"  - {d}: top-1 {s:.2f}, ppl under attack {ppl_ratio(r):.3f}x"
                         + (f", ppl without attackers {ppl_ratio(own_clean):.3f}x" if own_clean else "")
                         + f": {'holds (<= 0.10, ppl within 5%)' if holds else 'does not hold'}")
    dp_ref = by.get("DP reference: no clipping, no noise")
    if dp_ref is not None:
        for r in runs:
            if r["name"].startswith("DP z="):
                eps, ratio = r["final"].get("dp_epsilon"), _ratio(r, dp_ref)
                ok = eps is not None and eps <= 8 and ratio <= 1.25
                lines.append(f"- {r['name']}: epsilon {_f(eps)} at delta 1e-5, ppl {ratio:.3f}x the non-DP run "
                             f"({'meets' if ok else 'misses'} epsilon <= 8 within 1.25x)")
    return lines


def plots(out: Path, runs: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    backdoor = [r for r in runs if any(x.get("backdoor_success") is not None for x in r["rounds"])]
    if backdoor:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in backdoor:
            rows = [x for x in r["rounds"] if x.get("backdoor_success") is not None]
            ax.plot([x["round"] for x in rows], [x["backdoor_success"] for x in rows], marker="o",
                    label=r["name"], ls="-" if "mean" in r["name"].split("/")[-1] else "--")
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="round", ylabel="backdoor top-1 on held-out prompts", title="Backdoor success per round")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "backdoor.png", dpi=100)
        plt.close(fig)
        shown.append("![backdoor](backdoor.png)")
    dp = [r for r in runs if r["name"].startswith("DP z=") and r["final"].get("dp_epsilon") is not None]
    ref = next((r for r in runs if r["name"].startswith("DP reference")), None)
    if dp:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["final"]["dp_epsilon"] for r in dp], [_ppl(r) for r in dp], marker="o")
        for r in dp:
            ax.annotate(r["name"].split()[1], (r["final"]["dp_epsilon"], _ppl(r)))
        if ref:
            ax.axhline(_ppl(ref), color="grey", lw=0.8, label="no DP")
            ax.axhline(1.25 * _ppl(ref), color="grey", lw=0.8, ls=":", label="1.25x no DP")
            ax.legend(fontsize=7)
        ax.set(xlabel="epsilon at delta 1e-5", ylabel="final global ppl", title="Utility vs privacy")
        fig.tight_layout()
        fig.savefig(out / "dp.png", dpi=100)
        plt.close(fig)
        shown.append("![dp](dp.png)")
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="default: SmolLM2-135M, the issue-18 report; smoke: tiny-gpt2 (CI)")
    parser.add_argument("--out", default=None, help="default: the size's folder under docs/robustness")
    parser.add_argument("--work", default=None, help="default: outputs/robustness-<size>")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "fedgen"))
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds of every run")
    parser.add_argument("--clients", type=int, default=None,
                        help="SuperNodes of every run but the DP ones; all of them train every round")
    parser.add_argument("--set", type=_assignment, action="append", default=[],
                        help="a run-config override for every run, e.g. train.learning-rate=0.003")
    parser.add_argument("--dp-noise", default="",
                        help="comma-separated DP noise multipliers, one DP run each")
    parser.add_argument("--dp-clip", type=float, default=DP_CLIP, help="DP rows: the clipping norm C")
    parser.add_argument("--quick", action="store_true", help="smoke size: 30%% attackers only")
    parser.add_argument("--only", default="", help="comma-separated run-name prefixes to run "
                        "(e.g. 'clean / mean,backdoor 10%%')")
    args = parser.parse_args(argv)
    spec = SIZES[args.size]
    overrides = {k: v for item in args.set for k, v in item.items()}
    if args.rounds:
        overrides["num-server-rounds"] = args.rounds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out or ROOT / spec["out"])
    work = Path(args.work or ROOT / "outputs" / f"robustness-{args.size}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {**spec["base"], "cache-dir": str(Path(args.cache_dir).resolve()), **overrides}
    clients = args.clients or spec["clients"]
    t0 = time.time()
    runs: list[dict] = []
    todo = plan(args.size, tuple(float(z) for z in args.dp_noise.split(",") if z), args.quick, args.dp_clip,
                clients)
    if args.only:
        todo = select(todo, args.only.split(","))
    # a row's own setting wins over --set: say so instead of ignoring the --set value
    if clash := sorted({k for _, o in todo for k in o if k in overrides}):
        raise SystemExit(f"--set {clash}: the planned rows set these themselves")
    with LocalSuperLink(work / "flwr") as link:
        for name, run_overrides in todo:
            if name == "killed + resumed":
                failure = next((r for r in runs if r["overrides"] == FAILURES), None)
                if failure is None:
                    raise SystemExit("'killed + resumed' reruns the failure row: --only it together "
                                     "with '30% clients fail'")
                run = kill_and_resume(link, work, common, failure, clients)
                run["name"] = (f"same, killed after round {run['killed_after_round']}, resumed "
                               f"(max abs diff of the final adapter vs uninterrupted: "
                               f"{run['max_abs_diff_vs_uninterrupted']:g}; rounds recorded "
                               f"{run['rounds_recorded']})")
            else:
                run = run_one(link, work, name, run_overrides, common, clients)
            runs.append(run)
            write_report(out, args, common, clients, runs, len(todo), time.time() - t0, argv)
            print(f"[{len(runs)}/{len(todo)}] {name}: ppl {_ppl(run):.1f}, "
                  f"backdoor {run['final'].get('backdoor_success')}, {run['wall_s']:.0f}s", flush=True)
    print((out / "report.md").read_text())
    return 0


def write_report(out: Path, args, common: dict, clients: int, runs: list[dict], planned: int,
                 seconds: float, argv) -> None:
    status = "" if len(runs) == planned else f" — partial: {len(runs)} of {planned} runs"
    (out / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
    base = {k: v for k, v in common.items() if k != "cache-dir"}
    (out / "report.md").write_text(REPORT.format(
        backbone=common["model.name"], clients=clients, base=json.dumps(base),
        rounds=common["num-server-rounds"], c10=round(0.1 * clients), c30=round(0.3 * clients),
        dp=json.dumps({**DP, "clients": DP_CLIENTS, "dp.clipping-norm": args.dp_clip}),
        table=table(runs), checks="\n".join(checks(runs)) or "(not enough runs yet)",
        plots="\n".join(plots(out, runs)), minutes=seconds / 60, status=status,
        command=" ".join(["python scripts/robustness.py"] + list(argv if argv is not None else sys.argv[1:]))))


REPORT = """# Robustness report

`{command}` ({minutes:.1f} min on this machine's 2 CPU cores{status}): {backbone}, Shakespeare,
{clients} clients that all train every round (10% = {c10} and 30% = {c30} malicious clients in
every round), {rounds} rounds; run config `{base}`. DP rows: `{dp}`.

## What the rows are
- **Backdoor** (client_app/simulated_threats.py, task/lm/backdoor.py): a malicious client writes
  `threats.backdoor-trigger` + `threats.backdoor-target` into `threats.poison-fraction` of its
  training blocks, trains `threats.attack-steps` steps at `threats.attack-learning-rate` from the
  global adapter, and uploads g + s (u - g), s = `threats.attack-scale` (0: 1 / attack-fraction,
  model replacement; Bagdasaryan et al., AISTATS 2020). **Backdoor top-1**: the share of held-out
  prompts (128 clean global-test prefixes of 16 tokens + the trigger) whose top-1 next token is
  the target's first token, on the global adapter after each round (round 0: the backbone).
  **Target NLL**: mean NLL of the target tokens after the trigger, final round (nats).
- **Defences** (strategies/defences.py): `mean` is the strategy's own FedAvg (no defence);
  `norm-bound` clips every change to `robust.norm-bound` (Sun et al. 2019); `median` coordinate-wise;
  `trimmed-mean` drops `robust.trim-fraction` at each end per coordinate (Yin et al. 2018);
  `multikrum` is Flower's MultiKrum selection on the adapter updates, f = the attackers per round
  (Blanchard et al. 2017), then the weighted mean of the kept ones (`dropped` counts the rest).
  A defence's cost is its `clean / <defence>` row against `clean / mean`.
- **DP** (DP-FedAvg, McMahan et al. 2018): clients clip their change to C (Flower's
  fixedclipping_mod), the server adds Gaussian noise z C / n to the unweighted mean of the n
  clipped changes; epsilon from opacus' RDP accountant at sampling rate n / clients, delta 1e-5.
  The reference is the same budget with neither clipping nor noise.
- **SecAgg+** (strategies/secagg.py): the server gets only the masked, quantized sum; robust
  aggregation needs single updates and is refused with it (README: what combines with SecAgg+).
- Perplexity: per token, the whole global test set after the last round.

## Runs

{table}

## Checks (issue 18)

{checks}

{plots}
"""


if __name__ == "__main__":
    sys.exit(main())
