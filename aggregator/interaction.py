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

The aggregator gates the neighbours (``interaction_min_similarity``): only clusters whose
centered centroid cosine reaches the threshold lend anything, with π over those centered
cosines. Measured on styled digits (benchmarks/federation.py --quick), ungated mixing
pulled every cluster toward the other styles: the one-device cluster fell from 0.92 style
accuracy (intra-cluster only) to 0.17. Clusters of one task split across edge sites, or
across clustering mistakes, are what the gate lets through.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from aggregator.rules.base import Adapter
from aggregator.rules.exact import refactorize
from models.lora import LoraSpec, delta_weight, lora_modules

Key = Hashable  # a cluster id; at the cloud, (edge, cluster id)


def centered_similarity(centroids: Mapping[Key, np.ndarray]) -> dict[Key, dict[Key, float]]:
    """Cosine of task centroids after removing their common mean.

    A generic sentence encoder puts every "digit in some style" prompt close together (raw
    cosines of ~0.9 between opposite styles), so raw cosine barely tells tasks apart; what
    tells them apart is how each differs from the rest. Two centroids that both equal the
    mean (the same task, e.g. one task on two edge sites) count as identical.
    """
    ids = sorted(centroids)
    x = np.stack([np.asarray(centroids[c], dtype=np.float64) for c in ids])
    x = x - x.mean(axis=0)
    norms = np.linalg.norm(x, axis=1)
    tiny = 1e-6 * max(1.0, float(norms.max()))
    sim: dict[Key, dict[Key, float]] = {}
    for a, c in enumerate(ids):
        sim[c] = {}
        for b, j in enumerate(ids):
            if norms[a] <= tiny or norms[b] <= tiny:
                sim[c][j] = 1.0 if norms[a] <= tiny and norms[b] <= tiny else 0.0
            else:
                sim[c][j] = float(x[a] @ x[b] / (norms[a] * norms[b]))
    return sim


def mixing_weights(centroids: Mapping[Key, np.ndarray], sizes: Mapping[Key, float], borrow: float,
                   temperature: float, min_similarity: float | None = None) -> dict[Key, dict[Key, float]]:
    """``w[c][j]``: share of cluster j's ΔW in cluster c's new ΔW (rows sum to 1).

    With ``min_similarity`` a cluster borrows only from clusters whose centered centroid
    cosine reaches it (and keeps everything when none does): mixing in a different task's
    ΔW costs more than a small cluster's noise, as measured on styled digits.
    """
    if borrow < 0 or temperature <= 0:
        raise ValueError("borrow must be >= 0 and temperature > 0")
    ids = sorted(centroids)
    centered = centered_similarity(centroids) if min_similarity is not None else None
    weights: dict[Key, dict[Key, float]] = {}
    for c in ids:
        if centered is None:
            others = [j for j in ids if j != c]
            sims = np.array([float(np.dot(centroids[c], centroids[j])) for j in others]) / temperature
        else:
            others = [j for j in ids if j != c and centered[c][j] >= min_similarity]
            sims = np.array([centered[c][j] for j in others]) / temperature
        if not others or borrow == 0:
            weights[c] = {c: 1.0}
            continue
        keep = sizes[c] / (sizes[c] + borrow)
        pi = np.exp(sims - sims.max())
        pi /= pi.sum()
        weights[c] = {c: keep} | {j: (1.0 - keep) * float(p) for j, p in zip(others, pi)}
    return weights


def interact(adapters: Mapping[Key, Adapter], centroids: Mapping[Key, np.ndarray], sizes: Mapping[Key, float],
             spec: LoraSpec, borrow: float = 1.0, temperature: float = 0.1,
             min_similarity: float | None = None) -> dict[Key, Adapter]:
    """New adapter per cluster after mixing (identity when there is one cluster or ``borrow`` = 0)."""
    weights = mixing_weights(centroids, sizes, borrow, temperature, min_similarity)
    if all(len(w) == 1 for w in weights.values()):
        return {c: {k: v.clone() for k, v in a.items()} for c, a in adapters.items()}
    modules = lora_modules(next(iter(adapters.values())))
    out: dict[Key, Adapter] = {c: {} for c in adapters}
    for module in modules:
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        deltas = {c: delta_weight(a[ka], a[kb], spec.scale) for c, a in adapters.items()}
        for c in adapters:
            mixed = sum(w * deltas[j] for j, w in weights[c].items())
            out[c][ka], out[c][kb] = refactorize(mixed, adapters[c][ka], adapters[c][kb], spec.scale)
    return out

