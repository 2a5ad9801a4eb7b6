"""On-device training cost: full fine-tuning vs LoRA on fp32 vs LoRA on an int8 base, on real-size UNets.

    python -m benchmarks.edge [--quick | --smoke] [--out DIR]

Modes: full fine-tuning (fp32), LoRA on an fp32 base, LoRA on an int8 base (every Linear and
Conv2d but the first and last), and LoRA on an int8 base with gradient checkpointing (the
raspberry-pi-4 profile's setting). LoRA is rank 4 on the model's default targets.

Sizes: the bundled digits UNet (``small``), a 25M-parameter digits-style UNet (``large``), and
two published architectures built from their configs with random weights (nothing is
downloaded): BK-SDM-Tiny's UNet and Stable Diffusion 1.5's 860M-parameter UNet, one step at
batch 1 on 64x64 latents with 77-token CLIP conditioning (the latents are drawn at random: a
step's cost does not depend on their values). ``--smoke`` runs the digits UNet and the tiny
test pipeline (``tiny-sd``) for one step per worker (two interleaved, the first untimed).

Memory: each (size, mode) runs in a fresh subprocess; its training memory is the peak RSS
during training minus the RSS with the model loaded in its training form (the torch runtime
and the weights cancel out); weights are counted separately. Where full fine-tuning cannot fit
this machine (its weights, gradients and AdamW moments plus the activations LoRA on fp32 was
measured to keep, a lower bound), it is not run and the bound is reported. Step time: the
digits sizes time all modes in one process, interleaved (ratios comparable); the real-size
UNets time the steps after the first inside each worker. Each device profile's budget is
checked with the SDK's own estimate (``edge_sdk.memory``, what ``EdgeClient`` refuses a model
with): the largest batch each profile can train of each model. Writes
benchmarks/results/edge.json and edge.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import threading
import time

import torch

from benchmarks._results import Output, add_arguments

RANK = 4
SIZES = {
    "small": {"digits": None, "batch": 16},
    "large": {"digits": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "norm_num_groups": 32},
              "batch": 8},
    "tiny_sd": {"architecture": "tiny-sd", "batch": 1},
    "bk_sdm_tiny": {"architecture": "bk-sdm-tiny", "batch": 1},
    "sd15": {"architecture": "sd15", "batch": 1},
}
FULL_SIZES = ("small", "large", "bk_sdm_tiny", "sd15")
SMOKE_SIZES = ("small", "tiny_sd")
MODES = ("lora_fp32", "full_fp32", "lora_int8", "lora_int8_ckpt")  # lora_fp32 first: it bounds full fine-tuning


def build_backend(size: str):
    """The size's base model as a ``DiffusionBackend``, fp32, nothing trainable."""
    spec = SIZES[size]
    if "architecture" in spec:
        from models.architectures import ARCHITECTURES, random_parts
        from models.stable_diffusion import StableDiffusionBackend

        parts = random_parts(spec["architecture"], seed=0)
        return StableDiffusionBackend(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                      ARCHITECTURES[spec["architecture"]]["scheduler"])
    from models.digits.backend import DigitsBackend
    from models.digits.unet import UNetConfig, build_unet

    if spec["digits"] is None:
        return DigitsBackend.from_pretrained()
    return DigitsBackend(build_unet(UNetConfig(**spec["digits"]), seed=0))


def build(size: str, mode: str):
    """(backend, trainable parameters, base parameter count) of ``mode``: the denoiser prepared the way a
    device trains it (counted before quantizing, which turns weights into int8 buffers)."""
    from edge_sdk.quantize import quantize_base
    from models.lora import add_adapter, lora_config, set_mix

    backend = build_backend(size)
    unet = backend.denoiser
    base_params = sum(p.numel() for p in unet.parameters())
    if mode == "full_fp32":
        unet.requires_grad_(True)
        return backend, list(unet.parameters()), base_params
    if mode.startswith("lora_int8"):
        quantize_base(unet)
    if mode.endswith("_ckpt"):  # what the raspberry-pi-4 profile does: recompute activations in backward
        unet.enable_gradient_checkpointing()
    unet.requires_grad_(False)
    add_adapter(unet, "a", lora_config(RANK, target_modules=backend.default_targets))
    set_mix(unet, {"a": 1.0})
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return backend, params, base_params


def data(size: str, backend) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(samples, conditioning, persona or None): a digits persona's images, or random latents with real
    CLIP conditioning for a pipeline."""
    batch = SIZES[size]["batch"]
    if backend.family == "digits":
        from models.digits.data import make_personas

        p = make_personas(1, 1, seed=0, styles=["framed"])[0]
        return backend.encode_images(p.train_images), backend.encode_prompts(list(p.train_prompts)), p
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn((batch, *backend.sample_shape), generator=generator)
    return samples, backend.encode_prompts(["a watercolour fox in the snow"] * batch), None


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
    """Runs in its own process: training memory above the loaded model, step seconds, the SDK's estimate."""
    from edge_sdk.memory import activation_bytes_per_sample, estimate_training_bytes
    from edge_sdk.quantize import weight_bytes
    from models.training import TrainConfig, train_denoiser

    torch.set_num_threads(2)
    backend, params, total = build(size, mode)
    samples, conditioning, _ = data(size, backend)
    unet = backend.denoiser
    batch = SIZES[size]["batch"]
    trainable = sum(p.numel() for p in params)
    seconds: list[float] = []

    def step(seed: int) -> None:
        start = time.perf_counter()
        train_denoiser(backend, params, samples, conditioning, TrainConfig(steps=1, batch_size=batch, lr=1e-4,
                                                                           p_uncond=0.0, seed=seed))
        seconds.append(time.perf_counter() - start)

    gc.collect()
    with PeakRss() as rss:
        loaded = rss.now_mb()
        for s in range(steps):
            step(s)
    mb = 2**20
    return {"weights_mb": weight_bytes(unet) / mb,
            "all_parts_weights_mb": sum(weight_bytes(m) for m in backend.modules().values()) / mb,
            "rss_loaded_mb": loaded, "train_mem_mb": rss.peak_mb - loaded,
            "step_seconds": statistics.median(seconds[1:] or seconds),
            "estimate_mb": (estimate_training_bytes(backend, batch)  # like train_mem_mb: above every loaded weight
                            - sum(weight_bytes(m) for m in backend.modules().values())) / mb,
            "estimate_fixed_mb": estimate_training_bytes(backend, 0) / mb,
            "estimate_per_sample_mb": activation_bytes_per_sample(backend) / mb,
            "params": total, "trainable": trainable, "trainable_share": trainable / total,
            "adapter_bytes": 4 * trainable if mode != "full_fp32" else None}


class OutOfMemory(RuntimeError):
    """A worker was killed for memory or could not allocate: the mode does not fit this machine."""


def run_worker(size: str, mode: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.edge", "--worker", size, mode, str(steps)],
                          capture_output=True, text=True)
    if done.returncode == -9 or "MemoryError" in done.stderr or "can't allocate memory" in done.stderr:
        raise OutOfMemory(f"edge worker {size}/{mode} ran out of memory (exit {done.returncode})")
    if done.returncode != 0:
        raise RuntimeError(f"edge worker {size}/{mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_fine_tuning_bound_mb(params: int, lora_fp32: dict) -> float:
    """A lower bound on full fine-tuning's peak: fp32 weights, gradients and two AdamW moments, plus the
    activations LoRA on fp32 keeps (full fine-tuning keeps at least those)."""
    return 16 * params / 2**20 + lora_fp32["train_mem_mb"]


def time_modes(size: str, steps: int) -> dict:
    """All modes of a size in this process, interleaved: step-time ratios are comparable."""
    from models.training import TrainConfig, train_denoiser

    built = {m: build(size, m) for m in MODES}
    samples, conditioning, _ = data(size, built["lora_fp32"][0])
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(steps):
        for m in MODES:
            backend, params, _ = built[m]
            start = time.perf_counter()
            train_denoiser(backend, params, samples, conditioning,
                           TrainConfig(steps=1, batch_size=SIZES[size]["batch"], lr=1e-4, seed=rep))
            if rep > 0:  # the first step pays one-off allocation costs
                times[m].append(time.perf_counter() - start)
    return {m: statistics.median(v) for m, v in times.items()}


def measure_size(size: str, steps: int, machine_mb: float) -> dict:
    """Every mode's memory (a fresh process each) and step time, and the ratios the issue asks for."""
    entry: dict = {}
    for mode in MODES:
        if mode == "full_fp32":
            bound = full_fine_tuning_bound_mb(entry["lora_fp32"]["params"], entry["lora_fp32"])
            bound_text = (f"lower bound {bound / 1024:.1f} GiB: 16 bytes per parameter (fp32 weights, gradients, "
                          f"two AdamW moments) plus the training memory measured for LoRA on fp32")
            why = (f"not run: {bound_text}, over 80% of this machine's {machine_mb / 1024:.0f} GiB"
                   if bound > 0.8 * machine_mb else None)
            if why is None:
                try:
                    entry[mode] = run_worker(size, mode, steps)
                except OutOfMemory as e:
                    why = f"{e}; {bound_text}"
            if why is not None:
                entry |= {"full_does_not_fit": True, "full_bound_mb": bound, "full_bound": why}
                print(f"{size} full_fp32: does not fit: {why}", file=sys.stderr, flush=True)
                continue
        else:
            entry[mode] = run_worker(size, mode, steps)
        print(f"{size} {mode}: train {entry[mode]['train_mem_mb']:.0f} MB, weights {entry[mode]['weights_mb']:.0f} MB,"
              f" {entry[mode]['step_seconds']:.2f} s/step", file=sys.stderr, flush=True)
    if "digits" in SIZES[size]:
        timing = time_modes(size, steps + 1)
        for mode in MODES:
            entry[mode]["step_seconds_interleaved"] = timing[mode]
            entry[mode]["step_ratio_vs_full"] = timing[mode] / timing["full_fp32"]

    def peak(mode: str) -> float:  # what the denoiser costs while training: its weights plus the step's memory
        return entry[mode]["weights_mb"] + entry[mode]["train_mem_mb"]

    lora = entry["lora_int8"]
    entry |= {
        "params": lora["params"], "trainable_share": lora["trainable_share"], "adapter_bytes": lora["adapter_bytes"],
        "weights_ratio_int8_vs_fp32": lora["weights_mb"] / entry["lora_fp32"]["weights_mb"],
        "mem_ratio_lora_int8_vs_lora_fp32": peak("lora_int8") / peak("lora_fp32"),
        "train_mem_ratio_lora_int8_vs_lora_fp32": lora["train_mem_mb"] / entry["lora_fp32"]["train_mem_mb"],
        "step_seconds_lora_int8_ckpt": entry["lora_int8_ckpt"]["step_seconds"],
    }
    full_peak = entry["full_bound_mb"] if entry.get("full_does_not_fit") else peak("full_fp32")
    entry["mem_ratio_lora_int8_ckpt_vs_full"] = peak("lora_int8_ckpt") / full_peak
    entry["mem_ratio_lora_int8_vs_full"] = peak("lora_int8") / full_peak
    if entry.get("full_does_not_fit"):
        entry["mem_ratio_note"] = "against the lower bound on full fine-tuning: the true ratios are smaller"
    return entry


def profile_fits(result: dict, sizes) -> dict:
    """For each device profile and model: the largest batch the SDK's estimate lets it train in its budget."""
    from edge_sdk.config import PROFILES

    table: dict = {}
    for profile in PROFILES.values():
        mode = ("lora_int8" if profile.quantization == "int8" else "lora_fp32") + (
            "_ckpt" if profile.gradient_checkpointing else "")
        row = {}
        for size in sizes:
            e = result[size].get(mode)
            if e is None:  # lora_fp32_ckpt is not measured: bound it by lora_fp32
                e = result[size]["lora_fp32"]
            spare = profile.memory_budget_mb - e["estimate_fixed_mb"]
            row[size] = {"mode": mode, "max_batch": max(0, math.floor(spare / e["estimate_per_sample_mb"])),
                         "needs_mb_at_batch_1": e["estimate_fixed_mb"] + e["estimate_per_sample_mb"]}
        table[profile.name] = {"budget_mb": profile.memory_budget_mb, "models": row}
    return table


def quality_after_one_round(steps: int, samples: int) -> dict:
    """Style/digit accuracy of the demo UNet after one local round of each mode on one persona."""
    from models.digits.evaluate import evaluate_personas
    from models.training import LORA_LR, TrainConfig, train_denoiser

    out = {}
    for m in MODES:
        backend, params, _ = build("small", m)
        samples_, conditioning, persona = data("small", backend)
        train_denoiser(backend, params, samples_, conditioning,
                       TrainConfig(steps=steps, batch_size=16, lr=LORA_LR if "lora" in m else 1e-3))
        out[m] = evaluate_personas(backend.denoiser, [persona], samples=samples, seed=0, steps=10)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                        help="measure only these sizes (the others are kept from the previous result)")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "STEPS"), help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        size, mode, steps = args.worker
        print(json.dumps(worker(size, mode, int(steps))))
        return
    import psutil

    out = Output.of(parser, args, "edge")
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else FULL_SIZES)
    previous = out.previous() if args.sizes and not args.smoke else None
    steps, quality_steps, samples = (1, 1, 4) if args.smoke else (3, 20, 32) if args.quick else (4, 60, 32)
    machine_mb = psutil.virtual_memory().total / 2**20
    result: dict = {k: v for k, v in (previous or {}).items() if k in SIZES or k == "quality_after_one_round"}
    result["rank"] = RANK
    result["sizes"] = {k: SIZES[k] for k in (*sizes, *[s for s in result if s in SIZES and s not in sizes])}
    result["machine_mb"] = machine_mb
    for size in sizes:
        result[size] = measure_size(size, steps, machine_mb)
    if "small" in sizes:
        result["quality_after_one_round"] = quality_after_one_round(quality_steps, samples)
    measured = [s for s in SIZES if s in result]
    result["device_profiles"] = profile_fits(result, measured)
    out.write(result, kept_from=previous)
    plot(result, measured, out)
    print(json.dumps({s: {k: result[s].get(k) for k in (
        "params", "weights_ratio_int8_vs_fp32", "mem_ratio_lora_int8_vs_lora_fp32", "mem_ratio_lora_int8_ckpt_vs_full",
        "step_seconds_lora_int8_ckpt", "adapter_bytes")} for s in measured}, indent=2))


def plot(result: dict, sizes, out: Output) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(3.6 * len(sizes), 3.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        e = result[size]
        modes = [m for m in MODES if m in e]
        weights = [e[m]["weights_mb"] for m in modes]
        train = [e[m]["train_mem_mb"] for m in modes]
        ax.bar(modes, weights, label="weights")
        ax.bar(modes, train, bottom=weights, label="training (grads, optimizer, activations)")
        if e.get("full_does_not_fit"):
            ax.bar(["full_fp32"], [e["full_bound_mb"]], color="none", edgecolor="grey", hatch="//",
                   label="full fine-tuning, lower bound (not run)")
        ax.set(ylabel="MB", title=f"{size}: {e['params'] / 1e6:.1f}M params", yscale="log")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    axes[0][0].legend(fontsize=6)
    out.save_figure(fig)


if __name__ == "__main__":
    main()
