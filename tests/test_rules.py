"""The maths of the aggregation rules, on tiny tensors."""

import pytest
import torch

from aggregator.rules import ClientUpdate, ExactLoraAggregation, ExactMedian, ExactTrimmedMean, FedAvgLora, NormClipping
from aggregator.rules.clipping import update_norm
from models.lora import delta_weight, lora_config, lora_scale

SPEC = lora_config(4, target_modules=("m",))


def adapter(a, b):
    return {"m.lora_A.weight": a, "m.lora_B.weight": b}


def block_client(slot, seed):
    """A rank-2 update living in rank slots [2*slot, 2*slot+2): two such clients share no slots."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(4, 6), torch.zeros(5, 4)
    a[2 * slot:2 * slot + 2] = torch.randn(2, 6, generator=g)
    b[:, 2 * slot:2 * slot + 2] = torch.randn(5, 2, generator=g)
    return adapter(a, b)


def product(ad):
    return delta_weight(ad["m.lora_A.weight"], ad["m.lora_B.weight"], lora_scale(SPEC))


CURRENT = adapter(torch.zeros(4, 6), torch.zeros(5, 4))
CLIENTS = [ClientUpdate("c0", block_client(0, 1), 30), ClientUpdate("c1", block_client(1, 2), 10)]
TRUE_MEAN = (30 * product(CLIENTS[0].adapter) + 10 * product(CLIENTS[1].adapter)) / 40


def test_exact_aggregation_reproduces_the_weighted_mean_of_products():
    out = ExactLoraAggregation().aggregate(CURRENT, CLIENTS, SPEC).adapter
    torch.testing.assert_close(product(out), TRUE_MEAN, atol=1e-5, rtol=1e-5)


def test_naive_fedavg_of_factors_does_not():
    out = FedAvgLora().aggregate(CURRENT, CLIENTS, SPEC).adapter
    assert (product(out) - TRUE_MEAN).norm() > 0.3 * TRUE_MEAN.norm()


def test_exact_is_the_best_rank_r_approximation_when_the_mean_has_higher_rank():
    g = torch.Generator().manual_seed(0)
    clients = [ClientUpdate(f"c{i}", adapter(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)), 1)
               for i in range(3)]
    mean = sum(product(c.adapter) for c in clients) / 3
    out = product(ExactLoraAggregation().aggregate(CURRENT, clients, SPEC).adapter)
    s = torch.linalg.svdvals(mean)
    torch.testing.assert_close((out - mean).norm(), s[4:].norm(), atol=1e-4, rtol=1e-4)


def test_exact_keeps_rank_slots_alive_when_the_mean_is_zero():
    init = adapter(torch.randn(4, 6), torch.zeros(5, 4))
    out = ExactLoraAggregation().aggregate(init, [ClientUpdate("c", init, 5)], SPEC).adapter
    assert out["m.lora_A.weight"].norm() > 0  # B = 0 but A survives, so training can restart
    assert out["m.lora_B.weight"].abs().max() == 0


def test_weights_follow_sample_counts():
    a = ClientUpdate("a", adapter(torch.ones(4, 6), torch.ones(5, 4)), 3)
    b = ClientUpdate("b", adapter(torch.zeros(4, 6), torch.zeros(5, 4)), 1)
    out = FedAvgLora().aggregate(CURRENT, [a, b], SPEC).adapter
    torch.testing.assert_close(out["m.lora_A.weight"], torch.full((4, 6), 0.75))


def test_invalid_updates_are_rejected_with_a_reason_and_the_rest_aggregated():
    nan = ClientUpdate("nan", adapter(torch.full((4, 6), float("nan")), torch.zeros(5, 4)), 1)
    shape = ClientUpdate("shape", adapter(torch.zeros(3, 6), torch.zeros(5, 3)), 1)
    result = ExactLoraAggregation().aggregate(CURRENT, CLIENTS + [nan, shape], SPEC)
    assert result.rejected == {"nan": "non_finite", "shape": "bad_tensors"}
    assert sorted(result.accepted) == ["c0", "c1"]


def honest(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base_a, base_b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    return [ClientUpdate(f"h{i}", adapter(base_a + 0.05 * torch.randn(4, 6, generator=g),
                                           base_b + 0.05 * torch.randn(5, 4, generator=g)), 10) for i in range(n)]


@pytest.mark.parametrize("rule", [NormClipping(ExactLoraAggregation()), ExactMedian(), ExactTrimmedMean(0.2)])
@pytest.mark.parametrize("attack", ["scaled", "nan"])
def test_a_poisoned_update_cannot_move_the_robust_aggregate_far(rule, attack):
    clients = honest(8)
    clean = product(ExactLoraAggregation().aggregate(CURRENT, clients, SPEC).adapter)
    victim = clients[0].adapter
    if attack == "scaled":
        bad = {k: v * 100 for k, v in victim.items()}
    else:
        bad = {k: torch.full_like(v, float("nan")) for k, v in victim.items()}
    poisoned = product(rule.aggregate(CURRENT, clients + [ClientUpdate("evil", bad, 10)], SPEC).adapter)
    assert (poisoned - clean).norm() <= 0.15 * clean.norm()  # the stated bound: 15% of the clean aggregate


def test_plain_mean_is_moved_by_the_same_attack():
    clients = honest(8)
    clean = product(ExactLoraAggregation().aggregate(CURRENT, clients, SPEC).adapter)
    bad = {k: v * 100 for k, v in clients[0].adapter.items()}
    poisoned = product(ExactLoraAggregation().aggregate(CURRENT, clients + [ClientUpdate("evil", bad, 10)], SPEC).adapter)
    assert (poisoned - clean).norm() > clean.norm()


def test_clipping_screens_out_a_huge_update_and_clips_moderate_ones():
    clients = honest(6)
    huge = ClientUpdate("huge", {k: v * 1000 for k, v in clients[0].adapter.items()}, 10)
    result = NormClipping(ExactLoraAggregation(), multiple=2.0, screen_multiple=10.0).aggregate(CURRENT, clients + [huge], SPEC)
    assert result.rejected == {"huge": "poisoned"}
    assert update_norm(CURRENT, huge.adapter) > 100 * update_norm(CURRENT, clients[1].adapter)


def test_trimmed_mean_refuses_a_bad_beta():
    with pytest.raises(ValueError):
        ExactTrimmedMean(0.5)


def _one_device_adapter(seed=0, a_norm=0.6, b_std=0.02):
    """A device's adapter after a short first round: A about as large as a fresh one, B small."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 6, generator=g)
    a = a / a.norm(dim=1, keepdim=True) * a_norm
    return adapter(a, torch.randn(5, 4, generator=g) * b_std)


def _delta_w_moved_by_one_step(ad, target, lr=0.05):
    """How far one plain gradient step on ||scale·B·A - target||² moves ΔW, from the factors ``ad``."""
    a = ad["m.lora_A.weight"].clone().double().requires_grad_(True)
    b = ad["m.lora_B.weight"].clone().double().requires_grad_(True)
    scale = lora_scale(SPEC)
    ((scale * b @ a - target) ** 2).sum().backward()
    with torch.no_grad():
        return float((scale * (b - lr * b.grad) @ (a - lr * a.grad) - scale * b @ a).norm())


def test_a_one_device_cluster_continues_like_the_device_would():
    """Issue 18: re-factorising ΔW split the singular values evenly between A and B, so a cluster's adapter
    had both factors small and its devices' next round moved ΔW a fraction of what the device's own adapter
    would have (an even split minimises |A| + |B| for a given product). The exact rule now keeps the
    devices' A row norm: same ΔW, same next step."""
    from aggregator.rules.exact import clients_row_norm
    from models.lora import factorize, row_norm

    device = _one_device_adapter()
    out = ExactLoraAggregation().aggregate(CURRENT, [ClientUpdate("d", device, 60)], SPEC).adapter
    torch.testing.assert_close(product(out), product(device), atol=1e-6, rtol=1e-5)
    assert row_norm(out["m.lora_A.weight"]) == pytest.approx(row_norm(device["m.lora_A.weight"]), rel=1e-5)
    target = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    own, aggregated = _delta_w_moved_by_one_step(device, target), _delta_w_moved_by_one_step(out, target)
    assert 0.6 < aggregated / own < 1.5  # (0.73 here: the basis changed, not the scale)
    a, b = factorize(product(device), 4, (4, 6), (5, 4), lora_scale(SPEC))  # the even split it replaced
    assert _delta_w_moved_by_one_step(adapter(a, b), target) / own < 0.25  # (0.09 here)
    assert clients_row_norm(torch.stack([device["m.lora_A.weight"].double()] * 2), torch.ones(2)) == \
        pytest.approx(0.6)


def test_refactorize_keeps_the_current_factor_balance_by_default():
    """Interaction's mixing and shrinkage re-factorise an adapter without client factors: A keeps its scale."""
    from aggregator.rules.exact import refactorize
    from models.lora import row_norm

    ad = _one_device_adapter(a_norm=0.9)
    a, b = refactorize(product(ad) * 0.5, ad["m.lora_A.weight"], ad["m.lora_B.weight"], lora_scale(SPEC))
    assert row_norm(a) == pytest.approx(0.9, rel=1e-5)
    torch.testing.assert_close(delta_weight(a, b, lora_scale(SPEC)), product(ad) * 0.5, atol=1e-6, rtol=1e-5)


def test_one_device_cannot_set_the_clusters_factor_balance():
    """A huge A with a tiny B is an ordinary ΔW: the row norm the aggregate keeps is the clients' weighted
    median, so the one device that sends it does not make the next round's steps explode."""
    from aggregator.rules.exact import clients_row_norm

    honest = [_one_device_adapter(seed=s)["m.lora_A.weight"].double() for s in range(3)]
    a = torch.stack(honest + [honest[0] * 1e4])
    assert clients_row_norm(a, torch.ones(4)) == pytest.approx(0.6)
    assert clients_row_norm(a, torch.tensor([1.0, 1.0, 1.0, 100.0])) == pytest.approx(0.6e4)  # it holds the weight
