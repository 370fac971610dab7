"""The ClientApp's handlers: local training and evaluation, as the run's strategy prescribes.

Flower calls them through client_app/flower_app.py (the ClientApp and its mods), in the
ClientApp's own process or, with a device worker, in the warm ``fedgen-device`` process
(client_app/device_worker.py): the same functions either way.

The backbone is loaded once per process (task.adapters.shared_*_model) and reused for every
client and round this process serves; a message only swaps adapter (or, for fedavg-full,
model) tensors in and out. What is trained, uploaded and kept personal is the strategy
module's business (strategies/); how a model trains and is evaluated is the task's (task/).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client_app import simulated_threats as threats
from strategies.registry import Entry, check_run
from task import Task
from task.adapters import (
    client_dir,
    get_adapter_state,
    get_full_state,
    node_state_dir,
    personalized_adapter_dir,
    save_adapter,
    set_adapter_state,
    set_full_state,
    shared_full_model,
    shared_lora_model,
)
from task.compression import compress_upload
from task.config import RunConfig
from task.lora_ops import client_rank
from task.memory import release_freed_memory
from task.node import NodeConfig, node_data
from task.personalization import personalize


@dataclass
class Client:
    """One message's view of this client: the run, the node, what arrived, its data."""
    cfg: RunConfig
    task: Task
    strategy: Entry
    node: NodeConfig
    run_id: int
    received: dict
    config: dict
    train_data: object
    test_data: object

    @property
    def partition_id(self) -> int:
        return self.node.partition_id

    @contextmanager
    def state(self):
        """Within the block, the client's own state (its personal adapter, and the task's
        private state such as the image task's discriminator) lives in its folder: the
        SuperNode's state-dir, or the simulation layout under output-dir."""
        with node_state_dir(self.node.run_state_path(self.run_id)):
            with self.task.client_state(self.cfg, client_dir(self.cfg, self.partition_id)):
                yield


def setup(msg: Message, context: Context) -> Client:
    """The run config (checked as at start), this node's config and data, what arrived."""
    node = NodeConfig.from_node_config(context.node_config)  # partition or own files, state dir
    cfg = node.run_config(RunConfig.from_run_config(context.run_config).for_run(context.run_id))
    task, entry = check_run(cfg)
    arrays = msg.content.array_records.get("arrays")
    train_data, test_data = node_data(cfg, node)
    return Client(cfg, task, entry, node, context.run_id,
                  arrays.to_torch_state_dict() if arrays is not None else {},
                  msg.content["config"], train_data, test_data)


def train(msg: Message, context: Context) -> Message:
    client = setup(msg, context)
    cfg, pid, n = client.cfg, client.partition_id, client.node.num_partitions
    server_round = int(client.config["server-round"])
    seed = cfg.seed * 100_003 + server_round * 1009 + pid
    threats.raise_if_failing(cfg, server_round, pid)  # simulation only
    data = threats.poison_train_data(cfg, client.task, client.train_data, server_round, pid, n, seed)
    train_cfg = threats.attacker_config(cfg, server_round, pid, n)  # an attacker's own budget

    def train_on(blocks):
        return client.strategy.module.client_train(train_cfg, client.received, pid, blocks, seed,
                                                   client.config)

    with client.state():
        clean = threats.clean_twin(cfg, train_on, client.train_data, server_round, pid, n)
        upload, loss = train_on(data)
        upload = threats.poison_upload(cfg, client.received, upload, server_round, pid, n, clean)
        if upload is not None and cfg.upload.compression != "none":
            # the server decodes it (strategies/base.py); top-k's residual stays in the
            # client's folder
            upload = compress_upload(upload, client.received, cfg.upload.compression, seed=seed,
                                     topk_fraction=cfg.upload.topk_fraction,
                                     client_dir=client_dir(cfg, pid))

    content = RecordDict({"metrics": MetricRecord({"num-examples": len(data), "train-loss": loss,
                                                   "partition-id": pid})})
    if upload is not None:
        content["arrays"] = ArrayRecord(upload)
    return Message(content, reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Which data partition this node holds (-1: its own data), so the server can sample the
    same clients in every run of a comparison, and the LoRA rank this device trains (its
    profile, for heterogeneous-rank strategies)."""
    partition_id = int(context.node_config.get("partition-id", -1))
    rank = client_rank(RunConfig.from_run_config(context.run_config), context.node_config)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id,
                                                        "lora-rank": rank})}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """The task's metric on this client's local test data, of the global model and of its
    personal one.

    In rounds: the personal model is the strategy's own (capability personal_model: ditto,
    fedper, local-only, fedsa-lora), as current as the client's last training; the others have
    none (their last local adapter is not what a client would use, so it is not reported).
    With ``personalize`` in the config (the final phase): the personalization protocol
    (task/personalization.py) from the final global model (or the strategy's own personal
    model), its result saved in peft format in the client's folder (personalized-adapter).
    """
    config = msg.content["config"]
    if config.get("personalize") and str(context.node_config.get("partition-id", -1)) not in \
            str(config["personalize-partitions"]).split(","):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    client = setup(msg, context)
    cfg, task, pid = client.cfg, client.task, client.partition_id
    full = client.strategy.caps.full_model
    model = shared_full_model(cfg) if full else shared_lora_model(cfg)
    load = set_full_state if full else set_adapter_state
    evaluate_model = task.evaluator(cfg, client.test_data, seed=cfg.seed + pid, scope="client")

    with client.state():
        global_state, personal_state = client.strategy.module.client_eval_states(
            cfg, client.received, pid)
        if not client.strategy.caps.personal_model:
            personal_state = None
        load(model, global_state)
        global_stats = evaluate_model(model)
        personal_stats, protocol = None, {}
        if config.get("personalize"):
            chosen = personalize(task, cfg, model, global_state=global_state,
                                 start_state=personal_state, load=load,
                                 snapshot=get_full_state if full else get_adapter_state,
                                 train_data=client.train_data, seed=cfg.seed + pid,
                                 full_model=full)
            personal_stats, protocol = evaluate_model(model), chosen.metrics()
            if not full:  # a full model is the backbone's size: not kept per client
                save_adapter(model, personalized_adapter_dir(cfg, pid), chosen.state)
        elif personal_state is not None:
            load(model, personal_state)
            personal_stats = evaluate_model(model)

    metrics = {"num-examples": global_stats[task.caps.count], "partition-id": pid,
               **{f"global-{k}": v for k, v in global_stats.items()},
               **{f"personal-{k}": v for k, v in (personal_stats or {}).items()},
               **{f"protocol-{k}": v for k, v in protocol.items()}}
    release_freed_memory()  # evaluation ends a round: the process now waits
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
