"""``fedaigc provision``: a device's one-time token and the bundle that carries it to the device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aggregator.cli._credentials import add_state_arguments, open_state


def register(sub) -> None:
    p = sub.add_parser("provision", help="issue a device's credentials: a one-time token and a bundle file",
                       description="Create a one-time enrolment token bound to DEVICE_ID and write the device's "
                                   "provisioning bundle (JSON, mode 0600): broker, topic prefix, the aggregator's "
                                   "fingerprint to pin, the token, the broker's CA when it speaks TLS. Hand it to "
                                   "the device out of band; the app loads it with ProvisioningBundle.load.")
    p.add_argument("device_id", metavar="DEVICE_ID", help="the device's id (letters, digits, '.', '_', '-')")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the bundle")
    p.add_argument("--broker-url", help="how devices reach the broker, if not the aggregator's mqtt_url")
    p.add_argument("--mqtt-username", help="the device's broker account, if the broker has per-device accounts")
    p.add_argument("--mqtt-password", help="... and its password")
    add_state_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.keyring import key_path
    from aggregator.provisioning import provision_device
    from edge_sdk.protocol.identity import Identity

    out = Path(args.out)
    if out.exists():
        print(f"fedaigc provision: {out} exists; not overwriting a bundle", file=sys.stderr)
        return 2
    config, store = open_state(args)
    try:
        identity = Identity.load_or_generate(key_path(config.state_dir, config.role))
        bundle = provision_device(store, identity, config, args.device_id, broker_url=args.broker_url,
                                  mqtt_username=args.mqtt_username, mqtt_password=args.mqtt_password)
    except (ValueError, OSError) as e:
        print(f"fedaigc provision: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    bundle.save(out)
    print(f"provisioned {bundle.device_id}: {out} (aggregator fingerprint {bundle.aggregator_fingerprint})",
          file=sys.stderr)
    return 0
