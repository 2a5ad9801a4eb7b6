"""``fedaigc``: one command line for operators, app developers and benchmarks.

One module per command (``register`` adds its parser, ``run`` runs it), each importing what
it needs when it runs, so ``fedaigc --help`` is instant and the daemon never imports the
export toolchain.
"""

from __future__ import annotations

import argparse
import logging

from aggregator.cli import (
    adapters,
    bench,
    broker,
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

COMMANDS = (demo, daemon, status, provision, revoke, rotate_key, broker, rollout, export, adapters, bench, pretrain,
            train_central)
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
    return int(args.func(args) or 0)
