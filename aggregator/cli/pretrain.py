"""``fedaigc pretrain``: rebuild the bundled digits base model, deterministically."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    from models.digits.paths import BASE_MODEL_DIR

    p = sub.add_parser("pretrain", help="rebuild the shipped base denoiser on unstyled public digits",
                       description="Train the unstyled base UNet from scratch (deterministic) and save it.")
    p.add_argument("--out", default=str(BASE_MODEL_DIR), help="directory to write (default: the shipped model)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", default="16,32", help="UNet block widths, comma-separated (default: 16,32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.digits.pretrain import pretrain_base
    from models.digits.unet import UNetConfig
    from models.training import TrainConfig

    blocks = tuple(int(b) for b in args.blocks.split(","))
    result = pretrain_base(
        UNetConfig(block_out_channels=blocks),
        TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        progress=True,
    )
    out = Path(args.out)
    result.unet.save_pretrained(out, safe_serialization=True)
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
               "seconds": round(result.seconds, 1),
               "final_loss": sum(result.losses[-100:]) / max(1, len(result.losses[-100:]))}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0
