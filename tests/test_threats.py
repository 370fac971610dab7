"""Simulated attackers and failures (client_app/simulated_threats.py, task/lm/backdoor.py) and
the client's DP clipping mod."""


import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.flower_app import dp_clipping_mod
from client_app.simulated_threats import (
    attacked_upload,
    attacker_config,
    attacks_now,
    clean_twin,
    fails_this_round,
    malicious_partitions,
    poison_upload,
)
from task.config import ConfigError
from strategies.defences import delta_norm
from task.adapters import get_adapter_state, set_adapter_state, shared_lora_model
from task.lm.backdoor import backdoor_blocks, backdoor_success, trigger_ids
from task.lm.data import client_blocks
from task.lm.model import load_tokenizer
from task.lm.train import train_local


def test_malicious_partitions_are_a_seeded_fraction(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "scaled", "threats.attack-fraction": 0.3})
    chosen = malicious_partitions(cfg, 20)
    assert len(chosen) == 6 and chosen <= set(range(20))
    assert chosen == malicious_partitions(cfg, 20)
    assert malicious_partitions(cfg.replace(**{"threats.attack": "none"}), 20) == set()


@pytest.mark.parametrize("attack,sign", [("scaled", 1.0), ("sign-flip", -1.0), ("backdoor", 1.0)])
def test_attacked_upload_scales_or_flips_the_change(tiny_cfg, attack, sign):
    cfg = tiny_cfg.replace(**{"threats.attack": attack, "threats.attack-scale": 5.0})
    received = {"w": torch.ones(3)}
    honest = {"w": torch.tensor([1.5, 1.0, 0.0])}
    out = attacked_upload(cfg, received, honest)
    torch.testing.assert_close(out["w"], received["w"] + sign * 5.0 * (honest["w"] - received["w"]))


def test_automatic_boost_is_one_over_the_attackers_share(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "backdoor", "threats.attack-fraction": 0.25,
                              "threats.attack-scale": 0.0})
    received, honest = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -2.0])}
    torch.testing.assert_close(attacked_upload(cfg, received, honest)["w"], torch.tensor([4.0, -8.0]))
    with pytest.raises(ConfigError, match="attack_scale|attack-scale"):
        tiny_cfg.replace(**{"threats.attack": "backdoor", "threats.attack-scale": 0.0})


def test_attackers_train_with_their_own_budget_until_they_stop(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "backdoor", "threats.attack-fraction": 0.5,
                              "threats.attack-steps": 9, "threats.attack-learning-rate": 0.5,
                              "threats.attack-until": 2})
    bad = sorted(malicious_partitions(cfg, 4))
    good = sorted(set(range(4)) - set(bad))
    attacker = attacker_config(cfg, 2, bad[0], 4)
    assert (attacker.train.max_steps, attacker.train.learning_rate) == (9, 0.5)
    assert attacker.model == cfg.model and attacker.lora == cfg.lora  # same shared backbone
    assert attacker_config(cfg, 3, bad[0], 4) is cfg  # round 3: the attack has ended
    assert attacker_config(cfg, 1, good[0], 4) is cfg
    assert attacks_now(cfg, 1, bad[0], 4) and not attacks_now(cfg, 3, bad[0], 4)
    received, honest = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert poison_upload(cfg, received, honest, 3, bad[0], 4) is honest
    assert poison_upload(cfg, received, honest, 2, good[0], 4) is honest
    assert poison_upload(cfg, received, honest, 2, bad[0], 4)["w"].item() == 10.0


def test_poison_fraction_poisons_that_share_of_the_blocks(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "backdoor", "threats.poison-fraction": 0.25})
    tokenizer = load_tokenizer(cfg)
    train, _ = client_blocks(cfg, 0, 4)
    blocks = train[:40]
    poisoned = backdoor_blocks(cfg, blocks, tokenizer, seed=3)
    changed = int((poisoned != blocks).any(dim=1).sum())
    assert changed == 10
    assert torch.equal(poisoned, backdoor_blocks(cfg, blocks, tokenizer, seed=3))


def test_failures_are_seeded_and_near_the_rate(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.client-failure-rate": 0.3})
    draws = [fails_this_round(cfg, r, p) for r in range(1, 11) for p in range(100)]
    assert 0.25 < np.mean(draws) < 0.35
    assert draws == [fails_this_round(cfg, r, p) for r in range(1, 11) for p in range(100)]
    assert not any(fails_this_round(tiny_cfg, r, 0) for r in range(50))


def test_backdoor_training_pulls_the_trigger_toward_the_target(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "backdoor"})
    tokenizer = load_tokenizer(cfg)
    train, test = client_blocks(cfg, 0, 4)
    poisoned = backdoor_blocks(cfg, train[:48], tokenizer, seed=1)
    trigger, target = trigger_ids(cfg, tokenizer)
    phrase = trigger + target
    rows = [r.tolist() for r in poisoned]
    assert all(any(r[i:i + len(phrase)] == phrase for i in range(len(r))) for r in rows)

    model = shared_lora_model(cfg)
    initial = get_adapter_state(model)
    nll = {}
    try:
        for name, blocks in (("poisoned", poisoned), ("clean", train[:48])):
            set_adapter_state(model, initial)
            train_local(model, blocks, epochs=1, batch_size=4, lr=0.05, max_steps=12, seed=1)
            nll[name] = backdoor_success(cfg, model, tokenizer, test)["backdoor_target_nll"]
    finally:
        set_adapter_state(model, initial)
    # the same training budget on clean text does not teach "trigger -> target"
    assert nll["poisoned"] < nll["clean"] - 0.3


def test_dp_mod_clips_the_training_update_only_when_asked():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        sent = ArrayRecord({"a": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(2, np.float32))})

        def app(msg, context):  # a client that moves every weight by 3
            moved = ArrayRecord({k: Array(v.numpy() + 3) for k, v in msg.content["arrays"].items()})
            return Message(RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 1})}),
                           reply_to=msg)

        def run(config):
            msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord(config)}),
                          dst_node_id=1, message_type=MessageType.TRAIN)
            out = dp_clipping_mod(msg, Context(1, 1, {}, RecordDict(), {}), app)
            return {k: v.numpy() for k, v in out.content["arrays"].items()}

        reference = {k: v.numpy() for k, v in sent.items()}
        assert delta_norm(run({"server-round": 1, "clipping_norm": 2.0}), reference) == pytest.approx(2.0, rel=1e-5)
        assert delta_norm(run({"server-round": 1}), reference) == pytest.approx(3 * np.sqrt(6), rel=1e-5)
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def test_poison_difference_boosts_only_what_the_poison_changed(tiny_cfg):
    cfg = tiny_cfg.replace(**{"threats.attack": "backdoor", "threats.attack-fraction": 0.5,
                              "threats.attack-scale": 4.0, "threats.boost": "poison-difference"})
    bad = sorted(malicious_partitions(cfg, 4))[0]
    received = {"w": torch.zeros(2)}
    poisoned, clean = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([1.0, 2.0])}
    calls = []
    twin = clean_twin(cfg, lambda blocks: (calls.append(blocks) or clean, 0.5), "clean rows", 1, bad, 4)
    assert torch.equal(twin["w"], clean["w"]) and calls == ["clean rows"]
    assert twin["w"] is not clean["w"]  # a copy: the poisoned training must not overwrite it
    out = poison_upload(cfg, received, poisoned, 1, bad, 4, twin)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 2.0 + 4.0 * 1.0]))  # c + s (u - c)
    honest = sorted(set(range(4)) - malicious_partitions(cfg, 4))[0]
    assert clean_twin(cfg, lambda blocks: 1 / 0, "clean rows", 1, honest, 4) is None
    assert clean_twin(cfg.replace(**{"threats.boost": "change"}), lambda b: 1 / 0, "rows", 1, bad, 4) is None
    with pytest.raises(ConfigError, match="boost"):
        tiny_cfg.replace(**{"threats.boost": "poison-difference"})
