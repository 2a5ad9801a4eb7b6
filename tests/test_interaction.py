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
