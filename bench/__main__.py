"""FedGen-Edge benchmark: communication, shared backbone, local step, throughput, in one run.

    .venv/bin/python -m bench --quick [--lock /tmp/fedgen-heavy.lock] [--only comm,step] [--merge]

Writes ``bench/results/bench-<size>.json`` (every raw figure) and ``bench-<size>.md`` (the
tables); ``--merge`` re-measures only the ``--only`` sections and keeps the others of the
existing JSON in ``--out`` (each section records when and at what load it was measured). Each measurement runs in a fresh Python process (``bench.worker``), so its peak memory
is its own; simulation runs are real ``flwr run``s on a SuperLink of their own. ``--lock`` takes
an exclusive file lock around each heavy measurement (one at a time on a shared machine; each
stays well under 10 minutes). ``--quick`` takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import markdown
from bench.worker import MARK

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("peak", "comm", "codecs", "step", "precision", "backbone", "costs", "sim")
# The offline default run end to end, fp32 vs auto (about 20 minutes here): asked for by name.
# and the image task's GAN step and FID/KID features, fp32 vs bf16 (about 10 minutes).
OPT_IN = ("e2e", "image")

SIZES = {  # "tiny": every measurement on tiny-gpt2, a minute or two: checks the harness itself
    "tiny": dict(backbone="tiny-gpt2", step_steps=2, image_steps=2, image_fid_images=32, precision_steps=2, precision_eval_blocks=8, calls=2, codec_clients=2, codec_rounds=2,
                 codec_steps=1, tiny_rounds=3, tiny_clients=4, smol_rounds=3, smol_clients=2),
    "quick": dict(backbone="smollm2-135m", step_steps=3, image_steps=10, image_fid_images=256, precision_steps=6, precision_eval_blocks=64, calls=3, codec_clients=2, codec_rounds=2, codec_steps=2,
                  tiny_rounds=3, tiny_clients=10, smol_rounds=3, smol_clients=2),
    "full": dict(backbone="smollm2-135m", step_steps=8, image_steps=20, image_fid_images=1000, precision_steps=10, precision_eval_blocks=128, calls=6, codec_clients=5, codec_rounds=4, codec_steps=3,
                 tiny_rounds=6, tiny_clients=10, smol_rounds=4, smol_clients=10),
}


@contextlib.contextmanager
def heavy(lock: str | None):
    """Hold the shared machine's heavy-run lock (if given) for one measurement."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(job: str, lock: str | None, timeout: float = 600, **kwargs) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.time()
    with heavy(lock):
        proc = subprocess.run([sys.executable, "-m", "bench.worker", job, json.dumps(kwargs)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench job {job} {kwargs} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK):])
    result["load_avg_after"] = os.getloadavg()[0]  # 1-minute load: how busy the machine was
    print(f"  {job} {kwargs.get('backbone', '')} {kwargs.get('mode', kwargs.get('runtime', ''))}"
          f" done in {time.time() - t:.0f}s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="size", const="quick")
    size.add_argument("--full", action="store_const", dest="size", const="full")
    size.add_argument("--tiny", action="store_const", dest="size", const="tiny")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"subset of {SECTIONS + OPT_IN} (default: all but {OPT_IN})")
    parser.add_argument("--compile", action="store_true",
                        help="precision section: also time torch.compile of the bf16 model "
                             "(its first call compiles for about 80 s here)")
    parser.add_argument("--lock", default=None, help="file lock held around each heavy measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections not re-measured from the existing JSON in --out")
    parser.add_argument("--profile", default=None,
                        help="folder: py-spy samples each simulation run's ServerApp and client "
                             "actor at 20 Hz (bench/profile.py) and writes its summary there")
    parser.add_argument("--sim-runs", default="100,10,tiny",
                        help="simulation runs: 100 / 10 = the size's backbone with 100 / 10 "
                             "clients, tiny = tiny-gpt2 with 10 (with --merge, one at a time "
                             "fits a busy machine's 10-minute slot)")
    args = parser.parse_args(argv)
    # A timeout's SIGTERM must unwind through the simulation's LocalSuperLink, which stops the
    # SuperLink and Ray processes of its run (killed outright, they would outlive the harness).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.size = args.size or "quick"
    p = SIZES[args.size]
    only = set(args.only.split(","))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedgen-bench-"))
    results: dict = {"size": args.size, "params": p, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg()}, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    existing = out_dir / f"bench-{args.size}.json"
    if args.merge and existing.exists():  # the earlier run's sections, start and machine
        results = {**json.loads(existing.read_text()), "params": p}
        for section in only - {"sim"}:  # re-measured below; a failure must not show old figures
            results.pop({"peak": "matmul_peak"}.get(section, section), None)
        results["errors"] = [e for e in results.get("errors", [])
                             if e.split()[0].rstrip(":") not in only]
    sections = results.setdefault("sections", {})  # when, how long and at what load, each
    t0 = time.time()
    w = str(work)

    current: dict[str, float] = {}  # the section being measured -> its start time

    def begin(section: str) -> None:
        current.clear()
        current[section] = time.time()
        sections[section] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "load_avg": os.getloadavg()[0], "merged": args.merge}

    def save() -> None:
        for section, t in current.items():
            sections[section]["wall_s"] = time.time() - t
        if not args.merge:
            results["wall_s"] = time.time() - t0
        (out_dir / f"bench-{args.size}.json").write_text(json.dumps(results, indent=2))
        (out_dir / f"bench-{args.size}.md").write_text(markdown(results))

    if "peak" in only:
        begin("peak")
        print("matmul peak", flush=True)
        results["matmul_peak"] = run_worker("matmul_peak", args.lock)
        save()
    if "comm" in only:
        begin("comm")
        print("communication bytes", flush=True)
        results["comm"] = [run_worker("comm_bytes", args.lock, backbone=b, work_dir=w)
                           for b in (p["backbone"], "distilgpt2-shape")]
        save()
    if "codecs" in only:
        begin("codecs")
        print("upload codecs vs perplexity", flush=True)
        results["codecs"] = run_worker(
            "compression_quality", args.lock, backbone=p["backbone"],
            codecs=["none", "bf16", "int8", "int8-row", "topk"], clients=p["codec_clients"],
            rounds=p["codec_rounds"], max_steps=p["codec_steps"], work_dir=w)
        save()
    if "step" in only:
        begin("step")
        print("local step: LoRA vs full fine-tuning", flush=True)
        results["step"] = [run_worker("local_step", args.lock, backbone=b, mode=m,
                                      steps=p["step_steps"], work_dir=w, precision=prec)
                           for b, m, prec in ((p["backbone"], "lora", "fp32"), (p["backbone"], "lora", "bf16"),
                                              (p["backbone"], "full", "fp32"), (p["backbone"], "full", "bf16"),
                                              ("tiny-gpt2", "lora", "fp32"))[:5 if p["backbone"] != "tiny-gpt2" else 4]]
        save()
    if "precision" in only:
        begin("precision")
        print("precision: fp32 vs bf16 side by side; thread layout", flush=True)
        results["precision"] = {
            "step": run_worker("precision_step", args.lock, timeout=900, backbone=p["backbone"],
                               steps=p["precision_steps"], eval_blocks=p["precision_eval_blocks"],
                               work_dir=w, compile=args.compile),
            "threads": run_worker("thread_layout", args.lock, backbone=p["backbone"],
                                  steps=p["precision_steps"] + 1, work_dir=w)}
        save()
    if "image" in only:
        begin("image")
        print("image task: GAN step and FID/KID features, fp32 vs bf16", flush=True)
        results["image_precision"] = run_worker("image_precision", args.lock, timeout=1800,
                                                steps=p["image_steps"], fid_images=p["image_fid_images"],
                                                work_dir=w)
        save()
    if "e2e" in only:
        from bench.sim import default_run  # deferred: only --only e2e needs scripts/simulate.py

        begin("e2e")
        print("the offline default run end to end: fp32 vs auto", flush=True)
        runs = {}
        for precision in ("fp32", "auto"):
            with heavy(args.lock):
                runs[precision] = default_run(precision, work)
            runs[precision]["whole_test_set"] = run_worker(
                "checkpoint_ppl", args.lock, run_dir=str(work / f"default-{precision}"), work_dir=w)
            print(f"  {precision}: {runs[precision]['wall_s']:.0f} s, final global ppl "
                  f"{runs[precision]['final_global_ppl']:.2f}", flush=True)
            results["e2e"] = runs
            save()
    if "backbone" in only:
        begin("backbone")
        print("shared backbone vs reload per call", flush=True)
        results["backbone"] = [run_worker("client_calls", args.lock, backbone=p["backbone"],
                                          runtime=r, calls=p["calls"], work_dir=w)
                               for r in ("shared", "naive")]
        save()
    if "costs" in only:
        begin("costs")
        print("runtime costs removed: before / after", flush=True)
        setup = {}
        for cold in (True, False):  # cold first: it writes the cache the warm run reads
            setup["cold" if cold else "warm"] = run_worker(
                "client_setup", args.lock, backbone=p["backbone"], partition_id=99, cold=cold,
                work_dir=w)
        results["costs"] = {"setup": setup,
                            "full_reply": run_worker("full_reply", args.lock, repeats=3, work_dir=w),
                            "recorder": {str(pe): run_worker("recorder_rounds", args.lock, rounds=10,
                                                             plot_every_s=pe, work_dir=w)
                                         for pe in (0.0, 30.0)}}
        save()
    if "sim" in only:
        from bench.sim import simulate  # deferred: only --only sim needs scripts/simulate.py

        begin("sim")
        print("simulation engine", flush=True)
        runs = results.get("sim", [])  # --merge: a run measured again replaces its old figures
        chosen = args.sim_runs.split(",")
        for name, (backbone, nodes, per_round, rounds) in (
                ("100", (p["backbone"], 100, p["smol_clients"], p["smol_rounds"])),
                ("10", (p["backbone"], 10, p["smol_clients"], p["smol_rounds"])),
                ("tiny", ("tiny-gpt2", 10, p["tiny_clients"], p["tiny_rounds"]))):
            if name not in chosen:
                continue
            try:
                # the yardstick of this run's FLOP rate, taken at the same load just before it
                peak = run_worker("matmul_peak", args.lock)
                samplers = None
                if args.profile:
                    from bench.profile import Samplers  # deferred: with --profile only

                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    samplers = Samplers(Path(args.profile), backbone)
                with heavy(args.lock):
                    try:
                        run = simulate(backbone, nodes, per_round, rounds, work,
                                       on_start=samplers.start if samplers else None)
                    finally:
                        if samplers:
                            samplers.stop()
                if samplers:
                    from bench.profile import write_summary  # deferred: with --profile only

                    run["profiled"] = True
                    write_summary(run, samplers, Path(args.profile))
                run["matmul_peak"] = peak
                runs = [r for r in runs if (r["backbone"], r["num_supernodes"]) != (backbone, nodes)]
                runs.append(run)
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # keep the other figures
                print(f"  {backbone} x{nodes} failed: {err}", flush=True)
                results.setdefault("errors", []).append(f"sim {backbone} x{nodes}: {err}")
                continue
            print(f"  {backbone} x{nodes}: {run['updates_per_min']:.1f} updates/min, "
                  f"peak {run['peak_rss_gib']:.2f} GiB", flush=True)
            results["sim"] = runs
            save()
    save()
    print(markdown(results))
    print(f"written {out_dir}/bench-{args.size}.json and .md ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
