"""``fedaigc rollout``: publish an export as a new signed version to the fleet, canary first."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from aggregator.cli._common import add_topic_prefix_argument, load_config


def register(sub) -> None:
    p = sub.add_parser("rollout", help="roll an export out to the fleet over MQTT (signed, canary first)",
                       description="Publish an export directory as a new signed version, retained, to every device "
                                   "or one cluster; canary devices get it first and a failed canary halts it. "
                                   "Exits 3 when halted.")
    p.add_argument("--artifact", required=True, metavar="DIR", help="a `fedaigc export` output directory")
    p.add_argument("--to", required=True, metavar="cluster:ID|all", help="which devices run the new version")
    p.add_argument("--canary", default="0%", metavar="PERCENT",
                   help="share of the targeted devices (by hash of their id) that get it first, e.g. 10%% "
                        "(default: 0%%, no canary stage)")
    p.add_argument("--canary-timeout", type=float, default=600.0, metavar="S",
                   help="open to all after this long if no canary failed (default: 600)")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="then wait up to S seconds for every targeted device's report (default: 0)")
    p.add_argument("--config", help="aggregator.toml: the aggregator's id, state and broker")
    p.add_argument("--state-dir", help="the aggregator's state directory, holding its key (default: fedaigc-state)")
    p.add_argument("--state", help="state store, if not the SQLite file in --state-dir: a path or postgresql://...")
    p.add_argument("--aggregator-id", help="the aggregator's id as devices know it (default: aggregator)")
    p.add_argument("--mqtt-url", help="broker (default: the config's, else mqtt://127.0.0.1:1883)")
    add_topic_prefix_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, mqtt_url=args.mqtt_url, mqtt_topic_prefix=args.topic_prefix,
                         state_dir=args.state_dir, state_url=args.state, aggregator_id=args.aggregator_id)
    from aggregator.rollout import Rollout, RolloutPlan, parse_fraction, parse_target
    from aggregator.state import open_store
    from edge_sdk.artifacts.manifest import ManifestError
    from edge_sdk.protocol.identity import Identity
    from edge_sdk.transport import MqttTransport

    try:
        target, clusters = parse_target(args.to)
        canary = parse_fraction(args.canary)
    except ValueError as e:
        print(f"fedaigc rollout: {e}", file=sys.stderr)
        return 2
    key = Path(config.state_dir) / "aggregator.key"
    if not key.exists():  # devices trust the daemon's key; a new one would be refused by all of them
        print(f"fedaigc rollout: no aggregator key at {key}; run `fedaigc aggregator` with this state first",
              file=sys.stderr)
        return 2
    plan = RolloutPlan(Path(args.artifact), target, clusters, canary, args.canary_timeout, args.wait)
    store = open_store(config.store_url, create=False)
    transport = MqttTransport(config.mqtt(f"fedaigc-{config.aggregator_id}-rollout-{uuid.uuid4().hex[:8]}",
                                          session_expiry_s=0)).connect()
    try:
        summary = Rollout(transport, Identity.load(key), config.aggregator_id, store).run(plan)
    except (ManifestError, FileNotFoundError) as e:
        print(f"fedaigc rollout: {e}", file=sys.stderr)
        return 2
    finally:
        transport.close()
        store.close()
    print(json.dumps(summary, indent=2))
    return 3 if summary["stage"] == "halted" else 0
