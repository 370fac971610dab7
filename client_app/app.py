"""ClientApp: local training and evaluation, as the run's strategy prescribes.

The backbone is loaded once per process (task.model.shared_*_model) and reused for every
client and round this process serves; a message only swaps adapter (or, for fedavg-full,
model) tensors in and out. What is trained, uploaded and kept personal is the strategy
module's business (strategies/).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.image import evaluate_image
from strategies import is_full_model, strategy_entry
from task.config import RunConfig
from task.data import client_blocks
from task.model import set_adapter_state, set_full_state, shared_full_model, shared_lora_model
from task.train import evaluate_nll, train_local

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    arrays = msg.content.array_records.get("arrays")
    received = arrays.to_torch_state_dict() if arrays is not None else {}
    return cfg, partition_id, received, client_blocks(cfg, partition_id, num_partitions)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition_id, received, (train_blocks, _) = _setup(msg, context)
    config = msg.content["config"]
    seed = cfg.seed * 100_003 + int(config["server-round"]) * 1009 + partition_id
    upload, loss = strategy_entry(cfg).module.client_train(cfg, received, partition_id,
                                                           train_blocks, seed, config)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(train_blocks),
                                                   "train-loss": loss,
                                                   "partition-id": partition_id})})
    if upload is not None:
        content["arrays"] = ArrayRecord(upload)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which data partition this node holds (-1: its own data), so the server can sample the
    same clients in every run of a comparison."""
    partition_id = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local-test perplexity of the global model and of this client's personal one.

    With ``personalize`` in the config (the final phase), the personal model is the final global
    model fine-tuned for one local epoch (capped by max-steps), the paper's personalization
    protocol; strategies with a personal model of their own (PERSONAL_MODEL: ditto, fedper,
    local-only) start from that one instead.
    """
    config = msg.content["config"]
    if config.get("personalize") and str(context.node_config["partition-id"]) not in \
            str(config["personalize-partitions"]).split(","):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    cfg, partition_id, received, (train_blocks, test_blocks) = _setup(msg, context)
    if cfg.task == "image":  # FID on the client's own classes (client_app/image.py)
        metrics = evaluate_image(cfg, partition_id, received, train_blocks, test_blocks, config)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    module = strategy_entry(cfg).module
    global_state, personal_state = module.client_eval_states(cfg, received, partition_id)
    full = is_full_model(cfg)
    model = shared_full_model(cfg) if full else shared_lora_model(cfg)
    load = set_full_state if full else set_adapter_state
    kwargs = dict(batch_size=cfg.batch_size, max_batches=cfg.client_eval_max_batches)

    load(model, global_state)
    global_eval = evaluate_nll(model, test_blocks, **kwargs)
    metrics = {"num-examples": global_eval.tokens, "partition-id": partition_id,
               "global-nll": global_eval.nll_sum, "global-tokens": global_eval.tokens,
               "personal-nll": 0.0, "personal-tokens": 0}
    personal_eval = None
    if config.get("personalize"):
        own = getattr(module, "PERSONAL_MODEL", False) and personal_state is not None
        load(model, personal_state if own else global_state)
        train_local(model, train_blocks, epochs=1, batch_size=cfg.batch_size,
                    lr=cfg.full_learning_rate if full else cfg.learning_rate,
                    weight_decay=cfg.weight_decay,
                    max_steps=cfg.max_steps, seed=cfg.seed + partition_id)
        personal_eval = evaluate_nll(model, test_blocks, **kwargs)
    elif personal_state is not None:
        load(model, personal_state)
        personal_eval = evaluate_nll(model, test_blocks, **kwargs)
    if personal_eval is not None:
        metrics.update({"personal-nll": personal_eval.nll_sum,
                        "personal-tokens": personal_eval.tokens})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
