"""``fedaigc revoke``: refuse a device from its next message on, or void the tokens issued for it."""

from __future__ import annotations

import argparse
import sys

from aggregator.cli._credentials import add_state_arguments, open_state


def register(sub) -> None:
    p = sub.add_parser("revoke", help="revoke a device, or the tokens issued for it",
                       description="--device: the device is refused (`revoked`) from its next message on, by a "
                                   "running daemon too, and its tokens with it; `fedaigc provision` readmits it with "
                                   "new keys. --token-of: void the tokens issued for the id (a bundle lost before "
                                   "use); an enrolled device stays enrolled.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", metavar="ID", help="revoke this device and its tokens")
    which.add_argument("--token-of", metavar="ID", help="revoke the tokens issued for this device id")
    p.add_argument("--broker-passwd", metavar="FILE", help="with --device: also remove its broker account from this "
                   "Mosquitto password file (reload the broker, SIGHUP, to disconnect it)")
    add_state_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _, store = open_state(args)
    try:
        if args.device is not None:
            if not store.revoke_device(args.device):
                print(f"fedaigc revoke: {args.device} was never enrolled (its tokens, if any, are revoked)",
                      file=sys.stderr)
                return 1
            if args.broker_passwd is not None:
                from pathlib import Path

                from aggregator.broker_auth import remove_broker_user

                remove_broker_user(Path(args.broker_passwd), args.device)
            print(f"revoked device {args.device}" + (f" and its broker account in {args.broker_passwd}: reload the "
                                                    "broker (SIGHUP)" if args.broker_passwd else ""), file=sys.stderr)
        else:
            n = store.revoke_tokens_of(args.token_of)
            print(f"revoked {n} token(s) of {args.token_of}", file=sys.stderr)
            return 0 if n else 1
    finally:
        store.close()
    return 0
