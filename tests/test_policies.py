"""Clustering policies as specifications: pure methods over ids, vectors and labels."""

import numpy as np
import pytest

from aggregator.policies import IFCA, SingleCluster, TaskClustering, make_policy
from aggregator.policies.tasks import same_partition


def three_tasks(per_task: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 384))
    return np.concatenate([c + 0.05 * rng.normal(size=(per_task, 384)) for c in centres])


def test_task_clustering_finds_the_tasks_from_their_vectors():
    labels = TaskClustering().form_clusters(three_tasks())
    assert same_partition(labels.tolist(), [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_task_clustering_regroups_only_after_its_refinement_round_and_only_if_k_is_found():
    assert TaskClustering(refine_after_round=1).regroups_after(1)
    assert not TaskClustering(refine_after_round=1).regroups_after(2)
    assert not TaskClustering(k=3, refine_after_round=1).regroups_after(1)


def test_task_clustering_keeps_groups_the_updates_agree_with():
    tasks = three_tasks()
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert TaskClustering(refine_after_round=1).regroup(1, tasks, tasks, labels) is None


def test_task_clustering_splits_a_merged_group_its_updates_tell_apart():
    tasks = three_tasks()
    updates = three_tasks(seed=1)
    new = TaskClustering(refine_after_round=1).regroup(1, tasks, updates, [0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert new is not None and same_partition(new.tolist(), [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_single_cluster_puts_every_device_in_one_group():
    assert SingleCluster().form_clusters(three_tasks()).tolist() == [0] * 9


def test_fixed_groups_send_a_cluster_to_its_members_with_one_candidate():
    plan = TaskClustering().configure_round(1, ["b"], ["a", "b", "c"], clusters=3)
    assert plan.recipients == ["b"] and plan.candidates == 1
    assert TaskClustering().cluster_of_update(claimed=1, assigned=1) == 1
    assert TaskClustering().report_scope(1) == 1


def test_ifca_needs_at_least_two_clusters():
    with pytest.raises(ValueError, match="k >= 2"):
        IFCA(k=1)
    with pytest.raises(ValueError, match="k >= 2"):
        make_policy("ifca")


def test_ifca_offers_every_cluster_to_everyone_and_counts_the_claimed_one():
    ifca = IFCA(k=2)
    assert ifca.form_clusters(three_tasks()).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0]
    plan = ifca.configure_round(0, ["a"], ["a", "b"], clusters=2)
    assert plan.recipients == ["a", "b"] and plan.candidates == 2
    assert ifca.cluster_of_update(claimed=1, assigned=0) == 1
    assert ifca.cluster_of_update(claimed=1, assigned=None) is None
    assert ifca.report_scope(0) is None  # one update answers the whole round


def test_ifca_starts_each_cluster_from_its_own_draw():
    starts = IFCA(k=2).starting_adapters([0, 1], {"w": np.zeros(1)}, lambda cid: {"w": np.full(1, cid)})
    assert starts[0]["w"][0] == 0 and starts[1]["w"][0] == 1


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown clustering policy 'kmeans'"):
        make_policy("kmeans")
