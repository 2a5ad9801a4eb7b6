"""The aggregation interface: one small class per rule, validation done once, here.

Read like Flower's ``Strategy``: ``AggregationRule.aggregate`` validates the replies
(names and shapes match the current adapter, values finite, sample counts positive),
bounds the sample counts the rule weights by (``aggregator.sample_bound``: a claim is not
trust), hands clean inputs to ``combine``, the one method each rule implements, and
checks what comes back is finite (``AggregationFailed`` otherwise). Rules are pure:
adapters in, adapter out, no I/O, no state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aggregator.sample_bound import SampleBound
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.tensors import check_shapes, shapes_of
from models.lora import LoraConfig

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution: its adapter *after* local training, and its data size."""

    device_id: str
    adapter: Adapter
    samples: int

    @classmethod
    def from_delta(cls, device_id: str, current: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                   samples: int) -> "ClientUpdate":
        return cls(device_id, {k: current[k] + delta[k] for k in current}, samples)


@dataclass
class AggregateResult:
    adapter: Adapter
    accepted: list[str]
    rejected: dict[str, str] = field(default_factory=dict)  # device -> reason
    samples: dict[str, int] = field(default_factory=dict)  # accepted device -> the samples it was weighted by


class AggregationFailed(ArithmeticError):
    """The rule produced no finite adapter from these updates."""


class AggregationRule(ABC):
    """Combine the adapters of one cluster's devices into that cluster's next adapter."""

    name: str = "rule"
    sample_bound: SampleBound = SampleBound()  # make_rule sets the configured one

    def aggregate(self, current: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                  lora: LoraConfig) -> AggregateResult:
        shapes = shapes_of(current)
        valid: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        for u in updates:
            try:
                check_update(u, shapes)
            except RefusedMessage as e:
                rejected[u.device_id] = e.reason.value
                continue
            valid.append(u)
        if not valid:
            return AggregateResult({k: v.clone() for k, v in current.items()}, [], rejected)
        valid = self.sample_bound(valid)
        adapter, screened = self.combine(dict(current), valid, lora)
        broken = sorted(k for k, t in adapter.items() if not bool(torch.isfinite(t).all()))
        if broken:
            raise AggregationFailed(f"{self.name} produced NaN or Inf in {', '.join(broken[:3])}")
        for device in screened:
            rejected[device] = Refusal.POISONED.value
        kept = [u for u in valid if u.device_id not in screened]
        return AggregateResult(adapter, [u.device_id for u in kept], rejected, {u.device_id: u.samples for u in kept})

    @abstractmethod
    def combine(self, current: Adapter, updates: Sequence[ClientUpdate], lora: LoraConfig) -> tuple[Adapter, set[str]]:
        """Return the new adapter and the devices this rule screened out as outliers."""


def check_update(update: ClientUpdate, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if update.samples < 1:
        raise RefusedMessage(Refusal.MALFORMED, f"{update.device_id} reports {update.samples} samples")
    check_shapes(update.adapter, shapes)
    for name, t in update.adapter.items():
        if not bool(torch.isfinite(t).all()):
            raise RefusedMessage(Refusal.NON_FINITE, f"{update.device_id}: {name} holds NaN or Inf")


def sample_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Normalised weights by samples (bounded by ``aggregate``); equal weights if the counts give none."""
    w = torch.tensor([float(u.samples) for u in updates], dtype=torch.float64)
    total = float(w.sum())
    if not (math.isfinite(total) and total > 0 and bool((w >= 0).all())):
        return torch.full_like(w, 1.0 / len(w))
    return w / total
