"""model.precision: bf16 trains like fp32, keeps what trains in float32, and ``auto`` picks fp32
where the device has no native bf16 and says so."""

from __future__ import annotations

import logging

import pytest
import torch

from task import precision
from task.adapters import (
    compute_precision,
    get_adapter_state,
    initial_adapter_state,
    set_adapter_state,
    shared_full_model,
    shared_lora_model,
)
from task.lm.train import evaluate_nll, train_local
from task.lora_ops import set_base_correction


@pytest.fixture
def bf16_capability(monkeypatch):
    """Pretend this device does (True) or does not (False) have native bf16."""

    def pretend(has: bool) -> None:
        monkeypatch.setattr(precision, "fast_bf16",
                            lambda device: (has, "mocked " + ("with" if has else "without") + " bf16"))
        precision._auto.cache_clear()

    yield pretend
    precision._auto.cache_clear()


def _blocks(cfg, n=16):
    return torch.randint(0, 2000, (n, cfg.train.seq_len), generator=torch.Generator().manual_seed(1))


def test_auto_picks_fp32_without_native_bf16_and_says_so(tiny_cfg, bf16_capability, caplog):
    cfg = tiny_cfg.replace(**{"model.precision": "auto"})
    bf16_capability(False)
    with caplog.at_level(logging.INFO, logger="task.precision"):
        assert compute_precision(cfg) == "fp32"
    assert "auto -> fp32" in caplog.text and "without bf16" in caplog.text
    model = shared_lora_model(cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    bf16_capability(True)
    assert compute_precision(cfg) == "bf16"
    model = shared_lora_model(cfg)  # a separate shared model: the precision is in its key
    backbone = [p for n, p in model.named_parameters() if "lora_" not in n]
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    assert backbone and all(p.dtype == torch.bfloat16 for p in backbone)
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n and "lora_" in n)
    # explicit choices are taken as they are
    assert compute_precision(cfg.replace(**{"model.precision": "fp32"})) == "fp32"


def test_auto_keeps_fp32_for_a_task_that_trains_in_fp32_only(bf16_capability):
    from task.config import RunConfig

    bf16_capability(True)
    cfg = RunConfig.from_run_config({"task": "image", "data.dataset": "fashion-mnist",
                                     "data.partitioner": "dirichlet"})
    assert compute_precision(cfg) == "fp32"


def test_bf16_training_matches_fp32_and_changes_only_the_float32_adapter(tiny_cfg):
    """Same data, seed and initial adapter: the mean bf16 training loss of 4 AdamW steps is within
    0.1% of fp32's (tiny-gpt2's losses are about 10.8 nats and differ by about 1e-6 relative here;
    bf16 keeps 8 bits of mantissa), and so
    is the evaluation NLL after them."""
    blocks = _blocks(tiny_cfg)
    runs = {}
    for name in ("fp32", "bf16"):
        cfg = tiny_cfg.replace(**{"model.precision": name})
        model = shared_lora_model(cfg)
        set_base_correction(model, None, 0.0)  # the shared model as built: earlier tests use it
        start = initial_adapter_state(cfg)
        set_adapter_state(model, start)
        frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
        mean_loss = train_local(model, blocks, epochs=1, batch_size=4, lr=0.01, max_steps=4,
                                precision=name)
        after = get_adapter_state(model)
        nll = evaluate_nll(model, blocks, batch_size=4, precision=name)
        set_adapter_state(model, start)
        assert all(v.dtype == torch.float32 for v in after.values())
        assert any(not torch.equal(start[k], after[k]) for k in start), "the adapter trained"
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        runs[name] = mean_loss, nll.nll_sum / nll.tokens
    (fp32_loss, fp32_nll), (bf16_loss, bf16_nll) = runs["fp32"], runs["bf16"]
    assert abs(fp32_loss - bf16_loss) / fp32_loss < 1e-3, runs
    assert abs(fp32_nll - bf16_nll) / fp32_nll < 1e-3, runs
    assert fp32_loss != bf16_loss, "bf16 really computed in bf16"


def test_full_fine_tuning_keeps_float32_master_weights_under_bf16(tiny_cfg):
    cfg = tiny_cfg.replace(**{"model.precision": "bf16"})
    model = shared_full_model(cfg)
    before = {n: p.clone() for n, p in model.named_parameters()}
    train_local(model, _blocks(cfg, 4), epochs=1, batch_size=4, lr=1e-3, max_steps=1,
                precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_client_uploads_a_float32_adapter_from_a_bf16_backbone(tiny_cfg, tmp_path,
                                                                   monkeypatch):
    """The ClientApp's train handler (partition 0 of 4) under bf16: the reply's arrays are the
    float32 adapter, the same keys and dtype as fp32 sends."""
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        RecordDict,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import train
    from task.adapters import initial_adapter_state

    for key, value in (("_run_id", 5), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)
    cfg = tiny_cfg.replace(**{"model.precision": "bf16"})
    received = initial_adapter_state(cfg)
    context = Context(run_id=5, node_id=1, state=RecordDict(), run_config=cfg.flat(),
                      node_config={"partition-id": 0, "num-partitions": 4})
    message = Message(RecordDict({"arrays": ArrayRecord(received),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    reply = train(message, context)
    arrays = reply.content["arrays"]
    assert set(arrays) == set(received)
    assert {arrays[k].dtype for k in arrays} == {"float32"}
    uploaded = arrays.to_torch_state_dict()
    assert any(not torch.equal(uploaded[k], received[k]) for k in received)
