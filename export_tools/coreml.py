"""Core ML export: the denoiser as an ``.mlpackage`` (mlprogram, iOS 17+), one function per adapter.

    export_coreml(load_backend("path/to/model"), adapters, {"cluster_0": {"cluster-0": 1.0}}, "out/", weights="int8")

Each function is the same exportable denoiser (``export_tools.graph``) with an adapter
(or mix) in its LoRA slot, traced with ``torch.export`` and converted by
``coremltools.convert(ep.run_decompositions({}), minimum_deployment_target=iOS17,
convert_to="mlprogram")`` in fp16. Weights: ``fp16`` as converted, ``palettize``
(``OpPalettizerConfig``, 6-bit k-means LUT) or ``int8`` (``OpLinearQuantizerConfig``,
per-channel symmetric). Several functions are merged with
``coremltools.utils.save_multifunction``, which stores a weight blob shared by all
functions once: the base weights are kept identical across functions (LoRA unmerged),
so only the adapters' weights are per function. A latent model's text encoder and VAE decoder
are converted too (``text_encoder.mlpackage``, ``vae_decoder.mlpackage``, fp16, no adapter), so
a device turns prompts into conditioning and latents into images on Core ML as well.

Prediction needs macOS (the Core ML framework); on Linux the saved package is validated
from its spec: functions, input and output names, shapes and types.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from edge_sdk.artifacts.manifest import Manifest, adapter_record, base_digest
from edge_sdk.artifacts.ptd import SLOT, AdapterSlot, pack_mix, rank_of
from export_tools.encoders import encoder_parts
from export_tools.executorch import ExportError, example_inputs, model_config, slot_unet
from export_tools.graph import exportable
from models.backend import DiffusionBackend
from models.lora import set_adapter_state

PACKAGE = "model.mlpackage"
WEIGHTS = ("fp16", "palettize", "int8")
INPUTS = ("x", "t", "encoding")
OUTPUT = "eps"


def function_name(name: str) -> str:
    """A Core ML function name for an adapter name (``cluster-0`` -> ``cluster_0``)."""
    fn = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return fn if re.match(r"[A-Za-z_]", fn) else f"f_{fn}"


def convert_one(backend: DiffusionBackend, adapters, mix: Mapping[str, float], rank: int, batch: int, weights: str):
    """One ``MLModel`` (function ``main``) for ``mix`` of ``adapters``."""
    import coremltools as ct

    unet, probe = slot_unet(backend, adapters, rank)
    slot = AdapterSlot.of_shapes({k: v.shape for k, v in probe.items()}, rank)
    set_adapter_state(unet, SLOT, pack_mix(slot, adapters, mix))
    example = example_inputs(backend, batch)
    ep = torch.export.export(exportable(unet, backend), example, strict=False).run_decompositions({})
    model = ct.convert(
        ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT16,
        inputs=[ct.TensorType(name=n, shape=tuple(v.shape), dtype=np.float32) for n, v in zip(INPUTS, example)],
        outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
    )
    return compress(model, weights)


def compress(model, weights: str):
    import coremltools.optimize.coreml as cto

    if weights == "fp16":
        return model
    if weights == "palettize":
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=6,
                                                                             weight_threshold=512))
        return cto.palettize_weights(model, config)
    if weights == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512))
        return cto.linear_quantize_weights(model, config)
    raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def export_coreml(
    backend: DiffusionBackend,
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
    functions: Mapping[str, Mapping[str, float]],
    out_dir: str | Path,
    *,
    weights: str = "fp16",
    batch: int = 16,
    versions: Mapping[str, int] | None = None,
    encoders: bool = True,
) -> Manifest:
    """``out_dir/model.mlpackage`` with one function per entry of ``functions`` (name -> mix); with
    ``encoders``, a latent model's text encoder and VAE decoder packages beside it."""
    import coremltools as ct

    base = backend.denoiser
    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not functions:
        raise ExportError("name at least one function (an adapter, a mix, or the base model alone)")
    names = {function_name(n): mix for n, mix in functions.items()}
    if len(names) != len(functions):
        raise ExportError(f"function names collide after sanitising: {sorted(functions)}")
    rank = max([sum(rank_of(adapters[a]) for a in mix) for mix in names.values()] + [1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    package = out / PACKAGE
    if package.exists():
        shutil.rmtree(package)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedaigc-coreml-") as tmp:
        paths = {}
        for fn, mix in names.items():
            paths[fn] = Path(tmp) / f"{fn}.mlpackage"
            convert_one(backend, adapters, mix, rank, batch, weights).save(str(paths[fn]))
        if len(paths) == 1:
            shutil.copytree(next(iter(paths.values())), package)
        else:
            desc = ct.utils.MultiFunctionDescriptor()
            for fn, path in paths.items():
                desc.add_function(str(path), src_function_name="main", target_function_name=fn)
            desc.default_function_name = next(iter(paths))
            ct.utils.save_multifunction(desc, str(package))
        single_sizes = {fn: _dir_bytes(p) for fn, p in paths.items()}
    seconds = time.perf_counter() - started
    example = example_inputs(backend, batch)
    used = sorted({a for mix in names.values() for a in mix})
    manifest = Manifest(
        format="coreml", base_sha256=base_digest(base), unet_config=model_config(base),
        quantization=weights,
        adapter={"functions": {fn: dict(mix) for fn, mix in names.items()},
                 **adapter_record({a: adapters[a] for a in used}, {a: 1.0 for a in used}, versions)},
        inputs={n: {"shape": list(v.shape), "dtype": "float32"} for n, v in zip(INPUTS, example)},
        outputs={OUTPUT: {"shape": list(example[0].shape), "dtype": "float32"}},
        functions=list(names),
        notes=[f"conversion took {seconds:.1f} s",
               f"single-function packages would take {sum(single_sizes.values())} bytes in all; "
               f"the multifunction package shares the base weights",
               "prediction needs macOS (Core ML); on Linux the spec is validated, see validate_package()"],
    )
    parts = export_encoder_packages(backend, out) if encoders else {}
    manifest.record_files(out, [PACKAGE, *parts])
    manifest.parity = {"validated": validate_package(package, manifest), "max_abs_err": None,
                       "single_function_bytes": single_sizes,
                       "note": "no Core ML prediction on Linux; run predict() on macOS to measure parity", **parts}
    manifest.save(out)
    return manifest


def export_encoder_packages(backend: DiffusionBackend, out_dir: Path) -> dict[str, dict]:
    """``text_encoder.mlpackage`` and ``vae_decoder.mlpackage`` (fp16) in ``out_dir``; ``{file: its inputs
    and outputs as the saved spec states them}``, ``{}`` for a model without encoders."""
    import coremltools as ct

    report = {}
    for name, (module, example) in encoder_parts(backend).items():
        if example[0].dtype == torch.int64:  # Core ML has no int64 tensors: token ids go in as int32
            example = (example[0].to(torch.int32),)
        program = torch.export.export(module, example, strict=False).run_decompositions({})
        path = out_dir / f"{name}.mlpackage"
        if path.exists():
            shutil.rmtree(path)
        ct.convert(program, minimum_deployment_target=ct.target.iOS17, convert_to="mlprogram").save(str(path))
        report[path.name] = _io_shapes(ct.utils.load_spec(str(path)).description)
    return report


def _io_shapes(description) -> dict[str, dict[str, list[int]]]:
    """``{"inputs": {name: shape}, "outputs": {name: shape}}`` of a Core ML function's description."""
    return {"inputs": {i.name: list(i.type.multiArrayType.shape) for i in description.input},
            "outputs": {o.name: list(o.type.multiArrayType.shape) for o in description.output}}


def validate_package(package: str | Path, manifest: Manifest | None = None) -> dict:
    """Check a saved ``.mlpackage`` without Core ML: functions, inputs, outputs, shapes; raises ExportError."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{package} is not an mlprogram")
    descriptions = {f.name: f for f in spec.description.functions} or {"main": spec.description}
    want_functions = manifest.functions if manifest is not None else None
    if want_functions is not None and sorted(descriptions) != sorted(want_functions) and len(want_functions) > 1:
        raise ExportError(f"{package} has functions {sorted(descriptions)}, expected {sorted(want_functions)}")
    report = {}
    for fn, desc in descriptions.items():
        shapes = _io_shapes(desc)
        inputs, outputs = shapes["inputs"], shapes["outputs"]
        if list(inputs) != list(INPUTS) or list(outputs) != [OUTPUT]:
            raise ExportError(f"{package}:{fn} has inputs {list(inputs)} and outputs {list(outputs)}, "
                              f"expected {list(INPUTS)} -> {OUTPUT}")
        if manifest is not None:
            for name, shape in inputs.items():
                if shape != manifest.inputs[name]["shape"]:
                    raise ExportError(f"{package}:{fn} input {name} has shape {shape}, "
                                      f"expected {manifest.inputs[name]['shape']}")
        report[fn] = shapes
    return {"spec_version": spec.specificationVersion, "functions": report}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
