"""``fedaigc broker``: the embedded MQTT broker, unless one already answers."""

from __future__ import annotations

import argparse
from urllib.parse import urlparse

from aggregator.cli._common import wait_for_signal


def register(sub) -> None:
    p = sub.add_parser("broker", help="run the embedded MQTT broker unless one already answers",
                       description="Start mosquitto (if installed) or amqtt at --mqtt-url when nothing listens there: "
                                   "anonymous, unless --config names a Mosquitto config (`fedaigc broker-config`).")
    p.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883",
                   help="where it listens; with --config, the config's listener (mqtts:// for its TLS one)")
    p.add_argument("--kind", choices=["auto", "mosquitto", "amqtt"], default="auto")
    p.add_argument("--config", metavar="CONF", help="run mosquitto with this config instead of an anonymous one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.broker import EmbeddedBroker, ensure_broker

    if args.config:
        url = urlparse(args.mqtt_url)
        tls = url.scheme == "mqtts"
        broker = EmbeddedBroker(url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883), config=args.config,
                                tls=tls).start()
    else:
        broker = ensure_broker(args.mqtt_url, kind=args.kind)
    if broker is None:
        print(f"a broker already answers at {args.mqtt_url}; nothing to start")
        return 0
    print(f"embedded {broker.kind} broker at {broker.url}; Ctrl-C stops it")
    wait_for_signal()
    broker.close()
    return 0
