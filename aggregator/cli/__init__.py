"""``fedaigc``: one command line for operators, app developers and benchmarks.

One module per command (``register`` adds its parser, ``run`` runs it), each importing what
it needs when it runs, so ``fedaigc --help`` is instant and the daemon never imports the
export toolchain.

An operator's mistake (a wrong setting, a broker that refuses, a corrupt store or key, a busy
port) is one line on stderr and exit 2, from every command, here; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aggregator.cli import (
    adapters,
    bench,
    broker,
    broker_config,
    daemon,
    demo,
    export,
    pretrain,
    provision,
    revoke,
    rollout,
    rotate_key,
    status,
    train_central,
)

COMMANDS = (demo, daemon, status, provision, revoke, rotate_key, broker, broker_config, rollout, export, adapters,
            bench, pretrain, train_central)
QUIET_LOGGERS = ("amqtt", "transitions", "torchao", "httpx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedaigc", description="One command line for operators, app developers "
                                     "and benchmarks of fedaigc.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not isinstance(e, operator_errors()):
            raise
        print(f"fedaigc {args.command}: {one_line(e)}", file=sys.stderr)
        return 2


def operator_errors() -> tuple[type[Exception], ...]:
    """What an operator causes and can fix; imported when one is raised (the commands load them anyway)."""
    from aggregator.metrics import MetricsUnavailable
    from aggregator.settings import ConfigError
    from aggregator.state import StateUnavailable
    from edge_sdk.protocol.identity import KeyFileError
    from edge_sdk.transport import BrokerUnavailable

    return ConfigError, StateUnavailable, BrokerUnavailable, KeyFileError, MetricsUnavailable


def one_line(e: Exception) -> str:
    """A library's multi-line message (PostgreSQL's hints) joined into one line."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
