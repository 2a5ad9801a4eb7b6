"""ExecuTorch export: the denoiser as ``model.pte`` + ``base.ptd`` + ``adapter.ptd`` (XNNPACK, fp32 or int8).

    export_executorch(load_backend(path), adapters, {"cluster-0": 1.0}, "out/", quantize="int8", calibration=...)

1. A copy of the backend's denoiser gets one LoRA *slot* (peft, rank ``slot_rank``, on the
   model's default LoRA targets plus any module the adapters touch) and the XNNPACK-friendly spelling
   of ``export_tools.graph``.
2. ``torch.export`` at a fixed batch; for int8, pt2e ``XNNPACKQuantizer`` (per-channel
   symmetric int8 weights, static int8 activations) calibrated on the model's denoising
   inputs on convolutions and linears except the first and last convolution (int8 norms,
   softmax and adds wrecked the samples: 20-step sample error 0.83 vs 0.07) — the slot's
   own LoRA matmuls stay fp32 so adapters stay swappable.
3. Constants are tagged ``base`` or ``adapter`` and leave the program
   (``delegate_external_constants_pass_unlifted`` for XNNPACK's weights,
   ``ExecutorchBackendConfig(external_constants=...)`` for the rest), then
   ``to_edge_transform_and_lower(..., [XnnpackPartitioner()])`` → ``.pte`` + two ``.ptd``.
4. The slot is exported holding a seeded *probe* (distinct values), so every adapter
   tensor can be found in ``adapter.ptd`` (XNNPACK keys its weights by content hash);
   the keys go in the manifest and ``adapter.ptd`` is rewritten with the real adapter.
5. Parity (max |eps| error vs the eager peft UNet with the same adapters and mix) and
   latency (same process, interleaved) are measured and written to ``manifest.json``.

Why the batch is fixed: with a dynamic batch every reshape that mentions it stays out of
XNNPACK (symbolic reshapes are not delegated), which splits the graph and made the
program slower than eager; ``to_edge`` also narrows a dynamic batch to [2, 15] through a
convolution-backend guard. The runtime pads or splits to the exported batch.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.artifacts.manifest import Manifest, adapter_record, base_digest
from edge_sdk.artifacts.ptd import SLOT, AdapterSlot, adapter_ptd, locate_slot, pack_mix, rank_of
from export_tools.encoders import export_encoders
from export_tools.graph import exportable
from models.backend import DiffusionBackend
from models.lora import add_adapter, get_adapter_state, lora_config, set_adapter_state, set_mix

log = logging.getLogger("fedaigc.export")

QUANTIZATIONS = ("fp32", "int8")
PROGRAM, BASE_DATA, ADAPTER_DATA = "model.pte", "base.ptd", "adapter.ptd"
_TAG_BASE, _TAG_ADAPTER = "base", "adapter"


class ExportError(RuntimeError):
    """The export could not be made as asked; the message says what to change."""


# ---------------------------------------------------------------- adapters on an eager UNet
def adapter_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({k[: k.rindex(".lora_")] for k in state})


def with_adapters(base: torch.nn.Module, adapters: Mapping[str, Mapping[str, torch.Tensor]],
                  mix: Mapping[str, float]) -> torch.nn.Module:
    """A copy of ``base`` carrying ``adapters`` by name, mixed with ``mix`` (the eager reference)."""
    unet = copy.deepcopy(base).eval()
    unet.requires_grad_(False)
    for name, state in adapters.items():
        add_adapter(unet, name, lora_config(rank_of(state), target_modules=tuple(adapter_modules(state))))
        set_adapter_state(unet, name, state)
    set_mix(unet, dict(mix))
    return unet


def slot_unet(backend: DiffusionBackend, adapters: Mapping[str, Mapping[str, torch.Tensor]], rank: int,
              seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A copy of the backend's denoiser with the adapter slot (on the model's default targets and whatever
    the adapters touch) filled by a seeded probe: (unet, probe tensors by peft name)."""
    extra = sorted({m for s in adapters.values() for m in adapter_modules(s)})
    unet = copy.deepcopy(backend.denoiser).eval()
    unet.requires_grad_(False)
    add_adapter(unet, SLOT, lora_config(rank, target_modules=tuple(backend.default_targets) + tuple(extra)))
    shapes = {k: v.shape for k, v in get_adapter_state(unet, SLOT).items()}
    g = torch.Generator().manual_seed(seed)
    probe = {k: (torch.rand(s, generator=g) + 0.5) * 0.02 * torch.sign(torch.randn(s, generator=g))
             for k, s in shapes.items()}
    set_adapter_state(unet, SLOT, probe)
    set_mix(unet, {SLOT: 1.0})
    return unet, probe


def _slot_param(name: str) -> str:
    """The parameter name of slot tensor ``name`` (peft naming) inside the exportable wrapper."""
    return f"unet.{name[: -len('.weight')]}.{SLOT}.weight"


class EagerDenoiser(torch.nn.Module):
    """The eager call the sampler makes (``DiffusionBackend.run``), as a module: the parity reference."""

    def __init__(self, unet: torch.nn.Module, backend: DiffusionBackend) -> None:
        super().__init__()
        self.unet = unet
        self.run = backend.run

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        return self.run(self.unet, x, t, conditioning)


# ---------------------------------------------------------------- lowering
def example_inputs(backend: DiffusionBackend, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, t, conditioning)`` of the model's shapes at a fixed batch (what the program is traced with)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *backend.sample_shape, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, *backend.conditioning_shape, generator=g) * 0.05)


def model_config(unet: torch.nn.Module) -> dict:
    """The denoiser's diffusers config, as the manifest records it (JSON values)."""
    return json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
                                 default=list))


def _is_adapter_module(node: torch.fx.Node) -> bool:
    return any(".lora_" in str(v[0]) for v in node.meta.get("nn_module_stack", {}).values())


# Kept in fp32 under int8: the first and last convolution (20-step sample error 0.29 -> 0.07 when
# they stay fp32), every norm, softmax and add (all-op static int8 gave sample errors of 0.83),
# and the adapter slot (so it stays swappable data).
FP32_MODULES = ("conv_in", "conv_out")
_QUANTIZED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _quantize_node(node: torch.fx.Node) -> bool:
    if node.op == "get_attr":  # weights and biases: the quantizer checks them too
        name = str(node.target)
        return ".lora_" not in name and not any(f"unet.{m}." in name for m in FP32_MODULES)
    if node.target not in _QUANTIZED_OPS or _is_adapter_module(node):
        return False
    modules = [str(v[0]) for v in node.meta.get("nn_module_stack", {}).values()]
    return not any(m.endswith(f".{fp}") or f".{fp}." in m for m in modules for fp in FP32_MODULES)


def quantize_int8(gm: torch.nn.Module, calibration) -> torch.nn.Module:
    """pt2e static int8 for XNNPACK on convolutions and linears (per-channel weights), see FP32_MODULES."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    # set_module_type() cannot select convolutions here: the conv annotator also filters the
    # weight's get_attr node, which carries no module stack, so a node filter does it
    quantizer.set_filter_function(_quantize_node)
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for inputs in calibration:
            prepared(*inputs)
    converted = convert_pt2e(prepared)
    _constants_as_buffers(converted)
    return converted


def _constants_as_buffers(gm: torch.fx.GraphModule) -> None:
    """Register pt2e's folded constants (int8 weights, scales) as buffers.

    ``torch.export`` lifts plain tensor attributes as constants and drops the external-data
    tag set on their ``get_attr`` nodes, which left the int8 base weights inside the .pte.
    """
    owned = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in owned and "." not in node.target:
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor):
                delattr(gm, node.target)
                gm.register_buffer(node.target, value)
                owned.add(node.target)


def lower(gm: torch.nn.Module, example) -> "object":
    """Tag constants base/adapter, export, lower to XNNPACK; the ``ExecutorchProgramManager``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    def tag_weight(node: torch.fx.Node) -> str:  # get_attr nodes of the unlifted graph (delegated weights)
        return _TAG_ADAPTER if ".lora_" in str(node.target) else _TAG_BASE

    def tag_constant(node: torch.fx.Node) -> str:  # placeholders of the lifted graph (the rest)
        return _TAG_ADAPTER if "lora_" in node.name.lower() else _TAG_BASE

    delegate_external_constants_pass_unlifted(gm, gen_tag_fn=tag_weight)
    ep = torch.export.export(gm, example, strict=False)
    # export keeps the tag on most lifted weights but drops it on pt2e's folded int8 weights
    # (their scales follow the weight's tag), which left them inside the .pte: tag placeholders too
    targets = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs if spec.target is not None}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in targets:
            tag = _TAG_ADAPTER if ".lora_" in targets[node.name] else _TAG_BASE
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch(ExecutorchBackendConfig(external_constants=tag_constant))


# ---------------------------------------------------------------- measuring
def time_interleaved(fns: Mapping[str, callable], inputs, reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for rep in range(warmup + reps):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn(*inputs)
                if rep >= warmup:
                    times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def errors(fn, reference, batches) -> tuple[float, float]:
    """(max, RMS) absolute error of ``fn`` against ``reference`` over ``batches``."""
    worst, squares, count = 0.0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            diff = fn(*b) - reference(*b)
            worst = max(worst, float(diff.abs().max()))
            squares += float((diff * diff).sum())
            count += diff.numel()
    return worst, (squares / count) ** 0.5


# ---------------------------------------------------------------- the export
def export_executorch(
    backend: DiffusionBackend,
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
    mix: Mapping[str, float],
    out_dir: str | Path,
    *,
    quantize: str = "fp32",
    batch: int = 16,
    slot_rank: int = 8,
    versions: Mapping[str, int] | None = None,
    calibration,
    measure: bool = True,
    latency_reps: int = 10,
    encoders: bool = True,
) -> Manifest:
    """Export the backend's denoiser with ``mix`` of ``adapters`` in its adapter slot to ``out_dir``.

    The backend's denoiser is the plain (adapter-free) base. ``calibration`` is a list of
    ``(x, t, conditioning)`` batches (``export_tools.calibration.denoising_batches``); it also serves
    as the parity set. With ``encoders``, a latent model's text encoder and VAE decoder programs
    are written beside it (``export_tools.encoders``). Returns the manifest.
    """
    base = backend.denoiser
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if getattr(base, "peft_config", None):
        raise ExportError("export from the plain base UNet; adapters are passed separately")
    needed = sum(rank_of(adapters[n]) for n in mix) if mix else 0
    if needed > slot_rank:
        raise ExportError(f"the mix needs rank {needed}, over slot_rank={slot_rank}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference = EagerDenoiser(with_adapters(base, adapters, mix), backend)
    unet, probe = slot_unet(backend, adapters, slot_rank)
    module = exportable(unet, backend)
    slot_state = pack_mix(AdapterSlot.of_shapes({k: v.shape for k, v in probe.items()}, slot_rank), adapters, mix)
    example = example_inputs(backend, batch)
    started = time.perf_counter()
    gm = torch.export.export(module, example, strict=False).module()
    if quantize == "int8":
        _load_slot(gm, slot_state)  # calibrate activations with the real adapter in place ...
        gm = quantize_int8(gm, calibration)
        _load_slot(gm, probe)  # ... and export with the probe, whose tensors can be found by content
    program = lower(gm, example)
    seconds = time.perf_counter() - started

    (out / PROGRAM).write_bytes(program.buffer)
    for stale in (BASE_DATA, ADAPTER_DATA):
        (out / stale).unlink(missing_ok=True)
    program.write_tensor_data_to_file(str(out))  # <tag>.ptd: base.ptd, adapter.ptd
    if not (out / BASE_DATA).exists() or not (out / ADAPTER_DATA).exists():
        raise ExportError(f"the exporter did not write {BASE_DATA} and {ADAPTER_DATA} to {out}")
    slot = locate_slot(probe, (out / ADAPTER_DATA).read_bytes(), slot_rank)
    (out / ADAPTER_DATA).write_bytes(adapter_ptd(slot, slot_state))

    manifest = Manifest(
        format="executorch", base_sha256=base_digest(base), unet_config=model_config(base),
        quantization=quantize, adapter=adapter_record(adapters, mix, versions), slot=slot.to_json(),
        inputs={"x": {"shape": list(example[0].shape), "dtype": "float32"},
                "t": {"shape": list(example[1].shape), "dtype": "float32"},
                "encoding": {"shape": list(example[2].shape), "dtype": "float32"}},
        outputs={"eps": {"shape": list(example[0].shape), "dtype": "float32"}},
        notes=[f"export + lowering took {seconds:.1f} s",
               "base.ptd holds the base weights, adapter.ptd the adapter slot; swap adapter.ptd to change adapters",
               "the Python runtime loads one data file: base.ptd and adapter.ptd are merged at load"],
    )
    parts = export_encoders(backend, out) if encoders else {}
    manifest.record_files(out, [PROGRAM, BASE_DATA, ADAPTER_DATA, *parts])
    manifest.save(out)
    if measure:
        manifest.parity, manifest.latency = measure_export(out, reference, calibration, latency_reps)
    manifest.parity |= parts
    manifest.save(out)
    return manifest


def _load_slot(gm: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(gm.named_parameters()) | dict(gm.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            target = params.get(_slot_param(name))
            if target is None:
                raise ExportError(f"slot tensor {name} not found in the exported graph module")
            target.copy_(value)


def measure_export(out_dir: Path, reference: torch.nn.Module, batches, reps: int = 10) -> tuple[dict, dict]:
    """(parity, latency) of the program in ``out_dir`` against the eager ``reference``, same process."""
    from edge_sdk.artifacts.inference import ExecuTorchDenoiser

    threads = torch.get_num_threads()
    program = ExecuTorchDenoiser(out_dir, threads=threads)
    try:
        err, rms = errors(program, reference, batches)
        with torch.no_grad():
            scale = max(float(reference(*b).abs().max()) for b in batches)
        timing = time_interleaved({"eager": reference, "executorch": program}, batches[0], reps=reps)
    finally:
        program.close()
    parity = {"max_abs_err": err, "rms_err": rms, "reference_max_abs": scale, "batches": len(batches),
              "rows": sum(b[0].shape[0] for b in batches),
              "reference": "eager peft UNet with the same adapters and mix (DiffusionBackend.run)"}
    latency = {"eager_ms": 1e3 * timing["eager"], "executorch_ms": 1e3 * timing["executorch"],
               "ratio_vs_eager": timing["executorch"] / timing["eager"], "batch": batches[0][0].shape[0],
               "threads": threads, "reps": reps, "note": "measured on the export machine's CPU, not the device"}
    return parity, latency
