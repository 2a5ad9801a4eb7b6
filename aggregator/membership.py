"""Who is in which cluster: assignments and task centroids, cached here and kept in the state store.

The clustering policy decides the groups (``aggregator/policies``); this module keeps
their ids stable (``ClusterState``: a regrouped cluster keeps the id of the old centroid it
matches, a late device joins its nearest centroid or opens a new cluster) and answers the
questions every round asks: a cluster's members, every clustered device, and a cluster's
``RoundPlan``. Revoked devices are never members.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from aggregator.clustering import ClusterState
from aggregator.policies import ClusteringPolicy, RoundPlan
from aggregator.state import StateStore

log = logging.getLogger("fedaigc.aggregator")


class Membership:
    def __init__(self, store: StateStore, policy: ClusteringPolicy) -> None:
        self.store = store
        self.policy = policy
        self.clusters = ClusterState()

    @property
    def assignment(self) -> dict[str, int]:
        return self.clusters.assignment

    @property
    def centroid(self) -> dict[int, np.ndarray]:
        return self.clusters.centroid

    def restore(self) -> None:
        """Reload assignments and centroids from the store (a restart, or another worker's change)."""
        self.clusters.assignment = self.store.assignment()
        self.clusters.centroid = {cid: np.frombuffer(c, dtype=np.float32).astype(np.float64)
                                  for cid, (c, _, _) in self.store.clusters().items() if c is not None}

    # ---------------------------------------------------------------- queries
    def members(self, cid: int) -> list[str]:
        revoked = self.store.revoked_devices()
        return sorted(d for d, c in self.assignment.items() if c == cid and d not in revoked)

    def everyone(self) -> list[str]:
        revoked = self.store.revoked_devices()
        return sorted(d for d in self.assignment if d not in revoked)

    def plan(self, cid: int) -> RoundPlan:
        """What cluster ``cid``'s round start asks, and of whom (one pass over the assignment)."""
        revoked = self.store.revoked_devices()
        everyone = sorted(d for d in self.assignment if d not in revoked)
        members = [d for d in everyone if self.assignment[d] == cid]
        return self.policy.configure_round(cid, members, everyone, len(self.centroid))

    def task_matrix(self) -> tuple[list[str], np.ndarray]:
        """Enrolled, unrevoked devices with a task vector (sorted) and their vectors as rows."""
        tasks = self.store.tasks()
        enrolled = {d.device_id for d in self.store.devices() if not d.revoked}
        devices = [d for d in sorted(tasks) if d in enrolled]
        return devices, np.stack([np.frombuffer(tasks[d], dtype=np.float32) for d in devices])

    def centroid_blob(self, cid: int) -> bytes:
        return self.centroid[cid].astype(np.float32).tobytes()

    # ---------------------------------------------------------------- changes
    def form(self) -> dict[str, int]:
        """The first grouping of every device with a task vector (not yet persisted: round 1 commits it)."""
        devices, vectors = self.task_matrix()
        return self.regroup(devices, vectors, self.policy.form_clusters(vectors))

    def regroup(self, devices: list[str], vectors: np.ndarray, labels: np.ndarray) -> dict[str, int]:
        assignment = self.clusters.recluster(devices, vectors, labels)
        log.info("grouped %d devices into %d clusters: %s", len(devices), len(set(assignment.values())),
                 dict(Counter(assignment.values())))
        return assignment

    def join(self, device: str, vector: np.ndarray, initial: bytes) -> int:
        """Place a late device and persist it; a new cluster starts from the ``initial`` adapter (packed)."""
        cid = self.clusters.join(device, vector)
        known = self.store.clusters()
        if cid not in known:
            known[cid] = (None, initial, 0)
        self.store.save_clusters({c: (self.centroid_blob(c), a, v) for c, (_, a, v) in known.items()}, self.assignment)
        log.info("late device %s joined cluster %d", device, cid)
        return cid
