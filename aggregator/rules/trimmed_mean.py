"""Coordinate-wise trimmed mean in ΔW space (Yin et al., ICML 2018).

Drops the ``beta`` fraction of largest and smallest values of every coordinate before
averaging: robust to up to ``beta`` of clients being arbitrary, less noisy than the median.
"""

from __future__ import annotations

import torch

from aggregator.rules.exact import ExactLoraAggregation
from aggregator.rules.reducers import trimmed_mean


class ExactTrimmedMean(ExactLoraAggregation):
    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2, rank: int | None = None) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        super().__init__(rank)
        self.beta = beta

    def reduce(self, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return trimmed_mean(stack, self.beta)
