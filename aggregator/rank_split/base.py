"""The rank-split interface: a cluster's adapter, re-factorised to one device's rank.

A cluster's adapter lives at the fleet's rank R (the aggregate of updates zero-padded to R,
averaged exactly in ΔW space: ``aggregator/rules``); a device of rank r < R receives
``split(adapter, r, scale)``. Like an aggregation rule, a split is pure (tensors in, tensors
out, no state), one class per file; the resizing both directions share is here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from models.lora_ranks import adapter_rank, pad_rank

Adapter = dict[str, torch.Tensor]


class RankSplit(ABC):
    """Turn an adapter into one of another rank (ΔW = scale · B · A kept as well as that rank can)."""

    name: str = "split"

    def split(self, adapter: Mapping[str, torch.Tensor], rank: int, scale: float) -> Adapter:
        """``adapter`` at ``rank``: zero-padded if that is not lower (exact: the same ΔW), else ``lower``'s."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"a LoRA rank is a positive integer, got {rank!r}")
        if rank >= adapter_rank(adapter):
            return pad_rank(adapter, rank)
        return self.lower(adapter, rank, scale)

    @abstractmethod
    def lower(self, adapter: Mapping[str, torch.Tensor], rank: int, scale: float) -> Adapter:
        """``adapter`` at a rank below its own."""
