"""ClientApp: local training and evaluation, as the run's strategy prescribes.

The backbone is loaded once per process (task.model.shared_*_model) and reused for every
client and round this process serves; a message only swaps adapter (or, for fedavg-full,
model) tensors in and out. What is trained, uploaded and kept personal is the strategy
module's business (strategies/).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client_app.image import evaluate_image
from strategies import is_full_model, strategy_entry
from strategies.secagg import secure_aggregation_mod
from task.compression import compress_upload
from task.config import RunConfig
from task.image_train import kept_discriminator
from task.lora_ops import client_rank
from task.model import (
    load_tokenizer,
    node_state_dir,
    personal_adapter_dir,
    set_adapter_state,
    set_full_state,
    shared_full_model,
    shared_lora_model,
)
from task.node import NodeConfig, node_blocks
from task.threats import attacked_upload, backdoor_blocks, fails_this_round, malicious_partitions
from task.train import evaluate_nll, train_local

app = ClientApp()


def _setup(msg: Message, context: Context):
    node = NodeConfig.from_node_config(context.node_config)  # partition or own files, state dir
    cfg = node.run_config(RunConfig.from_run_config(context.run_config))
    arrays = msg.content.array_records.get("arrays")
    received = arrays.to_torch_state_dict() if arrays is not None else {}
    return cfg, node, received, node_blocks(cfg, node)


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Differential privacy: when the server sends a clipping norm (dp-noise-multiplier > 0),
    Flower's fixedclipping_mod clips this client's adapter change to it before upload."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# SecAgg+ first: it masks whatever the handler (and the DP mod under it) uploads.
@app.train(mods=[secure_aggregation_mod, dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    cfg, node, received, (train_blocks, _) = _setup(msg, context)
    partition_id = node.partition_id
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if fails_this_round(cfg, server_round, partition_id):  # simulated crash (client-failure-rate)
        raise RuntimeError(f"simulated failure of client {partition_id} in round {server_round}")
    seed = cfg.seed * 100_003 + server_round * 1009 + partition_id
    malicious = partition_id in malicious_partitions(cfg, node.num_partitions)
    if malicious and cfg.attack == "backdoor":
        train_blocks = backdoor_blocks(cfg, train_blocks, load_tokenizer(cfg), seed)
    with node_state_dir(node.run_state_path(context.run_id)), \
            kept_discriminator(_discriminator_file(cfg, partition_id)):  # the client's own state
        upload, loss = strategy_entry(cfg).module.client_train(cfg, received, partition_id,
                                                               train_blocks, seed, config)
        if malicious and upload is not None:  # simulated poisoning (attack, attack-fraction)
            upload = attacked_upload(cfg, received, upload)
        if upload is not None and cfg.upload_compression != "none":
            # the server decodes it (strategies/common.py); top-k's residual stays beside the
            # personal adapter
            upload = compress_upload(upload, received, cfg.upload_compression, seed=seed,
                                     topk_fraction=cfg.upload_topk_fraction,
                                     client_dir=personal_adapter_dir(cfg, partition_id).parent)
    content = RecordDict({"metrics": MetricRecord({"num-examples": len(train_blocks),
                                                   "train-loss": loss,
                                                   "partition-id": partition_id})})
    if upload is not None:
        content["arrays"] = ArrayRecord(upload)
    return Message(content, reply_to=msg)


def _discriminator_file(cfg: RunConfig, partition_id: int):
    """Image task: where the client keeps its private discriminator (beside its personal adapter)."""
    if cfg.task != "image" or not cfg.gan_keep_discriminator:
        return None
    return personal_adapter_dir(cfg, partition_id).parent / "discriminator.pt"


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which data partition this node holds (-1: its own data), so the server can sample the
    same clients in every run of a comparison."""
    partition_id = int(context.node_config.get("partition-id", -1))
    # The LoRA rank this device trains (its profile), for heterogeneous-rank strategies.
    rank = client_rank(RunConfig.from_run_config(context.run_config), context.node_config)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id,
                                                        "lora-rank": rank})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Local-test perplexity of the global model and of this client's personal one.

    With ``personalize`` in the config (the final phase), the personal model is the final global
    model fine-tuned for one local epoch (capped by max-steps), the paper's personalization
    protocol; strategies with a personal model of their own (PERSONAL_MODEL: ditto, fedper,
    local-only) start from that one instead.
    """
    config = msg.content["config"]
    if config.get("personalize") and str(context.node_config.get("partition-id", -1)) not in \
            str(config["personalize-partitions"]).split(","):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    cfg, node, received, (train_blocks, test_blocks) = _setup(msg, context)
    partition_id = node.partition_id
    module = strategy_entry(cfg).module
    with node_state_dir(node.run_state_path(context.run_id)), \
            kept_discriminator(_discriminator_file(cfg, partition_id)):
        if cfg.task == "image":  # FID on the client's own classes (client_app/image.py)
            metrics = evaluate_image(cfg, partition_id, received, train_blocks, test_blocks, config)
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
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
                    max_steps=cfg.max_steps, seed=cfg.seed + partition_id,
                    precision=cfg.precision)
        personal_eval = evaluate_nll(model, test_blocks, **kwargs)
    elif personal_state is not None:
        load(model, personal_state)
        personal_eval = evaluate_nll(model, test_blocks, **kwargs)
    if personal_eval is not None:
        metrics.update({"personal-nll": personal_eval.nll_sum,
                        "personal-tokens": personal_eval.tokens})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
