"""The foundation: base model quality vs centrally trained adapters, and pretraining time.

    python -m benchmarks.central [--quick | --smoke] [--pretrain] [--out DIR]

Trains one LoRA adapter per style on the pooled data of all personas of that style (the
upper bound a federation should approach) and scores base and adapters on the personas'
held-out prompts. ``pretrain_seconds`` is the wall time recorded by ``fedaigc pretrain``
for the shipped weights (``models/digits/weights/base/pretrain.json``); ``--pretrain`` re-runs
pretraining here and times it (~15-30 min on 2 cores); without either, the first
``--pretrain-steps`` steps of the same pretraining are timed and extrapolated (and said so). Writes
benchmarks/results/central.json and central.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._results import ROOT, Output, add_arguments  # noqa: E402
from models.digits.pretrain import central_report, pretrain_base  # noqa: E402
from models.digits.unet import BASE_MODEL_DIR  # noqa: E402
from models.training import TrainConfig  # noqa: E402


def pretrain_time(full: TrainConfig, rerun: bool, steps: int) -> tuple[float, str]:
    """Seconds of the whole pretraining, and where the figure comes from (measured, recorded or extrapolated)."""
    record = BASE_MODEL_DIR / "pretrain.json"
    if rerun:
        return pretrain_base(train=full, progress=True).seconds, "measured by this run"
    if record.exists():
        return json.loads(record.read_text())["seconds"], f"{record.relative_to(ROOT)} (fedaigc pretrain)"
    timed = pretrain_base(train=replace(full, steps=steps), progress=True).seconds
    return timed * full.steps / steps, (f"extrapolated: the first {steps} of {full.steps} steps took {timed:.1f} s "
                                        "(setup included, so this slightly overestimates)")


def plot(result: dict, out: Output) -> None:
    per = result["per_style"]
    styles = sorted(per)
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
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    parser.add_argument("--pretrain", action="store_true", help="re-run pretraining and time it")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--styles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="steps to time when extrapolating the pretraining time (default: 150)")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "central")
    if args.smoke and args.pretrain:
        parser.error("--pretrain times the whole pretraining, which a --smoke run must not")
    started = time.monotonic()
    full = TrainConfig(steps=3000, batch_size=64, lr=2e-3, seed=0)
    if args.smoke:
        clients, styles, steps, samples, pretrain_steps = 2, 2, 2, 4, 10
    else:
        clients, styles, pretrain_steps = args.clients, args.styles, args.pretrain_steps
        steps, samples = (100, 32) if args.quick else (args.steps, 64)
    pretrain_seconds, pretrain_source = pretrain_time(full, args.pretrain, pretrain_steps)
    report = central_report(clients, styles, seed=0, steps=steps, samples=samples)
    per = report["per_style"]
    mean = lambda which, key: float(np.mean([per[s][which][key] for s in per]))  # noqa: E731
    result = report | {
        "base_style_acc": mean("base", "style_acc"), "base_digit_acc": mean("base", "digit_acc"),
        "base_frechet": mean("base", "frechet"),
        "central_style_acc": mean("central", "style_acc"), "central_digit_acc": mean("central", "digit_acc"),
        "central_frechet": mean("central", "frechet"),
        "pretrain_seconds": pretrain_seconds, "pretrain_seconds_source": pretrain_source,
        "seconds": time.monotonic() - started,
    }
    out.write(result)
    plot(result, out)
    print(json.dumps({k: v for k, v in result.items() if k != "per_style"}, indent=2))


if __name__ == "__main__":
    main()
