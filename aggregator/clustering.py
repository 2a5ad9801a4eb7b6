"""Task clustering: who should share an adapter with whom, from task vectors alone.

Task vectors are devices' mean prompt encodings (noised, L2-normalised, decrypted by the
aggregator only). Three facts measured on styled digits shape this module
(``benchmarks/clustering.py``; the numbers are in docs/results.md):

* MiniLM embeddings share a large common direction; centring the vectors on their
  fleet mean before cosine clustering separates the tasks better.
* A generic encoder puts opposite styles close ("heavy strokes" vs "hairline strokes"):
  the silhouette-best k often merges exactly such a pair. We therefore take the
  *largest* k whose silhouette is within ``tolerance`` of the best: over-splitting a
  style costs a round of smaller clusters, merging two styles costs a wrong adapter.
* After a round, devices' adapter updates separate styles far better than text does.
  ``refine_with_updates`` re-clusters on a blend of both similarities (CFL-style,
  Sattler et al., 2020), merging over-split groups and splitting merged ones.

Cluster ids are stable: ``ClusterState.recluster`` matches new groups to old centroids
(Hungarian assignment), and a late device joins its nearest centroid, or a new cluster
when it is far from all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_vectors(task_vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(task_vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"task_vectors must be a non-empty (n, d) array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("task_vectors hold NaN or Inf")
    return v


def similarity_matrix(task_vectors: np.ndarray, center: bool = True) -> np.ndarray:
    """Cosine similarity of task vectors, after centring on their mean when there are >= 3."""
    v = _check_vectors(task_vectors)
    if center and v.shape[0] >= 3:
        v = v - v.mean(axis=0)
    return np.clip(_normalise(v) @ _normalise(v).T, -1.0, 1.0)


def cluster_similarity(sim: np.ndarray, k: int | None = None, *, tolerance: float = 0.1,
                       k_max: int | None = None, min_similarity_split: float = 0.9) -> np.ndarray:
    """Average-linkage clustering of a similarity matrix; k chosen as described in the module doc."""
    n = sim.shape[0]
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and the number of devices ({n}), got {k}")
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    distance = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    if k is None:
        off = sim[~np.eye(n, dtype=bool)]
        if off.min() >= min_similarity_split:  # all alike (e.g. identical vectors): one group
            return np.zeros(n, dtype=np.int64)
        if n == 2:
            return np.array([0, 1])
        candidates = range(2, min(n - 1, k_max or n - 1) + 1)
        scores = {}
        for kk in candidates:
            labels = _agglomerate(distance, kk)
            if len(set(labels.tolist())) < 2:
                continue
            scores[kk] = silhouette_score(distance, labels, metric="precomputed")
        if not scores:
            return np.zeros(n, dtype=np.int64)
        best = max(scores.values())
        k = max(kk for kk, s in scores.items() if s >= best - tolerance * abs(best))
    return _canonical(_agglomerate(distance, k))


def cluster_tasks(task_vectors: np.ndarray, k: int | None = None, *, tolerance: float = 0.1,
                  k_max: int | None = None) -> np.ndarray:
    """Integer labels, one per device (row); ``k=None`` finds the number of groups."""
    if k is None and similarity_matrix(task_vectors, center=False).min() >= 0.98:
        return np.zeros(len(task_vectors), dtype=np.int64)  # all alike: centring would only amplify noise
    return cluster_similarity(similarity_matrix(task_vectors), k, tolerance=tolerance, k_max=k_max)


def refine_with_updates(task_vectors: np.ndarray, update_vectors: np.ndarray, k: int | None = None, *,
                        update_weight: float = 0.7, tolerance: float = 0.1) -> np.ndarray:
    """Re-cluster on a blend of task similarity and adapter-update similarity (one row per device).

    ``update_vectors`` are the devices' flattened first-round adapter changes. Their cosine
    similarity is a data-driven view of the task that cannot confuse opposite words.
    """
    task_sim = similarity_matrix(task_vectors)
    upd_sim = similarity_matrix(update_vectors)
    if task_sim.shape != upd_sim.shape:
        raise ValueError("task_vectors and update_vectors must have one row per device each")
    sim = (1.0 - update_weight) * task_sim + update_weight * upd_sim
    return cluster_similarity(sim, k, tolerance=tolerance)


def _agglomerate(distance: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return np.zeros(distance.shape[0], dtype=np.int64)
    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return model.fit_predict(distance)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel so clusters are numbered by first appearance (deterministic output)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(x), len(mapping)) for x in labels], dtype=np.int64)


def centroids(task_vectors: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    v = _normalise(_check_vectors(task_vectors))
    return {int(c): _normalise(v[labels == c].mean(axis=0, keepdims=True))[0] for c in np.unique(labels)}


@dataclass
class ClusterState:
    """Stable cluster ids over time: labels keyed by device, centroids keyed by cluster id."""

    assignment: dict[str, int] = field(default_factory=dict)
    centroid: dict[int, np.ndarray] = field(default_factory=dict)
    join_threshold: float = 0.5  # cosine to the nearest centroid needed to join it

    def next_id(self) -> int:
        return max(self.centroid, default=-1) + 1

    def recluster(self, devices: list[str], vectors: np.ndarray, labels: np.ndarray) -> dict[str, int]:
        """Adopt new ``labels`` but keep ids: each new group takes the id of the old centroid it matches."""
        new_centroids = centroids(vectors, labels)
        mapping = match_clusters(self.centroid, new_centroids)
        next_id = self.next_id()
        for c in sorted(new_centroids):
            if c not in mapping:
                mapping[c] = next_id
                next_id += 1
        self.centroid = {mapping[c]: v for c, v in new_centroids.items()}
        self.assignment = {d: mapping[int(label)] for d, label in zip(devices, labels)}
        return dict(self.assignment)

    def join(self, device: str, vector: np.ndarray) -> int:
        """Place one late device: nearest centroid if close enough, else a new cluster."""
        v = _normalise(_check_vectors(np.asarray(vector)[None, :]))[0]
        if self.centroid:
            ids = sorted(self.centroid)
            sims = np.array([float(self.centroid[c] @ v) for c in ids])
            best = int(np.argmax(sims))
            if sims[best] >= self.join_threshold:
                self.assignment[device] = ids[best]
                return ids[best]
        cid = self.next_id()
        self.centroid[cid] = v
        self.assignment[device] = cid
        return cid


def match_clusters(old: dict[int, np.ndarray], new: dict[int, np.ndarray], min_similarity: float = 0.0) -> dict[int, int]:
    """new label -> old id, maximising total centroid cosine (Hungarian); poor matches stay unmatched."""
    if not old or not new:
        return {}
    old_ids, new_ids = sorted(old), sorted(new)
    sim = np.array([[float(old[o] @ new[n]) for o in old_ids] for n in new_ids])
    rows, cols = linear_sum_assignment(-sim)
    return {new_ids[r]: old_ids[c] for r, c in zip(rows, cols) if sim[r, c] > min_similarity}
