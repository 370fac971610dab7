"""ServerApp: run the configured strategy, evaluate the global model, write results as they happen."""

from __future__ import annotations

import json
import math
import random
import shutil
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from strategies import build_strategy, is_full_model, strategy_entry
from strategies.centralized import train_centralized
from strategies.common import log, sample_node_ids, split_replies, summarize_client_evals
from task.config import ConfigError, RunConfig
from task.data import client_blocks, global_test_blocks, load_corpus
from task.model import (
    load_tokenizer,
    parameter_counts,
    save_adapter,
    set_adapter_state,
    set_full_state,
    shared_full_model,
    shared_lora_model,
)
from server_app.image import main_image
from task.privacy import PrivacyAccountant
from task.results import RunRecorder, released_rounds, restore_rounds, resume_point, robustness_summary
from task.threats import backdoor_success
from task.train import evaluate_nll

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)  # a bad key or value stops here
    if cfg.task == "image":  # conditional image generation: server_app/image.py
        return main_image(grid, cfg)
    entry = strategy_entry(cfg)
    out = cfg.output_path
    resumed = resume_point(cfg, out)  # (last checkpointed round, its state) with resume = true
    if resumed is None:
        shutil.rmtree(out / "clients", ignore_errors=True)  # personal models of an earlier run
    log.info("FedGen-Edge: %s on %s/%s, strategy %s, output %s", cfg.backbone, cfg.dataset,
             cfg.partitioner, cfg.strategy, out)

    t0 = time.time()
    load_corpus(cfg)  # build the shared corpus cache once, before any client needs it
    full = is_full_model(cfg)
    lora_model = shared_lora_model(cfg)
    model = shared_full_model(cfg) if full else lora_model
    load = set_full_state if full else set_adapter_state
    test_blocks = global_test_blocks(cfg)
    adapter_params, backbone_params = parameter_counts(lora_model)
    initial_state = entry.module.server_initial_state(cfg)
    start_round = 0
    if resumed is not None:  # go on from the checkpoint: its global adapter, the real round
        start_round, checkpoint = resumed
        initial_state = {k: checkpoint[k] for k in initial_state}  # the sent keys, in order
        log.info("resuming after round %d from %s", start_round, out / "state.json")
    initial_arrays = ArrayRecord(initial_state)
    wait_for_nodes(grid, cfg.min_available_nodes)
    num_clients = len(list(grid.get_node_ids()))
    clients_per_round = max(1, int(num_clients * cfg.fraction_train))
    log.info("adapter %d parameters vs backbone %d (%.3f%%); %d clients; setup %.1fs",
             adapter_params, backbone_params, 100 * adapter_params / backbone_params,
             num_clients, time.time() - t0)

    recorder = RunRecorder(out, {
        "task": cfg.task, "backbone": cfg.backbone, "dataset": cfg.dataset,
        "partitioner": cfg.partitioner, "strategy": cfg.strategy, "num_clients": num_clients,
        "clients_per_round": clients_per_round, "num_rounds": cfg.num_server_rounds,
        "adapter_params": adapter_params, "backbone_params": backbone_params,
        "trained_params": backbone_params if full else adapter_params,
        "global_test_tokens": _eval_tokens(cfg, test_blocks),
        "config": {RunConfig.key_of(k): v for k, v in cfg.__dict__.items()},
    })
    if resumed is not None:
        restore_rounds(recorder, out, start_round)
        recorder.results["resumed_after_round"] = start_round
    clock = {"start": time.time(), "last": time.time()}
    strategy = None

    def evaluate_global(server_round: int, arrays: ArrayRecord | dict) -> MetricRecord:
        state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
        load(model, entry.module.server_global_state(cfg, state))
        result = evaluate_nll(model, test_blocks, batch_size=cfg.batch_size,
                              max_batches=cfg.eval_max_batches)
        stats = strategy.round_stats.get(server_round, {}) if strategy else {}
        client_rows = strategy.client_evals.get(server_round, []) if strategy else []
        now = time.time()
        row = {"round": server_round, "global_ppl": result.perplexity,
               "train_loss": stats.get("train_loss", math.nan),
               "upload_bytes": stats.get("upload_bytes", 0),
               "download_bytes": stats.get("download_bytes", 0),
               "eval_bytes": stats.get("eval_upload_bytes", 0) + stats.get("eval_download_bytes", 0),
               "num_updates": stats.get("num_updates", 0), "rejected": stats.get("rejected", 0),
               "failures": stats.get("failures", 0), "retries": stats.get("retries", 0),
               "skipped": stats.get("skipped", 0), "dp_epsilon": stats.get("dp_epsilon"),
               **summarize_client_evals(client_rows),
               "aggregation_error": stats.get("aggregation_error", math.nan),
               "wall_s": round(now - clock["last"], 2), "elapsed_s": round(now - clock["start"], 2)}
        clock["last"] = now
        if cfg.attack == "backdoor":  # how well the trigger phrase works on the global model
            row.update(backdoor_success(cfg, model, load_tokenizer(cfg), test_blocks))
        recorder.add_round(row, [_client_row(r) for r in client_rows])
        if server_round and not full and (server_round % cfg.checkpoint_every == 0
                                          or server_round == cfg.num_server_rounds):
            save_adapter(lora_model, out / "checkpoints" / f"round-{server_round:04d}",
                         entry.module.server_global_state(cfg, state))
            _write_state(out, server_round, recorder)
        log.info("round %d/%d: global ppl %.2f, train loss %.3f, up %d B, down %d B, %.1fs",
                 server_round, cfg.num_server_rounds, result.perplexity, row["train_loss"],
                 row["upload_bytes"], row["download_bytes"], row["wall_s"])
        return MetricRecord({"global-ppl": result.perplexity})

    if entry.server is None:  # centralized upper bound: no federation
        if resumed is not None:
            raise ConfigError("run-config key 'resume': centralized runs cannot resume")
        evaluate_global(0, entry.module.server_initial_state(cfg))
        final_state = train_centralized(cfg, num_clients, clients_per_round, evaluate_global)
        personal_rows = _centralized_local_eval(cfg, model, load, final_state, num_clients)
    else:
        strategy = build_strategy(cfg, initial_arrays)
        strategy.node_order = partition_order(grid, cfg.round_timeout)
        if cfg.dp_noise_multiplier:
            strategy.privacy = PrivacyAccountant(cfg.dp_noise_multiplier,
                                                 clients_per_round / num_clients, cfg.dp_delta)
            if released_rounds(recorder):  # privacy already spent before a resume
                strategy.privacy.step(released_rounds(recorder))
        strategy.round_offset = start_round
        result = strategy.start(
            grid=grid, initial_arrays=initial_arrays,
            num_rounds=cfg.num_server_rounds - start_round, timeout=cfg.round_timeout,
            train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
            # Flower counts from round 1 again after a resume; the checkpoint is already evaluated
            evaluate_fn=lambda r, arrays: (evaluate_global(r + start_round, arrays)
                                           if r or not start_round else None))
        final_arrays = result.arrays if len(result.arrays) else initial_arrays
        final_state = final_arrays.to_torch_state_dict()
        personal_rows = _personalize(cfg, grid, final_arrays)

    if not full:
        save_adapter(lora_model, out / "global-adapter",
                     entry.module.server_global_state(cfg, final_state))
    rounds = recorder.results["rounds"]
    last_fed = next((r for r in reversed(rounds) if _finite(r.get("local_global_ppl"))), {})
    personalization = summarize_client_evals(personal_rows)
    recorder.add_personalization([_client_row(r) for r in personal_rows])
    recorder.finish({
        "global_ppl": rounds[-1]["global_ppl"],
        "initial_global_ppl": rounds[0]["global_ppl"],
        "local_global_ppl": last_fed.get("local_global_ppl", math.nan),
        "personalized_ppl": last_fed.get("personalized_ppl", math.nan),
        "personalized_global_ppl": last_fed.get("personalized_global_ppl", math.nan),
        # the personalization protocol: the final model fine-tuned one local epoch per client
        "protocol_global_ppl": personalization["local_global_ppl"],
        "protocol_personalized_ppl": personalization["personalized_ppl"],
        "protocol_clients": personalization["eval_clients"],
        "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
        "download_bytes_total": sum(r["download_bytes"] for r in rounds),
        "wall_s": round(time.time() - t0, 1),
        **robustness_summary(rounds),
    })
    log.info("FedGen-Edge finished: results in %s", out)


def wait_for_nodes(grid: Grid, count: int) -> None:
    """Deployment: devices connect when they connect; start once ``count`` are online."""
    while (connected := len(list(grid.get_node_ids()))) < count:
        log.info("waiting for SuperNodes: %d of min-available-nodes %d connected", connected, count)
        time.sleep(3)


def partition_order(grid: Grid, timeout: float) -> list[int]:
    """Node ids sorted by the partition id each node reports (a query to every node)."""
    nodes = list(grid.get_node_ids())
    record = RecordDict({"config": ConfigRecord({"server-round": 0})})
    replies = grid.send_and_receive(
        [Message(content=record, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes],
        timeout=timeout)
    partition = {}
    for reply in replies:
        if not reply.has_error() and reply.content.metric_records:
            pid = next(iter(reply.content.metric_records.values())).get("partition-id", -1)
            if isinstance(pid, int) and pid >= 0:
                partition[reply.metadata.src_node_id] = pid
    log.info("%d of %d nodes reported a partition id", len(partition), len(nodes))
    return sorted(partition, key=partition.get)


def personalization_partitions(cfg: RunConfig, num_clients: int) -> list[int]:
    """The clients of the personalization protocol: a seeded sample of partition ids, the same
    in every run of a suite (node ids are not: they are drawn anew each run)."""
    k = min(cfg.personalize_clients, num_clients)
    return sorted(random.Random(cfg.seed).sample(range(num_clients), k))


def _personalize(cfg: RunConfig, grid: Grid, final_arrays: ArrayRecord) -> list[dict]:
    """Paper 4.4.3: the sampled clients fine-tune the final model one local epoch and report the
    local-test perplexity of the global and of the personalized model. Every node gets the
    message; only the chosen partitions do the work (the others answer at once)."""
    if not cfg.personalize_clients:
        return []
    nodes = sorted(grid.get_node_ids())
    chosen = personalization_partitions(cfg, len(nodes))
    record = RecordDict({"arrays": final_arrays, "config": ConfigRecord({
        "personalize": True, "personalize-partitions": ",".join(map(str, chosen)),
        "server-round": 0})})
    log.info("personalization: clients %s fine-tune the final model", chosen)
    replies = grid.send_and_receive(
        [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes],
        timeout=cfg.round_timeout)
    valid, _, _ = split_replies(replies, None, "personalization")
    rows = [{k: float(v) for k, v in next(iter(m.content.metric_records.values())).items()}
            for m, _, _ in valid]
    return [r for r in rows if r.get("global-tokens", 0) > 0 or r.get("fid-images", 0) > 0]


def _centralized_local_eval(cfg: RunConfig, model, load, state, num_clients: int) -> list[dict]:
    """The pooled model on the local test sets of the clients the protocol would sample."""
    load(model, state)
    rows = []
    for pid in personalization_partitions(cfg, num_clients):
        _, test = client_blocks(cfg, pid, num_clients)
        ev = evaluate_nll(model, test, batch_size=cfg.batch_size,
                          max_batches=cfg.client_eval_max_batches)
        rows.append({"partition-id": pid, "global-nll": ev.nll_sum, "global-tokens": ev.tokens,
                     "personal-nll": 0.0, "personal-tokens": 0})
    return rows


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
