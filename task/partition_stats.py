"""How non-IID a partition is: per client, which labels (LDA topics of its documents, or image
classes) it holds, against the pool all clients share out.

- ``labels_per_client``: labels with at least one item, mean over clients;
- ``effective_labels``: exp(entropy) of a client's label histogram (1 = one label, k = k labels
  equally), mean over clients;
- ``js_divergence``: Jensen-Shannon divergence (base 2, in [0, 1]) of each client's label
  histogram from the pool's, mean and median over clients (0 = the pool's mix exactly).

Plain numpy; the tasks say what a label is (task.lm / task.image ``partition_stats``).
"""

from __future__ import annotations

import numpy as np


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two histograms (normalized here), in bits."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return max(0.0, _entropy_bits(m) - (_entropy_bits(p) + _entropy_bits(q)) / 2)


def label_statistics(client_labels: list[np.ndarray], pool_labels: np.ndarray,
                     num_labels: int) -> dict:
    """The statistics above for clients' label arrays (ints in [0, num_labels))."""
    pool = np.bincount(pool_labels, minlength=num_labels).astype(float)
    hists = [np.bincount(labels, minlength=num_labels).astype(float) for labels in client_labels
             if len(labels)]
    js = [js_divergence(h, pool) for h in hists]
    return {"clients": len(hists), "labels": num_labels,
            "labels_per_client": float(np.mean([(h > 0).sum() for h in hists])),
            "effective_labels": float(np.mean([2 ** _entropy_bits(h / h.sum()) for h in hists])),
            "js_divergence_mean": float(np.mean(js)), "js_divergence_median": float(np.median(js)),
            "items_per_client_min": int(min(h.sum() for h in hists)),
            "items_per_client_max": int(max(h.sum() for h in hists))}
