"""``fedaigc status``: rounds, clusters, devices, refusals and bytes, read from the state store."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("status", help="show rounds, clusters, devices, refusals and bytes from the state store",
                       description="Read the aggregator's state store and print its status.")
    p.add_argument("--state", default="fedaigc-state/state.db", help="SQLite path or postgresql://...")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.status import read_status, render_status

    status = read_status(args.state)
    print(json.dumps(status, indent=2, default=str) if args.json else render_status(status))
    return 0
