"""Aggregation rules, one per file, behind ``AggregationRule`` (see ``base.py``)."""

from aggregator.rules.base import AggregateResult, AggregationFailed, AggregationRule, ClientUpdate
from aggregator.rules.clipping import NormClipping
from aggregator.rules.exact import ExactLoraAggregation
from aggregator.rules.fedavg import FedAvgLora
from aggregator.rules.median import ExactMedian
from aggregator.rules.trimmed_mean import ExactTrimmedMean
from aggregator.sample_bound import SampleBound, bound_samples

RULES = {
    "fedavg": FedAvgLora,
    "exact": ExactLoraAggregation,
    "median": ExactMedian,
    "trimmed_mean": ExactTrimmedMean,
}


def make_rule(name: str, clip: float | None = None, sample_bound: SampleBound | None = None,
              **kwargs) -> AggregationRule:
    """A rule by name, optionally behind norm clipping at ``clip`` x the median update, weighting by
    samples bounded by ``sample_bound`` (default: ``SampleBound()``)."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; known: {', '.join(RULES)}")
    rule = RULES[name](**kwargs)
    rule = NormClipping(rule, clip) if clip else rule
    if sample_bound is not None:
        rule.sample_bound = sample_bound
    return rule


__all__ = ["AggregationFailed", "AggregationRule", "AggregateResult", "ClientUpdate", "ExactLoraAggregation",
           "FedAvgLora", "ExactMedian", "ExactTrimmedMean", "NormClipping", "RULES", "SampleBound", "bound_samples",
           "make_rule"]
