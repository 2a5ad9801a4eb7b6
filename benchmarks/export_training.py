"""On-device training through ExecuTorch vs the eager trainer: loss curves and seconds per step.

    python -m benchmarks.export_training [--quick | --smoke] [--out DIR]

1. The shipped base UNet's LoRA training step (rank 2 on the default targets, batch 16)
   is exported with ``export_tools.training.export_training`` (joint forward–backward,
   base and adapter as external data); the manifest records step-1 parity and the
   interleaved forward+backward latency.
2. One styled-digit persona ("framed") trains a fresh adapter for N steps twice from the
   same seed, data, noise and timesteps (``models.training.train_steps``): eager autograd
   (``train_denoiser``) and the exported program (``ExecuTorchTrainer``), AdamW at
   ``LORA_LR`` with gradient clipping both ways, one thread each.
3. Both loss curves, their largest per-step difference, the trained adapters' difference,
   the held-out denoising loss before/after (``evaluation_loss``, eager network, each
   trained adapter) and whole-step seconds (data draws + forward/backward + AdamW).

``--smoke`` trains two steps and times the exported step once (the export itself is most of its
time). Writes benchmarks/results/export_training.json and export_training.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._results import Output, add_arguments

STYLE, BATCH = "framed", 16


def persona_data(backend):
    """The "framed" persona's training and held-out samples with their prompts' conditioning."""
    from models.digits.data import make_personas

    persona = make_personas(1, 1, seed=0, styles=[STYLE])[0]
    return (backend.encode_images(persona.train_images), backend.encode_prompts(list(persona.train_prompts)),
            backend.encode_images(persona.test_images), backend.encode_prompts(list(persona.test_prompts)))


def measure(work: Path, steps: int, latency_reps: int) -> dict:
    """Export the training step, train the same adapter eagerly and through the program, compare."""
    from edge_sdk.artifacts.inference import set_runtime_threads
    from edge_sdk.artifacts.training import ExecuTorchTrainer
    from export_tools.training import eager_unet, export_training
    from models.digits.backend import DigitsBackend
    from models.lora import get_adapter_state, lora_config
    from models.training import LORA_LR, TrainConfig, evaluation_loss, train_denoiser

    torch.set_num_threads(1)
    set_runtime_threads(1)
    lora = lora_config()
    backend = DigitsBackend.from_pretrained()
    base = backend.denoiser
    started = time.perf_counter()
    manifest = export_training(backend, work, lora=lora, batch=BATCH, latency_reps=latency_reps)
    export_seconds = time.perf_counter() - started
    print(f"exported in {export_seconds:.0f} s", flush=True)

    images, encodings, test_images, test_encodings = persona_data(backend)
    config = TrainConfig(steps=steps, batch_size=BATCH, lr=LORA_LR, seed=0)

    eager = DigitsBackend(eager_unet(base, lora))
    start = get_adapter_state(eager.denoiser, "slot")
    held_out_before = evaluation_loss(eager, test_images, test_encodings)
    started = time.perf_counter()
    eager_losses = train_denoiser(eager, [p for p in eager.denoiser.parameters() if p.requires_grad], images,
                                  encodings, config)
    eager_seconds = time.perf_counter() - started
    eager_state = get_adapter_state(eager.denoiser, "slot")
    print(f"eager: {eager_seconds / steps:.3f} s/step", flush=True)

    trainer = ExecuTorchTrainer(work, threads=1)
    trainer.set_adapter(start)
    started = time.perf_counter()
    et_losses = trainer.train(backend, images, encodings, config)
    et_seconds = time.perf_counter() - started
    et_state = trainer.adapter_state()
    print(f"executorch: {et_seconds / steps:.3f} s/step", flush=True)

    held_out = {"before": held_out_before, **{
        name: evaluation_loss(DigitsBackend(eager_unet(base, lora, state)), test_images, test_encodings)
        for name, state in (("eager", eager_state), ("executorch", et_state))}}
    window = max(1, steps // 4)
    return {
        "style": STYLE, "steps": steps, "batch": BATCH, "lora_rank": lora.r, "lr": LORA_LR, "threads": 1,
        "cpu_note": "measured on a shared 2-core x86 CPU, not on the devices",
        "loss_curves": {"eager": eager_losses, "executorch": et_losses},
        "max_step_loss_abs_diff": max(abs(a - b) for a, b in zip(eager_losses, et_losses)),
        "adapter_max_abs_diff": max(float((et_state[k] - eager_state[k]).abs().max()) for k in et_state),
        "first_window_mean_loss": {"eager": sum(eager_losses[:window]) / window,
                                   "executorch": sum(et_losses[:window]) / window},
        "last_window_mean_loss": {"eager": sum(eager_losses[-window:]) / window,
                                  "executorch": sum(et_losses[-window:]) / window},
        "held_out_loss": held_out,
        "seconds_per_step": {"eager": eager_seconds / steps, "executorch": et_seconds / steps},
        "executorch_step_ratio_vs_eager": et_seconds / eager_seconds,
        "forward_backward_interleaved": manifest.latency,
        "step1_parity": manifest.parity,
        "files_bytes": {name: entry["bytes"] for name, entry in manifest.files.items()},
        "export_seconds": export_seconds,
        "notes": manifest.notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--steps", type=int, help="training steps (default 40, --quick 12, --smoke 2)")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "export_training")
    steps = args.steps or (2 if args.smoke else 12 if args.quick else 40)
    with tempfile.TemporaryDirectory(prefix="fedaigc-export-training-") as work:
        result = measure(Path(work), steps, latency_reps=1 if args.smoke else 5)
    out.write(result)
    plot(result, out)
    keys = ("max_step_loss_abs_diff", "adapter_max_abs_diff", "held_out_loss", "seconds_per_step",
            "executorch_step_ratio_vs_eager")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


def plot(result: dict, out: Output) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, speed) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    for name, style in (("eager", "-"), ("executorch", "--")):
        curves.plot(range(1, result["steps"] + 1), result["loss_curves"][name], style, label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("denoising loss (batch)")
    curves.set_title(f"LoRA training, '{result['style']}' persona, same seed and data")
    curves.legend()
    seconds = result["seconds_per_step"]
    speed.bar(list(seconds), list(seconds.values()), color=["tab:blue", "tab:orange"])
    speed.set_ylabel("seconds per step (1 thread)")
    speed.set_title(f"ExecuTorch / eager = {result['executorch_step_ratio_vs_eager']:.1f}x")
    out.save_figure(fig)


if __name__ == "__main__":
    main()
