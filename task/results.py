"""Results written as they happen: results.json, metrics.csv, clients.csv and a PNG plot."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from task.adapters import load_adapter_file
from task.config import RunConfig

# metrics.csv / clients.csv columns; {f} stands for each of the task's figures (ppl, word_ppl |
# fid), {c} for each of its counts (tokens, words | images)
ROUND_FIELDS = ["round", "global_{f}", "whole_{f}", "whole_{c}", "train_loss", "upload_bytes",
                "download_bytes", "eval_bytes", "num_updates", "rejected", "dropped", "failures",
                "update_norm_median", "update_norm_max",
                "local_global_{f}", "personalized_{f}", "personalized_global_{f}",
                "train_phase_s", "aggregate_s", "server_eval_s", "wall_s",
                "elapsed_s", "retries", "skipped", "dp_epsilon", "backdoor_success",
                "backdoor_target_nll"]
CLIENT_FIELDS = ["round", "partition_id", "global_{f}", "personal_{f}", "{c}", "chosen_steps",
                 "total_steps", "kept_global", "validation_blocks"]
log = logging.getLogger("flwr.fedgen_edge")


def _expand(fields: list[str], figures: tuple[str, ...], counts: tuple[str, ...]) -> list[str]:
    out = []
    for f in fields:
        if "{f}" in f:
            out += [f.replace("{f}", x) for x in figures]
        elif "{c}" in f:
            out += [f.replace("{c}", x) for x in counts]
        else:
            out.append(f)
    return out


class RunRecorder:
    """Owns an output folder; every call leaves it consistent on disk."""

    # Drawing the PNG costs about 0.5 s (more than a whole tiny-model round), so while rounds
    # run it is redrawn at most this often; results.json and the CSVs are written every round,
    # and finish() always draws the final plot.
    plot_every_s = 30.0

    def __init__(self, out_dir: Path, header: dict[str, Any], figures: tuple[str, ...] = ("ppl", "word_ppl"),
                 counts: tuple[str, ...] = ("tokens", "words"), metric_label: str = "perplexity") -> None:
        self.out_dir = out_dir
        # The task's figures in field names, its metric first: "ppl" (text) or "fid" (images).
        self.metric, self.metric_label = figures[0], metric_label
        self.round_fields = _expand(ROUND_FIELDS, figures, counts)
        self.client_fields = _expand(CLIENT_FIELDS, figures, counts)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.previous = _read_previous(out_dir)  # what a resumed run puts back (restore_rounds)
        self.results: dict[str, Any] = {**header, "rounds": [], "final": {}}
        for name, fields in (("metrics.csv", self.round_fields), ("clients.csv", self.client_fields)):
            with open(out_dir / name, "w", newline="") as f:
                csv.writer(f).writerow(fields)
        self._write_json()
        self._plotted_at = time.monotonic()

    def add_round(self, row: dict[str, Any], client_rows: list[dict[str, Any]] = ()) -> None:
        self.results["rounds"].append(row)
        with open(self.out_dir / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.round_fields])
        with open(self.out_dir / "clients.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for c in client_rows:
                writer.writerow([row["round"]] + [c.get(k, "") for k in self.client_fields[1:]])
        self._write_json()
        if time.monotonic() - self._plotted_at >= self.plot_every_s:
            self.plot()

    def add_personalization(self, client_rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-client rows of the final personalization protocol (round "final" in
        clients.csv), their paired statistics (results.json "personalization_stats") and the
        plot of the distribution of gains (personalization.png); returns the statistics."""
        self.results["personalization"] = list(client_rows)
        m = self.metric
        stats = paired_gains([c[f"global_{m}"] for c in client_rows],
                             [c[f"personal_{m}"] for c in client_rows])
        self.results["personalization_stats"] = stats
        with open(self.out_dir / "clients.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for c in client_rows:
                writer.writerow(["final"] + [c.get(k, "") for k in self.client_fields[1:]])
        self._write_json()
        if stats["clients"]:
            plot_gains({self.results.get("strategy", ""): stats["gains"]},
                       self.out_dir / "personalization.png", self.metric_label)
        return stats

    def finish(self, final: dict[str, Any]) -> None:
        self.results["final"] = final
        self._write_json()
        self.plot()

    def _write_json(self) -> None:
        tmp = self.out_dir / f"results.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(_json_safe(self.results), indent=2))
        tmp.replace(self.out_dir / "results.json")

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = self.results["rounds"]
        if not rounds:
            return
        x = [r["round"] for r in rounds]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        m = self.metric
        subset = self.results.get("round_eval_tokens")
        ax1.plot(x, [r[f"global_{m}"] for r in rounds], marker="o",
                 label=f"global, {subset:,}-token subset" if subset else "global (server test)")
        whole = [(r["round"], r[f"whole_{m}"]) for r in rounds if _finite(r.get(f"whole_{m}"))]
        if whole:
            ax1.plot(*zip(*whole), marker="D", ls="none", color="black", label="global, whole test set")
        local = [(r["round"], r[f"local_global_{m}"]) for r in rounds
                 if _finite(r.get(f"local_global_{m}"))]
        if local:
            ax1.plot(*zip(*local), marker="s", ls="--", label="global on client tests")
        pers = [(r["round"], r[f"personalized_{m}"]) for r in rounds
                if _finite(r.get(f"personalized_{m}"))]
        if pers:
            ax1.plot(*zip(*pers), marker="^", ls=":", label="own personal model on client tests")
        ax1.set(xlabel="round", ylabel=self.metric_label, title=f"{self.results.get('backbone')} / "
                f"{self.results.get('strategy')}")
        ax1.legend()
        cumulative, total = [], 0
        for r in rounds:
            total += r.get("upload_bytes", 0)
            cumulative.append(total / 2**20)
        ax2.plot(x, cumulative, marker="o", color="tab:red")
        ax2.set(xlabel="round", ylabel="cumulative upload (MiB)", title="uplink")
        fig.tight_layout()
        fig.savefig(self.out_dir / ("perplexity.png" if m == "ppl" else f"{m}.png"), dpi=100)
        self._plotted_at = time.monotonic()
        plt.close(fig)


def paired_gains(global_values: list[float], personal_values: list[float]) -> dict[str, Any]:
    """Per-client relative gains of the personal over the global model (1 - personal / global:
    0.1 = 10% lower perplexity or FID), the share of clients improved, mean and median gain,
    and the two-sided paired Wilcoxon signed-rank p-value of personal vs global (scipy; None
    with fewer than 2 clients or when every pair is equal)."""
    pairs = [(g, p) for g, p in zip(global_values, personal_values) if _finite(g) and _finite(p)]
    gains = [1.0 - p / g for g, p in pairs]
    out: dict[str, Any] = {"clients": len(pairs), "gains": gains,
                           "improved_share": sum(g > 0 for g in gains) / len(gains) if gains else math.nan,
                           "worse_share": sum(g < 0 for g in gains) / len(gains) if gains else math.nan,
                           "mean_gain": statistics.fmean(gains) if gains else math.nan,
                           "median_gain": statistics.median(gains) if gains else math.nan,
                           "wilcoxon_p": None}
    if len(pairs) >= 2 and any(g != p for g, p in pairs):
        from scipy.stats import wilcoxon

        out["wilcoxon_p"] = float(wilcoxon([g for g, _ in pairs], [p for _, p in pairs]).pvalue)
    return out


def plot_gains(gains_by_method: dict[str, list[float]], path: Path, metric_label: str) -> None:
    """Histogram of per-client personalization gains, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    values = [100 * g for gains in gains_by_method.values() for g in gains]
    bins = 20 if len(set(values)) > 1 else 1
    for method, gains in gains_by_method.items():
        ax.hist([100 * g for g in gains], bins=bins, range=(min(values), max(values)) if values else None,
                alpha=0.5, label=f"{method} ({len(gains)} clients)")
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel=f"personalization gain (% lower {metric_label})", ylabel="clients",
           title="personalized vs global on each client's local test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_previous(out_dir: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rounds of results.json and client rows of clients.csv by round, as an earlier run left them."""
    rounds, clients = [], {}
    if (out_dir / "results.json").exists():
        rounds = json.loads((out_dir / "results.json").read_text()).get("rounds", [])
    if (out_dir / "clients.csv").exists():
        with open(out_dir / "clients.csv", newline="") as f:
            for row in csv.DictReader(f):
                clients.setdefault(row["round"], []).append(row)
    return rounds, clients


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- resume (issue 6)
def resume_point(cfg, out_dir: Path) -> tuple[int, dict] | None:
    """(last checkpointed round, its global adapter tensors) to resume from, or None: resume is
    off, or there is no state.json yet (then the run starts from round 0)."""
    if not cfg.resume:
        return None
    path = out_dir / "state.json"
    if not path.exists():
        log.warning("resume: no %s, starting from round 0", path)
        return None
    state = json.loads(path.read_text())
    tensors = load_adapter_file(out_dir / state["checkpoint"])
    if tensors is None:
        raise FileNotFoundError(f"resume: checkpoint {state['checkpoint']} named by {path} is missing")
    return int(state["round"]), tensors


def restore_rounds(recorder: RunRecorder, out_dir: Path, up_to_round: int) -> None:
    """Put the rounds 0..up_to_round of the interrupted run (results.json, clients.csv, read
    before the recorder rewrote them: kept in memory by the caller) back in the recorder."""
    rounds, clients = recorder.previous
    for row in rounds:
        if row["round"] <= up_to_round:
            recorder.add_round(row, clients.get(str(row["round"]), []))


def released_rounds(recorder: RunRecorder) -> int:
    """Rounds whose DP-noised aggregate was released (they spent privacy)."""
    return sum(1 for r in recorder.results["rounds"] if r.get("dp_epsilon") is not None)


def robustness_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals for results.json's final block: failures, rejections, retries, skipped rounds,
    the privacy spent, the backdoor's final success."""
    last = rounds[-1] if rounds else {}
    return {"failures_total": sum(r.get("failures", 0) for r in rounds),
            "rejected_total": sum(r.get("rejected", 0) for r in rounds),
            "dropped_total": sum(r.get("dropped", 0) for r in rounds),
            "retries_total": sum(r.get("retries", 0) for r in rounds),
            "skipped_rounds": sum(r.get("skipped", 0) for r in rounds),
            "dp_epsilon": last.get("dp_epsilon"),
            "backdoor_success": last.get("backdoor_success"),
            "backdoor_target_nll": last.get("backdoor_target_nll")}


# --------------------------------------------------------------------------- a finished run's folder
def run_of(adapter: Path) -> tuple[Path, int] | None:
    """(the run folder, the client's partition id) of an adapter under clients/client-<id>/."""
    for parent in adapter.resolve().parents:
        match = re.fullmatch(r"client-(\d+)", parent.name)
        if match and parent.parent.name == "clients":
            return parent.parent.parent, int(match.group(1))
    return None


def run_config(run_dir: Path) -> RunConfig:
    """The run config a run was trained with (results.json's ``config``)."""
    results = json.loads((run_dir / "results.json").read_text())
    return RunConfig.from_run_config(results["config"])
