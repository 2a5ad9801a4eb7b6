"""Edge exports: ExecuTorch fp32/int8 vs eager (parity, latency, sample quality) and Core ML sizes.

    python -m benchmarks.export [--quick]

1. Two style adapters ("framed", "inverted"; rank 2) are trained centrally on styled-digit
   personas (the upper-bound recipe of ``models.digits.pretrain.train_central``).
2. The shipped base UNet is exported with the "framed" adapter: ExecuTorch fp32 and int8
   (``export_tools.executorch``, batch 16 = 8 prompts with classifier-free guidance), and
   Core ML fp16 / 6-bit palettized / int8 weights plus a two-function package.
3. In this one process, calls interleaved: per-step denoiser latency and full 20-step
   DDIM sampling time of eager (peft adapter unmerged, as ``EdgeClient`` runs it),
   eager with the adapter merged into the weights, ExecuTorch fp32 and int8 — one thread
   each (torch and the XNNPACK threadpool), on this x86 CPU.
4. Quality: digit/style accuracy of samples for the style's held-out prompts, same seeds
   and starting noise for every backend; parity (max |eps| error) and the adapter swap
   ("inverted" written into adapter.ptd vs eager with "inverted").
5. Memory: peak RSS to load the program and run one denoiser call, in a fresh
   subprocess per backend, above the RSS with torch and the runtime imported.

Writes benchmarks/results/export.json and export.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STYLES = ("framed", "inverted")
BATCH = 16  # 8 prompts x (conditional, unconditional)
PROFILE_EXPORTS = {  # what each device class should run, and why
    "raspberry-pi-4": ("executorch", "int8", "4x Cortex-A72 CPU: XNNPACK int8, smallest weights"),
    "jetson-orin-nano": ("executorch", "fp32", "Cortex-A78AE CPU through XNNPACK (a CUDA/TensorRT export is not "
                                               "built here); fp32 keeps exact parity"),
    "apple-m": ("coreml", "fp16", "Core ML mlprogram: GPU/Neural Engine; palettized if storage matters"),
}


def train_adapters(steps: int, seed: int = 0):
    from models.digits.data import make_personas
    from models.digits.pretrain import train_central
    from models.digits.unet import BASE_MODEL_DIR
    from models.lora import get_adapter_state
    from models.training import LORA_LR, TrainConfig

    personas = make_personas(8, 2, seed=seed, styles=list(STYLES))
    unet = train_central(BASE_MODEL_DIR, personas, train=TrainConfig(steps=steps, batch_size=32, lr=LORA_LR, seed=seed),
                         progress=False)
    return {s: get_adapter_state(unet, s) for s in STYLES}, personas


def sample_inputs(personas, style: str, samples: int, seed: int = 0):
    from models.text import PromptEncoder

    group = [p for p in personas if p.style == style]
    prompts = [pr for p in group for pr in p.test_prompts]
    digits = torch.cat([p.test_digits for p in group])
    order = torch.arange(samples) % len(prompts)
    encodings = torch.from_numpy(PromptEncoder().encode([prompts[i] for i in order.tolist()]))
    noise = torch.randn((samples, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    return encodings, digits[order], noise


def sample(unet, encodings, noise, denoiser=None, steps: int = 20):
    from models.digits.unet import generate

    return generate(unet, encodings, steps=steps, seed=0, noise=noise, denoiser=denoiser, batch_size=BATCH // 2)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    import statistics

    times = {k: [] for k in fns}
    with torch.no_grad():
        for rep in range(warmup + reps):
            for k, fn in fns.items():
                t = timed(fn, 1)[0]
                if rep >= warmup:
                    times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_worker(kind: str, export_dir: str) -> dict:
    """Runs in a fresh process: peak RSS to load ``kind`` and make one denoiser call, above the imports."""
    import executorch.runtime  # noqa: F401  (imported before the baseline, as torch is)

    from benchmarks.edge import PeakRss
    from export_tools.executorch import example_inputs

    torch.set_num_threads(1)
    x = example_inputs(BATCH)
    with PeakRss() as rss:
        baseline = rss.now_mb()
        if kind == "eager":
            from export_tools.executorch import EagerDenoiser, with_adapters
            from models.digits.unet import load_base_unet

            adapters = {STYLES[0]: {k: v for k, v in torch.load(Path(export_dir) / "adapter.pt").items()}}
            fn = EagerDenoiser(with_adapters(load_base_unet(), adapters, {STYLES[0]: 1.0}))
        else:
            from edge_sdk.artifacts.inference import ExecuTorchDenoiser

            fn = ExecuTorchDenoiser(export_dir, threads=1)
        with torch.no_grad():
            fn(*x)
    return {"peak_mb_above_imports": rss.peak_mb - baseline}


def measure_memory(kind: str, export_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.export", "--memory-worker", kind, str(export_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sizes(export_dir: Path) -> dict[str, int]:
    return {p.name: (p.stat().st_size if p.is_file() else sum(q.stat().st_size for q in p.rglob("*") if q.is_file()))
            for p in sorted(export_dir.iterdir()) if p.name != "manifest.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps, samples and repetitions")
    parser.add_argument("--memory-worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return
    torch.set_num_threads(1)
    from edge_sdk.artifacts.inference import ExecuTorchDenoiser, set_runtime_threads
    from export_tools.calibration import denoising_batches
    from export_tools.coreml import export_coreml
    from export_tools.executorch import EagerDenoiser, errors, export_executorch, with_adapters
    from models.digits.data import calibration_samples
    from models.digits.evaluate import evaluate
    from models.digits.unet import load_base_unet
    from models.lora import merge_adapters

    set_runtime_threads(1)
    train_steps, samples, reps = (120, 32, 3) if args.quick else (300, 64, 10)
    started = time.perf_counter()
    adapters, personas = train_adapters(train_steps)
    result: dict = {"threads": 1, "batch": BATCH, "train_steps": train_steps, "samples": samples,
                    "styles": list(STYLES), "cpu_note": "measured on a shared 2-core x86 CPU, not on the devices",
                    "adapter_train_seconds": time.perf_counter() - started}
    style, other = STYLES
    base = load_base_unet()
    calibration = denoising_batches(calibration_samples, 4, BATCH)
    work = Path(tempfile.mkdtemp(prefix="fedaigc-export-bench-"))
    exports, export_seconds = {}, {}
    for q in ("fp32", "int8"):
        started = time.perf_counter()
        export_executorch(base, adapters, {style: 1.0}, work / q, quantize=q, batch=BATCH, calibration=calibration,
                          latency_reps=reps)
        export_seconds[q] = time.perf_counter() - started
        exports[q] = ExecuTorchDenoiser(work / q)
        print(f"exported {q} in {export_seconds[q]:.0f} s", flush=True)
    eager_unet = with_adapters(base, adapters, {style: 1.0})
    merged_unet = copy.deepcopy(eager_unet)
    merge_adapters(merged_unet, {style: 1.0})
    eager, merged = EagerDenoiser(eager_unet), EagerDenoiser(merged_unet)

    # parity and the adapter swap
    parity = {}
    for q, program in exports.items():
        worst, rms = errors(program, eager, calibration)
        parity[q] = {"max_abs_err": worst, "rms_err": rms}
    exports["fp32"].set_mix(adapters, {other: 1.0})
    swap_worst, _ = errors(exports["fp32"], EagerDenoiser(with_adapters(base, adapters, {other: 1.0})), calibration)
    exports["fp32"].set_mix(adapters, {style: 1.0})
    parity["fp32_swapped_adapter_max_abs_err"] = swap_worst

    # latency: one denoiser call (batch 16), and 20-step sampling of 8 prompts
    x = calibration[0]
    fns = {"eager": eager, "eager_merged": merged, "executorch_fp32": exports["fp32"],
           "executorch_int8": exports["int8"]}
    step = interleaved({k: (lambda f=f: f(*x)) for k, f in fns.items()}, reps=reps * 3)
    enc8, _, noise8 = sample_inputs(personas, style, BATCH // 2, seed=1)
    sampling = interleaved({k: (lambda f=f: sample(eager_unet, enc8, noise8, denoiser=f)) for k, f in fns.items()},
                           reps=reps)
    print("step seconds", step, "\nsampling seconds", sampling, flush=True)

    # quality of samples: same prompts, seeds and starting noise for every backend
    encodings, digits, noise = sample_inputs(personas, style, samples)
    images = {k: sample(eager_unet, encodings, noise, denoiser=None if k == "eager" else fns[k])
              for k in ("eager", "executorch_fp32", "executorch_int8")}
    quality = {k: evaluate(v, digits, style) for k, v in images.items()}
    base_images = sample(base, encodings, noise)
    quality["base_no_adapter"] = evaluate(base_images, digits, style)
    image_err = {k: float((images[k] - images["eager"]).abs().max()) for k in ("executorch_fp32", "executorch_int8")}

    # Core ML: sizes of fp16 / palettized / int8 weights, and a two-function package
    coreml = {}
    for weights in ("fp16", "palettize", "int8"):
        started = time.perf_counter()
        m = export_coreml(base, adapters, {style: {style: 1.0}}, work / f"coreml-{weights}", weights=weights,
                          batch=BATCH)
        coreml[weights] = {"bytes": m.files["model.mlpackage"]["bytes"], "seconds": time.perf_counter() - started}
    m = export_coreml(base, adapters, {s: {s: 1.0} for s in STYLES}, work / "coreml-multi", batch=BATCH)
    coreml["multifunction_fp16"] = {"bytes": m.files["model.mlpackage"]["bytes"], "functions": m.functions,
                                    "two_single_packages_bytes": 2 * coreml["fp16"]["bytes"]}
    coreml["validated_on_linux"] = m.parity["validated"]["functions"]
    coreml["note"] = "prediction needs macOS; parity of Core ML outputs is not measured here"

    # memory: fresh process per backend
    torch.save(adapters[style], work / "fp32" / "adapter.pt")
    memory = {"eager": measure_memory("eager", work / "fp32"),
              "executorch_fp32": measure_memory("executorch", work / "fp32"),
              "executorch_int8": measure_memory("executorch", work / "int8")}
    (work / "fp32" / "adapter.pt").unlink()

    et_sizes = {q: sizes(work / q) for q in ("fp32", "int8")}
    result.update({
        "export_seconds": export_seconds,
        "parity": parity,
        "fp32_max_abs_err": parity["fp32"]["max_abs_err"],
        "int8_max_abs_err": parity["int8"]["max_abs_err"],
        "step_seconds": step,
        "sampling_seconds_20_steps_8_prompts": sampling,
        "fp32_step_ratio_vs_eager": step["executorch_fp32"] / step["eager"],
        "int8_step_ratio_vs_eager": step["executorch_int8"] / step["eager"],
        "fp32_sampling_ratio_vs_eager": sampling["executorch_fp32"] / sampling["eager"],
        "int8_sampling_ratio_vs_eager": sampling["executorch_int8"] / sampling["eager"],
        "fp32_sampling_ratio_vs_eager_merged": sampling["executorch_fp32"] / sampling["eager_merged"],
        "int8_sampling_ratio_vs_eager_merged": sampling["executorch_int8"] / sampling["eager_merged"],
        "quality": quality,
        "sample_max_abs_err_vs_eager": image_err,
        "fp32_style_acc_drop": quality["eager"]["style_acc"] - quality["executorch_fp32"]["style_acc"],
        "int8_style_acc_drop": quality["eager"]["style_acc"] - quality["executorch_int8"]["style_acc"],
        "int8_digit_acc_drop": quality["eager"]["digit_acc"] - quality["executorch_int8"]["digit_acc"],
        "executorch_bytes": et_sizes,
        "coreml": coreml,
        "memory_mb": memory,
    })
    result["device_profiles"] = {
        profile: {"export": fmt, "quantization": q, "why": why,
                  "files_bytes": et_sizes[q] if fmt == "executorch" else {"model.mlpackage": coreml[q]["bytes"]},
                  "inference_memory_mb": (memory[f"executorch_{q}"]["peak_mb_above_imports"]
                                          if fmt == "executorch" else None),
                  "note": "sizes exact; memory measured on this x86 CPU (ExecuTorch runtime in Python), "
                          "not on the device" if fmt == "executorch" else "Core ML memory needs macOS"}
        for profile, (fmt, q, why) in PROFILE_EXPORTS.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "export.png")
    keys = ("fp32_max_abs_err", "int8_max_abs_err", "fp32_sampling_ratio_vs_eager", "int8_sampling_ratio_vs_eager",
            "fp32_sampling_ratio_vs_eager_merged", "int8_sampling_ratio_vs_eager_merged", "int8_style_acc_drop",
            "int8_digit_acc_drop", "executorch_bytes")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.2, 1.3]})
    names = list(result["sampling_seconds_20_steps_8_prompts"])
    colors = ["#888", "#bbb", "#1f77b4", "#ff7f0e"]
    axes[0].bar(names, [1e3 * result["step_seconds"][n] for n in names], color=colors)
    axes[0].set(ylabel="ms per denoiser call (batch 16)", title="one step")
    axes[1].bar(names, list(result["sampling_seconds_20_steps_8_prompts"].values()), color=colors)
    axes[1].set(ylabel="s", title="20-step DDIM, 8 prompts")
    q = result["quality"]
    labels = ["eager", "executorch_fp32", "executorch_int8", "base_no_adapter"]
    width = 0.4
    xs = range(len(labels))
    axes[2].bar([i - width / 2 for i in xs], [q[k]["style_acc"] for k in labels], width, label="style acc")
    axes[2].bar([i + width / 2 for i in xs], [q[k]["digit_acc"] for k in labels], width, label="digit acc")
    axes[2].set_xticks(list(xs), labels)
    axes[2].set(ylim=(0, 1), title=f"samples, style {result['styles'][0]!r}")
    axes[2].legend(fontsize=7)
    files = []
    for qz, entry in result["executorch_bytes"].items():
        files += [(f"executorch {qz} {name}", size / 1024) for name, size in entry.items()]
    files += [(f"coreml {w}", result["coreml"][w]["bytes"] / 1024) for w in ("fp16", "palettize", "int8")]
    files.append(("coreml 2 functions fp16", result["coreml"]["multifunction_fp16"]["bytes"] / 1024))
    axes[3].barh([f[0] for f in files][::-1], [f[1] for f in files][::-1], color="grey")
    axes[3].set(xlabel="KiB", title="file sizes")
    axes[3].tick_params(axis="y", labelsize=7)
    for ax in axes[:3]:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
