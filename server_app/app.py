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
from strategies.records import log, pack_arrays, split_replies, unpack_arrays
from strategies.registry import build_strategy, check_run
from task import client_row, summarize_client_evals
from task.adapters import (
    get_adapter_state,
    get_full_state,
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
from task.personalization import personalize
from task.progress import Progress
from task.results import RunRecorder, released_rounds, restore_rounds, resume_point, robustness_summary

app = ServerApp()


# Seconds between the ServerApp's pulls for replies: Flower's deployment grid sleeps 3 s between
# pulls (superlink/grid/http_grid.py), a fixed cost per phase and round on a device; its
# in-memory (simulation) grid polls every 0.1 s. A pull is one local gRPC call.
REPLY_POLL_S = 0.1


class PromptGrid:
    """The run's Grid, answering ``send_and_receive`` as soon as the replies are in (polled
    every REPLY_POLL_S); everything else is the grid's own."""

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        self._grid, self._poll_s = grid, poll_s

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None, on_reply=None) -> list[Message]:
        """Flower's semantics (every reply, or what came before ``timeout``; None waits for
        all); ``on_reply(reply)`` runs as each one arrives. Model arrays travel packed, one
        Array per message (strategies/records.py); replies are unpacked before anyone sees them."""
        messages, packed = list(messages), {}
        for msg in messages:  # a packed copy of the content (one per shared record): the
            key = id(msg.content)  # strategy's records stay as built
            if key not in packed:
                copy = RecordDict(dict(msg.content.items()))
                packed[key] = copy if pack_arrays(copy) else None
            if packed[key] is not None:
                msg.content = packed[key]
        pending = set(self._grid.push_messages(messages))
        replies, deadline = [], None if timeout is None else time.time() + timeout
        while pending and (deadline is None or time.time() < deadline):
            for reply in self._grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                _unpack_reply(reply)
                replies.append(reply)
                if on_reply is not None:
                    on_reply(reply)
            if pending:
                time.sleep(self._poll_s)
        return replies


def _unpack_reply(reply: Message) -> None:
    """A packed reply's arrays in place; a malformed one stays packed, so the strategy rejects
    it as an update without arrays (logged here with its node)."""
    if reply.has_error():
        return
    try:
        unpack_arrays(reply.content)
    except ValueError as err:
        log.warning("reply from node %s: %s", reply.metadata.src_node_id, err)


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PromptGrid(grid)
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
    evaluate_round = task.evaluator(cfg, test_data, seed=cfg.seed, scope="round")  # the curve
    evaluate_whole = task.evaluator(cfg, test_data, seed=cfg.seed, scope="whole")  # round 0, final
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
        # of the simulated split (partition ids); a node training on its own files has none
        "partition": task.partition_stats(cfg, num_clients),
        "config": cfg.flat(),
    }, figures=task.caps.figures, counts=task.caps.counts, metric_label=task.caps.metric_label)
    if resumed is not None:
        restore_rounds(recorder, out, start_round)
        recorder.results["resumed_after_round"] = start_round
    clock = {"start": time.time(), "last": time.time()}
    strategy = None

    def evaluate_global(server_round: int, arrays: ArrayRecord | dict) -> MetricRecord:
        eval_start = time.time()
        state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
        global_state = entry.module.server_global_state(cfg, state)
        load(model, global_state)
        figures = task.figures([_prefixed(evaluate_round(model))], "global")
        value = figures[m]
        whole = {}
        if server_round in (0, cfg.num_server_rounds):  # the figures results.json reports
            whole = {f"whole_{k}": v
                     for k, v in task.figures([_prefixed(evaluate_whole(model))], "global").items()}
        stats = strategy.round_stats.get(server_round, {}) if strategy else {}
        client_rows = strategy.client_evals.get(server_round, []) if strategy else []
        now = time.time()
        row = {"round": server_round, **{f"global_{k}": v for k, v in figures.items()}, **whole,
               "train_loss": stats.get("train_loss", math.nan),
               "upload_bytes": stats.get("upload_bytes", 0),
               "download_bytes": stats.get("download_bytes", 0),
               "eval_bytes": stats.get("eval_upload_bytes", 0) + stats.get("eval_download_bytes", 0),
               "num_updates": stats.get("num_updates", 0), "rejected": stats.get("rejected", 0),
               "dropped": stats.get("dropped", 0),
               "update_norm_median": stats.get("update_norm_median", math.nan),
               "update_norm_max": stats.get("update_norm_max", math.nan),
               "failures": stats.get("failures", 0), "retries": stats.get("retries", 0),
               "skipped": stats.get("skipped", 0), "dp_epsilon": stats.get("dp_epsilon"),
               **summarize_client_evals(task, client_rows),
               "aggregation_error": stats.get("aggregation_error", math.nan),
               **task.attack_metrics(cfg, model, test_data),
               "train_phase_s": stats.get("train_phase_s", math.nan),
               "aggregate_s": stats.get("aggregate_s", math.nan),
               "server_eval_s": round(time.time() - eval_start, 3),
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
        if whole:
            log.info("round %d: global %s %.2f on the whole global test set (%s)", server_round,
                     m, whole[f"whole_{m}"], ", ".join(f"{k[6:]} {v:,}" for k, v in whole.items()
                                                       if isinstance(v, int)))
        return MetricRecord({f"global-{m}": value})

    if entry.server is None:  # centralized upper bound: no federation
        evaluate_global(0, entry.module.server_initial_state(cfg))
        final_state = train_centralized(cfg, num_clients, clients_per_round, evaluate_global)
        personal_rows = _centralized_personalize(cfg, task, model, load, final_state, num_clients,
                                                 full)
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
        personal_rows = _personalize(cfg, grid, final_arrays, task)

    if not full:
        save_adapter(lora_model, out / "global-adapter",
                     entry.module.server_global_state(cfg, final_state))
    rounds = recorder.results["rounds"]
    last_fed = next((r for r in reversed(rounds) if _finite(r.get(f"local_global_{m}"))), {})
    first, last = rounds[0], rounds[-1]
    protocol = summarize_client_evals(task, personal_rows)
    gains = recorder.add_personalization([client_row(task, r) for r in personal_rows])
    recorder.finish({
        # the whole global test set (the curve's rounds in between: a subset, round_eval_tokens)
        **{f"global_{k}": last.get(f"whole_{k}", math.nan) for k in task.caps.figures},
        **{f"initial_global_{k}": first.get(f"whole_{k}", math.nan) for k in task.caps.figures},
        **{f"global_test_{k}": last.get(f"whole_{k}", 0) for k in task.caps.counts},
        f"round_global_{m}": last[f"global_{m}"],
        # the last in-round client evaluation (own personal models only: capability personal_model)
        **{f"{prefix}_{k}": last_fed.get(f"{prefix}_{k}", math.nan)
           for prefix in ("local_global", "personalized", "personalized_global")
           for k in task.caps.figures},
        # the personalization protocol (task/personalization.py) on the same clients' local tests
        **{f"protocol_global_{k}": protocol[f"local_global_{k}"] for k in task.caps.figures},
        **{f"protocol_personalized_{k}": protocol[f"personalized_{k}"] for k in task.caps.figures},
        **{f"protocol_{k}": protocol[f"local_global_{k}"] for k in task.caps.counts},
        "protocol_clients": protocol["eval_clients"],
        "protocol_improved_share": gains["improved_share"],
        "protocol_mean_gain": gains["mean_gain"], "protocol_median_gain": gains["median_gain"],
        "protocol_wilcoxon_p": gains["wilcoxon_p"],
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
    partition = node_partitions(grid, timeout)
    return sorted(partition, key=partition.get)


def node_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """Node id -> the partition id it reports (a query to every node: config only, no arrays)."""
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
    return partition


def personalization_partitions(cfg: RunConfig, num_clients: int, data_source=None) -> list[int]:
    """The clients of the personalization protocol: a seeded sample of partition ids, the same
    in every run of a suite (node ids are not: they are drawn anew each run). With
    ``data_source`` (the task: its ``client_data``),
    only partitions the protocol can measure count: a local test to score and at least two
    training rows (one to fit, one to validate); an unusable draw is replaced by the next
    partition in the same seeded order, so a small role or label partition does not shrink
    the protocol below ``server.personalize-clients``."""
    k = min(cfg.server.personalize_clients, num_clients)
    rng = random.Random(cfg.seed)
    first = rng.sample(range(num_clients), k)
    if data_source is None:
        return sorted(first)
    drawn = set(first)
    rest = [pid for pid in range(num_clients) if pid not in drawn]
    rng.shuffle(rest)
    chosen = []
    for pid in first + rest:
        if len(chosen) == k:
            break
        try:
            train_data, test = data_source.client_data(cfg, pid, num_clients)
        except ValueError:  # e.g. fewer tokens than one block: nothing to train or test on
            continue
        if len(test) and len(train_data) >= 2:
            chosen.append(pid)
    return sorted(chosen)


def _personalize(cfg: RunConfig, grid: Grid, final_arrays: ArrayRecord, task=None) -> list[dict]:
    """Paper 4.4.3, made safe: the sampled clients run the personalization protocol
    (task/personalization.py) from the final model and report the local-test figures of the
    global and of the personalized model, and what the protocol chose. Only the chosen
    partitions' nodes get the message, with the final model (asked again now: a node may have
    rejoined under a new id); sending it to every node cost most of a 500-client run's protocol."""
    if not cfg.server.personalize_clients:
        return []
    partition = node_partitions(grid, cfg.server.round_timeout)
    chosen = personalization_partitions(cfg, len(list(grid.get_node_ids())), task)
    nodes = sorted(n for n, pid in partition.items() if pid in chosen)
    record = RecordDict({"arrays": final_arrays, "config": ConfigRecord({
        "personalize": True, "personalize-partitions": ",".join(map(str, chosen)),
        "server-round": 0})})
    log.info("personalization: clients %s run the protocol from the final model", chosen)
    replies = _send_and_receive_with_progress(
        grid, [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes],
        cfg.server.round_timeout, Progress("personalization", len(chosen), "clients"))
    valid, _, _ = split_replies(replies, lambda node: None, "personalization")
    rows = [{k: float(v) for k, v in next(iter(m.content.metric_records.values())).items()}
            for m, _, _ in valid]
    return [r for r in rows if r.get("num-examples", 0) > 0]


def _send_and_receive_with_progress(grid: Grid, messages: list[Message], timeout: float,
                                    progress: Progress) -> list[Message]:
    """``grid.send_and_receive``, counting the replies that did work (an error, or a
    ``num-examples`` > 0) as they come, so a long phase shows how far it is."""
    def count(reply: Message) -> None:
        metrics = [] if reply.has_error() else list(reply.content.metric_records.values())
        if reply.has_error() or any(m.get("num-examples", 0) > 0 for m in metrics):
            progress.update()

    grid = grid if isinstance(grid, PromptGrid) else PromptGrid(grid)
    return grid.send_and_receive(messages, timeout=timeout, on_reply=count)


def _centralized_personalize(cfg: RunConfig, task, model, load, state, num_clients: int,
                             full: bool) -> list[dict]:
    """The pooled model under the same personalization protocol, on the data of the clients the
    protocol would sample (run here: a centralized baseline has no clients to ask)."""
    rows = []
    for pid in personalization_partitions(cfg, num_clients, task):
        train_data, test = task.client_data(cfg, pid, num_clients)
        evaluate_model = task.evaluator(cfg, test, seed=cfg.seed + pid, scope="client")
        load(model, state)
        global_stats = evaluate_model(model)
        chosen = personalize(task, cfg, model, global_state=state, start_state=None, load=load,
                             snapshot=get_full_state if full else get_adapter_state,
                             train_data=train_data, seed=cfg.seed + pid, full_model=full)
        rows.append({"partition-id": pid, "num-examples": global_stats[task.caps.count],
                     **{f"global-{k}": v for k, v in global_stats.items()},
                     **{f"personal-{k}": v for k, v in evaluate_model(model).items()},
                     **{f"protocol-{k}": v for k, v in chosen.metrics().items()}})
    return rows


def _prefixed(stats: dict, which: str = "global") -> dict:
    """An evaluator's result as a client-reply row (``global-nll``, ...) for task.figures."""
    return {f"{which}-{k}": v for k, v in stats.items()}


def _write_state(out, server_round: int, recorder: RunRecorder) -> None:
    """Round state beside the checkpoint: what a resumed server needs to go on."""
    rounds = recorder.results["rounds"]
    state = {"round": server_round, "checkpoint": f"checkpoints/round-{server_round:04d}",
             "upload_bytes_total": sum(r["upload_bytes"] for r in rounds),
             "download_bytes_total": sum(r["download_bytes"] for r in rounds)}
    (out / "state.json").write_text(json.dumps(state, indent=2))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
