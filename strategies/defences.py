"""Defences and privacy on the validated update arrays (plain numpy), and retries.

Every strategy's FedGenStrategy.aggregate_train applies them, after the per-reply checks of
``check_update`` (keys, shapes, dtypes, NaN/Inf) and before the strategy's own aggregation:

- ``robust.max-update-norm``: an update whose change from the global adapter it started from is longer
  (L2 over all its tensors) than this is rejected, like a malformed one: an "absurd norm".
- ``robust.aggregation`` (``aggregate_robust``), computed here; the result is handed to the strategy as
  its single update, so FedAdam/FedYogi still apply their server optimizer to it:
  - ``norm-bound``: every change is scaled down to at most ``norm-bound`` before the weighted
    mean. Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963 (2019).
  - ``median``: coordinate-wise median; ``trimmed-mean``: coordinate-wise mean after dropping
    the ``trim-fraction`` largest and smallest values. Yin et al., "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
- ``multikrum`` (``multikrum_replies``): Flower's MultiKrum selection (Blanchard et al., "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017), applied to the
  adapter updates: each update is scored by its summed squared distance to its n - f - 2 nearest
  others (f = ``krum-malicious``), the ``krum-select`` best are kept and the strategy averages
  them as usual (weighted by sample count). Boosted backdoor updates sit far from the honest
  cluster, so they are the ones dropped.
- ``dp.*`` (``dp_noised_mean``): the unweighted mean of the clients' clipped changes plus
  Gaussian noise of std z * clip / n (DP-FedAvg, McMahan et al., ICLR 2018).
- ``robust.min-replies`` / ``on-too-few-replies = "retry"`` (``retry_sample``): too few valid
  replies in a round ask other clients.
"""

from __future__ import annotations

import math
import random

import numpy as np
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.supercore.differential_privacy import compute_stdv

from task.config import DPConfig, RobustConfig

Arrays = dict[str, np.ndarray]


def delta_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of (update - reference) over all tensors together, in float64."""
    total = sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)
    return math.sqrt(total)


def update_norms(updates: list[Arrays], reference: Arrays) -> list[float]:
    """Each update's L2 change from ``reference`` over the tensors it shares with it; [] when
    they are not comparable (a heterogeneous-rank client's adapter has other shapes)."""
    if any(k not in reference or v.shape != reference[k].shape for u in updates for k, v in u.items()):
        return []
    return [delta_norm(u, {k: reference[k] for k in u}) for u in updates]


def clip_delta(update: Arrays, reference: Arrays, bound: float) -> Arrays:
    """reference + (update - reference) scaled down to L2 norm <= bound."""
    norm = delta_norm(update, reference)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (reference[k] + scale * (update[k].astype(np.float64) - reference[k])
                ).astype(update[k].dtype) for k in reference}


def trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean over axis 0 after dropping the k lowest and k highest values,
    k = floor(trim_fraction * n) (never all of them)."""
    n = stack.shape[0]
    k = min(int(trim_fraction * n), (n - 1) // 2)
    ordered = np.sort(stack, axis=0)
    return ordered[k:n - k].mean(axis=0)


def aggregate_robust(updates: list[Arrays], weights: list[float], reference: Arrays,
                     method: str, norm_bound: float = 1.0, trim_fraction: float = 0.2) -> Arrays:
    """The robust aggregate of ``updates`` (each a full set of tensors), same keys and dtypes.

    ``reference`` is the global model the updates started from (norm-bound clips the change
    from it); median and trimmed mean are unweighted, as in Yin et al.
    """
    if not updates:
        raise ValueError("no update to aggregate")
    if method == "norm-bound":
        clipped = [clip_delta(u, reference, norm_bound) for u in updates]
        total = float(sum(weights))
        return {k: sum(w / total * c[k].astype(np.float64) for c, w in zip(clipped, weights)
                       ).astype(updates[0][k].dtype) for k in reference}
    out = {}
    for k in reference:
        stack = np.stack([u[k].astype(np.float64) for u in updates])
        if method == "median":
            value = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            value = trimmed_mean(stack, trim_fraction)
        elif method == "mean":  # unweighted (the DP mean: sensitivity clip / n)
            value = stack.mean(axis=0)
        else:
            raise ValueError(f"unknown aggregation {method!r}")
        out[k] = value.astype(updates[0][k].dtype)
    return out


def multikrum_replies(replies: list, robust: RobustConfig, log) -> list:
    """The replies MultiKrum keeps (Flower's ``select_multikrum`` on their arrays), in their
    order; each one dropped is logged with its node."""
    n = len(replies)
    select = robust.krum_select or n - robust.krum_malicious
    if n <= 2 or select >= n:
        log.warning("aggregate_train: multikrum keeps all %d updates (it needs more than 2, and "
                    "more than the %d it selects)", n, select)
        return replies
    kept = {id(c) for c in select_multikrum([m.content for m in replies], robust.krum_malicious,
                                            max(1, select))}
    for m in replies:
        if id(m.content) not in kept:
            log.warning("aggregate_train: multikrum dropped the update from node %s (among the "
                        "%d farthest from the others)", m.metadata.src_node_id, n - len(kept))
    return [m for m in replies if id(m.content) in kept]


def norm_limit(robust: RobustConfig, dp: DPConfig) -> float:
    """Longest accepted update change (0 = none): max-update-norm, and with DP the clipping
    norm the clients were told to apply (the server checks they did)."""
    limits = [x for x in (robust.max_update_norm,
                          dp.clipping_norm * (1 + 1e-4) if dp.enabled else 0) if x > 0]
    return min(limits) if limits else 0.0


def screen_norms(valid: list, reference: Arrays, limit: float, log) -> tuple[list, int]:
    """The (reply, arrays, weight) entries whose change from ``reference`` is at most
    ``limit`` (0: all), and how many were rejected (each logged with its node)."""
    if not limit:
        return valid, 0
    kept = []
    for msg, arrays, weight in valid:
        norm = delta_norm(arrays, reference)
        if norm > limit:
            log.warning("aggregate_train: rejected update from node %s: update norm %.4g "
                        "exceeds the limit %.4g", msg.metadata.src_node_id, norm, limit)
            continue
        kept.append((msg, arrays, weight))
    return kept, len(valid) - len(kept)


def dp_noised_mean(updates: list[Arrays], reference: Arrays, dp: DPConfig, seed: int,
                   server_round: int) -> Arrays:
    """The unweighted mean of n clipped updates plus Gaussian noise of std z * clip / n
    (Flower's compute_stdv), seeded by round so that a resumed run adds the same noise."""
    mean = aggregate_robust(updates, [1.0] * len(updates), reference, "mean")
    std = compute_stdv(dp.noise_multiplier, dp.clipping_norm, len(updates))
    rng = np.random.default_rng([seed, server_round, 0xD9])
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in mean.items()}


def retry_sample(candidates: list[int], num_asked: int, seed: int, server_round: int,
                 attempt: int) -> list[int]:
    """A seeded sample of nodes not asked yet this round, as many as were asked (at least 1)."""
    size = min(len(candidates), max(1, num_asked))
    rng = random.Random(seed * 1_000_003 + server_round * 7919 + 101 * attempt)
    return sorted(rng.sample(candidates, size)) if size else []
