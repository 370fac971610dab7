"""The paper's comparison in one command: every method, the personalization protocol and the two
ablations (LoRA rank; local epochs), each a real `flwr run`, then report.md + PNGs.

    python scripts/suite.py --size quick      # SmolLM2 + Shakespeare, under 45 min on 2 CPU cores
    python scripts/suite.py --compare --sweep # issue 15's table: 6 methods x 3 seeds, 500 small clients (~90 min)
    python scripts/suite.py --size paper      # the paper's scale (a GPU machine)
    python scripts/suite.py --size tiny       # tiny-gpt2, a few minutes (CI)
    python scripts/suite.py --report-only --out outputs/suite-quick
    # exact / heterogeneous-rank LoRA aggregation, with a rank-mix run beside each uniform one:
    python scripts/suite.py --quick --methods fedavg-lora,ffa-lora,fedex-lora,flora,fedsa-lora \
        --no-ablations --rank-mix 2:0.5,8:0.3,16:0.2 --out outputs/suite-aggregation

Finished runs (results.json with a "final" section) are kept and not run again, so an
interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from simulate import LocalSuperLink, merge_run_config  # noqa: E402

sys.path.insert(0, str(ROOT))
from task.config import RunConfig  # noqa: E402
from task.results import plot_gains  # noqa: E402

METHODS = ["centralized-full", "centralized-lora", "fedavg-lora", "ditto", "fedper", "fedavg-full",
           "fedprox", "fedadam", "local-only"]
# Exact and heterogeneous-rank LoRA aggregation (issue 8); with --rank-mix, each of HET_METHODS
# also runs with the mix ("<method>-mix", lora.rank = the mix's largest rank, same alpha / r).
AGGREGATION_METHODS = ["fedavg-lora", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "hetlora"]
HET_METHODS = ["hetlora", "flora"]
# Issue 15's table: the method, its federated baselines, and the centralized upper bound.
COMPARE_METHODS = ["fedavg-lora", "fedavg-full", "fedper", "ditto", "local-only", "centralized-lora"]
PAPER_PTB = {"centralized-full": 75.4, "centralized-lora": 78.9, "fedavg-lora": 85.2,
             "ditto": 94.6, "fedper": 98.4, "fedavg-full": 115.7, "local-only": 142.3}

# Each size: clients, the base run config, which methods, ranks and local epochs.
# quick and tiny count an "epoch" as steps_per_epoch optimizer steps (train.max-steps = E x that; the
# clients' real epochs would take hours on a CPU): the epoch ablation measures E times more local
# work per round, from its own E=1 run.
SIZES = {
    "tiny": dict(clients=6, methods=["centralized-lora", "fedavg-lora", "local-only"],
                 ranks=[2, 8], epochs=[1, 2], steps_per_epoch=1, config={
                     "model.name": "tiny-gpt2", "num-server-rounds": 2, "strategy.fraction-train": 0.5,
                     "strategy.fraction-evaluate": 0.5, "server.evaluate-every": 2, "train.max-steps": 2,
                     "train.seq-len": 32, "data.chunk-words": 400, "train.learning-rate": 0.01,
                     "eval.server-round-tokens": 512, "eval.client-tokens": 1024,
                     "server.personalize-clients": 3, "server.personalize-max-steps": 4,
                     "server.personalize-checks": 2, "server.personalize-validation-cap": 16,
                     "data.global-test-fraction": 0.01}),
    "quick": dict(clients=15, methods=METHODS, ranks=[2, 4, 8, 16, 32], epochs=[1, 2, 5, 10, 20],
                  steps_per_epoch=1, config={
                      "num-server-rounds": 3, "strategy.fraction-train": 0.2, "strategy.fraction-evaluate": 0.2,
                      "server.evaluate-every": 3, "train.max-steps": 2, "train.seq-len": 32,
                      "eval.server-round-tokens": 4096,
                      "server.personalize-clients": 5}),
    # The aggregation comparison on SmolLM2 when the machine is shared: 6 clients, 3 per round,
    # 2 rounds (the fewest that show flora's downlink growth), no ablations.
    "compact": dict(clients=6, methods=AGGREGATION_METHODS[:5], ranks=[], epochs=[],
                    steps_per_epoch=1, config={
                        "num-server-rounds": 2, "strategy.fraction-train": 0.5, "strategy.fraction-evaluate": 0.5,
                        "server.evaluate-every": 2, "train.max-steps": 2, "train.seq-len": 32, "eval.server-round-tokens": 512,
                        "server.personalize-clients": 3}),
    # Issue 15's method table on this machine (2 CPU cores, 3 seeds): many small devices (500
    # clients: Shakespeare's 500 speaking roles with the most words, LEAF's natural split), 5 per
    # round, 10 rounds, so that the protocol's full local epoch on 20 clients fits. The role split
    # because the sweep (--sweep) measured it: a client's own voice is what a personal adapter can
    # learn (8.2% gain), while LDA topics of Shakespeare carry little of it (1.5% at alpha 0.1,
    # none at 0.5). The global figure reads the whole global test set (1% of the documents
    # here); the per-round curve a 2k-token subset.
    "compare": dict(clients=500, methods=COMPARE_METHODS, ranks=[], epochs=[], steps_per_epoch=1,
                    seeds=[42, 43, 44], config={
                        "num-server-rounds": 10, "strategy.fraction-train": 0.01,
                        "strategy.fraction-evaluate": 0.01, "server.evaluate-every": 5,
                        "train.max-steps": 2, "train.seq-len": 32, "data.partitioner": "role",
                        "data.dirichlet-alpha": 0.1,
                        "data.global-test-fraction": 0.01, "data.test-fraction": 0.25,
                        "eval.server-round-tokens": 2048, "server.personalize-clients": 20,
                        "server.personalize-checks": 4}),
    "paper": dict(clients=100, methods=METHODS, ranks=[2, 4, 8, 16, 32], epochs=[1, 2, 5, 10, 20],
                  steps_per_epoch=0, config={
                      "num-server-rounds": 100, "strategy.fraction-train": 0.1, "strategy.fraction-evaluate": 0.1,
                      "server.evaluate-every": 10, "train.max-steps": 0, "train.local-epochs": 5, "train.batch-size": 32,
                      "train.seq-len": 128, "eval.server-round-tokens": 0,
                      "server.personalize-clients": 100}),
}


def ablation_run(size: str, key: str, value: int) -> str:
    """The run that holds one ablation point; the base point reuses the fedavg-lora run when
    that run has exactly this setting."""
    spec = SIZES[size]
    base = "fedavg-lora" in spec["methods"]
    if key == "rank" and value == 8 and base:
        return "fedavg-lora"
    if key == "epochs" and value == 1 and base and not spec["steps_per_epoch"]:
        return "fedavg-lora"
    return f"{key}-{value}"


# Non-IID strength (--sweep): fedavg-lora and its personalization gain at each partition.
LDA = {"data.partitioner": "lda-dirichlet"}
SWEEP = [("alpha-0.1", {**LDA, "data.dirichlet-alpha": 0.1}), ("alpha-0.5", {**LDA, "data.dirichlet-alpha": 0.5}),
         ("alpha-1.0", {**LDA, "data.dirichlet-alpha": 1.0}), ("role", {"data.partitioner": "role"})]


def plan(size: str, methods: list[str] | None = None, ablations: bool = True,
         rank_mix: str = "", sweep: bool = False, seeds: list[int] | None = None) -> list[tuple[str, dict]]:
    """(run name, run-config overrides) for every run of the suite: the size's methods (or
    ``methods``; with several ``seeds`` one run per seed, "<method>-s<seed>"), the rank-mix
    runs, the non-IID sweep, then the ablations."""
    spec = SIZES[size]
    runs = []
    # seed by seed: a suite stopped early still has every method at its first seeds
    for s in seeds or [None]:
        runs += [(seeded_name(m, s, seeds), {"strategy.name": m, **({"seed": s} if seeds else {})})
                 for m in methods or spec["methods"]]
    if sweep:
        runs += [(f"sweep-{name}", {"strategy.name": "fedavg-lora", **o}) for name, o in SWEEP]
    if rank_mix:
        top = max(int(item.split(":")[0]) for item in rank_mix.split(","))
        runs += [(f"{m}-mix", {"strategy.name": m, "lora.rank-mix": rank_mix, "lora.rank": top,
                               "lora.alpha": 2.0 * top}) for m in HET_METHODS]
    if not ablations:
        return runs
    # Ablation runs skip the personalization protocol: they compare global perplexity and bytes.
    ablation = {"strategy.name": "fedavg-lora", "server.personalize-clients": 0}
    for r in spec["ranks"]:
        if ablation_run(size, "rank", r) != "fedavg-lora":
            runs.append((f"rank-{r}", {**ablation, "lora.rank": r, "lora.alpha": 2.0 * r}))
    for e in spec["epochs"]:
        if ablation_run(size, "epochs", e) != "fedavg-lora":
            extra = {"train.max-steps": e * spec["steps_per_epoch"]} if spec["steps_per_epoch"] else {}
            runs.append((f"epochs-{e}", {**ablation, "train.local-epochs": e, **extra}))
    return runs


def seeded_name(method: str, seed: int | None, seeds: list[int] | None) -> str:
    return f"{method}-s{seed}" if seeds and len(seeds) > 1 else method


def results_of(out: Path, name: str) -> dict | None:
    path = out / name / "results.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("final") else None


def run_suite(size: str, out: Path, cache: Path, timeout: float | None, **selection) -> None:
    spec = SIZES[size]
    runs = plan(size, **selection)
    # a run whose whole config equals an earlier one's (e.g. the sweep point at the size's own
    # alpha) is that run: linked, not run again
    first: dict[str, str] = {}
    for name, overrides in runs:
        key = json.dumps(RunConfig.from_run_config({**spec["config"], **overrides}).flat(), sort_keys=True)
        if first.setdefault(key, name) != name and not (out / name).exists() and not (out / name).is_symlink():
            (out / name).symlink_to(first[key])
    run_all(f"suite {size}", out, cache, timeout, [(n, o) for n, o in runs if not (out / n).is_symlink()],
            spec["config"], spec["clients"])


def run_all(title: str, out: Path, cache: Path, timeout: float | None, runs: list[tuple[str, dict]],
            base: dict, clients: int) -> None:
    """Each unfinished run (``out/<name>``, config ``base`` + its overrides) as a real `flwr run`
    on one local SuperLink, in order; a failed run stops the suite, naming it."""
    todo = [(n, o) for n, o in runs if results_of(out, n) is None]
    print(f"{title}: {len(runs) - len(todo)} runs done, {len(todo)} to run", flush=True)
    if not todo:
        return
    with LocalSuperLink(out / ".flwr") as link:
        for i, (name, overrides) in enumerate(todo, 1):
            t0 = time.time()
            config = {**base, **overrides, "output-dir": str(out / name), "cache-dir": str(cache)}
            rc = link.run(config, clients, timeout)
            ok = results_of(out, name) is not None
            print(f"[{i}/{len(todo)}] {name}: {'ok' if ok else f'FAILED (rc {rc})'} "
                  f"in {time.time() - t0:.0f}s", flush=True)
            if not ok:
                raise SystemExit(f"run {name} failed; see the log above")


# ------------------------------------------------------------------------------ report
def _fmt(v, digits=1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _p_value(p) -> str:
    """A p-value readable at any size: 0.0123, or 1.9e-06 below 1e-3 (never "0.0000")."""
    return _fmt(p, 4) if p is None or not math.isfinite(p) or p >= 1e-3 else f"{p:.2g}"


def _rounds_to(results: dict, target: float) -> str:
    for r in results["rounds"]:
        if r["global_ppl"] is not None and r["global_ppl"] <= target:
            return str(r["round"])
    return f"> {results['rounds'][-1]['round']}"


def _mean_std(values: list, digits: int = 1) -> str:
    """"mean ± std" over seeds (sample std), or the one value; n/a when any is missing."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return "n/a"
    if len(values) == 1:
        return _fmt(values[0], digits)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mb(b) -> str:
    return f"{b / 1e6:,.2f} MB"


def report(size: str, out: Path, target: float | None = None, **selection) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = SIZES[size]
    runs = {name: results_of(out, name) for name, _ in plan(size, **selection)}
    seeds = selection.get("seeds") or [None]
    methods = [n for n, o in plan(size, **{**selection, "ablations": False, "sweep": False,
                                           "seeds": None})]
    seeded = {seeded_name(m, s, seeds) for m in methods for s in seeds}
    # a method may miss some of its seeds (the table says over how many); any other run is needed
    missing = [n for n, r in runs.items() if r is None]
    if [n for n in missing if n not in seeded]:
        raise SystemExit(f"runs without results: {[n for n in missing if n not in seeded]}")
    # every finished seed's run of a method; the sections below the results table show the first's
    by_seed = {m: [runs[n] for n in (seeded_name(m, s, seeds) for s in seeds) if runs.get(n)] for m in methods}
    if [m for m in methods if not by_seed[m]]:
        raise SystemExit(f"methods without any finished run: {[m for m in methods if not by_seed[m]]}")
    for n in missing:
        del runs[n]
    runs.update({m: by_seed[m][0] for m in methods})
    base = runs["fedavg-lora"] if "fedavg-lora" in runs else next(iter(runs.values()))
    target = target or round(1.25 * base["final"]["global_ppl"], 1)
    cfg = base["config"]
    lines = [f"# FedGen-Edge comparison ({size})", "",
             f"Backbone `{base['backbone']}`, dataset `{base['dataset']}` partitioned "
             f"`{base['partitioner']}`, {base['num_clients']} clients, "
             f"{base['clients_per_round']} per round, {base['num_rounds']} rounds, "
             f"max-steps {cfg['train.max-steps']} x batch {cfg['train.batch-size']} x seq-len {cfg['train.seq-len']} "
             f"per client and round. Perplexity is per token (word-level in the protocol columns: "
             f"the same NLL over the PTB words and line ends); the global figure is the whole global "
             f"test set ({base['final'].get('global_test_tokens', 0):,} tokens, "
             f"{base['final'].get('global_test_words', 0):,} words) after the last round, the curve a "
             f"fixed subset of {base.get('round_eval_tokens', 0):,} tokens; local perplexities come from "
             f"the personalization protocol ({base['final'].get('protocol_clients')} sampled clients, "
             "their whole local tests: one full epoch from the final model at the protocol's learning "
             "rate, the step count chosen on a validation share of their training data). "
             "Upload bytes are exact serialized model payloads.", "",
             "## Results", "",
             (f"Seeds {', '.join(map(str, seeds))}: each figure is the mean ± standard deviation "
              "over them (Wilcoxon p: the largest)." if len(seeds) > 1 else f"Seed {cfg['seed']}."), "",
             "| method | seeds | global ppl | global word ppl | local ppl (global model) | local ppl (personalized) | "
             "local word ppl (global / personalized) | clients improved | mean gain | Wilcoxon p | "
             f"uploaded (total) | rounds to ppl <= {target} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        finals = [r["final"] for r in by_seed[m]]

        def ms(key: str, scale: float = 1.0, digits: int = 1) -> str:
            return _mean_std([scale * f[key] if f.get(key) is not None else None for f in finals], digits)

        p_values = [f.get("protocol_wilcoxon_p") for f in finals]
        lines.append(f"| {m} | {len(finals)} | {ms('global_ppl')} | {ms('global_word_ppl')} | "
                     f"{ms('protocol_global_ppl')} | {ms('protocol_personalized_ppl')} | "
                     f"{ms('protocol_global_word_ppl')} / {ms('protocol_personalized_word_ppl')} | "
                     f"{ms('protocol_improved_share', 100, 0)}% | {ms('protocol_mean_gain', 100)}% | "
                     f"{_p_value(max(p_values) if None not in p_values else None)} | "
                     f"{_mb(finals[0]['upload_bytes_total'])} | {_rounds_to(runs[m], target)} |")
    if missing:
        lines += ["", f"Not finished (left out of the means): {', '.join(missing)}."]
    lines += ["", "Paper (PTB, distilgpt2, 500 rounds), for the ordering only: " + ", ".join(
        f"{k} {v}" for k, v in PAPER_PTB.items()) + "; personalized 81.3 vs global-on-local 92.5.",
        "", "![convergence](convergence.png) ![upload](upload.png)", ""]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        rr = runs[m]["rounds"]
        ax.plot([r["round"] for r in rr], [r["global_ppl"] for r in rr], marker="o", label=m)
    ax.set(xlabel="round", ylabel="global test perplexity", title="Convergence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    fed = [m for m in methods if runs[m]["final"]["upload_bytes_total"] > 0]
    ax.bar(fed, [runs[m]["final"]["upload_bytes_total"] / 1e6 for m in fed])
    ax.set(yscale="log", ylabel="uploaded MB (total, log)", title="Upload cost")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "upload.png", dpi=100)
    plt.close(fig)

    # Personalization: per client, the method's global vs personalized, and local-only.
    lines += ["## Personalization (paper section 4.4.3)", ""]
    if "fedavg-lora" in runs:
        per = {c["partition_id"]: c for c in runs["fedavg-lora"].get("personalization", [])}
        local = {c["partition_id"]: c for c in runs.get("local-only", {}).get("personalization", [])} \
            if "local-only" in runs else {}
        lines += ["| client | global | personalized | steps kept / of | local-only |",
                  "| --- | --- | --- | --- | --- |"]
        for pid in sorted(per):
            c = per[pid]
            personal = c["personal_ppl"] if c["personal_ppl"] != "" else None
            lo = local.get(pid, {}).get("personal_ppl")
            lines.append(f"| {pid} | {_fmt(c['global_ppl'])} | {_fmt(personal)} | "
                         f"{c.get('chosen_steps', 'n/a')} / {c.get('total_steps', 'n/a')} | "
                         f"{_fmt(lo if lo != '' else None)} |")
        f = runs["fedavg-lora"]["final"]
        lines += ["", f"Over these clients (summed NLL over their tokens): global {_fmt(f.get('protocol_global_ppl'))}, "
                  f"personalized {_fmt(f.get('protocol_personalized_ppl'))}"
                  + (f", local-only {_fmt(runs['local-only']['final'].get('protocol_personalized_ppl'))}"
                     if "local-only" in runs else "") + ".", ""]
    # the distribution of per-client gains (1 - personalized / global), every method with a protocol
    gains = {m: runs[m]["personalization_stats"]["gains"] for m in methods
             if (runs[m].get("personalization_stats") or {}).get("clients")}
    if gains:
        lines += ["| method | clients | improved | mean gain | median gain | Wilcoxon p |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m in gains:
            st = runs[m]["personalization_stats"]
            lines.append(f"| {m} | {st['clients']} | {_fmt(100 * st['improved_share'], 0)}% | "
                         f"{_fmt(100 * st['mean_gain'])}% | {_fmt(100 * st['median_gain'])}% | "
                         f"{_p_value(st['wilcoxon_p'])} |")
        lines += ["", "![gains](personalization.png)", ""]
        plot_gains(gains, out / "personalization.png", "perplexity")

    lines += aggregation_section(runs, methods)
    if selection.get("sweep"):
        lines += sweep_section(runs, out)

    # Ablations.
    if not selection.get("ablations", True):
        path = out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path
    for title, key, values, fname in (("LoRA rank", "rank", spec["ranks"], "ablation-rank.png"),
                                      ("Local epochs", "epochs", spec["epochs"], "ablation-epochs.png")):
        if not values:  # this size has no such ablation
            continue
        names = [ablation_run(size, key, v) for v in values]
        lines += [f"## Ablation: {title}", "", f"| {key} | global ppl | train loss (last round) | "
                  "upload per round |", "| --- | --- | --- | --- |"]
        ppl = []
        for v, n in zip(values, names):
            f = runs[n]["final"]
            ppl.append(f["global_ppl"])
            lines.append(f"| {v} | {_fmt(f['global_ppl'])} | "
                         f"{_fmt(runs[n]['rounds'][-1]['train_loss'], 3)} | "
                         f"{_mb(f['upload_bytes_total'] / runs[n]['num_rounds'])} |")
        if key == "epochs" and spec["steps_per_epoch"]:
            lines += ["", f"({size} size: an epoch is capped at {spec['steps_per_epoch']} optimizer "
                      "step(s), so E counts local steps per round.)"]
        lines += ["", f"![{key}]({fname})", ""]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(values, ppl, marker="o")
        ax.set(xscale="log", xlabel=key, ylabel="final global ppl", title=f"Ablation: {title}")
        ax.set_xticks(values, [str(v) for v in values])
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)

    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_section(runs: dict, out: Path) -> list[str]:
    """Non-IID strength: each partition's statistics (results.json "partition") beside the
    personalization gain fedavg-lora's protocol gets there, and a plot of gain vs divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["## Non-IID strength and personalization", "",
             "| partition | topics per client | effective topics | JS divergence from the pool (mean / median) | "
             "global ppl | local ppl global / personalized | clients improved | mean gain | Wilcoxon p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    points = []
    for name, _ in SWEEP:
        r = runs[f"sweep-{name}"]
        part, f, st = r.get("partition", {}), r["final"], r.get("personalization_stats") or {}
        lines.append(f"| {name} | {_fmt(part.get('labels_per_client'))} | {_fmt(part.get('effective_labels'))} | "
                     f"{_fmt(part.get('js_divergence_mean'), 3)} / {_fmt(part.get('js_divergence_median'), 3)} | "
                     f"{_fmt(f['global_ppl'])} | {_fmt(f.get('protocol_global_ppl'))} / "
                     f"{_fmt(f.get('protocol_personalized_ppl'))} | "
                     f"{_fmt(100 * st['improved_share'] if st.get('clients') else None, 0)}% | "
                     f"{_fmt(100 * st['mean_gain'] if st.get('clients') else None)}% | "
                     f"{_p_value(st.get('wilcoxon_p'))} |")
        if st.get("clients") and part.get("js_divergence_mean") is not None:
            points.append((name, part["js_divergence_mean"], 100 * st["mean_gain"]))
    lines += ["", "(role: a client is a speaking role; it has no LDA topics to count.)", ""]
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", ls="none")
        for name, x, y in points:
            ax.annotate(name, (x, y))
        ax.set(xlabel="JS divergence of client topics from the pool (mean)",
               ylabel="mean personalization gain (%)", title="Non-IID strength")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=100)
        plt.close(fig)
        lines += ["![sweep](sweep.png)", ""]
    return lines


def aggregation_section(runs: dict, names: list[str]) -> list[str]:
    """Exact / heterogeneous-rank aggregation: bytes per round and the measured aggregation
    error ||B_agg A_agg - mean_i B_i A_i|| / ||mean_i B_i A_i||, mean over rounds (0 = exact)."""
    names = [n for n in names if runs[n]["config"]["strategy.name"] in AGGREGATION_METHODS]
    if len(names) < 2:
        return []
    lines = ["## Exact and heterogeneous-rank LoRA aggregation", "",
             "| run | strategy | ranks | global ppl | personalized ppl | upload / round | "
             "download / round | aggregation error (mean of rounds) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        r, cfg = runs[n], runs[n]["config"]
        fed = [x for x in r["rounds"] if x["round"] > 0]
        errors = [x["aggregation_error"] for x in fed
                  if isinstance(x.get("aggregation_error"), (int, float)) and math.isfinite(x["aggregation_error"])]
        error = f"{sum(errors) / len(errors):.2e}" if errors else "n/a (B stays personal)"
        lines.append(f"| {n} | {cfg['strategy.name']} | {cfg.get('lora.rank-mix') or cfg['lora.rank']} | "
                     f"{_fmt(r['final']['global_ppl'])} | {_fmt(r['final'].get('protocol_personalized_ppl'))} | "
                     f"{sum(x['upload_bytes'] for x in fed) / len(fed):,.0f} B | "
                     f"{sum(x['download_bytes'] for x in fed) / len(fed):,.0f} B | {error} |")
    for n in names:
        if runs[n]["config"]["strategy.name"] == "flora":
            per_round = ", ".join(f"{x['download_bytes']:,} B" for x in runs[n]["rounds"] if x["round"] > 0)
            lines += ["", f"{n} downlink per round (rounds 1..N, {runs[n]['clients_per_round']} clients "
                      f"per round): {per_round}. It grows by one stacked adapter per client per round "
                      "(until a layer's factors outgrow its dense matrix)."]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    for s in SIZES:
        size.add_argument(f"--{s}", dest="size", action="store_const", const=s)
    size.add_argument("--size", dest="size", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/suite-<size>")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "fedgen")
    parser.add_argument("--target-ppl", type=float, default=None,
                        help="perplexity target for 'rounds to target' (default 1.25 x fedavg-lora final)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--methods", default=None,
                        help="comma-separated strategies to run instead of the size's list")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false",
                        help="skip the rank and local-epochs ablations")
    parser.add_argument("--rank-mix", default="",
                        help=f"also run {', '.join(HET_METHODS)} with this rank-mix, e.g. 2:0.5,8:0.3,16:0.2")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds: every method runs once per seed, the table gives "
                             "mean ± std (default: the run config's seed)")
    parser.add_argument("--sweep", action="store_true",
                        help="also run fedavg-lora at data.dirichlet-alpha 0.1 / 0.5 / 1.0 and the role "
                             "partition, with each partition's statistics and personalization gain")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value for every run of the suite (repeatable), e.g. "
                             "data.partitioner=role; use its own --out")
    args = parser.parse_args(argv)
    args.size = args.size or "quick"
    if args.set:  # checked like any run config: a wrong key or value stops here, naming it
        overrides = merge_run_config([" ".join(args.set)])
        RunConfig.from_run_config({**SIZES[args.size]["config"], **overrides})
        SIZES[args.size]["config"].update(overrides)
    selection = {"methods": args.methods.split(",") if args.methods else None,
                 "ablations": args.ablations, "rank_mix": args.rank_mix, "sweep": args.sweep,
                 "seeds": [int(x) for x in args.seeds.split(",")] if args.seeds else None}
    selection["seeds"] = selection["seeds"] or SIZES[args.size].get("seeds")
    # SIGTERM must still stop the suite's SuperLink and everything under it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = (args.out or ROOT / "outputs" / f"suite-{args.size}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.report_only:
        run_suite(args.size, out, args.cache.resolve(), args.timeout, **selection)
    path = report(args.size, out, args.target_ppl, **selection)
    print(f"report: {path} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
