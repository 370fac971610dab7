"""ClientApp: train the shared backbone's LoRA adapter on local data; evaluate global vs personal.

The backbone is loaded once per process (task.model.shared_lora_model) and reused for every
client and round this process serves; a message only swaps adapter tensors in and out.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from task.config import RunConfig
from task.data import client_blocks
from task.model import (
    get_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_lora_model,
)
from task.train import evaluate_nll, train_local

app = ClientApp()


def _setup(msg: Message, context: Context):
    cfg = RunConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    model = shared_lora_model(cfg)
    set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    train_blocks, test_blocks = client_blocks(cfg, partition_id, num_partitions)
    return cfg, partition_id, model, train_blocks, test_blocks


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition_id, model, train_blocks, _ = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    loss = train_local(model, train_blocks, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                       lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                       max_steps=cfg.max_steps, seed=cfg.seed * 100_003 + server_round * 1009 + partition_id)
    adapter_state = get_adapter_state(model)
    # The client's personalized adapter is its latest locally trained one; it stays here.
    save_adapter(model, personal_adapter_dir(cfg, partition_id))
    metrics = MetricRecord({"num-examples": len(train_blocks), "train-loss": loss,
                            "partition-id": partition_id})
    return Message(RecordDict({"arrays": ArrayRecord(adapter_state), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition_id, model, _, test_blocks = _setup(msg, context)
    kwargs = dict(batch_size=cfg.batch_size, max_batches=cfg.client_eval_max_batches)
    global_eval = evaluate_nll(model, test_blocks, **kwargs)
    metrics = {"num-examples": global_eval.tokens, "partition-id": partition_id,
               "global-nll": global_eval.nll_sum, "global-tokens": global_eval.tokens,
               "personal-nll": 0.0, "personal-tokens": 0}
    personal_state = load_adapter_file(personal_adapter_dir(cfg, partition_id))
    if personal_state is not None:
        set_adapter_state(model, personal_state)
        personal_eval = evaluate_nll(model, test_blocks, **kwargs)
        metrics.update({"personal-nll": personal_eval.nll_sum,
                        "personal-tokens": personal_eval.tokens})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
