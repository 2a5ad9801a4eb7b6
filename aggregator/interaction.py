"""Inter-cluster knowledge interaction: clusters learn from each other in ΔW space.

Two mechanisms, both exact in ΔW = scale·B·A and re-factorised to rank r:

1. **A global component, by empirical-Bayes shrinkage** (``shrink_to_global``). Per LoRA
   module, each cluster's ΔW is pulled toward the device-weighted mean over all clusters by
   the positive-part James-Stein factor: how noisy the cluster's own estimate is (the
   within-cluster spread of its devices' updates over its device count) against how far it
   sits from the global mean. Modules on which the clusters agree (what every style shares)
   are pooled over the whole fleet; modules that carry a cluster's own style, far from the
   mean relative to the noise, are left alone. Nothing is a tuned constant. Opt-in
   (``global_shrinkage``): the factor minimises squared error in ΔW under isotropic noise,
   and device noise is not isotropic, so a small-norm, decisive style direction can be pooled
   away with the noise (docs/results.md, "interaction", has what that cost on styled digits).
2. **Similarity-weighted mixing** (``interact``), gated by task and update similarity (below).

After each cluster has aggregated its own devices, the cloud step lets every cluster
borrow from the others in proportion to how alike their tasks are and how little data
it has of its own (empirical-Bayes style shrinkage):

    ΔW'_c = λ_c ΔW_c + (1 - λ_c) Σ_{j≠c} π_cj ΔW_j,
    λ_c   = n_c / (n_c + κ),       π_cj = softmax_j( cos(μ_c, μ_j) / T )

with n_c the cluster's sample count (in devices), μ its task centroid, κ the ``borrow``
strength and T the temperature. A large cluster keeps almost all of itself; a
two-device cluster takes a noticeable share from its most similar neighbours. All
products are exact ΔW matrices, re-factorised to rank r like intra-cluster aggregation.

The aggregator gates the lenders: by default a cluster lends only if its ΔW has a cosine of
at least ``interaction_min_agreement`` with the borrower's (``adapter_agreement``); a gate on
the *centered* task-centroid cosine (``interaction_min_similarity``) is available as well.
Why the ΔW decides: ungated mixing pulls every cluster toward the other styles, and task
centroids do not separate tasks as cleanly as updates do (a sentence encoder puts opposite
styles such as *bold* and *thin* close). Clusters of one task split across edge sites, or
across clustering mistakes, are what the gate lets through (docs/results.md, "interaction").
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from aggregator.rules.base import Adapter, ClientUpdate, sample_weights
from aggregator.rules.exact import mean_delta, refactorize
from models.lora import LoraConfig, delta_weight, lora_modules, lora_scale

log = logging.getLogger(__name__)

Key = Hashable  # a cluster id; at the cloud, (edge, cluster id)
Spread = Mapping[str, float]  # per LoRA module: per-device variance of ΔW around the cluster mean


def update_spread(updates: Sequence[ClientUpdate], lora: LoraConfig) -> dict[str, float] | None:
    """Per module, the per-device variance Σ‖ΔW_i − ΔW̄‖² of one cluster's updated adapters.

    Sample-weighted with the unbiased correction 1 / (1 − Σw²); ``None`` for a single device,
    whose noise cannot be seen from its own update (the shrinkage then pools the others'), and
    likewise when one device carries (nearly) all the weight: 1 − Σw² is then 0 or rounding noise.
    Computed as Σ w_i‖ΔW_i‖² − ‖ΔW̄‖² from the rank-r factors (‖BA‖² = tr(BᵀB·AAᵀ)), so a
    cluster of thousands never holds one ΔW per device.
    """
    if len(updates) < 2:
        return None
    w = sample_weights(updates)
    correction = 1.0 - float((w ** 2).sum())
    if not correction > 1e-9:  # effective sample size 1 / Σw² within rounding of one device
        return None
    spread: dict[str, float] = {}
    for module in lora_modules(updates[0].adapter):
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a = torch.stack([u.adapter[ka].reshape(u.adapter[ka].shape[0], -1) for u in updates]).double()
        b = torch.stack([u.adapter[kb].reshape(u.adapter[kb].shape[0], -1) for u in updates]).double()
        own = lora_scale(lora) ** 2 * torch.einsum("nij,nji->n", b.transpose(1, 2) @ b, a @ a.transpose(1, 2))
        mean = mean_delta(a, b, w, lora_scale(lora))
        spread[module] = max(0.0, float((w * own).sum() - (mean ** 2).sum())) / correction
    return spread


def shrink_to_global(adapters: Mapping[Key, Adapter], sizes: Mapping[Key, float],
                     spreads: Mapping[Key, Spread | None], lora: LoraConfig,
                     leave_one_out: bool = False) -> tuple[dict[Key, Adapter], dict]:
    """Pull each cluster toward the fleet's mean ΔW, per module, by James-Stein shrinkage.

    ΔW'_c = G + (1 − s_c)(ΔW_c − G), G = Σ_j n_j ΔW_j / Σ n_j, s_c = min(1, (p−2)/p · σ²/n_c / ‖ΔW_c − G‖²)
    with σ² the module's per-device spread pooled over every cluster that has one (weighted by
    its degrees of freedom) and p the module's size. ``leave_one_out`` takes G over the other
    clusters only: with a handful of clusters, a large one is otherwise pulled toward a mean
    that is mostly itself. Returns the adapters and the factors s (cluster -> module -> s),
    which the aggregator logs. No spread anywhere (every cluster a single device): nothing to
    estimate the noise from, adapters unchanged.
    """
    known = {c: s for c, s in spreads.items() if s is not None and c in adapters and sizes[c] > 0}
    ids = sorted(adapters)
    total = sum(max(sizes[c], 0.0) for c in ids)
    if len(adapters) < 2 or not known or total <= 0:
        return {c: {k: v.clone() for k, v in a.items()} for c, a in adapters.items()}, {}
    dof = {c: max(sizes[c] - 1.0, 1.0) for c in known}
    out: dict[Key, Adapter] = {c: {} for c in ids}
    factors: dict[Key, dict[str, float]] = {c: {} for c in ids}
    for module in lora_modules(adapters[ids[0]]):
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        sigma2 = sum(dof[c] * known[c][module] for c in known) / sum(dof.values())
        deltas = {c: delta_weight(adapters[c][ka], adapters[c][kb], lora_scale(lora)) for c in ids}
        fleet = sum(sizes[c] * deltas[c] for c in ids)
        p = deltas[ids[0]].numel()
        for c in ids:
            rest = total - sizes[c]
            mean = (fleet - sizes[c] * deltas[c]) / rest if leave_one_out and rest > 0 else fleet / total
            gap = float(((deltas[c] - mean) ** 2).sum())
            # a cluster without devices has no estimate of its own: it takes the mean whole
            noise = (p - 2) / p * sigma2 / sizes[c] if sizes[c] > 0 else float("inf")
            s = 1.0 if gap <= noise else noise / gap
            factors[c][module] = s
            shrunk = mean + (1.0 - s) * (deltas[c] - mean)
            out[c][ka], out[c][kb] = refactorize(shrunk, adapters[c][ka], adapters[c][kb], lora_scale(lora))
    return out, factors


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


def adapter_agreement(adapters: Mapping[Key, Adapter], lora: LoraConfig) -> dict[Key, dict[Key, float]]:
    """Cosine between clusters' whole ΔW (every module), from the rank-r factors.

    ⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)), so no ΔW is formed. A cluster that has learnt nothing
    yet (ΔW = 0) agrees with no one.
    """
    ids = sorted(adapters)
    gram = np.zeros((len(ids), len(ids)))
    for module in lora_modules(adapters[ids[0]]):
        a = [adapters[c][f"{module}.lora_A.weight"].double().flatten(1) for c in ids]
        b = [adapters[c][f"{module}.lora_B.weight"].double().flatten(1) for c in ids]
        for x in range(len(ids)):
            for y in range(x, len(ids)):
                gram[x, y] += lora_scale(lora) ** 2 * float(torch.trace((b[x].T @ b[y]) @ (a[y] @ a[x].T)))
    gram = np.triu(gram) + np.triu(gram, 1).T
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    return {c: {j: float(gram[x, y] / (norms[x] * norms[y])) if norms[x] > 0 and norms[y] > 0 else 0.0
                for y, j in enumerate(ids)} for x, c in enumerate(ids)}


def mixing_weights(centroids: Mapping[Key, np.ndarray], sizes: Mapping[Key, float], borrow: float,
                   temperature: float, min_similarity: float | None = None,
                   agreement: Mapping[Key, Mapping[Key, float]] | None = None,
                   min_agreement: float = 0.0) -> dict[Key, dict[Key, float]]:
    """``w[c][j]``: share of cluster j's ΔW in cluster c's new ΔW (rows sum to 1).

    With ``min_similarity`` a cluster borrows only from clusters whose centered centroid
    cosine reaches it, and with ``agreement`` (``adapter_agreement``) only from those whose ΔW
    cosine with its own reaches ``min_agreement``; it keeps everything when none does:
    mixing in a different task's ΔW costs more than a small cluster's noise.
    """
    if borrow < 0 or temperature <= 0:
        raise ValueError("borrow must be >= 0 and temperature > 0")
    ids = sorted(centroids)
    centered = centered_similarity(centroids) if min_similarity is not None else None
    weights: dict[Key, dict[Key, float]] = {}
    for c in ids:
        others = [j for j in ids if j != c and (agreement is None or agreement[c][j] >= min_agreement)]
        if centered is None:
            sims = np.array([float(np.dot(centroids[c], centroids[j])) for j in others]) / temperature
        else:
            others = [j for j in others if centered[c][j] >= min_similarity]
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
             lora: LoraConfig, borrow: float = 1.0, temperature: float = 0.1,
             min_similarity: float | None = None, spreads: Mapping[Key, Spread | None] | None = None,
             min_agreement: float | None = None, label: str = "") -> dict[Key, Adapter]:
    """New adapter per cluster: the global component (with ``spreads``), then similarity mixing,
    gated by ``min_similarity`` (task centroids) and ``min_agreement`` (ΔW cosine) when given.

    Identity when there is one cluster, or no spread is known and ``borrow`` = 0.
    """
    if spreads is not None:
        adapters, factors = shrink_to_global(adapters, sizes, spreads, lora)
        if factors:
            log.info("interaction %s: share taken from the global component per cluster (mean over modules) %s",
                     label, {c: round(float(np.mean(list(f.values()))), 3) for c, f in sorted(factors.items())})
    agreement = adapter_agreement(adapters, lora) if min_agreement is not None and borrow > 0 else None
    weights = mixing_weights(centroids, sizes, borrow, temperature, min_similarity, agreement,
                             0.0 if min_agreement is None else min_agreement)
    lenders = {c: {j: round(x, 3) for j, x in w.items() if j != c} for c, w in sorted(weights.items()) if len(w) > 1}
    if not lenders:
        return {c: {k: v.clone() for k, v in a.items()} for c, a in adapters.items()}
    log.info("interaction %s: lenders per cluster %s", label, lenders)
    modules = lora_modules(next(iter(adapters.values())))
    out: dict[Key, Adapter] = {c: {} for c in adapters}
    for module in modules:
        ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        deltas = {c: delta_weight(a[ka], a[kb], lora_scale(lora)) for c, a in adapters.items()}
        for c in adapters:
            mixed = sum(w * deltas[j] for j, w in weights[c].items())
            out[c][ka], out[c][kb] = refactorize(mixed, adapters[c][ka], adapters[c][kb], lora_scale(lora))
    return out
