"""Aggregation rules, one per file, behind ``AggregationRule`` (see ``base.py``)."""

from aggregator.rules.base import AggregateResult, AggregationRule, ClientUpdate
from aggregator.rules.clipping import NormClipping
from aggregator.rules.exact import ExactLoraAggregation
from aggregator.rules.fedavg import FedAvgLora
from aggregator.rules.median import ExactMedian
from aggregator.rules.trimmed_mean import ExactTrimmedMean

RULES = {
    "fedavg": FedAvgLora,
    "exact": ExactLoraAggregation,
    "median": ExactMedian,
    "trimmed_mean": ExactTrimmedMean,
}


def make_rule(name: str, clip: float | None = None, **kwargs) -> AggregationRule:
    """A rule by name, optionally behind norm clipping at ``clip`` x the median update."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; known: {', '.join(RULES)}")
    rule = RULES[name](**kwargs)
    return NormClipping(rule, clip) if clip else rule


__all__ = ["AggregationRule", "AggregateResult", "ClientUpdate", "ExactLoraAggregation", "FedAvgLora",
           "ExactMedian", "ExactTrimmedMean", "NormClipping", "RULES", "make_rule"]
