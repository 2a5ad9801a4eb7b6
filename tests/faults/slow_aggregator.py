"""The aggregator daemon with a slow aggregation step, so a test can SIGKILL it mid-aggregation.

    python tests/faults/slow_aggregator.py --config aggregator.toml --marker PATH --delay SECONDS

Exactly ``fedaigc aggregator --config`` except that the rule, once it holds the round's
updates, writes ``PATH`` and sleeps ``SECONDS`` before aggregating: the window in which a
real aggregation of many updates would be running.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.service import AggregatorService  # noqa: E402


class SlowRule:
    def __init__(self, inner, marker: Path, delay: float) -> None:
        self.inner, self.marker, self.delay = inner, marker, delay

    def aggregate(self, current, updates, spec):
        self.marker.write_text(f"aggregating {len(updates)} updates\n")
        time.sleep(self.delay)
        return self.inner.aggregate(current, updates, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--delay", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = AggregatorService(AggregatorConfig.from_toml(args.config))
    service.rounds.rule = SlowRule(service.rounds.rule, Path(args.marker), args.delay)
    service.start()
    print("slow aggregator running", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    service.stop()


if __name__ == "__main__":
    main()
