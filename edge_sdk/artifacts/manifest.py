"""``manifest.json``: what an export directory holds and what was measured when it was made.

The manifest names every file with its SHA-256 and size, the base model it was exported
from (a digest of the base weights, so a device refuses a program built for another
base), the adapter (or mix) and its version, the quantization, the adapter slot layout
a device needs to swap adapters, and the parity and latency measured at export time.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edge_sdk.artifacts.ptd import rank_of
from edge_sdk.protocol.digest import file_digest, parts_digest, tensor_digest
from models.lora import base_weights

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """An export directory is incomplete, altered, or built for another model."""


def base_digest(unet: torch.nn.Module) -> str:
    """The digest of a module's base weights, ignoring any LoRA adapters on top (what an export records)."""
    return tensor_digest(base_weights(unet))


def part_digests(backend) -> dict[str, str]:
    """``base_digest`` of every part of a ``models.backend.DiffusionBackend`` (take it before quantizing)."""
    return {name: base_digest(module) for name, module in backend.modules().items()}


def model_digest(parts: dict[str, str]) -> str:
    """The identity of a whole model from ``part_digests``: a one-part model's is its part's."""
    return next(iter(parts.values())) if len(parts) == 1 else parts_digest(parts)


@dataclass
class Manifest:
    format: str  # "executorch" | "coreml"
    base_sha256: str
    unet_config: dict
    quantization: str
    adapter: dict  # {"mix": {name: weight}, "versions": {name: v}, "ranks": {name: r}, "sha256": {name: digest}}
    files: dict = field(default_factory=dict)  # {filename: {"sha256", "bytes"}}
    inputs: dict = field(default_factory=dict)  # {name: {"shape", "dtype"}}
    outputs: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    slot: dict | None = None  # executorch: AdapterSlot.to_json()
    functions: list | None = None  # coreml multifunction: function names
    notes: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def record_files(self, out_dir: Path, names: list[str]) -> None:
        for name in names:
            path = Path(out_dir) / name
            self.files[name] = {"sha256": file_digest(path), "bytes": _size(path)}

    def save(self, out_dir: str | Path) -> Path:
        self.versions = self.versions or toolchain_versions()
        path = Path(out_dir) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest":
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            raise ManifestError(f"no {MANIFEST} in {out_dir}; export with `fedaigc export`")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path} has format_version {data.get('format_version')}, expected {FORMAT_VERSION}")
        return cls(**data)

    def verify_file(self, out_dir: str | Path, name: str) -> Path:
        """The path of ``name``, after checking its size and SHA-256 against the manifest."""
        path = Path(out_dir) / name
        if name not in self.files:
            raise ManifestError(f"{name} is not listed in {Path(out_dir) / MANIFEST}")
        if not path.exists():
            raise ManifestError(f"{path} is missing")
        want = self.files[name]
        if _size(path) != want["bytes"] or file_digest(path) != want["sha256"]:
            raise ManifestError(f"{path} does not match its manifest entry (sha256 {want['sha256'][:12]}…): "
                                f"corrupt, or from another export")
        return path


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def toolchain_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("executorch", "coremltools", "diffusers", "peft"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            pass
    return out


def adapter_record(adapters: Mapping[str, Mapping[str, torch.Tensor]], mix: Mapping[str, float],
                   versions: Mapping[str, int] | None = None) -> dict:
    versions = dict(versions or {})
    return {"mix": {n: float(w) for n, w in mix.items()},
            "versions": {n: int(versions.get(n, 0)) for n in mix},
            "ranks": {n: rank_of(adapters[n]) for n in mix},
            "sha256": {n: tensor_digest(adapters[n]) for n in mix}}
