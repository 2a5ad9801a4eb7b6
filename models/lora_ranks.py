"""LoRA adapters of different ranks over one fleet: rank configs, exact resizing, the ΔW spectrum.

A fleet has one maximum rank R (its ``LoraConfig``); a device trains at the rank r <= R its
profile allows. Every rank keeps the fleet's scale (alpha / r), so ΔW = scale · B · A means the
same at every rank: zero-padding a rank-r adapter to R changes no ΔW (the aggregator pads each
update before it averages in ΔW space), and dropping rank slots removes exactly their part.
Which slots a device keeps of its cluster's adapter is the aggregator's rank-split rule
(``aggregator/rank_split``); this module holds the tensor operations both sides share.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models.lora import LoraConfig, delta_weight, lora_config, lora_modules, lora_scale

Adapter = dict[str, torch.Tensor]


def lora_at_rank(fleet: LoraConfig, rank: int) -> LoraConfig:
    """The fleet's config at ``rank``, with alpha scaled so ``lora_scale`` stays the fleet's."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= fleet.r:
        raise ValueError(f"a device's LoRA rank must be an integer in [1, {fleet.r}] (the fleet's), got {rank!r}")
    if rank == fleet.r:
        return fleet
    return lora_config(rank, lora_scale(fleet) * rank, fleet.target_modules)


def adapter_rank(adapter: Mapping[str, torch.Tensor]) -> int:
    """The rank of an adapter's factors (every module has the same)."""
    ranks = {adapter[f"{m}.lora_A.weight"].shape[0] for m in lora_modules(adapter)}
    if len(ranks) != 1:
        raise ValueError(f"an adapter has one rank, this one has {sorted(ranks)}")
    return ranks.pop()


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """An adapter layout with its rank (A's dim 0, B's dim 1) set to ``rank``."""
    out = {}
    for name, shape in shapes.items():
        dim = 0 if ".lora_A." in name else 1
        out[name] = shape[:dim] + (rank,) + shape[dim + 1:]
    return out


def select_slots(adapter: Mapping[str, torch.Tensor], slots: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter made of the rank slots ``slots[module]`` (indices) of each module: A's rows, B's columns."""
    out: Adapter = {}
    for m in lora_modules(adapter):
        ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        out[ka] = adapter[ka].index_select(0, slots[m]).contiguous()
        out[kb] = adapter[kb].index_select(1, slots[m]).contiguous()
    return out


def truncate_rank(adapter: Mapping[str, torch.Tensor], rank: int) -> Adapter:
    """The first ``rank`` slots of every module (no copy of the rest)."""
    return select_slots(adapter, {m: torch.arange(rank) for m in lora_modules(adapter)})


def pad_rank(adapter: Mapping[str, torch.Tensor], rank: int) -> Adapter:
    """Zero-pad every module's factors to ``rank`` slots: A gains zero rows, B zero columns, so ΔW is unchanged."""
    now = adapter_rank(adapter)
    if rank < now:
        raise ValueError(f"padding cannot lower a rank-{now} adapter to rank {rank}")
    out: Adapter = {}
    for name, t in adapter.items():
        dim = 0 if ".lora_A." in name else 1
        shape = list(t.shape)
        shape[dim] = rank - now
        out[name] = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return out


def energy_spectrum(adapter: Mapping[str, torch.Tensor], scale: float) -> list[float]:
    """Each singular direction's share of the adapter's energy ‖ΔW‖², summed over modules, largest first.

    Rank collapse (the aggregate's energy piling into the ranks every device shares) shows as the
    first shares summing to almost 1. Computed from the factors' QR, so no ΔW is built larger than r x r.
    """
    rank = adapter_rank(adapter)
    energy = torch.zeros(rank, dtype=torch.float64)
    for m in lora_modules(adapter):
        a = adapter[f"{m}.lora_A.weight"].reshape(rank, -1).double()
        b = adapter[f"{m}.lora_B.weight"].reshape(-1, rank).double()
        _, rb = torch.linalg.qr(b)         # B = Q_B R_B, A^T = Q_A R_A: ΔW's singular values are R_B R_A^T's
        _, ra = torch.linalg.qr(a.T)
        s = torch.linalg.svdvals(delta_weight(ra.T, rb, scale))
        energy[: s.shape[0]] += s.pow(2)
    total = float(energy.sum())
    return [float(e) / total if total > 0 else 0.0 for e in energy]
