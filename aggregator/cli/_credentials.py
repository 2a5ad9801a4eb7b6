"""What the credential commands (provision, revoke, rotate-key) share: which aggregator's state they act on."""

from __future__ import annotations

import argparse

from aggregator.cli._common import load_config


def add_state_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="aggregator.toml: the aggregator's id, broker, state (default: the defaults)")
    p.add_argument("--state-dir", help="the aggregator's state directory, holding its key (default: the config's)")
    p.add_argument("--state", help="state store, if not the SQLite file in the state directory: a path or "
                                   "postgresql://...")


def open_state(args: argparse.Namespace, **overrides):
    """The aggregator's config and its state store, as the daemon itself opens them."""
    from aggregator.state import open_store

    config = load_config(args.config, state_dir=args.state_dir, state_url=args.state, **overrides)
    return config, open_store(config.store_url)
