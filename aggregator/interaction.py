"""Inter-cluster knowledge interaction: clusters learn from each other in ΔW space.

After each cluster has aggregated its own devices, the cloud step lets every cluster
borrow from the others in proportion to how alike their tasks are and how little data
it has of its own (empirical-Bayes style shrinkage):

    ΔW'_c = λ_c ΔW_c + (1 - λ_c) Σ_{j≠c} π_cj ΔW_j,
    λ_c   = n_c / (n_c + κ),       π_cj = softmax_j( cos(μ_c, μ_j) / T )

with n_c the cluster's sample count (in devices), μ its task centroid, κ the ``borrow``
strength and T the temperature. A large cluster keeps almost all of itself; a
two-device cluster takes a noticeable share from its most similar neighbours. All
products are exact ΔW matrices, re-factorised to rank r like intra-cluster aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator.rules.base import Adapter
from aggregator.rules.exact import refactorize
from models.lora import LoraSpec, delta_weight, lora_modules


def mixing_weights(centroids: Mapping[int, np.ndarray], sizes: Mapping[int, float], borrow: float,
                   temperature: float) -> dict[int, dict[int, float]]:
    """``w[c][j]``: share of cluster j's ΔW in cluster c's new ΔW (rows sum to 1)."""
    if borrow < 0 or temperature <= 0:
        raise ValueError("borrow must be >= 0 and temperature > 0")
    ids = sorted(centroids)
    weights: dict[int, dict[int, float]] = {}
    for c in ids:
        others = [j for j in ids if j != c]
        if not others or borrow == 0:
            weights[c] = {c: 1.0}
            continue
        keep = sizes[c] / (sizes[c] + borrow)
        sims = np.array([float(np.dot(centroids[c], centroids[j])) for j in others]) / temperature
        pi = np.exp(sims - sims.max())
        pi /= pi.sum()
        weights[c] = {c: keep} | {j: (1.0 - keep) * float(p) for j, p in zip(others, pi)}
    return weights


def interact(adapters: Mapping[int, Adapter], centroids: Mapping[int, np.ndarray], sizes: Mapping[int, float],
             spec: LoraSpec, borrow: float = 1.0, temperature: float = 0.1) -> dict[int, Adapter]:
    """New adapter per cluster after mixing (identity when there is one cluster or ``borrow`` = 0)."""
    weights = mixing_weights(centroids, sizes, borrow, temperature)
    if all(len(w) == 1 for w in weights.values()):
        return {c: {k: v.clone() for k, v in a.items()} for c, a in adapters.items()}
    modules = lora_modules(next(iter(adapters.values())))
    out: dict[int, Adapter] = {c: {} for c in adapters}
    for module in modules:
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        deltas = {c: delta_weight(a[ka], a[kb], spec.scale) for c, a in adapters.items()}
        for c in adapters:
            mixed = sum(w * deltas[j] for j, w in weights[c].items())
            out[c][ka], out[c][kb] = refactorize(mixed, adapters[c][ka], adapters[c][kb], spec.scale)
    return out

