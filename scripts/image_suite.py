"""The paper's image table (issue 16) in one command: seven methods on one label-skewed split, each
a real `flwr run`, then docs/image/report.md with the table, KID curves, a grid per method (one
row per class), personal generators' grids of their own classes and the gain distribution.

    python scripts/image_suite.py                 # Fashion-MNIST, 20 clients, this CPU (--fashion)
    python scripts/image_suite.py --seeds 42,43,44
    python scripts/image_suite.py --paper         # CIFAR-10, 100 clients: a GPU machine
    python scripts/image_suite.py --tiny          # a wiring check of every method (minutes)
    python scripts/image_suite.py --ablation      # also fedavg-lora at LoRA ranks 2/4/16 and placements
    python scripts/image_suite.py --report-only

Runs live under outputs/image-suite-<size>/ (adapters, checkpoints, client folders); the report,
its plots and grids, and each run's results.json and metrics.csv are copied to
docs/image/suite-<size>/.

Every run of a size has the same split, budget, seeds and score protocol (conf/image.toml's, or
the paper size's): KID of ``image.kid-images`` generated images vs cached Inception features of
``image.real-feature-images`` real test images, FID at ``image.fid-images`` beside the
real-vs-real floor at the same N, conditioning accuracy from the project's classifier. Round 0
of every run is the pre-trained backbone (its "whole" features are cached by pixels, so only
the first run pays for them): the backbone row of the table, which the federated runs must beat.
Finished runs (results.json with a "final" section) are kept, so a stopped suite resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from simulate import merge_run_config  # noqa: E402
from suite import _fmt, _mb, _mean_std, results_of, run_all, seeded_name  # noqa: E402

from task.config import RunConfig  # noqa: E402
from task.results import plot_gains  # noqa: E402

# The paper's image table (conditional DCGAN, CIFAR-10, FID at its own N): the ordering to compare.
METHODS = ["centralized-full", "centralized-lora", "fedavg-lora", "fedavg-full", "fedper", "ditto",
           "local-only"]
PAPER_FID = {"centralized-full": 25.8, "centralized-lora": 28.1, "fedavg-lora": 35.4,
             "fedavg-full": 52.9, "fedper": 43.7, "ditto": 41.2, "local-only": 89.6}
# the federated methods fedavg-lora must beat on KID (issue 16), and its centralized bound
BASELINES = ["fedavg-full", "fedper", "ditto", "local-only"]

SIZES = {
    # conf/smoke-image.toml: a tiny cDCGAN, 10 clients, 2 rounds, a handful of images per score
    "tiny": dict(clients=10, conf="conf/smoke-image.toml", seeds=[42], config={}),
    # conf/image.toml: Fashion-MNIST, label Dirichlet alpha 0.1 over 20 clients, 10 per round, the
    # field's score protocol; 6 protocol clients, each scored on its own classes
    "fashion": dict(clients=20, conf="conf/image.toml", seeds=[42], config={
        "server.personalize-clients": 6}),
    # CIFAR-10 (from the hub: a machine with a network), 100 clients, 10 per round, 50 rounds, a
    # width-64 backbone, FID at 10k: a GPU machine
    "paper": dict(clients=100, conf="conf/image.toml", seeds=[42, 43, 44], config={
        "data.dataset": "cifar10", "num-server-rounds": 50, "strategy.fraction-train": 0.1,
        "server.evaluate-every": 5, "server.checkpoint-every": 10,
        "server.personalize-clients": 20, "image.generator-width": 64,
        "image.discriminator-width": 64, "image.pretrain-steps": 20000, "train.max-steps": 50,
        "image.real-feature-images": 10000, "image.fid-images": 5000, "image.torch-threads": 0}),
}


# fedavg-lora at other LoRA ranks and placements (the table's fedavg-lora is rank lora.rank on
# every conv): run name -> overrides. Layers 0-3 are the transposed convs (the class one-hot
# enters layer 0), 4 the output conv; "+norms" also trains the covered blocks' BatchNorm affine.
ABLATION = {
    **{f"rank-{r}": {"lora.rank": r, "lora.alpha": 2.0 * r} for r in (2, 4, 16)},
    "layers-0": {"image.lora-layers": "0"},
    "layers-0-3": {"image.lora-layers": "0,1,2,3"},
    "layers-all-norms": {"image.lora-norms": True},
}


def base_config(size: str) -> dict:
    spec = SIZES[size]
    return {**merge_run_config([str(ROOT / spec["conf"])]), **spec["config"]}


def plan(size: str, methods: list[str] | None = None, seeds: list[int] | None = None,
         ablation: bool = False) -> list[tuple[str, dict]]:
    """(run name, run-config overrides) of the suite, seed by seed (a suite stopped early still
    has every method at its first seed); the ablation's runs last, at the first seed."""
    seeds = seeds or SIZES[size]["seeds"]
    methods = methods or METHODS
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"--methods: {unknown} not in the image table ({', '.join(METHODS)})")
    runs = [(seeded_name(m, s, seeds), {"strategy.name": m, "seed": s}) for s in seeds for m in methods]
    if ablation:
        runs += [(name, {"strategy.name": "fedavg-lora", "seed": seeds[0], **o}) for name, o in ABLATION.items()]
    return runs


def with_finished(out: Path, runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The planned runs plus every other finished run of the table under ``out`` (a method's run,
    by seed or not, or an ablation run), in the table's order, so that running one method
    (``--methods X``) reports it beside the runs finished before, instead of alone."""
    runs = list(runs)
    for path in sorted(out.glob("*/results.json")):
        name, result = path.parent.name, results_of(out, path.parent.name)
        if result is None or name in dict(runs):
            continue
        method = result["config"].get("strategy.name")
        if name in ABLATION or (method in METHODS and re.fullmatch(rf"{re.escape(method)}(-s\d+)?", name)):
            runs.append((name, {"strategy.name": method, "seed": result["config"].get("seed")}))
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(runs, key=lambda run: (run[0] in ABLATION, order.get(run[1]["strategy.name"], len(order)),
                                         run[1].get("seed") or 0))


# ------------------------------------------------------------------------------ report
def _kid(v) -> str:
    """KID in units of 1e-3, as papers print it."""
    return "n/a" if v is None or not math.isfinite(v) else f"{1e3 * v:.2f}"


# Methods without a global model of their own: their "global" row is the untouched backbone, so
# they are compared on what their clients use, their own adapters on their own classes.
NO_GLOBAL_MODEL = {"local-only"}


def verdicts(means: dict[str, float], personal: dict[str, float] | None = None) -> list[str]:
    """Issue 16's checks on the mean KID per method: fedavg-lora below each federated baseline
    and within 1.5x of centralized-lora. ``personal``: the mean personalized KID on the protocol
    clients' own classes, the figure a method without a global model (local-only) is held to."""
    lines, ours, personal = [], means.get("fedavg-lora"), personal or {}
    if ours is None:
        return lines
    for m in BASELINES:
        if m in NO_GLOBAL_MODEL:
            if m in personal and "fedavg-lora" in personal:
                mine, theirs = personal["fedavg-lora"], personal[m]
                lines.append(f"- fedavg-lora vs {m} (personalized KID on the protocol clients' own classes; "
                             f"{m} has no global model): {_kid(mine)} vs {_kid(theirs)}: "
                             f"{'lower (better)' if mine < theirs else 'NOT lower'}")
        elif m in means:
            lines.append(f"- fedavg-lora vs {m}: KID {_kid(ours)} vs {_kid(means[m])}: "
                         f"{'lower (better)' if ours < means[m] else 'NOT lower'}")
    if "centralized-lora" in means:
        ratio = ours / means["centralized-lora"] if means["centralized-lora"] > 0 else math.inf
        lines.append(f"- fedavg-lora / centralized-lora KID: {ratio:.2f}x "
                     f"({'within' if ratio <= 1.5 else 'NOT within'} 1.5x)")
    return lines


def report(size: str, out: Path, runs_planned: list[tuple[str, dict]], render: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablation = [(n, o) for n, o in runs_planned if n in ABLATION]
    runs_planned = [(n, o) for n, o in runs_planned if n not in ABLATION]
    runs = {n: results_of(out, n) for n, _ in runs_planned}
    methods = list(dict.fromkeys(o["strategy.name"] for _, o in runs_planned))
    names = {m: [n for n, o in runs_planned if o["strategy.name"] == m and runs[n]] for m in methods}
    by_method = {m: [runs[n] for n in names[m]] for m in methods}
    missing = [n for n, r in runs.items() if r is None]
    methods = [m for m in methods if by_method[m]]
    if not methods:
        raise SystemExit(f"no finished run under {out}")
    first = by_method[methods[0]][0]
    cfg, final0 = first["config"], first["final"]
    pre = first.get("pretrain", {})
    scores = first.get("scores", {})
    fid_name = first.get("fid_name", "fid")
    seeds = sorted({r["config"]["seed"] for rs in by_method.values() for r in rs})
    lines = [
        f"# FedGen-Edge image table ({size})", "",
        f"Backbone `{first['backbone']}` (pre-trained on the public {cfg['image.pretrain-fraction']:.0%} "
        f"of the {first['dataset']} training split, {pre.get('pretrain_steps', 'n/a')} steps"
        + (f", {pre['pretrain_s']:.0f} s" if isinstance(pre.get("pretrain_s"), (int, float)) else "") + "), "
        f"dataset `{first['dataset']}` partitioned `{first['partitioner']}` (alpha "
        f"{cfg['data.dirichlet-alpha']}), {first['num_clients']} clients, {first['clients_per_round']} "
        f"per round, {first['num_rounds']} rounds, {cfg['train.max-steps']} local steps x batch "
        f"{cfg['train.batch-size']}, LoRA rank {cfg['lora.rank']}. Seeds: {', '.join(map(str, seeds))}.", "",
        "What each figure is (results.json `scores`):", "",
        f"- KID (x 1e-3, lower is better): {scores.get('whole', {}).get('kid', 'n/a')}; "
        "'KID std' is its std over subsets (the estimator's spread), '±' the std over seeds;",
        f"- {fid_name}: {scores.get('whole', {}).get('fid', 'n/a')}; floor: "
        f"{scores.get('whole', {}).get('fid_floor', 'n/a')} (compare FID only at the same N, never "
        "with published 10k / 50k figures);",
        f"- accuracy: {scores.get('whole', {}).get('accuracy', 'n/a')} (the classifier's own test "
        f"accuracy: {first.get('classifier', {}).get('test_accuracy', 'n/a')});",
        f"- local KID: the personalization protocol on {final0.get('protocol_clients')} clients, "
        f"{scores.get('client', {}).get('kid', 'n/a')}, global model vs personalized;",
        f"- feature extractor: {first.get('feature_extractor', 'n/a')}.", "",
        "## Results", "",
        f"| method | seeds | KID | KID std | {fid_name} | accuracy | local KID global / personalized | "
        "clients improved | Wilcoxon p | uploaded (total) | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| pre-trained backbone (round 0) | - | {_kid(final0.get('initial_global_kid'))} | "
        f"{_kid(final0.get('initial_global_kid_std'))} | {_fmt(final0.get('initial_global_fid'))} | "
        f"{_fmt(final0.get('initial_global_accuracy'), 3)} | | | | | |"]
    means, personal = {}, {}
    for m in methods:
        finals = [r["final"] for r in by_method[m]]

        def ms(key: str, scale: float = 1.0, digits: int = 2) -> str:
            return _mean_std([scale * f[key] if isinstance(f.get(key), (int, float)) else None
                              for f in finals], digits)

        kids = [f.get("global_kid") for f in finals]
        if all(isinstance(k, (int, float)) and math.isfinite(k) for k in kids):
            means[m] = sum(kids) / len(kids)
        own = [f.get("protocol_personalized_kid") for f in finals]
        if all(isinstance(k, (int, float)) and math.isfinite(k) for k in own):
            personal[m] = sum(own) / len(own)
        p_values = [f.get("protocol_wilcoxon_p") for f in finals]
        lines.append(
            f"| {m}{' (global = the backbone)' if m in NO_GLOBAL_MODEL else ''} | {len(finals)} | {ms('global_kid', 1e3)} | {ms('global_kid_std', 1e3)} | "
            f"{ms('global_fid', 1, 1)} | {ms('global_accuracy', 1, 3)} | "
            f"{ms('protocol_global_kid', 1e3)} / {ms('protocol_personalized_kid', 1e3)} | "
            f"{ms('protocol_improved_share', 100, 0)}% | "
            f"{_fmt(max(p_values) if None not in p_values else None, 4)} | "
            f"{_mb(finals[0]['upload_bytes_total'])} | {ms('wall_s', 1 / 60, 1)} min |")
    lines += ["", f"FID floor (two disjoint real sets of {first.get('fid_images')}): "
              f"{_fmt(final0.get('global_fid_floor'))}."]
    if missing:
        lines += ["", f"Not finished (left out): {', '.join(missing)}."]
    lines += ["", "Issue 16's checks (mean KID over seeds):", "", *verdicts(means, personal), "",
              "Paper (CIFAR-10, FID at its own N), for the ordering only: "
              + ", ".join(f"{k} {v}" for k, v in PAPER_FID.items()) + ".", "",
              "![kid](kid.png)", ""]

    # Per round: KID on the round's subset and the conditioning accuracy (cheap: every round).
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in methods:
        rr = by_method[m][0]["rounds"]
        ax.plot([r["round"] for r in rr], [1e3 * r["global_kid"] for r in rr], marker="o", label=m)
        acc.plot([r["round"] for r in rr], [r.get("global_accuracy", math.nan) for r in rr],
                 marker="o", label=m)
    ax.set(xlabel="round", ylabel="KID x 1e-3 (per-round subset)",
           title=f"KID per round ({scores.get('round', {}).get('kid', '')[:60]}...)")
    acc.set(xlabel="round", ylabel="conditioning accuracy", ylim=(0, 1),
            title=f"conditioning accuracy ({scores.get('round', {}).get('accuracy', '')[:50]}...)")
    for a in (ax, acc):
        a.title.set_fontsize(8)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kid.png", dpi=100)
    plt.close(fig)

    # A grid per method (its final model, one row per class, the same noise in every grid).
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    lines += ["## Samples (final model, one row per class, fixed noise)", ""]
    backbone_grid = out / names[methods[0]][0] / "checkpoints" / "round-0000" / "grid.png"
    if backbone_grid.exists():
        shutil.copyfile(backbone_grid, grids / "backbone.png")
        lines += ["pre-trained backbone:", "", "![backbone](grids/backbone.png)", ""]
    for m in methods:
        run_dir = out / names[m][0]
        if (run_dir / "grid.png").exists():
            shutil.copyfile(run_dir / "grid.png", grids / f"{m}.png")
            label = m if names[m][0] == m else f"{m} ({names[m][0]})"
            lines += [f"{label}:", "", f"![{m}](grids/{m}.png)", ""]

    # Personal generators: each protocol client's personalized adapter renders its own classes.
    if "fedavg-lora" in methods and render:
        lines += personal_section(out / names["fedavg-lora"][0], grids)

    gains = {m: by_method[m][0]["personalization_stats"]["gains"] for m in methods
             if (by_method[m][0].get("personalization_stats") or {}).get("clients")}
    if gains:
        lines += ["## Personalization gains", "", "| method | clients | improved | mean gain | median gain | Wilcoxon p |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m in gains:
            st = by_method[m][0]["personalization_stats"]
            lines.append(f"| {m} | {st['clients']} | {_fmt(100 * st['improved_share'], 0)}% | "
                         f"{_fmt(100 * st['mean_gain'])}% | {_fmt(100 * st['median_gain'])}% | "
                         f"{_fmt(st['wilcoxon_p'], 4)} |")
        lines += ["", "(gain: 1 - personalized / global KID on the client's own classes; first seed)", "",
                  "![gains](personalization.png)", ""]
        plot_gains(gains, out / "personalization.png", "KID")
    if ablation and "fedavg-lora" in methods:
        lines += ablation_section(out, names["fedavg-lora"][0], ablation)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({
        "size": size, "seeds": seeds, "missing": missing, "mean_kid": means,
        "mean_personalized_kid": personal,
        "runs": {m: [{k: r["final"].get(k) for k in ("global_kid", "global_kid_std", "global_fid",
                                                      "global_fid_floor", "global_accuracy",
                                                      "protocol_global_kid", "protocol_personalized_kid",
                                                      "protocol_improved_share", "upload_bytes_total",
                                                      "wall_s")} for r in by_method[m]] for m in methods},
        "backbone": {k: final0.get(f"initial_global_{k}") for k in ("kid", "kid_std", "fid", "accuracy")},
    }, indent=1))
    return path


def ablation_section(out: Path, base_name: str, ablation: list[tuple[str, dict]]) -> list[str]:
    """fedavg-lora's LoRA rank and placement: adapter size, bytes per round, KID, accuracy."""
    lines = ["## Ablation: LoRA rank and placement (fedavg-lora)", "",
             "| run | rank | layers | norms | adapter params | uploaded per round | KID | KID std | accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in [base_name] + [n for n, _ in ablation]:
        r = results_of(out, name)
        if r is None:
            lines.append(f"| {name} | not finished | | | | | | | |")
            continue
        c, f = r["config"], r["final"]
        lines.append(f"| {name} | {c['lora.rank']} | {c['image.lora-layers']} | "
                     f"{'yes' if c['image.lora-norms'] else 'no'} | {r['adapter_params']:,} | "
                     f"{_mb(f['upload_bytes_total'] / r['num_rounds'])} | {_kid(f.get('global_kid'))} | "
                     f"{_kid(f.get('global_kid_std'))} | {_fmt(f.get('global_accuracy'), 3)} |")
    return lines + ["", "(layers 0-3: the transposed convs, 4x4 -> 32x32, the class one-hot entering "
                    "layer 0; 4: the output conv. Uploaded per round: all of the round's clients.)", ""]


def publish(out: Path, docs: Path, runs_planned: list[tuple[str, dict]]) -> None:
    """The report, its plots and grids, and each finished run's results.json and metrics.csv,
    copied to ``docs`` (the run folders themselves hold adapters and checkpoints)."""
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "summary.json", "kid.png", "personalization.png"):
        if (out / name).exists():
            shutil.copyfile(out / name, docs / name)
    if (out / "grids").exists():
        shutil.copytree(out / "grids", docs / "grids", dirs_exist_ok=True)
    for name, _ in runs_planned:
        if results_of(out, name) is not None:
            (docs / name).mkdir(exist_ok=True)
            for f in ("results.json", "metrics.csv"):
                shutil.copyfile(out / name / f, docs / name / f)


def personal_section(run_dir: Path, grids: Path) -> list[str]:
    """A run's protocol clients (at most 4): their personalized generators on their own classes."""
    from task.image.generate import generate_images  # deferred: torch and peft, for the grids only

    lines = ["## Personal generators (fedavg-lora, each protocol client's own classes)", ""]
    for folder in sorted((run_dir / "clients").glob("client-*/personalized-adapter"))[:4]:
        name = folder.parent.name
        described = generate_images(None, folder, out=grids / f"personal-{name}.png", classes="own",
                                    per_class=10)
        lines += [f"{name}: {described.split(': ', 1)[1]}", "", f"![{name}](grids/personal-{name}.png)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    for s in SIZES:
        size.add_argument(f"--{s}", dest="size", action="store_const", const=s)
    parser.add_argument("--out", type=Path, default=None, help="the runs (default: outputs/image-suite-<size>)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="where the report goes (default: docs/image/suite-<size>)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "fedgen")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the size's)")
    parser.add_argument("--ablation", action="store_true",
                        help=f"also fedavg-lora at {', '.join(ABLATION)} (first seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value for every run (repeatable); use its own --out")
    args = parser.parse_args(argv)
    args.size = args.size or "fashion"
    base = {**base_config(args.size), **merge_run_config([" ".join(args.set)])}
    RunConfig.from_run_config(base)  # a wrong key or value stops here, naming it
    runs = plan(args.size, args.methods.split(",") if args.methods else None,
                [int(s) for s in args.seeds.split(",")] if args.seeds else None, args.ablation)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = (args.out or ROOT / "outputs" / f"image-suite-{args.size}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.report_only:
        base.pop("run-name", None)  # each run's folder is out/<name>
        run_all(f"image suite {args.size}", out, args.cache.resolve(), args.timeout, runs, base,
                SIZES[args.size]["clients"])
    runs = with_finished(out, runs)
    report(args.size, out, runs)
    docs = (args.docs or ROOT / "docs" / "image" / f"suite-{args.size}").resolve()
    publish(out, docs, runs)
    print(f"report: {docs / 'report.md'} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
