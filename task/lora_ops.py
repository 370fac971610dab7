"""LoRA algebra behind exact and heterogeneous-rank aggregation (plain numpy / torch, no flwr).

A LoRA layer adds ``scale * B @ A`` to its frozen weight (B: out x r, A: r x in, scale =
lora.alpha / lora.rank). Averaging A and B separately gives mean(B) mean(A), which is not the
mean of the client updates mean(B_i A_i); the helpers here compute products, stack factors
(sum_i w_i B_i A_i = [w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K], exact for any mix of ranks),
truncate / zero-pad ranks, measure the aggregation error, and apply a server-side correction
(a low-rank or dense matrix per layer) on top of the frozen backbone without touching it.

Every function that takes a state works on numpy arrays (server) and torch tensors (client).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from task.adapters import ensure_adapter
from task.config import RunConfig, parse_rank_mix

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# Keys of the correction that travels beside the adapter (fedex-lora, flora): per layer either
# low-rank factors (CORR_B @ CORR_A) or a dense matrix, whichever is smaller on the wire.
CORR_B, CORR_A, CORR_DENSE = ".correction_B", ".correction_A", ".correction_dense"
CORRECTION_SUFFIXES = (CORR_B, CORR_A, CORR_DENSE)

# Device profiles by memory budget (node config "memory-mb"): the rank a device trains. Adapter
# memory is small next to activations, so the tiers follow typical edge classes (phone < 3 GB
# free, small board < 6 GB, Jetson-class < 12 GB, above: the server's full rank).
MEMORY_TIERS_MB = ((3072, 2), (6144, 4), (12288, 8))


def lora_prefixes(keys: Iterable[str]) -> list[str]:
    """The layer prefixes of a LoRA state (``<prefix>.lora_A.weight`` and ``.lora_B.weight``)."""
    keys = set(keys)
    return sorted(k[:-len(A_SUFFIX)] for k in keys
                  if k.endswith(A_SUFFIX) and k[:-len(A_SUFFIX)] + B_SUFFIX in keys)


def rank_of(state: Mapping) -> int:
    return int(next(v.shape[0] for k, v in state.items() if k.endswith(A_SUFFIX)))


def truncate_rank(state: Mapping, rank: int) -> dict:
    """The first ``rank`` components: A[:r], B[:, :r] (HetLoRA's truncation)."""
    return {k: v[:rank] if k.endswith(A_SUFFIX) else v[:, :rank] if k.endswith(B_SUFFIX) else v
            for k, v in state.items()}


def pad_rank(state: Mapping, rank: int) -> dict:
    """Zero-pad A's rows and B's columns up to ``rank``: the same product B @ A."""
    out = {}
    for k, v in state.items():
        if k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX):
            axis = 0 if k.endswith(A_SUFFIX) else 1
            widths = [(0, 0), (0, 0)]
            widths[axis] = (0, rank - v.shape[axis])
            if isinstance(v, torch.Tensor):
                v = F.pad(v, (0, widths[1][1], 0, widths[0][1]))
            else:
                v = np.pad(v, widths)
        out[k] = v
    return out


def products(state: Mapping) -> dict:
    """{layer prefix: B @ A} in float64 (numpy)."""
    return {p: np.asarray(state[p + B_SUFFIX], np.float64) @ np.asarray(state[p + A_SUFFIX], np.float64)
            for p in lora_prefixes(state)}


def mean_of_products(states: list[Mapping], weights: list[float]) -> dict:
    """The exact aggregate: sum_i w_i B_i A_i / sum_i w_i, per layer."""
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for state, w in zip(states, weights):
        for p, prod in products(state).items():
            out[p] = out.get(p, 0.0) + (w / total) * prod
    return out


def stacked(states: list[Mapping], weights: list[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{prefix: (B_stack, A_stack)} with B_stack @ A_stack = sum_i w_i B_i A_i / sum w (FLoRA).

    The stacked rank is the sum of the clients' ranks, whatever they are.
    """
    total = float(sum(weights))
    return {p: (np.concatenate([np.asarray(s[p + B_SUFFIX], np.float32) * np.float32(w / total)
                                for s, w in zip(states, weights)], axis=1),
                np.concatenate([np.asarray(s[p + A_SUFFIX], np.float32) for s in states], axis=0))
            for p in lora_prefixes(states[0])}


def product_error(aggregated: Mapping[str, np.ndarray], exact: Mapping[str, np.ndarray]) -> float:
    """Relative Frobenius error ||P_agg - P_exact|| / ||P_exact|| over all layers (0 = exact)."""
    num = sum(float(np.sum((np.asarray(aggregated[p], np.float64) - exact[p]) ** 2)) for p in exact)
    den = sum(float(np.sum(exact[p] ** 2)) for p in exact)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ------------------------------------------------------------------ heterogeneous ranks
def rank_assignment(mix: Mapping[int, float], num_partitions: int, seed: int) -> list[int]:
    """Rank of each partition: the mix's shares rounded to whole clients, shuffled by seed."""
    ranks: list[int] = []
    for rank, share in sorted(mix.items()):
        ranks += [rank] * round(share * num_partitions)
    ranks = (ranks + [max(mix)] * num_partitions)[:num_partitions]  # rounding leftovers
    random.Random(seed).shuffle(ranks)
    return ranks


def client_rank(cfg: RunConfig, node_config: Mapping) -> int:
    """The LoRA rank a client trains, from its device profile in the node config.

    An explicit ``lora-rank``, else a ``memory-mb`` budget (MEMORY_TIERS_MB), else its share of
    the run's ``lora.rank-mix`` (by ``partition-id``, simulation), else ``lora.rank``; never
    above the server's ``lora.rank``.
    """
    if "lora-rank" in node_config:
        rank = int(node_config["lora-rank"])
    elif "memory-mb" in node_config:
        budget = float(node_config["memory-mb"])
        rank = next((r for limit, r in MEMORY_TIERS_MB if budget < limit), cfg.lora.rank)
    elif cfg.lora.rank_mix and "partition-id" in node_config:
        ranks = rank_assignment(parse_rank_mix(cfg.lora.rank_mix), int(node_config["num-partitions"]),
                                cfg.seed)
        rank = ranks[int(node_config["partition-id"])]
    else:
        rank = cfg.lora.rank
    return max(1, min(rank, cfg.lora.rank))


# ------------------------------------------------------------------ server-side correction
def split_correction(state: Mapping) -> tuple[dict, dict]:
    """(adapter tensors, correction tensors) of a received state."""
    corr = {k: v for k, v in state.items() if k.endswith(CORRECTION_SUFFIXES)}
    return {k: v for k, v in state.items() if k not in corr}, corr


def dense_correction(corr: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer prefix: dense out x in correction} from its wire form (factors or dense)."""
    out = {}
    for k, v in corr.items():
        if k.endswith(CORR_DENSE):
            out[k[:-len(CORR_DENSE)]] = v.float()
        elif k.endswith(CORR_B):
            p = k[:-len(CORR_B)]
            out[p] = v.float() @ corr[p + CORR_A].float()
    return out


def _add_correction(module: nn.Module, inputs, output):
    corr = getattr(module, "fedgen_correction", None)
    if corr is None:
        return output
    x = inputs[0]  # a bf16 backbone outside autocast gives bf16 inputs: match them
    return output + F.linear(x, corr.to(x.dtype)).to(output.dtype)


def set_base_correction(model: nn.Module, corr: Mapping[str, torch.Tensor] | None,
                        scale: float) -> None:
    """Add ``scale * corr[layer] @ x`` to each LoRA layer's output (None / {}: remove).

    The frozen backbone is shared by every client of the process, so the correction is not
    merged into its weights: a forward hook adds it, and the next call replaces it.
    """
    dense = dense_correction(corr or {})
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        if not getattr(module, "fedgen_correction_hooked", False):
            module.register_forward_hook(_add_correction)
            module.fedgen_correction_hooked = True
        module.fedgen_correction = scale * dense[name] if name in dense else None
    unknown = set(dense) - {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    if unknown:
        raise KeyError(f"correction for unknown layers {sorted(unknown)[:3]}")


# ------------------------------------------------------------------ a rank-r adapter per client
def correction_scale(cfg: RunConfig) -> float:
    """peft's LoRA scale alpha / r; every rank's adapter uses it (see rank_adapter)."""
    return cfg.lora.alpha / cfg.lora.rank


def rank_adapter(model, cfg: RunConfig, rank: int) -> str:
    """The name of a rank-``rank`` adapter on the shared backbone (added on first use).

    Its alpha is scaled with the rank (alpha * r / lora.rank), so every rank has the same
    scale and a zero-padded rank-r adapter is exactly the rank-lora-rank one.
    """
    if rank == cfg.lora.rank:
        return "default"
    name = f"rank-{rank}"
    ensure_adapter(model, replace(cfg, lora=replace(cfg.lora, rank=rank,
                                                    alpha=cfg.lora.alpha * rank / cfg.lora.rank)),
                   name)
    return name


@contextmanager
def active_adapter(model, name: str):
    """Train / evaluate the named adapter, then make "default" active again."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")
