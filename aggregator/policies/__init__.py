"""Clustering policies, one per file behind ``ClusteringPolicy`` (see ``base.py``)."""

from aggregator.policies.base import ClusteringPolicy, RoundPlan
from aggregator.policies.ifca import IFCA
from aggregator.policies.single import SingleCluster
from aggregator.policies.tasks import TaskClustering

POLICIES = {"tasks": TaskClustering, "single": SingleCluster, "ifca": IFCA}


def make_policy(name: str, k: int | None = None, refine_after_round: int = 0) -> ClusteringPolicy:
    """A policy by name (``AggregatorConfig.clustering``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown clustering policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](k=k, refine_after_round=refine_after_round)


__all__ = ["ClusteringPolicy", "RoundPlan", "TaskClustering", "SingleCluster", "IFCA", "POLICIES", "make_policy"]
