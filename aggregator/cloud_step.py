"""The step between two rounds where clusters learn from each other: here, or at the cloud tier.

Single-tier (and as every fallback) the interaction runs locally over this aggregator's
clusters (``aggregator.interaction.interact``). An edge aggregator instead reports its
clusters to the cloud (``aggregator.hierarchy.CloudLink``) and waits for the cloud's mix; if
none arrives within ``cloud_timeout_s`` it interacts locally, so a round never stalls on the
wide-area link.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from aggregator.config import AggregatorConfig
from aggregator.hierarchy import CloudLink
from aggregator.interaction import Spread, interact
from edge_sdk.protocol.errors import Refusal, RefusedMessage

log = logging.getLogger("fedaigc.aggregator")

Adapters = dict[int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class AwaitingCloud:
    """A finished round whose clusters went to the cloud: what to fall back on, and since when."""

    round: int
    adapters: Adapters
    spreads: Mapping[int, Spread | None]
    versions: dict[int, int]
    since: float


class CloudStep:
    def __init__(self, config: AggregatorConfig, link: CloudLink | None = None) -> None:
        self.config = config
        self.link = link
        self.awaiting: AwaitingCloud | None = None

    def begin(self, rnd: int, adapters: Adapters, centroids: Mapping[int, np.ndarray], sizes: Mapping[int, int],
              spreads: Mapping[int, Spread | None], versions: dict[int, int]) -> Adapters | None:
        """The mixed adapters now, or None when they come from the cloud (``arrived``) or its timeout (``expired``)."""
        if self.link is not None and self.link.report(rnd, adapters, centroids, sizes, spreads):
            self.awaiting = AwaitingCloud(rnd, adapters, spreads, versions, time.monotonic())
            return None
        return self.local(rnd, adapters, centroids, sizes, spreads)

    def local(self, rnd: int, adapters: Adapters, centroids: Mapping[int, np.ndarray], sizes: Mapping[int, int],
              spreads: Mapping[int, Spread | None]) -> Adapters:
        c = self.config
        if not (c.interaction and len(adapters) > 1):
            return adapters
        return interact(adapters, {cid: centroids[cid] for cid in adapters},
                        {cid: float(sizes[cid]) for cid in adapters}, c.lora, c.borrow, c.temperature,
                        c.interaction_min_similarity, spreads=spreads if c.global_shrinkage else None,
                        min_agreement=c.interaction_min_agreement, label=f"round {rnd}")

    def arrived(self, rnd: int, adapters: Adapters) -> tuple[Adapters, dict[int, int]]:
        """The cloud's mix for ``rnd`` and the versions to commit it at; refused unless it is the awaited one."""
        waiting = self.awaiting
        if waiting is None or waiting.round != rnd or set(adapters) != set(waiting.adapters):
            raise RefusedMessage(Refusal.STALE_ROUND, f"cloud mix for round {rnd} does not match what this edge awaits")
        self.awaiting = None
        return adapters, waiting.versions

    def expired(self, centroids: Mapping[int, np.ndarray],
                sizes: Mapping[int, int]) -> tuple[int, Adapters, dict[int, int]] | None:
        """After ``cloud_timeout_s`` without a mix: (round, locally mixed adapters, versions); else None."""
        waiting = self.awaiting
        if waiting is None or time.monotonic() - waiting.since <= self.config.cloud_timeout_s:
            return None
        log.warning("no cloud mix for round %d within %.0f s; interacting locally", waiting.round,
                    self.config.cloud_timeout_s)
        self.awaiting = None
        return (waiting.round, self.local(waiting.round, waiting.adapters, centroids, sizes, waiting.spreads),
                waiting.versions)
