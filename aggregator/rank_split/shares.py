"""A fleet's cluster adapters at each device's rank, and each device's update back at the fleet's.

What the round engine and the in-process federation both do with ranks, written once: a cluster
adapter (always at the fleet's rank R) reaches a rank-r device as the rank-split rule's share of
it, computed once per adapter and rank; the device's trained adapter comes back zero-padded to R,
which keeps its ΔW exactly, as a delta against the cluster's current adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from aggregator.rank_split.base import Adapter, RankSplit
from models.lora import LoraConfig, lora_scale
from models.lora_ranks import adapter_rank, lora_at_rank, pad_rank

MEMO = 64  # splits kept: a round start to every device of a rank splits each cluster adapter once


class SeedDraws(Protocol):
    """Which adapters devices can draw from the fleet's seed themselves (``DownlinkMirror``)."""

    def is_seeded(self, adapter: Adapter) -> bool: ...

    def add_seeded(self, adapter: Adapter) -> None: ...


class RankShares:
    def __init__(self, split: RankSplit, lora: LoraConfig, draw: Callable[[LoraConfig], Adapter],
                 seeds: SeedDraws) -> None:
        """``draw(lora)``: the fleet's seeded adapter drawn at ``lora``'s rank; ``seeds`` learns of each draw."""
        self.split, self.lora, self.draw, self.seeds = split, lora, draw, seeds
        # (rank, id(adapter)) -> (adapter, its share): keyed by identity like the downlink mirror's encodings
        # (a round's start to thousands of devices shares one adapter object), which the entry keeps alive
        self._memo: dict[tuple[int, int], tuple[Adapter, Adapter]] = {}

    def at_rank(self, adapter: Adapter, rank: int) -> Adapter:
        """``adapter`` as a device of ``rank`` holds it (the same object at the fleet's rank). The fleet's
        seeded round-1 adapter (B = 0: no ΔW) is the seed's draw at that rank instead, so that device too
        draws its start rather than receiving it."""
        if rank == self.lora.r:
            return adapter
        key = (rank, id(adapter))
        if key not in self._memo:
            if len(self._memo) >= MEMO:
                self._memo.pop(next(iter(self._memo)))
            if self.seeds.is_seeded(adapter):
                share = self.draw(lora_at_rank(self.lora, rank))
                self.seeds.add_seeded(share)
            else:
                share = self.split.split(adapter, rank, lora_scale(self.lora))
            self._memo[key] = (adapter, share)
        return self._memo[key][1]

    def to_fleet(self, start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                 current: Mapping[str, torch.Tensor]) -> Adapter:
        """A device's update (``delta`` from ``start``, both at its rank) as a delta against ``current``
        at the fleet's rank: its trained adapter zero-padded, so its ΔW is unchanged."""
        trained = {k: start[k] + delta[k] for k in delta}
        if adapter_rank(trained) != self.lora.r:
            trained = pad_rank(trained, self.lora.r)
        return {k: trained[k] - current[k] for k in current}
