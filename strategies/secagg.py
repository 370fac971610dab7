"""Secure aggregation of the adapter updates with Flower's SecAgg+ (``secagg.enabled``).

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020
(SecAgg+), after Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017. Flower ships it for its legacy (FitIns/FitRes) API: the server workflow
``SecAggPlusWorkflow`` and the client mod ``secaggplus_mod``. Both are used here unchanged:

- Server (``run_round``, called from FedGenStrategy.configure_train, strategies/base.py): instead of one plain train
  message per sampled client, the round's training runs through the workflow's four stages,
  driven on our Grid through a one-round LegacyContext: setup (protocol settings out, two public
  keys back), share keys (each client's mask seed and private key, Shamir-shared among its
  neighbours, encrypted for them, relayed by the server), collect masked vectors (the global
  adapter and round config go out with the relayed shares; the client trains and uploads its
  masked vector), unmask (survivors send the shares that remove the masks). The Message-API
  strategy then aggregates the one result (``aggregate_round``), so FedAvg, FedProx, FedAdam,
  FedYogi, FedPer, Ditto, FFA-LoRA and FedSA-LoRA keep their own server step.
- Client (``secure_aggregation_mod``, first of the train handler's mods): protocol messages go
  through ``secaggplus_mod``; at the masked-vector stage it calls the ordinary train handler
  with the plain train message it expects (``_as_legacy_fit`` converts both ways). Messages
  without the protocol's record (every message when the switch is off) pass untouched.

What is shared: the server receives public keys, encrypted shares it cannot read, each client's
plain metrics (num-examples, train-loss, partition-id: SecAgg+ needs the weight in the clear,
as in Flower) and one masked integer vector per client, which alone is uniformly random. The
server learns only the sum: the num-examples-weighted mean of the clients' adapters, the same
thing a plain FedAvg server publishes, never one client's adapter. What stays on the client:
its data, its adapter, its personal adapter, its mask seed and private keys.

Quantization (the only difference from the plain mean): a client multiplies its adapter by
w = round(T n / W) / T (n = num-examples, W = ``secagg.max-weight``, T =
``secagg.quantization-range``), clips it to [-c, c] (c = ``secagg.clipping-range``) and
stochastically rounds it onto the T-point grid over [-c, c] (step 2c / T). Per coordinate the
secure mean differs from the plain weighted mean by at most k * 2c / (T * sum w) (k clients,
one grid step each) plus max|x| * W / (T * min n) from rounding the weights; an adapter entry
with |w x| > c is clipped (keep c above the adapter's largest entry). Sums live modulo 2^32:
clients per round times T must stay below it (checked every round).

Not combinable (refused at start by strategies/registry.py, naming the key): anything
that needs one client's update in the clear — aggregation other than mean, max-update-norm,
DP's per-update clipping check and unweighted noised mean (dp.noise-multiplier), upload
compression, retries, heterogeneous-rank and full-model strategies, local-only.
Client dropouts are what SecAgg+ handles: a client that fails after sharing its keys is unmasked
from its neighbours' shares (up to the reconstruction threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from strategies.records import ARRAYS_KEY, NUM_EXAMPLES, TRAIN_LOSS, log, wire_bytes
from task.config import ConfigError, RunConfig, SecAggConfig

ADAPTER_KEYS = "secagg-adapter-keys"  # FitIns config: the names of the legacy Parameters' arrays
MODULUS = 2**32  # Flower's default modulus_range: masked sums live modulo it


def workflow(settings: SecAggConfig, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ server workflow with the run's secagg.* settings."""
    # floats: shares as a proportion of the sampled clients, threshold of the shares
    return SecAggPlusWorkflow(
        num_shares=float(settings.num_shares),
        reconstruction_threshold=float(settings.reconstruction_threshold),
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, modulus_range=MODULUS, timeout=timeout)


@dataclass
class SecureRound:
    """What one protocol run gave the server."""
    aggregate: dict[str, np.ndarray] | None  # the weighted mean; None: the protocol halted
    metrics: list[dict] = field(default_factory=list)  # plain metrics of the summed clients
    dropped: int = 0  # failures of sampled clients during the protocol
    sent_bytes: int = 0  # every stage, server -> clients
    received_bytes: int = 0  # every stage, clients -> server


class _CountingGrid:
    """The run's Grid, counting the wire bytes of every protocol message both ways."""

    def __init__(self, grid) -> None:
        self.grid, self.sent, self.received = grid, 0, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += sum(wire_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(wire_bytes(m.content) for m in replies if not m.has_error())
        return replies


class _OneRound(LegacyFedAvg):
    """The legacy strategy the workflow drives: our sampled nodes get the FitIns; the
    workflow hands back the dequantized mean (the same parameters for every result)."""

    def __init__(self, proxies: list[GridClientProxy], fit_config: dict) -> None:
        super().__init__(fraction_evaluate=0.0)
        self.proxies, self.fit_config = proxies, fit_config
        self.results: list[tuple] = []
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(parameters, dict(self.fit_config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, failures
        return (results[0][1].parameters if results else None), {}


def run_round(settings: SecAggConfig, timeout: float, grid, server_round: int,
              messages: list[Message]) -> SecureRound | None:
    """Run one round's training through SecAgg+ with the payload FedGenStrategy built for the
    sampled nodes (``messages``: the same content to each); None when nobody was sampled."""
    if not messages:
        return None
    nodes = [m.metadata.dst_node_id for m in messages]
    if len(nodes) * settings.quantization_range >= MODULUS:
        raise ConfigError(f"run-config key 'secagg.quantization-range' = "
                          f"{settings.quantization_range}: {len(nodes)} clients per round x "
                          f"quantization range must stay below 2**32 (the masked sums overflow)")
    content = messages[0].content
    arrays, config = content["arrays"], content["config"]
    keys = list(arrays.keys())
    parameters = ndarrays_to_parameters([arrays[k].numpy() for k in keys])
    fit_config = {**{k: v for k, v in config.items()}, ADAPTER_KEYS: "\n".join(keys)}
    counting = _CountingGrid(grid)
    proxies = [GridClientProxy(n, counting, 0) for n in nodes]
    strategy, manager = _OneRound(proxies, fit_config), SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=server_round), strategy=strategy,
                            client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        parameters, keep_input=True)
    workflow(settings, timeout)(counting, context)

    aggregate = None
    if strategy.results:
        mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
        aggregate = {k: np.asarray(v).reshape(arrays[k].shape).astype(arrays[k].numpy().dtype)
                     for k, v in zip(keys, mean)}
    return SecureRound(aggregate=aggregate,
                       metrics=[dict(res.metrics) for _, res in strategy.results],
                       dropped=len(nodes) - len(strategy.results),
                       sent_bytes=counting.sent, received_bytes=counting.received)


def aggregate_round(min_replies: int, server_round: int, stats: dict, result: SecureRound | None,
                    flower_aggregate) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The strategy's aggregate_train under SecAgg+: the secure mean, handed to the Flower
    strategy (``flower_aggregate``) as its single update so its own server step still runs.
    (The protocol's bytes were counted when it ran: FedGenStrategy.configure_train.)"""
    if result is None:  # nobody was sampled
        return None, None
    stats.update(num_updates=len(result.metrics), failures=stats["failures"] + result.dropped)
    if result.aggregate is None or len(result.metrics) < max(1, min_replies):
        stats["skipped"] = 1
        log.warning("round %d: secure aggregation gave no aggregate (%d of %d clients summed, "
                    "min-replies %d): round skipped, the global model is unchanged", server_round,
                    len(result.metrics), len(result.metrics) + result.dropped, min_replies)
        return None, None
    weights = [float(m[NUM_EXAMPLES]) for m in result.metrics]
    losses = [float(m.get(TRAIN_LOSS, math.nan)) for m in result.metrics]
    stats["train_loss"] = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    instruction = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
    carrier = Message(RecordDict({
        ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in result.aggregate.items()}),
        "metrics": MetricRecord({NUM_EXAMPLES: sum(weights), "train-loss": stats["train_loss"]})}),
        reply_to=instruction)
    arrays, _ = flower_aggregate(server_round, [carrier])
    stats["aggregation_error"] = math.nan  # needs each client's B A: the server never has them
    log.info("round %d: secure aggregation of %d clients (%d dropped); %d B down, %d B up",
             server_round, len(weights), result.dropped, result.sent_bytes, result.received_bytes)
    return arrays, MetricRecord({"train-loss": stats["train_loss"], "num-updates": len(weights)})


# ---------------------------------------------------------------------------- client side
def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: a SecAgg+ protocol message goes through Flower's secaggplus_mod (its
    state lives in ``context.state``); any other message passes untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, lambda m, c: _as_legacy_fit(m, c, call_next))
    return call_next(msg, context)


def _as_legacy_fit(msg: Message, context: Context, call_next) -> Message:
    """The masked-vector stage calls the train handler with a legacy FitIns: hand the handler
    the plain train message it expects, and return its upload as the FitRes the mod masks."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop(ADAPTER_KEYS)).split("\n")
    received = parameters_to_ndarrays(fitins.parameters)
    msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zip(keys, received)}),
                              "config": ConfigRecord(config)})
    reply = call_next(msg, context)
    upload, metrics = reply.content.array_records.get("arrays"), reply.content["metrics"]
    if upload is None or list(upload.keys()) != keys:
        raise ValueError("secure aggregation: the upload must carry the received adapter keys")
    max_weight = RunConfig.from_run_config(context.run_config).secagg.max_weight
    if metrics["num-examples"] > max_weight:  # Flower would only warn and clip the adapter
        raise ConfigError(f"run-config key 'secagg.max-weight' = {max_weight}: this client has "
                          f"{metrics['num-examples']} examples; raise it above the largest client")
    fitres = FitRes(status=Status(Code.OK, ""),
                    parameters=ndarrays_to_parameters([upload[k].numpy() for k in keys]),
                    num_examples=int(metrics["num-examples"]), metrics=dict(metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
