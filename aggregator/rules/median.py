"""Coordinate-wise median in ΔW space.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
(ICML 2018). Any minority of clients, however large their updates, cannot move a
coordinate beyond the range of the honest values.
"""

from __future__ import annotations

import torch

from aggregator.rules.exact import ExactLoraAggregation
from aggregator.rules.reducers import coordinate_median


class ExactMedian(ExactLoraAggregation):
    name = "median"

    def reduce(self, stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return coordinate_median(stack)
