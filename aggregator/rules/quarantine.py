"""Aggregation that always ends: updates that make a rule fail are set aside, the rest aggregate.

A round's close runs the rule inside the transaction that closes the round; an exception there
rolls the close back and the next tick would retry it, forever, with the same updates. Instead
(``aggregate_or_quarantine``): when the rule fails on a round's updates, each update is tried
alone, and those that fail alone are *quarantined* (refused ``quarantined``, with what failed);
the others are aggregated again. When that still fails, no single update explains the failure:
every update is set aside and the cluster keeps its adapter, with the reason - a defined end,
not a retry. Pure, like the rules: no I/O; the caller counts, logs and tells the devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aggregator.rules.base import AggregateResult, AggregationRule, ClientUpdate
from edge_sdk.protocol.errors import Refusal
from models.lora import LoraConfig


@dataclass
class GuardedResult:
    result: AggregateResult                                     # quarantined devices are in ``result.rejected``
    quarantined: dict[str, str] = field(default_factory=dict)   # device -> what failed
    failure: str | None = None   # the rule failed with no single update to blame: ``result`` keeps the adapter


def aggregate_or_quarantine(rule: AggregationRule, current: Mapping[str, torch.Tensor],
                            updates: Sequence[ClientUpdate], lora: LoraConfig) -> GuardedResult:
    """``rule.aggregate`` over ``updates``; on failure, quarantine the updates it fails on alone and
    aggregate the rest, or (no single update to blame) keep ``current`` and set every update aside."""
    try:
        return GuardedResult(rule.aggregate(current, updates, lora))
    except Exception as e:  # noqa: BLE001 - whatever a rule raises must not stall the round
        first = _what(e)
    quarantined: dict[str, str] = {}
    for u in updates:
        try:
            rule.aggregate(current, [u], lora)
        except Exception as e:  # noqa: BLE001
            quarantined[u.device_id] = _what(e)
    rest = [u for u in updates if u.device_id not in quarantined]
    if quarantined and rest:
        try:
            result = rule.aggregate(current, rest, lora)
        except Exception as e:  # noqa: BLE001
            first = f"{first}; without the {len(quarantined)} failing alone: {_what(e)}"
        else:
            result.rejected.update({d: Refusal.QUARANTINED.value for d in quarantined})
            return GuardedResult(result, quarantined)
    elif quarantined:  # every update fails alone
        return GuardedResult(_unchanged(current, updates), quarantined)
    reason = f"{rule.name} fails on these {len(updates)} updates together, on none alone: {first}"
    return GuardedResult(_unchanged(current, updates),
                         {u.device_id: quarantined.get(u.device_id, reason) for u in updates}, reason)


def _unchanged(current: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> AggregateResult:
    return AggregateResult({k: v.clone() for k, v in current.items()}, [],
                           {u.device_id: Refusal.QUARANTINED.value for u in updates})


def _what(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:300]
