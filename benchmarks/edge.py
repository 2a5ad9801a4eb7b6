"""On-device training cost: full fine-tuning vs LoRA on fp32 vs LoRA on an int8 base.

    python -m benchmarks.edge [--quick]

Modes: full fine-tuning (fp32), LoRA on an fp32 base, LoRA on an int8 base, and LoRA on an
int8 base with gradient checkpointing (the raspberry-pi-4 profile's setting).

Memory: each (size, mode) runs in a fresh subprocess; its training memory is the peak
RSS during training minus the RSS with the model loaded in its training form (so the
torch runtime, ~300 MB, cancels out); weights are reported separately. Step time: all
modes of a size are timed in one process, interleaved, and reported with their ratio
to full fp32 fine-tuning. Sizes: the demo UNet (0.37M) and a >= 25M-parameter UNet where
weights, gradients and optimizer state dominate as in real diffusion models; plus the
analytic figure for a Stable-Diffusion-1.5-sized UNet (860M, counted on the meta device).
Writes benchmarks/results/edge.json and edge.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "small": {"blocks": (16, 32), "layers": 1, "groups": 8, "batch": 16},
    "large": {"blocks": (64, 128, 256), "layers": 2, "groups": 32, "batch": 8},
}
MODES = ("full_fp32", "lora_fp32", "lora_int8", "lora_int8_ckpt")


def build(size: str, mode: str):
    from edge_sdk.quantize import quantize_base
    from models.digits.unet import UNetConfig, build_unet, load_base_unet
    from models.lora import add_adapter, lora_config, set_mix

    s = SIZES[size]
    unet = load_base_unet() if size == "small" else build_unet(
        UNetConfig(block_out_channels=s["blocks"], layers_per_block=s["layers"], norm_num_groups=s["groups"]), seed=0)
    if mode == "full_fp32":
        unet.requires_grad_(True)
        return unet, list(unet.parameters())
    if mode.startswith("lora_int8"):
        quantize_base(unet)
    if mode.endswith("_ckpt"):  # what the raspberry-pi-4 profile does: recompute activations in backward
        unet.enable_gradient_checkpointing()
    unet.requires_grad_(False)
    add_adapter(unet, "a", lora_config())
    set_mix(unet, {"a": 1.0})
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return unet, params


def data(batch: int):
    from models.digits.data import make_personas
    from models.text import PromptEncoder

    p = make_personas(1, 1, seed=0, styles=["framed"])[0]
    enc = torch.from_numpy(PromptEncoder().encode(list(p.train_prompts)))
    return p, p.train_images, enc


class PeakRss:
    """Samples this process's RSS every millisecond on a thread; ``peak_mb`` is the maximum seen."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak_mb = self.now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


def worker(size: str, mode: str, steps: int) -> dict:
    """Runs in its own process: measure training memory above the loaded model."""
    from edge_sdk.memory import estimate_training_bytes
    from edge_sdk.quantize import weight_bytes
    from models.training import TrainConfig, train_denoiser

    torch.set_num_threads(2)
    persona, images, enc = data(SIZES[size]["batch"])
    unet, params = build(size, mode)
    total = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
    trainable = sum(p.numel() for p in params)
    gc.collect()
    with PeakRss() as rss:
        loaded = rss.now_mb()
        train_denoiser(unet, params, images, enc, TrainConfig(steps=steps, batch_size=SIZES[size]["batch"], lr=1e-3))
    return {"weights_mb": weight_bytes(unet) / 2**20, "rss_loaded_mb": loaded,
            "train_mem_mb": rss.peak_mb - loaded,
            "estimate_mb": (estimate_training_bytes(unet, SIZES[size]["batch"]) - weight_bytes(unet)) / 2**20,
            "params": total, "trainable": trainable, "trainable_share": trainable / total}


def time_modes(size: str, steps: int) -> dict:
    """All modes of a size in this process, interleaved: step-time ratios are comparable."""
    from models.training import TrainConfig, train_denoiser

    persona, images, enc = data(SIZES[size]["batch"])
    built = {m: build(size, m) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(steps):
        for m in MODES:
            unet, params = built[m]
            start = time.perf_counter()
            train_denoiser(unet, params, images, enc, TrainConfig(steps=1, batch_size=SIZES[size]["batch"], lr=1e-4,
                                                                  seed=rep))
            if rep > 0:  # the first step pays one-off allocation costs
                times[m].append(time.perf_counter() - start)
    return {m: statistics.median(v) for m, v in times.items()}


def quality_after_one_round(steps: int) -> dict:
    """Style/digit accuracy of the demo UNet after one local round of each mode on one persona."""
    from models.digits.evaluate import evaluate_personas
    from models.training import LORA_LR, TrainConfig, train_denoiser

    out = {}
    for m in MODES:
        persona, images, enc = data(SIZES["small"]["batch"])
        unet, params = build("small", m)
        train_denoiser(unet, params, images, enc, TrainConfig(steps=steps, batch_size=16, lr=LORA_LR if "lora" in m else 1e-3))
        out[m] = evaluate_personas(unet, [persona], samples=32, seed=0, steps=10)
    return out


def sd15_analytic() -> dict:
    """Training memory of an SD-1.5-sized UNet from parameter counts (weights, grads, AdamW)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280),
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                    cross_attention_dim=768, attention_head_dim=8)
    total = sum(p.numel() for p in unet.parameters())
    linear = sum(p.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))
    gb = 1024**3
    lora = 0.01 * total  # a rank-8 attention/conv LoRA is ~1% of SD-1.5
    full = {"weights_gb": 4 * total / gb, "grads_gb": 4 * total / gb, "adam_gb": 8 * total / gb}
    lora_fp32 = {"weights_gb": 4 * total / gb, "grads_gb": 4 * lora / gb, "adam_gb": 8 * lora / gb}
    lora_int8 = {"weights_gb": (4 * (total - linear) + linear) / gb, "grads_gb": 4 * lora / gb, "adam_gb": 8 * lora / gb}
    return {"params": total, "linear_params": linear, "linear_share": linear / total,
            "full_fp32": full, "lora_fp32": lora_fp32, "lora_int8": lora_int8,
            "total_gb": {k: sum(v.values()) for k, v in (("full_fp32", full), ("lora_fp32", lora_fp32),
                                                           ("lora_int8", lora_int8))},
            "note": "activations excluded (they depend on resolution and batch); LoRA assumed 1% of parameters"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, mode, steps = args.worker
        print(json.dumps(worker(size, mode, int(steps))))
        return
    steps = 3 if args.quick else 8
    result: dict = {"sizes": {k: {**v, "blocks": list(v["blocks"])} for k, v in SIZES.items()}}
    for size in SIZES:
        entry: dict = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "benchmarks.edge", "--worker", size, mode, str(steps)],
                                 capture_output=True, text=True, check=True)
            entry[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(size, mode, entry[mode], flush=True)
        timing = time_modes(size, steps + 1)
        for mode in MODES:
            entry[mode]["step_seconds"] = timing[mode]
            entry[mode]["step_ratio_vs_full"] = timing[mode] / timing["full_fp32"]
        entry["mem_ratio_lora_int8_vs_full"] = entry["lora_int8"]["train_mem_mb"] / entry["full_fp32"]["train_mem_mb"]
        entry["mem_ratio_lora_int8_ckpt_vs_full"] = (entry["lora_int8_ckpt"]["train_mem_mb"]
                                                     / entry["full_fp32"]["train_mem_mb"])
        entry["total_mem_ratio_lora_int8_vs_full"] = (
            (entry["lora_int8"]["train_mem_mb"] + entry["lora_int8"]["weights_mb"])
            / (entry["full_fp32"]["train_mem_mb"] + entry["full_fp32"]["weights_mb"]))
        entry["trainable_share"] = entry["lora_int8"]["trainable_share"]
        entry["params"] = entry["full_fp32"]["params"]
        result[size] = entry
    result["quality_after_one_round"] = quality_after_one_round(20 if args.quick else 60)
    result["sd15_analytic"] = sd15_analytic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "edge.png")
    print(json.dumps({s: {k: result[s][k] for k in ("mem_ratio_lora_int8_vs_full", "mem_ratio_lora_int8_ckpt_vs_full",
                                                    "trainable_share", "params")}
                      for s in SIZES}, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, size in zip(axes[:2], SIZES):
        e = result[size]
        train = [e[m]["train_mem_mb"] for m in MODES]
        weights = [e[m]["weights_mb"] for m in MODES]
        ax.bar(MODES, weights, label="weights")
        ax.bar(MODES, train, bottom=weights, label="training (grads, optimizer, activations)")
        ax.set(ylabel="MB", title=f"{size}: {e['params'] / 1e6:.1f}M params")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].legend(fontsize=7)
    sd = result["sd15_analytic"]["total_gb"]
    axes[2].bar(list(sd), list(sd.values()), color="grey")
    axes[2].set(ylabel="GB (no activations)", title="SD-1.5 UNet, analytic")
    axes[2].tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
