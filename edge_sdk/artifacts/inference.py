"""Sampling through an exported ExecuTorch program: a drop-in ``denoiser`` for ``DiffusionBackend.sample``.

``ExecuTorchDenoiser(export_dir)`` loads ``model.pte`` with its two data files,
``base.ptd`` and ``adapter.ptd`` (checked against ``manifest.json``), and is called like
the eager UNet: ``denoiser(x, t, conditioning) -> prediction``. The sampler stays the eager one, so
the backends differ only in the network.

Adapters are data: ``set_mix(adapters, weights)`` packs any adapters whose ranks fit the
exported slot into a new ``adapter.ptd`` and reloads the program from the same ``.pte`` —
nothing is re-exported. The C++ runtime's ``Module`` takes several data files; the Python
runtime (``executorch.runtime.Runtime.load_program(..., data_path=)``) takes one, so here
the two files are merged into one temporary file at load.

The program has a fixed batch (``manifest.inputs["x"]``): larger calls are split, smaller
ones padded. XNNPACK delegates are initialised (weights packed) at load, so a swap costs
one program load, not an export.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from edge_sdk.artifacts.manifest import Manifest, ManifestError
from edge_sdk.artifacts.ptd import AdapterSlot, DataFileError, adapter_ptd, merge_ptd, pack_mix, ptd_keys

log = logging.getLogger("fedaigc.executorch")

PROGRAM, BASE_DATA, ADAPTER_DATA = "model.pte", "base.ptd", "adapter.ptd"


class ExportLoadError(RuntimeError):
    """The runtime refused the program or its data; the message carries the runtime's reason."""


def set_runtime_threads(threads: int) -> None:
    """Size of the threadpool XNNPACK runs on (process-wide)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchDenoiser:
    def __init__(self, export_dir: str | Path, *, base_sha256: str | None = None, threads: int | None = None) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = Manifest.load(self.export_dir)
        if self.manifest.format != "executorch":
            raise ManifestError(f"{self.export_dir} holds a {self.manifest.format} export, not executorch")
        if base_sha256 is not None and base_sha256 != self.manifest.base_sha256:
            raise ManifestError(f"{self.export_dir} was exported from base model {self.manifest.base_sha256[:12]}…, "
                                f"this device runs {base_sha256[:12]}…; export again from this base")
        self.slot = AdapterSlot.from_json(self.manifest.slot)
        self.batch = int(self.manifest.inputs["x"]["shape"][0])
        self._program_bytes = self.manifest.verify_file(self.export_dir, PROGRAM).read_bytes()
        self._base = self.manifest.verify_file(self.export_dir, BASE_DATA).read_bytes()
        if threads is not None:
            set_runtime_threads(threads)
        self._tmp = tempfile.TemporaryDirectory(prefix="fedaigc-et-")
        self._adapter_digest = ""
        self.method = None
        self.load_adapter_data(self.manifest.verify_file(self.export_dir, ADAPTER_DATA).read_bytes())

    # ---------------------------------------------------------------- adapters
    def load_adapter_data(self, blob: bytes) -> None:
        """Run the program with another ``adapter.ptd`` (bytes); refused unless its keys fit the slot."""
        digest = hashlib.sha256(blob).hexdigest()
        if digest == self._adapter_digest:
            return
        want = {t.key: 4 * _numel(t.shape) for t in self.slot.tensors}
        have = ptd_keys(blob)
        if have != want:
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            raise DataFileError(f"adapter data does not fit this program: missing keys {missing[:2]}, "
                                f"unknown keys {extra[:2]}, wrong sizes {wrong[:2]}")
        data_path = Path(self._tmp.name) / f"data-{digest[:16]}.ptd"
        data_path.write_bytes(merge_ptd([self._base, blob]))
        try:
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(self._program_bytes, data_path=data_path)
            method = program.load_method("forward")
        except Exception as e:
            raise ExportLoadError(f"ExecuTorch refused {self.export_dir / PROGRAM} with its data: {e}") from None
        for old in Path(self._tmp.name).glob("data-*.ptd"):
            if old != data_path:
                old.unlink()
        self._program, self.method, self._adapter_digest = program, method, digest

    def set_slot_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_adapter_data(adapter_ptd(self.slot, state))

    def set_mix(self, adapters: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float],
                scales: Mapping[str, float] | None = None) -> None:
        """Fill the slot with ``Σ weights[n]·scales[n]·B_n A_n`` (peft-named adapter tensors)."""
        self.set_slot_state(pack_mix(self.slot, adapters, weights, scales))

    # ---------------------------------------------------------------- inference
    def __call__(self, x: torch.Tensor, t: torch.Tensor, encodings: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t).to(torch.float32).reshape(-1).expand(n)
        outputs = []
        for start in range(0, n, self.batch):
            rows = slice(start, min(n, start + self.batch))
            chunk = [x[rows], t[rows], encodings[rows]]
            k = chunk[0].shape[0]
            if k < self.batch:  # pad with copies of the last row; their outputs are dropped
                chunk = [torch.cat([c, c[-1:].expand(self.batch - k, *c.shape[1:])]) for c in chunk]
            chunk = [c.to(torch.float32).contiguous() for c in chunk]
            outputs.append(self.method.execute(chunk)[0][:k])
        return torch.cat(outputs)

    def close(self) -> None:
        self.method = self._program = None
        self._tmp.cleanup()


def swap_adapter(export_dir: str | Path, adapters: Mapping[str, Mapping[str, torch.Tensor]],
                 weights: Mapping[str, float], scales: Mapping[str, float] | None = None,
                 versions: Mapping[str, int] | None = None) -> Manifest:
    """Install a new adapter (or mix) into an export directory: a new ``adapter.ptd``, same program.

    The data file is written atomically and the manifest's adapter record and file hash
    follow it; the export-time parity no longer describes this adapter, so it is dropped.
    """
    from edge_sdk.artifacts.manifest import adapter_record
    from edge_sdk.protocol.files import atomic_write_bytes

    export_dir = Path(export_dir)
    manifest = Manifest.load(export_dir)
    slot = AdapterSlot.from_json(manifest.slot)
    blob = adapter_ptd(slot, pack_mix(slot, adapters, weights, scales))
    atomic_write_bytes(export_dir / ADAPTER_DATA, blob)
    manifest.adapter = adapter_record(adapters, weights, versions)
    manifest.record_files(export_dir, [ADAPTER_DATA])
    manifest.parity = {"note": "adapter swapped after export; parity was measured for the exported adapter"}
    manifest.save(export_dir)
    return manifest


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
