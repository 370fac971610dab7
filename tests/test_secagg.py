"""Secure aggregation (SecAgg+, strategies/secagg.py): the real ClientApp and Flower's SecAgg+
workflow and mod, in-process on a grid that delivers every message as a copy; one end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client_app.flower_app import app as client_app
from strategies.defences import clip_delta, delta_norm
from strategies.registry import build_strategy, check_run, strategy_entry
from task.adapters import initial_adapter_state
from task.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


class ClientGrid:
    """Nodes 1..n running the real ClientApp (partition i-1 each, own Context.state). Messages
    cross as deep copies, like serialized ones; every reply the server gets is kept."""

    def __init__(self, cfg: RunConfig, n: int, drop_at_masking: set[int] = frozenset()):
        run_config = cfg.flat()
        self.contexts = {i: Context(run_id=1, node_id=i, state=RecordDict(), run_config=run_config,
                                    node_config={"partition-id": i - 1, "num-partitions": n})
                         for i in range(1, n + 1)}
        self.drop_at_masking, self.replies = drop_at_masking, []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            msg = _wire(msg)
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
            if node in self.drop_at_masking and stage == Stage.COLLECT_MASKED_VECTORS:
                reply = Message(Error(code=0, reason="dropped out"), reply_to=msg)
            else:
                reply = client_app(msg, self.contexts[node])
            replies.append(_wire(reply))
        self.replies += replies
        return replies


def _wire(msg: Message) -> Message:
    """The message as the other side receives it: serialized and parsed (a fresh copy)."""
    return message_from_proto(message_to_proto(msg))


def one_round(cfg: RunConfig, n: int, drop: set[int] = frozenset()):
    """Round 1 of ``cfg``'s strategy on n clients: (global adapter after it, grid, stats)."""
    # what the strategy's server starts from and sends: the seeded initial adapter, or its
    # shared part (the shared in-process model itself has been trained by the clients)
    sent = strategy_entry(cfg).module.server_initial_state(cfg)
    initial = ArrayRecord({k: initial_adapter_state(cfg)[k] for k in sent})
    grid = ClientGrid(cfg, n, drop)
    strategy = build_strategy(cfg, initial, node_order=grid.get_node_ids())
    messages = strategy.configure_train(1, initial, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    return {k: v.numpy() for k, v in arrays.items()}, grid, strategy.round_stats[1]


def quantization_tolerance(cfg: RunConfig, weights: list[float], max_abs: float) -> float:
    """Largest per-entry gap between the SecAgg+ mean and the plain weighted mean: one grid step
    (2c / T) per client on the weighted values, over the sum of the weights n / W, plus the
    rounding of the weights to 1 / T (strategies/secagg.py), plus float32 rounding."""
    c, t, w = cfg.secagg.clipping_range, cfg.secagg.quantization_range, cfg.secagg.max_weight
    total = sum(n / w for n in weights)
    return len(weights) * 2 * c / t / total + max_abs * w / (t * min(weights)) + 1e-6


def test_secure_mean_equals_plain_fedavg_up_to_quantization(tiny_cfg):
    """Round 1 with SecAgg+ on 4 clients, all of them and with one dropping out after sharing
    its keys, against the plain weighted mean of the same clients' uploads (same seeds, so the
    same local training)."""
    plain_cfg = tiny_cfg.replace(**{"strategy.fraction-train": 1.0, "train.max-steps": 2, "train.learning-rate": 0.05})
    secure_cfg = plain_cfg.replace(**{"secagg.enabled": True, "secagg.quantization-range": 2**16,
                                      "secagg.max-weight": 100_000.0,  # 3 clients hold it all
                                      # its clients start from no personal state, as the plain ones
                                      "output-dir": plain_cfg.output_dir + "-secure"})  # a coarse grid: visible
    n = 4
    _, plain_grid, _ = one_round(plain_cfg, n)
    uploads = {m.metadata.src_node_id: {k: v.numpy() for k, v in m.content["arrays"].items()}
               for m in plain_grid.replies}
    examples = {m.metadata.src_node_id: float(m.content["metrics"]["num-examples"])
                for m in plain_grid.replies}
    assert max(examples.values()) < secure_cfg.secagg.max_weight
    max_abs = max(float(np.abs(u[k]).max()) for u in uploads.values() for k in u)
    assert max_abs < secure_cfg.secagg.clipping_range, "the adapters fit the clipping range"

    for drop in (set(), {2}):
        secure, grid, stats = one_round(secure_cfg, n, drop)
        kept = [i for i in uploads if i not in drop]
        weights = [examples[i] for i in kept]
        plain = {k: sum(examples[i] / sum(weights) * uploads[i][k].astype(np.float64) for i in kept)
                 for k in secure}
        assert stats["num_updates"] == len(kept) and stats["failures"] == len(drop)
        tolerance = quantization_tolerance(secure_cfg, weights, max_abs)
        gap = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
        assert 0 < gap <= tolerance, (drop, gap, tolerance)
        # A real mean of different adapters, not one client's adapter passed through.
        for i in kept:
            assert max(float(np.abs(secure[k] - uploads[i][k]).max()) for k in secure) > 100 * tolerance

        # The server never received an adapter in the clear: no reply of the protocol carries
        # an array; the uploads were masked integer vectors in the protocol's config record.
        assert all(len(r) == 0 for m in grid.replies if not m.has_error()
                   for r in m.content.array_records.values())
        masked = [m for m in grid.replies if not m.has_error()
                  and Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
        assert len(masked) == len(kept)
        assert stats["upload_bytes"] > 0 and stats["download_bytes"] > 0


@pytest.mark.parametrize("overrides, key", [
    ({"robust.aggregation": "median"}, "robust.aggregation"),
    ({"robust.max-update-norm": 5.0}, "robust.max-update-norm"),
    ({"dp.noise-multiplier": 1.0}, "dp.noise-multiplier"),
    ({"upload.compression": "int8"}, "upload.compression"),
    ({"robust.on-too-few-replies": "retry"}, "robust.on-too-few-replies"),
    ({"strategy.name": "hetlora"}, "secagg.enabled"),
    ({"strategy.name": "fedavg-full"}, "secagg.enabled"),
    ({"strategy.name": "local-only"}, "secagg.enabled"),
    ({"secagg.num-shares": 0.0}, "secagg.num-shares"),
    ({"secagg.quantization-range": 2**31}, "secagg.quantization-range"),
])
def test_combinations_that_need_a_clear_update_are_refused_at_start(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_run(RunConfig.from_run_config({"secagg.enabled": True, **overrides}))


def secure_vs_plain_gap(plain_cfg: RunConfig, n: int) -> tuple[float, float]:
    """(largest gap between the SecAgg+ and the plain weighted mean of round 1, its bound)."""
    secure_cfg = plain_cfg.replace(**{"secagg.enabled": True, "secagg.quantization-range": 2**16,
                                      "secagg.max-weight": 100_000.0,  # 3 clients hold it all
                                      # its clients start from no personal state, as the plain ones
                                      "output-dir": plain_cfg.output_dir + "-secure"})
    _, plain_grid, _ = one_round(plain_cfg, n)
    uploads = [{k: v.numpy().astype(np.float64) for k, v in m.content["arrays"].items()}
               for m in plain_grid.replies]
    weights = [float(m.content["metrics"]["num-examples"]) for m in plain_grid.replies]
    plain = {k: sum(w / sum(weights) * u[k] for u, w in zip(uploads, weights)) for k in uploads[0]}
    max_abs = max(float(np.abs(u[k]).max()) for u in uploads for k in u)
    assert max_abs < secure_cfg.secagg.clipping_range
    secure, _, stats = one_round(secure_cfg, n)
    assert stats["num_updates"] == n and secure.keys() == plain.keys()
    gap = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
    return gap, quantization_tolerance(secure_cfg, weights, max_abs)


@pytest.mark.parametrize("name", ["fedprox", "ditto", "ffa-lora", "fedsa-lora"])
def test_strategies_with_a_mean_server_step_get_the_secure_mean(tiny_cfg, name):
    """Their server step is the weighted mean of what they upload (all of the adapter, its
    global half, B only, A only): under SecAgg+ it is the same mean up to quantization."""
    cfg = tiny_cfg.replace(**{"strategy.name": name, "strategy.fraction-train": 1.0,
                              "train.max-steps": 2, "train.learning-rate": 0.05})
    gap, tolerance = secure_vs_plain_gap(cfg, 3)
    assert gap <= tolerance, (name, gap, tolerance)


def test_image_task_adapters_get_the_secure_mean(tmp_path):
    """The image task goes through the same server flow and strategy: its generator's
    convolution adapters are summed masked (stateless clients: no kept discriminator)."""
    cfg = RunConfig.from_run_config({
        "task": "image", "data.dataset": "fashion-mnist", "data.partitioner": "dirichlet",
        "data.dirichlet-alpha": 0.1, "image.generator-width": 4, "image.discriminator-width": 4,
        "image.pretrain-steps": 2, "image.keep-discriminator": False, "lora.rank": 2,
        "lora.alpha": 4.0, "lora.dropout": 0.0, "train.batch-size": 8, "train.max-steps": 2,
        "strategy.fraction-train": 1.0, "output-dir": str(tmp_path / "out"),
        "cache-dir": os.environ["FEDGEN_EDGE_HOME"] + "/cache"})
    gap, tolerance = secure_vs_plain_gap(cfg, 3)
    assert gap <= tolerance, (gap, tolerance)


def test_server_optimizers_keep_their_step_under_secure_aggregation():
    for name in ("fedadam", "fedyogi"):
        cfg = RunConfig.from_run_config({"secagg.enabled": True, "strategy.name": name})
        _, entry = check_run(cfg)
        strategy = build_strategy(cfg, ArrayRecord())
        assert isinstance(strategy, entry.server) and strategy.secure == cfg.secagg


@pytest.mark.slow
def test_flwr_run_with_secure_aggregation(tmp_path):
    """`flwr run` under the simulation engine: the protocol's stage messages, the mod's state in
    each node's Context and the masked uploads work through the real runtime."""
    out = tmp_path / "out"
    cache = Path(os.environ["FEDGEN_EDGE_HOME"]) / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--num-supernodes", "4",
         "--flwr-home", str(tmp_path / "flwr"), "--timeout", "600",
         "--run-config", "conf/smoke.toml",
         "--run-config", f"output-dir='{out}' cache-dir='{cache}' secagg.enabled=true "
                         "strategy.fraction-train=0.75 num-server-rounds=2 server.personalize-clients=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["num_updates"] == 3 and r["failures"] == 0 and r["skipped"] == 0
        # three masked vectors of one integer per adapter entry (and keys, shares) came back
        assert r["upload_bytes"] > 3 * 4 * results["adapter_params"]
    assert rounds[-1]["global_ppl"] < rounds[0]["global_ppl"], "the secure mean still learns"


def test_clients_clip_their_change_under_secure_aggregation(tiny_cfg):
    """secagg.client-clip-norm: each client bounds its adapter change before masking (the norm
    bound that still works when the server sees only the sum): the secure mean equals the plain
    weighted mean of the clipped uploads, and it moved no farther than the bound."""
    plain_cfg = tiny_cfg.replace(**{"strategy.fraction-train": 1.0, "train.max-steps": 2,
                                    "train.learning-rate": 0.05})
    n = 4
    _, plain_grid, _ = one_round(plain_cfg, n)
    initial = {k: v.numpy() for k, v in initial_adapter_state(plain_cfg).items()}
    uploads = {m.metadata.src_node_id: {k: v.numpy() for k, v in m.content["arrays"].items()}
               for m in plain_grid.replies}
    examples = {m.metadata.src_node_id: float(m.content["metrics"]["num-examples"])
                for m in plain_grid.replies}
    norms = {i: delta_norm(u, {k: initial[k] for k in u}) for i, u in uploads.items()}
    bound = 0.5 * min(norms.values())
    secure_cfg = plain_cfg.replace(**{"secagg.enabled": True, "secagg.client-clip-norm": bound,
                                      "secagg.max-weight": 100_000.0,
                                      "output-dir": plain_cfg.output_dir + "-clipped"})
    secure, _, stats = one_round(secure_cfg, n)
    clipped = {i: clip_delta(u, {k: initial[k] for k in u}, bound) for i, u in uploads.items()}
    total = sum(examples.values())
    plain = {k: sum(examples[i] / total * clipped[i][k].astype(np.float64) for i in clipped) for k in secure}
    max_abs = max(float(np.abs(u[k]).max()) for u in clipped.values() for k in u)
    tolerance = quantization_tolerance(secure_cfg, list(examples.values()), max_abs)
    assert max(float(np.abs(secure[k] - plain[k]).max()) for k in plain) <= tolerance
    assert delta_norm(secure, {k: initial[k] for k in secure}) <= bound * (1 + 1e-3)
    assert stats["num_updates"] == n


def test_client_clipping_without_secure_aggregation_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="client_clip_norm|client-clip-norm"):
        tiny_cfg.replace(**{"secagg.client-clip-norm": 1.0})
