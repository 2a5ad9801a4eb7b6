"""ExecuTorch on-device training: the denoiser's LoRA training step as one joint forward–backward program.

    export_training(load_backend(path), "out/train", lora=the_fleets_lora_config, batch=16)

writes ``train.pte`` (the program), ``base.ptd`` (the frozen base weights), ``adapter.ptd``
(the trainable LoRA tensors) and ``manifest.json``. The program's method ``forward(x_t, t,
encoding, noise)`` returns the noise-prediction MSE of ``models.training`` and, through
``executorch.extension.training.TrainingModule``, the gradients of every LoRA tensor; the
base is frozen (no gradients are computed for it). The random draws — batch, noise,
timestep, prompt dropout — stay outside the program in ``models.training.noised_batch``,
so an exported round sees exactly the eager trainer's data; ``edge_sdk.artifacts.training``
runs the loop and applies AdamW to the runtime's own parameter tensors.

Lowering (torch.export → ``torch.export.experimental._export_forward_backward`` →
``to_edge`` → ``to_executorch``) needs three workarounds on torch 2.13 / executorch 1.5.1,
each found by a failure:

* ``remove_view_copy=False``: with external constants the emitter asserts
  (``assert constant_tag is not None`` in ``_emitter._tensor_spec_to_evalue``) on a view of
  an external weight (a norm's affine weight reshaped for broadcasting) — its elided
  memory view carries no data tag. Keeping view copies costs a few small copies.
* ``aten.empty_permuted`` (from SiLU's backward decomposition) has no runtime kernel
  (``kernel 'aten::empty_permuted.out' not found``); it is rewritten as ``empty`` of the
  physical shape followed by a permute, which is what it means.
* The training program is not delegated to XNNPACK: the backward ops
  (``convolution_backward`` and friends) run on the portable kernels anyway.

Base weights and LoRA tensors are external data exactly as in the inference export: the
program never carries weights, and a device writes the round's starting adapter into the
runtime's parameter memory without re-exporting.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from edge_sdk.artifacts.manifest import Manifest, base_digest
from edge_sdk.artifacts.ptd import SLOT, locate_slot
from export_tools.executorch import example_inputs as inference_inputs
from export_tools.executorch import model_config
from export_tools.graph import exportable
from models.backend import DiffusionBackend
from models.lora import LoraConfig, add_adapter, get_adapter_state, lora_config, lora_scale, set_adapter_state, set_mix

log = logging.getLogger("fedaigc.export")

FORMAT = "executorch-training"
PROGRAM, BASE_DATA, ADAPTER_DATA = "train.pte", "base.ptd", "adapter.ptd"
_TAG_BASE, _TAG_ADAPTER = "base", "adapter"


class TrainingStep(torch.nn.Module):
    """``forward(x_t, t, conditioning, target) -> (loss,)``: the eager trainer's loss, loss first as the runtime
    expects (the target is the noise or the velocity, drawn outside with the batch)."""

    def __init__(self, unet: torch.nn.Module, backend: DiffusionBackend) -> None:
        super().__init__()
        self.unet = unet
        self.run = backend.run

    def forward(self, x: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor]:
        return (F.mse_loss(self.run(self.unet, x, t, conditioning), target),)


def eager_unet(base: torch.nn.Module, lora: LoraConfig, adapter: Mapping[str, torch.Tensor] | None = None,
               seed: int = 0) -> torch.nn.Module:
    """A copy of ``base`` with adapter ``SLOT`` (``lora``; ``adapter``'s values if given) active and trainable."""
    unet = copy.deepcopy(base).eval()
    unet.requires_grad_(False)
    add_adapter(unet, SLOT, lora, seed=seed)
    if adapter is not None:
        set_adapter_state(unet, SLOT, adapter)
    set_mix(unet, {SLOT: 1.0})
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    return unet


def training_step(unet: torch.nn.Module, backend: DiffusionBackend) -> TrainingStep:
    """``unet`` (with its trainable adapter) in the exportable spelling, LoRA trainable, base frozen."""
    module = exportable(unet, backend).unet
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_" in name)
    return TrainingStep(module, backend)


def example_inputs(backend: DiffusionBackend, batch: int) -> tuple[torch.Tensor, ...]:
    """``(x_t, t, conditioning, target)`` of the model's shapes at a fixed batch."""
    x, t, conditioning = inference_inputs(backend, batch)
    return x, t, conditioning, torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def _empty_permuted_as_empty(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``empty_permuted(size, perm)`` as ``empty(physical size).permute(inverse)`` (no runtime kernel)."""
    graph, rewritten = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.empty_permuted.default:
            continue
        size, perm = node.args
        inverse = [list(perm).index(i) for i in range(len(perm))]
        value = node.meta["val"]
        with graph.inserting_before(node):
            physical = graph.call_function(torch.ops.aten.empty.memory_format, ([size[p] for p in perm],),
                                           dict(node.kwargs))
            physical.meta["val"] = value.permute(*perm)
            logical = graph.call_function(torch.ops.aten.permute.default, (physical, inverse))
            logical.meta["val"] = value
        node.replace_all_uses_with(logical)
        graph.erase_node(node)
        rewritten += 1
    gm.recompile()
    return rewritten


def lower_training(step: TrainingStep, example) -> "object":
    """Joint forward–backward export of ``step``; the ``ExecutorchProgramManager`` with base/adapter data tags."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    def tag(node: torch.fx.Node) -> str:  # placeholders of the lifted graph: every weight leaves the program
        return _TAG_ADAPTER if "lora_" in node.name.lower() else _TAG_BASE

    ep = _export_forward_backward(torch.export.export(step, example, strict=False))
    _empty_permuted_as_empty(ep.graph_module)
    # the joint graph holds backward ops outside the core ATen set (convolution_backward, ...)
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch(ExecutorchBackendConfig(external_constants=tag, remove_view_copy=False))


def export_training(
    backend: DiffusionBackend,
    out_dir: str | Path,
    *,
    lora: LoraConfig | None = None,
    batch: int = 16,
    measure: bool = True,
    parity_batch: tuple[torch.Tensor, ...] | None = None,
    latency_reps: int = 5,
) -> Manifest:
    """Export the LoRA training step of the backend's (plain) denoiser with a ``lora`` adapter (the fleet's;
    default: rank 2 on the model's default targets) to ``out_dir``.

    ``parity_batch`` ``(x_t, t, conditioning, target)`` of ``batch`` rows is where the program's loss
    and step-1 gradients are checked against eager autograd (default: the traced example inputs).
    """
    from export_tools.executorch import ExportError

    base = backend.denoiser
    if getattr(base, "peft_config", None):
        raise ExportError("export from the plain base UNet; the trainable adapter is added by the exporter")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = lora if lora is not None else lora_config(target_modules=backend.default_targets)
    unet = eager_unet(base, lora)
    initial = get_adapter_state(unet, SLOT)
    example = example_inputs(backend, batch)
    started = time.perf_counter()
    program = lower_training(training_step(unet, backend), example)
    seconds = time.perf_counter() - started

    for stale in (PROGRAM, BASE_DATA, ADAPTER_DATA):
        (out / stale).unlink(missing_ok=True)
    (out / PROGRAM).write_bytes(program.buffer)
    program.write_tensor_data_to_file(str(out))  # <tag>.ptd: base.ptd, adapter.ptd
    if not (out / BASE_DATA).exists() or not (out / ADAPTER_DATA).exists():
        raise ExportError(f"the exporter did not write {BASE_DATA} and {ADAPTER_DATA} to {out}")
    # the program keys its trainable tensors by module path (with their tensor layouts, which the
    # runtime checks, so the file stays as written); the slot maps the keys to peft names
    slot = locate_slot(initial, (out / ADAPTER_DATA).read_bytes(), lora.r, fqn_prefix="unet.")

    shape = list(example[0].shape)
    manifest = Manifest(
        format=FORMAT, base_sha256=base_digest(base), unet_config=model_config(base), quantization="fp32",
        adapter={"rank": lora.r, "alpha": lora.lora_alpha, "scale": lora_scale(lora),
                 "target_modules": sorted(lora.target_modules), "trainable": [t.name for t in slot.tensors]},
        slot=slot.to_json(),
        inputs={"x": {"shape": shape, "dtype": "float32"}, "t": {"shape": [batch], "dtype": "float32"},
                "encoding": {"shape": list(example[2].shape), "dtype": "float32"},
                "noise": {"shape": shape, "dtype": "float32"}},
        outputs={"loss": {"shape": [], "dtype": "float32"},
                 "gradients": {"of": "every adapter tensor", "via": "executorch.extension.training.TrainingModule"}},
        notes=[f"joint forward-backward export + lowering took {seconds:.1f} s",
               "base.ptd holds the frozen base weights, adapter.ptd the trainable LoRA tensors (initial values)",
               "portable kernels, no XNNPACK delegation: the backward ops run on portable kernels",
               "the loss is models.training's MSE to the target (noise or velocity); batches, noise, timesteps "
               "and targets are drawn outside"],
    )
    manifest.record_files(out, [PROGRAM, BASE_DATA, ADAPTER_DATA])
    manifest.save(out)
    if measure:
        if parity_batch is None:
            parity_batch = example
        manifest.parity, manifest.latency = measure_training(out, unet, backend, parity_batch, latency_reps)
        manifest.save(out)
    return manifest


def gradient_errors(runtime: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Worst absolute and relative (to each tensor's largest eager gradient) error of ``runtime`` vs ``reference``."""
    if set(runtime) != set(reference):
        raise ValueError(f"gradient names differ: {sorted(set(runtime) ^ set(reference))[:3]}")
    worst_abs, worst_rel = 0.0, 0.0
    for name, ref in reference.items():
        err = float((runtime[name] - ref).abs().max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(ref.abs().max()), 1e-12))
    return {"grad_max_abs_err": worst_abs, "grad_max_rel_err": worst_rel}


def eager_gradients(unet: torch.nn.Module, backend: DiffusionBackend,
                    batch: tuple[torch.Tensor, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, gradients by peft name) of adapter ``SLOT`` of ``unet`` by eager autograd."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss = F.mse_loss(backend.run(unet, *batch[:3]), batch[3])
    loss.backward()
    grads = {n.replace(f".{SLOT}.", "."): p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return float(loss.detach()), grads


def measure_training(out_dir: Path, unet: torch.nn.Module, backend: DiffusionBackend, batch: tuple[torch.Tensor, ...],
                     reps: int = 5) -> tuple[dict, dict]:
    """(parity, latency) of the program in ``out_dir`` against eager autograd on ``unet``, same process."""
    from edge_sdk.artifacts.training import ExecuTorchTrainer

    trainer = ExecuTorchTrainer(out_dir, threads=torch.get_num_threads())
    trainer.set_adapter(get_adapter_state(unet, SLOT))
    loss, grads = trainer.forward_backward(*batch)
    eager_loss, eager_grads = eager_gradients(unet, backend, batch)
    parity = {"loss": loss, "eager_loss": eager_loss, "loss_abs_err": abs(loss - eager_loss),
              **gradient_errors(grads, eager_grads), "rows": int(batch[0].shape[0]),
              "reference": "eager peft UNet, autograd (models.training's loss)"}
    times: dict[str, list[float]] = {"eager": [], "executorch": []}
    for rep in range(reps + 1):  # interleaved, first round is warm-up
        for kind in times:
            start = time.perf_counter()
            if kind == "eager":
                eager_gradients(unet, backend, batch)
            else:
                trainer.forward_backward(*batch)
            if rep:
                times[kind].append(time.perf_counter() - start)
    eager_s, et_s = statistics.median(times["eager"]), statistics.median(times["executorch"])
    latency = {"eager_s_per_step": eager_s, "executorch_s_per_step": et_s, "ratio_vs_eager": et_s / eager_s,
               "batch": int(batch[0].shape[0]), "threads": torch.get_num_threads(), "reps": reps,
               "note": "forward + backward only (no optimizer), measured on the export machine's CPU"}
    return parity, latency
