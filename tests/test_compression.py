"""Uplink compression codecs: error bounds, unbiasedness, error feedback, bytes, server decoding."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.records import array_spec, model_bytes
from strategies.fedavg_lora import FedAvgLoRA
from task.compression import (compress_upload, decode_update, encode_update, layout_of,
                              residual_path)
from task.config import ConfigError, RunConfig

# SmolLM2-135M's rank-8 q/v LoRA layout, 3 layers of its 30 (shapes, not values, matter here).
SHAPES = {}
for layer in range(3):
    for proj, out in (("q_proj", 576), ("v_proj", 192)):
        SHAPES[f"model.layers.{layer}.self_attn.{proj}.lora_A.weight"] = (8, 576)
        SHAPES[f"model.layers.{layer}.self_attn.{proj}.lora_B.weight"] = (out, 8)


def _states(seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    reference = {k: torch.randn(s, generator=g) * 0.05 for k, s in SHAPES.items()}
    update = {k: v + torch.randn(v.shape, generator=g) * scale for k, v in reference.items()}
    return reference, update


def _roundtrip(codec, update, reference, seed=0, **kw):
    encoded, residual = encode_update(update, reference, codec, seed=seed, **kw)
    return decode_update({k: v.numpy() for k, v in encoded.items()}, layout_of(update),
                         {k: v.numpy() for k, v in reference.items()}), residual


@pytest.mark.parametrize("codec", ["int8", "int8-row"])
def test_int8_error_is_below_one_quantization_step(codec):
    reference, update = _states()
    decoded, _ = _roundtrip(codec, update, reference)
    for k in SHAPES:
        delta = update[k] - reference[k]
        err = (decoded[k] - update[k]).abs()
        if codec == "int8":
            assert err.max() <= delta.abs().max() / 127 * 1.0001
        else:  # one scale per slice along the smaller dimension
            dim = 0 if delta.shape[0] <= delta.shape[1] else 1
            step = delta.abs().amax(dim=1 - dim, keepdim=True) / 127
            assert (err <= step * 1.0001 + 1e-7).all()
        assert decoded[k].dtype == torch.float32 and decoded[k].shape == update[k].shape


def test_int8_row_is_tighter_than_per_tensor_on_uneven_rows():
    reference, update = _states()
    key = next(iter(SHAPES))
    update[key] = reference[key] + torch.logspace(-3, 0, 8).reshape(8, 1) * torch.randn(8, 576)
    err = {c: (_roundtrip(c, update, reference)[0][key] - update[key]).abs().mean()
           for c in ("int8", "int8-row")}
    assert err["int8-row"] < 0.5 * err["int8"]


def test_stochastic_rounding_is_unbiased_on_average():
    reference, update = _states()
    key = next(iter(SHAPES))
    reference, update = {key: reference[key]}, {key: update[key]}  # one tensor: fast
    mean = torch.stack([_roundtrip("int8", update, reference, seed=s)[0][key]
                        for s in range(400)]).mean(0)
    step = (update[key] - reference[key]).abs().max() / 127
    single = (_roundtrip("int8", update, reference, seed=0)[0][key] - update[key]).abs().mean()
    # the mean of 400 independent roundings converges to the value (error ~ step / sqrt(400))
    assert (mean - update[key]).abs().mean() < 0.1 * single
    assert (mean - update[key]).abs().max() < 0.25 * step


def test_bf16_relative_error_and_topk_sends_exact_values():
    reference, update = _states()
    decoded, _ = _roundtrip("bf16", update, reference)
    for k in SHAPES:
        delta = update[k] - reference[k]
        assert ((decoded[k] - reference[k]) - delta).abs().max() <= delta.abs().max() * 2 ** -8
    decoded, residual = _roundtrip("topk", update, reference, topk_fraction=0.1)
    flat_sent = torch.cat([(decoded[k] - reference[k]).reshape(-1) for k in sorted(SHAPES)])
    flat_delta = torch.cat([(update[k] - reference[k]).reshape(-1) for k in sorted(SHAPES)])
    sent = flat_sent != 0
    assert sent.float().mean() == pytest.approx(0.1, abs=0.01)
    torch.testing.assert_close(flat_sent[sent], flat_delta[sent], rtol=0, atol=1e-6)
    torch.testing.assert_close(residual, flat_delta - flat_sent)  # what was not sent is kept


def test_error_feedback_accumulates_the_residual_and_persists_it(tmp_path):
    """Sent + residual always equals the sum of all updates: nothing is lost, only delayed."""
    reference = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total = torch.zeros(sum(np.prod(s) for s in SHAPES.values()))
    sent_total = torch.zeros_like(total)
    for rnd in range(5):
        _, update = _states(seed=rnd, scale=0.01)
        update = {k: v - v.mean() for k, v in update.items()}
        encoded = compress_upload(update, reference, "topk", seed=rnd, topk_fraction=0.05,
                                  client_dir=tmp_path)
        decoded = decode_update({k: v.numpy() for k, v in encoded.items()}, layout_of(update), {})
        total += torch.cat([update[k].reshape(-1) for k in sorted(SHAPES)])
        sent_total += torch.cat([decoded[k].reshape(-1) for k in sorted(SHAPES)])
        from safetensors.torch import load_file
        residual = load_file(str(residual_path(tmp_path)))["residual"]
        torch.testing.assert_close(sent_total + residual, total, rtol=0, atol=1e-5)
    assert residual.abs().sum() > 0


def test_compressed_uploads_are_at_least_4x_smaller_on_the_wire():
    reference, update = _states()
    def wire(codec, **kw):
        encoded, _ = encode_update(update, reference, codec, **kw)
        return model_bytes(RecordDict({"arrays": ArrayRecord(encoded)}))
    fp32 = wire("none")
    assert fp32 >= 4 * sum(np.prod(s) for s in SHAPES.values())
    assert fp32 / wire("bf16") > 1.9
    assert fp32 / wire("int8") > 3.8 and fp32 / wire("int8-row") > 3.8  # 4.0x on all 30 layers
    assert fp32 / wire("topk", topk_fraction=0.1) > 4.5


@pytest.fixture
def server_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def _reply(node_id, arrays):
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}),
                   reply_to=instruction)


def test_server_decodes_before_aggregating_and_rejects_a_bad_payload(server_identity, caplog):
    reference, update = _states()
    sent = ArrayRecord({k: Array(v.numpy()) for k, v in reference.items()})
    strategy = FedAvgLoRA(spec=array_spec(sent), seed=1, num_rounds=1, fraction_train=1.0,
                          fraction_evaluate=1.0)
    strategy._sent_arrays = sent  # what configure_train records
    good, _ = encode_update(update, reference, "int8-row", seed=3)
    bad = dict(good)
    bad["codec:scales"] = good["codec:scales"][:-1]  # truncated
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, [_reply(1, good), _reply(7, bad)])
    assert metrics["num-updates"] == 1 and strategy.round_stats[1]["rejected"] == 1
    assert "node 7" in caplog.text
    expected, _ = _roundtrip("int8-row", update, reference, seed=3)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k].numpy(), rtol=1e-6)
    # the upload counter holds the compressed bytes that crossed the wire
    assert strategy.round_stats[1]["upload_bytes"] < model_bytes(RecordDict({"arrays": sent}))


def test_upload_compression_keys_are_validated():
    with pytest.raises(ConfigError, match="'upload.compression'"):
        RunConfig.from_run_config({"upload.compression": "zip"})
    with pytest.raises(ConfigError, match="'upload.topk-fraction'"):
        RunConfig.from_run_config({"upload.topk-fraction": 0.0})
