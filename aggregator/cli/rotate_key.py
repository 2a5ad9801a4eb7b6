"""``fedaigc rotate-key``: a new aggregator key, handed over by the current one so pinned devices follow."""

from __future__ import annotations

import argparse
import sys

from aggregator.cli._credentials import add_state_arguments, open_state


def register(sub) -> None:
    p = sub.add_parser("rotate-key", help="replace the aggregator's key with a signed hand-over devices follow",
                       description="Make a new aggregator key; the current key signs the hand-over, which the "
                                   "daemon announces with its keys (a running daemon within a second). Devices "
                                   "pinned to the old key verify it and pin the new one; bundles provisioned from "
                                   "now on carry the new fingerprint. The old key still opens what devices sealed "
                                   "to it for --grace-s seconds.")
    p.add_argument("--grace-s", type=float, default=None, metavar="S",
                   help="keep the retired key this long for messages sealed to it (default: 3600)")
    add_state_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.keyring import DEFAULT_GRACE_S, key_path, rotate_key

    config, store = open_state(args)
    if config.role == "cloud":
        print("fedaigc rotate-key: the cloud's key cannot be handed over yet (edges pin it); "
              "re-provision the edges instead", file=sys.stderr)
        store.close()
        return 2
    try:
        old, new = rotate_key(key_path(config.state_dir, config.role), store,
                              DEFAULT_GRACE_S if args.grace_s is None else args.grace_s)
    finally:
        store.close()
    print(f"aggregator key {old} handed over to {new}; a running daemon announces it within a second",
          file=sys.stderr)
    return 0
