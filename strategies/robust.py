"""Defences against poisoned updates, on the validated update arrays (plain numpy).

Every strategy's FedGenStrategy.aggregate_train applies them, after the per-reply checks of
``check_update`` (keys, shapes, dtypes, NaN/Inf) and before the strategy's own aggregation:

- ``max-update-norm``: an update whose change from the global adapter it started from is longer
  (L2 over all its tensors) than this is rejected, like a malformed one: an "absurd norm".
- ``aggregation`` (``aggregate_robust``), computed here; the result is handed to the strategy as
  its single update, so FedAdam/FedYogi still apply their server optimizer to it:
  - ``norm-bound``: every change is scaled down to at most ``norm-bound`` before the weighted
    mean. Sun et al., "Can You Really Backdoor Federated Learning?", arXiv:1911.07963 (2019).
  - ``median``: coordinate-wise median; ``trimmed-mean``: coordinate-wise mean after dropping
    the ``trim-fraction`` largest and smallest values. Yin et al., "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018.
"""

from __future__ import annotations

import math

import numpy as np

Arrays = dict[str, np.ndarray]


def delta_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of (update - reference) over all tensors together, in float64."""
    total = sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)
    return math.sqrt(total)


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
