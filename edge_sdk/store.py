"""The device's adapter store: named adapters as safetensors files, written atomically.

Each adapter is one file ``<name>.safetensors`` whose metadata carries its version and a
checksum of the tensor bytes. A write goes to a temporary file that is fsynced and then
renamed over the old one, so a crash mid-write leaves the previous adapter loadable; a
file that fails its checksum (a disk error, a hand edit) is refused on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from edge_sdk.protocol.digest import tensor_digest
from edge_sdk.protocol.files import atomic_write_bytes

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CorruptAdapter(ValueError):
    """An adapter file exists but cannot be trusted."""


@dataclass(frozen=True)
class StoredAdapter:
    tensors: dict[str, torch.Tensor]
    version: int
    lora: dict | None  # models.lora.lora_to_dict of the config it was trained with; None if not recorded


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"adapter name must match {_NAME.pattern}, got {name!r}")
        return self.root / f"{name}.safetensors"

    def save(self, name: str, tensors: Mapping[str, torch.Tensor], version: int = 0,
             lora: Mapping | None = None) -> Path:
        """Write adapter ``name``; ``lora`` (``models.lora.lora_to_dict``) records the config it was made with."""
        path = self.path(name)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {"version": str(int(version)), "sha256": tensor_digest(tensors)}
        if lora is not None:
            meta["lora"] = json.dumps(dict(lora), sort_keys=True)
        atomic_write_bytes(path, save(tensors, metadata=meta))
        return path

    def load(self, name: str) -> StoredAdapter:
        """The adapter, its version and its LoRA config; raises FileNotFoundError or CorruptAdapter."""
        path = self.path(name)
        if not path.exists():
            raise FileNotFoundError(f"no adapter {name!r} in {self.root}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CorruptAdapter(f"adapter file {path} is unreadable: {e}") from None
        if meta.get("sha256") != tensor_digest(tensors):
            raise CorruptAdapter(f"adapter file {path} fails its checksum")
        try:
            lora = json.loads(meta["lora"]) if "lora" in meta else None
        except ValueError:
            raise CorruptAdapter(f"adapter file {path} has an unreadable LoRA config") from None
        return StoredAdapter(tensors, int(meta.get("version", "0")), lora)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(".safetensors")] for p in self.root.glob("*.safetensors"))

    def exists(self, name: str) -> bool:
        return self.path(name).exists()
