"""ServerApp: federate LoRA adapters, evaluate the global one, write results as they happen."""

from __future__ import annotations

import json
import math
import shutil
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from strategies import build_strategy
from strategies.common import log, summarize_client_evals
from task.config import RunConfig
from task.data import global_test_blocks, load_corpus
from task.model import (
    get_adapter_state,
    parameter_counts,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)
from task.results import RunRecorder
from task.train import evaluate_nll

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)  # a bad key or value stops here
    out = cfg.output_path
    shutil.rmtree(out / "clients", ignore_errors=True)  # personal adapters of an earlier run
    log.info("FedGen-Edge: %s on %s/%s, strategy %s, output %s", cfg.backbone, cfg.dataset,
             cfg.partitioner, cfg.strategy, out)

    t0 = time.time()
    load_corpus(cfg)  # build the shared corpus cache once, before any client needs it
    model = shared_lora_model(cfg)
    test_blocks = global_test_blocks(cfg)
    adapter_params, backbone_params = parameter_counts(model)
    initial_arrays = ArrayRecord(get_adapter_state(model))
    strategy = build_strategy(cfg, initial_arrays)
    num_clients = len(list(grid.get_node_ids()))
    log.info("adapter %d parameters vs backbone %d (%.3f%%); %d clients; setup %.1fs",
             adapter_params, backbone_params, 100 * adapter_params / backbone_params,
             num_clients, time.time() - t0)

    recorder = RunRecorder(out, {
        "task": cfg.task, "backbone": cfg.backbone, "dataset": cfg.dataset,
        "partitioner": cfg.partitioner, "strategy": cfg.strategy, "num_clients": num_clients,
        "clients_per_round": max(1, int(num_clients * cfg.fraction_train)),
        "num_rounds": cfg.num_server_rounds, "adapter_params": adapter_params,
        "backbone_params": backbone_params, "global_test_tokens": _eval_tokens(cfg, test_blocks),
        "config": {RunConfig.key_of(k): v for k, v in cfg.__dict__.items()},
    })
    clock = {"start": time.time(), "last": time.time()}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter_state(model, arrays.to_torch_state_dict())
        result = evaluate_nll(model, test_blocks, batch_size=cfg.batch_size,
                              max_batches=cfg.eval_max_batches)
        stats = strategy.round_stats.get(server_round, {})
        personal = strategy.client_evals.get(server_round, [])
        fed = summarize_client_evals(personal)
        now = time.time()
        row = {"round": server_round, "global_ppl": result.perplexity,
               "train_loss": stats.get("train_loss", math.nan),
               "upload_bytes": stats.get("upload_bytes", 0),
               "download_bytes": stats.get("download_bytes", 0),
               "eval_bytes": stats.get("eval_upload_bytes", 0) + stats.get("eval_download_bytes", 0),
               "num_updates": stats.get("num_updates", 0), "rejected": stats.get("rejected", 0),
               "failures": stats.get("failures", 0), **fed,
               "wall_s": round(now - clock["last"], 2), "elapsed_s": round(now - clock["start"], 2)}
        clock["last"] = now
        recorder.add_round(row, [_client_row(r) for r in personal])
        if server_round and (server_round % cfg.checkpoint_every == 0
                             or server_round == cfg.num_server_rounds):
            save_adapter(model, out / "checkpoints" / f"round-{server_round:04d}")
            _write_state(out, server_round, recorder)
        log.info("round %d/%d: global ppl %.2f, train loss %.3f, up %d B, down %d B, %.1fs",
                 server_round, cfg.num_server_rounds, result.perplexity, row["train_loss"],
                 row["upload_bytes"], row["download_bytes"], row["wall_s"])
        return MetricRecord({"global-ppl": result.perplexity})

    result = strategy.start(grid=grid, initial_arrays=initial_arrays,
                            num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                            train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                            evaluate_fn=evaluate_global)

    set_adapter_state(model, result.arrays.to_torch_state_dict() if len(result.arrays)
                      else initial_arrays.to_torch_state_dict())
    save_adapter(model, out / "global-adapter")
    rounds = recorder.results["rounds"]
    last_fed = next((r for r in reversed(rounds) if _finite(r.get("local_global_ppl"))), {})
    recorder.finish({
        "global_ppl": rounds[-1]["global_ppl"],
        "initial_global_ppl": rounds[0]["global_ppl"],
        "local_global_ppl": last_fed.get("local_global_ppl", math.nan),
        "personalized_ppl": last_fed.get("personalized_ppl", math.nan),
        "personalized_global_ppl": last_fed.get("personalized_global_ppl", math.nan),
        "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
        "download_bytes_total": sum(r["download_bytes"] for r in rounds),
        "wall_s": round(time.time() - t0, 1),
    })
    log.info("FedGen-Edge finished: results in %s", out)


def _eval_tokens(cfg: RunConfig, blocks) -> int:
    n_blocks = min(len(blocks), cfg.batch_size * cfg.eval_max_batches)
    return n_blocks * (blocks.shape[1] - 1)


def _client_row(r: dict) -> dict:
    return {"partition_id": int(r.get("partition-id", -1)),
            "global_ppl": math.exp(r["global-nll"] / r["global-tokens"]),
            "personal_ppl": (math.exp(r["personal-nll"] / r["personal-tokens"])
                             if r.get("personal-tokens") else ""),
            "tokens": int(r["global-tokens"])}


def _write_state(out, server_round: int, recorder: RunRecorder) -> None:
    """Round state beside the checkpoint: what a resumed server needs to go on."""
    rounds = recorder.results["rounds"]
    state = {"round": server_round, "checkpoint": f"checkpoints/round-{server_round:04d}",
             "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
             "download_bytes_total": sum(r["download_bytes"] for r in rounds)}
    (out / "state.json").write_text(json.dumps(state, indent=2))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
