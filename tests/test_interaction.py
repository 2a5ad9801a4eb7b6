import numpy as np
import torch

from aggregator.interaction import adapter_agreement, interact, mixing_weights, shrink_to_global, update_spread
from aggregator.rules.base import ClientUpdate
from models.lora import delta_weight, lora_config, lora_scale

SPEC = lora_config(2, target_modules=("m",))


def adapter(seed):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}


def dw(a):
    return delta_weight(a["m.lora_A.weight"], a["m.lora_B.weight"], lora_scale(SPEC))


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


def noisy_cluster(center, devices, noise, seed):
    """Adapters of ``devices`` devices whose ΔW scatter around ``center`` (rank 2, exact)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(devices):
        a = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in center.items()}
        out.append(ClientUpdate(f"d{len(out)}", a, 10))
    return out


def test_update_spread_is_unknown_for_one_device_and_grows_with_noise():
    center = adapter(0)
    assert update_spread(noisy_cluster(center, 1, 0.1, 0), SPEC) is None
    low = update_spread(noisy_cluster(center, 4, 0.01, 0), SPEC)["m"]
    high = update_spread(noisy_cluster(center, 4, 0.1, 0), SPEC)["m"]
    assert 0 < low < high


def test_shrinkage_pools_what_clusters_share_and_keeps_what_sets_them_apart():
    shared = adapter(0)
    far = {k: 4 * v for k, v in adapter(1).items()}
    adapters = {c: {k: v + 0.01 * c for k, v in shared.items()} for c in range(3)} | {3: far}
    spreads = {c: {"m": 20.0} for c in adapters}
    out, factors = shrink_to_global(adapters, {c: 1 for c in adapters}, spreads, SPEC)
    assert factors[3]["m"] < 0.2 * factors[0]["m"]  # the far task keeps itself, the close ones pool
    moved = {c: float((dw(out[c]) - dw(adapters[c])).norm() / dw(adapters[c]).norm()) for c in adapters}
    assert moved[3] < moved[0]


def test_small_clusters_take_more_of_the_global_component():
    adapters = {0: adapter(0), 1: adapter(1), 2: adapter(2)}
    spreads = {0: {"m": 0.5}, 1: {"m": 0.5}, 2: None}
    _, factors = shrink_to_global(adapters, {0: 8, 1: 8, 2: 1}, spreads, SPEC)
    assert factors[2]["m"] > factors[0]["m"]


def test_shrinkage_moves_nothing_without_any_spread():
    adapters = {0: adapter(0), 1: adapter(1)}
    out, factors = shrink_to_global(adapters, {0: 1, 1: 1}, {0: None, 1: None}, SPEC)
    assert factors == {}
    for c in adapters:
        torch.testing.assert_close(out[c], adapters[c])


def test_shrinkage_reduces_the_error_of_a_noisy_small_cluster():
    # four clusters share most of their ΔW; the one-device cluster's estimate is noisy
    g = torch.Generator().manual_seed(3)
    common = adapter(0)
    truths = {c: {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in common.items()} for c in range(4)}
    sizes = {0: 6, 1: 6, 2: 6, 3: 1}
    groups = {c: noisy_cluster(truths[c], sizes[c], 0.3, 10 + c) for c in truths}
    means = {c: {k: sum(u.adapter[k] for u in groups[c]) / sizes[c] for k in common} for c in truths}
    spreads = {c: update_spread(groups[c], SPEC) for c in truths}
    out, _ = shrink_to_global(means, sizes, spreads, SPEC)
    before = (dw(means[3]) - dw(truths[3])).norm()
    after = (dw(out[3]) - dw(truths[3])).norm()
    assert after < 0.7 * before


def test_leave_one_out_measures_a_large_cluster_against_the_others_not_itself():
    adapters = {0: adapter(0), 1: adapter(1), 2: adapter(2)}
    sizes, spreads = {0: 8, 1: 1, 2: 1}, {0: {"m": 2.0}, 1: None, 2: None}
    _, grand = shrink_to_global(adapters, sizes, spreads, SPEC)
    _, loo = shrink_to_global(adapters, sizes, spreads, SPEC, leave_one_out=True)
    assert loo[0]["m"] < grand[0]["m"]


def test_adapter_agreement_is_the_cosine_of_the_whole_delta_w():
    spec = lora_config(2, target_modules=("m", "n"))
    adapters = {c: adapter(2 * c) | {k.replace("m.", "n."): v for k, v in adapter(2 * c + 1).items()} for c in range(3)}
    flat = {c: torch.cat([delta_weight(a[f"{m}.lora_A.weight"], a[f"{m}.lora_B.weight"], lora_scale(spec)).flatten()
                          for m in ("m", "n")]) for c, a in adapters.items()}
    cos = adapter_agreement(adapters, spec)
    for c in range(3):
        for j in range(3):
            expected = float(flat[c] @ flat[j] / (flat[c].norm() * flat[j].norm()))
            assert abs(cos[c][j] - expected) < 1e-5


def test_a_cluster_that_has_learnt_nothing_agrees_with_no_one():
    zero = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.zeros(4, 2)}
    cos = adapter_agreement({0: zero, 1: adapter(1)}, SPEC)
    assert cos[0][1] == 0.0 and cos[0][0] == 0.0


def test_alike_tasks_whose_updates_disagree_lend_nothing():
    centroids = {0: np.array([1.0, 0.0, 0.0]), 1: np.array([1.0, 0.01, 0.0]), 2: np.array([0.0, 0.0, 1.0])}
    a = adapter(0)
    opposite = {"m.lora_A.weight": a["m.lora_A.weight"], "m.lora_B.weight": -a["m.lora_B.weight"]}
    agreement = adapter_agreement({0: a, 1: opposite, 2: adapter(2)}, SPEC)
    w = mixing_weights(centroids, {0: 2, 1: 2, 2: 2}, borrow=1.0, temperature=0.1, min_similarity=0.2,
                       agreement=agreement, min_agreement=0.5)
    assert w[0] == {0: 1.0} and w[1] == {1: 1.0}
    assert set(mixing_weights(centroids, {0: 2, 1: 2, 2: 2}, 1.0, 0.1, 0.2)[0]) == {0, 1}  # the task gate alone lends


def test_opposite_styles_that_prompts_put_close_disagree_in_their_updates():
    # real model: two clusters of "bold" and one of "thin" train one round from the same adapter
    from aggregator.rules import make_rule
    from models.digits.backend import DigitsBackend
    from models.digits.data import make_personas
    from models.digits.unet import load_base_unet
    from models.lora import add_adapter, draw_adapter, get_adapter_state, lora_config, set_adapter_state, set_mix
    from models.text import PromptEncoder
    from models.training import LORA_LR, TrainConfig, train_adapters

    spec = lora_config()
    personas = make_personas(6, 3, seed=0, sizes=(2, 2, 2), styles=("bold", "thin", "bold"), images_per_client=24)
    backend = DigitsBackend(load_base_unet())
    unet = backend.denoiser
    unet.requires_grad_(False)
    add_adapter(unet, "device", spec, seed=0)
    set_mix(unet, {"device": 1.0})
    start = draw_adapter(unet, spec, 0)
    encoder = PromptEncoder()
    groups: dict[int, list[ClientUpdate]] = {0: [], 1: [], 2: []}
    for i, p in enumerate(personas):
        set_adapter_state(unet, "device", start)
        train_adapters(backend, ["device"], backend.encode_images(p.train_images),
                       torch.from_numpy(encoder.encode(list(p.train_prompts))),
                       TrainConfig(steps=12, batch_size=16, lr=LORA_LR, seed=i))
        groups[i // 2].append(ClientUpdate(p.id, get_adapter_state(unet, "device"), len(p.train_images)))
    rule = make_rule("exact")
    cos = adapter_agreement({c: rule.aggregate(start, g, spec).adapter for c, g in groups.items()}, spec)
    assert cos[0][2] >= 0.5 > max(cos[0][1], cos[2][1]), cos
