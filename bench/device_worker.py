"""Per-message overhead of a deployed ClientApp, in-process vs the warm device worker.

    python -m bench.device_worker [--backbone tiny-gpt2] [--messages 5] [--out FILE.json]

Flower's deployment engine starts a fresh process per message, so that is what is timed here:
for each message (train, then evaluate, as a SuperNode receives them), a fresh Python process
imports the ClientApp, builds the message and handles it, either in-process (client_app/app.py's
handlers: torch/peft imports and the backbone load every time) or forwarded to one warm
``fedgen-device`` worker started once (client_app/device_worker.py). The wall time runs from
starting the process to the reply, Python start-up included (Flower pays it too; its own FAB
handling and polling are not part of this). Overhead = wall time minus the handler's own
compute on a warm backbone, per message: the worker reports it for the request; in-process, the
message process handles the same message a second time, warm. On a shared machine compute
times drift, which is why each overhead is taken against its own message's compute. "Round
trip" is the forwarding cost alone, from one warm process (connect, hello, request, reply, minus
compute).
The data is a node's own text folder (node config data-path), written here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import flower_app
from task.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
MARK = "DEVICE-WORKER-RESULT "
KINDS = (MessageType.TRAIN, MessageType.EVALUATE)
LINE = "to be or not to be that is the question whether tis nobler in the mind to suffer {}"


def run_config(backbone: str, output_dir: str) -> dict:
    """A small local step: 3 optimizer steps of 4 x 32 tokens, one evaluation batch."""
    return RunConfig.from_run_config({
        "model.name": backbone, "train.seq-len": 32, "train.batch-size": 4, "train.max-steps": 3,
        "data.chunk-words": 200, "lora.dropout": 0.0, "eval.client-max-batches": 1,
        "output-dir": output_dir}).flat()


def message(kind: str, arrays_file: Path) -> Message:
    with np.load(arrays_file, allow_pickle=False) as arrays:
        record = ArrayRecord({k: Array(arrays[k]) for k in arrays.files})
    return Message(RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=1, message_type=kind)


def stamp_task_identity() -> None:
    """Messages are stamped with the run/task of the process (a SuperNode sets these)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 5, 1, 1


def one_message(spec: dict) -> dict:
    """What one fresh message process does: handle one message and note when its reply was
    ready; then, in-process, handle the same message again, warm, for the handler's own compute
    time (the worker reports its own)."""
    stamp_task_identity()
    context = Context(run_id=5, node_id=1, state=RecordDict(), run_config=spec["run-config"],
                      node_config=spec["node-config"])
    msg = message(spec["kind"], Path(spec["arrays"]))
    if "device-worker" not in spec["node-config"]:
        reply = flower_app.app(msg, context)
        reply_at = time.time()
        t0 = time.perf_counter()
        flower_app.app(message(spec["kind"], Path(spec["arrays"])), context)
        compute_s = time.perf_counter() - t0
    else:  # flower_app.forwarded, step by step, to read the worker's compute time
        request, arrays = flower_app.worker_request(spec["kind"], msg, context)
        with flower_app.WorkerConnection(spec["node-config"]["device-worker"]) as worker:
            answer, answer_arrays = worker.call(request, arrays)
        reply = flower_app.reply_message(answer, answer_arrays, msg)
        reply_at = time.time()
        compute_s = answer["compute-s"]
    if reply.has_error():
        raise RuntimeError(f"{spec['kind']} failed: {reply.error}")
    return {"metrics": dict(reply.content["metrics"]), "compute-s": compute_s,
            "reply-at": reply_at, "torch-imported": "torch" in sys.modules}


def timed_message(spec: dict) -> dict:
    """Start a fresh message process; wall time from its start until its reply was ready, and
    the per-message overhead: that minus the handler's own compute."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started_at = time.time()
    out = subprocess.run([sys.executable, "-m", "bench.device_worker", "--message", json.dumps(spec)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"message process failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK):])
    wall = result["reply-at"] - started_at
    return {**result, "wall-s": wall, "overhead-s": wall - result["compute-s"]}


def warm_round_trip(spec: dict, repeats: int) -> list[float]:
    """Forwarding cost alone, from a warm process: (connect .. reply) - worker compute."""
    stamp_task_identity()
    context = Context(run_id=5, node_id=1, state=RecordDict(), run_config=spec["run-config"],
                      node_config=spec["node-config"])
    costs = []
    for _ in range(repeats):
        msg = message(spec["kind"], Path(spec["arrays"]))
        t0 = time.perf_counter()
        request, arrays = flower_app.worker_request(spec["kind"], msg, context)
        with flower_app.WorkerConnection(spec["node-config"]["device-worker"]) as worker:
            answer, answer_arrays = worker.call(request, arrays)
        flower_app.reply_message(answer, answer_arrays, msg)
        costs.append(time.perf_counter() - t0 - answer["compute-s"])
    return costs


def import_seconds(module: str) -> float:
    out = subprocess.run([sys.executable, "-c", f"import time; t = time.perf_counter(); import {module}; "
                          "print(time.perf_counter() - t)"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.split()[-1])


def benchmark(backbone: str, messages: int, work: Path) -> dict:
    # deferred: torch/peft, the harness computes the initial adapter once
    from task.adapters import initial_adapter_state

    config = run_config(backbone, str(work / "out"))
    data = work / "data"
    data.mkdir()
    for f in range(3):
        (data / f"file{f}.txt").write_text("\n".join(LINE.format(f * 1000 + i) for i in range(300)))
    arrays_file = work / "initial-adapter.npz"
    np.savez(arrays_file, **{k: v.numpy() for k, v in
                             initial_adapter_state(RunConfig.from_run_config(config)).items()})

    state = work / "worker-state"
    log = open(work / "device-worker.log", "wb")
    t0 = time.perf_counter()
    worker = subprocess.Popen([sys.executable, "-m", "client_app.device_worker", "--state-dir",
                               str(state)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    socket_path = str(state / "device-worker.sock")
    try:
        while True:
            try:
                flower_app.WorkerConnection(socket_path).close()
                break
            except flower_app.DeviceWorkerError:
                if worker.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError((work / "device-worker.log").read_text()[-3000:])
                time.sleep(0.1)
        worker_start_s = time.perf_counter() - t0
        results = {"backbone": backbone, "messages": messages, "worker-start-s": worker_start_s,
                   "load-average-1min": os.getloadavg()[0], "cpus": os.cpu_count(),
                   "import-thin-s": import_seconds("client_app.flower_app"),
                   "import-handlers-s": import_seconds("client_app.app"), "kinds": {}}
        base = {"data-path": str(data)}
        paths = {"in-process": {**base, "state-dir": str(work / "state-in-process")},
                 "worker": {**base, "state-dir": str(work / "state-worker"),
                            "device-worker": socket_path}}
        # The first forwarded message loads the backbone into the worker: done once, untimed.
        for kind in KINDS:
            timed_message({"kind": kind, "run-config": config, "node-config": paths["worker"],
                           "arrays": str(arrays_file)})
        for kind in KINDS:
            rows = {path: [] for path in paths}
            for _ in range(messages):  # interleaved: a drifting machine load hits both paths
                for path, node in paths.items():
                    rows[path].append(timed_message({"kind": kind, "run-config": config,
                                                     "node-config": node, "arrays": str(arrays_file)}))
            spec = {"kind": kind, "run-config": config, "node-config": paths["worker"],
                    "arrays": str(arrays_file)}
            results["kinds"][kind] = {
                **{f"{path}-{key}-s": statistics.median(r[f"{key}-s"] for r in rs)
                   for path, rs in rows.items() for key in ("compute", "wall", "overhead")},
                "rows": rows,
                "worker-round-trip-s": statistics.median(warm_round_trip(spec, messages)),
                "same-metrics": all(a["metrics"] == b["metrics"]
                                    for a, b in zip(rows["in-process"], rows["worker"])),
                "thin-process-imported-torch": any(r["torch-imported"] for r in rows["worker"]),
            }
        results["load-average-1min-after"] = os.getloadavg()[0]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    return results


def report(results: dict) -> str:
    lines = [f"backbone {results['backbone']}, median of {results['messages']} messages each; "
             f"worker up in {results['worker-start-s']:.1f} s; import client_app.flower_app "
             f"{results['import-thin-s']:.2f} s, client_app.app {results['import-handlers-s']:.2f} s; "
             f"load average {results['load-average-1min']:.1f} before, "
             f"{results['load-average-1min-after']:.1f} after, on {results['cpus']} CPUs",
             "| message | in-process: wall / compute / overhead (s) | worker: wall / compute / "
             "overhead (s) | warm round trip (ms) | same metrics |",
             "| --- | --- | --- | --- | --- |"]
    for kind, r in results["kinds"].items():
        lines.append(" | ".join([f"| {kind}", *(
            f"{r[f'{path}-wall-s']:.2f} / {r[f'{path}-compute-s']:.2f} / {r[f'{path}-overhead-s']:.2f}"
            for path in ("in-process", "worker")),
            f"{r['worker-round-trip-s'] * 1000:.1f}", f"{r['same-metrics']} |"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-gpt2", help="model.name (tiny-gpt2, smollm2-135m)")
    parser.add_argument("--messages", type=int, default=5, help="messages per path and kind")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--message", help=argparse.SUPPRESS)  # internal: one message process
    args = parser.parse_args(argv)
    if args.message:
        print(MARK + json.dumps(one_message(json.loads(args.message))), flush=True)
        return 0
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    with tempfile.TemporaryDirectory(prefix="fedgen-dw-") as work:
        results = benchmark(args.backbone, args.messages, Path(work))
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
