"""On-device training through ExecuTorch vs the eager trainer: loss curves and seconds per step.

    python -m benchmarks.export_training [--quick]

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

Writes benchmarks/results/export_training.json and export_training.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STYLE, BATCH = "framed", 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--steps", type=int, help="training steps (default 40, --quick 12)")
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 40)
    torch.set_num_threads(1)
    from edge_sdk.artifacts.inference import set_runtime_threads
    from edge_sdk.artifacts.training import ExecuTorchTrainer
    from export_tools.training import eager_unet, export_training
    from models.digits.data import make_personas
    from models.digits.unet import load_base_unet
    from models.lora import get_adapter_state, lora_config
    from models.text import PromptEncoder
    from models.training import LORA_LR, TrainConfig, evaluation_loss, train_denoiser

    set_runtime_threads(1)
    lora = lora_config()
    base = load_base_unet()
    work = Path(tempfile.mkdtemp(prefix="fedaigc-export-training-"))
    started = time.perf_counter()
    manifest = export_training(base, work, lora=lora, batch=BATCH)
    export_seconds = time.perf_counter() - started
    print(f"exported in {export_seconds:.0f} s", flush=True)

    persona = make_personas(1, 1, seed=0, styles=[STYLE])[0]
    encode = PromptEncoder().encode
    images = persona.train_images
    encodings = torch.as_tensor(encode(list(persona.train_prompts)), dtype=torch.float32)
    test_images = persona.test_images
    test_encodings = torch.as_tensor(encode(list(persona.test_prompts)), dtype=torch.float32)
    config = TrainConfig(steps=steps, batch_size=BATCH, lr=LORA_LR, seed=0)

    eager = eager_unet(base, lora)
    start = get_adapter_state(eager, "slot")
    held_out_before = evaluation_loss(eager, test_images, test_encodings)
    started = time.perf_counter()
    eager_losses = train_denoiser(eager, [p for p in eager.parameters() if p.requires_grad], images, encodings, config)
    eager_seconds = time.perf_counter() - started
    eager_state = get_adapter_state(eager, "slot")
    print(f"eager: {eager_seconds / steps:.3f} s/step", flush=True)

    trainer = ExecuTorchTrainer(work, threads=1)
    trainer.set_adapter(start)
    started = time.perf_counter()
    et_losses = trainer.train(images, encodings, config)
    et_seconds = time.perf_counter() - started
    et_state = trainer.adapter_state()
    print(f"executorch: {et_seconds / steps:.3f} s/step", flush=True)

    held_out = {"before": held_out_before,
                "eager": evaluation_loss(eager_unet(base, lora, eager_state), test_images, test_encodings),
                "executorch": evaluation_loss(eager_unet(base, lora, et_state), test_images, test_encodings)}
    files = {name: entry["bytes"] for name, entry in manifest.files.items()}
    window = max(1, steps // 4)
    result = {
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
        "files_bytes": files,
        "export_seconds": export_seconds,
        "notes": manifest.notes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_training.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "export_training.png")
    keys = ("max_step_loss_abs_diff", "adapter_max_abs_diff", "held_out_loss", "seconds_per_step",
            "executorch_step_ratio_vs_eager")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


def plot(result: dict, path: Path) -> None:
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
