"""``fedaigc provision``: a device's one-time token and the bundle that carries it to the device."""

from __future__ import annotations

import argparse
import secrets
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
    account = p.add_mutually_exclusive_group()
    account.add_argument("--broker-passwd", metavar="FILE", help="give the device a broker account of its own in this "
                         "Mosquitto password file (`fedaigc broker-config` wrote it): user name = DEVICE_ID, a "
                         "generated password, both in the bundle; reload the broker (SIGHUP) to let it in")
    account.add_argument("--mqtt-username", help="the device's broker account, made some other way")
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
    username, password = args.mqtt_username, args.mqtt_password
    if args.broker_passwd is not None:
        username, password = args.device_id, secrets.token_urlsafe(24)
    try:
        identity = Identity.load_or_generate(key_path(config.state_dir, config.role))
        bundle = provision_device(store, identity, config, args.device_id, broker_url=args.broker_url,
                                  mqtt_username=username, mqtt_password=password)
        if args.broker_passwd is not None:
            from aggregator.broker_auth import add_broker_user

            add_broker_user(Path(args.broker_passwd), args.device_id, password)
    except (ValueError, OSError) as e:
        print(f"fedaigc provision: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    bundle.save(out)
    print(f"provisioned {bundle.device_id}: {out} (aggregator fingerprint {bundle.aggregator_fingerprint})"
          + (f"; its broker account is in {args.broker_passwd}: reload the broker (SIGHUP)" if args.broker_passwd
             else ""), file=sys.stderr)
    return 0
