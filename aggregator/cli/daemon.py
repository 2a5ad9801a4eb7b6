"""``fedaigc aggregator``: the aggregator daemon (roles all, edge, cloud) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import sys

from aggregator.cli._common import add_topic_prefix_argument, load_config, wait_for_signal


def register(sub) -> None:
    p = sub.add_parser("aggregator", help="run the aggregator daemon",
                       description="Run the aggregator (roles: edge, cloud, all) until SIGINT/SIGTERM.")
    p.add_argument("--config", help="aggregator.toml (see examples/aggregator.toml)")
    p.add_argument("--role", choices=["all", "edge", "cloud"],
                   help="all: one tier (default); edge: serve devices and report clusters to the cloud at "
                        "--cloud-url; cloud: mix the clusters of every edge")
    p.add_argument("--cloud-url", help="the cloud aggregator's broker (role edge)")
    p.add_argument("--mqtt-url")
    add_topic_prefix_argument(p)
    p.add_argument("--state", help="state store: a SQLite path or postgresql://...")
    p.add_argument("--base-model", metavar="DIR", help="the fleet's base model: a diffusers pipeline directory "
                                                       "(default: the config's, else the bundled digits model)")
    p.add_argument("--start-broker", action="store_true", help="start an embedded broker if none answers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """An unusable state, key, broker or metrics port is raised to ``fedaigc``'s one-line report (exit 2)."""
    config = load_config(args.config, role=args.role, mqtt_url=args.mqtt_url, mqtt_topic_prefix=args.topic_prefix,
                         state_url=args.state, cloud_url=args.cloud_url, base_model=args.base_model)
    from aggregator.broker import ensure_broker

    broker = ensure_broker(config.mqtt_url) if args.start_broker else None
    try:
        preflight(config)
        from aggregator.hierarchy import CloudAggregator
        from aggregator.service import AggregatorService

        # the MQTT network thread must take a burst of updates off the broker while the worker thread
        # computes: brokers drop what a slow subscriber has not taken beyond their queue limit (Mosquitto's
        # max_queued_messages), and a short GIL switch interval lets it in more often
        sys.setswitchinterval(0.0005)
        service = (CloudAggregator(config) if config.role == "cloud" else AggregatorService(config)).start()
        print(f"aggregator {config.aggregator_id} ({config.role}) running; key fingerprint "
              f"{service.identity.public.fingerprint}; Ctrl-C stops it", file=sys.stderr)
        wait_for_signal()
        service.stop()
    finally:
        if broker is not None:
            broker.close()
    return 0


def preflight(config) -> None:
    """The setup mistakes an operator makes most, found before the model libraries load (seconds):
    an unusable state directory or key, a broker that is not there or will not have us, a busy
    metrics port.

    The broker probe is a session of its own that the broker forgets at once (no expiry), so the
    daemon's persistent session is not touched."""
    from dataclasses import replace

    from aggregator.keyring import key_path
    from aggregator.metrics import check_port
    from aggregator.state import state_directory
    from edge_sdk.protocol.identity import Identity
    from edge_sdk.transport import MqttTransport

    key = key_path(state_directory(config.state_dir), config.role)
    if key.exists():
        Identity.load(key)
    probes = [config.mqtt(f"fedaigc-{config.aggregator_id}-preflight")]
    if config.role == "edge":
        probes.append(replace(probes[0], url=config.cloud_url, username=None, password=None))
    for mqtt in probes:
        MqttTransport(replace(mqtt, session_expiry_s=0)).connect().close()
    if config.metrics_port is not None:
        check_port(config.metrics_port, config.metrics_addr)
