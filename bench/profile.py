"""Profile one simulation run with py-spy and say where its time goes.

    .venv/bin/python -m bench.profile [--backbone smollm2-135m] [--nodes 10] [--per-round 2]
        [--rounds 3] [--out docs/bench]

py-spy (the ``profile`` extra) samples the ServerApp process and the client actor of a real
``flwr run`` (bench.sim); ``profile-<backbone>-<server|client>.txt`` keep the raw stacks,
``.svg`` the flamegraphs, and ``profile-<backbone>.md`` the summary: sampled seconds per cost,
per round and as a share of the mean round's wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.sim import simulate

RATE = 20  # samples per second: little overhead, enough for costs of a tenth of a second

# (cost, a frame that marks it): a stack is the first cost of this list whose frame it has;
# "client: " / "server: " costs count only in that process
COSTS = (
    ("client: optimizer step", "Optimizer.profile_hook_step"),
    ("client: backward", "Tensor.backward"),
    ("client: forward (LM loss)", "ForCausalLMLoss"),
    ("client: forward", "PeftModelForCausalLM.forward"),
    ("client: save personal adapter", "save_adapter (task/adapters.py"),
    ("client: token blocks", "client_blocks (task/lm/data.py"),
    ("client: load backbone + LoRA", "shared_lora_model (task/adapters.py"),
    ("client: local evaluation", "evaluate_nll (task/lm/train.py"),
    ("server: evaluation of the global adapter", "evaluate_nll (task/lm/train.py"),
    ("server: checkpoint", "save_adapter (task/adapters.py"),
    ("server: record the round", "RunRecorder.add_round"),
    ("server: aggregation", "aggregate_train"),
    ("server: waiting for client replies", "send_and_receive"),
    ("imports", "_find_and_load"),
    ("message (de)serialization", "ArrayRecord"),
)


def classify(frames: list[str], side: str) -> str:
    """Cost of one stack (outermost frame first) of the client actor or the ServerApp."""
    for name, marker in COSTS:
        if name.split(":")[0] in ("client", "server") and not name.startswith(side):
            continue
        if any(marker in f for f in frames):
            return name
    app = "client_app/app.py" if side == "client" else "server_app/app.py"
    if any(app in f for f in frames):
        return f"{side}: other"
    return f"{side}: process start-up, Flower and Ray outside the app"


def summarize(raw: Path, side: str, rate: float) -> dict[str, float]:
    """Sampled seconds per cost (a stack line of py-spy's raw format: ``f1;f2;... count``)."""
    seconds: dict[str, float] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in ("Condition.wait", "select (", "poll (",
                                                "_wait_for_tstate_lock", "Worker.main_loop")):
            continue  # a waiting thread py-spy could not tell was idle
        seconds[classify(frames, side)] += int(count) / rate
    return dict(seconds)


class Samplers:
    """py-spy on the run's ServerApp (flwr-simulation) and client actor, attached as each
    appears (the actor is exec'd by Ray's setup_worker, which ``--subprocesses`` loses)."""

    def __init__(self, out: Path, backbone: str) -> None:
        self.out, self.backbone, self.procs, self.done = out, backbone, {}, threading.Event()
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    def paths(self, side: str) -> tuple[Path, Path]:
        stem = self.out / f"profile-{self.backbone}-{side}"
        return stem.with_suffix(".txt"), stem.with_suffix(".svg")

    def start(self, link) -> None:
        self.home = str(link.home)
        threading.Thread(target=self._attach, daemon=True).start()

    def _attach(self) -> None:
        import psutil

        while not self.done.wait(0.5) and len(self.procs) < 2:
            for p in psutil.process_iter(["cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    side = "server" if "flwr-simulation" in cmd else \
                        "client" if "ClientAppActor" in cmd else None
                    if side is None or side in self.procs or \
                            p.environ().get("FLWR_HOME") != self.home:
                        continue
                except (psutil.Error, OSError):
                    continue
                self.procs[side] = [subprocess.Popen(
                    [self.py_spy, "record", "--rate", str(RATE), "--format", fmt, "--output",
                     str(path), "--pid", str(p.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for fmt, path in zip(("raw", "flamegraph"), self.paths(side))]

    def stop(self) -> None:
        """The sampled processes are gone: py-spy writes its files and exits."""
        self.done.set()
        for sampler in (s for pair in self.procs.values() for s in pair):
            try:
                sampler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(timeout=30)


def markdown(summary: dict) -> str:
    r = summary["run"]
    rounds = r["rounds"]
    round_s = sum(r["round_wall_s"][1:]) / rounds
    lines = [f"## Where a simulation round's time goes ({r['backbone']}, py-spy)", "",
             f"`python -m bench.profile` (or `python -m bench --profile DIR`): one `flwr run` of {r['backbone']}, "
             f"{r['num_supernodes']} clients, {r['clients_per_round']} per round, {rounds} rounds "
             f"(round wall {' / '.join(f'{x:.1f}' for x in r['round_wall_s'])} s, round 0 = "
             f"the server's initial evaluation), every process sampled by py-spy at {RATE} Hz; "
             f"run wall {r['wall_s']:.0f} s, load average {summary['load_avg']:.1f} at the end. "
             f"Per round = sampled seconds / {rounds}; share = of the mean round "
             f"({round_s:.1f} s). Costs that happen once per run (start-up, imports, loading) "
             "are not per-round costs: their share is left out.", "",
             "| cost | sampled s | per round s | share of a round |", "| --- | --- | --- | --- |"]
    once = ("imports", "client: load backbone + LoRA", "client: token blocks",
            "client: process start-up, Flower and Ray outside the app",
            "server: process start-up, Flower and Ray outside the app")
    for name, s in sorted(summary["seconds"].items(), key=lambda kv: -kv[1]):
        share = "" if name in once else "(a wait, not work)" if "waiting" in name else \
            f"{100 * s / rounds / round_s:.1f}%"
        lines.append(f"| {name} | {s:.1f} | {s / rounds:.2f} | {share} |")
    return "\n".join(lines) + "\n"


def write_summary(run: dict, samplers: Samplers, out: Path) -> dict:
    """profile-<backbone>.json and .md of one sampled run (bench.sim.simulate's result)."""
    seconds = {}
    for side in samplers.procs:
        seconds.update(summarize(samplers.paths(side)[0], side, RATE))
    summary = {"run": run, "rate": RATE, "load_avg": os.getloadavg()[0], "seconds": seconds,
               "sampled": sorted(samplers.procs),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (out / f"profile-{run['backbone']}.json").write_text(json.dumps(summary, indent=2))
    (out / f"profile-{run['backbone']}.md").write_text(markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stops the run's processes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samplers = Samplers(out, args.backbone)
    work = Path(tempfile.mkdtemp(prefix="fedgen-profile-"))
    try:
        run = simulate(args.backbone, args.nodes, args.per_round, args.rounds, work,
                       on_start=samplers.start)
    finally:
        samplers.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = write_summary(run, samplers, out)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
