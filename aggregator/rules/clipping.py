"""Per-update norm clipping in front of any rule, with outlier screening.

Each client's change ``adapter - current`` is measured (L2 over all tensors). Changes
above ``multiple`` x the median change are scaled down to that bound (Sun et al., "Can
You Really Backdoor Federated Learning?", 2019, clip by norm); changes above
``screen_multiple`` x the median are dropped as poisoned. Using the median makes the
bound adapt to the round without a tuned constant, and a minority cannot inflate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.rules.base import Adapter, AggregationRule, ClientUpdate
from models.lora import LoraConfig


class NormClipping(AggregationRule):
    def __init__(self, inner: AggregationRule, multiple: float = 2.0, screen_multiple: float | None = 10.0) -> None:
        if multiple <= 0:
            raise ValueError(f"multiple must be > 0, got {multiple}")
        self.inner = inner
        self.multiple = multiple
        self.screen_multiple = screen_multiple
        self.name = f"clipped_{inner.name}"

    def combine(self, current: Adapter, updates: Sequence[ClientUpdate], lora: LoraConfig) -> tuple[Adapter, set[str]]:
        norms = torch.tensor([update_norm(current, u.adapter) for u in updates])
        median = float(norms.median())
        screened = set()
        kept = []
        for u, n in zip(updates, norms.tolist()):
            if self.screen_multiple is not None and median > 0 and n > self.screen_multiple * median:
                screened.add(u.device_id)
                continue
            bound = self.multiple * median
            factor = 1.0 if n <= bound or n == 0 else bound / n
            kept.append(ClientUpdate(u.device_id, {k: current[k] + factor * (u.adapter[k] - current[k]) for k in current},
                                     u.samples))
        adapter, inner_screened = self.inner.combine(current, kept, lora)
        return adapter, screened | inner_screened


def update_norm(current: Adapter, adapter: Adapter) -> float:
    return float(torch.sqrt(sum(((adapter[k] - current[k]).double() ** 2).sum() for k in current)))
