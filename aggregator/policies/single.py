"""One group for the whole fleet: FedAvg's shared adapter (McMahan et al., AISTATS 2017), the baseline."""

from __future__ import annotations

import numpy as np

from aggregator.policies.base import ClusteringPolicy


class SingleCluster(ClusteringPolicy):
    name = "single"

    def form_clusters(self, vectors: np.ndarray) -> np.ndarray:
        return np.zeros(len(vectors), dtype=np.int64)
