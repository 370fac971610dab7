"""Update screening (fuzzed with hypothesis), robust aggregation, retries and DP on the server."""

import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from strategies.defences import aggregate_robust, clip_delta, delta_norm, trimmed_mean
from strategies.records import array_spec
from strategies.registry import STRATEGIES, check_run
from task.config import ConfigError, DPConfig, RobustConfig, RunConfig
from task.privacy import PrivacyAccountant

SHAPES = {"h.0.attn.c_attn.lora_A.weight": (2, 3), "h.0.attn.c_attn.lora_B.weight": (3, 2),
          "h.1.attn.c_attn.lora_A.weight": (2, 3), "h.1.attn.c_attn.lora_B.weight": (3, 2)}
GLOBAL = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
# every federated strategy class that aggregates adapter arrays
ARRAY_STRATEGIES = sorted(name for name, e in STRATEGIES.items()
                          if e.server is not None and name != "local-only")
# fedex-lora, flora, hetlora aggregate per-rank adapters themselves: they validate every reply
# but refuse the robust options at start (test_rank_aware_strategies_refuse_robust_options)
RANK_AWARE = sorted(name for name in ARRAY_STRATEGIES if STRATEGIES[name].caps.rank_aware)
ROBUST_STRATEGIES = [name for name in ARRAY_STRATEGIES if name not in RANK_AWARE]


@pytest.fixture(autouse=True)
def _serverapp_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


class FakeGrid:
    """Connected nodes 1..n; a training request is answered by ``answer(node_id)``."""

    def __init__(self, n, answer=None):
        self.nodes, self.answer, self.asked = list(range(1, n + 1)), answer, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.asked.append(sorted(m.metadata.dst_node_id for m in messages))
        return [self.answer(m) for m in messages]


def reply_to(instruction: Message, arrays: ArrayRecord | None, num_examples=10) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=instruction)


def reply(node: int, arrays, num_examples=10) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node, message_type=MessageType.TRAIN)
    return reply_to(instruction, arrays, num_examples)


def record(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def make(name: str, robust: RobustConfig = RobustConfig(), grid=None, dp: DPConfig = DPConfig(),
         privacy=None):
    """A strategy of the registry, configured for round 1 (FedOpt keeps the sent arrays)."""
    entry = STRATEGIES[name]
    kwargs = {"eta": 0.1} if name in ("fedadam", "fedyogi") else {}
    if name == "fedprox":
        kwargs = {"proximal_mu": 0.01}
    if name in RANK_AWARE:  # GLOBAL is a rank-2 adapter
        kwargs = {"adapter_spec": array_spec(record(GLOBAL)), "max_rank": 2}
    strategy = entry.server(spec=array_spec(record(GLOBAL)), seed=1, num_rounds=3,
                            fraction_train=1.0, fraction_evaluate=1.0, robust=robust, dp=dp,
                            privacy=privacy, **kwargs)
    strategy.configure_train(1, record(GLOBAL), ConfigRecord(), grid or FakeGrid(4))
    return strategy


# ---------------------------------------------------------------- hypothesis: malformed updates
BAD_KINDS = ["missing-key", "extra-key", "wrong-shape", "wrong-dtype", "nan", "inf", "huge-norm",
             "zero-examples", "negative-examples", "no-arrays"]
MAX_NORM = 50.0


def corrupt(values: dict, kind: str, data) -> tuple[ArrayRecord | None, float]:
    values = {k: v.copy() for k, v in values.items()}
    key = data.draw(st.sampled_from(sorted(values)), label="key")
    num_examples = 10
    if kind == "missing-key":
        del values[key]
    elif kind == "extra-key":
        values[key + ".extra"] = np.ones(2, np.float32)
    elif kind == "wrong-shape":
        values[key] = np.ones(values[key].size + 1, np.float32)
    elif kind == "wrong-dtype":
        values[key] = values[key].astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32])))
    elif kind in ("nan", "inf"):
        flat = values[key].reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = math.nan if kind == "nan" else -math.inf
    elif kind == "huge-norm":
        values[key] = values[key] * np.float32(data.draw(st.floats(1e3, 1e30)))
    elif kind == "zero-examples":
        num_examples = 0
    elif kind == "negative-examples":
        num_examples = -data.draw(st.integers(1, 1000))
    elif kind == "no-arrays":
        return None, num_examples
    return record(values), num_examples


finite = st.floats(-2, 2, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(ARRAY_STRATEGIES), data=st.data(),
       kinds=st.lists(st.sampled_from(BAD_KINDS), min_size=1, max_size=4))
def test_fuzz_every_strategy_drops_exactly_the_malformed_updates(name, data, kinds, caplog):
    if name in RANK_AWARE:  # no norm screen there (max-update-norm is refused at start)
        kinds = [k for k in kinds if k != "huge-norm"]
        assume(kinds)
    good_values = [{k: np.asarray(data.draw(st.lists(finite, min_size=int(np.prod(s)),
                                                     max_size=int(np.prod(s)))), np.float32).reshape(s)
                    for k, s in SHAPES.items()} for _ in range(2)]
    good = [reply(i + 1, record(v), 10 * (i + 1)) for i, v in enumerate(good_values)]
    bad = []
    for j, kind in enumerate(kinds):
        arrays, n = corrupt(good_values[0], kind, data)
        bad.append(reply(100 + j, arrays, n))
    mixed = data.draw(st.permutations(good + bad))
    robustness = RobustConfig(max_update_norm=MAX_NORM)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        strategy = make(name, robustness)
        arrays, metrics = strategy.aggregate_train(1, mixed)
    expected, _ = make(name, robustness).aggregate_train(1, good)
    assert sorted(arrays.keys()) == sorted(expected.keys())  # flora sends stacked modules
    for k in expected.keys():  # the round went on with exactly the good updates
        np.testing.assert_array_equal(arrays[k].numpy(), expected[k].numpy())
    assert strategy.round_stats[1]["rejected"] == len(bad)
    assert strategy.round_stats[1]["num_updates"] == 2 and metrics["num-updates"] == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    for j in range(len(bad)):
        assert f"rejected update from node {100 + j}" in logged


def test_norm_screen_measures_the_change_from_the_sent_adapter(caplog):
    strategy = make("fedavg-lora", RobustConfig(max_update_norm=1.0))
    near = {k: v + 0.1 for k, v in GLOBAL.items()}      # norm 0.1 * sqrt(24) ~ 0.49
    far = {k: v + 0.5 for k, v in GLOBAL.items()}       # norm ~ 2.45
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        arrays, _ = strategy.aggregate_train(1, [reply(1, record(near)), reply(7, record(far))])
    np.testing.assert_allclose(arrays["h.0.attn.c_attn.lora_A.weight"].numpy(), 0.6, rtol=1e-6)
    assert any("node 7" in r.getMessage() and "norm" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- robust aggregation
def test_robust_aggregates_equal_hand_computed_values():
    ref = {"w": np.zeros(3, np.float32)}
    ups = [{"w": np.array([1, 2, 3], np.float32)}, {"w": np.array([2, 2, 2], np.float32)},
           {"w": np.array([100, -50, 3], np.float32)}, {"w": np.array([3, 1, 4], np.float32)},
           {"w": np.array([2, 2, 1], np.float32)}]
    np.testing.assert_allclose(aggregate_robust(ups, [1] * 5, ref, "median")["w"], [2, 2, 3])
    # trim 1 of 5 at each end per coordinate: mean of the middle three
    np.testing.assert_allclose(aggregate_robust(ups, [1] * 5, ref, "trimmed-mean", trim_fraction=0.2)["w"],
                               [(2 + 2 + 3) / 3, (1 + 2 + 2) / 3, (2 + 3 + 3) / 3])
    # norm-bound: every change clipped to norm 1, then the weighted mean
    clipped = aggregate_robust(ups[:2], [1, 3], ref, "norm-bound", norm_bound=1.0)["w"]
    expected = 0.25 * ups[0]["w"] / np.linalg.norm(ups[0]["w"]) + 0.75 * ups[1]["w"] / np.linalg.norm(ups[1]["w"])
    np.testing.assert_allclose(clipped, expected, rtol=1e-6)
    assert clipped.dtype == np.float32


def test_clip_delta_keeps_short_changes_and_bounds_long_ones():
    ref = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    short = {"a": ref["a"] + 0.1, "b": ref["b"]}
    assert delta_norm(clip_delta(short, ref, 1.0), ref) == pytest.approx(0.2, rel=1e-5)
    long = {"a": ref["a"] + 10, "b": ref["b"] - 10}
    assert delta_norm(clip_delta(long, ref, 1.0), ref) == pytest.approx(1.0, rel=1e-5)


def test_trimmed_mean_never_drops_everything():
    stack = np.array([[1.0], [5.0]])
    np.testing.assert_allclose(trimmed_mean(stack, 0.49), [3.0])


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
@pytest.mark.parametrize("method", ["median", "trimmed-mean", "norm-bound"])
def test_every_strategy_resists_one_scaled_attacker(name, method):
    """Four honest updates near +0.1 and one boosted 1000x: the robust aggregate stays near the
    honest ones; the plain mean is dragged far away."""
    rng = np.random.default_rng(0)
    honest = [{k: v + 0.1 + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in GLOBAL.items()} for _ in range(4)]
    attacker = {k: v + 100.0 for k, v in GLOBAL.items()}
    replies = lambda: [reply(i + 1, record(u)) for i, u in enumerate(honest + [attacker])]  # noqa: E731
    settings_ = RobustConfig(aggregation=method, norm_bound=0.6, trim_fraction=0.2)
    robust_arrays, _ = make(name, settings_).aggregate_train(1, replies())
    plain_arrays, _ = make(name).aggregate_train(1, replies())

    def shift(arrays):
        return delta_norm({k: arrays[k].numpy() for k in SHAPES}, GLOBAL)

    if name in ("fedadam", "fedyogi"):  # the server optimizer steps on the robust aggregate
        aggregate = aggregate_robust(honest + [attacker], [10] * 5, GLOBAL, method,
                                     norm_bound=0.6, trim_fraction=0.2)
        expected, _ = make(name).aggregate_train(1, [reply(1, record(aggregate))])
        for k in SHAPES:
            np.testing.assert_array_equal(robust_arrays[k].numpy(), expected[k].numpy())
    else:
        assert shift(plain_arrays) > 5 * shift(robust_arrays)
        assert shift(robust_arrays) < 1.0


def test_multikrum_drops_the_boosted_update_and_averages_the_rest_by_weight(caplog):
    """Flower's MultiKrum selection on the adapter updates: four honest updates near +0.1, one
    boosted backdoor-like update; with f = 1 and 3 kept, the aggregate is the sample-weighted mean
    of the 3 honest updates closest to the others, and the dropped nodes are logged."""
    offsets = [0.10, 0.11, 0.09, 0.30]  # the fourth honest update is the farthest of them
    honest = [{k: v + o for k, v in GLOBAL.items()} for o in offsets]
    attacker = {k: v + 10.0 for k, v in GLOBAL.items()}
    weights = [10, 20, 30, 40, 50]
    replies = [reply(i + 1, record(u), w) for i, (u, w) in enumerate(zip(honest + [attacker], weights))]
    strategy = make("fedavg-lora", RobustConfig(aggregation="multikrum", krum_malicious=1, krum_select=3))
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    kept_offset = (10 * 0.10 + 20 * 0.11 + 30 * 0.09) / 60
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), GLOBAL[k] + kept_offset, rtol=1e-6)
    dropped = [r.message for r in caplog.records if "multikrum dropped" in r.message]
    assert len(dropped) == 2 and any("node 5" in m for m in dropped) and any("node 4" in m for m in dropped)
    assert strategy.round_stats[1]["dropped"] == 2
    # krum-select 0 keeps n - f: only the attacker goes
    default = make("fedavg-lora", RobustConfig(aggregation="multikrum", krum_malicious=1))
    arrays, _ = default.aggregate_train(1, [reply(i + 1, record(u), w) for i, (u, w)
                                            in enumerate(zip(honest + [attacker], weights))])
    expected = sum(w * o for w, o in zip(weights, offsets)) / sum(weights[:4])
    np.testing.assert_allclose(arrays["h.0.attn.c_attn.lora_A.weight"].numpy(), 0.5 + expected, rtol=1e-6)


def test_multikrum_with_too_few_updates_keeps_them_all_and_says_so(caplog):
    ups = [{k: v + 0.1 * i for k, v in GLOBAL.items()} for i in (1, 2)]
    strategy = make("fedavg-lora", RobustConfig(aggregation="multikrum"))
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        arrays, _ = strategy.aggregate_train(1, [reply(i + 1, record(u)) for i, u in enumerate(ups)])
    np.testing.assert_allclose(arrays["h.0.attn.c_attn.lora_A.weight"].numpy(), 0.5 + 0.15, rtol=1e-6)
    assert any("multikrum keeps all 2 updates" in r.message for r in caplog.records)
    assert strategy.round_stats[1]["dropped"] == 0


def test_each_round_records_how_far_the_updates_moved():
    """update_norm_median / update_norm_max: the L2 change of each valid update from the
    adapter it started from (what robust.norm-bound is read off)."""
    ups = [{k: v + d for k, v in GLOBAL.items()} for d in (0.1, 0.2, 1.0)]
    strategy = make("fedavg-lora")
    strategy.aggregate_train(1, [reply(i + 1, record(u)) for i, u in enumerate(ups)])
    entries = sum(int(np.prod(s)) for s in SHAPES.values())
    stats = strategy.round_stats[1]
    assert stats["update_norm_median"] == pytest.approx(0.2 * math.sqrt(entries), rel=1e-5)
    assert stats["update_norm_max"] == pytest.approx(1.0 * math.sqrt(entries), rel=1e-5)


# ---------------------------------------------------------------- failures: retry or skip
def test_too_few_replies_skips_the_round(caplog):
    strategy = make("fedavg-lora", RobustConfig(min_replies=3))
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        result = strategy.aggregate_train(1, [reply(1, record(GLOBAL)), reply(2, record(GLOBAL))])
    assert result == (None, None)
    assert strategy.round_stats[1]["skipped"] == 1
    assert any("fewer than min-replies 3" in r.getMessage() for r in caplog.records)


def test_too_few_replies_retries_other_clients_until_enough():
    failing = {1, 2, 5}  # these nodes crash whenever asked

    def answer(msg):
        if msg.metadata.dst_node_id in failing:
            return Message(Error(code=0, reason="crash"), reply_to=msg)
        return reply_to(msg, record({k: v + msg.metadata.dst_node_id for k, v in GLOBAL.items()}))

    grid = FakeGrid(10, answer)
    strategy = make("fedavg-lora", RobustConfig(min_replies=3, on_too_few_replies="retry",
                                              max_retries=3), grid)
    strategy.fraction_train = 0.3
    sent = strategy.configure_train(1, record(GLOBAL), ConfigRecord(), grid)
    first = sorted(m.metadata.dst_node_id for m in sent)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(sent))
    stats = strategy.round_stats[1]
    asked_later = [n for batch in grid.asked[1:] for n in batch]
    assert not set(asked_later) & set(first), "a retry asks clients not asked yet"
    ok = [n for n in first + asked_later if n not in failing]
    assert len(ok) >= 3 and stats["num_updates"] == len(ok) and metrics["num-updates"] == len(ok)
    assert stats["retries"] == len(grid.asked) - 1 >= 1
    assert stats["failures"] == len([n for n in first + asked_later if n in failing])
    np.testing.assert_allclose(arrays["h.0.attn.c_attn.lora_A.weight"].numpy(),
                               0.5 + np.mean(ok), rtol=1e-6)


# ---------------------------------------------------------------- differential privacy
def test_dp_mean_is_uniform_noised_seeded_and_accounted():
    def run(seed):
        strategy = make("fedavg-lora", dp=DPConfig(noise_multiplier=1.0, clipping_norm=1.0),
                        privacy=PrivacyAccountant(1.0, 0.1, 1e-5))
        strategy.seed = seed
        ups = [{k: v + 0.1 * (i + 1) / math.sqrt(24) for k, v in GLOBAL.items()} for i in range(4)]
        arrays, _ = strategy.aggregate_train(1, [reply(i + 1, record(u), 10 * (i + 1))
                                                 for i, u in enumerate(ups)])
        return strategy, {k: arrays[k].numpy() for k in SHAPES}

    strategy, a = run(1)
    _, b = run(1)
    _, c = run(2)
    noise = np.concatenate([(a[k] - (GLOBAL[k] + 0.25 / math.sqrt(24))).ravel() for k in SHAPES])
    assert np.std(noise) == pytest.approx(1.0 * 1.0 / 4, rel=0.5)  # z * clip / n, unweighted mean
    assert all(np.array_equal(a[k], b[k]) for k in SHAPES)       # seeded by round: resumable
    assert not all(np.array_equal(a[k], c[k]) for k in SHAPES)
    eps = strategy.round_stats[1]["dp_epsilon"]
    assert eps == pytest.approx(PrivacyAccountant(1.0, 0.1, 1e-5).step())


def test_dp_rejects_updates_that_were_not_clipped(caplog):
    strategy = make("fedavg-lora", dp=DPConfig(noise_multiplier=0.5, clipping_norm=1.0),
                    privacy=PrivacyAccountant(0.5, 0.5, 1e-5))
    unclipped = {k: v + 1.0 for k, v in GLOBAL.items()}
    with caplog.at_level(logging.WARNING, logger="flwr.fedgen_edge"):
        strategy.aggregate_train(1, [reply(1, record(GLOBAL)), reply(3, record(unclipped))])
    assert strategy.round_stats[1]["rejected"] == 1
    assert any("node 3" in r.getMessage() for r in caplog.records)


def test_accountant_epsilon_grows_with_rounds_and_falls_with_noise():
    def eps(z, rounds, q=0.1):
        return PrivacyAccountant(z, q, 1e-5).step(rounds)

    assert eps(1.0, 1) < eps(1.0, 6) < eps(1.0, 30)
    assert eps(2.0, 6) < eps(1.0, 6) < eps(0.7, 6)
    assert eps(1.0, 6, q=0.05) < eps(1.0, 6, q=0.1)
    assert PrivacyAccountant(1.0, 0.1, 1e-5).epsilon == 0.0


# ---------------------------------------------------------------- run config
@pytest.mark.parametrize("name", RANK_AWARE)
@pytest.mark.parametrize("key,value", [("robust.aggregation", "median"), ("dp.noise-multiplier", 1.0),
                                       ("robust.max-update-norm", 5.0), ("upload.compression", "int8"),
                                       ("resume", True)])
def test_rank_aware_strategies_refuse_robust_options(name, key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run(RunConfig.from_run_config({"strategy.name": name, key: value}))


@pytest.mark.parametrize("key,value,needle", [
    ("robust.aggregation", "krum", "'robust.aggregation'"),
    ("threats.attack", "flood", "'threats.attack'"),
    ("resume", "yes", "'resume'"),
    ("robust.trim-fraction", 0.5, "'robust.trim-fraction'"),
    ("threats.client-failure-rate", 1.5, "'threats.client-failure-rate'"),
    ("robust.on-too-few-replies", "wait", "'robust.on-too-few-replies'"),
    ("robust.min-replies", 0, "'robust.min-replies'"),
    ("robust.krum-malicious", 2, "'robust.krum-malicious'"),  # without multikrum it would do nothing
    ("threats.attack-steps", 10, "'threats.attack-steps'"),  # without an attack it would do nothing
    ("threats.poison-fraction", 0.5, "'threats.poison-fraction'"),
])
def test_bad_robustness_keys_are_named(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("overrides,key", [
    ({"strategy.name": "fedavg-full", "robust.aggregation": "multikrum"}, "robust.aggregation"),
    ({"strategy.name": "fedavg-full", "threats.attack": "scaled", "threats.attack-fraction": 0.1,
      "threats.attack-learning-rate": 0.01}, "threats.attack-learning-rate"),
    ({"strategy.name": "ditto", "threats.attack": "backdoor", "threats.attack-fraction": 0.1,
      "threats.boost": "poison-difference"}, "threats.boost"),
])
def test_attack_and_defence_options_a_strategy_cannot_honour_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run(RunConfig.from_run_config(overrides))


def test_dp_needs_the_plain_mean():
    with pytest.raises(ConfigError, match="'robust.aggregation'"):
        check_run(RunConfig.from_run_config({"dp.noise-multiplier": 1.0,
                                             "robust.aggregation": "median"}))
    check_run(RunConfig.from_run_config({"resume": True, "dp.noise-multiplier": 1.0}))


# ---------------------------------------------------------------- resume bookkeeping
def test_resume_restores_rounds_and_client_rows_up_to_the_checkpoint(tmp_path):
    import csv
    import json

    import torch
    from safetensors.torch import save_file

    from task.results import RunRecorder, released_rounds, restore_rounds, resume_point

    out = tmp_path / "out"
    first = RunRecorder(out, {"strategy": "fedavg-lora"})
    for r in range(4):  # the killed run got to round 3, but only round 2 was checkpointed
        first.add_round({"round": r, "global_ppl": 100.0 - r, "dp_epsilon": r or None},
                        [{"partition_id": 7, "global_ppl": 50.0 + r, "tokens": 10}])
    (out / "checkpoints" / "round-0002").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(out / "checkpoints" / "round-0002" / "adapter_model.safetensors"))
    (out / "state.json").write_text(json.dumps({"round": 2, "checkpoint": "checkpoints/round-0002"}))

    cfg = RunConfig.from_run_config({"output-dir": str(out)})
    assert resume_point(cfg, out) is None  # resume is off
    start, tensors = resume_point(cfg.replace(**{"resume": True}), out)
    assert start == 2 and torch.equal(tensors["w"], torch.ones(2))

    again = RunRecorder(out, {"strategy": "fedavg-lora"})
    restore_rounds(again, out, start)
    assert [r["round"] for r in again.results["rounds"]] == [0, 1, 2]
    assert released_rounds(again) == 2
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["global_ppl"] for r in on_disk["rounds"]] == [100.0, 99.0, 98.0]
    with open(out / "clients.csv", newline="") as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    assert resume_point(cfg.replace(**{"resume": True}), tmp_path / "empty") is None
