"""``fedaigc broker-config``: the Mosquitto side of a fleet (accounts, ACLs, limits, TLS) in one directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aggregator.cli._common import add_topic_prefix_argument


def register(sub) -> None:
    p = sub.add_parser("broker-config", help="write a Mosquitto config with accounts and ACLs for a fleet",
                       description="Write mosquitto.conf, acl and passwd (all 0600) to DIR: no anonymous clients, "
                                   "devices log in as their device id and may publish only on their own topics, "
                                   "only the aggregator account publishes the keys and rollouts. The aggregator's "
                                   "generated password goes to DIR/aggregator.toml; queues, in-flight window, packet "
                                   "size and persistence are sized for a round's burst (--devices); add devices with "
                                   "aggregator.broker_auth.add_broker_user and SIGHUP the broker.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created)")
    add_topic_prefix_argument(p)
    p.add_argument("--mqtt-port", type=int, metavar="PORT", help="listener port (default: 8883 with TLS, else 1883)")
    p.add_argument("--mqtt-host", default="127.0.0.1", metavar="HOST",
                   help="where clients reach the broker, for the URLs written (default: 127.0.0.1)")
    p.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: every interface)")
    p.add_argument("--aggregator-user", default="aggregator", metavar="NAME",
                   help="the aggregator's broker account (default: aggregator)")
    p.add_argument("--edge", action="append", default=[], metavar="ID",
                   help="an edge aggregator account on this (the cloud's) broker; repeatable")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="the broker's certificate: the listener is TLS")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA clients check the certificate against")
    p.add_argument("--max-packet-bytes", type=int, metavar="N", help="largest MQTT packet (default: 1 MiB)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="the fleet's size: queues sized for a whole round's updates reaching one aggregator "
                        "session twice over (default: 10000 messages, 256 MiB per session)")
    p.add_argument("--update-bytes", type=int, default=64 * 1024, metavar="N",
                   help="with --devices: one update's size on the wire (default: 64 KiB)")
    p.add_argument("--max-queued-messages", type=int, metavar="N",
                   help="QoS-1 messages queued per client session beyond those in flight (overrides --devices)")
    p.add_argument("--max-inflight-messages", type=int, metavar="N",
                   help="QoS-1 messages sent to a client and not yet acknowledged (default: 100)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from aggregator.broker_auth import write_broker_config
    from aggregator.broker_limits import BrokerLimits
    from edge_sdk.protocol.topics import DEFAULT_PREFIX

    try:
        limits = BrokerLimits() if args.devices is None else BrokerLimits.for_fleet(args.devices, args.update_bytes)
        limits = replace(limits, **{k: v for k, v in (("max_packet_bytes", args.max_packet_bytes),
                                                      ("max_queued_messages", args.max_queued_messages),
                                                      ("max_inflight_messages", args.max_inflight_messages))
                                    if v is not None})
        files = write_broker_config(Path(args.out), args.topic_prefix or DEFAULT_PREFIX, args.mqtt_port,
                                    args.mqtt_host, args.bind, args.aggregator_user, tuple(args.edge),
                                    args.tls_cert, args.tls_key, args.tls_ca, limits)
    except (ValueError, OSError) as e:
        print(f"fedaigc broker-config: {e}", file=sys.stderr)
        return 2
    print(f"wrote {files.conf}, {files.acl} and {files.passwd}\n"
          f"the aggregator's account ({files.url}): {files.aggregator_toml}\n"
          + "".join(f"edge {edge}'s account: {path}\n" for edge, path in files.edge_tomls.items())
          + f"run: mosquitto -c {files.conf}; after adding or removing accounts: kill -HUP <its pid>")
    return 0
