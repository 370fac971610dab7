"""ServerApp: one flow for every task and strategy.

Steps: check the run config (a bad key, value or combination stops here), prepare the task,
resume from the last checkpoint or start afresh, wait for the nodes, order them by partition,
train (federated through the strategy, or centralized), evaluate the global model every round,
checkpoint it with the round state, run the personalization protocol, write the results.
Everything task-specific is asked of ``get_task(cfg)`` (task/), everything strategy-specific of
its registry entry (strategies/registry.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from strategies.centralized import train_centralized
from strategies.records import log, split_replies
from strategies.registry import build_strategy, check_run
from task import client_row, score, summarize_client_evals
from task.adapters import (
    save_adapter,
    set_adapter_state,
    set_full_state,
    shared_full_model,
    shared_lora_model,
    torch_device,
)
from task.config import RunConfig, point_latest_at
from task.memory import release_freed_memory
from task.precision import precision_record
from task.privacy import PrivacyAccountant
from task.progress import Progress
from task.results import RunRecorder, released_rounds, restore_rounds, resume_point, robustness_summary

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)  # a bad key or value stops here
    task, entry = check_run(cfg)  # so does an option the task or strategy cannot honour
    cfg = cfg.for_run(context.run_id)  # output-dir: this run's own folder (or resume's)
    m, out, t0 = task.caps.metric, cfg.output_path, time.time()
    resumed = resume_point(cfg, out)  # (last checkpointed round, its state) with resume = true
    if resumed is None:
        shutil.rmtree(out / "clients", ignore_errors=True)  # personal state of an earlier run
    out.mkdir(parents=True, exist_ok=True)
    if RunConfig.from_run_config(context.run_config).names_each_run():
        point_latest_at(out)
    log.info("FedGen-Edge: task %s, %s on %s/%s, strategy %s, output %s", task.name,
             task.backbone_name(cfg), cfg.data.dataset, cfg.data.partitioner, cfg.strategy.name, out)

    precision = precision_record(cfg, torch_device(cfg))  # what model.precision means here
    log.info("model.precision = %s: the server computes in %s on %s (%s)", precision["requested"],
             precision["server"], precision["device"], precision["hardware"])

    # The task's shared caches (corpus and LDA fit, or the pre-trained generator), the models.
    prepared = task.prepare(cfg)
    full = entry.caps.full_model
    lora_model = shared_lora_model(cfg)
    model = shared_full_model(cfg) if full else lora_model
    load = set_full_state if full else set_adapter_state
    test_data = task.global_test_data(cfg)
    evaluate = task.evaluator(cfg, test_data, seed=cfg.seed, server=True)
    adapter_params, backbone_params = task.parameter_counts(lora_model)

    initial_state, start_round = entry.module.server_initial_state(cfg), 0
    if resumed is not None:  # go on from the checkpoint: its global adapter, the real round
        start_round, checkpoint = resumed
        initial_state = {k: checkpoint[k] for k in initial_state}  # the sent keys, in order
        log.info("resuming after round %d from %s", start_round, out / "state.json")
    wait_for_nodes(grid, cfg.server.min_available_nodes)
    num_clients = len(list(grid.get_node_ids()))
    clients_per_round = max(1, int(num_clients * cfg.strategy.fraction_train))
    log.info("adapter %d parameters vs backbone %d (%.3f%%); %d clients; setup %.1fs",
             adapter_params, backbone_params, 100 * adapter_params / backbone_params,
             num_clients, time.time() - t0)

    recorder = RunRecorder(out, {
        "task": cfg.task, "backbone": task.backbone_name(cfg), "dataset": cfg.data.dataset,
        "partitioner": cfg.data.partitioner, "strategy": cfg.strategy.name,
        "num_clients": num_clients, "clients_per_round": clients_per_round,
        "num_rounds": cfg.num_server_rounds, "adapter_params": adapter_params,
        "backbone_params": backbone_params,
        "trained_params": backbone_params if full else adapter_params,
        "metric": m, **task.header(cfg, test_data), **prepared, "precision": precision,
        "config": cfg.flat(),
    }, metric=m, metric_label=task.caps.metric_label)
    if resumed is not None:
        restore_rounds(recorder, out, start_round)
        recorder.results["resumed_after_round"] = start_round
    clock = {"start": time.time(), "last": time.time()}
    strategy = None

    def evaluate_global(server_round: int, arrays: ArrayRecord | dict) -> MetricRecord:
        state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
        global_state = entry.module.server_global_state(cfg, state)
        load(model, global_state)
        value = score(task, evaluate(model))
        stats = strategy.round_stats.get(server_round, {}) if strategy else {}
        client_rows = strategy.client_evals.get(server_round, []) if strategy else []
        now = time.time()
        row = {"round": server_round, f"global_{m}": value,
               "train_loss": stats.get("train_loss", math.nan),
               "upload_bytes": stats.get("upload_bytes", 0),
               "download_bytes": stats.get("download_bytes", 0),
               "eval_bytes": stats.get("eval_upload_bytes", 0) + stats.get("eval_download_bytes", 0),
               "num_updates": stats.get("num_updates", 0), "rejected": stats.get("rejected", 0),
               "failures": stats.get("failures", 0), "retries": stats.get("retries", 0),
               "skipped": stats.get("skipped", 0), "dp_epsilon": stats.get("dp_epsilon"),
               **summarize_client_evals(task, client_rows),
               "aggregation_error": stats.get("aggregation_error", math.nan),
               **task.attack_metrics(cfg, model, test_data),
               "wall_s": round(now - clock["last"], 2), "elapsed_s": round(now - clock["start"], 2)}
        clock["last"] = now
        recorder.add_round(row, [client_row(task, r) for r in client_rows])
        release_freed_memory()  # the server now waits for a round: its evaluation's pages go back
        if server_round % cfg.server.checkpoint_every == 0 or server_round == cfg.num_server_rounds:
            folder = out / "checkpoints" / f"round-{server_round:04d}"
            if server_round and not full:
                save_adapter(lora_model, folder, global_state)
                _write_state(out, server_round, recorder)
            for path in task.render_samples(cfg, model, folder):  # the latest beside results
                shutil.copyfile(path, out / path.name)
        log.info("round %d/%d: global %s %.2f, train loss %.3f, up %d B, down %d B, %.1fs",
                 server_round, cfg.num_server_rounds, m, value, row["train_loss"],
                 row["upload_bytes"], row["download_bytes"], row["wall_s"])
        return MetricRecord({f"global-{m}": value})

    if entry.server is None:  # centralized upper bound: no federation
        evaluate_global(0, entry.module.server_initial_state(cfg))
        final_state = train_centralized(cfg, num_clients, clients_per_round, evaluate_global)
        personal_rows = _centralized_local_eval(cfg, task, model, load, final_state, num_clients)
    else:
        privacy = None
        if cfg.dp.enabled:  # epsilon per released round; a resume accounts the rounds before it
            privacy = PrivacyAccountant(cfg.dp.noise_multiplier, clients_per_round / num_clients,
                                        cfg.dp.delta)
            if released_rounds(recorder):
                privacy.step(released_rounds(recorder))
        initial_arrays = ArrayRecord(initial_state)
        strategy = build_strategy(cfg, initial_arrays, privacy=privacy, round_offset=start_round,
                                  node_order=partition_order(grid, cfg.server.round_timeout))
        result = strategy.start(
            grid=grid, initial_arrays=initial_arrays,
            num_rounds=cfg.num_server_rounds - start_round, timeout=cfg.server.round_timeout,
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
    last_fed = next((r for r in reversed(rounds) if _finite(r.get(f"local_global_{m}"))), {})
    protocol = summarize_client_evals(task, personal_rows)
    recorder.add_personalization([client_row(task, r) for r in personal_rows])
    recorder.finish({
        f"global_{m}": rounds[-1][f"global_{m}"],
        f"initial_global_{m}": rounds[0][f"global_{m}"],
        f"local_global_{m}": last_fed.get(f"local_global_{m}", math.nan),
        f"personalized_{m}": last_fed.get(f"personalized_{m}", math.nan),
        f"personalized_global_{m}": last_fed.get(f"personalized_global_{m}", math.nan),
        # the personalization protocol: the final model fine-tuned one local epoch per client
        f"protocol_global_{m}": protocol[f"local_global_{m}"],
        f"protocol_personalized_{m}": protocol[f"personalized_{m}"],
        "protocol_clients": protocol["eval_clients"],
        "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
        "download_bytes_total": sum(r["download_bytes"] for r in rounds),
        "wall_s": round(time.time() - t0, 1),
        **robustness_summary(rounds),
    })
    log.info("FedGen-Edge finished: results in %s", out)


def wait_for_nodes(grid: Grid, count: int) -> None:
    """Deployment: devices connect when they connect; start once ``count`` are online."""
    while (connected := len(list(grid.get_node_ids()))) < count:
        log.info("waiting for SuperNodes: %d of server.min-available-nodes %d connected",
                 connected, count)
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
    k = min(cfg.server.personalize_clients, num_clients)
    return sorted(random.Random(cfg.seed).sample(range(num_clients), k))


def _personalize(cfg: RunConfig, grid: Grid, final_arrays: ArrayRecord) -> list[dict]:
    """Paper 4.4.3: the sampled clients fine-tune the final model one local epoch and report the
    local-test metric of the global and of the personalized model. Every node gets the
    message; only the chosen partitions do the work (the others answer at once)."""
    if not cfg.server.personalize_clients:
        return []
    nodes = sorted(grid.get_node_ids())
    chosen = personalization_partitions(cfg, len(nodes))
    record = RecordDict({"arrays": final_arrays, "config": ConfigRecord({
        "personalize": True, "personalize-partitions": ",".join(map(str, chosen)),
        "server-round": 0})})
    log.info("personalization: clients %s fine-tune the final model", chosen)
    replies = _send_and_receive_with_progress(
        grid, [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes],
        cfg.server.round_timeout, Progress("personalization", len(chosen), "clients"))
    valid, _, _ = split_replies(replies, lambda node: None, "personalization")
    rows = [{k: float(v) for k, v in next(iter(m.content.metric_records.values())).items()}
            for m, _, _ in valid]
    return [r for r in rows if r.get("num-examples", 0) > 0]


def _send_and_receive_with_progress(grid: Grid, messages: list[Message], timeout: float,
                                    progress: Progress, poll_s: float = 1.0) -> list[Message]:
    """``grid.send_and_receive``, counting the replies that did work (an error, or a
    ``num-examples`` > 0) as they come, so a long phase shows how far it is."""
    pending = set(grid.push_messages(messages))
    replies, deadline = [], time.time() + timeout
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            metrics = [] if reply.has_error() else list(reply.content.metric_records.values())
            if reply.has_error() or any(m.get("num-examples", 0) > 0 for m in metrics):
                progress.update()
        if pending:
            time.sleep(poll_s)
    return replies


def _centralized_local_eval(cfg: RunConfig, task, model, load, state, num_clients: int) -> list[dict]:
    """The pooled model on the local test sets of the clients the protocol would sample (no
    personal model: it is the same model everywhere)."""
    load(model, state)
    rows = []
    for pid in personalization_partitions(cfg, num_clients):
        _, test = task.client_data(cfg, pid, num_clients)
        stats = task.evaluator(cfg, test, seed=cfg.seed + pid, server=False)(model)
        rows.append({"partition-id": pid, **{f"global-{k}": v for k, v in stats.items()}})
    return rows


def _write_state(out, server_round: int, recorder: RunRecorder) -> None:
    """Round state beside the checkpoint: what a resumed server needs to go on."""
    rounds = recorder.results["rounds"]
    state = {"round": server_round, "checkpoint": f"checkpoints/round-{server_round:04d}",
             "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
             "download_bytes_total": sum(r["download_bytes"] for r in rounds)}
    (out / "state.json").write_text(json.dumps(state, indent=2))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
