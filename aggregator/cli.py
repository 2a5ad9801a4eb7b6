"""``fedaigc``: one command line for operators, app developers and benchmarks.

Every subcommand imports what it needs lazily, so ``fedaigc --help`` is instant and the
aggregator daemon never imports the export toolchain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from models.pretrain import pretrain_base
    from models.training import TrainConfig
    from models.unet import UNetConfig

    blocks = tuple(int(b) for b in args.blocks.split(","))
    result = pretrain_base(
        UNetConfig(block_out_channels=blocks),
        TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        progress=True,
    )
    out = Path(args.out)
    result.unet.save_pretrained(out, safe_serialization=True)
    summary = {"out": str(out), "steps": args.steps, "seconds": round(result.seconds, 1),
               "final_loss": sum(result.losses[-100:]) / max(1, len(result.losses[-100:]))}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.unet import BASE_MODEL_DIR

    parser = argparse.ArgumentParser(prog="fedaigc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pretrain", help="rebuild the shipped base denoiser on unstyled public digits",
                       description="Train the unstyled base UNet from scratch (deterministic) and save it.")
    p.add_argument("--out", default=str(BASE_MODEL_DIR), help="directory to write (default: the shipped model)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", default="16,32", help="UNet block widths, comma-separated (default: 16,32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
