"""``fedaigc train-central``: the centralized upper bound, one adapter per style on pooled data."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("train-central", help="train one adapter per style on pooled persona data (upper bound)",
                       description="Centralized baseline: one LoRA per style on all personas' data; prints quality.")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--styles", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.digits.pretrain import central_report

    print(json.dumps(central_report(args.clients, args.styles, args.seed, args.steps), indent=2))
    return 0
