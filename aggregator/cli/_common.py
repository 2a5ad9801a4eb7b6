"""What several commands share: the wait for Ctrl-C, the fleet's topic prefix, an aggregator config."""

from __future__ import annotations

import argparse
import signal
import threading


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def add_topic_prefix_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic-prefix", metavar="PREFIX",
                   help="the fleet's topics lie under PREFIX/v1 (default: the config's, else fedaigc); "
                        "fleets sharing a broker use different prefixes")


def load_config(path: str | None, **overrides):
    """``AggregatorConfig`` from ``path`` (TOML) or the defaults, with the command line's overrides."""
    from aggregator.config import AggregatorConfig

    if path:
        return AggregatorConfig.from_toml(path, **overrides)
    return AggregatorConfig(**{k: v for k, v in overrides.items() if v is not None})
