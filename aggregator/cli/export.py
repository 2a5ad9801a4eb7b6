"""``fedaigc export``: the denoiser for devices, as ExecuTorch ``.pte``/``.ptd`` or a Core ML ``.mlpackage``.

    fedaigc export --format executorch --adapter-file cluster-0.safetensors --adapter cluster-0 --out out/
    fedaigc export --format executorch --adapter-file a=a.safetensors --adapter-file b=b.safetensors \\
        --mix a=0.5,b=0.5 --quantize int8 --out out/
    fedaigc export --format coreml --adapter-file a.safetensors --adapter-file b.safetensors --out out/
    fedaigc export --format executorch-training --config aggregator.toml --batch 16 --out out/train

Adapter files are safetensors in peft naming (``<module>.lora_A.weight``), as the edge
SDK's adapter store writes them (its ``version``/``sha256`` metadata is checked when
present). ``NAME=PATH`` names an adapter; otherwise the file's stem is its name. With no
adapter the base model alone is exported (its ExecuTorch slot is empty but swappable).
``executorch-training`` writes the LoRA training step (``export_tools.training``) a device
trains its local rounds with; it takes no adapter (the device writes its own each round).
This module imports nothing heavy, so ``fedaigc --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("executorch", "coreml", "executorch-training")
DEFAULT_QUANTIZE = {"executorch": "fp32", "coreml": "fp16", "executorch-training": "fp32"}
QUANTIZE_CHOICES = {"executorch": ("fp32", "int8"), "coreml": ("fp16", "palettize", "int8"),
                    "executorch-training": ("fp32",)}


def register(sub) -> None:
    p = sub.add_parser("export", help="export the denoiser for devices: ExecuTorch .pte/.ptd or Core ML .mlpackage",
                       description="Export the base UNet with an adapter (or a mix) for on-device inference; "
                                   "writes the model files and a manifest with parity and latency.")
    p.add_argument("--format", choices=FORMATS, required=True)
    choose = p.add_mutually_exclusive_group()
    choose.add_argument("--adapter", metavar="NAME", help="export this adapter (weight 1)")
    choose.add_argument("--mix", metavar="NAME=W,...", help="export a weighted mix of adapters (hybrid style)")
    p.add_argument("--adapter-file", action="append", default=[], metavar="[NAME=]PATH",
                   help="a safetensors adapter; repeat for several (default: none, the base model alone)")
    p.add_argument("--out", required=True, help="directory to write (model files + manifest.json)")
    p.add_argument("--quantize", help="executorch: fp32 (default) or int8; coreml: fp16 (default), palettize, int8")
    p.add_argument("--base-model", metavar="DIR", help="the base model: a diffusers pipeline directory or a bundled-"
                                                       "family UNet (default: the config's, else the bundled one)")
    p.add_argument("--batch", type=int, default=16, help="rows per call the program is built for (default: 16)")
    p.add_argument("--slot-rank", type=int, default=8,
                   help="executorch: rank of the swappable adapter slot (default: 8)")
    p.add_argument("--config", metavar="AGGREGATOR_TOML",
                   help="the fleet's aggregator.toml: its base_model, and for executorch-training the "
                        "[aggregator.lora] the trainable adapter takes (default: the bundled model's defaults)")
    p.add_argument("--no-measure", action="store_true", help="executorch: skip the parity/latency measurement")
    p.set_defaults(func=run)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        name, sep, weight = part.partition("=")
        if not sep or not name:
            raise ValueError(f"--mix entries are NAME=WEIGHT, got {part!r}")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise ValueError(f"--mix weight for {name!r} is not a number: {weight!r}") from None
    if not mix:
        raise ValueError("--mix names no adapters")
    return mix


def load_adapter_file(spec: str) -> tuple[str, dict, int]:
    """(name, tensors, version) from ``[NAME=]PATH``; refuses a file failing its checksum."""
    from safetensors import safe_open

    from edge_sdk.protocol.digest import tensor_digest

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not tensors or not all(".lora_A." in k or ".lora_B." in k for k in tensors):
        raise ValueError(f"{path} is not a LoRA adapter in peft naming (<module>.lora_A.weight, ...)")
    if "sha256" in meta and meta["sha256"] != tensor_digest(tensors):
        raise ValueError(f"{path} fails its sha256 checksum")
    return name, tensors, int(meta.get("version", "0"))


def calibration_dataset(backend):
    """The inputs calibration and parity checks draw: styled digits for the bundled model; for another
    model, uniform noise images with a neutral prompt (enough for parity; int8 calibration of a real
    model deserves its own data, through ``export_tools.calibration``'s dataset callable)."""
    if backend.family == "digits":
        from models.digits.data import calibration_samples

        return calibration_samples

    def noise_samples(n, seed, generator):
        import torch

        return torch.rand((n, *backend.image_shape), generator=generator), ["a photo"] * n

    return noise_samples


def run(args: argparse.Namespace) -> int:
    from aggregator.cli._common import load_config
    from models.backend import load_backend

    quantize = args.quantize or DEFAULT_QUANTIZE[args.format]
    if quantize not in QUANTIZE_CHOICES[args.format]:
        raise SystemExit(f"--quantize {quantize} is not available for {args.format}; "
                         f"choose {', '.join(QUANTIZE_CHOICES[args.format])}")
    adapters, versions = {}, {}
    for spec in args.adapter_file:
        name, tensors, version = load_adapter_file(spec)
        if name in adapters:
            raise SystemExit(f"two adapter files are named {name!r}; use NAME=PATH")
        adapters[name], versions[name] = tensors, version
    if args.mix:
        mix = parse_mix(args.mix)
    elif args.adapter:
        mix = {args.adapter: 1.0}
    else:
        mix = None
    for name in mix or {}:
        if name not in adapters:
            raise SystemExit(f"adapter {name!r} has no --adapter-file; given: {sorted(adapters) or 'none'}")
    if args.format == "executorch-training" and (adapters or mix):
        raise SystemExit("--format executorch-training takes no adapter: the device writes its own each round")
    fleet = load_config(args.config, base_model=args.base_model)
    backend = load_backend(fleet.base_model)
    samples = calibration_dataset(backend)
    if args.format == "executorch-training":
        from export_tools.calibration import training_batch
        from export_tools.training import export_training

        manifest = export_training(backend, args.out, lora=fleet.lora, batch=args.batch, measure=not args.no_measure,
                                   parity_batch=training_batch(backend, samples, args.batch))
    elif args.format == "executorch":
        from export_tools.calibration import denoising_batches
        from export_tools.executorch import export_executorch

        if mix is None:
            mix = {next(iter(adapters)): 1.0} if len(adapters) == 1 else {}
            if len(adapters) > 1:
                raise SystemExit("several adapter files: choose one with --adapter or combine them with --mix")
        calibration = denoising_batches(backend, samples, 4, args.batch)
        manifest = export_executorch(backend, adapters, mix, args.out, quantize=quantize, batch=args.batch,
                                     slot_rank=args.slot_rank, versions=versions, calibration=calibration,
                                     measure=not args.no_measure)
    else:
        from export_tools.coreml import export_coreml

        if mix is not None:
            functions = {args.adapter or "mix": mix}
        else:  # one function per adapter, or the base model alone
            functions = {n: {n: 1.0} for n in adapters} or {"base": {}}
        manifest = export_coreml(backend, adapters, functions, args.out, weights=quantize, batch=args.batch,
                                 versions=versions)
    summary = {"out": str(args.out), "format": manifest.format, "quantization": manifest.quantization,
               "files": manifest.files, "parity": manifest.parity, "latency": manifest.latency}
    print(json.dumps(summary, indent=2, default=str))
    return 0
