"""HetLoRA's split: keep a device's share of the factors themselves, zero-padded or truncated.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"
(HetLoRA, EMNLP 2024): a rank-r client takes r of the global factors' rank slots and its update
is zero-padded back to the global rank. Which slots: the r whose product carries the most of
ΔW, ‖B[:, j]‖ · ‖A[j]‖ (HetLoRA's norm-based rank pruning), kept in their order. No SVD, so the
slots a device trained are the ones it gets back; on an adapter the exact rule re-factorised
(orthogonal slots, largest first) it gives the same ΔW as the SVD split.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from aggregator.rank_split.base import Adapter, RankSplit
from models.lora import lora_modules
from models.lora_ranks import select_slots


class ZeroPadSplit(RankSplit):
    name = "zero_pad"

    def lower(self, adapter: Mapping[str, torch.Tensor], rank: int, scale: float) -> Adapter:
        slots = {}
        for m in lora_modules(adapter):
            a, b = adapter[f"{m}.lora_A.weight"], adapter[f"{m}.lora_B.weight"]
            norms = a.reshape(a.shape[0], -1).norm(dim=1) * b.reshape(b.shape[0], -1).norm(dim=0)
            # a stable sort: slots of equal norm (all zero in a fresh adapter) are kept first-come
            order = torch.sort(-norms.double(), stable=True).indices[:rank]
            slots[m] = torch.sort(order).values
        return select_slots(adapter, slots)
