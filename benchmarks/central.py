"""The foundation: base model quality vs centrally trained adapters, and pretraining time.

    python -m benchmarks.central [--quick] [--pretrain]

Trains one LoRA adapter per style on the pooled data of all personas of that style (the
upper bound a federation should approach) and scores base and adapters on the personas'
held-out prompts. ``pretrain_seconds`` is the wall time recorded by ``fedaigc pretrain``
for the shipped weights (``models/weights/base/pretrain.json``); ``--pretrain`` re-runs
pretraining here and times it (~15-30 min on 2 cores); without either, the first
``--pretrain-steps`` steps of the same pretraining are timed and extrapolated (and said so). Writes
benchmarks/results/central.json and central.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.digits.pretrain import central_report, pretrain_base  # noqa: E402
from models.digits.unet import BASE_MODEL_DIR  # noqa: E402
from models.training import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    parser.add_argument("--pretrain", action="store_true", help="re-run pretraining and time it")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--styles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="steps to time when extrapolating the pretraining time (default: 150)")
    args = parser.parse_args()
    started = time.monotonic()
    record = BASE_MODEL_DIR / "pretrain.json"
    full = TrainConfig(steps=3000, batch_size=64, lr=2e-3, seed=0)
    if args.pretrain:
        pretrain_seconds = pretrain_base(train=full, progress=True).seconds
        pretrain_source = "measured by this run"
    elif record.exists():
        pretrain_seconds = json.loads(record.read_text())["seconds"]
        pretrain_source = "models/weights/base/pretrain.json (fedaigc pretrain)"
    else:
        timed = pretrain_base(train=replace(full, steps=args.pretrain_steps), progress=True).seconds
        pretrain_seconds = timed * full.steps / args.pretrain_steps
        pretrain_source = (f"extrapolated: the first {args.pretrain_steps} of {full.steps} steps took {timed:.1f} s "
                           "(setup included, so this slightly overestimates)")
    report = central_report(args.clients, args.styles, seed=0, steps=100 if args.quick else args.steps,
                            samples=32 if args.quick else 64)
    per = report["per_style"]
    styles = sorted(per)
    mean = lambda which, key: float(np.mean([per[s][which][key] for s in styles]))  # noqa: E731
    result = report | {
        "base_style_acc": mean("base", "style_acc"), "base_digit_acc": mean("base", "digit_acc"),
        "base_frechet": mean("base", "frechet"),
        "central_style_acc": mean("central", "style_acc"), "central_digit_acc": mean("central", "digit_acc"),
        "central_frechet": mean("central", "frechet"),
        "pretrain_seconds": pretrain_seconds, "pretrain_seconds_source": pretrain_source,
        "seconds": time.monotonic() - started,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "central.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    x = np.arange(len(styles))
    for ax, key, title in zip(axes, ("style_acc", "digit_acc", "frechet"),
                              ("style accuracy", "digit accuracy", "Fréchet distance (log)")):
        ax.bar(x - 0.2, [per[s]["base"][key] for s in styles], 0.4, label="base model")
        ax.bar(x + 0.2, [per[s]["central"][key] for s in styles], 0.4, label="central adapter")
        ax.set_xticks(x, styles, rotation=30, fontsize=8)
        ax.set_title(title)
        if key == "frechet":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "central.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "per_style"}, indent=2))


if __name__ == "__main__":
    main()
