"""Edge exports: ExecuTorch fp32/int8 vs eager (parity, latency, sample quality) and Core ML sizes.

    python -m benchmarks.export [--quick | --smoke] [--out DIR]

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

``--smoke`` trains for two steps, samples eight images, repeats each timing once and converts
Core ML in fp16 only (the two-function package: one conversion per function); it still lowers
one ExecuTorch program of each quantization, which is most of its time. Writes
benchmarks/results/export.json and export.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._results import Output, add_arguments

STYLES = ("framed", "inverted")
BATCH = 16  # 8 prompts x (conditional, unconditional)
COREML_WEIGHTS = ("fp16", "palettize", "int8")
SMOKE_COREML_WEIGHTS = ("fp16",)  # each Core ML conversion costs tens of seconds; the smoke converts once per path
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


def sample_inputs(backend, personas, style: str, samples: int, seed: int = 0):
    group = [p for p in personas if p.style == style]
    prompts = [pr for p in group for pr in p.test_prompts]
    digits = torch.cat([p.test_digits for p in group])
    order = torch.arange(samples) % len(prompts)
    encodings = backend.encode_prompts([prompts[i] for i in order.tolist()])
    noise = torch.randn((samples, *backend.sample_shape), generator=torch.Generator().manual_seed(seed))
    return encodings, digits[order], noise


def sample(unet, encodings, noise, denoiser=None, steps: int = 20):
    """Images of ``unet``, or of ``denoiser`` (an exported program) in the same sampling loop."""
    from models.digits.backend import DigitsBackend

    return DigitsBackend(unet).generate(encodings, steps=steps, seed=0, noise=noise, denoiser=denoiser,
                                        batch_size=BATCH // 2)


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
    from models.digits.backend import DigitsBackend

    torch.set_num_threads(1)
    with PeakRss() as rss:
        baseline = rss.now_mb()
        backend = DigitsBackend.from_pretrained()
        x = example_inputs(backend, BATCH)
        if kind == "eager":
            from export_tools.executorch import EagerDenoiser, with_adapters

            adapters = {STYLES[0]: {k: v for k, v in torch.load(Path(export_dir) / "adapter.pt").items()}}
            fn = EagerDenoiser(with_adapters(backend.denoiser, adapters, {STYLES[0]: 1.0}), backend)
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


def export_programs(backend, adapters, style: str, work: Path, calibration, reps: int) -> tuple[dict, dict]:
    """ExecuTorch fp32 and int8 programs of ``backend`` with ``style``'s adapter, and their export seconds."""
    from edge_sdk.artifacts.inference import ExecuTorchDenoiser
    from export_tools.executorch import export_executorch

    programs, seconds = {}, {}
    for q in ("fp32", "int8"):
        started = time.perf_counter()
        export_executorch(backend, adapters, {style: 1.0}, work / q, quantize=q, batch=BATCH, calibration=calibration,
                          latency_reps=reps)
        seconds[q] = time.perf_counter() - started
        programs[q] = ExecuTorchDenoiser(work / q)
        print(f"exported {q} in {seconds[q]:.0f} s", flush=True)
    return programs, seconds


def parity(programs: dict, eager, backend, adapters, calibration) -> dict:
    """Largest and RMS error of each program against eager, and after writing the other adapter into the fp32 one."""
    from export_tools.executorch import EagerDenoiser, errors, with_adapters

    style, other = STYLES
    out = {}
    for q, program in programs.items():
        worst, rms = errors(program, eager, calibration)
        out[q] = {"max_abs_err": worst, "rms_err": rms}
    programs["fp32"].set_mix(adapters, {other: 1.0})
    out["fp32_swapped_adapter_max_abs_err"], _ = errors(
        programs["fp32"], EagerDenoiser(with_adapters(backend.denoiser, adapters, {other: 1.0}), backend), calibration)
    programs["fp32"].set_mix(adapters, {style: 1.0})
    return out


def sample_quality(backends: dict, eager_unet, backend, personas, style: str, samples: int) -> tuple[dict, dict]:
    """Accuracy of each backend's samples (same prompts, seeds and starting noise), and their largest image error."""
    from models.digits.evaluate import evaluate

    encodings, digits, noise = sample_inputs(backend, personas, style, samples)
    images = {k: sample(eager_unet, encodings, noise, denoiser=None if k == "eager" else backends[k])
              for k in ("eager", "executorch_fp32", "executorch_int8")}
    quality = {k: evaluate(v, digits, style) for k, v in images.items()}
    quality["base_no_adapter"] = evaluate(sample(backend.denoiser, encodings, noise), digits, style)
    image_err = {k: float((images[k] - images["eager"]).abs().max()) for k in ("executorch_fp32", "executorch_int8")}
    return quality, image_err


def coreml_sizes(backend, adapters, style: str, work: Path, weights: tuple[str, ...]) -> dict:
    """Core ML package bytes for each weight format, and a two-function package against two single ones.

    The two-function package is converted first, in fp16: its export converts each function as a
    single-function package and records their bytes, so fp16's single package is not converted again.
    """
    from export_tools.coreml import export_coreml, function_name

    started = time.perf_counter()
    m = export_coreml(backend, adapters, {s: {s: 1.0} for s in STYLES}, work / "coreml-multi", batch=BATCH)
    single = m.parity["single_function_bytes"]
    coreml = {"fp16": {"bytes": single[function_name(style)],
                       "seconds": (time.perf_counter() - started) / len(STYLES),
                       "note": "a function of the two-function export; seconds are that export's per function"}}
    for w in weights:
        if w == "fp16":
            continue
        started = time.perf_counter()
        m1 = export_coreml(backend, adapters, {style: {style: 1.0}}, work / f"coreml-{w}", weights=w, batch=BATCH)
        coreml[w] = {"bytes": m1.files["model.mlpackage"]["bytes"], "seconds": time.perf_counter() - started}
    coreml["multifunction_fp16"] = {"bytes": m.files["model.mlpackage"]["bytes"], "functions": m.functions,
                                    "two_single_packages_bytes": sum(single.values())}
    coreml["validated_on_linux"] = m.parity["validated"]["functions"]
    coreml["note"] = "prediction needs macOS; parity of Core ML outputs is not measured here"
    return coreml


def memory(adapter, work: Path) -> dict:
    """Peak RSS of each backend in a fresh process (the eager one loads ``adapter`` from the fp32 export dir)."""
    torch.save(adapter, work / "fp32" / "adapter.pt")
    try:
        return {"eager": measure_memory("eager", work / "fp32"),
                "executorch_fp32": measure_memory("executorch", work / "fp32"),
                "executorch_int8": measure_memory("executorch", work / "int8")}
    finally:
        (work / "fp32" / "adapter.pt").unlink()


def device_profiles(et_sizes: dict, coreml: dict, memory_mb: dict) -> dict:
    """What each device class should run, with the measured files and memory of that export."""
    return {
        profile: {"export": fmt, "quantization": q, "why": why,
                  "files_bytes": et_sizes[q] if fmt == "executorch" else {"model.mlpackage": coreml[q]["bytes"]},
                  "inference_memory_mb": (memory_mb[f"executorch_{q}"]["peak_mb_above_imports"]
                                          if fmt == "executorch" else None),
                  "note": "sizes exact; memory measured on this x86 CPU (ExecuTorch runtime in Python), "
                          "not on the device" if fmt == "executorch" else "Core ML memory needs macOS"}
        for profile, (fmt, q, why) in PROFILE_EXPORTS.items()}


def measure(work: Path, train_steps: int, samples: int, reps: int, coreml_weights: tuple[str, ...]) -> dict:
    """Every measurement of the module docstring, in its order, with the exports under ``work``."""
    import copy

    from edge_sdk.artifacts.inference import set_runtime_threads
    from export_tools.calibration import denoising_batches
    from export_tools.executorch import EagerDenoiser, with_adapters
    from models.digits.backend import DigitsBackend
    from models.digits.data import calibration_samples
    from models.lora import merge_adapters

    torch.set_num_threads(1)
    set_runtime_threads(1)
    started = time.perf_counter()
    adapters, personas = train_adapters(train_steps)
    result: dict = {"threads": 1, "batch": BATCH, "train_steps": train_steps, "samples": samples,
                    "styles": list(STYLES), "cpu_note": "measured on a shared 2-core x86 CPU, not on the devices",
                    "adapter_train_seconds": time.perf_counter() - started}
    style = STYLES[0]
    backend = DigitsBackend.from_pretrained()
    calibration = denoising_batches(backend, calibration_samples, 4, BATCH)
    programs, export_seconds = export_programs(backend, adapters, style, work, calibration, reps)
    eager_unet = with_adapters(backend.denoiser, adapters, {style: 1.0})
    merged_unet = copy.deepcopy(eager_unet)
    merge_adapters(merged_unet, {style: 1.0})
    eager = EagerDenoiser(eager_unet, backend)
    errors = parity(programs, eager, backend, adapters, calibration)

    # latency: one denoiser call (batch 16), and 20-step sampling of 8 prompts
    backends = {"eager": eager, "eager_merged": EagerDenoiser(merged_unet, backend), "executorch_fp32": programs["fp32"],
                "executorch_int8": programs["int8"]}
    x = calibration[0]
    step = interleaved({k: (lambda f=f: f(*x)) for k, f in backends.items()}, reps=reps * 3)
    enc8, _, noise8 = sample_inputs(backend, personas, style, BATCH // 2, seed=1)
    sampling = interleaved({k: (lambda f=f: sample(eager_unet, enc8, noise8, denoiser=f))
                            for k, f in backends.items()},
                           reps=reps)
    print("step seconds", step, "\nsampling seconds", sampling, flush=True)

    quality, image_err = sample_quality(backends, eager_unet, backend, personas, style, samples)
    coreml = coreml_sizes(backend, adapters, style, work, coreml_weights)
    memory_mb = memory(adapters[style], work)
    et_sizes = {q: sizes(work / q) for q in ("fp32", "int8")}
    return result | {
        "export_seconds": export_seconds,
        "parity": errors,
        "fp32_max_abs_err": errors["fp32"]["max_abs_err"],
        "int8_max_abs_err": errors["int8"]["max_abs_err"],
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
        "memory_mb": memory_mb,
        "device_profiles": device_profiles(et_sizes, coreml, memory_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps, samples and repetitions")
    parser.add_argument("--memory-worker", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return
    out = Output.of(parser, args, "export")
    train_steps, samples, reps = (2, 8, 1) if args.smoke else (120, 32, 3) if args.quick else (300, 64, 10)
    coreml_weights = SMOKE_COREML_WEIGHTS if args.smoke else COREML_WEIGHTS
    with tempfile.TemporaryDirectory(prefix="fedaigc-export-bench-") as work:
        result = measure(Path(work), train_steps, samples, reps, coreml_weights)
    out.write(result)
    plot(result, out)
    keys = ("fp32_max_abs_err", "int8_max_abs_err", "fp32_sampling_ratio_vs_eager", "int8_sampling_ratio_vs_eager",
            "fp32_sampling_ratio_vs_eager_merged", "int8_sampling_ratio_vs_eager_merged", "int8_style_acc_drop",
            "int8_digit_acc_drop", "executorch_bytes")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


def plot(result: dict, out: Output) -> None:
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
    files += [(f"coreml {w}", result["coreml"][w]["bytes"] / 1024) for w in COREML_WEIGHTS if w in result["coreml"]]
    files.append(("coreml 2 functions fp16", result["coreml"]["multifunction_fp16"]["bytes"] / 1024))
    axes[3].barh([f[0] for f in files][::-1], [f[1] for f in files][::-1], color="grey")
    axes[3].set(xlabel="KiB", title="file sizes")
    axes[3].tick_params(axis="y", labelsize=7)
    for ax in axes[:3]:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    out.save_figure(fig)


if __name__ == "__main__":
    main()
