"""Sample counts are claims, not trust: bound each device's aggregation weight before a rule uses it.

A device reports how many samples its update was trained on, and every weighted rule weights by
that number. Unbounded, one device claiming 10**12 samples *is* the aggregate. Two caps, applied
to the claims before any rule sees them:

* an absolute one, ``max_samples`` (``AggregatorConfig.max_samples``): the weight cap
  ``w_k = min(n_k, Ŵ)`` of DP-FedAvg (McMahan et al., "Learning Differentially Private
  Recurrent Language Models", ICLR 2018), which also bounds one device's influence;
* a cluster-relative one, ``median_multiple`` x the round's (lower) median claim
  (``AggregatorConfig.samples_multiple``): honest devices of one cluster hold data of one order
  of magnitude, and a minority cannot move the median. The lower median, so that with two
  devices the larger claim is the one capped.

With every claim capped at ``m`` x the median and at least half the claims at or below it, a single
device carries at most ``m / (m + (n - 1) / 2)`` of the weight - and usually far less.
Pure: updates in, updates out (same order, samples replaced), no I/O. Outside ``aggregator.rules``
and free of torch, so ``AggregatorConfig`` states its defaults without loading a rule.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from edge_sdk.protocol.messages import INT32_MAX as STORE_MAX_SAMPLES  # the store's INTEGER (PostgreSQL: 32-bit)


class Claim(Protocol):
    """What a bound reads of an update (``aggregator.rules.ClientUpdate``, a dataclass): its claim."""

    samples: int


Update = TypeVar("Update", bound=Claim)


@dataclass(frozen=True)
class SampleBound:
    """The two caps on a device's claimed samples; ``median_multiple`` None: no cluster-relative cap."""

    max_samples: int = 100_000
    median_multiple: float | None = 3.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_samples <= STORE_MAX_SAMPLES:
            raise ValueError(f"max_samples must be in [1, {STORE_MAX_SAMPLES}], got {self.max_samples}")
        if self.median_multiple is not None and not (math.isfinite(self.median_multiple)
                                                     and self.median_multiple >= 1.0):
            raise ValueError(f"samples_multiple must be a finite number >= 1 (or none), got {self.median_multiple}")

    def __call__(self, updates: Sequence[Update]) -> list[Update]:
        return bound_samples(updates, self.max_samples, self.median_multiple)


def bound_samples(updates: Sequence[Update], max_samples: int,
                  median_multiple: float | None = None) -> list[Update]:
    """The updates with each claim capped at ``max_samples`` and at ``median_multiple`` x the lower median
    of the capped claims (at least 1 sample each: an update is never weighted to nothing here)."""
    capped = [max(1, min(int(u.samples), max_samples)) for u in updates]
    if median_multiple is not None and capped:
        limit = max(1, math.floor(median_multiple * statistics.median_low(capped)))
        capped = [min(n, limit) for n in capped]
    return [u if u.samples == n else replace(u, samples=n) for u, n in zip(updates, capped)]
