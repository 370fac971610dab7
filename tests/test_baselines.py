"""Baseline strategies: the equivalences and byte counts the comparison rests on."""


import pytest
import torch

from bench.driver import federate
from strategies import ditto, fedavg_full, fedavg_lora, fedper, local_only
from strategies.registry import STRATEGIES
from task.adapters import (
    compute_precision,
    get_adapter_state,
    get_full_state,
    initial_adapter_state,
    load_adapter_file,
    personal_adapter_dir,
    save_adapter,
    set_adapter_state,
    shared_full_model,
    shared_lora_model,
)
from task.lm import data
from task.lm.train import train_local


def _perturbed(state, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture
def blocks(tiny_cfg):
    return data.client_blocks(tiny_cfg, 0, 20)[0]


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_every_strategy_module_has_the_client_and_server_functions():
    for name, entry in STRATEGIES.items():
        for fn in ("server_initial_state", "server_global_state"):
            assert callable(getattr(entry.module, fn)), (name, fn)
        if entry.server is not None:
            for fn in ("client_train", "client_eval_states"):
                assert callable(getattr(entry.module, fn)), (name, fn)


def test_fedper_with_every_layer_shared_equals_fedavg(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "fedper", "strategy.fedper-personal-layers": 0})
    received = _perturbed(initial_adapter_state(cfg))
    assert fedper.personal_keys(cfg, received) == set()
    up_fedper, loss_fedper = fedper.client_train(cfg, received, 0, blocks, seed=5, config={})
    up_fedavg, loss_fedavg = fedavg_lora.client_train(cfg, received, 1, blocks, seed=5, config={})
    _equal(up_fedper, up_fedavg)
    assert loss_fedper == loss_fedavg


def test_fedper_keeps_the_last_layers_personal(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "fedper", "strategy.fedper-personal-layers": 1})
    initial = initial_adapter_state(cfg)
    personal = fedper.personal_keys(cfg, initial)
    assert personal and all(".h.1." in k for k in personal)  # tiny-gpt2 has layers h.0, h.1
    received = fedper.server_initial_state(cfg)
    assert set(received) == set(initial) - personal
    upload, _ = fedper.client_train(cfg, received, 2, blocks, seed=5, config={})
    assert set(upload) == set(received), "personal layers never leave the client"
    saved = load_adapter_file(personal_adapter_dir(cfg, 2))
    assert set(saved) == set(initial) and any(
        not torch.equal(saved[k], initial[k]) for k in personal), "personal layers trained"


def test_ditto_with_lambda_zero_equals_local_only_training_of_the_personal_adapter(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.ditto-lambda": 0.0})
    start = _perturbed(initial_adapter_state(cfg), seed=2)
    model = shared_lora_model(cfg)
    for pid in (3, 4):  # the same saved personal adapter for both clients
        save_adapter(model, personal_adapter_dir(cfg, pid), start)
    received = _perturbed(initial_adapter_state(cfg), seed=3)  # a different global adapter
    upload, _ = ditto.client_train(cfg.replace(**{"strategy.name": "ditto"}), received, 3, blocks, 7, {})
    none, _ = local_only.client_train(cfg.replace(**{"strategy.name": "local-only"}), {}, 4, blocks, 7, {})
    assert none is None
    _equal(load_adapter_file(personal_adapter_dir(cfg, 3)), load_adapter_file(personal_adapter_dir(cfg, 4)))
    # and the global half of Ditto is FedAvg-LoRA's local training
    fedavg_upload, _ = fedavg_lora.client_train(cfg, received, 5, blocks, 7, {})
    _equal(upload, fedavg_upload)


def test_ditto_lambda_pulls_the_personal_adapter_toward_the_global(tiny_cfg, blocks):
    start = _perturbed(initial_adapter_state(tiny_cfg), scale=0.5, seed=2)
    received = initial_adapter_state(tiny_cfg)
    distances = []
    for lam, pid in ((0.0, 6), (50.0, 7)):
        cfg = tiny_cfg.replace(**{"strategy.name": "ditto", "strategy.ditto-lambda": lam})
        save_adapter(shared_lora_model(cfg), personal_adapter_dir(cfg, pid), start)
        ditto.client_train(cfg, received, pid, blocks, 7, {})
        v = load_adapter_file(personal_adapter_dir(cfg, pid))
        distances.append(sum(((v[k] - received[k]) ** 2).sum() for k in v).item())
    assert distances[1] < distances[0]


def test_local_only_moves_zero_model_bytes_through_the_real_handler_and_strategy(tiny_cfg):
    """Two rounds of local-only through the ClientApp's train handler and the server strategy:
    nothing is sent down or up but metrics, and each client's own adapter keeps training."""
    cfg = tiny_cfg.replace(**{"strategy.name": "local-only", "strategy.fraction-train": 1.0})
    assert local_only.server_initial_state(cfg) == {}
    stats = federate(cfg, 20, [[0, 1], [0, 1]])
    assert stats["upload_bytes"] == [0, 0, 0, 0] and stats["download_bytes"] == [0, 0]
    assert stats["rounds"][2]["num_updates"] == 2 and stats["rounds"][2]["upload_bytes"] == 0
    own = load_adapter_file(personal_adapter_dir(cfg, 0))
    assert any(not torch.equal(own[k], v) for k, v in initial_adapter_state(cfg).items())


def test_fedavg_with_one_client_equals_local_training(tiny_cfg):
    """One round of fedavg-lora with a single client, through the ClientApp handler and the
    server strategy, gives exactly that client's locally trained adapter."""
    cfg = tiny_cfg.replace(**{"strategy.fraction-train": 1.0})
    global_adapter = federate(cfg, 20, [[3]])["arrays"].to_torch_state_dict()

    model = shared_lora_model(cfg)  # plain local training from the same start, same seed
    set_adapter_state(model, initial_adapter_state(cfg))
    seed = cfg.seed * 100_003 + 1 * 1009 + 3  # the train handler's seed of round 1, client 3
    train_local(model, data.client_blocks(cfg, 3, 20)[0], epochs=cfg.train.local_epochs,
                batch_size=cfg.train.batch_size, lr=cfg.train.learning_rate,
                max_steps=cfg.train.max_steps, seed=seed, precision=compute_precision(cfg))
    local = get_adapter_state(model)
    assert local.keys() == global_adapter.keys()
    assert any(not torch.equal(local[k], v) for k, v in initial_adapter_state(cfg).items())
    for k in local:
        torch.testing.assert_close(global_adapter[k], local[k], rtol=1e-6, atol=1e-7)


def test_fedavg_full_trains_and_uploads_the_whole_model(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "fedavg-full"})
    initial = fedavg_full.server_initial_state(cfg)
    upload, _ = fedavg_full.client_train(cfg, initial, 0, blocks, seed=1, config={})
    n_params = sum(v.numel() for v in upload.values())
    _, backbone = __import__("task.lm.model", fromlist=["parameter_counts"]).parameter_counts(
        shared_lora_model(cfg))
    assert n_params == backbone  # every backbone weight travels
    changed = [k for k in upload if not torch.equal(upload[k], initial[k])]
    assert len(changed) > len(upload) // 2, "full fine-tuning moves the backbone weights"
    assert initial.keys() == get_full_state(shared_full_model(cfg)).keys() == upload.keys()


def test_centralized_pool_leaves_out_a_partition_too_small_to_use(tiny_cfg, monkeypatch, caplog):
    """A role with fewer tokens than one block fails its every federated call; the centralized
    pool leaves it out the same way (and says so) instead of failing the whole run."""
    from strategies import centralized
    from task.lm import TASK

    real = TASK.client_data

    def client_data(cfg, partition_id, num_partitions):
        if partition_id == 1:
            raise ValueError("5 tokens are fewer than one block of seq-len 32")
        return real(cfg, partition_id, num_partitions)

    monkeypatch.setattr(type(TASK), "client_data", lambda self, *a: client_data(*a))
    with caplog.at_level("WARNING", logger="flwr.fedgen_edge"):
        pooled = centralized.pooled_train_blocks(tiny_cfg, 3)
    expected = torch.cat([real(tiny_cfg, p, 3)[0] for p in (0, 2)])
    _equal({"pool": pooled}, {"pool": expected})
    assert "1 of 3 partitions left out" in caplog.text and "partition 1: 5 tokens" in caplog.text
    monkeypatch.setattr(type(TASK), "client_data", lambda self, *a: (_ for _ in ()).throw(ValueError("tiny")))
    with pytest.raises(ValueError, match="no usable partition among 3: tiny"):
        centralized.pooled_train_blocks(tiny_cfg, 3)
