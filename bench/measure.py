"""The measurements, one function each. ``bench.worker`` runs every one in a fresh process, so
its peak resident memory is its own; all of them return plain JSON-able dicts."""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from bench.driver import federate
from strategies.base import local_training_kwargs
from strategies.fedavg_lora import client_train
from strategies.records import model_bytes
from strategies.registry import strategy_entry
from task.adapters import (
    add_lora,
    get_adapter_state,
    get_full_state,
    initial_adapter_state,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_full_model,
    shared_lora_model,
)
from task.compression import CODECS, encode_update
from task.config import RunConfig
from task.lm.data import client_blocks, client_blocks_path, global_test_blocks, load_corpus
from task.lm.model import load_backbone, parameter_counts
from task.lm.train import evaluate_nll, train_local
from task.results import RunRecorder


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    import psutil  # deferred: a test dependency of Flower's, not one of the bench's

    return psutil.Process().memory_info().rss / 2**20


def bench_config(backbone: str, work_dir: str, **overrides) -> RunConfig:
    """The offline default run config with this backbone, writing under ``work_dir``."""
    root = Path(__file__).resolve().parents[1]
    cache = os.environ.get("FEDGEN_BENCH_CACHE", str(root / ".cache" / "fedgen"))
    return RunConfig.from_run_config({"model.name": backbone, "output-dir": str(Path(work_dir) / "out"),
                                      "cache-dir": cache, **overrides})


# --------------------------------------------------------------------------- machine peak
def matmul_peak(size: int = 2048, repeats: int = 8) -> dict:
    """Best float32 matmul rate (FLOP/s) of this machine with torch's threads: the yardstick
    the training FLOP rates are compared with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up (thread pool, caches)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"size": size, "threads": torch.get_num_threads(), "best_s": best,
            "flops_per_s": 2 * size**3 / best}


# --------------------------------------------------------------------------- local step
def _training_flops(model, batch: torch.Tensor) -> int:
    """FLOPs of one forward + backward on ``batch``, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def local_step(backbone: str, mode: str, steps: int, work_dir: str) -> dict:
    """Time and memory of optimizer steps of LoRA (``mode='lora'``) or full fine-tuning
    (``'full'``) on the same backbone and the same batch (batch-size x seq-len tokens)."""
    cfg = bench_config(backbone, work_dir)
    model = shared_lora_model(cfg) if mode == "lora" else shared_full_model(cfg)
    blocks = client_blocks(cfg, 0, 100)[0][:cfg.train.batch_size]
    batch = blocks[:cfg.train.batch_size]
    flops = _training_flops(model, batch)
    rss_loaded = rss_mib()
    lr = cfg.train.learning_rate if mode == "lora" else cfg.train.full_learning_rate
    train_local(model, batch, epochs=1, batch_size=cfg.train.batch_size, lr=lr, max_steps=1)  # warm up
    times = []
    for i in range(steps):
        t = time.perf_counter()
        train_local(model, batch, epochs=1, batch_size=cfg.train.batch_size, lr=lr, max_steps=1, seed=i)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_s = sorted(times)[len(times) // 2]
    return {"backbone": backbone, "mode": mode, "tokens": batch.numel(), "step_s": step_s,
            "step_times_s": times, "trainable_params": trainable, "flops_per_step": flops,
            "flops_per_s": flops / step_s, "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": peak_rss_mib(), "training_peak_mib": peak_rss_mib() - rss_loaded}


# --------------------------------------------------------------------------- shared backbone
def client_calls(backbone: str, runtime: str, calls: int, work_dir: str) -> dict:
    """Client training calls as the ClientApp runs them, one after another in one process.

    ``runtime='shared'``: the real one (strategies.fedavg_lora.client_train on the process-wide
    backbone). ``'naive'``: the same work, but the backbone is loaded and wrapped with LoRA again
    for every call, as a client without the shared model would.
    """
    cfg = bench_config(backbone, work_dir)
    received = {k: v.clone() for k, v in initial_adapter_state(cfg).items()} \
        if runtime == "shared" else None
    times = []
    for call in range(calls):
        pid = call % 100
        blocks = client_blocks(cfg, pid, 100)[0]
        t = time.perf_counter()
        if runtime == "shared":
            client_train(cfg, received, pid, blocks, seed=call, config={})
        else:
            model = add_lora(cfg, load_backbone(cfg))
            if received is None:
                received = get_adapter_state(model)
            set_adapter_state(model, received)
            train_local(model, blocks, **local_training_kwargs(cfg, call))
            save_adapter(model, personal_adapter_dir(cfg, pid), get_adapter_state(model))
            del model
        times.append(time.perf_counter() - t)
    later = times[1:] or times
    return {"backbone": backbone, "runtime": runtime, "calls": calls, "call_times_s": times,
            "first_call_s": times[0], "later_call_s": sum(later) / len(later),
            "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- communication
def comm_bytes(backbone: str, work_dir: str) -> dict:
    """Exact wire bytes per client and round, uplink and downlink, of fedavg-lora (fp32 and every
    upload codec) and fedavg-full on one backbone, counted as the strategies count them
    (strategies.records.model_bytes over the Flower records that cross the wire)."""
    cfg = bench_config("tiny-gpt2" if backbone == "distilgpt2-shape" else backbone, work_dir)
    backbone_model = _distilgpt2_shaped() if backbone == "distilgpt2-shape" else None
    if backbone_model is None:
        backbone_model = load_backbone(cfg)
    full_state = get_full_state(backbone_model)
    full = model_bytes(RecordDict({"arrays": ArrayRecord(full_state)}))
    full_values = sum(v.numel() for v in full_state.values())
    del full_state
    lora = add_lora(cfg, backbone_model)
    adapter_params, backbone_params = parameter_counts(lora)
    state = get_adapter_state(lora)
    # a trained-looking adapter: the global one plus a small update (codecs code the update)
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    rows = {}
    # after round 1 the global adapter is a trained one too (round 1 sends B = 0 once, deduplicated)
    downlink = model_bytes(RecordDict({"arrays": ArrayRecord(trained)}))
    for codec in CODECS:
        encoded, _ = encode_update(trained, state, codec, seed=0, topk_fraction=cfg.upload.topk_fraction)
        rows[codec] = {"uplink": model_bytes(RecordDict({"arrays": ArrayRecord(encoded)})),
                       "downlink": downlink}
    return {"backbone": backbone, "adapter_params": adapter_params,
            "backbone_params": backbone_params, "full_values": full_values,
            "adapter_values": sum(v.numel() for v in state.values()),
            "fedavg_full": {"uplink": full, "downlink": full}, "fedavg_lora": rows,
            "lora_reduction_pct": 100 * (1 - rows["none"]["uplink"] / full),
            "peak_rss_mib": peak_rss_mib()}


def _distilgpt2_shaped():
    """distilgpt2's architecture (6 layers, 768 wide, 12 heads, 50257 tokens) from its config,
    random weights: no download, same tensor shapes and so the same bytes."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257,
                                       n_positions=1024))
    return model.requires_grad_(False)


# --------------------------------------------------------------------------- codecs vs quality
def compression_quality(backbone: str, codecs: list[str], clients: int, rounds: int,
                        max_steps: int, work_dir: str) -> dict:
    """The same short federation (same clients, data and seeds) once per upload codec, through
    the real ClientApp handler and server strategy (bench.driver): uploaded bytes and the final
    global perplexity on the server's test set."""
    out = {}
    for codec in codecs:
        run_dir = Path(work_dir) / codec
        shutil.rmtree(run_dir, ignore_errors=True)  # fresh personal adapters and residuals
        cfg = bench_config(backbone, str(run_dir), **{"upload.compression": codec,
                                                       "train.max-steps": max_steps})
        order = list(range(100))
        rounds_of = [order[r * clients:(r + 1) * clients] for r in range(rounds)]
        t = time.perf_counter()
        stats = federate(cfg, 100, rounds_of)
        model = shared_lora_model(cfg)
        state = strategy_entry(cfg).module.server_global_state(cfg, stats["arrays"].to_torch_state_dict())
        set_adapter_state(model, state)
        ev = evaluate_nll(model, global_test_blocks(cfg), batch_size=cfg.train.batch_size,
                          max_batches=cfg.eval.server_max_batches)
        out[codec] = {"global_ppl": ev.perplexity, "eval_tokens": ev.tokens,
                      "upload_bytes_per_update": sum(stats["upload_bytes"]) / len(stats["upload_bytes"]),
                      "rejected": stats["rejected"], "wall_s": time.perf_counter() - t}
    return {"backbone": backbone, "clients_per_round": clients, "rounds": rounds,
            "max_steps": max_steps, "codecs": out, "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- client setup
def client_setup(backbone: str, partition_id: int, cold: bool, work_dir: str) -> dict:
    """What a fresh client process pays before its first step to get its data: in the
    simulation once per client actor, in a deployment once per message (a new process each).
    ``cold`` deletes this client's cached token blocks first (what every process paid before
    the blocks were cached on disk: partitioning the corpus, loading the tokenizer,
    tokenizing)."""
    # the imports a fresh client process pays, measured in one (this one has them loaded)
    probe = ("import time; t = time.perf_counter(); import task.lm.data; "
             "print(time.perf_counter() - t)")
    imports = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                   check=True, cwd=Path(__file__).resolve().parents[1]).stdout)
    cfg = bench_config(backbone, work_dir)
    path = client_blocks_path(cfg, partition_id, 100)
    if cold:
        load_corpus(cfg)  # the shared corpus cache exists in both cases (the server builds it)
        path.unlink(missing_ok=True)
    t = time.perf_counter()
    train, test = client_blocks(cfg, partition_id, 100)
    return {"backbone": backbone, "cold": cold, "imports_s": imports,
            "client_blocks_s": time.perf_counter() - t, "train_blocks": len(train),
            "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- full-model reply
def full_reply(repeats: int, work_dir: str) -> dict:
    """Building fedavg-full's reply record on the client (distilgpt2-shaped model): the weights
    taken with a clone first (``clone``, as before) or as views (``views``, as now), then
    serialized into the ArrayRecord Flower sends."""
    model = _distilgpt2_shaped().requires_grad_(True)
    out = {}
    for name, copy in (("clone", True), ("views", False)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            record = ArrayRecord(get_full_state(model, copy=copy))
            times.append(time.perf_counter() - t)
            del record
        out[name] = {"reply_s": sorted(times)[len(times) // 2], "times_s": times}
    return {**out, "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- results per round
def recorder_rounds(rounds: int, plot_every_s: float, work_dir: str) -> dict:
    """Server-side cost of recording one round (results.json, CSVs, and the PNG when due):
    ``plot_every_s=0`` redraws the PNG every round (as before), the default at most every 30 s."""
    recorder = RunRecorder(Path(work_dir) / f"recorder-{plot_every_s}", {"strategy": "bench"})
    recorder.plot_every_s = plot_every_s
    times = []
    for rnd in range(rounds):
        row = {"round": rnd, "global_ppl": 100.0 - rnd, "train_loss": 4.0, "upload_bytes": 10**6,
               "download_bytes": 10**6, "num_updates": 10, "wall_s": 1.0}
        t = time.perf_counter()
        recorder.add_round(row, [{"partition_id": i, "global_ppl": 90.0, "tokens": 100}
                                 for i in range(10)])
        times.append(time.perf_counter() - t)
    later = times[1:]
    return {"plot_every_s": plot_every_s, "rounds": rounds, "first_round_s": times[0],
            "round_s": sum(later) / len(later), "peak_rss_mib": peak_rss_mib()}
