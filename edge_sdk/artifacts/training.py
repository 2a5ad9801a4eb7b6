"""Training a local round through an exported ExecuTorch training program (``fedaigc export --format executorch-training``).

``ExecuTorchTrainer(export_dir)`` loads ``train.pte`` with ``base.ptd`` + ``adapter.ptd``
(checked against ``manifest.json``) into ``executorch.extension.training.TrainingModule``.
Each step the program computes the loss and the LoRA gradients; the optimizer (AdamW
with gradient clipping, exactly ``models.training.train_steps``) updates the runtime's own
parameter tensors in place — the runtime hands them out without copying — so the next
step runs with the new weights and nothing is re-exported or reloaded. The data, noise
and timestep draws are the eager trainer's, so the two backends differ only in the network.

Adapters in and out use peft naming (``<module>.lora_A.weight``), the same keys as
``models.lora.get_adapter_state``: a device starts a round from its cluster's adapter with
``set_adapter`` and uploads ``adapter_state()`` through the normal update path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.artifacts.manifest import Manifest, ManifestError
from edge_sdk.artifacts.ptd import AdapterSlot, merge_ptd
from models.backend import DiffusionBackend
from models.lora import check_adapter_state
from models.training import TrainConfig, train_steps

FORMAT = "executorch-training"
PROGRAM, BASE_DATA, ADAPTER_DATA = "train.pte", "base.ptd", "adapter.ptd"
METHOD = "forward"


class ExecuTorchTrainer:
    def __init__(self, export_dir: str | Path, *, base_sha256: str | None = None, threads: int | None = None) -> None:
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
        from executorch.extension.training import TrainingModule

        from edge_sdk.artifacts.inference import ExportLoadError, set_runtime_threads

        self.export_dir = Path(export_dir)
        self.manifest = Manifest.load(self.export_dir)
        if self.manifest.format != FORMAT:
            raise ManifestError(f"{self.export_dir} holds a {self.manifest.format} export, not {FORMAT} "
                                f"(`fedaigc export --format {FORMAT}`)")
        if base_sha256 is not None and base_sha256 != self.manifest.base_sha256:
            raise ManifestError(f"{self.export_dir} was exported from base model {self.manifest.base_sha256[:12]}…, "
                                f"this device runs {base_sha256[:12]}…; export again from this base")
        self.slot = AdapterSlot.from_json(self.manifest.slot)
        self.batch = int(self.manifest.inputs["x"]["shape"][0])
        if threads is not None:
            set_runtime_threads(threads)
        program = self.manifest.verify_file(self.export_dir, PROGRAM).read_bytes()
        data = merge_ptd([self.manifest.verify_file(self.export_dir, name).read_bytes()
                          for name in (BASE_DATA, ADAPTER_DATA)])
        # the runtime reads both buffers in place without holding a reference: freed bytes gave
        # "Null value at index ..." / "Op index out of range" or a segfault, so they live as long as we do
        self._buffers = (program, data)
        try:
            self.module = TrainingModule(_load_for_executorch_from_buffer(program, data))
            # TrainingModule exposes the parameters only as outputs of a step ("Must call
            # forward_backward before named_params"): one step on zeros materialises them
            self.module.forward_backward(METHOD, [torch.zeros(self.manifest.inputs[k]["shape"])
                                                  for k in ("x", "t", "encoding", "noise")])
        except RuntimeError as e:
            raise ExportLoadError(f"ExecuTorch refused {self.export_dir / PROGRAM} with its data: {e}") from None
        by_key = self.module.named_parameters()
        missing = sorted(t.key for t in self.slot.tensors if t.key not in by_key)
        if missing or len(by_key) != len(self.slot.tensors):
            raise ManifestError(f"the program's trainable tensors do not match its manifest: missing {missing[:2]}, "
                                f"{len(by_key)} in the program, {len(self.slot.tensors)} in the manifest")
        self.parameters: dict[str, torch.Tensor] = {t.name: by_key[t.key] for t in self.slot.tensors}

    @property
    def rank(self) -> int:
        return int(self.manifest.adapter["rank"])

    @property
    def scale(self) -> float:
        return float(self.manifest.adapter["scale"])

    # ---------------------------------------------------------------- adapter in / out
    def set_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write ``state`` (peft names, the program's rank and targets) into the runtime's parameters."""
        check_adapter_state(self.parameters, state)
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(state[name].to(torch.float32))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trained adapter, keyed like ``models.lora.get_adapter_state``."""
        return {name: param.detach().clone() for name, param in self.parameters.items()}

    # ---------------------------------------------------------------- training
    def forward_backward(self, x: torch.Tensor, t: torch.Tensor, encoding: torch.Tensor,
                         noise: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """(loss, gradients by peft name) of one batch, from the program."""
        if x.shape[0] != self.batch:
            raise ValueError(f"the training program takes batches of {self.batch} rows, got {x.shape[0]}")
        inputs = [v.to(torch.float32).contiguous() for v in (x, t, encoding, noise)]
        loss = self.module.forward_backward(METHOD, inputs)[0]
        grads = self.module.named_gradients()
        return float(loss), {t.name: grads[t.key] for t in self.slot.tensors}

    def step(self, x: torch.Tensor, t: torch.Tensor, encoding: torch.Tensor, noise: torch.Tensor) -> float:
        """One ``models.training.train_steps`` step: the loss, with each parameter's ``.grad`` set."""
        loss, grads = self.forward_backward(x, t, encoding, noise)
        for name, param in self.parameters.items():
            param.grad = grads[name]
        return loss

    def train(self, backend: DiffusionBackend, samples: torch.Tensor, conditioning: torch.Tensor,
              config: TrainConfig) -> list[float]:
        """``config.steps`` steps on (sample, conditioning) pairs, as ``models.training.train_denoiser`` takes them
        (``backend``, the model the program was exported from, draws the noise and targets)."""
        rows = min(config.batch_size, samples.shape[0])
        if rows != self.batch:
            raise ValueError(f"the training program was exported for batches of {self.batch}; this round draws "
                             f"{rows} rows (batch_size={config.batch_size}, {samples.shape[0]} samples)")
        try:
            return train_steps(self.step, list(self.parameters.values()), backend, samples, conditioning, config)
        finally:
            for param in self.parameters.values():
                param.grad = None
