"""Rank-split rules, one per file behind ``RankSplit`` (see ``base.py``)."""

from aggregator.rank_split.base import RankSplit
from aggregator.rank_split.shares import RankShares
from aggregator.rank_split.svd import SvdSplit
from aggregator.rank_split.zero_pad import ZeroPadSplit

SPLITS = {"svd": SvdSplit, "zero_pad": ZeroPadSplit}


def make_split(name: str) -> RankSplit:
    """A split by name (``AggregatorConfig.rank_split``)."""
    if name not in SPLITS:
        raise ValueError(f"unknown rank split {name!r}; known: {', '.join(SPLITS)}")
    return SPLITS[name]()


__all__ = ["RankShares", "RankSplit", "SPLITS", "SvdSplit", "ZeroPadSplit", "make_split"]
