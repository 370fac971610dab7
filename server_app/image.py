"""ServerApp of the image task: the configured strategy on the conditional DCGAN generator's
LoRA adapters, FID of the global generator every round, an image grid per checkpoint.

Same flow and results contract as the text task (server_app/app.py, whose helpers it reuses),
with ``*_fid`` fields in place of ``*_ppl`` (lower is better for both).
"""

from __future__ import annotations

import math
import shutil
import time

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from strategies import build_strategy, is_full_model, strategy_entry
from strategies.centralized import train_centralized
from strategies.common import log, summarize_client_evals
from task.config import RunConfig
from task.image_data import global_test_rows, load_images
from task.image_train import RowsFid, base_generator, save_grid
from task.model import (
    parameter_counts,
    save_adapter,
    set_adapter_state,
    set_full_state,
    shared_full_model,
    shared_lora_model,
)
from task.results import RunRecorder


def main_image(grid: Grid, cfg: RunConfig) -> None:
    from server_app.app import _personalize, _write_state, partition_order

    entry = strategy_entry(cfg)
    out = cfg.output_path
    shutil.rmtree(out / "clients", ignore_errors=True)
    log.info("FedGen-Edge image task: cDCGAN on %s/%s, strategy %s, output %s", cfg.dataset,
             cfg.partitioner, cfg.strategy, out)
    t0 = time.time()
    data = load_images(cfg)
    full = is_full_model(cfg)
    lora_model = shared_lora_model(cfg)  # pre-trains the backbone on the public split if not cached
    model = shared_full_model(cfg) if full else lora_model
    load = set_full_state if full else set_adapter_state
    generator = base_generator(lora_model)
    pretrain = generator.pretrain_record
    adapter_params, backbone_params = parameter_counts(lora_model)
    fid = RowsFid(global_test_rows(cfg), data.channels, cfg.seed)
    num_clients = len(list(grid.get_node_ids()))
    clients_per_round = max(1, int(num_clients * cfg.fraction_train))
    log.info("adapter %d parameters vs generator %d (%.3f%%) + discriminator %d; pretrain %s; "
             "setup %.1fs", adapter_params, backbone_params, 100 * adapter_params / backbone_params,
             pretrain["discriminator_params"], pretrain, time.time() - t0)

    recorder = RunRecorder(out, {
        "task": cfg.task, "backbone": f"cdcgan-g{cfg.gan_generator_width}-d{cfg.gan_discriminator_width}",
        "dataset": cfg.dataset, "partitioner": cfg.partitioner, "strategy": cfg.strategy,
        "num_clients": num_clients, "clients_per_round": clients_per_round,
        "num_rounds": cfg.num_server_rounds, "adapter_params": adapter_params,
        "backbone_params": backbone_params, "discriminator_params": pretrain["discriminator_params"],
        "model_params": backbone_params + pretrain["discriminator_params"],
        "trained_params": backbone_params if full else adapter_params, "pretrain": pretrain,
        "fid_images": cfg.fid_images,
        "config": {RunConfig.key_of(k): v for k, v in cfg.__dict__.items()},
    }, metric="fid")
    clock = {"start": time.time(), "last": time.time()}
    strategy = None

    def evaluate_global(server_round: int, arrays: ArrayRecord | dict) -> MetricRecord:
        state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
        load(model, entry.module.server_global_state(cfg, state))
        score = fid(model)
        stats = strategy.round_stats.get(server_round, {}) if strategy else {}
        client_rows = strategy.client_evals.get(server_round, []) if strategy else []
        now = time.time()
        row = {"round": server_round, "global_fid": score,
               "train_loss": stats.get("train_loss", math.nan),
               "upload_bytes": stats.get("upload_bytes", 0),
               "download_bytes": stats.get("download_bytes", 0),
               "eval_bytes": stats.get("eval_upload_bytes", 0) + stats.get("eval_download_bytes", 0),
               "num_updates": stats.get("num_updates", 0), "rejected": stats.get("rejected", 0),
               "failures": stats.get("failures", 0),
               **(summarize_client_evals(client_rows) if client_rows else {}),
               "wall_s": round(now - clock["last"], 2), "elapsed_s": round(now - clock["start"], 2)}
        clock["last"] = now
        recorder.add_round(row, [_client_row(r) for r in client_rows])
        if server_round == 0 or server_round % cfg.checkpoint_every == 0 \
                or server_round == cfg.num_server_rounds:
            folder = out / "checkpoints" / f"round-{server_round:04d}"
            if not full and server_round:
                save_adapter(lora_model, folder, entry.module.server_global_state(cfg, state))
                _write_state(out, server_round, recorder)
            save_grid(model, data.num_classes, folder / "grid.png", seed=cfg.seed)
            shutil.copyfile(folder / "grid.png", out / "grid.png")
        log.info("round %d/%d: global FID %.2f, generator loss %.3f, up %d B, down %d B, %.1fs",
                 server_round, cfg.num_server_rounds, score, row["train_loss"],
                 row["upload_bytes"], row["download_bytes"], row["wall_s"])
        return MetricRecord({"global-fid": score})

    if entry.server is None:  # centralized upper bound
        evaluate_global(0, entry.module.server_initial_state(cfg))
        final_state = train_centralized(cfg, num_clients, clients_per_round, evaluate_global)
        personal_rows = []
    else:
        initial_arrays = ArrayRecord(entry.module.server_initial_state(cfg))
        strategy = build_strategy(cfg, initial_arrays)
        strategy.node_order = partition_order(grid, cfg.round_timeout)
        result = strategy.start(grid=grid, initial_arrays=initial_arrays,
                                num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                                train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                                evaluate_fn=evaluate_global)
        final_arrays = result.arrays if len(result.arrays) else initial_arrays
        final_state = final_arrays.to_torch_state_dict()
        personal_rows = _personalize(cfg, grid, final_arrays)

    if not full:
        save_adapter(lora_model, out / "global-adapter",
                     entry.module.server_global_state(cfg, final_state))
    rounds = recorder.results["rounds"]
    last_fed = next((r for r in reversed(rounds) if _finite(r.get("local_global_fid"))), {})
    personalization = summarize_client_evals(personal_rows) if personal_rows else {}
    recorder.add_personalization([_client_row(r) for r in personal_rows])
    recorder.finish({
        "global_fid": rounds[-1]["global_fid"],
        "initial_global_fid": rounds[0]["global_fid"],
        "local_global_fid": last_fed.get("local_global_fid", math.nan),
        "personalized_fid": last_fed.get("personalized_fid", math.nan),
        "personalized_global_fid": last_fed.get("personalized_global_fid", math.nan),
        "protocol_global_fid": personalization.get("local_global_fid", math.nan),
        "protocol_personalized_fid": personalization.get("personalized_fid", math.nan),
        "protocol_clients": personalization.get("eval_clients", 0),
        "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
        "download_bytes_total": sum(r["download_bytes"] for r in rounds),
        "wall_s": round(time.time() - t0, 1),
    })
    log.info("FedGen-Edge image run finished: results in %s", out)


def _client_row(r: dict) -> dict:
    return {"partition_id": int(r.get("partition-id", -1)), "global_fid": r["global-fid"],
            "personal_fid": r["personal-fid"] if r.get("has-personal") else "",
            "images": int(r["fid-images"])}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
