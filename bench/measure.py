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
    compute_precision,
    get_adapter_state,
    get_full_state,
    initial_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_full_model,
    shared_lora_model,
)
from task import get_task
from task.compression import CODECS, encode_update
from task.config import RunConfig
from task.lm.data import (
    client_blocks,
    client_blocks_path,
    global_test_blocks,
    load_corpus,
)
from task.lm.model import load_backbone, parameter_counts
from task.lm.train import evaluate_nll, train_local
from task.precision import autocast
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


def local_step(backbone: str, mode: str, steps: int, work_dir: str, precision: str = "auto") -> dict:
    """Time and memory of optimizer steps of LoRA (``mode='lora'``) or full fine-tuning
    (``'full'``) on the same backbone and the same batch (batch-size x seq-len tokens), in
    ``model.precision`` = ``precision``."""

    cfg = bench_config(backbone, work_dir, **{"model.precision": precision})
    precision = compute_precision(cfg)
    model = shared_lora_model(cfg) if mode == "lora" else shared_full_model(cfg)
    blocks = client_blocks(cfg, 0, 100)[0][:cfg.train.batch_size]
    batch = blocks[:cfg.train.batch_size]
    flops = _training_flops(model, batch)
    rss_loaded = rss_mib()
    lr = cfg.train.learning_rate if mode == "lora" else cfg.train.full_learning_rate
    train_local(model, batch, epochs=1, batch_size=cfg.train.batch_size, lr=lr, max_steps=1,
                precision=precision)  # warm up
    times = []
    for i in range(steps):
        t = time.perf_counter()
        train_local(model, batch, epochs=1, batch_size=cfg.train.batch_size, lr=lr, max_steps=1, seed=i,
                    precision=precision)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_s = sorted(times)[len(times) // 2]
    return {"backbone": backbone, "mode": mode, "precision": precision, "tokens": batch.numel(), "step_s": step_s,
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
        ev = get_task(cfg).evaluator(cfg, global_test_blocks(cfg), seed=cfg.seed, scope="round")(model)
        out[codec] = {"global_ppl": math.exp(ev["nll"] / ev["tokens"]), "eval_tokens": ev["tokens"],
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


# --------------------------------------------------------------------------- precision
def _matmul_rate(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def _lora_variant(cfg: RunConfig, weights: torch.dtype, attention: str):
    """A fresh backbone + LoRA (not the process-wide one): weights in ``weights``, the adapter
    float32, attention kernel ``attention`` (sdpa | eager)."""
    backbone = load_backbone(cfg, weights)
    backbone.config._attn_implementation = attention
    return add_lora(cfg, backbone)


def _steps(model, batch: torch.Tensor, precision: str, steps: int) -> tuple[float, list[float]]:
    """Median step time of ``steps`` AdamW steps (after one warm-up step), and every loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    torch.manual_seed(0)
    model.train()
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with autocast(precision, batch.device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    model.eval()
    return sorted(times[1:])[len(times[1:]) // 2], losses


def precision_step(backbone: str, steps: int, eval_blocks: int, work_dir: str,
                   compile: bool = False) -> dict:
    """fp32 vs bf16 side by side in one process, on the same batch (default batch-size x
    seq-len) and the same seeded initial adapter: the LoRA step of every way to run bf16 (bf16
    weights + float32 adapter under autocast: the one ``model.precision = bf16`` uses; float32
    weights under autocast; bf16 weights without autocast), SDPA vs eager attention, optionally
    ``torch.compile``; each step's FLOP rate against the same dtype's matmul peak; perplexity of
    the untrained and the 1-step-trained model on the first ``eval_blocks`` global test blocks."""
    cfg = bench_config(backbone, work_dir)
    batch = client_blocks(cfg, 0, 100)[0][:cfg.train.batch_size]
    test = global_test_blocks(cfg)[:eval_blocks]
    peaks = {"fp32": _matmul_rate(torch.float32), "bf16": _matmul_rate(torch.bfloat16)}
    variants = {  # name: (backbone weights, compute precision, attention)
        "fp32, SDPA attention": (torch.float32, "fp32", "sdpa"),
        "fp32, eager attention (the fp32 run on CPU)": (torch.float32, "fp32", "eager"),
        "bf16 weights + autocast, SDPA": (torch.bfloat16, "bf16", "sdpa"),
        "bf16 weights + autocast, eager (the bf16 run on CPU)": (torch.bfloat16, "bf16", "eager"),
        "fp32 weights + autocast, eager": (torch.float32, "bf16", "eager"),
        "bf16 weights, no autocast, eager": (torch.bfloat16, "fp32", "eager"),
    }
    out = {}
    flops = None
    for name, (weights, precision, attention) in variants.items():
        model = _lora_variant(cfg, weights, attention)
        if flops is None:
            flops = _training_flops(model, batch)
        with autocast(precision, batch.device):
            untrained = evaluate_nll(model, test, batch_size=cfg.train.batch_size)
        step_s, losses = _steps(model, batch, precision, steps)
        t = time.perf_counter()
        with autocast(precision, batch.device):
            trained = evaluate_nll(model, test, batch_size=cfg.train.batch_size)
        eval_s = time.perf_counter() - t
        dtype = "bf16" if precision == "bf16" or weights == torch.bfloat16 else "fp32"
        out[name] = {"step_s": step_s, "losses": losses, "flops_per_s": flops / step_s,
                     "share_of_peak": flops / step_s / peaks[dtype], "peak_dtype": dtype,
                     "ppl_untrained": untrained.perplexity, "ppl_after_steps": trained.perplexity,
                     "eval_s": eval_s, "eval_tokens": trained.tokens}
        del model
    result = {"backbone": backbone, "tokens": batch.numel(), "flops_per_step": flops,
              "matmul_peak_flops_per_s": peaks, "threads": torch.get_num_threads(),
              "steps": steps, "variants": out}
    if compile:
        model = _lora_variant(cfg, torch.bfloat16, "eager")
        compiled = torch.compile(model)
        t = time.perf_counter()
        with autocast("bf16", batch.device):
            compiled(input_ids=batch, labels=batch).loss.backward()
        first = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        step_s, losses = _steps(compiled, batch, "bf16", steps)
        result["compiled"] = {"first_call_s": first, "step_s": step_s, "losses": losses,
                              "share_of_peak": flops / step_s / peaks["bf16"]}
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def _steps_in_child(backbone: str, steps: int, threads: int, work_dir: str, queue, go) -> None:
    torch.set_num_threads(threads)
    cfg = bench_config(backbone, work_dir, **{"model.precision": "bf16"})
    model = shared_lora_model(cfg)
    batch = client_blocks(cfg, 0, 100)[0][:cfg.train.batch_size]
    _steps(model, batch, "bf16", 1)  # warm up
    queue.put("ready")
    go.wait()  # every process steps at the same time
    t = time.perf_counter()
    _steps(model, batch, "bf16", steps - 1)  # steps in all, the first of them untimed
    queue.put(time.perf_counter() - t)


def thread_layout(backbone: str, steps: int, work_dir: str) -> dict:
    """Throughput of bf16 LoRA steps with this machine's cores as one client process with all
    threads (what one Ray actor with client-resources num-cpus = all gets) vs one process per core
    with one thread each (one actor per CPU), the processes stepping at the same time."""
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    out = {}
    for name, procs, threads in ((f"1 process x {cores} threads", 1, cores),
                                 (f"{cores} processes x 1 thread", cores, 1)):
        queue, go = ctx.Queue(), ctx.Event()
        workers = [ctx.Process(target=_steps_in_child,
                               args=(backbone, steps, threads, work_dir, queue, go))
                   for _ in range(procs)]
        for w in workers:
            w.start()
        ready = [queue.get(timeout=600) for _ in workers]
        assert all(r == "ready" for r in ready)
        t = time.perf_counter()
        go.set()
        times = [queue.get(timeout=600) for _ in workers]
        wall = time.perf_counter() - t
        for w in workers:
            w.join()
        total_steps = procs * (steps - 1)
        out[name] = {"processes": procs, "threads": threads, "steps": total_steps,
                     "wall_s": wall, "steps_per_s": total_steps / wall, "process_s": times}
    return {"backbone": backbone, "cores": cores, "layouts": out, "peak_rss_mib": peak_rss_mib()}


def checkpoint_ppl(run_dir: str, work_dir: str) -> dict:
    """The final global adapter of a finished run (its last peft checkpoint) on the whole global
    test set, evaluated in fp32 and in bf16: the same adapter, so the two figures differ by the
    evaluation precision alone."""
    folder = sorted((Path(run_dir) / "checkpoints").glob("round-*"))[-1]
    out = {"checkpoint": folder.name}
    for precision in ("fp32", "bf16"):
        cfg = bench_config("smollm2-135m", work_dir, **{"model.precision": precision})
        model = shared_lora_model(cfg)
        set_adapter_state(model, load_adapter_file(folder))
        test = global_test_blocks(cfg)
        result = evaluate_nll(model, test, batch_size=cfg.train.batch_size, precision=precision)
        out[precision] = {"ppl": result.perplexity, "tokens": result.tokens, "blocks": len(test)}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# --------------------------------------------------------------------------- image precision
def image_precision(steps: int, fid_images: int, work_dir: str) -> dict:
    """The image task in fp32 vs bf16 autocast, side by side in one process: the local GAN step
    (generator adapter + private discriminator, the default batch), and the FID / KID of the
    same pre-trained generator's samples against the same real test images with InceptionV3
    features computed in fp32 vs under bf16 autocast (is the extractor's precision a change in
    the score below 0.5%?), plus the samples generated under bf16 and scored in fp32."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from task.image.fid import InceptionFeatures  # deferred: torchvision and FID only here
    from task.image.train import generate, real_uint8, train_gan_local  # deferred: same

    cfg = bench_config("smollm2-135m", work_dir, task="image", **{
        "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
        "model.precision": "fp32"})
    model = shared_lora_model(cfg)
    task = get_task(cfg)
    rows = task.client_data(cfg, 0, 100)[0]
    start = get_adapter_state(model)
    device = torch.device("cpu")
    out: dict = {"batch_size": cfg.train.batch_size, "steps": steps}
    for precision in ("fp32", "bf16"):
        set_adapter_state(model, start)
        with autocast(precision, device):
            train_gan_local(model, rows, epochs=1, batch_size=cfg.train.batch_size, lr=1e-3, max_steps=1)
            t = time.perf_counter()
            loss = train_gan_local(model, rows, epochs=100, batch_size=cfg.train.batch_size,
                                   lr=1e-3, max_steps=steps, seed=1)
        out[f"gan_step_s_{precision}"] = (time.perf_counter() - t) / steps
        out[f"gan_loss_{precision}"] = loss
    set_adapter_state(model, start)

    real, labels = real_uint8(task.global_test_data(cfg)[:fid_images], cfg_channels(cfg))
    fake = generate(model, labels, seed=cfg.seed)
    with autocast("bf16", device):
        fake_bf16 = generate(model, labels, seed=cfg.seed)
    subset = min(fid_images // 2, 100)

    class Precomputed(torch.nn.Module):  # the metrics on features extracted beforehand
        num_features = InceptionFeatures.num_features

        def forward(self, features):
            return features

    def scores(real_images, fake_images, precision) -> dict:
        fid = FrechetInceptionDistance(feature=Precomputed(), normalize=False)
        kid = KernelInceptionDistance(feature=Precomputed(), subset_size=subset, normalize=False)
        t = time.perf_counter()
        with autocast(precision, device):
            features_real = InceptionFeatures()(real_images)
            features_fake = InceptionFeatures()(fake_images)
        seconds = time.perf_counter() - t
        for metric in (fid, kid):
            metric.update(features_real.float(), real=True)
            metric.update(features_fake.float(), real=False)
        kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "feature_s_per_image": seconds / (len(real_images) + len(fake_images))}

    torch.manual_seed(0)  # KID's random subsets
    out["features_fp32"] = scores(real, fake, "fp32")
    torch.manual_seed(0)
    out["features_bf16"] = scores(real, fake, "bf16")
    torch.manual_seed(0)
    out["bf16_samples_fp32_features"] = scores(real, fake_bf16, "fp32")
    a, b = out["features_fp32"], out["features_bf16"]
    out["fid_change_pct"] = 100 * (b["fid"] / a["fid"] - 1)
    out["kid_change_pct"] = 100 * (b["kid"] / a["kid"] - 1)
    out["images"] = len(real)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def cfg_channels(cfg: RunConfig) -> int:
    from task.image.data import load_images  # deferred: see image_precision

    return load_images(cfg).channels
