"""The clustering interface: who shares an adapter with whom, and what each round asks of whom.

Read like Flower's ``Strategy``: a policy is a few pure methods over ids, vectors and labels,
and the round controller (``aggregator/rounds.py``) does every I/O.

* ``form_clusters`` groups the fleet once its task vectors are in, ``starting_adapters``
  gives each group its round-1 adapter;
* ``configure_round`` says who receives a cluster's round start and how many candidate
  adapters it carries;
* ``cluster_of_update`` and ``report_scope`` say which cluster an update counts for and whose
  updates close a cluster (a round-wide scope closes every cluster of the round together);
* ``regroup`` (``aggregate_round`` in Flower's terms) may regroup the devices once a round's
  updates are in.

The defaults describe fixed groups; a policy overrides what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundPlan:
    """Who receives one cluster's round start, and how many candidate adapters the round offers."""

    recipients: list[str]
    candidates: int = 1  # > 1: the device trains whichever candidate fits its data best (IFCA)


class ClusteringPolicy(ABC):
    name: str = "policy"

    def __init__(self, k: int | None = None, refine_after_round: int = 0) -> None:
        self.k = k
        self.refine_after_round = refine_after_round

    @abstractmethod
    def form_clusters(self, vectors: np.ndarray) -> np.ndarray:
        """One integer label per device (row of ``vectors``, the devices' task vectors)."""

    def starting_adapters(self, clusters: Iterable[int], initial: Adapter,
                          draw: Callable[[int], Adapter]) -> dict[int, Adapter]:
        """Round 1's adapter per cluster: the fleet's seeded ``initial`` one, unless a policy needs
        distinct starts (``draw(cluster)`` draws one per cluster)."""
        return {cid: initial for cid in clusters}

    def configure_round(self, cluster: int, members: list[str], everyone: list[str], clusters: int) -> RoundPlan:
        """A cluster's round start goes to its members, with its adapter as the only candidate."""
        return RoundPlan(members)

    def cluster_of_update(self, claimed: int, assigned: int | None) -> int | None:
        """Which cluster a device's update counts for; None, or anything but ``claimed``, refuses it."""
        return assigned

    def report_scope(self, cluster: int) -> int | None:
        """Whose updates count toward closing ``cluster``: its own (the cluster id), or the round's (None)."""
        return cluster

    def regroups_after(self, rnd: int) -> bool:
        """Whether ``regroup`` may change the groups after round ``rnd`` (else its inputs are not gathered)."""
        return False

    def regroup(self, rnd: int, task_vectors: np.ndarray, update_vectors: np.ndarray,
                labels: list[int]) -> np.ndarray | None:
        """New labels for the devices after round ``rnd`` (rows as in ``labels``), or None to keep the groups."""
        return None
