import numpy as np
import torch

from aggregator.interaction import interact, mixing_weights
from models.lora import LoraSpec, delta_weight

SPEC = LoraSpec(rank=2, target_modules=("m",))


def adapter(seed):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}


def dw(a):
    return delta_weight(a["m.lora_A.weight"], a["m.lora_B.weight"], SPEC.scale)


def test_mixing_weights_sum_to_one_and_favour_similar_clusters():
    centroids = {0: np.array([1.0, 0.0]), 1: np.array([0.9, 0.436]), 2: np.array([0.0, 1.0])}
    w = mixing_weights(centroids, {0: 2, 1: 6, 2: 6}, borrow=1.0, temperature=0.1)
    for c in w:
        assert abs(sum(w[c].values()) - 1.0) < 1e-9
    assert w[0][1] > w[0][2]


def test_small_clusters_borrow_more_than_large_ones():
    centroids = {0: np.array([1.0, 0.0]), 1: np.array([0.0, 1.0])}
    w = mixing_weights(centroids, {0: 2, 1: 10}, borrow=1.0, temperature=0.1)
    assert 1 - w[0][0] > 1 - w[1][1]
    assert w[0][0] == 2 / 3


def test_without_borrowing_adapters_are_unchanged():
    adapters = {0: adapter(0), 1: adapter(1)}
    out = interact(adapters, {0: np.array([1.0, 0]), 1: np.array([0, 1.0])}, {0: 3, 1: 3}, SPEC, borrow=0.0)
    for c in adapters:
        torch.testing.assert_close(dw(out[c]), dw(adapters[c]))


def test_interaction_mixes_in_weight_space():
    adapters = {0: adapter(0), 1: adapter(1)}
    centroids = {0: np.array([1.0, 0.0]), 1: np.array([0.0, 1.0])}
    out = interact(adapters, centroids, {0: 1, 1: 1}, SPEC, borrow=1.0)
    expected = 0.5 * dw(adapters[0]) + 0.5 * dw(adapters[1])  # keep = 1 / (1 + 1)
    s = torch.linalg.svdvals(expected)
    # the mix has rank <= 4; rank-2 refactorisation is the best rank-2 approximation of it
    torch.testing.assert_close((dw(out[0]) - expected).norm(), s[2:].norm(), atol=1e-4, rtol=1e-4)


def test_with_a_gate_different_tasks_lend_nothing_and_one_task_on_two_sites_shares():
    # four tasks close in raw cosine (as a sentence encoder puts them), one of them on two sites
    rng = np.random.default_rng(0)
    common = rng.normal(size=16) * 5
    tasks = [rng.normal(size=16) for _ in range(3)]
    centroids = {0: common + tasks[0], 1: common + tasks[1], 2: common + tasks[2], 3: common + tasks[0] + 0.05}
    w = mixing_weights(centroids, {c: 1 for c in centroids}, borrow=1.0, temperature=0.1, min_similarity=0.5)
    assert w[1] == {1: 1.0} and w[2] == {2: 1.0}
    assert set(w[0]) == {0, 3} and abs(w[0][3] - 0.5) < 1e-9


def test_identical_centroids_count_as_one_task_under_the_gate():
    v = np.ones(4)
    w = mixing_weights({0: v, 1: v.copy()}, {0: 2, 1: 2}, borrow=2.0, temperature=0.1, min_similarity=0.5)
    assert w[0] == {0: 0.5, 1: 0.5}
