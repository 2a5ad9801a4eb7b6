"""FedAvg applied to LoRA factors: average A and B separately, weighted by sample count.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017), as used on LoRA by FedIT (Zhang et al., 2024). It is the baseline:
mean(B)·mean(A) != mean(B·A), so the aggregate is not the average of what clients learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.rules.base import Adapter, AggregationRule, ClientUpdate, sample_weights
from aggregator.rules.reducers import weighted_mean
from models.lora import LoraConfig


class FedAvgLora(AggregationRule):
    name = "fedavg"

    def combine(self, current: Adapter, updates: Sequence[ClientUpdate], lora: LoraConfig) -> tuple[Adapter, set[str]]:
        w = sample_weights(updates)
        out = {k: weighted_mean(torch.stack([u.adapter[k].double() for u in updates]), w).float() for k in current}
        return out, set()
