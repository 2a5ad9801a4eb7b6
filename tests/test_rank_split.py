"""The rank-split rules and the rank helpers on tiny adapters: the maths, no model."""

import pytest
import torch

from aggregator.rank_split import SvdSplit, ZeroPadSplit, make_split
from models.lora import delta_weight, lora_config, lora_scale
from models.lora_ranks import energy_spectrum, lora_at_rank, pad_rank, shapes_at_rank, truncate_rank

SCALE = 0.5


def adapter(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A linear module (5 x 6) and a 3x3 convolution (7 out, 3 in), random factors of ``rank``."""
    g = torch.Generator().manual_seed(seed)
    return {"lin.lora_A.weight": torch.randn(rank, 6, generator=g),
            "lin.lora_B.weight": torch.randn(5, rank, generator=g),
            "conv.lora_A.weight": torch.randn(rank, 3, 3, 3, generator=g),
            "conv.lora_B.weight": torch.randn(7, rank, 1, 1, generator=g)}


def dw(a: dict, module: str) -> torch.Tensor:
    return delta_weight(a[f"{module}.lora_A.weight"], a[f"{module}.lora_B.weight"], SCALE)


@pytest.mark.parametrize("module", ["lin", "conv"])
def test_svd_split_keeps_the_top_singular_directions(module):
    full = adapter(4)
    low = SvdSplit().split(full, 2, SCALE)
    u, s, vh = torch.linalg.svd(dw(full, module), full_matrices=False)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
    assert torch.allclose(dw(low, module), best, atol=1e-5)
    assert float((dw(full, module) - dw(low, module)).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-5)


def test_svd_split_is_no_worse_than_keeping_factor_slots():
    full = adapter(4, seed=3)
    svd = SvdSplit().split(full, 1, SCALE)
    kept = ZeroPadSplit().split(full, 1, SCALE)
    for module in ("lin", "conv"):
        assert (dw(full, module) - dw(svd, module)).norm() <= (dw(full, module) - dw(kept, module)).norm() + 1e-9


@pytest.mark.parametrize("split", [SvdSplit(), ZeroPadSplit()], ids=lambda s: s.name)
def test_a_rank_at_or_above_the_adapters_is_zero_padding_and_exact(split):
    small = adapter(2)
    for rank in (2, 5):
        out = split.split(small, rank, SCALE)
        assert out["lin.lora_A.weight"].shape == (rank, 6) and out["conv.lora_B.weight"].shape == (7, rank, 1, 1)
        for module in ("lin", "conv"):
            assert torch.equal(dw(out, module), dw(small, module))


def test_zero_pad_split_keeps_the_slots_carrying_most_of_the_update():
    full = adapter(3)
    full["lin.lora_B.weight"][:, 1] *= 100.0  # slot 1 dominates the linear module's ΔW
    out = ZeroPadSplit().split(full, 1, SCALE)
    assert torch.equal(out["lin.lora_A.weight"], full["lin.lora_A.weight"][1:2])
    assert torch.equal(out["lin.lora_B.weight"], full["lin.lora_B.weight"][:, 1:2])


@pytest.mark.parametrize("split", [SvdSplit(), ZeroPadSplit()], ids=lambda s: s.name)
def test_a_fresh_adapter_splits_into_its_own_first_slots(split):
    fresh = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in adapter(4).items()}  # B = 0: ΔW = 0
    out = split.split(fresh, 2, SCALE)
    assert all(torch.equal(out[k], v) for k, v in truncate_rank(fresh, 2).items())  # trainable A rows, zero B


def test_padding_keeps_delta_w_and_refuses_to_lower_a_rank():
    small = adapter(1)
    padded = pad_rank(small, 3)
    assert torch.equal(dw(padded, "conv"), dw(small, "conv"))
    assert torch.equal(truncate_rank(padded, 1)["lin.lora_B.weight"], small["lin.lora_B.weight"])
    with pytest.raises(ValueError, match="cannot lower"):
        pad_rank(adapter(3), 2)


def test_a_rank_keeps_the_fleets_scale_and_layout():
    fleet = lora_config(8, 4.0)
    low = lora_at_rank(fleet, 2)
    assert (low.r, lora_scale(low), sorted(low.target_modules)) == (2, lora_scale(fleet), sorted(fleet.target_modules))
    assert lora_at_rank(fleet, 8) is fleet
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        lora_at_rank(fleet, 9)
    assert shapes_at_rank({"x.lora_A.weight": (8, 3, 3, 3), "x.lora_B.weight": (5, 8, 1, 1)}, 2) == \
        {"x.lora_A.weight": (2, 3, 3, 3), "x.lora_B.weight": (5, 2, 1, 1)}


def test_energy_spectrum_is_the_singular_values_share():
    a = adapter(3)
    shares = energy_spectrum(a, SCALE)
    energy = sum(torch.linalg.svdvals(dw(a, m))[:3].pow(2) for m in ("lin", "conv"))
    assert shares == pytest.approx((energy / energy.sum()).tolist(), rel=1e-6)
    one = pad_rank(adapter(1), 3)  # a rank-1 update padded: all energy in the first direction
    assert energy_spectrum(one, SCALE) == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)


def test_an_unknown_split_is_refused_by_name():
    with pytest.raises(ValueError, match="svd, zero_pad"):
        make_split("flexible")
