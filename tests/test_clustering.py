import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from aggregator.clustering import ClusterState, cluster_tasks, match_clusters


def blobs(sizes, dim=384, spread=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim))
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) * np.linalg.norm(c) / np.sqrt(dim)
                        for c, n in zip(centers, sizes)])
    labels = np.concatenate([[i] * n for i, n in enumerate(sizes)])
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_number_of_groups_is_found_from_the_data():
    x, truth = blobs([5, 4, 6, 3])
    labels = cluster_tasks(x)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_a_given_k_is_respected():
    x, _ = blobs([5, 5, 5])
    assert len(set(cluster_tasks(x, k=2).tolist())) == 2


def test_one_device_is_one_cluster():
    assert cluster_tasks(np.ones((1, 384))).tolist() == [0]


def test_identical_vectors_form_one_cluster():
    v = np.tile(np.random.default_rng(0).normal(size=384), (6, 1))
    assert cluster_tasks(v).tolist() == [0] * 6


def test_pure_noise_does_not_crash_and_labels_everyone():
    x = np.random.default_rng(1).normal(size=(9, 384))
    labels = cluster_tasks(x)
    assert labels.shape == (9,) and labels.min() == 0


@pytest.mark.parametrize("bad", [np.zeros((0, 384)), np.full((3, 4), np.nan), np.ones(5)])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        cluster_tasks(bad)


def test_ids_stay_stable_when_a_device_is_added_and_the_fleet_reclustered():
    x, _ = blobs([4, 4, 4], seed=3)
    state = ClusterState()
    devices = [f"d{i}" for i in range(12)]
    first = state.recluster(devices, x, cluster_tasks(x))
    extra, _ = blobs([1], seed=3)  # same centres as blob 0 (same seed), one more member
    x2 = np.concatenate([x[::-1], extra])  # another order, one more device
    devices2 = devices[::-1] + ["d12"]
    second = state.recluster(devices2, x2, cluster_tasks(x2))
    assert all(second[d] == first[d] for d in devices)


def test_a_late_device_joins_its_nearest_cluster_or_opens_a_new_one():
    x, _ = blobs([4, 4], seed=5)
    state = ClusterState(join_threshold=0.5)
    assignment = state.recluster([f"d{i}" for i in range(8)], x, cluster_tasks(x))
    assert state.join("late-near", x[0] + 0.01) == assignment["d0"]
    far = np.random.default_rng(9).normal(size=384)
    new = state.join("late-far", far)
    assert new not in set(assignment.values())


def test_matching_follows_centroids_not_label_numbers():
    a, b = np.eye(3)[0], np.eye(3)[1]
    assert match_clusters({7: a, 9: b}, {0: b, 1: a}) == {0: 9, 1: 7}
