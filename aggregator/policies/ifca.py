"""IFCA (Ghosh et al., "An Efficient Framework for Clustered Federated Learning", NeurIPS 2020).

k cluster adapters; every round each device receives all k, trains the one with the lowest
loss on its own data, and its update counts for that cluster. Membership is the device's
choice per round, so a round closes once every device answered one of the k, all clusters
together. The k starting adapters differ (small random B), which breaks the symmetry
between clusters; devices are spread round-robin until their first choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from aggregator.policies.base import Adapter, ClusteringPolicy, RoundPlan


class IFCA(ClusteringPolicy):
    name = "ifca"

    def __init__(self, k: int | None = None, refine_after_round: int = 0) -> None:
        if not (k and k >= 2):
            raise ValueError("IFCA needs k >= 2 clusters")
        super().__init__(k, refine_after_round)

    def form_clusters(self, vectors: np.ndarray) -> np.ndarray:
        return np.arange(len(vectors)) % self.k

    def starting_adapters(self, clusters: Iterable[int], initial: Adapter,
                          draw: Callable[[int], Adapter]) -> dict[int, Adapter]:
        return {cid: draw(cid) for cid in clusters}

    def configure_round(self, cluster: int, members: list[str], everyone: list[str], clusters: int) -> RoundPlan:
        return RoundPlan(everyone, clusters)

    def cluster_of_update(self, claimed: int, assigned: int | None) -> int | None:
        return None if assigned is None else claimed

    def report_scope(self, cluster: int) -> int | None:
        return None
