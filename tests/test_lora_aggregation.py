"""Exact and heterogeneous-rank LoRA aggregation: the aggregation error on synthetic client
updates (fedavg-lora inexact, the exact methods at float precision), and what each method
trains, uploads and keeps."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies import fedex_lora, fedsa_lora, ffa_lora, flora, hetlora
from strategies.registry import STRATEGIES, check_run
from strategies.records import array_spec, wire_bytes
from strategies.fedavg_lora import FedAvgLoRA
from strategies.lora_aggregation import Correction
from task.lm import data
from task.config import ConfigError, RunConfig
from task.lora_ops import (
    A_SUFFIX,
    B_SUFFIX,
    client_rank,
    dense_correction,
    mean_of_products,
    pad_rank,
    product_error,
    rank_assignment,
    rank_of,
    set_base_correction,
    split_correction,
    truncate_rank,
)
from task.adapters import get_adapter_state, initial_adapter_state, load_adapter_file, personal_adapter_dir, set_adapter_state, shared_lora_model

ROOT = Path(__file__).resolve().parents[1]
OUT, IN, RANK = 40, 30, 4
PREFIXES = ("m.layers.0.q", "m.layers.1.v")
KEYS = [p + s for p in PREFIXES for s in (A_SUFFIX, B_SUFFIX)]


@pytest.fixture(autouse=True)
def _serverapp_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


@pytest.fixture(autouse=True)
def _no_correction_left(tiny_cfg):
    """The correction lives on the process-wide model: clear it for the other tests."""
    yield
    set_base_correction(shared_lora_model(tiny_cfg), None, 1.0)


# ------------------------------------------------------------------ synthetic updates
def _update(seed: int, rank: int = RANK, shared_a: dict | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in PREFIXES:
        out[p + A_SUFFIX] = (shared_a[p + A_SUFFIX] if shared_a else
                             rng.normal(size=(rank, IN)).astype(np.float32))
        out[p + B_SUFFIX] = rng.normal(size=(OUT, rank)).astype(np.float32)
    return out


def _reply(node: int, state: dict, weight: int) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                               "metrics": MetricRecord({"num-examples": weight, "train-loss": 1.0})}),
                   reply_to=ins)


def _spec(rank: int = RANK) -> dict:
    return array_spec(ArrayRecord({k: Array(v) for k, v in _update(0, rank).items()}))


def _rank_aware(cls, rank: int = RANK, heterogeneous: bool = False):
    return cls(spec=None, seed=1, num_rounds=3, fraction_train=1.0, fraction_evaluate=1.0,
               adapter_spec=_spec(rank), max_rank=rank, heterogeneous=heterogeneous)


WEIGHTS = [10, 30, 60]


def _np(arrays: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in arrays.items()}


def _global_product(state: dict) -> dict:
    """B @ A of the global adapter plus the correction, per layer (what the global model adds)."""
    adapter, corr = split_correction(state)
    dense = dense_correction({k: torch.from_numpy(v) for k, v in corr.items()})
    out = {}
    for p in PREFIXES:
        prod = (adapter[p + B_SUFFIX].astype(np.float64) @ adapter[p + A_SUFFIX]
                if p + A_SUFFIX in adapter else 0.0)
        out[p] = prod + (dense[p].double().numpy() if p in dense else 0.0)
    return out


def test_fedavg_lora_is_inexact_and_the_exact_methods_are_exact_at_float_precision():
    updates = [_update(s) for s in (1, 2, 3)]
    exact = mean_of_products(updates, WEIGHTS)
    replies = [_reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))]

    fedavg = FedAvgLoRA(spec=_spec(), seed=1, num_rounds=3, fraction_train=1.0, fraction_evaluate=1.0)
    arrays, _ = fedavg.aggregate_train(1, replies)
    fedavg_error = product_error(_global_product(_np(arrays)), exact)
    assert fedavg_error > 0.1  # the cross terms B_i A_j of separate averaging
    assert fedavg.round_stats[1]["aggregation_error"] == pytest.approx(fedavg_error)

    for cls in (fedex_lora.FedExLoRA, flora.FLoRA):
        strategy = _rank_aware(cls)
        arrays, _ = strategy.aggregate_train(1, replies)
        error = product_error(_global_product(_np(arrays)), exact)
        assert error < 1e-6, cls.__name__
        assert strategy.round_stats[1]["aggregation_error"] < 1e-6

    # ffa-lora: everyone shares the frozen A; only B travels.
    frozen = _update(9)
    b_updates = [{k: v for k, v in _update(s, shared_a=frozen).items() if k.endswith(B_SUFFIX)}
                 for s in (1, 2, 3)]
    fixed = {k: v for k, v in frozen.items() if k.endswith(A_SUFFIX)}
    ffa = ffa_lora.FFALoRA(spec=array_spec(ArrayRecord({k: Array(v) for k, v in b_updates[0].items()})),
                           seed=1, num_rounds=3, fraction_train=1.0, fraction_evaluate=1.0,
                           fixed_arrays=fixed)
    arrays, _ = ffa.aggregate_train(1, [_reply(i + 1, u, w) for i, (u, w) in
                                        enumerate(zip(b_updates, WEIGHTS))])
    exact_ffa = mean_of_products([{**fixed, **u} for u in b_updates], WEIGHTS)
    assert set(_np(arrays)) == {k for k in KEYS if k.endswith(B_SUFFIX)}
    assert product_error(_global_product({**fixed, **_np(arrays)}), exact_ffa) < 1e-6
    assert ffa.round_stats[1]["aggregation_error"] < 1e-6


def test_fedex_correction_accumulates_exactly_over_rounds():
    strategy = _rank_aware(fedex_lora.FedExLoRA)
    total = {p: 0.0 for p in PREFIXES}
    for rnd in (1, 2, 3):
        updates = [_update(10 * rnd + s) for s in (1, 2, 3)]
        arrays, _ = strategy.aggregate_train(rnd, [_reply(i + 1, u, w) for i, (u, w)
                                                   in enumerate(zip(updates, WEIGHTS))])
        state = _np(arrays)
        exact = mean_of_products(updates, WEIGHTS)
        adapter, corr = split_correction(state)
        for p in PREFIXES:  # new global = old correction + this round's exact mean of products
            prev_total = total[p]
            total[p] = _global_product(state)[p]
            round_update = total[p] - prev_total
            if rnd > 1:  # the old adapter product is replaced by the new one
                round_update += prev_adapter[p]
            np.testing.assert_allclose(round_update, exact[p], atol=1e-4)
        prev_adapter = {p: adapter[p + B_SUFFIX].astype(np.float64) @ adapter[p + A_SUFFIX]
                        for p in PREFIXES}


def test_correction_switches_to_dense_when_factors_get_larger():
    c = Correction()
    rng = np.random.default_rng(0)
    b, a = rng.normal(size=(OUT, 3)), rng.normal(size=(3, IN))
    c.add("x", b, a)
    assert set(c.to_arrays()) == {"x.correction_B", "x.correction_A"}
    for _ in range(5):  # rank 18 >= 40*30 / 70: dense is smaller
        c.add("x", b, a)
    arrays = c.to_arrays()
    assert set(arrays) == {"x.correction_dense"}
    np.testing.assert_allclose(arrays["x.correction_dense"], 6 * b @ a, rtol=1e-5, atol=1e-5)


def test_flora_stacking_is_exact_for_mixed_ranks():
    updates = [_update(1, 2), _update(2, 4), _update(3, 3)]
    strategy = _rank_aware(flora.FLoRA, heterogeneous=True)
    strategy.node_rank = {1: 2, 2: 4, 3: 3}
    arrays, _ = strategy.aggregate_train(1, [_reply(i + 1, u, w) for i, (u, w) in
                                             enumerate(zip(updates, WEIGHTS))])
    state = _np(arrays)
    assert state["m.layers.0.q.correction_B"].shape == (OUT, 2 + 4 + 3)  # stacked rank = sum r_i
    assert product_error(_global_product(state), mean_of_products(updates, WEIGHTS)) < 1e-6
    assert strategy.round_stats[1]["num_updates"] == 3


# ------------------------------------------------------------------ heterogeneous ranks
class _Grid:
    """A grid whose nodes answer the rank query from a table."""

    def __init__(self, ranks: dict[int, int]):
        self.ranks = ranks

    def get_node_ids(self):
        return list(self.ranks)

    def send_and_receive(self, messages, timeout=None):
        return [Message(RecordDict({"metrics": MetricRecord({"lora-rank": self.ranks[m.metadata.dst_node_id]})}),
                        reply_to=m) for m in messages]


def test_hetlora_serves_each_client_its_rank_and_aggregates_all_ranks():
    strategy = _rank_aware(hetlora.HetLoRA, rank=8, heterogeneous=True)
    ranks = {11: 2, 12: 8, 13: 4}
    global_state = _update(0, 8)
    messages = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in global_state.items()}),
                                        ConfigRecord(), _Grid(ranks))
    replies = []
    for m in messages:
        rank = ranks[m.metadata.dst_node_id]
        received = _np(m.content["arrays"])
        assert m.content["config"]["lora-rank"] == rank
        assert received["m.layers.0.q" + A_SUFFIX].shape == (rank, IN)
        np.testing.assert_array_equal(received["m.layers.0.q" + B_SUFFIX],
                                      global_state["m.layers.0.q" + B_SUFFIX][:, :rank])
        replies.append(_reply(m.metadata.dst_node_id, _update(rank, rank), 10))
    # download bytes: exactly what was sent, less than three full-rank adapters
    sent = sum(wire_bytes(m.content["arrays"]) for m in messages)
    assert strategy.round_stats[1]["download_bytes"] == sent
    assert sent < 3 * wire_bytes(ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    # a reply with the wrong rank for its node is rejected, the others aggregated
    replies.append(_reply(11, _update(5, 8), 10))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.round_stats[1]["rejected"] == 1 and strategy.round_stats[1]["num_updates"] == 3
    new = _np(arrays)
    a = new["m.layers.0.q" + A_SUFFIX]
    # component 0..1: mean of all three; 2..3: of the rank-4 and rank-8 clients; 4..7: rank 8 only
    np.testing.assert_allclose(a[4:], _update(8, 8)["m.layers.0.q" + A_SUFFIX][4:], rtol=1e-6)
    np.testing.assert_allclose(a[2:4], (_update(4, 4)["m.layers.0.q" + A_SUFFIX][2:4]
                                        + _update(8, 8)["m.layers.0.q" + A_SUFFIX][2:4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(a[:2], sum(_update(r, r)["m.layers.0.q" + A_SUFFIX][:2]
                                          for r in (2, 4, 8)) / 3, rtol=1e-5)
    assert strategy.round_stats[1]["aggregation_error"] > 0  # not exact, like fedavg-lora
    # where the round's time went: sent -> replies in hand, then the aggregation
    assert strategy.round_stats[1]["train_phase_s"] >= 0 and strategy.round_stats[1]["aggregate_s"] > 0


def test_hetlora_with_one_rank_is_fedavg_lora():
    updates = [_update(s) for s in (1, 2, 3)]
    replies = [_reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, WEIGHTS))]
    het = _rank_aware(hetlora.HetLoRA)
    het.current = _update(0)
    fedavg = FedAvgLoRA(spec=_spec(), seed=1, num_rounds=3, fraction_train=1.0, fraction_evaluate=1.0)
    a, b = _np(het.aggregate_train(1, replies)[0]), _np(fedavg.aggregate_train(1, replies)[0])
    for k in KEYS:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_rank_mix_assignment_and_device_profiles():
    cfg = RunConfig.from_run_config({"lora.rank": 16, "lora.rank-mix": "2:0.5,8:0.3,16:0.2", "seed": 3})
    ranks = rank_assignment({2: 0.5, 8: 0.3, 16: 0.2}, 20, seed=3)
    assert sorted(ranks) == [2] * 10 + [8] * 6 + [16] * 4
    assert ranks == rank_assignment({2: 0.5, 8: 0.3, 16: 0.2}, 20, seed=3)  # seeded
    assert [client_rank(cfg, {"partition-id": p, "num-partitions": 20}) for p in range(20)] == ranks
    assert client_rank(cfg, {"lora-rank": 4, "partition-id": 0, "num-partitions": 20}) == 4
    assert client_rank(cfg, {"lora-rank": 64}) == 16  # never above the server's rank
    assert client_rank(cfg, {"memory-mb": 2048}) == 2
    assert client_rank(cfg, {"memory-mb": 65536}) == 16
    assert client_rank(cfg.replace(**{"lora.rank-mix": ""}), {"partition-id": 0, "num-partitions": 20}) == 16


@pytest.mark.parametrize("mix,needle", [("2:0.5,8", "'lora.rank-mix'"), ("2:0.5,8:0.2", "'lora.rank-mix'"),
                                        ("2:0.5,32:0.5", "'lora.rank-mix'")])
def test_bad_rank_mix_names_the_key(mix, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({"lora.rank-mix": mix, "lora.rank": 16})


def test_rank_mix_needs_a_heterogeneous_strategy():
    with pytest.raises(ConfigError, match="'lora.rank-mix'"):
        check_run(RunConfig.from_run_config({"strategy.name": "fedavg-lora", "lora.rank-mix": "2:1"}))
    for name in ("hetlora", "flora"):
        _, entry = check_run(RunConfig.from_run_config({"strategy.name": name, "lora.rank-mix": "2:1"}))
        assert entry is STRATEGIES[name]


# ------------------------------------------------------------------ client behaviour (tiny-gpt2)
@pytest.fixture
def blocks(tiny_cfg):
    return data.client_blocks(tiny_cfg, 0, 20)[0]


def _split(state):
    return ({k: v for k, v in state.items() if k.endswith(A_SUFFIX)},
            {k: v for k, v in state.items() if k.endswith(B_SUFFIX)})


def test_ffa_lora_never_changes_a_and_uploads_only_b(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "ffa-lora"})
    initial_a, initial_b = _split(initial_adapter_state(cfg))
    received = ffa_lora.server_initial_state(cfg)
    assert set(received) == set(initial_b)
    for rnd in (1, 2):
        upload, _ = ffa_lora.client_train(cfg, received, 0, blocks, seed=rnd, config={})
        assert set(upload) == set(initial_b)  # A is never uploaded
        own_a, own_b = _split(load_adapter_file(personal_adapter_dir(cfg, 0)))
        for k in initial_a:
            torch.testing.assert_close(own_a[k], initial_a[k], rtol=0, atol=0)
        assert any(not torch.equal(own_b[k], received[k]) for k in own_b)  # B trained
        received = upload
    # A trains again afterwards for strategies sharing the model
    a_params = [p for n, p in shared_lora_model(cfg).named_parameters() if "lora_A.default." in n]
    assert a_params and all(p.requires_grad for p in a_params)


def test_fedsa_lora_keeps_b_on_the_client(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "fedsa-lora"})
    initial_a, _ = _split(initial_adapter_state(cfg))
    upload, _ = fedsa_lora.client_train(cfg, fedsa_lora.server_initial_state(cfg), 0, blocks,
                                        seed=1, config={})
    assert set(upload) == set(initial_a)  # B never leaves the client
    _, own_b = _split(load_adapter_file(personal_adapter_dir(cfg, 0)))
    assert any(v.abs().sum() > 0 for v in own_b.values())
    # next round: the client combines the shared A with its own B
    _, personal = fedsa_lora.client_eval_states(cfg, upload, 0)
    for k in own_b:
        torch.testing.assert_close(personal[k], own_b[k], rtol=0, atol=0)
    global_state, _ = fedsa_lora.client_eval_states(cfg, upload, 1)
    assert all(global_state[k].abs().sum() == 0 for k in own_b)


def test_correction_on_the_base_equals_the_adapter_it_stands_for(tiny_cfg, blocks):
    """The forward hook adds scale * D x: the same model as an adapter with B A = D."""
    cfg = tiny_cfg.replace(**{"model.precision": "fp32"})  # an equivalence: exact arithmetic
    model = shared_lora_model(cfg)
    adapter = {k: v + 0.05 * torch.randn(v.shape) for k, v in initial_adapter_state(cfg).items()}
    set_adapter_state(model, adapter)
    with torch.no_grad():
        expected = model(input_ids=blocks[:2]).logits
    corr = {}
    for k, v in adapter.items():
        if k.endswith(A_SUFFIX):
            p = k[:-len(A_SUFFIX)]
            corr[p + ".correction_B"], corr[p + ".correction_A"] = adapter[p + B_SUFFIX], v
    set_base_correction(model, corr, cfg.lora.alpha / cfg.lora.rank)
    set_adapter_state(model, initial_adapter_state(cfg))  # B = 0: the adapter adds nothing
    try:
        with torch.no_grad():
            got = model(input_ids=blocks[:2]).logits
    finally:
        set_base_correction(model, None, 0.0)  # the shared model serves later tests
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_flora_and_hetlora_clients_train_their_own_rank(tiny_cfg, blocks):
    cfg = tiny_cfg.replace(**{"strategy.name": "hetlora", "lora.rank": 8})
    initial = initial_adapter_state(cfg)
    upload, _ = hetlora.client_train(cfg, truncate_rank(initial, 2), 0, blocks, seed=1,
                                     config={"lora-rank": 2})
    assert all(v.shape[0] == 2 for k, v in upload.items() if k.endswith(A_SUFFIX))
    # the personal adapter is the zero-padded one: a standard rank-8 peft adapter, same product
    personal = load_adapter_file(personal_adapter_dir(cfg, 0))
    for k, v in pad_rank(upload, 8).items():
        torch.testing.assert_close(personal[k], v, rtol=0, atol=0)
    upload, _ = flora.client_train(cfg.replace(**{"strategy.name": "flora"}), {}, 1, blocks, seed=1,
                                   config={"lora-rank": 4})
    assert all(v.shape[1] == 4 for k, v in upload.items() if k.endswith(B_SUFFIX))
    model = shared_lora_model(cfg)
    assert model.active_adapter == "default"
    assert set(get_adapter_state(model)) == set(initial)


# ------------------------------------------------------------------ suite and end to end
def test_suite_plans_the_aggregation_comparison():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from suite import plan

    runs = dict(plan("quick", methods=["fedavg-lora", "ffa-lora", "fedex-lora", "flora", "fedsa-lora"],
                     ablations=False, rank_mix="2:0.5,8:0.3,16:0.2"))
    assert list(runs) == ["fedavg-lora", "ffa-lora", "fedex-lora", "flora", "fedsa-lora",
                          "hetlora-mix", "flora-mix"]
    assert runs["flora-mix"] == {"strategy.name": "flora", "lora.rank-mix": "2:0.5,8:0.3,16:0.2",
                                 "lora.rank": 16, "lora.alpha": 32.0}  # alpha / r as at rank 8
    for overrides in runs.values():  # every run's config is valid for its strategy
        cfg = RunConfig.from_run_config(overrides)
        assert check_run(cfg)[1].module is STRATEGIES[overrides["strategy.name"]].module


@pytest.mark.slow
def test_heterogeneous_ranks_end_to_end(tmp_path):
    """A real `flwr run`: nodes report their ranks, get rank-r adapters, all are aggregated."""
    import json
    import os
    import subprocess
    import sys

    out, cache = tmp_path / "out", Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "4",
         "--flwr-home", str(tmp_path / "flwr"), "--timeout", "600", "--run-config", "conf/smoke.toml",
         "--run-config", f"strategy.name='hetlora' lora.rank-mix='2:0.5,8:0.5' server.personalize-clients=0 "
                         f"output-dir='{out}' cache-dir='{cache}'"],
        cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    for r in rounds[1:]:
        assert r["num_updates"] == 2 and r["rejected"] == 0 and r["failures"] == 0
        assert r["aggregation_error"] > 0
    assert rounds[-1]["global_ppl"] < rounds[0]["global_ppl"]
    # the personal adapters are rank-8 (zero-padded) standard peft checkpoints
    adapters = list((out / "clients").glob("client-*/personal-adapter/adapter_model.safetensors"))
    assert adapters and all(rank_of(load_adapter_file(a.parent)) == 8 for a in adapters)
