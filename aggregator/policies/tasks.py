"""Task clustering (ours): groups from sealed task vectors, refined once with update similarity.

The fleet is grouped by its devices' task vectors (``aggregator.clustering.cluster_tasks``:
centred cosine, the largest k within a silhouette tolerance of the best). After round
``refine_after_round`` the devices are regrouped on a blend of task and first-round update
similarity (CFL-style, Sattler et al., "Clustered Federated Learning", 2020), unless the
operator fixed k.
"""

from __future__ import annotations

import numpy as np

from aggregator.clustering import cluster_tasks, refine_with_updates
from aggregator.policies.base import ClusteringPolicy


class TaskClustering(ClusteringPolicy):
    name = "tasks"

    def form_clusters(self, vectors: np.ndarray) -> np.ndarray:
        return cluster_tasks(vectors, self.k)

    def regroups_after(self, rnd: int) -> bool:
        return rnd == self.refine_after_round and self.k is None

    def regroup(self, rnd: int, task_vectors: np.ndarray, update_vectors: np.ndarray,
                labels: list[int]) -> np.ndarray | None:
        if not self.regroups_after(rnd) or len(labels) < 3:
            return None
        new = refine_with_updates(task_vectors, update_vectors)
        return None if same_partition(labels, new.tolist()) else new


def same_partition(a: list[int], b: list[int]) -> bool:
    """Whether two labelings group the same devices together, whatever the label values."""
    pairs = set(zip(a, b))
    return len(pairs) == len(set(a)) == len(set(b))
